"""The DPO pair rule (ttsrl.training.preference_pairs): which response is chosen, which is rejected,
which groups are dropped and why, the validation split, and the files."""
from __future__ import annotations

import json

import pytest

from ttsrl.training.preference_pairs import (NoPairsError, PairRule, build_pairs, pair_of_group, read_pairs,
                                             write_pairs)
from ttsrl.training.preference_samples import PromptRow


def scored(sample: int, score: float, error_rate: float, response: str | None = None) -> dict:
    return {"prompt_index": 0, "sample": sample, "score": score, "error_rate": error_rate,
            "speaker_similarity": score / 2, "response": response or f"<|s_{sample}|><|eos1|>"}


def test_chosen_is_the_best_under_the_threshold_and_rejected_the_worst():
    group = [scored(0, 0.9, 0.2), scored(1, 0.7, 0.0), scored(2, 0.1, 0.5), scored(3, 0.6, 0.0), scored(4, 0.3, 0.1)]
    chosen, rejected = pair_of_group(group, PairRule(max_chosen_error=0.0))
    # sample 0 has the highest reward but misreads: the chosen one must read right
    assert (chosen["sample"], rejected["sample"]) == (1, 2)
    chosen, rejected = pair_of_group(group, PairRule(max_chosen_error=0.25))
    assert (chosen["sample"], rejected["sample"]) == (0, 2)


def test_dropped_groups_say_why():
    rule = PairRule(max_chosen_error=0.0)
    assert pair_of_group([scored(0, 1.0, 0.0)], rule) == "fewer_than_2_scored"
    assert pair_of_group([scored(0, 0.5, 0.3), scored(1, 0.2, 0.4)], rule) == "no_chosen_under_threshold"
    assert pair_of_group([scored(0, 0.5, 0.0), scored(1, 0.5, 0.0)], rule) == "tie"
    same = "<|s_1|><|eos1|>"
    assert pair_of_group([scored(0, 0.9, 0.0, same), scored(1, 0.1, 0.0, same)], rule) == "tie"
    assert pair_of_group([scored(0, 0.5, 0.0), scored(1, 0.45, 0.0)], PairRule(min_margin=0.1)) == "tie"


def test_equal_rewards_break_by_sample_number():
    group = [scored(3, 0.8, 0.0), scored(1, 0.8, 0.0), scored(2, 0.1, 0.0), scored(0, 0.1, 0.0)]
    chosen, rejected = pair_of_group(group, PairRule())
    assert (chosen["sample"], rejected["sample"]) == (1, 0)


def rows(n: int) -> dict:
    return {i: PromptRow(i, [{"role": "user", "content": f"text{i}"}, {"role": "assistant", "content": ""}],
                         f"text{i}", "src", {"index": i}) for i in range(n)}


def samples_and_scores(groups: dict[int, list[tuple[float, float]]]):
    samples, scores = [], []
    for index, group in groups.items():
        for k, (score, error) in enumerate(group):
            samples.append({"prompt_index": index, "sample": k, "response": f"<|s_{index}|><|s_{k}|><|eos1|>"})
            if score is not None:
                scores.append({"prompt_index": index, "sample": k, "score": score, "error_rate": error})
    return samples, scores


def test_build_pairs_counts_every_reason_and_splits_validation(tmp_path):
    groups = {i: [(0.9, 0.0), (0.2, 0.5)] for i in range(20)}
    groups[20] = [(0.9, 0.0), (None, None)]  # the server refused one of the two: too few scores
    groups[21] = [(0.4, 0.5), (0.3, 0.6)]    # all bad
    groups[22] = [(0.5, 0.0), (0.5, 0.0)]    # tie
    samples, scores = samples_and_scores(groups)
    train, validation, stats = build_pairs(samples, scores, rows(23), PairRule(val_fraction=0.1, seed=3), refused=1)
    assert stats["dropped"] == {"fewer_than_2_scored": 1, "no_chosen_under_threshold": 1, "tie": 1}
    assert (stats["pairs"], stats["train_pairs"], stats["val_pairs"]) == (20, 18, 2)
    assert stats["refused_by_server"] == 1 and stats["prompts"] == 23
    assert not {p["prompt_index"] for p in train} & {p["prompt_index"] for p in validation}
    pair = train[0]
    assert pair["chosen"] == [{"role": "assistant", "content": f"<|s_{pair['prompt_index']}|><|s_0|><|eos1|>"}]
    assert (pair["chosen_score"], pair["rejected_score"], pair["rejected_error_rate"]) == (0.9, 0.2, 0.5)
    assert pair["prompt"] == rows(23)[pair["prompt_index"]].messages
    # the same seed gives the same split
    again = build_pairs(samples, scores, rows(23), PairRule(val_fraction=0.1, seed=3))[1]
    assert [p["prompt_index"] for p in again] == [p["prompt_index"] for p in validation]

    write_pairs(tmp_path, train, validation, stats)
    assert read_pairs(tmp_path / "pairs.jsonl") == json.loads(json.dumps(train))
    assert json.loads((tmp_path / "pairs_stats.json").read_text())["dropped"]["tie"] == 1


def test_no_pair_at_all_stops_with_the_counts():
    samples, scores = samples_and_scores({0: [(0.4, 0.5), (0.3, 0.6)], 1: [(0.4, 0.5), (0.3, 0.6)], 2: [(0.9, 0.0)]})
    with pytest.raises(NoPairsError) as error:
        build_pairs(samples, scores, rows(3), PairRule())
    message = str(error.value)
    assert "'no_chosen_under_threshold': 2" in message and "'fewer_than_2_scored': 1" in message
    assert "dpo_max_chosen_error" in message


def test_bad_rule_values_and_bad_pair_lines_are_named(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        PairRule(val_fraction=1.0)
    with pytest.raises(ValueError, match="max_chosen_error"):
        PairRule(max_chosen_error=-0.1)
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": [], "chosen": [], "rejected": []}\n{"prompt": []}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not a preference pair"):
        read_pairs(path)

"""The rules for refused rollouts (ttsrl/training/refused_rollouts.py): which rows carry no
gradient, with veRL's own GRPO estimator on the rest; when the run stops; what is logged.
The rules inside a real veRL GRPO run: tests/test_grpo_cpu.py (refused_run)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ttsrl.training import refused_rollouts as rr


# ---- no gradient ---------------------------------------------------------------------------------
def test_refused_rows_and_a_groups_lone_survivor_get_no_gradient():
    groups = ["a", "a", "a", "a", "b", "b", "b", "b", "c", "pad"]
    refused = [False, True, False, False, True, True, True, False, False, False]
    assert rr.rows_without_gradient(groups, refused) == [
        False, True, False, False,  # a: one refused, three compared with each other
        True, True, True, True,     # b: its one scored rollout has nothing to be compared with
        False, False]               # c, pad: groups of one by design (rollout.n=1, veRL's padding) stay as they are


def _grpo(scores: list[float], groups: list[str]) -> np.ndarray:
    """veRL's own GRPO estimator, as the v1 trainer calls it, on one-token responses."""
    from verl import DataProto
    from verl.trainer.ppo.core_algos import AdvantageEstimator
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    n = len(scores)
    data = DataProto.from_dict(tensors={"token_level_rewards": torch.tensor(scores).reshape(n, 1),
                                        "response_mask": torch.ones(n, 1)},
                               non_tensors={"uid": np.array(groups, dtype=object)})
    keys = [f"{group}_{row}_0" for row, group in enumerate(groups)]
    out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator=AdvantageEstimator.GRPO,
                                                   num_repeat=4, norm_adv_by_std_in_grpo=True)
    return out.batch["advantages"][:, 0].numpy()


def test_veRLs_estimator_on_the_scored_rollouts_leaves_the_refused_one_out_of_the_group_statistics():
    """What the tts_sync trainer does: veRL's GRPO over the rows that carry a gradient; the
    refused rollout's placeholder score would have moved its group's mean and std."""
    scores = [0.9, 0.0, 0.5, 0.1, 0.7, 0.3, 0.2, 0.6]  # row 1 refused: 0.0 is the placeholder
    groups = ["a"] * 4 + ["b"] * 4
    refused = [row == 1 for row in range(8)]
    keep = [not x for x in rr.rows_without_gradient(groups, refused)]
    kept = _grpo([s for s, k in zip(scores, keep) if k], [g for g, k in zip(groups, keep) if k])
    scored = np.array([0.9, 0.5, 0.1])
    assert kept[:3] == pytest.approx((scored - scored.mean()) / (scored.std(ddof=1) + 1e-6), abs=1e-5)
    assert kept[3:] == pytest.approx(_grpo(scores[4:], groups[4:]), abs=1e-6)  # group b is untouched
    with_placeholder = _grpo(scores, groups)
    assert not np.allclose(with_placeholder[[0, 2, 3]], kept[:3], atol=1e-3)


# ---- when the run stops --------------------------------------------------------------------------
def test_the_budget_is_a_share_of_the_steps_rollouts():
    policy = rr.FailurePolicy()
    assert (policy.budget, policy.max_consecutive_steps) == (0.01, 3)
    assert [policy.allowed(n) for n in (16, 100, 128, 256)] == [0, 1, 1, 2]
    assert rr.FailurePolicy(0.25).allowed(16) == 4
    tracker = rr.FailureTracker(rr.FailurePolicy(0.25, 0))
    assert tracker.check(4, 16) is None  # at the budget: trains
    reason = tracker.check(5, 16)
    assert reason == "5 of its 16 rollouts were refused, over reward_failure_budget=0.25 (4 allowed)"


def test_refusals_on_consecutive_steps_stop_the_run_and_a_clean_step_resets_the_count():
    tracker = rr.FailureTracker(rr.FailurePolicy(0.5, 3))
    assert [tracker.check(refused, 16) for refused in (1, 2, 0, 1, 1)] == [None] * 5
    reason = tracker.check(1, 16)  # the third step in a row with a refusal, each under the budget
    assert reason.startswith("3 steps in a row have refused rollouts (1 of 16 in this one; "
                             "reward_failure_max_consecutive_steps")
    off = rr.FailureTracker(rr.FailurePolicy(0.5, 0))
    assert all(off.check(1, 16) is None for _ in range(10))


@pytest.mark.parametrize("settings, named", [
    ({"reward_failure_budget": 1.0}, "reward_failure_budget"),
    ({"reward_failure_budget": -0.1}, "reward_failure_budget"),
    ({"reward_failure_budget": "many"}, "reward_failure_budget"),
    ({"reward_failure_max_consecutive_steps": -1}, "reward_failure_max_consecutive_steps"),
    ({"reward_failure_max_consecutive_steps": 2.5}, "reward_failure_max_consecutive_steps"),
])
def test_a_bad_setting_is_named_with_what_it_must_be(settings, named):
    with pytest.raises(ValueError, match=named) as error:
        rr.FailurePolicy.from_settings(settings)
    assert "configs/default.sh" in str(error.value)


def test_settings_come_from_the_tts_section_as_strings_or_numbers():
    assert rr.FailurePolicy.from_settings({"reward_failure_budget": "0.05",
                                           "reward_failure_max_consecutive_steps": "2"}) == rr.FailurePolicy(0.05, 2)
    assert rr.FailurePolicy.from_settings(None) == rr.FailurePolicy()


def test_missing_rollouts_stop_the_step():
    assert rr.lost_rollouts(16, 16) is None
    reason = rr.lost_rollouts(16, 12)
    assert reason.startswith("4 of its 16 rollouts are missing") and "REWARD_RETRY_BUDGET_S" in reason


# ---- what is logged ------------------------------------------------------------------------------
def test_a_refused_rollout_is_recorded_with_its_item_and_items_are_named_once():
    info = {"split": "train", "index": np.int64(5), "id": "num005", "prompt_id": "low", "prompt_wav": "/p/low.wav",
            "prompt_text": "提示", "text": "七一五", "language": None}
    records = [rr.failure_record(2, f"uid_{i}_0", "smoke", info, "七一五", "sample rate 8000 Hz") for i in range(4)]
    hook_reason = "rollout (data_source 'smoke', index 6, ground truth '八七'): reward server g refused it: other"
    records.append(rr.failure_record(2, "uid2_0_0", "smoke", {"split": "train", "index": 6}, "八七", hook_reason))
    assert records[0] == {"step": 2, "rollout": "uid_0_0", "data_source": "smoke", "split": "train", "index": 5,
                          "id": "num005", "prompt_id": "low", "prompt_wav": "/p/low.wav", "text": "七一五",
                          "reason": "sample rate 8000 Hz"}
    json.dumps(records)  # numpy values became plain ones
    assert rr.describe_items(records).splitlines() == [
        "  - data_source 'smoke', train index 5, id 'num005', prompt_id 'low', prompt_wav '/p/low.wav', "
        "text '七一五': 4 rollout(s) refused: sample rate 8000 Hz",
        "  - data_source 'smoke', train index 6, text '八七': 1 rollout(s) refused: reward server g refused it: other"]
    assert rr.describe_items(records, limit=1).splitlines()[-1] == "  ... and 1 more items"


def test_records_are_appended_as_whole_json_lines(tmp_path):
    log = tmp_path / "exp" / rr.FAILURE_LOG
    rr.append_records(log, [{"step": 1}])
    rr.append_records(log, [])
    rr.append_records(log, [{"step": 2}, {"step": 2, "text": "七"}])
    assert [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] == [
        {"step": 1}, {"step": 2}, {"step": 2, "text": "七"}]

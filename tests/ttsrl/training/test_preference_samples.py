"""DPO steps 1-2 (ttsrl.training.preference_samples): stage 0's rows as prompts, N samples per
prompt with the real transformers generator on a tiny converted policy, exactly-once resume of
sampling and scoring, and scoring through the real reward server with the veRL hook."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import prepare_data
import reward_tts
from tests.policy_utils import tiny_policy  # noqa: F401 (fixture)
from ttsrl.policy.generation import TransformersGenerator
from ttsrl.sampling import SamplingOptions
from ttsrl.training.preference_samples import (PreferenceDataError, PromptRow, choose_prompts, read_complete_lines,
                                               read_prompt_rows, read_samples, read_scores, sample_responses,
                                               score_samples)
from ttsrl.triton_client.reward_client import RewardServerUnavailable, close_clients

REPO = Path(__file__).resolve().parents[3]
PROMPT_WAV = REPO / "assets" / "smoke_zero_shot" / "prompt-wavs" / "voice6_1.wav"


@pytest.fixture(scope="module")
def train_parquet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage0")
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                             for t in ["一二三", "四五六", "七八九", "三四五", "六七八", "九八七", "五四三", "二一"]))
    assert prepare_data.main(["--train_file", str(texts), "--test_size", "1", "--local_dir", str(root / "data")]) == 0
    return root / "data" / "train.parquet"


def test_rows_of_stage_0_become_the_generators_prompts(train_parquet):
    rows = read_prompt_rows(train_parquet)
    assert len(rows) == 7 and all(r.ground_truth and r.messages[0]["role"] == "user" for r in rows)
    utterance = rows[0].utterance()
    # the generators build the row's input as GRPO's rollouts do (ttsrl.frontend.row_policy_input)
    assert utterance.row == {"extra_info": rows[0].extra_info, "messages": rows[0].messages}
    assert utterance.text == rows[0].ground_truth
    assert rows[0].messages[0]["content"] == rows[0].extra_info["normalized_text"]
    before_stage_0_normalized = PromptRow(1, [{"role": "user", "content": "一"}], "一", "src", {"text": "一"})
    with pytest.raises(PreferenceDataError, match="training row 1: no extra_info.normalized_text.*rerun stage 0"):
        before_stage_0_normalized.utterance()
    picked = choose_prompts(rows, 3, seed=5)
    assert len(picked) == 3 and picked == choose_prompts(rows, 3, seed=5) and picked != choose_prompts(rows, 3, seed=6)
    assert choose_prompts(rows, 0, seed=5) == rows


def test_a_parquet_without_prompts_is_named(tmp_path):
    import pandas as pd

    path = tmp_path / "x.parquet"
    pd.DataFrame({"text": ["a"]}).to_parquet(path)
    with pytest.raises(PreferenceDataError, match=r"x.parquet: no column\(s\) \['prompt', 'reward_model'\]"):
        read_prompt_rows(path)


def test_real_sampling_gives_n_per_prompt_and_resumes_exactly_once(train_parquet, tiny_policy, tmp_path):  # noqa: F811
    rows = read_prompt_rows(train_parquet)[:4]
    generator = TransformersGenerator(str(tiny_policy), "cpu", SamplingOptions(max_new_tokens=6))
    calls = []

    def generate(batch):
        calls.append(len(batch))
        return generator.generate(batch)

    sample_responses(rows, 3, generate, tmp_path, prompts_per_batch=2, log=lambda _: None)
    records = read_samples(tmp_path)
    assert sorted((r["prompt_index"], r["sample"]) for r in records) == [(i, k) for i in range(4) for k in range(3)]
    assert calls == [6, 6]
    assert all(r["response"].startswith("<|s_") or r["response"] in ("", "<|eos1|>") for r in records)
    # a crash mid-write: the last prompt's lines partly there, the final line torn
    path = tmp_path / "samples.rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][:10])
    sample_responses(rows, 3, generate, tmp_path, prompts_per_batch=2, log=lambda _: None)
    assert calls == [6, 6, 3]  # only the unfinished prompt again
    again = read_complete_lines(path)
    assert sorted((r["prompt_index"], r["sample"]) for r in again) == [(i, k) for i in range(4) for k in range(3)]
    # rank 1 of 2 finds rank 0's finished prompts and has nothing left to do
    sample_responses(rows, 3, generate, tmp_path, prompts_per_batch=2, rank=1, world_size=2, log=lambda _: None)
    assert calls == [6, 6, 3] and read_samples(tmp_path) == read_complete_lines(path)
    with pytest.raises(ValueError, match="at least 2"):
        sample_responses(rows, 1, generate, tmp_path)


def fake_samples(rows, n=3):
    return [{"prompt_index": r.index, "sample": k, "response": f"<|s_{10 + k}|><|s_{20 + r.index}|><|eos1|>"}
            for r in rows for k in range(n)]


def test_scoring_resumes_after_the_server_fails_without_losing_or_repeating(train_parquet, reward_server, tmp_path):
    rows = {r.index: r for r in read_prompt_rows(train_parquet)}
    samples = fake_samples(rows.values())
    kwargs = {"server_url": reward_server.grpc_url}
    calls = {"n": 0}

    async def dies_after_five(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RewardServerUnavailable("the reward server went away")
        return await reward_tts.compute_score(*args, **kw)

    async def score(function, concurrency):
        try:
            return await score_samples(samples, rows, function, tmp_path, kwargs, concurrency, log=lambda _: None)
        finally:
            await close_clients()

    with pytest.raises(RewardServerUnavailable):
        asyncio.run(score(dies_after_five, concurrency=1))
    first, _ = read_scores(tmp_path)
    assert len(first) == 5
    counts = asyncio.run(score(reward_tts.compute_score, concurrency=8))
    assert counts == {"scored": len(samples) - 5, "refused": 0, "already": 5}
    scores, refused = read_scores(tmp_path)
    keys = [(s["prompt_index"], s["sample"]) for s in read_complete_lines(tmp_path / "scores.jsonl")]
    assert len(keys) == len(set(keys)) == len(samples) and refused == 0
    assert {"score", "error_rate", "num_speech_tokens"} <= set(scores[0])
    # the scores written before the failure are the ones the server gives again
    fresh = asyncio.run(reward_tts.score_records(
        [{"text": rows[s["prompt_index"]].ground_truth, "code": [10 + s["sample"], 20 + s["prompt_index"]],
          "extra_info": rows[s["prompt_index"]].extra_info} for s in first], kwargs))
    assert [round(f["score"], 6) for f in fresh] == [round(s["score"], 6) for s in first]
    assert asyncio.run(score(reward_tts.compute_score, concurrency=8))["scored"] == 0


def test_a_refused_item_is_recorded_and_the_rest_scored(train_parquet, reward_server, tmp_path):
    rows = {r.index: r for r in read_prompt_rows(train_parquet)[:2]}
    stale = PromptRow(1, rows[1].messages, rows[1].ground_truth, "src",
                      {"prompt_wav": str(PROMPT_WAV), "prompt_text": "右后头商", "prompt_hash": "0" * 64})
    rows[1] = stale
    samples = fake_samples(rows.values(), n=2)

    async def score():
        try:
            return await score_samples(samples, rows, reward_tts.compute_score, tmp_path,
                                       {"server_url": reward_server.grpc_url}, log=lambda _: None)
        finally:
            await close_clients()

    assert asyncio.run(score()) == {"scored": 2, "refused": 2, "already": 0}
    errors = read_complete_lines(tmp_path / "score_errors.jsonl")
    assert {e["prompt_index"] for e in errors} == {1} and "changed since stage 0" in errors[0]["error"]
    assert asyncio.run(score()) == {"scored": 0, "refused": 0, "already": 4}

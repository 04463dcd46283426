"""reward_tts.py (the veRL reward hook) against the real reward server (stand-in engines).

The client under it (coalescing, start-up check, load, faults): tests/token2wav_server/test_reward_client.py."""
import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import reward_tts
from tests.reward_utils import request_count, run
from token2wav_server.standin import text_to_tokens
from ttsrl.reward_shaping import error_rate_utility
from ttsrl.speech_tokens import SPEECH_END_TOKENS, all_speech_tokens, format_speech_tokens

TEXTS = ["一丁七万", "三上下", "丈三上", "万丈", "七七七", "下上"]


def _kwargs(server, protocol="grpc", **extra):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return {"server_url": url, **extra}


# ---- settings ------------------------------------------------------------------------
def test_parse_urls_accepts_lists_and_bare_addresses():
    assert reward_tts.parse_urls("grpc://a:1, http://b:2") == (("grpc", "a:1"), ("http", "b:2"))
    assert reward_tts.parse_urls("h:5", protocol="http") == (("http", "h:5"),)
    for bad in ("ftp://a:1", "grpc://nohost", ""):
        with pytest.raises(ValueError):
            reward_tts.parse_urls(bad)


def test_settings_prefer_kwargs_over_environment(monkeypatch):
    monkeypatch.setenv("REWARD_SERVER_URL", "http://env:9")
    monkeypatch.setenv("REWARD_RETRY_BUDGET_S", "7")
    assert reward_tts.settings_from({}).urls == (("http", "env:9"),)
    assert reward_tts.settings_from({}).retry_budget_s == 7.0
    assert reward_tts.settings_from({"server_url": "grpc://k:1"}).urls == (("grpc", "k:1"),)


# ---- scoring through the hook ----------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_compute_score_perfect_wrong_and_ignored_pieces(reward_server, protocol):
    kwargs = _kwargs(reward_server, protocol)

    async def score_all():
        perfect = await reward_tts.compute_score("tts", format_speech_tokens(text_to_tokens("一丁七万")), "一丁七万",
                                                 **kwargs)
        response = "hello" + format_speech_tokens(text_to_tokens("一丁七三")) + "<|eos1|><|s_5|>"
        wrong = await reward_tts.compute_score("tts", response, "一丁七万", extra_info={}, **kwargs)
        return perfect, wrong

    perfect, wrong = run(score_all())
    assert perfect == {"score": pytest.approx(1.0), "error_rate": 0.0, "num_speech_tokens": 4, "ignored_pieces": 0,
                       "transcript_length": 4}
    assert wrong["score"] == pytest.approx(error_rate_utility(0.25), rel=1e-6)
    assert wrong["error_rate"] == pytest.approx(0.25)
    assert wrong["ignored_pieces"] == 2  # "hello" and the token after the end token
    assert wrong["num_speech_tokens"] == 4


def test_empty_response_gets_minimum_without_a_server_call(reward_server):
    kwargs = _kwargs(reward_server)

    async def go():
        await reward_tts.compute_score("tts", format_speech_tokens([1]), "一", **kwargs)  # start-up done
        before = request_count(reward_server)
        results = [await reward_tts.compute_score("tts", text, "一丁", **kwargs) for text in ("", "no speech", "<|eos1|>")]
        return before, results

    before, results = run(go())
    assert request_count(reward_server) == before
    for result in results:
        assert result["score"] == reward_tts.MIN_SCORE == 0.0
        assert result["error_rate"] == 1.0 and result["num_speech_tokens"] == 0
    assert results[1]["ignored_pieces"] == 1


def test_bad_ground_truth_raises_instead_of_scoring(reward_server):
    with pytest.raises(reward_tts.RewardRequestError, match="GT_TEXT has nothing to score"):
        run(reward_tts.compute_score("tts", format_speech_tokens([1, 2]), "。。。", **_kwargs(reward_server)))
    with pytest.raises(reward_tts.RewardRequestError, match="empty"):
        run(reward_tts.compute_score("tts", format_speech_tokens([1, 2]), "", **_kwargs(reward_server)))


def test_cli_scores_a_jsonl_file(reward_server, tmp_path):
    lines = [{"text": t, "code": text_to_tokens(t)} for t in TEXTS[:3]] + [{"text": "一丁", "code": text_to_tokens("一")}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "reward_tts.py", "--input", str(path), "--server-url", reward_server.http_url],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["score"] for r in results] == pytest.approx([1.0, 1.0, 1.0, error_rate_utility(0.5)], rel=1e-6)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "reward_tts.py", "--input", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "bad.jsonl:1" in done.stderr


# ---- through veRL's reward loop ---------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.add_tokens(all_speech_tokens() + list(SPEECH_END_TOKENS))
    return tokenizer


def _data_proto(tokenizer, rows):
    """rows: [(response text, ground truth)] -> DataProto as veRL's rollout produces it."""
    from verl import DataProto

    prompt_ids = tokenizer("hello world")["input_ids"]
    responses = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in rows]
    width = max(len(r) for r in responses)
    response_tensor = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), len(prompt_ids) + width), dtype=torch.long)
    mask[:, : len(prompt_ids)] = 1
    for i, ids in enumerate(responses):
        response_tensor[i, : len(ids)] = torch.tensor(ids)
        mask[i, len(prompt_ids): len(prompt_ids) + len(ids)] = 1
    return DataProto.from_dict(
        tensors={"prompts": torch.tensor([prompt_ids] * len(rows)), "responses": response_tensor,
                 "attention_mask": mask},
        non_tensors={"data_source": np.array(["tts"] * len(rows), dtype=object),
                     "reward_model": np.array([{"ground_truth": gt} for _, gt in rows], dtype=object),
                     "extra_info": np.array([{} for _ in rows], dtype=object)},
    )


def test_verl_naive_reward_manager_scores_real_token_ids(reward_server):
    from omegaconf import OmegaConf

    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "reward_tts.py", "name": "compute_score",
        "reward_kwargs": {"server_url": reward_server.grpc_url}}}})
    compute_score = get_custom_reward_fn(config)
    tokenizer = _tokenizer()
    rows = [(format_speech_tokens(text_to_tokens(t)) + "<|eos1|>", t) for t in TEXTS]
    rows.append(("hello " + format_speech_tokens(text_to_tokens("一丁七三")), "一丁七万"))
    rows.append(("hello world", "一丁"))
    data = _data_proto(tokenizer, rows)
    assert "<|s_" in tokenizer.decode(data.batch["responses"][0], skip_special_tokens=True)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        manager = get_reward_manager_cls("naive")(config, tokenizer, compute_score)
        outputs = loop.run_until_complete(asyncio.gather(*(manager.run_single(data[i: i + 1])
                                                           for i in range(len(data)))))
        loop.run_until_complete(reward_tts.close_clients())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    scores = [o["reward_score"] for o in outputs]
    assert scores == pytest.approx([1.0] * len(TEXTS) + [error_rate_utility(0.25), 0.0], rel=1e-6)
    keys = {frozenset(o["reward_extra_info"]) for o in outputs}
    assert keys == {frozenset({"score", "error_rate", "num_speech_tokens", "ignored_pieces", "transcript_length"})}
    assert outputs[-2]["reward_extra_info"]["ignored_pieces"] == 1

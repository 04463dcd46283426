"""reward_tts.py (the veRL reward hook) against the real reward server (stand-in engines).

The client under it (coalescing, start-up check, load, faults): tests/token2wav_server/test_reward_client.py."""
import asyncio
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import reward_tts
from tests.reward_utils import request_count, run
from token2wav_server import standin
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
                       "transcript_length": 4, "utility_error_rate": pytest.approx(1.0), "truncated": 0.0}
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
        assert result["utility_error_rate"] == 0.0 and result["truncated"] == 0.0
    assert results[1]["ignored_pieces"] == 1


def test_bad_ground_truth_raises_instead_of_scoring(reward_server):
    with pytest.raises(reward_tts.RewardRequestError, match="GT_TEXT has nothing to score") as error:
        run(reward_tts.compute_score("tts", format_speech_tokens([1, 2]), "。。。",
                                     extra_info={"split": "train", "index": 7}, **_kwargs(reward_server)))
    assert str(error.value).startswith("rollout (data_source 'tts', split 'train', index 7, ground truth '。。。'): ")
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
    assert keys == {frozenset({"score", "error_rate", "num_speech_tokens", "ignored_pieces", "transcript_length",
                               "utility_error_rate", "truncated"})}
    assert outputs[-2]["reward_extra_info"]["ignored_pieces"] == 1


# ---- truncated rollouts ----------------------------------------------------------------
def test_truncated_rollouts_get_the_minimum_but_report_what_they_said(reward_server):
    kwargs = _kwargs(reward_server, max_response_length=4)
    said = format_speech_tokens(text_to_tokens("一丁七万"))

    async def go():
        return [await reward_tts.compute_score("tts", response, "一丁七万", **extra)
                for response, extra in ((said, kwargs),                      # 4 tokens, no end token: cut off
                                        (said + "<|eos1|>", kwargs),         # ended within the limit
                                        ("hi" + format_speech_tokens(text_to_tokens("一丁七")), kwargs),  # 3 + 1 ignored
                                        (format_speech_tokens(text_to_tokens("一丁七")), kwargs),  # 3 < 4: ended early
                                        (said, _kwargs(reward_server)))]     # no limit given: never truncated

    cut, ended, cut_with_text, short, unlimited = run(go())
    assert (cut["truncated"], cut["score"], cut["utility_error_rate"]) == (1.0, 0.0, 0.0)
    assert cut["error_rate"] == 0.0 and cut["num_speech_tokens"] == 4  # measured and reported all the same
    assert (ended["truncated"], ended["score"]) == (0.0, pytest.approx(1.0))
    assert cut_with_text["truncated"] == 1.0 and cut_with_text["ignored_pieces"] == 1
    assert short["truncated"] == 0.0 and short["score"] == pytest.approx(error_rate_utility(0.25), rel=1e-6)
    assert unlimited["truncated"] == 0.0 and unlimited["score"] == pytest.approx(1.0)
    assert len({frozenset(r) for r in (cut, ended, cut_with_text, short, unlimited)}) == 1  # same keys


def test_a_rows_own_upstream_bound_is_its_truncation_limit():
    """A rollout the tts_frontend agent loop bounded at upstream's max (max_token_text_ratio x its
    text tokens) and that reached it without an end token was cut off too."""
    said = reward_tts.parse_speech_tokens(format_speech_tokens(text_to_tokens("一丁七万")))
    ended = reward_tts.parse_speech_tokens(format_speech_tokens(text_to_tokens("一丁七万")) + "<|eos1|>")
    assert reward_tts.length_limit(512, {"max_speech_tokens": 4}) == 4
    assert reward_tts.length_limit(512, {"text_tokens": 2}, 2.0) == 4
    assert reward_tts.length_limit(3, {"text_tokens": 2}, 20) == 3
    assert reward_tts.length_limit(None, {"text_tokens": None}, 20) is None
    assert reward_tts.is_truncated(said, 512, {"max_speech_tokens": 4})
    assert reward_tts.is_truncated(said, 512, {"text_tokens": 2}, 2.0)
    assert not reward_tts.is_truncated(said, 512, {"text_tokens": 3}, 2.0)
    assert not reward_tts.is_truncated(ended, 512, {"max_speech_tokens": 4})


# ---- per-item speaker prompts ----------------------------------------------------------
def _prompt_info(folder, name: str, voice: int, index: int = 0, rate: int = 16000, text: str = "提示") -> dict:
    """extra_info as stage 0 writes it for a row with its own speaker prompt (stand-in audio in ``voice``)."""
    import soundfile

    from ttsrl.evaluation.outputs import read_wave
    from ttsrl.triton_client import speaker_prompt_key

    path = folder / f"{name}.wav"
    soundfile.write(str(path), standin.tokens_to_wave(text_to_tokens("三上"), voice), rate, subtype="FLOAT")
    wave, read_rate = read_wave(path)
    return {"split": "train", "index": index, "prompt_wav": str(path), "prompt_text": text, "prompt_id": name,
            "prompt_hash": speaker_prompt_key(wave, read_rate, text.strip())}


@pytest.fixture(scope="module")
def zero_shot_server():
    """The zero_shot reward preset on stand-in engines whose speech tokens carry the voice."""
    from token2wav_server.launch import start_server

    server = start_server(extra_args=["--reward-preset", "zero_shot", "--engine-option", "voice_tokens=true",
                                      "--max-batch-size", "64", "--max-queue-delay-us", "2000"])
    try:
        yield server
    finally:
        server.stop()


def _zero_shot_rollouts(tmp_path):
    """(response, ground truth, extra_info): rollouts in their prompt's voice, in another, and text-only."""
    prompts = {v: _prompt_info(tmp_path, f"voice{v}", v, index=i) for i, v in enumerate((3, 5))}
    tokenizer = standin.StandinSpeechTokenizer(voice_tokens=True)
    prompt_tokens = {v: tokenizer.tokenize([standin.tokens_to_wave(text_to_tokens("三上"), v)])[0] for v in prompts}
    end = "<|eos1|>"
    rows = []
    for voice, other in ((3, 5), (5, 3)):
        for text in ("一丁七万", "三上下"):
            right = format_speech_tokens(standin.targets_for(text, prompt_tokens[voice])) + end
            wrong = format_speech_tokens(standin.targets_for(text, prompt_tokens[other])) + end
            rows += [(right, text, prompts[voice]), (wrong, text, prompts[voice])]
    rows.append((format_speech_tokens(text_to_tokens("一丁")) + end, "一丁", {"split": "train", "index": 9}))
    return rows


def test_zero_shot_rollouts_are_scored_in_their_prompts_voice(zero_shot_server, tmp_path):
    kwargs = _kwargs(zero_shot_server, max_response_length=64)
    rows = _zero_shot_rollouts(tmp_path)

    async def go():
        return await asyncio.gather(*(reward_tts.compute_score("tts", r, t, extra_info=e, **kwargs) for r, t, e in rows))

    results = run(go())
    assert {frozenset(r) for r in results} == {frozenset({
        "score", "error_rate", "num_speech_tokens", "ignored_pieces", "transcript_length", "speaker_similarity",
        "utility_error_rate", "utility_similarity", "truncated"})}
    right, wrong = results[0:-1:2], results[1:-1:2]
    assert all(r["error_rate"] == 0.0 and r["speaker_similarity"] == pytest.approx(1.0) for r in right)
    assert all(r["score"] == pytest.approx(1.0) and r["utility_similarity"] == pytest.approx(1.0) for r in right)
    # the other prompt's voice: every word right, the voice wrong -> similarity 0, half the reward
    assert all(r["error_rate"] == 0.0 and r["speaker_similarity"] == 0.0 for r in wrong)
    assert all(r["score"] == pytest.approx(0.5) and r["utility_error_rate"] == pytest.approx(1.0) for r in wrong)
    text_only = results[-1]  # the bank's (silent) prompt: decoded in voice 0, not like silence
    assert text_only["error_rate"] == 0.0 and text_only["speaker_similarity"] == 0.0


def test_gdpo_normalizes_the_hooks_utilities_per_component(zero_shot_server, tmp_path):
    """``algorithm.adv_estimator=gdpo`` + ``algorithm.gdpo_reward_keys=[utility_error_rate,utility_similarity]``:
    veRL's estimator reads the hook's keys as its reward loop stores them (one array per key)."""
    from omegaconf import OmegaConf

    from verl.trainer.ppo import core_algos

    kwargs = _kwargs(zero_shot_server)
    rows = _zero_shot_rollouts(tmp_path)[:-1]  # groups of 4: two texts x (right voice, wrong voice)

    async def go():
        return await asyncio.gather(*(reward_tts.compute_score("tts", r, t, extra_info=e, **kwargs) for r, t, e in rows))

    infos = run(go())
    non_tensor_batch = {key: np.array([info[key] for info in infos]) for key in infos[0]}  # as veRL's reward loop
    n, width = len(rows), 3
    response_mask = torch.ones(n, width)
    batch = {"prompts": torch.zeros(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2 + width, dtype=torch.long)}
    index = np.array([i // 4 for i in range(n)], dtype=object)
    config = OmegaConf.create({"gdpo_reward_keys": ["utility_error_rate", "utility_similarity"]})
    estimator = core_algos.get_adv_estimator_fn("gdpo")
    advantages, _ = estimator(token_level_rewards=torch.zeros(n, width), response_mask=response_mask, index=index,
                              config=config, non_tensor_batch=non_tensor_batch, batch=batch)
    per_rollout = advantages[:, 0].tolist()
    # the error rate is the same in every group (no signal); the voice alone sets the advantage
    assert all(a > 0 for a in per_rollout[0::2]) and all(a < 0 for a in per_rollout[1::2])
    assert torch.isfinite(advantages).all()


def test_a_changed_prompt_file_is_refused_with_rerun_stage_0(reward_server, tmp_path):
    info = _prompt_info(tmp_path, "p", 3, index=4)
    info["prompt_hash"] = "0" * 64  # what stage 0 saw differs from the file now
    with pytest.raises(reward_tts.RewardRequestError) as error:
        run(reward_tts.compute_score("tts", format_speech_tokens([1]), "丁", extra_info=info, **_kwargs(reward_server)))
    message = str(error.value)
    assert f"speaker prompt {info['prompt_wav']} changed since stage 0" in message and "rerun stage 0" in message
    assert "index 4" in message and "prompt_id 'p'" in message


def test_a_missing_or_refused_prompt_fails_loud_naming_the_rollout(reward_server, tmp_path):
    missing = _prompt_info(tmp_path, "gone", 2, index=1)
    pathlib.Path(missing["prompt_wav"]).unlink()
    with pytest.raises(reward_tts.RewardRequestError, match=r"speaker prompt .*gone\.wav cannot be read"):
        run(reward_tts.compute_score("tts", format_speech_tokens([1]), "丁", extra_info=missing,
                                     **_kwargs(reward_server)))
    low_rate = _prompt_info(tmp_path, "low", 2, index=2, rate=8000)  # the server refuses prompts under 16 kHz
    untranscribed = {**_prompt_info(tmp_path, "mute", 2, index=3), "prompt_text": " "}
    good = _prompt_info(tmp_path, "good", 2, index=5)

    async def go():
        calls = [reward_tts.compute_score("tts", format_speech_tokens([1]), "丁", extra_info=info,
                                          **_kwargs(reward_server)) for info in (low_rate, untranscribed, good)]
        return await asyncio.gather(*calls, return_exceptions=True)

    refused, no_text, scored = run(go())
    assert isinstance(refused, reward_tts.RewardRequestError)
    assert "index 2, prompt_id 'low'" in str(refused) and "sample rate 8000 Hz" in str(refused)
    assert isinstance(no_text, reward_tts.RewardRequestError) and "no prompt_text; rerun stage 0" in str(no_text)
    assert scored["score"] == pytest.approx(1.0)  # the batch's other rollouts are scored


def test_an_engine_that_keeps_failing_on_one_rollout_fails_loud_naming_it(tmp_path):
    """Issue 17: a CUDA OOM in token2wav on one item is retried by the server; when it persists,
    the hook raises naming the rollout, and the other rollouts get their true scores."""
    from token2wav_server.launch import start_server

    plugin = tmp_path / "oom_engines.py"
    plugin.write_text(
        "from token2wav_server import standin\n"
        "class OutOfMemory(standin.StandinToken2Wav):\n"
        "    def synthesize(self, token_batch, prompts):\n"
        "        if any(13 in t for t in token_batch):\n"
        "            raise RuntimeError('CUDA out of memory. Tried to allocate 20.00 GiB')\n"
        "        return super().synthesize(token_batch, prompts)\n"
        "def create_engines(options):\n"
        "    engines = standin.create_engines(options)\n"
        "    engines.token2wav = OutOfMemory()\n"
        "    return engines\n", encoding="utf-8")
    server = start_server(engines=f"{plugin}:create_engines")
    try:
        async def go():
            calls = [reward_tts.compute_score("tts", format_speech_tokens(ids), standin.tokens_to_text(ids),
                                              extra_info={"split": "train", "index": i}, **_kwargs(server))
                     for i, ids in enumerate(([1, 2], [13, 14], [3]))]
            return await asyncio.gather(*calls, return_exceptions=True)

        first, failed, last = run(go())
    finally:
        server.stop()
    assert first["score"] == pytest.approx(1.0) and last["score"] == pytest.approx(1.0)
    assert isinstance(failed, reward_tts.RewardRequestError)
    message = str(failed)
    assert message.startswith(f"rollout (data_source 'tts', split 'train', index 1, ground truth "
                              f"{standin.tokens_to_text([13, 14])!r}): ")
    assert "token2wav failed on request 0 row" in message and "(2 speech tokens, prompt bank:" in message
    assert "after 3 attempt(s): RuntimeError: CUDA out of memory" in message


def test_the_rollouts_language_picks_the_metric(reward_server):
    # 他 and 她 are homophones: no pinyin error when the language is zh (detected from the
    # ground truth), one character of four under ja's CER (extra_info, as stage 0 writes it)
    response = format_speech_tokens(text_to_tokens("她一丁七"))
    kwargs = _kwargs(reward_server)

    async def go():
        return await asyncio.gather(
            reward_tts.compute_score("tts", response, "他一丁七", extra_info={}, **kwargs),
            reward_tts.compute_score("tts", response, "他一丁七", extra_info={"language": "ja"}, **kwargs),
            reward_tts.compute_score("tts", response, "他一丁七", extra_info={"language": "zh-CN"}, **kwargs))

    detected, japanese, chinese = run(go())
    assert (detected["error_rate"], chinese["error_rate"]) == (0.0, 0.0)
    assert japanese["error_rate"] == pytest.approx(0.25)
    with pytest.raises(reward_tts.RewardRequestError, match="index 3.*unknown language 'xx'"):
        run(reward_tts.compute_score("tts", response, "他一丁七", extra_info={"index": 3, "language": "xx"}, **kwargs))


def test_item_language_reads_extra_info_else_the_script():
    assert reward_tts.item_language({}, "The cat sat.") == "en"
    assert reward_tts.item_language(None, "今日はいい天気") == "ja"
    assert reward_tts.item_language({"language": float("nan")}, "一丁") == "zh"  # pandas' missing value
    assert reward_tts.item_language({"language": "en-US"}, "一丁") == "en"


# ---- refused rollouts in training (on_refused=report, issue 25) ---------------------------------
def test_a_refused_rollout_reports_the_runs_keys_and_the_reason_instead_of_raising(reward_server, tmp_path):
    """What configs/grpo.yaml sets: the tts_sync trainer needs every rollout back, refused or not,
    with the same keys (veRL's agent loop drops a rollout whose hook raised)."""
    report = _kwargs(reward_server, on_refused="report", max_response_length=8)
    low_rate = _prompt_info(tmp_path, "low", 2, index=2, rate=8000)  # the server refuses prompts under 16 kHz
    said = "hi" + format_speech_tokens(text_to_tokens("丁七"))

    async def go():
        calls = [reward_tts.compute_score("tts", said, "丁七", extra_info=info, **report)
                 for info in (low_rate, {"split": "train", "index": 3})]
        calls.append(reward_tts.compute_score("tts", said, " ", extra_info={"index": 4}, **report))  # bad ground truth
        return await asyncio.gather(*calls)

    refused, scored, empty_text = run(go())
    assert set(refused) == set(scored) == set(empty_text)
    assert list(scored) == reward_tts.result_keys(("utility_error_rate",)) + ["failed", "failure"]
    assert (scored["failed"], scored["failure"]) == (0.0, "") and scored["score"] == pytest.approx(1.0)
    assert refused["failed"] == 1.0 and refused["score"] == reward_tts.REFUSED_PLACEHOLDER_SCORE
    assert "index 2, prompt_id 'low'" in refused["failure"] and "sample rate 8000 Hz" in refused["failure"]
    # nothing the server would have measured is made up; what the hook read itself is reported
    assert refused["error_rate"] is None and refused["utility_error_rate"] is None
    assert refused["transcript_length"] is None
    assert (refused["num_speech_tokens"], refused["ignored_pieces"], refused["truncated"]) == (2, 1, 0.0)
    assert empty_text["failed"] == 1.0 and "ground truth" in empty_text["failure"]
    # veRL hands data_source over as a numpy string: the message names it plainly
    assert reward_tts.describe_rollout(np.str_("tts"), "丁", {}) == "rollout (data_source 'tts', ground truth '丁')"


def test_on_refused_raise_is_the_default_and_a_bad_value_is_named(reward_server, tmp_path):
    low_rate = _prompt_info(tmp_path, "low", 2, index=2, rate=8000)
    with pytest.raises(reward_tts.RewardRequestError, match="sample rate 8000 Hz"):
        run(reward_tts.compute_score("tts", format_speech_tokens([1]), "丁", extra_info=low_rate,
                                     **_kwargs(reward_server)))
    with pytest.raises(ValueError, match=r"reward_kwargs.on_refused must be one of raise, report, got 'skip'"):
        run(reward_tts.compute_score("tts", format_speech_tokens([1]), "丁",
                                     **_kwargs(reward_server, on_refused="skip")))


def test_an_unavailable_server_is_not_a_refused_rollout(tmp_path):
    """RewardServerUnavailable still raises with on_refused=report: it fails the step, never a rollout."""
    from token2wav_server.launch import free_ports

    dead = f"grpc://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(reward_tts.RewardServerUnavailable):
        run(reward_tts.compute_score("tts", format_speech_tokens([1]), "丁", server_url=dead, on_refused="report",
                                     startup_wait_s=1, retry_budget_s=1))

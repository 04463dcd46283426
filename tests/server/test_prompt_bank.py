"""Prompt bank: loading, errors, features computed once, deterministic choice."""
import json

import numpy as np
import pytest
import soundfile

from token2wav_server.prompt_bank import PromptBank, PromptBankError, load_prompts
from token2wav_server.standin import StandinToken2Wav


def _wav(path, seconds=0.5, rate=16000, channels=1):
    data = np.random.default_rng(len(str(path))).uniform(-0.3, 0.3, (int(seconds * rate), channels))
    soundfile.write(str(path), data.astype(np.float32), rate)
    return path


def test_directory_with_transcripts(tmp_path):
    _wav(tmp_path / "b.wav")
    (tmp_path / "b.txt").write_text("第二个\n", encoding="utf-8")
    _wav(tmp_path / "a.wav", rate=24000, channels=2)
    (tmp_path / "a.txt").write_text("第一个", encoding="utf-8")
    prompts = load_prompts(str(tmp_path))
    assert [(p.name, p.text, p.sample_rate) for p in prompts] == [("a", "第一个", 24000), ("b", "第二个", 16000)]
    assert prompts[0].wave.ndim == 1 and prompts[0].wave.dtype == np.float32


def test_missing_transcript_names_the_file_to_write(tmp_path):
    _wav(tmp_path / "a.wav")
    with pytest.raises(PromptBankError, match="a.txt"):
        load_prompts(str(tmp_path))


def test_known_cosyvoice_prompt_needs_no_transcript_file(tmp_path):
    prompts = load_prompts(str(_wav(tmp_path / "zero_shot_prompt.wav")))
    assert prompts[0].text == "希望你以后能够做的比我还好呦。"


def test_jsonl_bank_and_its_errors(tmp_path):
    _wav(tmp_path / "x.wav")
    bank = tmp_path / "bank.jsonl"
    bank.write_text(json.dumps({"wav": "x.wav", "text": "你好", "name": "spk1"}) + "\n\n"
                    + json.dumps({"wav": str(tmp_path / "x.wav"), "text": "再见"}) + "\n", encoding="utf-8")
    assert [(p.name, p.text) for p in load_prompts(str(bank))] == [("spk1", "你好"), ("x", "再见")]
    bank.write_text(json.dumps({"wav": "x.wav", "text": ""}) + "\n", encoding="utf-8")
    with pytest.raises(PromptBankError, match="bank.jsonl:1: needs a non-empty string field 'text'"):
        load_prompts(str(bank))
    bank.write_text(json.dumps({"wav": "x.wav", "text": "a"}) + "\n" + json.dumps({"wav": "y.wav", "text": "b"}),
                    encoding="utf-8")
    with pytest.raises(PromptBankError, match="bank.jsonl:2: wav .*y.wav not found"):
        load_prompts(str(bank))
    bank.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(PromptBankError, match="bank.jsonl:1: not JSON"):
        load_prompts(str(bank))


def test_duplicate_names_and_unreadable_sources(tmp_path):
    _wav(tmp_path / "x.wav")
    bank = tmp_path / "bank.jsonl"
    bank.write_text("\n".join(json.dumps({"wav": "x.wav", "text": "a"}) for _ in range(2)), encoding="utf-8")
    with pytest.raises(PromptBankError, match="duplicate names"):
        load_prompts(str(bank))
    (tmp_path / "broken.wav").write_bytes(b"not a wav")
    (tmp_path / "broken.txt").write_text("x", encoding="utf-8")
    with pytest.raises(PromptBankError, match="cannot read prompt wav"):
        load_prompts(str(tmp_path / "broken.wav"))
    with pytest.raises(PromptBankError, match="is not a .wav file"):
        load_prompts(str(tmp_path / "missing"))


def test_default_without_cosyvoice_is_a_silent_prompt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = load_prompts(None)
    assert [p.name for p in prompts] == ["silence"] and not prompts[0].wave.any()


def test_features_are_prepared_once_and_choice_is_deterministic(tmp_path):
    for name in "abc":
        _wav(tmp_path / f"{name}.wav")
        (tmp_path / f"{name}.txt").write_text(name, encoding="utf-8")
    engine = StandinToken2Wav()
    bank = PromptBank(load_prompts(str(tmp_path)), engine.prepare_prompt)
    assert engine.prepared_prompts == 3 and [f.name for f in bank.features] == ["a", "b", "c"]
    rng = np.random.default_rng(0)
    token_rows = [rng.integers(0, 6561, rng.integers(1, 50)) for _ in range(60)]
    choices = [bank.choose(t) for t in token_rows]
    assert choices == [bank.choose(t.astype(np.int32)) for t in token_rows]  # dtype does not matter
    assert set(choices) == {0, 1, 2}
    assert bank.choose(token_rows[0], "c") == 2
    with pytest.raises(KeyError, match="unknown prompt 'z'"):
        bank.choose(token_rows[0], "z")
    assert engine.prepared_prompts == 3


def test_check_prompt_names_what_is_wrong():
    from token2wav_server.prompt_bank import check_prompt

    ok = np.zeros(16000, dtype=np.float32) + 0.1
    check_prompt(ok, 16000, "你好", "p")
    for args, message in (((np.zeros(0, np.float32), 16000, "t"), "p: no audio samples"),
                          ((ok, 8000, "t"), "p: sample rate 8000 Hz"),
                          ((np.zeros(16000 * 31, np.float32), 16000, "t"), "p: 31.0 s long"),
                          ((np.array([np.nan], np.float32), 16000, "t"), "NaN"),
                          ((ok, 16000, " "), "p: no transcript")):
        with pytest.raises(PromptBankError, match=message):
            check_prompt(*args, "p")


def test_prompt_cache_prepares_each_prompt_once_and_is_bounded():
    from token2wav_server.engines import SpeakerPrompt
    from token2wav_server.prompt_bank import PromptCache

    engine = StandinToken2Wav()
    cache = PromptCache(engine.prepare_prompt, capacity=2)
    prompts = {k: SpeakerPrompt(k, np.full(160, 0.1 * (i + 1), np.float32), 16000, k) for i, k in enumerate("abc")}
    for key in "aabab":
        assert cache.features(key, prompts[key]).name == key
    assert engine.prepared_prompts == 2 and (cache.hits, cache.misses) == (3, 2)
    cache.features("c", prompts["c"])  # evicts the least recently used: a
    assert "a" not in cache and "b" in cache and len(cache) == 2
    cache.features("a", prompts["a"])
    assert engine.prepared_prompts == 4
    with pytest.raises(ValueError):
        PromptCache(engine.prepare_prompt, capacity=0)

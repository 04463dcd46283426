"""ttsrl.training.speaker_prompts: prompt sets, prompt checks, balanced pairing, and speech tokens
from the live reward server (stand-in engines) with the on-disk cache."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import soundfile

from token2wav_server import standin
from ttsrl.training import speaker_prompts as sp
from ttsrl.triton_client import TritonModelClient, speaker_prompt_key

UNREACHABLE = "grpc://127.0.0.1:1"  # nothing listens there: any call to it fails


def standin_ids(seed: int, count: int = 25) -> list[int]:
    """Token ids of a stand-in prompt: 25 tokens is 1 s of stand-in audio."""
    return [int(i) for i in np.random.default_rng(seed).integers(0, 6000, count)]


def write_prompt(path, ids, voice: int = 0, rate: int = standin.SAMPLE_RATE, transcript: str | None = "提示文本",
                 suffix: str = ".txt"):
    """A stand-in prompt wav (what the stand-in speech tokenizer reads back as ``ids``), 32-bit
    float so its samples stay exact, with its transcript beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), standin.tokens_to_wave(ids, voice), rate, subtype="FLOAT")
    if transcript is not None:
        path.with_suffix(suffix).write_text(transcript, encoding="utf-8")
    return path


def prompt_of(path, text="提示文本", speaker="s", prompt_id=None):
    return sp.Prompt(str(path), text, prompt_id or path.stem, speaker, f"{path}:1")


# ------------------------------------------------------------------ prompt sets

def test_folder_set_reads_txt_and_lab_transcripts_and_speaker_folders(tmp_path):
    write_prompt(tmp_path / "set" / "alice" / "a1.wav", standin_ids(1), transcript="甲一")
    write_prompt(tmp_path / "set" / "alice" / "a2.wav", standin_ids(2), transcript="甲二", suffix=".lab")
    write_prompt(tmp_path / "set" / "bob" / "b1.wav", standin_ids(3), transcript=None)
    prompts, problems = sp.read_prompt_set(str(tmp_path / "set"))
    assert problems == []
    assert [(p.id, p.speaker, p.text) for p in prompts] == [("alice/a1", "alice", "甲一"), ("alice/a2", "alice", "甲二"),
                                                             ("bob/b1", "bob", "")]
    assert prompts[0].wav == str((tmp_path / "set" / "alice" / "a1.wav").resolve())
    bad = sp.check_prompts(prompts)
    assert list(bad) == [2] and bad[2].reason == sp.UNTRANSCRIBED and "b1.wav has no transcript" in str(bad[2])


def test_jsonl_set_fields_paths_speakers_and_bad_lines(tmp_path):
    write_prompt(tmp_path / "wavs" / "x.wav", standin_ids(1), transcript=None)
    lines = [
        {"prompt_wav": "wavs/x.wav", "prompt_text": " 你好 ", "id": "p1", "speaker": "spk1"},
        {"wav": str(tmp_path / "wavs" / "x.wav"), "text": "再见"},  # absolute path, the bank's field names
        "not json",
        {"prompt_text": "没有音频"},
        {"prompt_wav": "wavs/x.wav", "prompt_text": "重复", "id": "p1"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
                              for line in lines) + "\n", encoding="utf-8")
    prompts, problems = sp.read_prompt_set(str(path))
    assert [(p.id, p.speaker, p.text, p.where) for p in prompts] == [
        ("p1", "spk1", "你好", f"{path}:1"), ("x", "wavs", "再见", f"{path}:2")]  # speaker: the wav's folder
    assert {p.wav for p in prompts} == {str((tmp_path / "wavs" / "x.wav").resolve())}
    assert [(p.where, p.reason) for p in problems] == [(f"{path}:3", sp.MALFORMED), (f"{path}:4", sp.NO_WAV),
                                                      (f"{path}:5", sp.DUPLICATE)]
    assert "first at" in str(problems[2]) and f"{path}:1" in str(problems[2])


def test_seed_tts_meta_list_gives_its_prompts_once_each(tmp_path):
    write_prompt(tmp_path / "prompt-wavs" / "a.wav", standin_ids(1), transcript=None)
    write_prompt(tmp_path / "prompt-wavs" / "b.wav", standin_ids(2), transcript=None)
    meta = tmp_path / "meta.lst"
    meta.write_text("u1|提示一|prompt-wavs/a.wav|目标一\nu2|提示二|prompt-wavs/b.wav|目标二\n"
                    "u3|提示一|prompt-wavs/a.wav|目标三\n", encoding="utf-8")
    prompts, problems = sp.read_prompt_set(str(meta))
    assert problems == []
    assert [(p.id, p.text, p.where) for p in prompts] == [("a", "提示一", f"{meta}:1"), ("b", "提示二", f"{meta}:2")]
    with pytest.raises(sp.PromptError, match="not found"):
        sp.read_prompt_set(str(tmp_path / "nope"))


def test_check_prompts_names_each_reason(tmp_path):
    ok = write_prompt(tmp_path / "ok.wav", standin_ids(1))
    short = write_prompt(tmp_path / "short.wav", standin_ids(2, count=24))  # 0.96 s
    long = tmp_path / "long.wav"
    soundfile.write(str(long), np.full(16000 * 31, 0.1, np.float32), 16000, subtype="FLOAT")
    low = write_prompt(tmp_path / "low.wav", standin_ids(3), rate=8000)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not a wav file at all")
    prompts = [prompt_of(ok), prompt_of(tmp_path / "missing.wav"), prompt_of(garbage), prompt_of(short),
               prompt_of(long), prompt_of(low), prompt_of(ok, text="  ")]
    bad = sp.check_prompts(prompts)
    assert {i: b.reason for i, b in bad.items()} == {1: sp.NOT_FOUND, 2: sp.UNREADABLE, 3: sp.TOO_SHORT,
                                                     4: sp.TOO_LONG, 5: sp.LOW_RATE, 6: sp.UNTRANSCRIBED}
    assert "0.96 s long, under the minimum of 1 s" in str(bad[3])
    assert "31.0 s long, over the maximum of 30 s" in str(bad[4])
    assert "8000 Hz, below the 16000 Hz" in str(bad[5])
    assert all(str(b).startswith(f"{prompts[i].where}: ") for i, b in bad.items())


# ------------------------------------------------------------------ pairing

def _set(sizes: dict) -> list:
    return [sp.Prompt(f"/{s}/{k}.wav", "t", f"{s}{k}", s, "") for s, n in sizes.items() for k in range(n)]


@pytest.mark.parametrize("count", [1, 7, 100, 101])
def test_pairing_is_balanced_across_speakers_and_their_prompts(count):
    prompts = _set({"a": 1, "b": 2, "c": 4})
    chosen = sp.pair_prompts(count, prompts, seed=5)
    per_speaker = collections.Counter(prompts[i].speaker for i in chosen)
    assert sum(per_speaker.values()) == count
    assert max(per_speaker.values()) - min(per_speaker.get(s, 0) for s in "abc") <= 1
    for speaker in "abc":
        mine = [i for i, p in enumerate(prompts) if p.speaker == speaker]
        uses = collections.Counter(i for i in chosen if prompts[i].speaker == speaker)
        assert max(uses.get(i, 0) for i in mine) - min(uses.get(i, 0) for i in mine) <= 1


def test_pairing_is_deterministic_by_seed():
    prompts = _set({"a": 3, "b": 3, "c": 3, "d": 1})
    first = sp.pair_prompts(50, prompts, seed=0)
    assert np.array_equal(first, sp.pair_prompts(50, prompts, seed=0))
    assert not np.array_equal(first, sp.pair_prompts(50, prompts, seed=1))
    assert np.array_equal(first[:20], sp.pair_prompts(20, prompts, seed=0))  # a prefix does not reshuffle


# ------------------------------------------------------------------ speech tokens

class CountingClient(TritonModelClient):
    """The real client, counting its tokenize calls and the waves in each."""

    calls: list = []

    def tokenize(self, waves, sample_rates):
        CountingClient.calls.append(len(waves))
        return super().tokenize(waves, sample_rates)


@pytest.fixture
def counting(monkeypatch):
    CountingClient.calls = []
    monkeypatch.setattr("ttsrl.triton_client.TritonModelClient", CountingClient)
    return CountingClient.calls


def test_tokens_come_from_the_server_in_batches_once_then_from_the_cache(tmp_path, reward_server, counting):
    ids = [standin_ids(seed) for seed in range(20)]
    prompts = [prompt_of(write_prompt(tmp_path / f"p{i}.wav", ids[i], voice=i % 3)) for i in range(20)]
    cache_path = tmp_path / "cache" / "prompt_tokens.json"
    bad = sp.extract_tokens(prompts, reward_server.grpc_url, sp.PromptTokenCache(str(cache_path)))
    assert bad == {}
    assert counting == [1, 16, 4]  # the probe that names the tokenizer, then the prompts in batches
    assert [p.tokens for p in prompts] == ids
    wave, rate = soundfile.read(str(prompts[3].wav), dtype="float32")
    assert prompts[3].key == speaker_prompt_key(wave, rate, "提示文本")
    stored = json.loads(cache_path.read_text(encoding="utf-8"))
    [(tokenizer, table)] = stored["tokenizers"].items()
    assert stored["format"] == sp.CACHE_FORMAT and tokenizer.startswith("speech_tokenizer:")
    assert table[prompts[3].key] == ids[3]
    # A second run with the same prompts and tokenizer asks the server only the probe.
    again = [prompt_of(tmp_path / f"p{i}.wav") for i in range(20)]
    stamp = cache_path.stat().st_mtime_ns
    assert sp.extract_tokens(again, reward_server.grpc_url, sp.PromptTokenCache(str(cache_path))) == {}
    assert counting == [1, 16, 4, 1] and [p.tokens for p in again] == ids
    assert cache_path.stat().st_mtime_ns == stamp  # nothing new: not rewritten


def test_tokens_of_another_tokenizer_are_kept_but_never_used(tmp_path, reward_server, counting):
    """Defect 4 of issue 25: a cache keyed by audio alone handed CosyVoice2's prompt tokens to a
    CosyVoice3 run. Another tokenizer's entry for the very same prompt is not used (and stays in
    the file), and so are the entries of a cache written before tokenizers were recorded."""
    ids = standin_ids(7)
    prompt = prompt_of(write_prompt(tmp_path / "p.wav", ids))
    wave, rate = soundfile.read(str(prompt.wav), dtype="float32")
    key = speaker_prompt_key(wave, rate, prompt.text)
    other = "speech_tokenizer:0123456789abcdef"  # e.g. CosyVoice2's, for a CosyVoice3 server
    cache_path = tmp_path / "prompt_tokens.json"
    cache_path.write_text(json.dumps({"format": sp.CACHE_FORMAT, "tokenizers": {other: {key: [1, 2, 3]}}}))
    assert sp.extract_tokens([prompt], reward_server.grpc_url, sp.PromptTokenCache(str(cache_path))) == {}
    assert prompt.tokens == ids and counting == [1, 1]  # the probe, then the prompt itself
    tables = json.loads(cache_path.read_text())["tokenizers"]
    assert tables[other] == {key: [1, 2, 3]} and len(tables) == 2
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"format": sp.LEGACY_CACHE_FORMAT, "tokens": {key: [4, 5]}}))
    again = prompt_of(tmp_path / "p.wav")
    assert sp.extract_tokens([again], reward_server.grpc_url, sp.PromptTokenCache(str(legacy))) == {}
    assert again.tokens == ids
    assert json.loads(legacy.read_text())["tokenizers"][sp.UNKNOWN_TOKENIZER] == {key: [4, 5]}


def test_refused_and_unreadable_prompts_are_reported_with_the_server_url(tmp_path, reward_server):
    good = prompt_of(write_prompt(tmp_path / "good.wav", standin_ids(1)))
    noise = tmp_path / "noise.wav"  # 2 s of real-looking audio: the stand-in tokenizer refuses it
    soundfile.write(str(noise), np.sin(np.arange(32000) / 7.0).astype(np.float32) * 0.3, 16000, subtype="FLOAT")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF....")
    prompts = [good, prompt_of(noise), prompt_of(garbage)]
    cache = sp.PromptTokenCache(str(tmp_path / "c.json"))
    bad = sp.extract_tokens(prompts, reward_server.http_url, cache)
    assert {i: b.reason for i, b in bad.items()} == {1: sp.REFUSED, 2: sp.UNREADABLE}
    assert reward_server.http_url in str(bad[1]) and "not stand-in audio" in str(bad[1]) and str(noise) in str(bad[1])
    assert good.tokens == standin_ids(1) and list(cache.tokens) == [good.key]  # a refusal is not cached


def test_a_server_that_is_not_ready_stops_naming_the_prompt_and_url(tmp_path):
    prompt = prompt_of(write_prompt(tmp_path / "p.wav", standin_ids(1)))
    with pytest.raises(sp.PromptError) as error:
        sp.extract_tokens([prompt], UNREACHABLE, sp.PromptTokenCache(str(tmp_path / "c.json")))
    message = str(error.value)
    assert prompt.where in message and str(prompt.wav) in message and UNREACHABLE in message
    assert "does not answer" in message and "start the reward server" in message
    assert not (tmp_path / "c.json").exists()


def test_a_broken_cache_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"format": "something else"}', encoding="utf-8")
    with pytest.raises(sp.PromptError, match="c.json cannot be read .*delete it"):
        sp.PromptTokenCache(str(path))
    path.write_text(json.dumps({"format": sp.CACHE_FORMAT, "tokenizers": {"t": {"k": ["x"]}}}), encoding="utf-8")
    with pytest.raises(sp.PromptError, match="'k' is not a list of token ids"):
        sp.PromptTokenCache(str(path))

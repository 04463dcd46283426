"""Test sets of stand-in prompt audio for the synthesis tests (infer_dist.py and
ttsrl.evaluation): the same utterances in every published layout, each with its own prompt
voice, and the check that an output folder holds exactly what the stand-in decoder says."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from token2wav_server import standin

TEXTS = ["你好世界", "今天天气很好", "我们去公园", "电话138", "吃葡萄", "明天见", "春天来了"]


PROMPT_TEXT = "提示文本"


def voice_of(utt_index: int) -> int:
    """The stand-in voice of utterance i's own prompt: all different, none the bank's (0)."""
    return utt_index % (standin.VOICES - 1) + 1


def write_prompt(path: Path, utt_index: int) -> np.ndarray:
    """A prompt wav of stand-in audio in utterance i's voice (16-bit PCM keeps it exact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = standin.tokens_to_wave([utt_index, 5, 6], voice=voice_of(utt_index))
    soundfile.write(path, wave, standin.SAMPLE_RATE, subtype="PCM_16")
    return soundfile.read(path, dtype="float32")[0]


def write_manifests(folder: Path) -> dict[str, Path]:
    """The same 7 utterances, each with its own prompt wav, as a Seed-TTS-eval meta.lst, a
    CV3-Eval task folder (as published: scp paths relative to the CV3-Eval checkout) and JSONL."""
    for i in range(len(TEXTS)):
        write_prompt(folder / "prompt-wavs" / f"p{i}.wav", i)
    meta = [f"utt{i}|{PROMPT_TEXT}|prompt-wavs/p{i}.wav|{text}" for i, text in enumerate(TEXTS)]
    (folder / "meta.lst").write_text("\n".join(meta) + "\n", encoding="utf-8")
    records = [{"id": f"utt{i}", "text": text, "prompt_text": PROMPT_TEXT, "prompt_wav": f"prompt-wavs/p{i}.wav"}
               for i, text in enumerate(TEXTS)]
    records[1].update(prompt_tokens=[1, 2, 3])
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                       encoding="utf-8")
    cv3 = folder / "CV3-Eval" / "data" / "zero_shot" / "zh"
    for i in range(len(TEXTS)):
        write_prompt(cv3 / "waveform" / f"prompt_audio_{i}.wav", i)
    (cv3 / "text").write_text("".join(f"utt{i} {t}\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    (cv3 / "prompt_text").write_text("".join(f"utt{i} {PROMPT_TEXT}\n" for i in range(len(TEXTS))), encoding="utf-8")
    (cv3 / "prompt_wav.scp").write_text(
        "".join(f"utt{i} data/zero_shot//zh/waveform/prompt_audio_{i}.wav\n" for i in range(len(TEXTS))),
        encoding="utf-8")
    return {"meta.lst": folder / "meta.lst", "jsonl": folder / "test.jsonl", "cv3-eval": cv3}


def check_outputs(out: Path, own_voice: bool = True):
    """Every record is whole; each wav is the stand-in decoder's audio, spoken in the voice of
    the utterance's own prompt (own_voice) or the bank's voice 0, as its record says."""
    from ttsrl.triton_client import speaker_prompt_key

    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in manifest] == [f"utt{i}" for i in range(len(TEXTS))]
    for index, record in enumerate(manifest):
        if record["error"] is not None:
            assert record["error"] == "no speech tokens generated" and record["tokens"] == 0
            continue
        wave, rate = soundfile.read(out / "wavs" / f"{record['id']}.wav", dtype="float32")
        assert rate == standin.SAMPLE_RATE
        assert len(wave) == record["tokens"] * standin.SAMPLES_PER_TOKEN
        assert record["duration"] == pytest.approx(len(wave) / rate)
        assert standin.wave_to_tokens(wave) is not None  # exactly the stand-in decoder's audio
        if own_voice:
            prompt_wave, prompt_rate = soundfile.read(record["prompt_wav"], dtype="float32")
            assert standin.wave_voice(wave) == voice_of(index) == standin.wave_voice(prompt_wave)
            assert record["prompt_voice"] == "utterance"
            assert record["prompt_id"] == speaker_prompt_key(prompt_wave, prompt_rate, PROMPT_TEXT)
        else:
            assert standin.wave_voice(wave) == 0
            assert record["prompt_voice"] == "bank" and record["prompt_id"].startswith("bank:")
    return manifest

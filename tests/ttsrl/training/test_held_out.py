"""Stage 0 refuses to train on the test speakers (ttsrl/training/held_out.py through
ttsrl.training.data.prepare and prepare_data.py): a training prompt that is a held-out set's
prompt recording (by content) or transcript stops the stage, naming both files and lines."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile

from tests.ttsrl.training.test_speaker_prompts import UNREACHABLE, standin_ids, write_prompt
from token2wav_server import standin
from ttsrl.training import data, held_out


def write_jsonl(path: Path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def seed_tts_set(root: Path, voices=(1, 2, 3)) -> Path:
    """A Seed-TTS-eval meta.lst with one stand-in prompt per voice (utt|prompt_text|prompt_wav|text)."""
    lines = []
    for k, voice in enumerate(voices):
        write_prompt(root / "prompt-wavs" / f"p{k}.wav", standin_ids(100 + k), voice=voice, transcript=None)
        lines.append(f"utt{k}|希望你以后能够做的比我还好呦{k}。|prompt-wavs/p{k}.wav|今天天气很好{k}。")
    (root / "meta.lst").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "meta.lst"


def texts(tmp_path: Path, n: int = 6, **first_record) -> str:
    records = [{"text": f"第{i}句话。", "id": f"t{i}"} for i in range(n)]
    records[0].update(first_record)
    return write_jsonl(tmp_path / "train.jsonl", records)


def test_the_test_set_as_the_prompt_set_is_refused_naming_both_files_and_nothing_is_written(tmp_path):
    meta = seed_tts_set(tmp_path / "seedtts_testset" / "zh")
    out = tmp_path / "parquet"
    with pytest.raises(data.DataError) as error:  # refused before any prompt is tokenized: no server needed
        data.prepare(texts(tmp_path), str(out), test_size=1, train_prompts=str(meta), server_url=UNREACHABLE,
                     held_out_sets={"evaluation set": str(meta)})
    message = str(error.value)
    assert message.startswith("3 training speaker prompt(s) are prompts of a held-out set")
    assert (f"{meta}:2: prompt wav {(meta.parent / 'prompt-wavs' / 'p1.wav').resolve()} is the recording of "
            f"evaluation set {meta} utterance 'utt1' ({meta}:2: ") in message
    assert "Fix: use a prompt set without these speakers (train_prompts)" in message
    assert not out.exists()


def test_a_copy_of_a_test_prompt_in_another_sample_format_is_the_same_recording(tmp_path):
    """CV3-Eval layout; the copy is 32-bit float where the original is 16-bit PCM (same samples)."""
    task = tmp_path / "CV3-Eval" / "data" / "zero_shot" / "zh"
    (task / "waveform").mkdir(parents=True)
    wave = standin.tokens_to_wave(standin_ids(7), 4)
    soundfile.write(str(task / "waveform" / "prompt_audio_1.wav"), wave, standin.SAMPLE_RATE, subtype="PCM_16")
    (task / "text").write_text("zh_1 今天天气很好。\n", encoding="utf-8")
    (task / "prompt_text").write_text("zh_1 希望你以后能够做的比我还好呦。\n", encoding="utf-8")
    (task / "prompt_wav.scp").write_text("zh_1 data/zero_shot//zh/waveform/prompt_audio_1.wav\n", encoding="utf-8")
    original, rate = soundfile.read(str(task / "waveform" / "prompt_audio_1.wav"), dtype="float32")
    folder = tmp_path / "my_prompts" / "speaker_a"
    folder.mkdir(parents=True)
    soundfile.write(str(folder / "clip.wav"), original, rate, subtype="FLOAT")
    (folder / "clip.txt").write_text("另一句话", encoding="utf-8")  # another transcript: caught by the audio
    write_prompt(folder / "other.wav", standin_ids(8), voice=5, transcript="别的话")
    with pytest.raises(data.DataError) as error:
        data.prepare(texts(tmp_path), str(tmp_path / "o"), test_size=1, train_prompts=str(tmp_path / "my_prompts"),
                     server_url=UNREACHABLE, held_out_sets={"evaluation set": str(task)})
    message = str(error.value)
    assert message.startswith("1 training speaker prompt(s)")
    assert f"{folder / 'clip.wav'}: prompt wav {(folder / 'clip.wav').resolve()} is the recording of evaluation set " \
           f"{task} utterance 'zh_1' ({task.resolve() / 'text'}:1: " in message


def test_a_records_own_prompt_with_a_dev_sets_transcript_is_refused_naming_the_record_line(tmp_path):
    """Audio that hashes differently (resampled, re-encoded; here other samples); its transcript
    (punctuation and spaces aside) gives it away."""
    dev_wav = write_prompt(tmp_path / "dev" / "d0.wav", standin_ids(3), voice=2, transcript=None)
    dev = write_jsonl(tmp_path / "dev" / "dev.jsonl", [
        {"id": "d0", "text": "明天见。", "prompt_text": "我们一起去看看吧。", "prompt_wav": "d0.wav"}])
    write_prompt(tmp_path / "mine.wav", standin_ids(4), voice=2, transcript=None)
    train = texts(tmp_path, prompt_wav="mine.wav", prompt_text="我们 一起去看看吧")
    with pytest.raises(data.DataError) as error:
        data.prepare(train, str(tmp_path / "o"), test_size=1, server_url=UNREACHABLE,
                     held_out_sets={"evaluation set": None, "dev set": dev})
    assert (f"{train}:1: prompt transcript '我们 一起去看看吧' ({(tmp_path / 'mine.wav').resolve()}) is the prompt "
            f"transcript of dev set {dev} utterance 'd0' ({dev}:1: {dev_wav.resolve()})") in str(error.value)


def test_disjoint_sets_pass_and_a_missing_test_set_is_logged_not_checked(tmp_path, reward_server):
    meta = seed_tts_set(tmp_path / "test", voices=(1, 2))
    prompts = tmp_path / "prompts"
    for k in range(2):
        write_prompt(prompts / "spk" / f"{k}.wav", standin_ids(200 + k), voice=6, transcript=f"训练提示{k}")
    logged = []
    data.prepare(texts(tmp_path), str(tmp_path / "o"), test_size=1, train_prompts=str(prompts),
                 server_url=reward_server.grpc_url, log=logged.append,
                 held_out_sets={"evaluation set": str(meta), "dev set": str(tmp_path / "no_dev.jsonl")})
    assert (f"training speaker prompts: 2 checked against the prompts of the evaluation set {meta}: none shared"
            in logged)
    assert any(line.startswith(f"dev set {tmp_path / 'no_dev.jsonl'} does not exist yet: the training prompts are "
                               "not checked") for line in logged)


def test_only_wavs_whose_header_matches_a_held_out_prompt_are_read(tmp_path, monkeypatch):
    meta = seed_tts_set(tmp_path / "test", voices=(1,))
    same_length = write_prompt(tmp_path / "p" / "a.wav", standin_ids(300), voice=9, transcript=None)
    longer = write_prompt(tmp_path / "p" / "b.wav", standin_ids(301, count=50), voice=9, transcript=None)
    read = []
    real = held_out.audio_key
    monkeypatch.setattr(held_out, "audio_key", lambda path: read.append(Path(path).name) or real(path))
    prompts = [held_out_prompt(same_length, "甲"), held_out_prompt(longer, "乙")]
    assert held_out.overlaps(prompts, held_out.read_held_out("evaluation set", str(meta))) == []
    assert sorted(read) == ["a.wav", "p0.wav"]  # b.wav's length differs from every held-out prompt's


def held_out_prompt(path: Path, text: str):
    from ttsrl.training import speaker_prompts as sp

    return sp.Prompt(str(path.resolve()), text, path.stem, "s", f"{path}:1")


def test_allowed_overlap_is_a_warning_and_stage_0s_own_dev_slice_is_not_a_held_out_set(tmp_path, reward_server):
    meta = seed_tts_set(tmp_path / "test", voices=(1, 2))
    out = tmp_path / "o"
    logged = []
    data.prepare(texts(tmp_path, 12), str(out), test_size=1, dev_size=2, train_prompts=str(meta),
                 server_url=reward_server.grpc_url, log=logged.append,
                 held_out_sets={"evaluation set": str(meta)}, allow_held_out=True)
    assert any(line.startswith("WARNING: 2 training speaker prompt(s) are prompts of a held-out set; trained on all "
                               "the same (allow_held_out_prompts=true):") for line in logged)
    shutil.copy(out / "dev.jsonl", tmp_path / "dev_copy.jsonl")
    # a rebuild that names this stage's own dev slice as the dev set: its prompts are the training ones by design
    data.prepare(texts(tmp_path, 12), str(out), test_size=1, dev_size=2, train_prompts=str(meta),
                 server_url=reward_server.grpc_url, held_out_sets={"dev set": str(out / "dev.jsonl")})
    with pytest.raises(data.DataError, match="dev set"):  # the same file anywhere else is a held-out set
        data.prepare(texts(tmp_path, 12), str(out), test_size=1, dev_size=2, train_prompts=str(meta),
                     server_url=reward_server.grpc_url, held_out_sets={"dev set": str(tmp_path / "dev_copy.jsonl")})

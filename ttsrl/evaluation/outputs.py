"""The files of a synthesis output folder (``infer_dist.py --output-dir OUT``), written by
synthesis and read back by scoring; this module is the one home of their layout:

- ``OUT/wavs/<id>.wav``: the decoded audio (32-bit float);
- ``OUT/records/<id>.json``: one record per utterance (text, token count, duration, the
  prompt that conditioned the audio, ``error``: None on success);
- ``OUT/logs/rank_<r>.log``: one line per utterance a rank finished;
- ``OUT/manifest.jsonl``: every utterance's record, in test-set order (written last), with
  the ``language`` the eval set declares for it (``EvalUtterance.language``; "" when the set
  does not say); scoring reads it (``manifest_languages``) to score each utterance with its
  language's metric;
- ``OUT/bad_prompts.txt``: the utterances skipped for a bad prompt, with file:line.

Every file is written whole or not at all (``ttsrl.atomic_write``), so a killed run leaves
only whole files and hidden temporaries, which the next run removes.
"""
from __future__ import annotations

import json
from pathlib import Path

from ttsrl.atomic_write import atomic_file, write_json, write_text
from ttsrl.eval_sets import EvalUtterance


class OutputDirError(Exception):
    """An output folder that cannot be read; the message names file and line."""


def wav_path(output_dir: Path, utt_id: str) -> Path:
    return output_dir / "wavs" / f"{utt_id}.wav"


def record_path(output_dir: Path, utt_id: str) -> Path:
    return output_dir / "records" / f"{utt_id}.json"


def read_wave(path: Path) -> tuple:
    """A wav file -> (float32 mono waveform, sample rate)."""
    import soundfile

    wave, rate = soundfile.read(str(path), dtype="float32", always_2d=False)
    return (wave if wave.ndim == 1 else wave.mean(axis=1)), rate


def write_wave(path: Path, wave, sample_rate: int) -> None:
    import soundfile

    with atomic_file(path) as tmp:
        # 32-bit float keeps the decoder's output exactly (stand-in audio relies on it).
        soundfile.write(str(tmp), wave, sample_rate, subtype="FLOAT")


def write_record(output_dir: Path, record: dict) -> None:
    write_json(record_path(output_dir, record["id"]), record)


def is_done(output_dir: Path, utt_id: str) -> bool:
    """Finished means a success record and its wav; failed ones are retried."""
    record = record_path(output_dir, utt_id)
    if not record.exists() or not wav_path(output_dir, utt_id).exists():
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("error") is None
    except (json.JSONDecodeError, OSError):
        return False


def make_output_dirs(output_dir: Path) -> None:
    for folder in ("wavs", "records", "logs"):
        (output_dir / folder).mkdir(parents=True, exist_ok=True)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temp files a killed run left behind (nothing writes before the start-up barrier)."""
    for folder in (output_dir / "wavs", output_dir / "records"):
        for path in folder.glob(".*.tmp-*"):
            path.unlink(missing_ok=True)


def pending_utterances(utterances: list[EvalUtterance], output_dir: Path) -> list[EvalUtterance]:
    return [u for u in utterances if not is_done(output_dir, u.id)]


def append_rank_log(output_dir: Path, rank: int, records: list[dict]) -> None:
    """OUT/logs/rank_<r>.log: one line per utterance this rank finished (ok or failed), in order."""
    with open(output_dir / "logs" / f"rank_{rank}.log", "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(f"{record['id']}\t{'failed: ' + record['error'] if record['error'] else 'ok'}\n")


def write_bad_prompt_records(bad: dict[str, str], utterances: list[EvalUtterance], output_dir: Path) -> None:
    """--on-bad-prompt skip: a record per skipped utterance (retried by the next run, like a
    failure) and OUT/bad_prompts.txt listing them with file:line."""
    for utt in utterances:
        if utt.id in bad:
            write_record(output_dir, {
                "id": utt.id, "text": utt.text, "prompt_text": utt.prompt_text, "prompt_wav": utt.prompt_wav,
                "prompt_voice": "utterance", "prompt_id": None, "tokens": 0, "duration": 0.0,
                "bad_prompt": True, "error": f"skipped, bad prompt: {bad[utt.id]}"})
    write_text(output_dir / "bad_prompts.txt", "".join(f"{bad[u.id]}\n" for u in utterances if u.id in bad))


def write_manifest(utterances: list[EvalUtterance], output_dir: Path) -> dict:
    """Collect every utterance's record into OUT/manifest.jsonl; returns the summary."""
    lines = []
    summary = {"utterances": len(utterances), "ok": 0, "failed": 0, "bad_prompt": 0, "missing": 0,
               "seconds_of_audio": 0.0}
    for utt in utterances:
        path = record_path(output_dir, utt.id)
        if path.exists():
            record = json.loads(path.read_text(encoding="utf-8"))
        else:
            record = {"id": utt.id, "text": utt.text, "error": "not produced"}
            summary["missing"] += 1
        record["language"] = utt.language  # the set's word, not a record's from an older run
        if record.get("error") is None:
            summary["ok"] += 1
            summary["seconds_of_audio"] += record.get("duration", 0.0)
        elif record.get("bad_prompt"):
            summary["bad_prompt"] += 1
        elif path.exists():
            summary["failed"] += 1
        lines.append(json.dumps(record, ensure_ascii=False))
    write_text(output_dir / "manifest.jsonl", "\n".join(lines) + "\n")
    return summary


def read_records(path: Path) -> dict[str, dict]:
    """OUT/manifest.jsonl -> {id: record} (each with a ``text``)."""
    records: dict[str, dict] = {}
    if not path.is_file():
        raise OutputDirError(f"{path}: no such file (run infer_dist.py first)")
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            utt_id = str(record["id"])
            if not isinstance(record["text"], str):
                raise TypeError(f"text is {type(record['text']).__name__}, not a string")
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise OutputDirError(f"{path}:{number}: malformed record ({error})") from None
        if utt_id in records:
            raise OutputDirError(f"{path}:{number}: duplicate utterance id {utt_id!r}")
        records[utt_id] = record
    return records


def read_references(path: Path) -> dict[str, str]:
    """OUT/manifest.jsonl -> {id: reference text}, without the utterances synthesis skipped
    for a bad prompt (``bad_prompt_ids`` lists those)."""
    return {utt_id: record["text"] for utt_id, record in read_records(path).items()
            if not record.get("bad_prompt")}


def manifest_languages(path: Path) -> dict[str, str]:
    """OUT/manifest.jsonl -> {id: declared language, "" where none} (a manifest written before
    languages existed has none); the scorer checks the values (``ttsrl.language``)."""
    languages = {}
    for utt_id, record in read_records(path).items():
        language = record.get("language") or ""
        if not isinstance(language, str):
            raise OutputDirError(f"{path}: utterance {utt_id!r}: language must be a string, got {language!r}")
        languages[utt_id] = language
    return languages


def bad_prompt_ids(path: Path) -> list[str]:
    return [utt_id for utt_id, record in read_records(path).items() if record.get("bad_prompt")]

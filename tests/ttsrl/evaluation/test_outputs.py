"""ttsrl.evaluation.outputs: the files of a synthesis output folder, written and read back."""
import json

import numpy as np
import pytest
import soundfile

from ttsrl.atomic_write import temporary_name
from ttsrl.eval_sets import EvalUtterance
from ttsrl.evaluation import outputs


def test_records_manifest_and_summary(tmp_path):
    outputs.make_output_dirs(tmp_path)
    utterances = [EvalUtterance("a", "你好"), EvalUtterance("b", "再见"), EvalUtterance("c", "明天"),
                  EvalUtterance("d", "春天", prompt_wav="/gone.wav")]
    wave = np.linspace(-0.5, 0.5, 480, dtype=np.float32)
    outputs.write_wave(outputs.wav_path(tmp_path, "a"), wave, 24000)
    outputs.write_record(tmp_path, {"id": "a", "text": "你好", "duration": 0.02, "error": None})
    outputs.write_record(tmp_path, {"id": "b", "text": "再见", "error": "no speech tokens generated"})
    outputs.write_bad_prompt_records({"d": "set.lst:4: utterance 'd': prompt wav /gone.wav not found"}, utterances,
                                     tmp_path)
    assert outputs.is_done(tmp_path, "a") and not outputs.is_done(tmp_path, "b")
    assert [u.id for u in outputs.pending_utterances(utterances, tmp_path)] == ["b", "c", "d"]
    assert soundfile.read(outputs.wav_path(tmp_path, "a"), dtype="float32")[0] == pytest.approx(wave)  # exact float
    summary = outputs.write_manifest(utterances, tmp_path)
    assert summary == {"utterances": 4, "ok": 1, "failed": 1, "bad_prompt": 1, "missing": 1,
                       "seconds_of_audio": 0.02}
    assert (tmp_path / "bad_prompts.txt").read_text(encoding="utf-8") == (
        "set.lst:4: utterance 'd': prompt wav /gone.wav not found\n")
    records = outputs.read_records(tmp_path / "manifest.jsonl")
    assert list(records) == ["a", "b", "c", "d"] and records["c"]["error"] == "not produced"
    assert outputs.read_references(tmp_path / "manifest.jsonl") == {"a": "你好", "b": "再见", "c": "明天"}
    assert outputs.bad_prompt_ids(tmp_path / "manifest.jsonl") == ["d"]


def test_the_manifest_carries_each_utterances_declared_language(tmp_path):
    outputs.make_output_dirs(tmp_path)
    utterances = [EvalUtterance("a", "你好", language="zh"), EvalUtterance("b", "Hello there.", language="en"),
                  EvalUtterance("c", "明天")]
    # a record from a run whose set said otherwise: the set being written now has the last word
    outputs.write_record(tmp_path, {"id": "a", "text": "你好", "language": "ja", "error": None})
    outputs.write_manifest(utterances, tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    assert [json.loads(line)["language"] for line in manifest.read_text(encoding="utf-8").splitlines()] == \
        ["zh", "en", ""]
    assert outputs.manifest_languages(manifest) == {"a": "zh", "b": "en", "c": ""}
    # a manifest from before languages existed: none declared
    manifest.write_text('{"id": "a", "text": "你好", "error": null}\n', encoding="utf-8")
    assert outputs.manifest_languages(manifest) == {"a": ""}
    manifest.write_text('{"id": "a", "text": "你好", "language": 3}\n', encoding="utf-8")
    with pytest.raises(outputs.OutputDirError, match="utterance 'a': language must be a string, got 3"):
        outputs.manifest_languages(manifest)


def test_a_killed_writers_temporaries_are_removed(tmp_path):
    outputs.make_output_dirs(tmp_path)
    left = [temporary_name(outputs.wav_path(tmp_path, "a")), temporary_name(outputs.record_path(tmp_path, "a"))]
    for path in left:
        path.write_bytes(b"half")
    outputs.write_record(tmp_path, {"id": "b", "text": "好", "error": None})
    outputs.remove_stale_temporaries(tmp_path)
    assert not any(path.exists() for path in left)
    assert [p.name for p in (tmp_path / "records").iterdir()] == ["b.json"]


def test_malformed_manifest_names_file_and_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "好"}) + "\n" + json.dumps({"id": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(outputs.OutputDirError, match=r"manifest\.jsonl:2: malformed record"):
        outputs.read_records(path)
    with pytest.raises(outputs.OutputDirError, match="run infer_dist.py first"):
        outputs.read_records(tmp_path / "none.jsonl")

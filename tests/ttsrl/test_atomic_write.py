"""ttsrl.atomic_write: the target is the old content or the whole new one, never a part."""
import json

import pytest

from ttsrl.atomic_write import atomic_dir, atomic_file, temporary_name, write_json, write_text


def test_write_text_and_json_replace_whole_files(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "first\n")
    write_text(path, "二\n")
    assert path.read_text(encoding="utf-8") == "二\n"
    write_json(tmp_path / "a.json", {"text": "你好"})
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{"text": "你好"}\n'
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == {"text": "你好"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out.txt"]  # no temporaries left


def test_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.wav"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".wav" and tmp.name.startswith(".model.tmp-")
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.wav"]


def test_temporary_names_match_the_stale_temporary_pattern(tmp_path):
    # infer_dist removes what a killed run left with the glob ".*.tmp-*".
    assert temporary_name(tmp_path / "utt1.json").match(".*.tmp-*")
    assert temporary_name(tmp_path / "utt1.wav").match(".*.tmp-*.wav")


def test_atomic_dir_replaces_a_directory_or_leaves_it_alone(tmp_path):
    target = tmp_path / "models" / "hf"
    with atomic_dir(target) as staged:
        (staged / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"
    with atomic_dir(target) as staged:
        (staged / "weights").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]  # replaced whole, not merged
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as staged:
            (staged / "partial").write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["hf"]  # staging removed

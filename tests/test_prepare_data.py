"""prepare_data.py, the stage 0 CLI: flags, messages, exit codes (the library behind it:
tests/ttsrl/training/test_data.py)."""
from __future__ import annotations

import os

import pytest

import prepare_data
from tests.ttsrl.training.test_data import TEXTS, read, write_jsonl


def test_reference_cli_writes_verl_rl_schema(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "id": f"u{i}"} for i, t in enumerate(TEXTS[:5])])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": t} for t in TEXTS[5:]])
    out = tmp_path / "out"
    assert prepare_data.main(["--train_file", train, "--test_file", test, "--local_dir", str(out)]) == 0
    rows = read(out / "train.parquet")
    assert len(rows) == 5
    # the policy reads the text as upstream CosyVoice normalizes it; the raw text stays the reference
    normalized = "今天是二零二四年三月五日。"
    assert TEXTS[1] == "今天是2024年3月5日。"
    assert rows[1] == {
        "data_source": "train",
        "prompt": [{"role": "user", "content": normalized}, {"role": "assistant", "content": ""}],
        "ability": "text-to-speech",
        "reward_model": {"style": "rule", "ground_truth": TEXTS[1]},
        "extra_info": {"split": "train", "index": 1, "text": TEXTS[1], "normalized_text": normalized,
                       "llm_prompt_text": "", "model_family": "cosyvoice2", "text_tokens": None, "id": "u1"},
    }
    test_rows = read(out / "test.parquet")
    assert [(r["extra_info"]["index"], r["extra_info"]["text"]) for r in test_rows] == list(enumerate(TEXTS[5:]))


BAD_LINES = [
    ('{"text": "好的"', "malformed JSON"),
    ('{"id": "x"}', "missing text"),
    ('{"text": 123}', "non-string text"),
    ('{"text": ""}', "empty text"),
    ('{"text": "   \\t "}', "empty text"),
    ('{"text": "这句话太长了太长了太长了"}', "text too long"),
    ('["not", "an", "object"]', "not an object"),
    ('{"text": "。！？"}', "nothing to score after normalization"),
    ('{"text": "好", "prompt_wav": 3}', "non-string prompt field"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_record_fails_naming_file_line_and_reason(tmp_path, capsys, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "第一句"}\n\n' + line + '\n{"text": "第四句"}\n{"text": "第五句"}\n', encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"previous run")
    code = prepare_data.main(["--train_file", str(path), "--test_size", "1", "--local_dir", str(out),
                              "--max_chars", "10"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{path}:3: {reason}" in err
    assert sorted(os.listdir(out)) == ["train.parquet"]
    assert (out / "train.parquet").read_bytes() == b"previous run"


def test_skip_invalid_counts_reasons_and_writes_the_rest(tmp_path, capsys):
    lines = ['{"text": "好"}', '{"text": ""}', '{"text": 5}', 'oops', '{"text": "行"}', '{"text": "可以"}']
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert prepare_data.main(["--train_file", str(path), "--test_size", "1", "--local_dir", str(tmp_path / "o"),
                              "--skip_invalid"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 invalid records (empty text: 1, malformed JSON: 1, non-string text: 1)" in out
    texts = [r["extra_info"]["text"] for name in ("train", "test") for r in read(tmp_path / "o" / f"{name}.parquet")]
    assert sorted(texts) == sorted(["好", "行", "可以"])


def test_argument_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "好"}, {"text": "行"}])
    assert prepare_data.main(["--train_file", path, "--local_dir", str(tmp_path / "o")]) == 1
    assert "exactly one of --test_file and --test_size" in capsys.readouterr().err
    assert prepare_data.main(["--train_file", path, "--local_dir", str(tmp_path / "o"), "--test_size", "2"]) == 1
    assert "leaves no training data" in capsys.readouterr().err
    assert prepare_data.main(["--train_file", str(tmp_path / "nope.jsonl"), "--local_dir", str(tmp_path / "o"),
                              "--test_size", "1"]) == 1
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_zero_shot_flags_dev_slice_and_bad_prompt_spellings(tmp_path, capsys, reward_server):
    from tests.ttsrl.training.test_data import _prompt_set, _texts

    prompts, _ = _prompt_set(tmp_path, speakers=("alice", "bob"), per_speaker=1)
    with open(prompts, "a", encoding="utf-8") as handle:
        handle.write('{"prompt_wav": "nowhere.wav", "prompt_text": "没有"}\n')
    train = write_jsonl(tmp_path / "train.jsonl", _texts(12))
    out = tmp_path / "out"
    argv = ["--train_file", train, "--test_size", "2", "--local_dir", str(out), "--train_prompts", prompts,
            "--server_url", reward_server.grpc_url, "--dev_size", "3", "--prompt_token_cache", str(tmp_path / "c.json")]
    assert prepare_data.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{prompts}:3: prompt wav" in err and "nowhere.wav not found" in err and "--on_bad_prompt skip" in err
    assert not out.exists()
    assert prepare_data.main(argv + ["--on-bad-prompt", "skip"]) == 0
    captured = capsys.readouterr().out
    assert "skipped 1 prompts of the prompt set (prompt wav not found: 1)" in captured
    assert "train: 7 rows, dev: 3 rows, test: 2 rows" in captured
    assert sorted(os.listdir(out)) == ["dev.jsonl", "test.parquet", "train.parquet"]
    assert (tmp_path / "c.json").is_file()
    assert {r["extra_info"]["prompt_id"] for r in read(out / "train.parquet")} == {"alice0", "bob0"}

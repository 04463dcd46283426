"""ttsrl.training.data (stage 0): schema, splits, bad input, atomic writes, and veRL's own dataset
reading the output."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from ttsrl.chat_template import expected_prompt
from ttsrl.training import data

TEXTS = ["你好，世界。", "今天是2024年3月5日。", "Hello, TTS!", "吃葡萄不吐葡萄皮。", "电话号码是138。",
         "四是四，十是十。", "他买了3kg苹果。", "我们明天见。"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read(path):
    return pq.read_table(path).to_pylist()


def test_optional_fields_are_carried_and_missing_ones_are_null(tmp_path):
    records = [{"text": "甲", "id": 7, "prompt_text": "提示", "prompt_wav": "p.wav"}, {"text": "乙"}, {"text": "丙"}]
    out = tmp_path / "out"
    data.prepare(write_jsonl(tmp_path / "a.jsonl", records), str(out), test_size=1, seed=3)
    rows = read(out / "train.parquet") + read(out / "test.parquet")
    infos = {r["extra_info"]["text"]: r["extra_info"] for r in rows}
    assert infos["甲"]["id"] == "7" and infos["甲"]["prompt_text"] == "提示" and infos["甲"]["prompt_wav"] == "p.wav"
    assert infos["乙"]["id"] is None and infos["乙"]["prompt_wav"] is None


def test_json_array_input_matches_jsonl(tmp_path):
    records = [{"text": t} for t in TEXTS]
    array_file = tmp_path / "a.json"
    array_file.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    data.prepare(str(array_file), str(tmp_path / "x"), test_size=2, seed=1, data_source="d")
    data.prepare(write_jsonl(tmp_path / "a.jsonl", records), str(tmp_path / "y"), test_size=2, seed=1,
                         data_source="d")
    for split in ("train", "test"):
        assert read(tmp_path / "x" / f"{split}.parquet") == read(tmp_path / "y" / f"{split}.parquet")


def test_test_size_split_is_deterministic_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"第{i}句话"} for i in range(50)])

    def split(seed, name):
        data.prepare(path, str(tmp_path / name), test_size=10, seed=seed)
        train = [r["extra_info"]["text"] for r in read(tmp_path / name / "train.parquet")]
        test = [r["extra_info"]["text"] for r in read(tmp_path / name / "test.parquet")]
        assert sorted(train + test) == sorted(f"第{i}句话" for i in range(50)) and len(test) == 10
        assert [r["extra_info"]["index"] for r in read(tmp_path / name / "test.parquet")] == list(range(10))
        return test

    assert split(0, "a") == split(0, "b")
    assert split(0, "a") != split(1, "c")


def test_fast_and_line_by_line_readers_agree(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": f"u{i}"} for i, t in enumerate(TEXTS)])
    fast, problems = data.read_records(path, max_chars=50, fast=True)
    slow, slow_problems = data.read_records(path, max_chars=50, fast=False)
    assert problems == slow_problems == []
    assert data.build_table(fast, "train", "d").equals(data.build_table(slow, "train", "d"))
    assert data.read_records_fast(path, 50) is not None  # the fast path really ran


def test_error_report_lists_first_20_then_a_count(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": ""}] * 25 + [{"text": "好"}, {"text": "行"}])
    with pytest.raises(data.DataError) as error:
        data.prepare(path, str(tmp_path / "o"), test_size=1)
    message = str(error.value)
    assert message.count(": empty text:") == 20 and "... and 5 more invalid records" in message
    assert f"{path}:20: empty text" in message and f"{path}:21: empty text" not in message


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"text": "好"},\n {"text": "行"\n]\n', encoding="utf-8")
    with pytest.raises(data.DataError, match=r"a\.json:4: malformed JSON"):
        data.prepare(str(path), str(tmp_path / "o"), test_size=1)


def test_dedup_keeps_first_occurrence(tmp_path):
    records = [{"text": "甲", "id": "1"}, {"text": "乙", "id": "2"}, {"text": "甲", "id": "3"}, {"text": "丙", "id": "4"}]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": "丁"}, {"text": "丁"}])
    data.prepare(path, str(tmp_path / "o"), test_file=test, dedup=True)
    assert [r["extra_info"]["id"] for r in read(tmp_path / "o" / "train.parquet")] == ["1", "2", "4"]
    assert len(read(tmp_path / "o" / "test.parquet")) == 1


def test_failed_write_leaves_previous_outputs_and_no_temp_files(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "o"
    data.prepare(path, str(out), test_size=2)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    real_write = pq.write_table
    calls = []

    def failing_write(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(data.pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        data.prepare(path, str(out), test_size=3, seed=9)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


@pytest.mark.parametrize("style", ["cosyvoice2", "legacy"])
def test_verl_rlhf_dataset_reads_output_and_builds_template_prompts(tmp_path, style):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    from tests.tokenizer_utils import tiny_tokenizer

    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    data.prepare(path, str(tmp_path / "o"), test_size=2)
    tokenizer = tiny_tokenizer(style)
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 256, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(str(tmp_path / "o" / "train.parquet"), tokenizer, config)
    assert len(dataset) == len(TEXTS) - 2
    # veRL's agent loop turns raw_prompt into prompt ids with this builder (qwen2 family: CosyVoice2's backbone).
    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen2")
    for item in range(len(dataset)):
        row = dataset[item]
        text = row["reward_model"]["ground_truth"]
        ids = builder.build_initial_tokens(row["raw_prompt"])
        assert tokenizer.decode(ids) == expected_prompt(text, style)

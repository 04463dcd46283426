"""ttsrl.training.data (stage 0): schema, splits, bad input, atomic writes, veRL's own dataset
reading the output, and zero-shot rows (speaker prompts tokenized by the live reward server,
stand-in engines)."""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from ttsrl.chat_template import expected_prompt
from ttsrl.training import data
from ttsrl.triton_client import speaker_prompt_key

TEXTS = ["你好，世界。", "今天是2024年3月5日。", "Hello, TTS!", "吃葡萄不吐葡萄皮。", "电话号码是138。",
         "四是四，十是十。", "他买了3kg苹果。", "我们明天见。"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read(path):
    return pq.read_table(path).to_pylist()


def test_ids_are_carried_and_missing_ones_are_null(tmp_path):
    records = [{"text": "甲", "id": 7}, {"text": "乙"}, {"text": "丙"}]
    out = tmp_path / "out"
    data.prepare(write_jsonl(tmp_path / "a.jsonl", records), str(out), test_size=1, seed=3)
    rows = read(out / "train.parquet") + read(out / "test.parquet")
    infos = {r["extra_info"]["text"]: r["extra_info"] for r in rows}
    assert infos["甲"]["id"] == "7" and infos["乙"]["id"] is None
    assert not set(data.PROMPT_INFO) & set(infos["甲"])  # text-only rows: today's layout
    assert not (out / "dev.jsonl").exists() and not (out / "prompt_tokens.json").exists()


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
        text = row["extra_info"]["normalized_text"]  # what the policy reads (the raw text is the reference)
        ids = builder.build_initial_tokens(row["raw_prompt"])
        assert tokenizer.decode(ids) == expected_prompt(text, style)


# ------------------------------------------------------------------ texts the scorer cannot score

UNSCORABLE = ["。！？", "……", "——「」", "★☆♪", "（）、", "\u3000，~", "=\u0338"]  # the last: "≠" after NFKC


@pytest.mark.parametrize("fast", [True, False])
def test_texts_with_nothing_to_score_are_refused_with_file_line(tmp_path, fast):
    from ttsrl.scoring import EmptyReferenceError, error_rate

    for text in UNSCORABLE:  # the scorer the reward server uses refuses each of them
        with pytest.raises(EmptyReferenceError):
            error_rate(text, "你好")
    records = [{"text": t} for t in TEXTS[:3]] + [{"text": t} for t in UNSCORABLE] + [{"text": "´"}]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    with pytest.raises(data.DataError) as error:
        data.prepare(path, str(tmp_path / "o"), test_size=1, fast=fast)
    message = str(error.value)
    for line in range(4, 4 + len(UNSCORABLE)):
        assert f"{path}:{line}: {data.NOTHING_TO_SCORE}: " in message
    assert message.count(data.NOTHING_TO_SCORE) == len(UNSCORABLE)  # "´" keeps a combining mark the scorer reads
    # ... but upstream's text frontend leaves nothing of it to say (a symbol only): refused too, at its line
    assert f"{path}:{4 + len(UNSCORABLE)}: {data.NOTHING_TO_SAY}: " in message
    assert not (tmp_path / "o").exists()
    if fast:
        assert data.read_records_fast(path, None) is None  # the fast reader hands such a file to the line reader
    logged = []
    counts = data.prepare(path, str(tmp_path / "o"), test_size=1, skip_invalid=True, fast=fast, log=logged.append)
    assert counts == {"train": 2, "test": 1}
    assert (f"skipped {len(UNSCORABLE) + 1} invalid records ({data.NOTHING_TO_SAY}: 1, "
            f"{data.NOTHING_TO_SCORE}: {len(UNSCORABLE)})") in logged


def test_fast_reader_still_takes_files_whose_texts_all_score(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS + ["！好！", "2024。"]])
    assert data.read_records_fast(path, None) is not None


# ------------------------------------------------------------------ zero-shot rows

def _prompt_set(tmp_path, speakers=("alice", "bob", "carol"), per_speaker=2):
    """A JSONL prompt set of stand-in prompts (1 s, each speaker in its own voice)."""
    from tests.ttsrl.training.test_speaker_prompts import standin_ids, write_prompt

    lines, tokens = [], {}
    for s, speaker in enumerate(speakers):
        for k in range(per_speaker):
            ids = standin_ids(10 * s + k)
            write_prompt(tmp_path / "prompts" / speaker / f"{k}.wav", ids, voice=s + 1, transcript=None)
            lines.append({"id": f"{speaker}{k}", "speaker": speaker, "prompt_wav": f"{speaker}/{k}.wav",
                          "prompt_text": f"{speaker}说{k}"})
            tokens[f"{speaker}{k}"] = ids
    path = write_jsonl(tmp_path / "prompts" / "set.jsonl", lines)
    return path, tokens


def _texts(n):
    return [{"text": f"第{i}句话。", "id": f"t{i}"} for i in range(n)]


def _trimmed(ids, wav):
    """``ids`` as upstream keeps them for the LLM with ``wav`` as the prompt."""
    from ttsrl.frontend import trim_prompt_tokens

    info = soundfile.info(str(wav))
    return trim_prompt_tokens(ids, info.frames, info.samplerate)


def test_zero_shot_rows_use_the_one_prompt_builder_and_name_their_prompt(tmp_path, reward_server):
    from ttsrl.chat_template import prompt_messages
    from ttsrl.eval_sets import load_eval_set
    from ttsrl.speech_tokens import format_speech_tokens

    prompts, tokens = _prompt_set(tmp_path)
    path = write_jsonl(tmp_path / "a.jsonl", _texts(40))
    out = tmp_path / "o"
    logged = []
    counts = data.prepare(path, str(out), test_size=4, seed=2, train_prompts=prompts, dev_size=6,
                          server_url=reward_server.grpc_url, log=logged.append)
    assert counts == {"train": 30, "dev": 6, "test": 4}
    assert any("with speech tokens (6 from the speech tokenizer at" in line for line in logged)
    rows = read(out / "train.parquet") + read(out / "test.parquet")
    for row in rows:
        info = row["extra_info"]
        ids = _trimmed(tokens[info["prompt_id"]], info["prompt_wav"])
        # the policy's input: the prompt text and the text as upstream normalizes them, the prompt's
        # speech tokens as upstream trims them
        assert info["llm_prompt_text"] == info["prompt_text"].replace("0", "零").replace("1", "一")
        assert info["normalized_text"] == "第" + "零一二三四五六七八九"[int(info["id"][1:])] + "句话。" \
            if len(info["id"]) == 2 else info["normalized_text"].startswith("第")
        assert row["prompt"] == prompt_messages(info["llm_prompt_text"] + info["normalized_text"],
                                                format_speech_tokens(ids))
        assert row["reward_model"]["ground_truth"] == info["text"]  # scored against the text alone
        speaker, k = info["prompt_id"][:-1], info["prompt_id"][-1]
        assert info["prompt_wav"] == str((tmp_path / "prompts" / speaker / f"{k}.wav").resolve())
        assert info["prompt_text"] == f"{speaker}说{k}"
        wave, rate = soundfile.read(info["prompt_wav"], dtype="float32")
        assert info["prompt_hash"] == speaker_prompt_key(wave, rate, info["prompt_text"])
    train_speakers = collections.Counter(r["extra_info"]["prompt_id"][:-1] for r in read(out / "train.parquet"))
    assert sorted(train_speakers.values()) == [10, 10, 10]
    # The dev slice: held out of train, in the eval-set layout stage 4 reads.
    dev = load_eval_set(str(out / "dev.jsonl"))
    train_texts = {r["extra_info"]["text"] for r in read(out / "train.parquet")}
    assert len(dev.utterances) == 6 and not {u.text for u in dev.utterances} & train_texts
    assert {u.id for u in dev.utterances} <= {f"t{i}" for i in range(40)}
    for utt in dev.utterances:
        assert utt.prompt_tokens == _trimmed(tokens[Path(utt.prompt_wav).parent.name + Path(utt.prompt_wav).stem],
                                             utt.prompt_wav)
        assert utt.prompt_text.startswith(Path(utt.prompt_wav).parent.name)
    # The same run again: every prompt's tokens from the cache (the server only names its tokenizer).
    again = tmp_path / "again"
    (out / "prompt_tokens.json").rename(tmp_path / "cache.json")
    data.prepare(path, str(again), test_size=4, seed=2, train_prompts=prompts, dev_size=6,
                 server_url=reward_server.grpc_url, prompt_token_cache=str(tmp_path / "cache.json"))
    for name in ("train.parquet", "test.parquet", "dev.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_records_keep_their_own_prompt_and_the_rest_are_paired(tmp_path, reward_server):
    from tests.ttsrl.training.test_speaker_prompts import standin_ids, write_prompt

    prompts, _ = _prompt_set(tmp_path, speakers=("alice",), per_speaker=1)
    write_prompt(tmp_path / "own" / "mine.wav", standin_ids(99), voice=7, transcript=None)
    records = _texts(6)
    records[2].update(prompt_wav="own/mine.wav", prompt_text="我自己的")
    path = write_jsonl(tmp_path / "a.jsonl", records)
    data.prepare(path, str(tmp_path / "o"), test_file=write_jsonl(tmp_path / "t.jsonl", _texts(2)),
                 train_prompts=prompts, server_url=reward_server.grpc_url)
    infos = [r["extra_info"] for r in read(tmp_path / "o" / "train.parquet")]
    assert [i["prompt_id"] for i in infos] == ["alice0", "alice0", "mine", "alice0", "alice0", "alice0"]
    assert infos[2]["prompt_wav"] == str((tmp_path / "own" / "mine.wav").resolve())
    assert infos[2]["prompt_text"] == "我自己的"
    assert [r["extra_info"]["prompt_id"] for r in read(tmp_path / "o" / "test.parquet")] == ["alice0", "alice0"]


def test_per_record_prompts_alone_leave_the_other_rows_text_only(tmp_path, reward_server):
    from tests.ttsrl.training.test_speaker_prompts import standin_ids, write_prompt

    write_prompt(tmp_path / "mine.wav", standin_ids(5), transcript=None)
    records = _texts(3)
    records[0].update(prompt_wav=str(tmp_path / "mine.wav"), prompt_text="提示")
    records[1].update(prompt_wav="", prompt_text="")  # empty fields: no prompt (the eval-set JSONL layout)
    out = tmp_path / "o"
    data.prepare(write_jsonl(tmp_path / "a.jsonl", records), str(out), test_file=write_jsonl(tmp_path / "t.jsonl", _texts(1)),
                 server_url=reward_server.http_url)
    rows = read(out / "train.parquet")
    assert rows[0]["prompt"][0]["content"] == "提示第零句话。" and rows[0]["prompt"][1]["content"].startswith("<|s_")
    assert rows[1]["prompt"] == [{"role": "user", "content": "第一句话。"}, {"role": "assistant", "content": ""}]
    assert rows[1]["extra_info"]["prompt_hash"] is None and rows[1]["extra_info"]["prompt_wav"] is None
    assert not set(data.PROMPT_INFO) & set(read(out / "test.parquet")[0]["extra_info"])


BAD_RECORD_PROMPTS = [
    ({"prompt_wav": "missing.wav", "prompt_text": "提示"}, "prompt wav not found"),
    ({"prompt_wav": "short.wav", "prompt_text": "提示"}, "prompt too short"),
    ({"prompt_wav": "ok.wav"}, "untranscribed prompt"),
    ({"prompt_text": "提示"}, "no prompt wav"),
    ({"prompt_wav": "low.wav", "prompt_text": "提示"}, "prompt sample rate too low"),
    ({"prompt_wav": "noise.wav", "prompt_text": "提示"}, "refused by the speech tokenizer"),
]


def _bad_prompt_files(tmp_path):
    from tests.ttsrl.training.test_speaker_prompts import standin_ids, write_prompt

    write_prompt(tmp_path / "ok.wav", standin_ids(1), transcript=None)
    write_prompt(tmp_path / "short.wav", standin_ids(2, count=10), transcript=None)
    write_prompt(tmp_path / "low.wav", standin_ids(3), rate=8000, transcript=None)
    soundfile.write(str(tmp_path / "noise.wav"), (np.sin(np.arange(32000) / 5.0) * 0.2).astype(np.float32), 16000)


@pytest.mark.parametrize("prompt,reason", BAD_RECORD_PROMPTS, ids=[r for _, r in BAD_RECORD_PROMPTS])
def test_a_bad_record_prompt_stops_with_file_line_and_writes_nothing(tmp_path, reward_server, prompt, reason):
    _bad_prompt_files(tmp_path)
    records = _texts(4)
    records[0].update(prompt_wav="ok.wav", prompt_text="好的提示")
    records[2].update(prompt)
    path = write_jsonl(tmp_path / "a.jsonl", records)
    out = tmp_path / "o"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"previous run")
    with pytest.raises(data.DataError) as error:
        data.prepare(path, str(out), test_size=1, server_url=reward_server.grpc_url)
    message = str(error.value)
    assert f"1 bad speaker prompts (nothing written; --on_bad_prompt skip skips them):\n{path}:3: " in message
    assert message.count(f"{path}:") == 1
    if reason == "refused by the speech tokenizer":
        assert reward_server.grpc_url in message and "noise.wav" in message
    assert (out / "train.parquet").read_bytes() == b"previous run"
    assert sorted(p.name for p in out.iterdir() if p.name != "prompt_tokens.json") == ["train.parquet"]
    logged = []
    data.prepare(path, str(out), test_size=1, server_url=reward_server.grpc_url, on_bad_prompt="skip",
                 log=logged.append)
    assert f"skipped 1 records with a bad speaker prompt ({reason}: 1)" in logged
    texts = [r["extra_info"]["text"] for name in ("train", "test") for r in read(out / f"{name}.parquet")]
    assert sorted(texts) == sorted(r["text"] for i, r in enumerate(records) if i != 2)


def test_bad_prompt_set_entries_stop_the_run_or_are_skipped_and_counted(tmp_path, reward_server):
    prompts, _ = _prompt_set(tmp_path, speakers=("alice", "bob"), per_speaker=1)
    _bad_prompt_files(tmp_path / "prompts")
    with open(prompts, "a", encoding="utf-8") as handle:
        handle.write('{"prompt_wav": "short.wav", "prompt_text": "短"}\n')
        handle.write('{"prompt_wav": "noise.wav", "prompt_text": "噪声"}\n')
        handle.write('{"prompt_text": "没有音频"}\n')
    path = write_jsonl(tmp_path / "a.jsonl", _texts(8))
    with pytest.raises(data.DataError) as error:
        data.prepare(path, str(tmp_path / "o"), test_size=2, train_prompts=prompts, server_url=reward_server.grpc_url)
    message = str(error.value)
    assert f"{prompts}:3: prompt wav" in message and "under the minimum of 1 s" in message
    assert f"{prompts}:5: no prompt wav" in message
    assert "noise" not in message  # the header checks stop the run before any server call
    assert not (tmp_path / "o" / "train.parquet").exists()
    logged = []
    data.prepare(path, str(tmp_path / "o"), test_size=2, train_prompts=prompts, server_url=reward_server.grpc_url,
                 on_bad_prompt="skip", log=logged.append)
    assert "skipped 2 prompts of the prompt set (no prompt wav: 1, prompt too short: 1)" in logged
    assert "skipped 1 prompts of the prompt set (refused by the speech tokenizer: 1)" in logged
    used = {r["extra_info"]["prompt_id"] for r in read(tmp_path / "o" / "train.parquet")}
    assert used == {"alice0", "bob0"}


def test_prompts_need_a_ready_server_unless_cached(tmp_path):
    prompts, _ = _prompt_set(tmp_path, speakers=("alice",), per_speaker=1)
    path = write_jsonl(tmp_path / "a.jsonl", _texts(3))
    with pytest.raises(data.DataError) as error:
        data.prepare(path, str(tmp_path / "o"), test_size=1, train_prompts=prompts, server_url="grpc://127.0.0.1:1")
    message = str(error.value)
    assert f"{prompts}:1: prompt" in message and "grpc://127.0.0.1:1 does not answer" in message
    assert not (tmp_path / "o" / "train.parquet").exists()


def test_dev_slice_of_text_only_data_and_stale_dev_files(tmp_path):
    from ttsrl.eval_sets import load_eval_set

    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"第{i}句话"} for i in range(20)])
    out = tmp_path / "o"
    assert data.prepare(path, str(out), test_size=3, dev_size=5, seed=4) == {"train": 12, "dev": 5, "test": 3}
    dev = load_eval_set(str(out / "dev.jsonl"))
    assert [u.id for u in dev.utterances] == [f"dev{i:05d}" for i in range(5)]  # the records have no ids
    assert all(u.prompt_wav == "" and u.prompt_tokens == [] for u in dev.utterances)
    texts = [r["extra_info"]["text"] for name in ("train", "test") for r in read(out / f"{name}.parquet")]
    assert sorted(texts + [u.text for u in dev.utterances]) == sorted(f"第{i}句话" for i in range(20))
    with pytest.raises(data.DataError, match="--dev_size 17 leaves no training data"):
        data.prepare(path, str(out), test_size=3, dev_size=17)
    assert (out / "dev.jsonl").exists()  # a refused run changes nothing
    data.prepare(path, str(out), test_size=3)
    assert not (out / "dev.jsonl").exists()  # not held out of this train.parquet any more


def test_verl_rlhf_dataset_builds_zero_shot_prompts(tmp_path, reward_server):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    from tests.tokenizer_utils import tiny_tokenizer
    from ttsrl.speech_tokens import added_tokens, format_speech_tokens, speech_token

    prompts, tokens = _prompt_set(tmp_path, speakers=("alice", "bob"), per_speaker=1)
    data.prepare(write_jsonl(tmp_path / "a.jsonl", _texts(6)), str(tmp_path / "o"), test_size=2,
                 train_prompts=prompts, server_url=reward_server.grpc_url)
    tokenizer = tiny_tokenizer("cosyvoice2")
    tokenizer.add_tokens(added_tokens())  # as the HF conversion does: one token per speech token
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 64, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(str(tmp_path / "o" / "train.parquet"), tokenizer, config)
    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen2")
    assert len(dataset) == 4
    for item in range(len(dataset)):
        row = dataset[item]
        info = row["extra_info"]
        speech = _trimmed(tokens[info["prompt_id"]], info["prompt_wav"])
        ids = builder.build_initial_tokens(row["raw_prompt"])
        assert tokenizer.decode(ids) == expected_prompt(info["llm_prompt_text"] + info["normalized_text"],
                                                        "cosyvoice2", format_speech_tokens(speech))
        assert ids[-len(speech):] == tokenizer.convert_tokens_to_ids([speech_token(i) for i in speech])


@pytest.mark.parametrize("fast", [True, False])
def test_a_records_language_is_checked_and_copied_to_extra_info(tmp_path, fast):
    records = [{"text": "甲", "language": "cmn"}, {"text": "Hello there", "language": "en-US"}, {"text": "乙"},
               {"text": "今日は", "language": "ja"}]
    out = tmp_path / "out"
    data.prepare(write_jsonl(tmp_path / "a.jsonl", records), str(out), test_size=1, seed=3, fast=fast)
    infos = {r["extra_info"]["text"]: r["extra_info"] for r in read(out / "train.parquet") + read(out / "test.parquet")}
    assert {text: info["language"] for text, info in infos.items()} == {
        "甲": "zh", "Hello there": "en", "乙": None, "今日は": "ja"}


@pytest.mark.parametrize("fast", [True, False])
def test_an_unknown_language_names_file_line_and_the_value(tmp_path, fast):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "甲"}, {"text": "乙", "language": "klingon"}, {"text": "丙"}])
    with pytest.raises(data.DataError) as error:
        data.prepare(path, str(tmp_path / "o"), test_size=1, fast=fast)
    assert f"{path}:2: bad language: " in str(error.value) and "'klingon'" in str(error.value)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ upstream's frontend at stage 0

@pytest.mark.parametrize("fast", [True, False])
def test_a_text_upstream_would_split_is_refused_with_file_line(tmp_path, fast):
    long = "这是一个很长的句子，它有很多很多的字。" * 6  # over upstream's 80-character segments
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:3]] + [{"text": long}])
    with pytest.raises(data.DataError) as error:
        data.prepare(path, str(tmp_path / "o"), test_size=1, fast=fast)
    assert f"{path}:4: {data.SEVERAL_CALLS}: " in str(error.value) and "separate LLM inputs" in str(error.value)


def test_long_english_needs_the_policy_tokenizer_and_it_gives_text_tokens(tmp_path):
    from tests.qwen_vocab import policy_tokenizer

    english = "This sentence is long enough that only the tokenizer can tell whether it splits, really."
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:3]] + [{"text": english}])
    with pytest.raises(data.DataError, match=f"{path}:4: {data.NOT_NORMALIZABLE}: .*tokenizer"):
        data.prepare(path, str(tmp_path / "o"), test_size=1)
    tokenizer = policy_tokenizer("cosyvoice2")
    data.prepare(path, str(tmp_path / "o"), test_size=1, seed=3, tokenizer=tokenizer)
    rows = read(tmp_path / "o" / "train.parquet") + read(tmp_path / "o" / "test.parquet")
    for row in rows:
        info = row["extra_info"]
        assert info["text_tokens"] == len(tokenizer(info["normalized_text"])["input_ids"]) > 0


def test_cosyvoice3_rows_read_the_system_prefix(tmp_path):
    from ttsrl.model_family import COSYVOICE3_SYSTEM_PREFIX

    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:4]])
    data.prepare(path, str(tmp_path / "o"), test_size=1, model_family="cosyvoice3")
    for row in read(tmp_path / "o" / "train.parquet"):
        info = row["extra_info"]
        assert info["model_family"] == "cosyvoice3" and info["llm_prompt_text"] == COSYVOICE3_SYSTEM_PREFIX
        assert row["prompt"][0]["content"] == COSYVOICE3_SYSTEM_PREFIX + info["normalized_text"]


def test_texts_shorter_than_half_their_prompt_text_are_counted(tmp_path, reward_server):
    from tests.ttsrl.training.test_speaker_prompts import standin_ids, write_prompt

    write_prompt(tmp_path / "mine.wav", standin_ids(5), transcript=None)
    records = [{"text": "好。", "prompt_wav": "mine.wav", "prompt_text": "这是一段比较长的提示文本"},
               {"text": "这一句和提示差不多长了。", "prompt_wav": "mine.wav", "prompt_text": "这是一段比较长的提示文本"},
               {"text": "行。"}]
    logged = []
    data.prepare(write_jsonl(tmp_path / "a.jsonl", records), str(tmp_path / "o"),
                 test_file=write_jsonl(tmp_path / "t.jsonl", _texts(1)), server_url=reward_server.http_url,
                 log=logged.append)
    assert ("train: 1 of 3 texts are shorter than half their prompt text (upstream CosyVoice warns that this may "
            "lead to bad performance)") in logged


def test_the_dev_slice_keeps_each_records_language(tmp_path):
    from ttsrl.eval_sets import load_eval_set

    records = [{"text": f"第{i}句话。", "id": f"z{i}", "language": "zh"} for i in range(6)] + \
        [{"text": f"Sentence {i}.", "id": f"e{i}", "language": "en"} for i in range(6)] + [{"text": "没有语言。", "id": "n"}]
    data.prepare(write_jsonl(tmp_path / "a.jsonl", records), str(tmp_path / "o"), test_size=1, dev_size=8, seed=1)
    utterances = load_eval_set(str(tmp_path / "o" / "dev.jsonl")).utterances
    assert {u.language for u in utterances} >= {"zh", "en"}
    for utt in utterances:
        assert utt.language == {"z": "zh", "e": "en", "n": ""}[utt.id[0]]
@pytest.mark.parametrize("fast", [True, False])
def test_a_records_emotion_is_checked_and_copied_to_extra_info(tmp_path, fast):
    records = [{"text": "甲", "emotion": "Happy"}, {"text": "乙"}, {"text": "丙", "emotion": "sad"}]
    out = tmp_path / "out"
    data.prepare(write_jsonl(tmp_path / "a.jsonl", records), str(out), test_size=1, seed=3, fast=fast)
    infos = {r["extra_info"]["text"]: r["extra_info"] for r in read(out / "train.parquet") + read(out / "test.parquet")}
    assert {text: info["emotion"] for text, info in infos.items()} == {"甲": "happy", "乙": None, "丙": "sad"}


@pytest.mark.parametrize("fast", [True, False])
def test_an_emotion_the_model_does_not_know_names_file_line_and_the_known_ones(tmp_path, fast):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "甲", "emotion": "happy"}, {"text": "乙", "emotion": "bored"}])
    with pytest.raises(data.DataError) as error:
        data.prepare(path, str(tmp_path / "o"), test_size=1, fast=fast)
    assert f"{path}:2: unknown emotion: " in str(error.value) and "'bored'" in str(error.value)
    assert "known: ['angry', 'disgusted', 'fearful', 'happy'" in str(error.value)
    assert not (tmp_path / "o").exists()

"""ttsrl.policy.sft_warmup and scripts/sft_warmup.py: the supervised warm-up before GRPO, on the tiny
converted policy: bad records, the stamp of its inputs, stage 0's parquet as GRPO sees it, and DDP
over two CPU ranks under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli import run_script
from tests.policy_utils import tiny_policy  # noqa: F401  (fixture)
from token2wav_server import standin
from token2wav_server.launch import free_ports
from ttsrl.chat_template import prompt_messages
from ttsrl.frontend import PolicyFrontend, default_normalizer, row_policy_input
from ttsrl.policy import sft_warmup
from ttsrl.speech_tokens import SPEECH_END_TOKENS, format_speech_tokens

REPO = Path(__file__).resolve().parents[3]
TEXTS = ["三七九", "一二", "十五", "八四六"]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def write_stage0_parquet(path, rows):
    """A train.parquet in veRL's RL schema, as stage 0 writes it: ``rows`` of (text, prompt_text,
    prompt_tokens, speech_tokens or None) with the texts normalized as upstream does (CosyVoice2)."""
    normalizer = default_normalizer()
    normalized = [normalizer.normalize(text)[0] for text, *_ in rows]
    llm_prompts = [normalizer.normalize(p, split=False) if tokens else "" for _, p, tokens, _ in rows]
    messages = [prompt_messages(llm + text, format_speech_tokens(row[2]))
                for llm, text, row in zip(llm_prompts, normalized, rows)]
    table = pa.table({
        "data_source": ["tts"] * len(rows),
        "prompt": messages,
        "ability": ["tts"] * len(rows),
        "reward_model": [{"style": "rule", "ground_truth": text} for text, *_ in rows],
        "extra_info": pa.array([{"split": "train", "index": i, "text": row[0], "normalized_text": normalized[i],
                                 "llm_prompt_text": llm_prompts[i], "model_family": "cosyvoice2",
                                 "speech_tokens": row[3]} for i, row in enumerate(rows)],
                               type=pa.struct([("split", pa.string()), ("index", pa.int64()), ("text", pa.string()),
                                               ("normalized_text", pa.string()), ("llm_prompt_text", pa.string()),
                                               ("model_family", pa.string()),
                                               ("speech_tokens", pa.list_(pa.int64()))])),
    })
    pq.write_table(table, path)
    return path


def response_nll(model_dir, text, ids) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    [policy_input] = PolicyFrontend(tokenizer, "cosyvoice2").inputs(text)
    prompt = list(policy_input.ids)
    response = tokenizer(format_speech_tokens(ids) + SPEECH_END_TOKENS[0], add_special_tokens=False)["input_ids"]
    labels = torch.tensor([[-100] * len(prompt) + response])
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([prompt + response]), labels=labels).loss)


def test_bad_records_are_named_with_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"text": "三七", "speech_tokens": [9, 3]},
        "{not json",
        {"text": "", "speech_tokens": [1]},
        {"text": "一", "speech_tokens": [6561]},
    ])
    with pytest.raises(sft_warmup.PairsError) as error:
        sft_warmup.load_examples(str(data))
    message = str(error.value)
    assert "3 bad record(s)" in message
    assert f"{data}:2: not JSON" in message and f"{data}:3: 'text'" in message and f"{data}:4: 'speech_tokens'" in message
    with pytest.raises(sft_warmup.PairsError, match=rf"{data}:1: .*not in the stand-in"):
        sft_warmup.load_examples(str(write_jsonl(data, [{"text": "hello"}])), standin_targets=True)


def test_warm_up_learns_the_pairs_and_writes_a_complete_model(tmp_path, tiny_policy):  # noqa: F811
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "sft"
    before = response_nll(tiny_policy, TEXTS[0], standin.text_to_tokens(TEXTS[0]))
    argv = ["--model", str(tiny_policy), "--data", str(data), "--standin-targets", "--output-dir", str(out),
            "--steps", "40", "--lr", "3e-3", "--batch-size", "4", "--device", "cpu"]
    assert run_script("sft_warmup", argv) == 0
    summary = json.loads((out / sft_warmup.DONE_FILE).read_text())
    assert summary["examples"] == 4 and summary["last_loss"] < summary["first_loss"] / 4
    assert summary["device"] == "cpu" and summary["precision"] == "fp32" and summary["world_size"] == 1
    assert summary["stamp"]["steps"] == 40 and summary["stamp"]["targets"] == "standin"
    after = response_nll(out, TEXTS[0], standin.text_to_tokens(TEXTS[0]))
    assert after < before / 4  # the model now predicts the stand-in tokens of the text, then <|eos1|>
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".sft.*"))  # no staging folder left behind

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_script("sft_warmup", argv) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # same inputs: reused, not redone


def test_a_finished_warm_up_of_other_inputs_is_refused_naming_the_fields(tmp_path, tiny_policy, capsys):  # noqa: F811
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "sft"
    argv = ["--model", str(tiny_policy), "--data", str(data), "--standin-targets", "--output-dir", str(out),
            "--batch-size", "2", "--device", "cpu"]
    assert run_script("sft_warmup", [*argv, "--steps", "2", "--lr", "1e-3"]) == 0
    done = (out / sft_warmup.DONE_FILE).read_text()
    capsys.readouterr()

    assert run_script("sft_warmup", [*argv, "--steps", "3", "--lr", "2e-3"]) == 1
    error = capsys.readouterr().err
    assert f"{out} is a finished warm-up of other inputs" in error
    assert "steps: 2 -> 3" in error and "lr: 0.001 -> 0.002" in error and "seed" not in error
    assert "--force" in error and "--output-dir" in error
    write_jsonl(data, [{"text": t} for t in TEXTS[:3]])  # same path, other content
    assert run_script("sft_warmup", [*argv, "--steps", "2", "--lr", "1e-3"]) == 1
    assert f"data content: {data} (as it was) -> {data} (as it is)" in capsys.readouterr().err
    assert (out / sft_warmup.DONE_FILE).read_text() == done  # refused: nothing touched

    assert run_script("sft_warmup", [*argv, "--steps", "3", "--lr", "2e-3", "--force"]) == 0
    redone = json.loads((out / sft_warmup.DONE_FILE).read_text())
    assert (redone["stamp"]["steps"], redone["stamp"]["lr"], redone["examples"]) == (3, 2e-3, 3)


def test_a_warm_up_without_a_stamp_is_not_reused(tmp_path, tiny_policy, capsys):  # noqa: F811
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    out = tmp_path / "sft"
    out.mkdir()
    (out / sft_warmup.DONE_FILE).write_text(json.dumps({"steps": 2, "lr": 1e-3}))  # an older version's summary
    argv = ["--model", str(tiny_policy), "--data", str(data), "--standin-targets", "--output-dir", str(out)]
    assert run_script("sft_warmup", argv) == 1
    assert "stamp: none (made by an older sft_warmup" in capsys.readouterr().err


def test_stage0_parquet_trains_on_the_prompt_grpo_sees(tmp_path, tiny_policy):  # noqa: F811
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    voice_7 = [standin.VOICE_TOKEN_BASE + 7, 12, 40]  # a zero-shot prompt's speech tokens (stand-in voice 7)
    rows = [("三七九", "一二", voice_7, None),           # zero-shot, stand-in targets in the prompt's voice
            ("十五", "", [], None),                      # text-only
            ("八四六", "五", [3, 4], [100, 101, 102])]   # zero-shot with its own targets in extra_info
    data = write_stage0_parquet(tmp_path / "train.parquet", rows)
    examples = sft_warmup.load_examples(str(data), standin_targets=True)
    assert [e.targets for e in examples] == [standin.targets_for("三七九", voice_7), standin.targets_for("十五"),
                                             [100, 101, 102]]
    assert examples[0].targets[0] == standin.VOICE_TOKEN_BASE + 7  # says the text in the prompt's voice

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    frontend = PolicyFrontend(tokenizer, "cosyvoice2")
    encoded = sft_warmup.encode_examples(tokenizer, examples)
    for (text, prompt_text, prompt_tokens, _), (ids, prompt_length) in zip(rows, encoded):
        # upstream's input: prompt text and text normalized and tokenized apart, then the prompt speech
        [expected] = frontend.inputs(text, prompt_text, prompt_tokens)
        assert ids[:prompt_length] == list(expected.ids)
    # ... and token for token the prompt veRL's tts_frontend agent loop builds from the same parquet rows
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 256, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(str(data), tokenizer, config)
    for item, (ids, prompt_length) in enumerate(encoded):
        row = dataset[item]
        assert ids[:prompt_length] == list(row_policy_input(frontend, row["extra_info"], row["raw_prompt"]).ids)

    out = tmp_path / "sft"
    argv = ["--model", str(tiny_policy), "--data", str(data), "--standin-targets", "--output-dir", str(out),
            "--steps", "3", "--lr", "1e-3", "--batch-size", "3", "--device", "cpu"]
    assert run_script("sft_warmup", argv) == 0
    summary = json.loads((out / sft_warmup.DONE_FILE).read_text())
    assert summary["examples"] == 3 and summary["zero_shot_examples"] == 2


def test_parquet_rows_without_targets_are_named(tmp_path):
    data = write_stage0_parquet(tmp_path / "train.parquet", [("三七", "", [], [1, 2]), ("十五", "", [], None)])
    with pytest.raises(sft_warmup.PairsError, match=rf"{data}:row 1: no 'extra_info.speech_tokens'.*--standin-targets"):
        sft_warmup.load_examples(str(data))


def test_failure_leaves_no_output(tmp_path, tiny_policy, capsys):  # noqa: F811
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "三", "speech_tokens": "nine"}])
    argv = ["--model", str(tiny_policy), "--data", str(data), "--output-dir", str(tmp_path / "o")]
    assert run_script("sft_warmup", argv) == 1
    assert f"{data}:1: 'speech_tokens' must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cuda_requested_without_a_gpu_is_refused(tmp_path, tiny_policy, capsys):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    argv = ["--model", str(tiny_policy), "--data", str(data), "--standin-targets", "--output-dir", str(tmp_path / "o"),
            "--device", "cuda"]
    assert run_script("sft_warmup", argv) == 1
    assert "--device cuda, but torch" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_cpu_ranks_under_torchrun_train_what_one_process_does(tmp_path, tiny_policy):  # noqa: F811
    """DDP on gloo: each rank takes half of every batch, rank 0 writes OUT; the losses match one process."""
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    flags = ["--model", str(tiny_policy), "--data", str(data), "--standin-targets", "--steps", "6", "--lr", "3e-3",
             "--batch-size", "4", "--device", "cpu"]
    single, double = tmp_path / "one", tmp_path / "two"
    assert run_script("sft_warmup", [*flags, "--output-dir", str(single)]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_ports(1)[0]}",
               str(REPO / "scripts" / "sft_warmup.py"), *flags, "--output-dir", str(double)]
    done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((single / sft_warmup.DONE_FILE).read_text())
    two = json.loads((double / sft_warmup.DONE_FILE).read_text())
    assert two["world_size"] == 2 and two["stamp"] == one["stamp"]
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-4)
    assert two["last_loss"] == pytest.approx(one["last_loss"], rel=1e-3)
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())
    assert done.stdout.count("wrote ") == 1  # rank 0 alone wrote OUT
    assert not list(tmp_path.glob(".two.*"))


def test_rank_shares_average_to_the_gradient_of_the_whole_batch(tiny_policy):  # noqa: F811
    """What DDP computes from the ranks' shard losses (the mean of their gradients) is the gradient
    of the whole batch's token mean, whatever the ranks' token counts."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    texts = ["三七九八四六", "一", "十五", "八"]  # unequal lengths: rank 0 gets far more tokens
    encoded = sft_warmup.encode_examples(
        tokenizer, [sft_warmup.Example(prompt_messages(t), standin.text_to_tokens(t), text=t) for t in texts])
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    picks = [0, 1, 2, 3, 0]

    def gradient(rank, world_size):
        model.zero_grad()
        loss, _ = sft_warmup.shard_loss(model, encoded, picks, rank, world_size)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = gradient(0, 1)
    averaged = (gradient(0, 2) + gradient(1, 2)) / 2
    assert torch.allclose(averaged, whole, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(gradient(0, 2), whole, atol=1e-6, rtol=1e-4)  # one share alone is not the batch


def test_any_voice_targets_read_in_the_datas_voices_not_the_prompts(tmp_path):
    # the smoke warm-up: reading in some voice of the data, so that cloning is left to GRPO
    voices = [standin.VOICE_TOKEN_BASE + v for v in (3, 6, 9, 12)]
    rows = [(text, "上", [voices[i % 4], 40], None) for i, text in enumerate(TEXTS * 8)]
    data = write_stage0_parquet(tmp_path / "train.parquet", rows)
    examples = sft_warmup.load_examples(str(data), standin_targets="any-voice")
    assert [e.targets[1:] for e in examples] == [standin.text_to_tokens(text) for text, *_ in rows]
    drawn = [e.targets[0] for e in examples]
    assert set(drawn) == set(voices)  # every voice of the data's prompts is used ...
    own = [e.targets[0] == row[2][0] for e, row in zip(examples, rows)]
    assert 0 < sum(own) < len(rows)  # ... independently of the row's own prompt voice
    assert drawn == [e.targets[0] for e in sft_warmup.load_examples(str(data), standin_targets="any-voice")]
    text_only = write_stage0_parquet(tmp_path / "text_only.parquet", [("三七九", "", [], None)])
    with pytest.raises(sft_warmup.PairsError, match="needs zero-shot rows"):
        sft_warmup.load_examples(str(text_only), standin_targets="any-voice")

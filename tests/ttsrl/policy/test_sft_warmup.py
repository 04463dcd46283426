"""ttsrl.policy.sft_warmup and scripts/sft_warmup.py: the supervised warm-up before GRPO, on the tiny
converted policy."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli import run_script
from tests.policy_utils import tiny_policy  # noqa: F401  (fixture)
from token2wav_server import standin
from ttsrl.chat_template import expected_prompt
from ttsrl.policy import sft_warmup
from ttsrl.speech_tokens import SPEECH_END_TOKENS, format_speech_tokens


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def response_nll(model_dir, text, ids) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tokenizer(expected_prompt(text), add_special_tokens=False)["input_ids"]
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
        sft_warmup.load_pairs(str(data))
    message = str(error.value)
    assert "3 bad record(s)" in message
    assert f"{data}:2: not JSON" in message and f"{data}:3: 'text'" in message and f"{data}:4: 'speech_tokens'" in message
    with pytest.raises(sft_warmup.PairsError, match=rf"{data}:1: .*not in the stand-in"):
        sft_warmup.load_pairs(str(write_jsonl(data, [{"text": "hello"}])), standin_targets=True)


def test_warm_up_learns_the_pairs_and_writes_a_complete_model(tmp_path, tiny_policy):  # noqa: F811
    texts = ["三七九", "一二", "十五", "八四六"]
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "sft"
    before = response_nll(tiny_policy, texts[0], standin.text_to_tokens(texts[0]))
    common = ["--model", str(tiny_policy), "--data", str(data), "--standin-targets", "--output-dir", str(out)]
    assert run_script("sft_warmup", [*common, "--steps", "40", "--lr", "3e-3", "--batch-size", "4"]) == 0
    summary = json.loads((out / sft_warmup.DONE_FILE).read_text())
    assert summary["pairs"] == 4 and summary["last_loss"] < summary["first_loss"] / 4
    after = response_nll(out, texts[0], standin.text_to_tokens(texts[0]))
    assert after < before / 4  # the model now predicts the stand-in tokens of the text, then <|eos1|>
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".sft.*"))  # no staging folder left behind

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_script("sft_warmup", [*common, "--steps", "40"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # complete: reused, not redone


def test_failure_leaves_no_output(tmp_path, tiny_policy, capsys):  # noqa: F811
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "三", "speech_tokens": "nine"}])
    argv = ["--model", str(tiny_policy), "--data", str(data), "--output-dir", str(tmp_path / "o")]
    assert run_script("sft_warmup", argv) == 1
    assert f"{data}:1: 'speech_tokens' must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

"""ttsrl.policy.hf_conversion and scripts/convert_cosyvoice2_to_hf.py: the converted model against a
CosyVoice2-style forward (tests/ttsrl/policy/conversion_utils.py). CosyVoice3:
test_hf_conversion_cosyvoice3.py."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli import run_script
from tests.ttsrl.policy.conversion_utils import EOS, PROMPT_SPEECH, TEXT, CosyVoice2Reference, convert, hf_prompt_ids
from ttsrl.model_family import COSYVOICE2, HF_FAMILY_KEY, family_of_hf_dir
from ttsrl.policy.hf_conversion import BLANK_EN, REPORT_FILE, SPEECH_ROWS, ConversionError
from ttsrl.policy.llm_export import export_hf_dir, load_hf_state_dict
from ttsrl.speech_tokens import SPEECH_END_TOKENS, added_tokens, parse_speech_tokens
from ttsrl.tiny_models.llm import write_tiny_cosyvoice2


# ------------------------------------------------------------------ tokenizer and configs

def test_tokenizer_layout_and_chat_template(biased):
    source, hf_dir = biased
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    reference = CosyVoice2Reference(torch.load(source / "llm.pt", weights_only=True), source / BLANK_EN)
    offset = tokenizer.convert_tokens_to_ids("<|s_0|>")
    assert offset == len(reference.tokenizer)  # text ids unchanged, speech block right after
    assert tokenizer.convert_tokens_to_ids(added_tokens()) == list(range(offset, offset + len(added_tokens())))
    ids = hf_prompt_ids(tokenizer, TEXT, PROMPT_SPEECH)
    sos, task = tokenizer.convert_tokens_to_ids(["<|sos|>", "<|task_id|>"])
    assert ids == [sos] + reference.text_ids(TEXT) + [task] + [offset + s for s in PROMPT_SPEECH]
    # Responses survive veRL's skip_special_tokens decoding, end token included.
    response = [offset + 5, offset + 6560, offset + EOS]
    parsed = parse_speech_tokens(tokenizer.decode(response, skip_special_tokens=True))
    assert parsed.ids == [5, 6560] and parsed.ended


def test_generation_config_and_report(biased):
    source, hf_dir = biased
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(list(SPEECH_END_TOKENS))
    assert (generation["top_p"], generation["top_k"], generation["do_sample"]) == (0.8, 25, True)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)  # no padding rows: every sampled id decodes
    assert config["tie_word_embeddings"] is False
    report = json.loads((hf_dir / REPORT_FILE).read_text())
    assert config[HF_FAMILY_KEY] == report[HF_FAMILY_KEY] == "cosyvoice2"  # detected from the llm.pt
    assert family_of_hf_dir(hf_dir) is COSYVOICE2
    bias = torch.load(source / "llm.pt", weights_only=True)["llm_decoder.bias"]
    assert report["llm_decoder_bias_stats"]["max_abs_logprob_change_bound"] == pytest.approx(
        float(bias.max() - bias.min()))


# ------------------------------------------------------------------ logits

@pytest.mark.parametrize("prompt_speech", [[], PROMPT_SPEECH], ids=["text-only", "with-prompt-speech"])
def test_logits_match_cosyvoice2_forward(biased, prompt_speech):
    source, hf_dir = biased
    state = torch.load(source / "llm.pt", weights_only=True)
    reference = CosyVoice2Reference(state, source / BLANK_EN)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    offset = tokenizer.convert_tokens_to_ids("<|s_0|>")
    ids = hf_prompt_ids(tokenizer, TEXT, prompt_speech)
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = reference.logits(reference.text_ids(TEXT), prompt_speech)
    speech = hf_logits[:, offset:offset + SPEECH_ROWS]
    # Exact up to the bias, which the converted model does not carry (by decision).
    torch.testing.assert_close(speech + state["llm_decoder.bias"], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(speech, expected, atol=1e-2)  # the bias is really there in CosyVoice2
    # Every non-speech token has logit exactly 0, whatever the input.
    assert torch.count_nonzero(hf_logits[:, :offset]) == 0
    assert torch.count_nonzero(hf_logits[:, offset + SPEECH_ROWS:]) == 0


# ------------------------------------------------------------------ greedy generation

def test_greedy_generation_agrees_and_stops(unbiased):
    source, hf_dir = unbiased
    reference = CosyVoice2Reference(torch.load(source / "llm.pt", weights_only=True), source / BLANK_EN)
    expected, stopped = reference.greedy(reference.text_ids(TEXT), [], max_steps=12)
    assert stopped and 1 <= len(expected) <= 6
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    offset = tokenizer.convert_tokens_to_ids("<|s_0|>")
    ids = hf_prompt_ids(tokenizer, TEXT, [])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
    assert out == [offset + t for t in expected] + [offset + EOS]
    parsed = parse_speech_tokens(tokenizer.decode(out, skip_special_tokens=True))
    assert parsed.ids == expected and parsed.ended


# ------------------------------------------------------------------ CLI behaviour

def test_convert_is_idempotent_and_forceable(biased, tmp_path, capsys):
    source, _ = biased
    out = convert(source, tmp_path / "hf", "--dtype", "bfloat16")
    weights = out / "model.safetensors"
    assert load_hf_state_dict(out)["lm_head.weight"].dtype == torch.bfloat16
    stamp = weights.stat().st_mtime_ns
    convert(source, out)
    assert "skipping" in capsys.readouterr().out and weights.stat().st_mtime_ns == stamp
    convert(source, out, "--force", "--model-family", "cosyvoice2")  # the flag agreeing with the file
    assert load_hf_state_dict(out)["lm_head.weight"].dtype == torch.float32
    assert not list(tmp_path.glob(".hf.*"))  # no temporary directories left behind


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nothing"
    assert run_script("convert_cosyvoice2_to_hf", ["--cosyvoice2-dir", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert "llm.pt" in capsys.readouterr().err
    source = write_tiny_cosyvoice2(tmp_path / "tiny", seed=0)
    state = torch.load(source / "llm.pt", weights_only=True)
    del state["llm_decoder.bias"]
    torch.save(state, source / "llm.pt")
    assert run_script("convert_cosyvoice2_to_hf", ["--cosyvoice2-dir", str(source), "--output-dir", str(tmp_path / "o")]) == 2
    assert "llm_decoder.bias" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConversionError, match="config.json"):
        export_hf_dir(tmp_path)
    # Never replaces a directory that is not a conversion, even with --force.
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    state["llm_decoder.bias"] = torch.zeros(SPEECH_ROWS)
    torch.save(state, source / "llm.pt")
    argv = ["--cosyvoice2-dir", str(source), "--output-dir", str(occupied), "--force"]
    assert run_script("convert_cosyvoice2_to_hf", argv) == 2
    assert "no finished conversion" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "mine"

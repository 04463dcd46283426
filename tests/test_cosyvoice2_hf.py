"""CosyVoice2 <-> Hugging Face conversion, checked against a CosyVoice2-style forward.

The reference forward below is written from CosyVoice2's ``Qwen2LM`` design, not
from the converter: the LM input is ``llm_embedding[0]`` (sos), the Qwen2 text
embeddings, ``llm_embedding[1]`` (task id) and ``speech_embedding`` rows of the
prompt speech tokens; the backbone's final (normed) hidden state goes through
``llm_decoder`` (weight and bias). It runs on the raw ``llm.pt`` tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Model

from scripts import convert_cosyvoice2_to_hf, convert_hf_to_cosyvoice2
from scripts.cosyvoice2_hf import (COSYVOICE2_TEXT_SPECIAL_TOKENS, REPORT_FILE, SPEECH_ROWS, ConversionError,
                                   bias_effect, check_export, export_hf_dir, load_hf_state_dict)
from scripts.make_tiny_cosyvoice2 import BLANK_EN, write_tiny_cosyvoice2
from ttsrl.chat_template import expected_prompt, prompt_messages
from ttsrl.speech_tokens import (SPEECH_END_TOKENS, SPEECH_VOCAB_SIZE, added_tokens, format_speech_tokens,
                                 parse_speech_tokens)

TEXT = "今天天气很好[breath]，我们去公园吧。"
PROMPT_SPEECH = [12, 6000, 3, 4095, 6560]
EOS = SPEECH_VOCAB_SIZE  # CosyVoice2's stop token (row 6561)


# ------------------------------------------------------------------ reference side

class CosyVoice2Reference:
    """CosyVoice2's LLM forward on the tensors of an ``llm.pt``."""

    def __init__(self, llm_state: dict, blank_dir: Path):
        config = AutoConfig.from_pretrained(str(blank_dir))
        self.backbone = Qwen2Model(config)
        prefix = "llm.model.model."
        self.backbone.load_state_dict({k[len(prefix):]: v for k, v in llm_state.items() if k.startswith(prefix)},
                                      strict=True)
        self.backbone.eval()
        self.state = llm_state
        # CosyVoice2's frontend tokenizer: the Qwen2 tokenizer plus its special text tokens.
        self.tokenizer = AutoTokenizer.from_pretrained(str(blank_dir))
        self.tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                           "additional_special_tokens": list(COSYVOICE2_TEXT_SPECIAL_TOKENS)})

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def lm_input(self, text_ids, speech_ids):
        s = self.state
        parts = [s["llm_embedding.weight"][0:1], s["llm.model.model.embed_tokens.weight"][torch.tensor(text_ids)],
                 s["llm_embedding.weight"][1:2]]
        if speech_ids:
            parts.append(s["speech_embedding.weight"][torch.tensor(speech_ids)])
        return torch.cat(parts).unsqueeze(0)

    @torch.no_grad()
    def logits(self, text_ids, speech_ids) -> torch.Tensor:
        """(positions, 6564) logits of ``llm_decoder`` at every input position."""
        hidden = self.backbone(inputs_embeds=self.lm_input(text_ids, speech_ids)).last_hidden_state[0]
        return hidden @ self.state["llm_decoder.weight"].T + self.state["llm_decoder.bias"]

    def greedy(self, text_ids, prompt_speech, max_steps: int) -> tuple[list[int], bool]:
        """Greedy decoding over the 6564 outputs; stops at any end token (6561..6563)."""
        out: list[int] = []
        for _ in range(max_steps):
            token = int(self.logits(text_ids, prompt_speech + out)[-1].argmax())
            if token >= SPEECH_VOCAB_SIZE:
                return out, True
            out.append(token)
        return out, False


def convert(cosyvoice2_dir: Path, output_dir: Path, *extra: str) -> Path:
    argv = ["--cosyvoice2-dir", str(cosyvoice2_dir), "--output-dir", str(output_dir), *extra]
    assert convert_cosyvoice2_to_hf.main(argv) == 0
    return output_dir


def hf_prompt_ids(tokenizer, text: str, speech_ids: list[int]) -> list[int]:
    prompt = tokenizer.apply_chat_template(prompt_messages(text, format_speech_tokens(speech_ids)), tokenize=False)
    assert prompt == expected_prompt(text, "cosyvoice2", format_speech_tokens(speech_ids))
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """Tiny CosyVoice2 with a realistic llm_decoder bias, converted."""
    root = tmp_path_factory.mktemp("biased")
    source = write_tiny_cosyvoice2(root / "cosyvoice2", seed=0, bias_std=0.5)
    hf_dir = convert(source, root / "hf")
    return source, hf_dir


@pytest.fixture(scope="module")
def unbiased(tmp_path_factory):
    """Tiny CosyVoice2 with a zero bias whose greedy decoding stops within a few steps."""
    root = tmp_path_factory.mktemp("unbiased")
    source = write_tiny_cosyvoice2(root / "cosyvoice2", seed=1, bias_std=0.0)
    state = torch.load(source / "llm.pt", weights_only=True)
    reference = CosyVoice2Reference(state, source / BLANK_EN)
    text_ids = reference.text_ids(TEXT)
    # Point the stop token's decoder row at the hidden state of step 6, so eos
    # wins there at the latest (earlier steps are unchanged unless eos wins).
    tokens = []
    for _ in range(6):
        tokens.append(int(reference.logits(text_ids, tokens)[-1, :SPEECH_VOCAB_SIZE].argmax()))
    with torch.no_grad():
        hidden = reference.backbone(inputs_embeds=reference.lm_input(text_ids, tokens)).last_hidden_state[0, -1]
        top = float(reference.logits(text_ids, tokens)[-1].max())
        state["llm_decoder.weight"][EOS] = hidden * ((abs(top) + 20.0) / hidden.dot(hidden))
    torch.save(state, source / "llm.pt")
    hf_dir = convert(source, root / "hf")
    return source, hf_dir


# ------------------------------------------------------------------ the tiny model itself

def test_tiny_model_has_cosyvoice2_layout(tmp_path):
    source = write_tiny_cosyvoice2(tmp_path / "tiny", seed=3)
    state = torch.load(source / "llm.pt", weights_only=True)
    assert state["speech_embedding.weight"].shape[0] == SPEECH_ROWS == 6564
    assert state["llm_decoder.weight"].shape[0] == 6564 and state["llm_decoder.bias"].shape == (6564,)
    assert state["llm_embedding.weight"].shape[0] == 2
    assert state["llm.model.lm_head.weight"].data_ptr() == state["llm.model.model.embed_tokens.weight"].data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(str(source / BLANK_EN))
    ids = tokenizer("扁担长，板凳宽。abc", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 + 3  # one token per CJK character / punctuation, bytes for ASCII
    assert tokenizer.decode(ids) == "扁担长，板凳宽。abc"
    config = json.loads((source / BLANK_EN / "config.json").read_text())
    assert config["vocab_size"] > len(tokenizer) + len(COSYVOICE2_TEXT_SPECIAL_TOKENS)  # unreachable rows exist
    # Same seed, same tensors.
    again = torch.load(write_tiny_cosyvoice2(tmp_path / "again", seed=3) / "llm.pt", weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)


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


def test_bias_effect_numbers(biased):
    source, hf_dir = biased
    state = torch.load(source / "llm.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    offset = tokenizer.convert_tokens_to_ids("<|s_0|>")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([hf_prompt_ids(tokenizer, TEXT, PROMPT_SPEECH)])).logits[0]
    bias = state["llm_decoder.bias"]
    effect = bias_effect(logits, offset, bias)
    assert 0 < effect["kl_bias_mean"] <= effect["kl_total_mean"]
    assert effect["max_abs_logprob_diff"] <= effect["bias_bound"] + 1e-5
    # Non-speech mass: N tokens at logit 0 against the speech logits.
    n = logits.shape[1] - SPEECH_ROWS
    speech_lse = torch.logsumexp(logits[:, offset:offset + SPEECH_ROWS], dim=-1)
    expected_mass = n / (n + speech_lse.exp())
    assert effect["nonspeech_mass_max"] == pytest.approx(float(expected_mass.max()), rel=1e-3)
    assert bias_effect(logits, offset, torch.zeros_like(bias))["kl_bias_max"] == pytest.approx(0.0, abs=1e-6)


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


# ------------------------------------------------------------------ export and round trip

def test_round_trip_reproduces_every_tensor(unbiased, tmp_path):
    source, hf_dir = unbiased
    out = tmp_path / "llm.pt"
    argv = ["--hf-dir", str(hf_dir), "--output", str(out), "--reference-llm-pt", str(source / "llm.pt"), "--check"]
    assert convert_hf_to_cosyvoice2.main(argv) == 0
    original = torch.load(source / "llm.pt", weights_only=True)
    exported = torch.load(out, weights_only=True)
    assert set(exported) == set(original)
    for key in original:
        assert exported[key].dtype == original[key].dtype, key
        assert torch.equal(exported[key], original[key]), key
    # Tied like the original, so CosyVoice2's strict load keeps the embedding.
    assert exported["llm.model.lm_head.weight"].data_ptr() == exported["llm.model.model.embed_tokens.weight"].data_ptr()


def test_round_trip_with_bias_zeroes_only_the_bias(biased, tmp_path):
    source, hf_dir = biased
    exported, _, _ = export_hf_dir(hf_dir, source / "llm.pt")
    original = torch.load(source / "llm.pt", weights_only=True)
    for key in original:
        if key == "llm_decoder.bias":
            assert torch.count_nonzero(exported[key]) == 0 and torch.count_nonzero(original[key]) > 0
        else:
            assert torch.equal(exported[key], original[key]), key


def test_export_without_reference_uses_recorded_layout(biased):
    source, hf_dir = biased
    exported, hf_state, offset = export_hf_dir(hf_dir)
    original = torch.load(source / "llm.pt", weights_only=True)
    key = "llm.model.model.embed_tokens.weight"
    assert exported[key].shape == original[key].shape
    assert torch.equal(exported[key][:offset], original[key][:offset])
    assert torch.count_nonzero(exported[key][offset:]) == 0  # rows no token id reaches
    for name in ("speech_embedding.weight", "llm_embedding.weight", "llm_decoder.weight"):
        assert torch.equal(exported[name], original[name]), name
    assert check_export(exported, hf_state, offset) == []


def test_trained_model_exports_to_the_same_policy(biased, tmp_path):
    """A changed HF model, exported, gives CosyVoice2 exactly its speech distribution."""
    source, hf_dir = biased
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    trained = tmp_path / "trained"
    model.save_pretrained(str(trained))
    AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(trained))
    out = tmp_path / "llm.pt"
    argv = ["--hf-dir", str(trained), "--output", str(out), "--reference-llm-pt", str(source / "llm.pt"), "--check"]
    assert convert_hf_to_cosyvoice2.main(argv) == 0
    reference = CosyVoice2Reference(torch.load(out, weights_only=True), source / BLANK_EN)
    tokenizer = AutoTokenizer.from_pretrained(str(trained))
    offset = tokenizer.convert_tokens_to_ids("<|s_0|>")
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([hf_prompt_ids(tokenizer, TEXT, PROMPT_SPEECH)])).logits[0]
    expected = reference.logits(reference.text_ids(TEXT), PROMPT_SPEECH)
    torch.testing.assert_close(hf_logits[:, offset:offset + SPEECH_ROWS], expected, atol=1e-4, rtol=1e-4)


def test_check_detects_a_broken_export(biased):
    source, hf_dir = biased
    exported, hf_state, offset = export_hf_dir(hf_dir, source / "llm.pt")
    exported["llm.model.model.layers.1.mlp.up_proj.weight"] = exported[
        "llm.model.model.layers.1.mlp.up_proj.weight"] + 1e-3
    exported["speech_embedding.weight"] = exported["speech_embedding.weight"].flip(0)
    problems = check_export(exported, hf_state, offset)
    assert any("layers.1.mlp.up_proj" in p for p in problems)
    assert any("embed_tokens" in p for p in problems)


# ------------------------------------------------------------------ CLI behaviour

def test_convert_is_idempotent_and_forceable(biased, tmp_path, capsys):
    source, _ = biased
    out = convert(source, tmp_path / "hf", "--dtype", "bfloat16")
    weights = out / "model.safetensors"
    assert load_hf_state_dict(out)["lm_head.weight"].dtype == torch.bfloat16
    stamp = weights.stat().st_mtime_ns
    convert(source, out)
    assert "skipping" in capsys.readouterr().out and weights.stat().st_mtime_ns == stamp
    convert(source, out, "--force")
    assert load_hf_state_dict(out)["lm_head.weight"].dtype == torch.float32
    assert not list(tmp_path.glob(".hf.*"))  # no temporary directories left behind


def test_export_skips_existing_output_unless_forced(biased, tmp_path, capsys):
    source, hf_dir = biased
    out = tmp_path / "llm.pt"
    out.write_bytes(b"keep")
    assert convert_hf_to_cosyvoice2.main(["--hf-dir", str(hf_dir), "--output", str(out)]) == 0
    assert out.read_bytes() == b"keep"
    assert convert_hf_to_cosyvoice2.main(["--hf-dir", str(hf_dir), "--output", str(out), "--force"]) == 0
    assert set(torch.load(out, weights_only=True)) == set(torch.load(source / "llm.pt", weights_only=True))


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nothing"
    assert convert_cosyvoice2_to_hf.main(["--cosyvoice2-dir", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert "llm.pt" in capsys.readouterr().err
    source = write_tiny_cosyvoice2(tmp_path / "tiny", seed=0)
    state = torch.load(source / "llm.pt", weights_only=True)
    del state["llm_decoder.bias"]
    torch.save(state, source / "llm.pt")
    assert convert_cosyvoice2_to_hf.main(["--cosyvoice2-dir", str(source), "--output-dir", str(tmp_path / "o")]) == 2
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
    assert convert_cosyvoice2_to_hf.main(argv) == 2
    assert "no finished conversion" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ stage 3 -> stage 6

MAKE_FSDP = Path(__file__).resolve().parents[1] / "scripts" / "make_fsdp_checkpoint.py"


def test_export_of_verl_merged_checkpoint(biased, tmp_path):
    """FSDP actor checkpoint of the converted model -> veRL's merger -> llm.pt, still the same policy."""
    import os
    import subprocess
    import sys

    source, hf_dir = biased
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}

    def run(*args):
        done = subprocess.run([sys.executable, *args], env=env, cwd=repo, timeout=300, capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{args[:3]} failed:\n{done.stderr[-3000:]}"

    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(MAKE_FSDP),
        "--model_dir", str(hf_dir), "--exp_dir", str(tmp_path / "exp"), "--step", "1", "--perturb", "0.02")
    merged = tmp_path / "merged"
    run("-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
        str(tmp_path / "exp" / "global_step_1" / "actor"), "--target_dir", str(merged))
    out = tmp_path / "llm.pt"
    argv = ["--hf-dir", str(merged), "--output", str(out), "--reference-llm-pt", str(source / "llm.pt"), "--check"]
    assert convert_hf_to_cosyvoice2.main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    offset = tokenizer.convert_tokens_to_ids("<|s_0|>")
    original = torch.load(source / "llm.pt", weights_only=True)
    exported = torch.load(out, weights_only=True)
    assert not torch.equal(exported["llm_decoder.weight"], original["llm_decoder.weight"])  # it was trained
    reference = CosyVoice2Reference(exported, source / BLANK_EN)
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([hf_prompt_ids(tokenizer, TEXT, PROMPT_SPEECH)])).logits[0]
    expected = reference.logits(reference.text_ids(TEXT), PROMPT_SPEECH)
    torch.testing.assert_close(hf_logits[:, offset:offset + SPEECH_ROWS], expected, atol=1e-4, rtol=1e-4)

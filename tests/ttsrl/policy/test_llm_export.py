"""ttsrl.policy.llm_export and scripts/convert_hf_to_cosyvoice2.py: Hugging Face -> llm.pt, the round
trip, and the export of a veRL-merged checkpoint (stage 3 -> stage 6)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli import run_script
from tests.ttsrl.policy.conversion_utils import PROMPT_SPEECH, TEXT, CosyVoice2Reference, hf_prompt_ids
from ttsrl.model_family import COSYVOICE2, HF_FAMILY_KEY, family_of_hf_dir
from ttsrl.policy.hf_conversion import BLANK_EN, SPEECH_ROWS
from ttsrl.policy.llm_export import check_export, export_hf_dir

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ export and round trip

def test_round_trip_reproduces_every_tensor(unbiased, tmp_path):
    source, hf_dir = unbiased
    out = tmp_path / "llm.pt"
    argv = ["--hf-dir", str(hf_dir), "--output", str(out), "--reference-llm-pt", str(source / "llm.pt"), "--check"]
    assert run_script("convert_hf_to_cosyvoice2", argv) == 0
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


def test_dir_converted_before_families_exports_as_cosyvoice2(biased, tmp_path, capsys):
    """An HF directory with no family record (converted before CosyVoice3 existed) is CosyVoice2."""
    import shutil

    source, hf_dir = biased
    old = tmp_path / "old"
    shutil.copytree(hf_dir, old)
    config = json.loads((old / "config.json").read_text())
    assert config.pop(HF_FAMILY_KEY) == "cosyvoice2"
    (old / "config.json").write_text(json.dumps(config))
    assert family_of_hf_dir(old) is COSYVOICE2
    out = tmp_path / "llm.pt"
    argv = ["--hf-dir", str(old), "--output", str(out), "--reference-llm-pt", str(source / "llm.pt"), "--check",
            "--model-family", "cosyvoice2"]
    assert run_script("convert_hf_to_cosyvoice2", argv) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()


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
    assert run_script("convert_hf_to_cosyvoice2", argv) == 0
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


def test_export_skips_existing_output_unless_forced(biased, tmp_path, capsys):
    source, hf_dir = biased
    out = tmp_path / "llm.pt"
    out.write_bytes(b"keep")
    assert run_script("convert_hf_to_cosyvoice2", ["--hf-dir", str(hf_dir), "--output", str(out)]) == 0
    assert out.read_bytes() == b"keep"
    assert run_script("convert_hf_to_cosyvoice2", ["--hf-dir", str(hf_dir), "--output", str(out), "--force"]) == 0
    assert set(torch.load(out, weights_only=True)) == set(torch.load(source / "llm.pt", weights_only=True))


# ------------------------------------------------------------------ stage 3 -> stage 6

MAKE_FSDP = REPO / "tests" / "fixtures" / "make_fsdp_checkpoint.py"


def test_export_of_verl_merged_checkpoint(biased, tmp_path):
    """FSDP actor checkpoint of the converted model -> veRL's merger -> llm.pt, still the same policy."""
    import os
    import subprocess
    import sys

    source, hf_dir = biased
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(*args):
        done = subprocess.run([sys.executable, *args], env=env, cwd=REPO, timeout=300, capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{args[:3]} failed:\n{done.stderr[-3000:]}"

    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(MAKE_FSDP),
        "--model_dir", str(hf_dir), "--exp_dir", str(tmp_path / "exp"), "--step", "1", "--perturb", "0.02")
    merged = tmp_path / "merged"
    run("-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
        str(tmp_path / "exp" / "global_step_1" / "actor"), "--target_dir", str(merged))
    assert family_of_hf_dir(merged) is COSYVOICE2
    # veRL's merger keeps the family record, which a CosyVoice3 policy's export relies on.
    assert json.loads((merged / "config.json").read_text()).get(HF_FAMILY_KEY) == "cosyvoice2"
    out = tmp_path / "llm.pt"
    argv = ["--hf-dir", str(merged), "--output", str(out), "--reference-llm-pt", str(source / "llm.pt"), "--check"]
    assert run_script("convert_hf_to_cosyvoice2", argv) == 0
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

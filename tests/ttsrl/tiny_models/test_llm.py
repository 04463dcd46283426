"""ttsrl.tiny_models.llm and scripts/make_tiny_cosyvoice2.py (LLM part): the tiny CosyVoice2 and CosyVoice3
LLMs have the real layouts (CosyVoice3's is also loaded strictly into the pinned CosyVoice3LM by
tests/ttsrl/policy/test_hf_conversion_cosyvoice3.py)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from tests.cli import run_script
from ttsrl.model_family import COSYVOICE3, COSYVOICE3_TEXT_SPECIAL_TOKENS, family_of_llm_state_dict
from ttsrl.policy.hf_conversion import BLANK_EN, COSYVOICE2_TEXT_SPECIAL_TOKENS, SPEECH_ROWS
from ttsrl.tiny_models.llm import write_tiny_cosyvoice2, write_tiny_cosyvoice3

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


def test_cli_writes_the_same_model(tmp_path, capsys):
    assert run_script("make_tiny_cosyvoice2", ["--output-dir", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert "wrote tiny CosyVoice2 model to" in capsys.readouterr().out
    built = torch.load(tmp_path / "cli" / "llm.pt", weights_only=True)
    direct = torch.load(write_tiny_cosyvoice2(tmp_path / "direct", seed=3) / "llm.pt", weights_only=True)
    assert list(built) == list(direct) and all(torch.equal(built[k], direct[k]) for k in built)
    assert not list(tmp_path.glob(".cli.*"))  # no staging folder left behind


def test_tiny_cosyvoice3_has_cosyvoice3_layout(tmp_path):
    source = write_tiny_cosyvoice3(tmp_path / "tiny", seed=3)
    state = torch.load(source / "llm.pt", weights_only=True)
    assert family_of_llm_state_dict(state, source / "llm.pt") is COSYVOICE3
    assert state["speech_embedding.weight"].shape[0] == state["llm_decoder.weight"].shape[0] == 6761
    assert "llm_decoder.bias" not in state and "llm_embedding.weight" not in state
    assert state["llm.model.lm_head.weight"].data_ptr() == state["llm.model.model.embed_tokens.weight"].data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(str(source / BLANK_EN))
    config = json.loads((source / BLANK_EN / "config.json").read_text())
    assert config["vocab_size"] > len(tokenizer) + len(COSYVOICE3_TEXT_SPECIAL_TOKENS)  # room, and unreachable rows
    # Only eos of the 200 stop rows is full size, so generation stops as rarely as CosyVoice2's.
    norms = state["llm_decoder.weight"].norm(dim=1)
    quiet = [r for r in COSYVOICE3.stop_row_ids if r != 6562]
    assert float(norms[quiet].max()) < 0.2 * float(norms[:6561].min()) and float(norms[6562]) > float(norms[quiet].max())
    again = torch.load(write_tiny_cosyvoice3(tmp_path / "again", seed=3) / "llm.pt", weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_cli_writes_the_tiny_cosyvoice3(tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path / "cli"), "--seed", "3", "--model-family", "cosyvoice3"]
    assert run_script("make_tiny_cosyvoice2", argv) == 0
    assert "wrote tiny CosyVoice3 model to" in capsys.readouterr().out
    built = torch.load(tmp_path / "cli" / "llm.pt", weights_only=True)
    direct = torch.load(write_tiny_cosyvoice3(tmp_path / "direct", seed=3) / "llm.pt", weights_only=True)
    assert list(built) == list(direct) and all(torch.equal(built[k], direct[k]) for k in built)
    with pytest.raises(SystemExit) as exit_info:  # nothing asked for
        run_script("make_tiny_cosyvoice2", ["--seed", "3"])
    assert exit_info.value.code == 2 and "give --output-dir" in capsys.readouterr().err

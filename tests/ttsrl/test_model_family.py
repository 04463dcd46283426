"""ttsrl.model_family: the two families' facts (checked against the pinned upstream source where it
states them), detection from an llm.pt and a converted directory, and the wrong-family message."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest
import torch

from ttsrl.cosyvoice_source import find_cosyvoice_source
from ttsrl.model_family import (COSYVOICE2, COSYVOICE3, FAMILIES, HF_FAMILY_KEY, UnknownFamilyError, WrongFamilyError,
                                check_family, family_of_hf_dir, family_of_llm_state_dict, get_family)
from ttsrl.speech_tokens import added_tokens


def _upstream_special_tokens(class_name: str) -> list[str]:
    """``additional_special_tokens`` of an upstream frontend tokenizer class, read (not imported)
    from the pinned source: it is a literal in the class's ``__init__``."""
    tree = ast.parse((find_cosyvoice_source() / "cosyvoice" / "tokenizer" / "tokenizer.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    literal = next(n for n in ast.walk(cls) if isinstance(n, ast.Dict))
    return ast.literal_eval(literal)["additional_special_tokens"]


def _upstream_llm_source(class_name: str) -> str:
    text = (find_cosyvoice_source() / "cosyvoice" / "llm" / "llm.py").read_text()
    start = text.index(f"class {class_name}(")
    end = text.find("\nclass ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.mark.parametrize("family", [COSYVOICE2, COSYVOICE3], ids=lambda f: f.name)
def test_text_special_tokens_are_upstream_frontends(family):
    assert list(family.text_special_tokens) == _upstream_special_tokens(family.text_tokenizer)


def test_cosyvoice3_rows_as_the_pinned_class_defines_them():
    source = _upstream_llm_source("CosyVoice3LM")
    assert re.search(r"speech_token_size \+ 200", source) and "bias=False" in source
    assert "llm_embedding" not in source  # sos and task id are speech rows
    for name, offset in (("sos", 0), ("eos_token", 1), ("task_id", 2), ("fill_token", 3)):
        assert f"self.{name} = speech_token_size + {offset}" in source
        key = {"eos_token": "eos", "fill_token": "fill"}.get(name, name)
        assert COSYVOICE3.special_ids[key] == ("speech", 6561 + offset)
    assert COSYVOICE3.speech_rows == 6761 and COSYVOICE3.stop_row_ids == tuple(range(6561, 6761))
    # HF names: upstream TensorRT-LLM conversion's for the four special rows.
    assert COSYVOICE3.extra_row_tokens[:5] == ("<|sos|>", "<|eos1|>", "<|task_id|>", "<|fill|>", "<|s_6565|>")
    assert COSYVOICE3.extra_row_tokens[-1] == "<|s_6760|>" and not COSYVOICE3.llm_embedding_tokens
    assert len(COSYVOICE3.added_tokens()) == len(set(COSYVOICE3.added_tokens())) == COSYVOICE3.added_rows == 6761


def test_cosyvoice2_is_the_default_and_unchanged():
    assert get_family() is get_family("cosyvoice2") is get_family(COSYVOICE2) is COSYVOICE2
    assert COSYVOICE2.added_tokens() == added_tokens() and len(added_tokens()) == 6566
    assert COSYVOICE2.stop_row_ids == (6561, 6562, 6563) and COSYVOICE2.llm_decoder_bias
    assert COSYVOICE2.eos_token == COSYVOICE3.eos_token == "<|eos1|>"  # rows 6561 and 6562
    assert "self.stop_token_ids = [speech_token_size + i for i in range(3)]" in _upstream_llm_source("Qwen2LM")


def test_recipe_facts_per_family():
    assert (COSYVOICE2.speech_tokenizer_file, COSYVOICE3.speech_tokenizer_file) == (
        "speech_tokenizer_v2.onnx", "speech_tokenizer_v3.onnx")
    assert (COSYVOICE2.modelscope_id, COSYVOICE3.modelscope_id) == ("iic/CosyVoice2-0.5B",
                                                                    "FunAudioLLM/Fun-CosyVoice3-0.5B-2512")
    for family in FAMILIES.values():
        assert family.token2wav_engines == f"token2wav_server.engines_{family.name}:create_engines"
        assert family.llm_file == "llm.pt" and family.hyperparameters_file == f"{family.name}.yaml"
        assert family.pretrained_dir_name == family.modelscope_id.split("/")[-1]
    # Upstream's cosyvoice3 yaml builds the class this family converts.
    yaml = (find_cosyvoice_source() / "examples" / "libritts" / "cosyvoice3" / "conf" / "cosyvoice3.yaml").read_text()
    assert f"llm: !new:cosyvoice.llm.llm.{COSYVOICE3.upstream_llm_class}" in yaml


def test_unknown_family_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'cosyvoice1'.*cosyvoice2, cosyvoice3"):
        get_family("cosyvoice1")


def _llm_state(family, hidden=4):
    state = {"llm.model.model.embed_tokens.weight": torch.zeros(10, hidden),
             "speech_embedding.weight": torch.zeros(family.speech_rows, hidden),
             "llm_decoder.weight": torch.zeros(family.speech_rows, hidden)}
    if family.llm_decoder_bias:
        state["llm_decoder.bias"] = torch.zeros(family.speech_rows)
    if family.llm_embedding_tokens:
        state["llm_embedding.weight"] = torch.zeros(2, hidden)
    return state


@pytest.mark.parametrize("family", [COSYVOICE2, COSYVOICE3], ids=lambda f: f.name)
def test_family_of_llm_state_dict(family):
    assert family_of_llm_state_dict(_llm_state(family)) is family


def test_unrecognised_llm_state_dict_names_the_file_and_both_layouts():
    mixed = _llm_state(COSYVOICE3)
    mixed["llm_embedding.weight"] = torch.zeros(2, 4)  # CosyVoice3 rows with a CosyVoice2 key
    with pytest.raises(UnknownFamilyError) as error:
        family_of_llm_state_dict(mixed, "some/llm.pt")
    message = str(error.value)
    assert message.startswith("some/llm.pt:") and "6761" in message and "6564" in message
    assert "llm_embedding.weight" in message


def test_family_of_hf_dir_reads_the_record_and_old_dirs_are_cosyvoice2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "cosyvoice2": {}}))
    assert family_of_hf_dir(tmp_path) is COSYVOICE2  # converted before families existed
    (tmp_path / "config.json").write_text(json.dumps({HF_FAMILY_KEY: "cosyvoice3"}))
    assert family_of_hf_dir(tmp_path) is COSYVOICE3
    (tmp_path / "config.json").write_text(json.dumps({HF_FAMILY_KEY: "cosyvoice9"}))
    with pytest.raises(UnknownFamilyError, match="config.json.*cosyvoice9.*cosyvoice2, cosyvoice3"):
        family_of_hf_dir(tmp_path)
    with pytest.raises(UnknownFamilyError, match="no config.json"):
        family_of_hf_dir(tmp_path / "missing")


def test_check_family_names_both_families_and_the_path():
    assert check_family("cosyvoice3", COSYVOICE3, "x") is COSYVOICE3
    with pytest.raises(WrongFamilyError) as error:
        check_family("cosyvoice3", "cosyvoice2", "exp/pretrained/CosyVoice2-0.5B/llm.pt")
    assert str(error.value) == (
        "exp/pretrained/CosyVoice2-0.5B/llm.pt is a cosyvoice2 llm.pt but model_family=cosyvoice3; point "
        "cosyvoice3_dir at a Fun-CosyVoice3-0.5B-2512 download (or a conversion of one) or set model_family=cosyvoice2")


def test_import_is_standard_library_only():
    code = ("import sys, ttsrl.model_family; heavy = [m for m in ('torch', 'numpy', 'transformers') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_prints_one_fact(capsys):
    from ttsrl.model_family import main

    assert main(["cosyvoice3", "modelscope_id"]) == 0
    assert capsys.readouterr().out == "FunAudioLLM/Fun-CosyVoice3-0.5B-2512\n"
    assert main(["cosyvoice2", "stop_tokens"]) == 0
    assert capsys.readouterr().out.split() == ["<|eos1|>", "<|eos2|>", "<|eos3|>"]
    with pytest.raises(SystemExit) as exit_info:
        main(["cosyvoice3", "added_tokens"])  # a method, not a fact
    assert exit_info.value.code == 2 and "speech_tokenizer_file" in capsys.readouterr().err


def test_the_family_run_sh_exports_is_read_and_a_bad_name_named():
    from ttsrl.model_family import COSYVOICE2, COSYVOICE3, UnknownFamilyError, family_from_env
    from ttsrl.speech_tokens import parse_speech_tokens

    assert family_from_env({}) is COSYVOICE2
    assert family_from_env({"TTSRL_MODEL_FAMILY": "cosyvoice3"}) is COSYVOICE3
    # what the reward hook does with it: a CosyVoice3 stop row ends the response only under cosyvoice3
    response = "<|s_5|><|s_6|><|s_6600|><|s_7|>"
    assert parse_speech_tokens(response, family_from_env({"TTSRL_MODEL_FAMILY": "cosyvoice3"})).ids == [5, 6]
    assert not parse_speech_tokens(response, family_from_env({})).ended
    with pytest.raises(UnknownFamilyError, match="TTSRL_MODEL_FAMILY='cosyvoice9'"):
        family_from_env({"TTSRL_MODEL_FAMILY": "cosyvoice9"})

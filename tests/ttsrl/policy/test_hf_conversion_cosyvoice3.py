"""CosyVoice3 through ttsrl.policy.hf_conversion / llm_export and both conversion CLIs: the converted
model against the pinned upstream ``CosyVoice3LM`` (run in the server environment,
tests/ttsrl/policy/conversion_utils.py), the round trip, and the refusal of the other family."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli import run_script
from tests.ttsrl.policy.conversion_utils import (COSYVOICE3_STOP_ROW, PROMPT_SPEECH, TEXT, convert, hf_prompt_ids,
                                                 run_cosyvoice3_reference)
from ttsrl.chat_template import zero_shot_messages
from ttsrl.model_family import (COSYVOICE3, COSYVOICE3_SYSTEM_PREFIX, COSYVOICE3_TEXT_SPECIAL_TOKENS, HF_FAMILY_KEY,
                                family_of_hf_dir)
from ttsrl.policy.generation import TransformersGenerator
from ttsrl.policy.hf_conversion import REPORT_FILE
from ttsrl.policy.llm_export import export_hf_dir
from ttsrl.sampling import SamplingOptions
from ttsrl.speech_tokens import parse_speech_tokens
from ttsrl.tiny_models.llm import write_tiny_cosyvoice3

PROMPT_TEXT = "希望你以后做得比我还好。"
ROWS = COSYVOICE3.speech_rows
CASES = {"zero-shot": {"text": COSYVOICE3_SYSTEM_PREFIX + PROMPT_TEXT + TEXT, "speech": PROMPT_SPEECH},
         "plain": {"text": COSYVOICE3_SYSTEM_PREFIX + TEXT, "speech": []}}


@pytest.fixture(scope="module")
def cosyvoice3(tmp_path_factory):
    """(tiny CosyVoice3 directory whose llm.pt is the pinned CosyVoice3LM's state_dict(), its
    conversion by the CLI with the family detected, the pinned class's results)."""
    root = tmp_path_factory.mktemp("cosyvoice3")
    source = write_tiny_cosyvoice3(root / "Fun-CosyVoice3-0.5B", seed=0)
    reference = run_cosyvoice3_reference(source, root, list(CASES.values()))
    return source, convert(source, root / "hf"), reference


def _speech_offset(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|s_0|>")


def test_upstream_facts_match_the_family(cosyvoice3):
    _, _, reference = cosyvoice3
    assert reference["stop_token_ids"] == list(COSYVOICE3.stop_row_ids) == list(range(6561, 6761))
    assert {k: ("speech", v) for k, v in reference["special"].items()} == COSYVOICE3.special_ids
    assert reference["text_special_tokens"] == list(COSYVOICE3_TEXT_SPECIAL_TOKENS)


def test_records_the_family_and_its_stop_tokens(cosyvoice3):
    _, hf_dir, _ = cosyvoice3
    assert family_of_hf_dir(hf_dir) is COSYVOICE3
    config = json.loads((hf_dir / "config.json").read_text())
    report = json.loads((hf_dir / REPORT_FILE).read_text())
    assert config[HF_FAMILY_KEY] == report[HF_FAMILY_KEY] == "cosyvoice3"
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    stop_ids = tokenizer.convert_tokens_to_ids(list(COSYVOICE3.stop_tokens))
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == stop_ids == list(range(_speech_offset(tokenizer) + 6561,
                                                                _speech_offset(tokenizer) + 6761))
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|eos1|>")
    assert config["vocab_size"] == len(tokenizer) == _speech_offset(tokenizer) + ROWS
    assert "llm_decoder_bias_stats" not in report  # nothing dropped: CosyVoice3LM has no bias
    generator = TransformersGenerator(str(hf_dir), "cpu", SamplingOptions(greedy=True))
    assert generator.family is COSYVOICE3 and generator.end_ids == stop_ids


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_the_pinned_cosyvoice3lm(cosyvoice3, case):
    _, hf_dir, reference = cosyvoice3
    expected = reference["cases"][list(CASES).index(case)]
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    offset = _speech_offset(tokenizer)
    speech = CASES[case]["speech"]
    # The data row carries no system prefix; the CosyVoice3 chat template adds it.
    messages = zero_shot_messages(TEXT, PROMPT_TEXT if speech else "", speech)
    ids = hf_prompt_ids(tokenizer, messages[0]["content"], speech, style="cosyvoice3")
    sos, task = tokenizer.convert_tokens_to_ids(["<|sos|>", "<|task_id|>"])
    assert (sos, task) == (offset + 6561, offset + 6563)  # speech rows, as in CosyVoice3LM
    assert ids == [sos] + expected["text_ids"] + [task] + [offset + s for s in speech]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    assert expected["logits"].shape == (len(ids), ROWS)
    torch.testing.assert_close(logits[:, offset:offset + ROWS], expected["logits"], atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(logits[:, :offset]) == 0  # no text outputs


def test_greedy_generation_stops_where_cosyvoice3lm_stops(cosyvoice3):
    _, hf_dir, reference = cosyvoice3
    expected = reference["cases"][0]["greedy"]
    assert 1 <= len(expected) <= 4  # stopped at COSYVOICE3_STOP_ROW, not at max_steps
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    offset = _speech_offset(tokenizer)
    ids = hf_prompt_ids(tokenizer, PROMPT_TEXT + TEXT, PROMPT_SPEECH, style="cosyvoice3")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
    assert out == [offset + t for t in expected] + [offset + COSYVOICE3_STOP_ROW]
    text = tokenizer.decode(out, skip_special_tokens=True)
    assert text.endswith(f"<|s_{COSYVOICE3_STOP_ROW}|>")
    parsed = parse_speech_tokens(text, family="cosyvoice3")
    assert parsed.ids == expected and parsed.ended
    assert not parse_speech_tokens(text).ended  # CosyVoice2's parser would not see the end


def test_round_trip_reproduces_every_tensor(cosyvoice3, tmp_path):
    source, hf_dir, _ = cosyvoice3
    out = tmp_path / "llm.pt"
    argv = ["--hf-dir", str(hf_dir), "--output", str(out), "--reference-llm-pt", str(source / "llm.pt"), "--check",
            "--model-family", "cosyvoice3"]
    assert run_script("convert_hf_to_cosyvoice2", argv) == 0
    original = torch.load(source / "llm.pt", weights_only=True)
    exported = torch.load(out, weights_only=True)
    assert set(exported) == set(original) and "llm_embedding.weight" not in exported
    for key in original:
        assert exported[key].dtype == original[key].dtype, key
        assert torch.equal(exported[key], original[key]), key
    assert exported["llm.model.lm_head.weight"].data_ptr() == exported["llm.model.model.embed_tokens.weight"].data_ptr()
    # Without the reference: the layout config.json records, same keys and shapes.
    alone, _, _ = export_hf_dir(hf_dir)
    assert {k: v.shape for k, v in alone.items()} == {k: v.shape for k, v in original.items()}
    assert torch.equal(alone["speech_embedding.weight"], original["speech_embedding.weight"])


def test_wrong_family_is_refused_both_ways(cosyvoice3, biased, tmp_path, capsys):
    source3, hf3, _ = cosyvoice3
    source2, hf2 = biased
    cases = [
        ("convert_cosyvoice2_to_hf", ["--cosyvoice2-dir", str(source2), "--output-dir", str(tmp_path / "a"),
                                      "--model-family", "cosyvoice3"], source2 / "llm.pt"),
        ("convert_cosyvoice2_to_hf", ["--cosyvoice3-dir", str(source3), "--output-dir", str(tmp_path / "b"),
                                      "--model-family", "cosyvoice2"], source3 / "llm.pt"),
        ("convert_hf_to_cosyvoice2", ["--hf-dir", str(hf2), "--output", str(tmp_path / "c.pt"),
                                      "--model-family", "cosyvoice3"], hf2),
        ("convert_hf_to_cosyvoice2", ["--hf-dir", str(hf3), "--output", str(tmp_path / "d.pt"),
                                      "--model-family", "cosyvoice2"], hf3),
        ("convert_hf_to_cosyvoice2", ["--hf-dir", str(hf3), "--output", str(tmp_path / "e.pt"),
                                      "--reference-llm-pt", str(source2 / "llm.pt")], source2 / "llm.pt"),
    ]
    for script, argv, named in cases:
        capsys.readouterr()
        assert run_script(script, argv) == 2, argv
        err = capsys.readouterr().err
        assert "cosyvoice2" in err and "cosyvoice3" in err and str(named) in err, err
        assert "model_family=" in err, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_measure_is_refused_for_cosyvoice3(cosyvoice3, tmp_path, capsys):
    source, _, _ = cosyvoice3
    argv = ["--cosyvoice3-dir", str(source), "--output-dir", str(tmp_path / "hf"), "--measure"]
    assert run_script("convert_cosyvoice2_to_hf", argv) == 2
    assert "no" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_chat_template_keeps_a_given_endofprompt(cosyvoice3):
    """An instruct text that brings its own ``<|endofprompt|>`` gets no second system prefix."""
    _, hf_dir, _ = cosyvoice3
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    instruct = "You are a helpful assistant. 请用广东话表达。<|endofprompt|>" + TEXT
    prompt = tokenizer.apply_chat_template(zero_shot_messages(instruct), tokenize=False)
    assert prompt == "<|sos|>" + instruct + "<|task_id|>"
    assert tokenizer.apply_chat_template(zero_shot_messages(TEXT), tokenize=False) == (
        "<|sos|>" + COSYVOICE3_SYSTEM_PREFIX + TEXT + "<|task_id|>")

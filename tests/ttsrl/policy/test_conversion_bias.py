"""ttsrl.policy.conversion_bias: what dropping llm_decoder.bias and the zero non-speech logits change."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.ttsrl.policy.conversion_utils import PROMPT_SPEECH, TEXT, hf_prompt_ids
from ttsrl.policy.conversion_bias import bias_effect
from ttsrl.policy.hf_conversion import SPEECH_ROWS

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

"""Fixtures of the conversion tests: tiny CosyVoice2 models converted by the real CLI, built once
per session (the tests only read them)."""
from __future__ import annotations

import pytest
import torch

from tests.ttsrl.policy.conversion_utils import EOS, TEXT, CosyVoice2Reference, convert
from ttsrl.policy.hf_conversion import BLANK_EN
from ttsrl.speech_tokens import SPEECH_VOCAB_SIZE
from ttsrl.tiny_models.llm import write_tiny_cosyvoice2


@pytest.fixture(scope="session")
def biased(tmp_path_factory):
    """Tiny CosyVoice2 with a realistic llm_decoder bias, converted."""
    root = tmp_path_factory.mktemp("biased")
    source = write_tiny_cosyvoice2(root / "cosyvoice2", seed=0, bias_std=0.5)
    hf_dir = convert(source, root / "hf")
    return source, hf_dir


@pytest.fixture(scope="session")
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

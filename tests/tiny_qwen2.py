"""A tiny Qwen2 causal LM in Hugging Face layout whose tokenizer carries the speech tokens.

Stands in for the converted CosyVoice2 LLM (``hf_model_dir``) in CPU tests: same
architecture class, same added tokens (``ttsrl.speech_tokens.added_tokens()``),
random weights, a few hundred thousand parameters.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from tests.tokenizer_utils import tiny_tokenizer
from ttsrl.speech_tokens import SPEECH_END_TOKENS, added_tokens


def build_tiny_qwen2(model_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2ForCausalLM + tokenizer with the speech tokens to ``model_dir``."""
    model_dir = Path(model_dir)
    tokenizer = tiny_tokenizer()
    # Plain (non-special) added tokens: veRL decodes responses with
    # skip_special_tokens=True, which must keep the speech tokens.
    tokenizer.add_tokens([t for t in added_tokens() if t not in tokenizer.get_vocab()])
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=tokenizer.convert_tokens_to_ids(SPEECH_END_TOKENS[0]),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir

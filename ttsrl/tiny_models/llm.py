"""A tiny, randomly initialised CosyVoice2-0.5B- or Fun-CosyVoice3-0.5B-shaped LLM directory (both environments).

Real CosyVoice2 weights cannot be downloaded on CI machines, so tests and CPU
smoke runs of the recipe use this stand-in. It has the layout the LLM side of
the recipe reads from ``$cosyvoice2_dir``:

    DIR/llm.pt                           state dict in CosyVoice2's key layout
    DIR/CosyVoice-BlankEN/config.json    Qwen2 config (tiny sizes)
    DIR/CosyVoice-BlankEN/vocab.json     byte-level BPE vocabulary ...
    DIR/CosyVoice-BlankEN/merges.txt     ... and merges, built with `tokenizers`
    DIR/CosyVoice-BlankEN/tokenizer_config.json

``llm.pt`` holds exactly the tensors of CosyVoice2's ``Qwen2LM`` with a
``Qwen2Encoder`` backbone: ``llm.model.model.*`` (the Qwen2 backbone),
``llm.model.lm_head.weight`` (tied to the token embedding, as in Qwen2-0.5B),
``speech_embedding.weight`` and ``llm_decoder.weight/bias`` (6561 + 3 rows) and
``llm_embedding.weight`` (2 rows: sos, task id). The flow/HiFT parts of a real
CosyVoice2 directory are not written: ``ttsrl.tiny_models.cosyvoice2`` adds them.

``write_tiny_cosyvoice3`` writes the same directory in CosyVoice3's layout
(``ttsrl.model_family.COSYVOICE3``, upstream ``CosyVoice3LM``): ``speech_embedding.weight`` and
``llm_decoder.weight`` of 6561 + 200 rows, no ``llm_decoder.bias``, no ``llm_embedding``, and
room in the Qwen2 embedding for CosyVoice3's 280 special text tokens. Of its 200 stop rows only
eos (6562) gets a full-size decoder row, like a trained model, whose other stop rows are never
targets; the rest get small rows, so generation stops about as rarely as CosyVoice2's.

The tokenizer encodes every CJK unified ideograph (U+4E00..U+9FFF), CJK
punctuation and full-width forms as one token each, and any other text as
UTF-8 bytes, like Qwen2's. Like the real Qwen2 embedding, the config's
``vocab_size`` is larger than the tokenizer, so some embedding rows are never
reached by any token id.

Only torch, tokenizers, the standard library and ttsrl are imported (no transformers),
so building takes about two seconds. The CLI is
``scripts/make_tiny_cosyvoice2.py --output-dir DIR --seed 0`` (``--model-family cosyvoice3``:
``write_tiny_cosyvoice3``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tokenizers import models

from ttsrl.atomic_write import atomic_dir
from ttsrl.model_family import COSYVOICE2, COSYVOICE3, ModelFamily, get_family
from ttsrl.policy.hf_conversion import BLANK_EN, LLM_PT

QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""The special tokens a Qwen2 base tokenizer carries right after its BPE vocabulary."""

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3000, 0x303F), (0xFF00, 0xFFEF))


def _bytes_to_symbols() -> dict[int, str]:
    """Byte -> printable character map of byte-level BPE (the GPT-2 convention).

    Printable Latin-1 bytes stand for themselves; the others are shifted to
    code points from 256 up, so every byte has a visible one-character symbol.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def build_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE where each CJK character is one token."""
    symbols = _bytes_to_symbols()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[symbols[b]] = len(vocab)
    merges: list[tuple[str, str]] = []
    # Two-byte prefixes first (lower merge rank), then the full characters.
    prefixes: dict[str, tuple[str, str]] = {}
    characters: list[tuple[str, str]] = []
    for low, high in _CJK_RANGES:
        for code in range(low, high + 1):
            encoded = [symbols[b] for b in chr(code).encode("utf-8")]
            if len(encoded) != 3:
                continue
            prefix = encoded[0] + encoded[1]
            prefixes.setdefault(prefix, (encoded[0], encoded[1]))
            characters.append((prefix, encoded[2]))
    for prefix, pair in prefixes.items():
        vocab[prefix] = len(vocab)
        merges.append(pair)
    for prefix, last in characters:
        vocab[prefix + last] = len(vocab)
        merges.append((prefix, last))
    return vocab, merges


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def tiny_qwen2_config(vocab_size: int, special_ids: dict[str, int]) -> dict:
    """A Qwen2 config.json with tiny sizes (the real one: hidden 896, 24 layers)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|endoftext|>"],
        "hidden_act": "silu",
        # head_dim 32 (64 / 2 heads): the smallest head size vLLM's CPU attention supports, so the
        # tiny model also runs real GRPO rollouts on CPU
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "max_window_layers": 2,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def random_llm_state_dict(config: dict, generator: torch.Generator, logit_std: float = 4.0,
                          bias_std: float = 0.5, family: str | ModelFamily | None = None) -> dict[str, torch.Tensor]:
    """Random tensors in the ``llm.pt`` key layout of ``family`` (default CosyVoice2) for ``config``.

    Scales are chosen so the tiny model behaves like a trained one where it
    matters for the tests: every layer changes the hidden state noticeably, and
    the speech logits (``llm_decoder``) have a spread of about ``logit_std``
    nats, which gives peaked next-token distributions. ``bias_std`` sets the
    spread of ``llm_decoder.bias`` (families that have one). CosyVoice2's tensors are drawn in
    the same order as before families existed, so a seed gives the same model.
    """
    family = get_family(family)
    rows = family.speech_rows
    d = config["hidden_size"]
    inner = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    head_dim = d // heads
    vocab = config["vocab_size"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    def norm_weight():
        return 0.5 + torch.rand(d, generator=generator)

    proj_std = 1.0 / math.sqrt(d)
    state: dict[str, torch.Tensor] = {}
    embed = normal(vocab, d, std=1.0)
    state["llm.model.model.embed_tokens.weight"] = embed
    for i in range(config["num_hidden_layers"]):
        p = f"llm.model.model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, d, std=proj_std)
        state[p + "self_attn.q_proj.bias"] = normal(heads * head_dim, std=0.1)
        state[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, d, std=proj_std)
        state[p + "self_attn.k_proj.bias"] = normal(kv_heads * head_dim, std=0.1)
        state[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, d, std=proj_std)
        state[p + "self_attn.v_proj.bias"] = normal(kv_heads * head_dim, std=0.1)
        state[p + "self_attn.o_proj.weight"] = normal(d, heads * head_dim, std=proj_std)
        state[p + "mlp.gate_proj.weight"] = normal(inner, d, std=proj_std)
        state[p + "mlp.up_proj.weight"] = normal(inner, d, std=proj_std)
        state[p + "mlp.down_proj.weight"] = normal(d, inner, std=1.0 / math.sqrt(inner))
        state[p + "input_layernorm.weight"] = norm_weight()
        state[p + "post_attention_layernorm.weight"] = norm_weight()
    state["llm.model.model.norm.weight"] = norm_weight()
    # Qwen2-0.5B ties lm_head to the embedding; state_dict() lists both names.
    state["llm.model.lm_head.weight"] = embed
    state["speech_embedding.weight"] = normal(rows, d, std=1.0)
    state["llm_decoder.weight"] = normal(rows, d, std=logit_std / math.sqrt(d))
    if family.llm_decoder_bias:
        state["llm_decoder.bias"] = normal(rows, std=bias_std)
    if family.llm_embedding_tokens:
        state["llm_embedding.weight"] = normal(len(family.llm_embedding_tokens), d, std=1.0)
    if family is not COSYVOICE2:
        # Stop rows other than eos are never training targets of the real model: small outputs.
        eos = family.special_ids["eos"][1]
        quiet = [r for r in family.stop_row_ids if r != eos]
        state["llm_decoder.weight"][quiet] *= 0.1
    return state


def write_tiny_llm_files(directory: Path, seed: int = 0, logit_std: float = 4.0, bias_std: float = 0.5,
                         family: str | ModelFamily | None = None) -> None:
    """Write ``llm.pt`` and ``CosyVoice-BlankEN/`` of ``family`` (default CosyVoice2) into the
    existing ``directory``."""
    family = get_family(family)
    blank = directory / BLANK_EN
    blank.mkdir()
    vocab, merges = build_bpe_vocab()
    models.BPE(vocab=vocab, merges=merges).save(str(blank))  # vocab.json, merges.txt
    special_ids = {token: len(vocab) + i for i, token in enumerate(QWEN2_SPECIAL_TOKENS)}
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
            for token, index in special_ids.items()
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 32768,
        "split_special_tokens": False,
    }
    (blank / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    # Leave room for CosyVoice2's extra special text tokens plus unreachable
    # rows, as Qwen2-0.5B does (151936 rows for a 151646-token tokenizer).
    # (CosyVoice2's 19 fit in the 32; CosyVoice3 adds its 280.)
    room = 32 if family is COSYVOICE2 else 32 + len(family.text_special_tokens)
    vocab_size = _round_up(len(vocab) + len(QWEN2_SPECIAL_TOKENS) + room, 128) + 128
    config = tiny_qwen2_config(vocab_size, special_ids)
    (blank / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    state = random_llm_state_dict(config, generator, logit_std=logit_std, bias_std=bias_std, family=family)
    torch.save(state, directory / LLM_PT)


def write_tiny_cosyvoice3(output_dir: str | Path, seed: int = 0, logit_std: float = 4.0) -> Path:
    """Write the tiny CosyVoice3 directory (LLM side) to ``output_dir`` (replaced if present), atomically."""
    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
        write_tiny_llm_files(tmp, seed=seed, logit_std=logit_std, family=COSYVOICE3)
    return output_dir


def write_tiny_cosyvoice2(output_dir: str | Path, seed: int = 0, logit_std: float = 4.0,
                          bias_std: float = 0.5) -> Path:
    """Write the tiny CosyVoice2 directory to ``output_dir`` (replaced if present), atomically."""
    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
        write_tiny_llm_files(tmp, seed=seed, logit_std=logit_std, bias_std=bias_std)
    return output_dir

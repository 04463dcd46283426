"""CosyVoice2 LLM (``llm.pt`` + ``CosyVoice-BlankEN/``) -> Hugging Face Qwen2ForCausalLM.

torch and transformers only (trainer environment; the server environment imports the layout
constants for the tiny-model builders). The way back is ``ttsrl.policy.llm_export``; what the
dropped bias changes is measured by ``ttsrl.policy.conversion_bias``.

CosyVoice2's LLM (``llm.pt``) is a Qwen2 backbone fed with input embeddings
that it assembles itself:

    [llm_embedding[0] (sos)] + Qwen2 text embeddings + [llm_embedding[1] (task id)]
    + speech_embedding[prompt speech tokens]

and read out through its own ``llm_decoder`` (a Linear with bias, 6561 speech
tokens + 3 end tokens) applied to the backbone's final, normed hidden state.

The Hugging Face form is a plain ``Qwen2ForCausalLM`` that vLLM and veRL load
unmodified. The text vocabulary of CosyVoice2's own text tokenizer (the Qwen2
tokenizer of ``CosyVoice-BlankEN`` plus the special text tokens CosyVoice2's
frontend adds, ``COSYVOICE2_TEXT_SPECIAL_TOKENS``) keeps its ids; after it come
``ttsrl.speech_tokens.added_tokens()``, in that order: ``<|s_0|>``..``<|s_6560|>``,
``<|eos1|>``..``<|eos3|>``, ``<|sos|>``, ``<|task_id|>``. Their embedding rows
are ``speech_embedding`` and ``llm_embedding``; their ``lm_head`` rows are
``llm_decoder.weight``. The vocabulary ends with ``<|task_id|>``: it is not
padded (the reference pads to a multiple of 128), so every id the model can
sample is a token the tokenizer knows.

What cannot be carried over exactly (see docs/conversion.md for the numbers):

* ``llm_decoder.bias``: transformers' Qwen2 ``lm_head`` has no bias, and no
  bias-free weights reproduce it (the backbone ends in an RMSNorm, so there is
  no constant feature to fold it into). The Hugging Face model is the bias-free
  policy; ``conversion_bias.bias_effect`` measures the difference. The export writes a zero
  ``llm_decoder.bias``, so the exported ``llm.pt`` reproduces the Hugging Face
  policy exactly in CosyVoice2.
* Text rows of ``lm_head`` (and ``<|sos|>``, ``<|task_id|>``): CosyVoice2
  has no text outputs. They get zero weights, i.e. a logit of exactly 0 whatever
  the input, so non-speech tokens share ``N / (N + sum_s exp(logit_s))`` of the
  probability (N of them). ``bias_effect`` reports it.
* Embedding rows between the text tokenizer's size and Qwen2's 151936 rows are
  reached by no token id; the HF model stores speech rows there. The export
  restores them from the original ``llm.pt`` when given one, else zeros.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ttsrl.atomic_write import atomic_dir, write_json
from ttsrl.chat_template import COSYVOICE2_TEMPLATE
from ttsrl.speech_tokens import SOS_TOKEN, SPEECH_END_TOKENS, SPEECH_VOCAB_SIZE, added_tokens, speech_token

BLANK_EN = "CosyVoice-BlankEN"
LLM_PT = "llm.pt"

COSYVOICE2_TEXT_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
)
"""Special text tokens CosyVoice2's frontend adds to the Qwen2 tokenizer, in its order.

They (with ``<|endoftext|>`` as eos and pad) make its text ids; ids of tokens
not already in the tokenizer follow its vocabulary in this order.
"""
TEXT_EOS = "<|endoftext|>"

SPEECH_ROWS = SPEECH_VOCAB_SIZE + len(SPEECH_END_TOKENS)
"""Rows of ``speech_embedding`` and outputs of ``llm_decoder`` (6561 + 3)."""
ADDED_ROWS = len(added_tokens())
TOP_P = 0.8
TOP_K = 25
"""CosyVoice2's sampling defaults (its repetition-aware sampling around top-p/top-k)."""

REPORT_FILE = "cosyvoice2_conversion.json"
"""Written last into a converted directory; its presence marks the conversion complete."""
CONFIG_KEY = "cosyvoice2"
"""config.json entry recording the layout, so the export needs nothing else."""

BACKBONE = "llm.model.model."
"""Key prefix of the Qwen2 backbone in ``llm.pt``."""
QWEN_LM_HEAD = "llm.model.lm_head.weight"
COSYVOICE_KEYS = ("speech_embedding.weight", "llm_decoder.weight", "llm_decoder.bias", "llm_embedding.weight")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file and the problem."""


# --------------------------------------------------------------------------------------
# Loading the CosyVoice2 side


def load_llm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CosyVoice2 ``llm.pt`` and check its key layout."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (expected CosyVoice2's llm.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(state).__name__}")
    missing = [k for k in COSYVOICE_KEYS + (BACKBONE + "embed_tokens.weight",) if k not in state]
    if missing:
        raise ConversionError(f"{path}: not a CosyVoice2 llm.pt, missing keys {missing}")
    unknown = [k for k in state if not k.startswith("llm.model.") and k not in COSYVOICE_KEYS]
    if unknown:
        raise ConversionError(f"{path}: unexpected keys {unknown[:5]} (a CosyVoice 1/3 checkpoint?)")
    hidden = state[BACKBONE + "embed_tokens.weight"].shape[1]
    expected = {"speech_embedding.weight": (SPEECH_ROWS, hidden), "llm_decoder.weight": (SPEECH_ROWS, hidden),
                "llm_decoder.bias": (SPEECH_ROWS,), "llm_embedding.weight": (2, hidden)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
    return state


def load_text_tokenizer(blank_en_dir: str | Path):
    """CosyVoice2's text tokenizer: the Qwen2 tokenizer plus its special text tokens."""
    from transformers import AutoTokenizer

    blank_en_dir = Path(blank_en_dir)
    if not (blank_en_dir / "tokenizer_config.json").is_file():
        raise ConversionError(f"{blank_en_dir}: no tokenizer_config.json (expected CosyVoice2's {BLANK_EN}/)")
    tokenizer = AutoTokenizer.from_pretrained(str(blank_en_dir))
    vocab = tokenizer.get_vocab()
    first_new = len(tokenizer)
    new_tokens = [t for t in COSYVOICE2_TEXT_SPECIAL_TOKENS if t not in vocab]
    tokenizer.add_special_tokens({"eos_token": TEXT_EOS, "pad_token": TEXT_EOS,
                                  "additional_special_tokens": list(COSYVOICE2_TEXT_SPECIAL_TOKENS)})
    got = tokenizer.convert_tokens_to_ids(new_tokens)
    if got != list(range(first_new, first_new + len(new_tokens))):
        raise ConversionError(f"{blank_en_dir}: special text tokens got ids {got}, expected consecutive ids "
                              f"from {first_new} (CosyVoice2's frontend order)")
    return tokenizer


def add_speech_tokens(text_tokenizer):
    """Append the speech tokens to ``text_tokenizer`` (in place); returns the first speech id.

    They are plain added tokens, not special ones: veRL decodes responses with
    ``skip_special_tokens=True`` and the reward must still see them.
    """
    offset = len(text_tokenizer)
    text_tokenizer.add_tokens(added_tokens())
    if text_tokenizer.convert_tokens_to_ids(added_tokens()) != list(range(offset, offset + ADDED_ROWS)):
        raise ConversionError("speech tokens did not get consecutive ids after the text vocabulary "
                              "(is one of them already in the tokenizer?)")
    text_tokenizer.chat_template = COSYVOICE2_TEMPLATE
    return offset


def speech_token_offset(tokenizer) -> int:
    """Id of ``<|s_0|>`` in a converted tokenizer, checking the whole added block."""
    offset = tokenizer.convert_tokens_to_ids(speech_token(0))
    ids = tokenizer.convert_tokens_to_ids(added_tokens())
    if offset is None or ids != list(range(offset, offset + ADDED_ROWS)):
        raise ConversionError("tokenizer does not hold the speech tokens as one consecutive block "
                              f"({speech_token(0)}..{SOS_TOKEN}, <|task_id|>); not a converted CosyVoice2 LLM")
    return offset


# --------------------------------------------------------------------------------------
# CosyVoice2 -> Hugging Face


def hf_vocab_size(offset: int) -> int:
    """Rows of the Hugging Face embedding and lm_head: text vocabulary + added tokens.

    No padding rows: a padding row would have logit 0 like the text rows, and
    vLLM could then sample an id the tokenizer cannot decode.
    """
    return offset + ADDED_ROWS


def hf_state_dict_from_llm(llm_state: dict[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    """Hugging Face ``Qwen2ForCausalLM`` tensors for a CosyVoice2 ``llm.pt``.

    ``offset``: size of CosyVoice2's text vocabulary (= id of ``<|s_0|>``).
    """
    embed = llm_state[BACKBONE + "embed_tokens.weight"]
    qwen_rows, hidden = embed.shape
    if offset > qwen_rows:
        raise ConversionError(f"text tokenizer has {offset} tokens but the Qwen2 embedding only {qwen_rows} rows")
    vocab = hf_vocab_size(offset)
    dtype = embed.dtype
    new_embed = torch.zeros(vocab, hidden, dtype=dtype)
    new_embed[:offset] = embed[:offset]
    new_embed[offset:offset + SPEECH_ROWS] = llm_state["speech_embedding.weight"]
    new_embed[offset + SPEECH_ROWS:offset + ADDED_ROWS] = llm_state["llm_embedding.weight"]
    lm_head = torch.zeros(vocab, hidden, dtype=dtype)
    lm_head[offset:offset + SPEECH_ROWS] = llm_state["llm_decoder.weight"]
    hf_state = {}
    for key, tensor in llm_state.items():
        if key.startswith(BACKBONE) and key != BACKBONE + "embed_tokens.weight":
            hf_state["model." + key[len(BACKBONE):]] = tensor.clone()
    hf_state["model.embed_tokens.weight"] = new_embed
    hf_state["lm_head.weight"] = lm_head
    return hf_state


def llm_bias_bound(bias: torch.Tensor) -> float:
    """Largest change of any speech log-probability that dropping ``bias`` can cause.

    log p changes by ``-b_i + LSE(l) - LSE(l - b)``, which lies within
    ``[-(max b - min b), max b - min b]`` for every input; KL is bounded by it too.
    """
    return float(bias.max() - bias.min())


@dataclass
class Converted:
    """An in-memory conversion: what ``save_converted`` writes."""

    state: dict[str, torch.Tensor]
    config: object
    generation_config: object
    tokenizer: object
    report: dict = field(default_factory=dict)


def convert_cosyvoice2(cosyvoice2_dir: str | Path, dtype: torch.dtype = torch.float32) -> Converted:
    """Build the Hugging Face model (tensors, config, generation config, tokenizer)."""
    from transformers import AutoConfig, GenerationConfig

    cosyvoice2_dir = Path(cosyvoice2_dir)
    blank = cosyvoice2_dir / BLANK_EN
    llm_state = load_llm_state_dict(cosyvoice2_dir / LLM_PT)
    tokenizer = load_text_tokenizer(blank)
    offset = add_speech_tokens(tokenizer)
    config = AutoConfig.from_pretrained(str(blank))
    if config.model_type != "qwen2":
        raise ConversionError(f"{blank}/config.json: model_type {config.model_type!r}, expected 'qwen2'")
    embed = llm_state[BACKBONE + "embed_tokens.weight"]
    if tuple(embed.shape) != (config.vocab_size, config.hidden_size):
        raise ConversionError(f"{cosyvoice2_dir / LLM_PT}: embedding {tuple(embed.shape)} does not match "
                              f"{blank}/config.json (vocab {config.vocab_size}, hidden {config.hidden_size})")
    state = {k: v.to(dtype) for k, v in hf_state_dict_from_llm(llm_state, offset).items()}
    end_ids = [offset + SPEECH_VOCAB_SIZE + i for i in range(len(SPEECH_END_TOKENS))]
    text_eos_id = tokenizer.convert_tokens_to_ids(TEXT_EOS)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if QWEN_LM_HEAD in llm_state:
        tied = tied or torch.equal(llm_state[QWEN_LM_HEAD], embed)
    bias = llm_state["llm_decoder.bias"].float()
    layout = {
        "speech_token_offset": offset,
        "qwen2_vocab_size": int(config.vocab_size),
        "qwen2_tie_word_embeddings": tied,
        "llm_decoder_bias": "dropped (transformers' Qwen2 lm_head has no bias); export writes zeros",
    }
    config.vocab_size = hf_vocab_size(offset)
    config.tie_word_embeddings = False
    config.eos_token_id = end_ids[0]
    config.pad_token_id = text_eos_id
    config.dtype = dtype
    setattr(config, CONFIG_KEY, layout)
    generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=end_ids, pad_token_id=text_eos_id,
        do_sample=True, temperature=1.0, top_p=TOP_P, top_k=TOP_K,
    )
    report = {
        "source": str(cosyvoice2_dir.resolve()),
        "llm_pt_bytes": (cosyvoice2_dir / LLM_PT).stat().st_size,
        "dtype": str(dtype).replace("torch.", ""),
        "vocab_size": config.vocab_size,
        **layout,
        "speech_end_token_ids": end_ids,
        "llm_decoder_bias_stats": {
            "mean": float(bias.mean()), "std": float(bias.std()), "min": float(bias.min()),
            "max": float(bias.max()), "eos1": float(bias[SPEECH_VOCAB_SIZE]),
            "max_abs_logprob_change_bound": llm_bias_bound(bias),
        },
    }
    return Converted(state=state, config=config, generation_config=generation_config, tokenizer=tokenizer,
                     report=report)


def is_complete(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a finished conversion (its report is written last)."""
    output_dir = Path(output_dir)
    return (output_dir / REPORT_FILE).is_file() and (output_dir / "config.json").is_file()


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse to replace a non-empty directory that is not a finished conversion."""
    output_dir = Path(output_dir)
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir()) and not is_complete(output_dir)):
        raise ConversionError(f"{output_dir} exists and holds no finished conversion ({REPORT_FILE}); "
                              "not replacing it: remove it or choose another output directory")


def save_converted(converted: Converted, output_dir: str | Path) -> Path:
    """Write ``converted`` as a Hugging Face model directory, atomically (the report last)."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    with atomic_dir(output_dir) as tmp:
        save_file({k: v.contiguous() for k, v in converted.state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        converted.config.save_pretrained(str(tmp))
        converted.generation_config.save_pretrained(str(tmp))
        converted.tokenizer.save_pretrained(str(tmp))
        write_json(tmp / REPORT_FILE, converted.report, indent=2)
    return output_dir

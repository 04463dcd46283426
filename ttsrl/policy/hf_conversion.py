"""CosyVoice2 or CosyVoice3 LLM (``llm.pt`` + ``CosyVoice-BlankEN/``) -> Hugging Face Qwen2ForCausalLM.

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

CosyVoice3 (``ttsrl.model_family.COSYVOICE3``, upstream ``CosyVoice3LM``) is converted the same
way with its own rows: the input is ``speech_embedding[6561]`` (sos) + text embeddings +
``speech_embedding[6563]`` (task id) + prompt speech, its text tokenizer adds CosyVoice3's
special text tokens, and the added block is its 6761 speech rows (``<|s_0|>``..``<|s_6560|>``,
``<|sos|>``, ``<|eos1|>``, ``<|task_id|>``, ``<|fill|>``, ``<|s_6565|>``..``<|s_6760|>``; no
``llm_embedding``). Its ``llm_decoder`` has no bias, so its speech logits are carried over
exactly. The family is detected from the ``llm.pt`` (or checked against the one asked for) and
recorded in config.json (``ttsrl.model_family.HF_FAMILY_KEY``) and the report.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ttsrl.atomic_write import atomic_dir, write_json
from ttsrl.chat_template import family_template
from ttsrl.model_family import (COSYVOICE2, HF_FAMILY_KEY, ModelFamily, UnknownFamilyError, check_family,
                                family_of_llm_state_dict, get_family)
from ttsrl.speech_tokens import speech_token

BLANK_EN = "CosyVoice-BlankEN"
LLM_PT = "llm.pt"

COSYVOICE2_TEXT_SPECIAL_TOKENS = COSYVOICE2.text_special_tokens
"""CosyVoice2's special text tokens (their home, with CosyVoice3's: ``ttsrl.model_family``)."""
TEXT_EOS = "<|endoftext|>"

SPEECH_ROWS = COSYVOICE2.speech_rows
"""Rows of CosyVoice2's ``speech_embedding`` and outputs of its ``llm_decoder`` (6561 + 3;
any family: ``ModelFamily.speech_rows``)."""
ADDED_ROWS = COSYVOICE2.added_rows
TOP_P = 0.8
TOP_K = 25
"""CosyVoice2's and CosyVoice3's sampling defaults (their yaml's repetition-aware sampling around top-p/top-k)."""

REPORT_FILE = "cosyvoice2_conversion.json"
"""Written last into a converted directory; its presence marks the conversion complete."""
CONFIG_KEY = COSYVOICE2.name
"""config.json entry recording CosyVoice2's layout, so the export needs nothing else (any family:
``layout_key(family)``)."""

BACKBONE = "llm.model.model."
"""Key prefix of the Qwen2 backbone in ``llm.pt``."""
QWEN_LM_HEAD = "llm.model.lm_head.weight"
COSYVOICE_KEYS = COSYVOICE2.llm_pt_keys

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file and the problem."""


def layout_key(family: str | ModelFamily | None = None) -> str:
    """config.json entry of the converted layout of ``family`` (its name)."""
    return get_family(family).name


# --------------------------------------------------------------------------------------
# Loading the upstream side (either family)


def load_llm_state_dict(path: str | Path, family: str | ModelFamily | None = None) -> dict[str, torch.Tensor]:
    """Read a CosyVoice2 or CosyVoice3 ``llm.pt`` and check its key layout.

    ``family``: the family it must be (``WrongFamilyError`` when it is the other one); None
    accepts either (``family_of_llm_state_dict`` tells which)."""
    path = Path(path)
    wanted = get_family(family) if family is not None else None
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (expected {(wanted or COSYVOICE2).upstream_llm_class}'s llm.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(state).__name__}")
    if BACKBONE + "embed_tokens.weight" not in state:
        raise ConversionError(f"{path}: not a CosyVoice llm.pt, missing keys {[BACKBONE + 'embed_tokens.weight']}")
    try:
        found = family_of_llm_state_dict(state, path)
    except UnknownFamilyError as error:
        if wanted is not None:
            missing = [k for k in wanted.llm_pt_keys if k not in state]
            unknown = [k for k in state if not k.startswith("llm.model.") and k not in wanted.llm_pt_keys]
            raise ConversionError(f"{path}: not a {wanted.name} llm.pt: missing keys {missing}, unexpected keys "
                                  f"{unknown[:5]} ({error})") from None
        raise ConversionError(str(error)) from None
    if wanted is not None:
        check_family(wanted, found, path)
    hidden = state[BACKBONE + "embed_tokens.weight"].shape[1]
    expected = {"speech_embedding.weight": (found.speech_rows, hidden), "llm_decoder.weight": (found.speech_rows, hidden)}
    if found.llm_decoder_bias:
        expected["llm_decoder.bias"] = (found.speech_rows,)
    if found.llm_embedding_tokens:
        expected["llm_embedding.weight"] = (len(found.llm_embedding_tokens), hidden)
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
    return state


def load_text_tokenizer(blank_en_dir: str | Path, family: str | ModelFamily | None = None):
    """The family's text tokenizer (default CosyVoice2's): the Qwen2 tokenizer plus the special
    text tokens its frontend adds."""
    from transformers import AutoTokenizer

    family = get_family(family)
    blank_en_dir = Path(blank_en_dir)
    if not (blank_en_dir / "tokenizer_config.json").is_file():
        raise ConversionError(f"{blank_en_dir}: no tokenizer_config.json (expected {family.name}'s {BLANK_EN}/)")
    tokenizer = AutoTokenizer.from_pretrained(str(blank_en_dir))
    vocab = tokenizer.get_vocab()
    first_new = len(tokenizer)
    new_tokens = [t for t in family.text_special_tokens if t not in vocab]
    tokenizer.add_special_tokens({"eos_token": TEXT_EOS, "pad_token": TEXT_EOS,
                                  "additional_special_tokens": list(family.text_special_tokens)})
    got = tokenizer.convert_tokens_to_ids(new_tokens)
    if got != list(range(first_new, first_new + len(new_tokens))):
        raise ConversionError(f"{blank_en_dir}: special text tokens got ids {got}, expected consecutive ids "
                              f"from {first_new} ({family.text_tokenizer}'s order)")
    return tokenizer


def add_speech_tokens(text_tokenizer, family: str | ModelFamily | None = None):
    """Append the family's speech tokens to ``text_tokenizer`` (in place) and set its chat
    template; returns the first speech id.

    They are plain added tokens, not special ones: veRL decodes responses with
    ``skip_special_tokens=True`` and the reward must still see them.
    """
    family = get_family(family)
    offset = len(text_tokenizer)
    tokens = family.added_tokens()
    text_tokenizer.add_tokens(tokens)
    if text_tokenizer.convert_tokens_to_ids(tokens) != list(range(offset, offset + family.added_rows)):
        raise ConversionError("speech tokens did not get consecutive ids after the text vocabulary "
                              "(is one of them already in the tokenizer?)")
    text_tokenizer.chat_template = family_template(family)
    return offset


def speech_token_offset(tokenizer, family: str | ModelFamily | None = None) -> int:
    """Id of ``<|s_0|>`` in a converted tokenizer of ``family``, checking the whole added block."""
    family = get_family(family)
    tokens = family.added_tokens()
    offset = tokenizer.convert_tokens_to_ids(speech_token(0))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if offset is None or ids != list(range(offset, offset + family.added_rows)):
        raise ConversionError("tokenizer does not hold the speech tokens as one consecutive block "
                              f"({tokens[0]}..{tokens[-1]}); not a converted {family.name} LLM")
    return offset


# --------------------------------------------------------------------------------------
# CosyVoice2 / CosyVoice3 -> Hugging Face


def hf_vocab_size(offset: int, family: str | ModelFamily | None = None) -> int:
    """Rows of the Hugging Face embedding and lm_head: text vocabulary + added tokens.

    No padding rows: a padding row would have logit 0 like the text rows, and
    vLLM could then sample an id the tokenizer cannot decode.
    """
    return offset + get_family(family).added_rows


def hf_state_dict_from_llm(llm_state: dict[str, torch.Tensor], offset: int,
                           family: str | ModelFamily | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face ``Qwen2ForCausalLM`` tensors for a CosyVoice2 or CosyVoice3 ``llm.pt``.

    ``offset``: size of the family's text vocabulary (= id of ``<|s_0|>``). ``family``: None
    detects it from the keys.
    """
    family = get_family(family) if family is not None else family_of_llm_state_dict(llm_state)
    rows = family.speech_rows
    embed = llm_state[BACKBONE + "embed_tokens.weight"]
    qwen_rows, hidden = embed.shape
    if offset > qwen_rows:
        raise ConversionError(f"text tokenizer has {offset} tokens but the Qwen2 embedding only {qwen_rows} rows")
    vocab = hf_vocab_size(offset, family)
    dtype = embed.dtype
    new_embed = torch.zeros(vocab, hidden, dtype=dtype)
    new_embed[:offset] = embed[:offset]
    new_embed[offset:offset + rows] = llm_state["speech_embedding.weight"]
    if family.llm_embedding_tokens:
        new_embed[offset + rows:offset + family.added_rows] = llm_state["llm_embedding.weight"]
    lm_head = torch.zeros(vocab, hidden, dtype=dtype)
    lm_head[offset:offset + rows] = llm_state["llm_decoder.weight"]
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


def convert_cosyvoice2(cosyvoice2_dir: str | Path, dtype: torch.dtype = torch.float32,
                       family: str | ModelFamily | None = None) -> Converted:
    """Build the Hugging Face model (tensors, config, generation config, tokenizer) of the
    CosyVoice2 or CosyVoice3 directory ``cosyvoice2_dir``.

    ``family``: the family the directory must hold (``WrongFamilyError`` otherwise, so a
    CosyVoice2 llm.pt is never converted as CosyVoice3 or the other way); None detects it."""
    from transformers import AutoConfig, GenerationConfig

    cosyvoice2_dir = Path(cosyvoice2_dir)
    blank = cosyvoice2_dir / BLANK_EN
    llm_state = load_llm_state_dict(cosyvoice2_dir / LLM_PT, family)
    family = family_of_llm_state_dict(llm_state, cosyvoice2_dir / LLM_PT)
    tokenizer = load_text_tokenizer(blank, family)
    offset = add_speech_tokens(tokenizer, family)
    config = AutoConfig.from_pretrained(str(blank))
    if config.model_type != "qwen2":
        raise ConversionError(f"{blank}/config.json: model_type {config.model_type!r}, expected 'qwen2'")
    embed = llm_state[BACKBONE + "embed_tokens.weight"]
    if tuple(embed.shape) != (config.vocab_size, config.hidden_size):
        raise ConversionError(f"{cosyvoice2_dir / LLM_PT}: embedding {tuple(embed.shape)} does not match "
                              f"{blank}/config.json (vocab {config.vocab_size}, hidden {config.hidden_size})")
    state = {k: v.to(dtype) for k, v in hf_state_dict_from_llm(llm_state, offset, family).items()}
    end_ids = [offset + row for row in family.stop_row_ids]
    eos_id = offset + family.special_ids["eos"][1]
    text_eos_id = tokenizer.convert_tokens_to_ids(TEXT_EOS)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if QWEN_LM_HEAD in llm_state:
        tied = tied or torch.equal(llm_state[QWEN_LM_HEAD], embed)
    layout = {
        "speech_token_offset": offset,
        "qwen2_vocab_size": int(config.vocab_size),
        "qwen2_tie_word_embeddings": tied,
        "llm_decoder_bias": ("dropped (transformers' Qwen2 lm_head has no bias); export writes zeros"
                             if family.llm_decoder_bias else f"none ({family.upstream_llm_class} has no bias)"),
    }
    config.vocab_size = hf_vocab_size(offset, family)
    config.tie_word_embeddings = False
    config.eos_token_id = eos_id
    config.pad_token_id = text_eos_id
    config.dtype = dtype
    setattr(config, layout_key(family), layout)
    setattr(config, HF_FAMILY_KEY, family.name)
    generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=end_ids, pad_token_id=text_eos_id,
        do_sample=True, temperature=1.0, top_p=TOP_P, top_k=TOP_K,
    )
    report = {
        HF_FAMILY_KEY: family.name,
        "source": str(cosyvoice2_dir.resolve()),
        "llm_pt_bytes": (cosyvoice2_dir / LLM_PT).stat().st_size,
        "dtype": str(dtype).replace("torch.", ""),
        "vocab_size": config.vocab_size,
        **layout,
        "speech_end_token_ids": end_ids,
    }
    if family.llm_decoder_bias:
        bias = llm_state["llm_decoder.bias"].float()
        report["llm_decoder_bias_stats"] = {
            "mean": float(bias.mean()), "std": float(bias.std()), "min": float(bias.min()),
            "max": float(bias.max()), "eos1": float(bias[family.special_ids["eos"][1]]),
            "max_abs_logprob_change_bound": llm_bias_bound(bias),
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

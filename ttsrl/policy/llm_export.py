"""A converted (e.g. GRPO-trained and merged) Hugging Face CosyVoice2 or CosyVoice3 LLM -> that
family's ``llm.pt``, and the round-trip check that the export holds every tensor the family can.
The family is the one the directory records (``ttsrl.model_family.family_of_hf_dir``); asking
for the other one is refused (``WrongFamilyError``).

torch and transformers only (trainer environment). The layout it inverts is described in
``ttsrl.policy.hf_conversion``; the exported ``llm_decoder.bias`` is zero, so the ``llm.pt``
reproduces the Hugging Face policy exactly in CosyVoice2.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ttsrl.atomic_write import atomic_file
from ttsrl.model_family import ModelFamily, check_family, family_of_hf_dir, family_of_llm_state_dict, get_family
from ttsrl.policy.hf_conversion import (BACKBONE, QWEN_LM_HEAD, ConversionError, hf_state_dict_from_llm, layout_key,
                                        load_llm_state_dict, speech_token_offset)


def load_hf_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory (single or sharded safetensors)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors files (expected a Hugging Face model directory)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def export_llm_state_dict(hf_state: dict[str, torch.Tensor], offset: int, *, qwen2_vocab_size: int | None = None,
                          tie_word_embeddings: bool | None = None,
                          reference: dict[str, torch.Tensor] | None = None,
                          dtype: torch.dtype | None = None,
                          family: str | ModelFamily | None = None) -> dict[str, torch.Tensor]:
    """``llm.pt`` tensors of ``family`` (default CosyVoice2) for a converted (possibly trained)
    Hugging Face model.

    ``reference``: the original ``llm.pt``; gives the Qwen2 embedding size, the
    tying of its lm_head, the unreachable embedding rows and the dtype, and the
    result has exactly its keys and shapes. Without it, ``qwen2_vocab_size`` and
    ``tie_word_embeddings`` must be given (the converter records them in
    config.json) and unreachable rows are zero.
    ``llm_decoder.bias`` is zero: the Hugging Face model has none, so this is the
    bias that makes CosyVoice2 compute the same speech distribution (CosyVoice3 has no bias).
    """
    family = get_family(family)
    rows, added = family.speech_rows, family.added_rows
    if reference is not None:
        check_family(family, family_of_llm_state_dict(reference, "the reference llm.pt"), "the reference llm.pt")
    if "lm_head.weight" not in hf_state:
        raise ConversionError("Hugging Face checkpoint has no lm_head.weight (tied embeddings?); "
                              f"not a converted {family.name} LLM")
    embed = hf_state["model.embed_tokens.weight"]
    lm_head = hf_state["lm_head.weight"]
    if embed.shape[0] < offset + added:
        raise ConversionError(f"embedding has {embed.shape[0]} rows, fewer than the {offset + added} "
                              "the tokenizer's speech tokens need")
    ref_embed = reference[BACKBONE + "embed_tokens.weight"] if reference is not None else None
    if reference is not None:
        qwen2_vocab_size = ref_embed.shape[0]
        ref_head = reference.get(QWEN_LM_HEAD)
        tie_word_embeddings = ref_head is None or ref_head.data_ptr() == ref_embed.data_ptr() or torch.equal(
            ref_head, ref_embed)
        dtype = dtype or ref_embed.dtype
        if tuple(ref_embed.shape[1:]) != tuple(embed.shape[1:]):
            raise ConversionError(f"hidden size {embed.shape[1]} differs from the reference llm.pt's "
                                  f"{ref_embed.shape[1]}")
    if qwen2_vocab_size is None or tie_word_embeddings is None:
        raise ConversionError("the Qwen2 embedding size and lm_head tying are unknown: give the original "
                              "llm.pt as reference, or a directory whose config.json has the "
                              f"'{layout_key(family)}' entry the converter writes")
    if offset > qwen2_vocab_size:
        raise ConversionError(f"text vocabulary ({offset}) larger than the Qwen2 embedding ({qwen2_vocab_size})")
    dtype = dtype or torch.float32
    if "lm_head.bias" in hf_state:
        # A checkpoint from a converter that kept a bias tensor: transformers'
        # Qwen2 never loads it, so the policy that was trained never used it.
        warnings.warn("ignoring lm_head.bias: transformers' Qwen2 does not load it", stacklevel=2)

    out: dict[str, torch.Tensor] = {}
    new_embed = torch.zeros(qwen2_vocab_size, embed.shape[1], dtype=dtype)
    new_embed[:offset] = embed[:offset]
    if ref_embed is not None:
        new_embed[offset:] = ref_embed[offset:]
    for key, tensor in hf_state.items():
        if key.startswith("model.") and key != "model.embed_tokens.weight":
            out[BACKBONE + key[len("model."):]] = tensor.to(dtype).clone()
        elif not key.startswith("model.") and key not in ("lm_head.weight", "lm_head.bias"):
            raise ConversionError(f"unexpected tensor {key!r} in the Hugging Face checkpoint")
    out[BACKBONE + "embed_tokens.weight"] = new_embed
    if tie_word_embeddings:
        out[QWEN_LM_HEAD] = new_embed  # the same tensor, as in the tied model's state_dict()
    elif reference is not None and QWEN_LM_HEAD in reference:
        out[QWEN_LM_HEAD] = reference[QWEN_LM_HEAD].to(dtype).clone()
    else:
        out[QWEN_LM_HEAD] = torch.zeros_like(new_embed)
    out["speech_embedding.weight"] = embed[offset:offset + rows].to(dtype).clone()
    if family.llm_embedding_tokens:
        out["llm_embedding.weight"] = embed[offset + rows:offset + added].to(dtype).clone()
    out["llm_decoder.weight"] = lm_head[offset:offset + rows].to(dtype).clone()
    if family.llm_decoder_bias:
        out["llm_decoder.bias"] = torch.zeros(rows, dtype=dtype)
    if reference is not None and QWEN_LM_HEAD not in reference:
        del out[QWEN_LM_HEAD]  # a layout saved without the tied copy
    if reference is not None:
        problems = compare_layout(out, reference)
        if problems:
            raise ConversionError("exported llm.pt does not match the reference layout: " + "; ".join(problems))
    return out


def compare_layout(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """Differences in keys and shapes between two ``llm.pt`` state dicts."""
    problems = []
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing:
        problems.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected keys {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key in sorted(set(state) & set(reference)):
        if tuple(state[key].shape) != tuple(reference[key].shape):
            problems.append(f"{key}: shape {tuple(state[key].shape)} vs {tuple(reference[key].shape)}")
    return problems


def check_export(exported: dict[str, torch.Tensor], hf_state: dict[str, torch.Tensor], offset: int,
                 family: str | ModelFamily | None = None) -> list[str]:
    """Converting ``exported`` back must give the Hugging Face tensors ``family`` (default
    CosyVoice2) can hold.

    Compared: every backbone tensor, the text and speech rows of the embedding,
    the speech rows of lm_head (in the exported dtype). Not compared: lm_head's
    non-speech rows and padding rows, which CosyVoice2 has no place for.
    Returns the mismatches (empty when the export is faithful).
    """
    family = get_family(family)
    back = hf_state_dict_from_llm(exported, offset, family)
    problems = []
    for key, tensor in hf_state.items():
        if key == "lm_head.bias":
            continue
        if key not in back:
            problems.append(f"{key}: not recovered from the export")
            continue
        want = tensor.to(back[key].dtype)
        got = back[key]
        if key == "model.embed_tokens.weight":
            want, got = want[:offset + family.added_rows], got[:offset + family.added_rows]
        elif key == "lm_head.weight":
            want, got = want[offset:offset + family.speech_rows], got[offset:offset + family.speech_rows]
        if want.shape != got.shape or not torch.equal(want, got):
            problems.append(f"{key}: differs after the round trip")
    return problems


def export_hf_dir(hf_dir: str | Path, reference_llm_pt: str | Path | None = None,
                  dtype: torch.dtype | None = None,
                  family: str | ModelFamily | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Export a Hugging Face model directory; returns (llm.pt state, HF state, speech offset).

    The family is the one ``hf_dir`` records; ``family`` (when given) must be it, and so must
    the reference's (``WrongFamilyError`` otherwise)."""
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    found = family_of_hf_dir(hf_dir)
    if family is not None:
        check_family(family, found, hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    offset = speech_token_offset(tokenizer, found)
    hf_state = load_hf_state_dict(hf_dir)
    layout = json.loads((hf_dir / "config.json").read_text()).get(layout_key(found)) or {}
    if layout and layout.get("speech_token_offset") not in (None, offset):
        raise ConversionError(f"{hf_dir}: tokenizer puts <|s_0|> at {offset} but config.json records "
                              f"{layout['speech_token_offset']}")
    reference = load_llm_state_dict(reference_llm_pt, found) if reference_llm_pt else None
    exported = export_llm_state_dict(
        hf_state, offset, qwen2_vocab_size=layout.get("qwen2_vocab_size"),
        tie_word_embeddings=layout.get("qwen2_tie_word_embeddings"), reference=reference, dtype=dtype, family=found)
    return exported, hf_state, offset


def save_llm_state_dict(state: dict[str, torch.Tensor], output: str | Path) -> Path:
    """``torch.save`` to ``output``, atomically (parents created)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        torch.save(state, tmp)
    return output

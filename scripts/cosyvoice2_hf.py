"""CosyVoice2 LLM <-> Hugging Face Qwen2ForCausalLM, with torch and transformers only.

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
  policy; ``bias_effect`` measures the difference. The export writes a zero
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

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

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

_BACKBONE = "llm.model.model."
_QWEN_LM_HEAD = "llm.model.lm_head.weight"
_COSYVOICE_KEYS = ("speech_embedding.weight", "llm_decoder.weight", "llm_decoder.bias", "llm_embedding.weight")

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
    missing = [k for k in _COSYVOICE_KEYS + (_BACKBONE + "embed_tokens.weight",) if k not in state]
    if missing:
        raise ConversionError(f"{path}: not a CosyVoice2 llm.pt, missing keys {missing}")
    unknown = [k for k in state if not k.startswith("llm.model.") and k not in _COSYVOICE_KEYS]
    if unknown:
        raise ConversionError(f"{path}: unexpected keys {unknown[:5]} (a CosyVoice 1/3 checkpoint?)")
    hidden = state[_BACKBONE + "embed_tokens.weight"].shape[1]
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
    embed = llm_state[_BACKBONE + "embed_tokens.weight"]
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
        if key.startswith(_BACKBONE) and key != _BACKBONE + "embed_tokens.weight":
            hf_state["model." + key[len(_BACKBONE):]] = tensor.clone()
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
    embed = llm_state[_BACKBONE + "embed_tokens.weight"]
    if tuple(embed.shape) != (config.vocab_size, config.hidden_size):
        raise ConversionError(f"{cosyvoice2_dir / LLM_PT}: embedding {tuple(embed.shape)} does not match "
                              f"{blank}/config.json (vocab {config.vocab_size}, hidden {config.hidden_size})")
    state = {k: v.to(dtype) for k, v in hf_state_dict_from_llm(llm_state, offset).items()}
    end_ids = [offset + SPEECH_VOCAB_SIZE + i for i in range(len(SPEECH_END_TOKENS))]
    text_eos_id = tokenizer.convert_tokens_to_ids(TEXT_EOS)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if _QWEN_LM_HEAD in llm_state:
        tied = tied or torch.equal(llm_state[_QWEN_LM_HEAD], embed)
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


def _atomic_dir(output_dir: Path):
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp", dir=output_dir.parent))
    os.chmod(tmp, 0o755)
    return tmp


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse to replace a non-empty directory that is not a finished conversion."""
    output_dir = Path(output_dir)
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir()) and not is_complete(output_dir)):
        raise ConversionError(f"{output_dir} exists and holds no finished conversion ({REPORT_FILE}); "
                              "not replacing it: remove it or choose another output directory")


def _replace_dir(tmp: Path, output_dir: Path) -> None:
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old.{os.getpid()}")
        os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output_dir)


def save_converted(converted: Converted, output_dir: str | Path) -> Path:
    """Write ``converted`` as a Hugging Face model directory, atomically."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    tmp = _atomic_dir(output_dir)
    try:
        save_file({k: v.contiguous() for k, v in converted.state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        converted.config.save_pretrained(str(tmp))
        converted.generation_config.save_pretrained(str(tmp))
        converted.tokenizer.save_pretrained(str(tmp))
        (tmp / REPORT_FILE).write_text(json.dumps(converted.report, indent=2, ensure_ascii=False) + "\n")
        _replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


# --------------------------------------------------------------------------------------
# What the conversion changes: the dropped bias and the non-speech tokens


def bias_effect(full_logits: torch.Tensor, offset: int, bias: torch.Tensor) -> dict[str, float]:
    """Compare CosyVoice2's next-token distribution with the converted model's.

    ``full_logits`` (positions x vocab): the converted model's logits. Its
    speech-row logits equal CosyVoice2's ``llm_decoder`` output minus the bias,
    so CosyVoice2's distribution is ``softmax(speech_logits + bias)``. Reported
    (over positions; KL in nats):

    * ``kl_bias_*``: KL(CosyVoice2 || converted restricted to speech tokens),
      the effect of dropping the bias alone (this is what CosyVoice2 itself
      would compute from the exported ``llm.pt``);
    * ``kl_total_*``: KL(CosyVoice2 || converted over the full vocabulary),
      adding the mass that leaks to non-speech tokens;
    * ``max_abs_logprob_diff``: largest |change| of a speech log-probability from the bias;
    * ``nonspeech_mass_*``: probability the converted model gives to non-speech tokens;
    * ``top1_agreement``: share of positions where both pick the same argmax.
    """
    full_logits = full_logits.float().reshape(-1, full_logits.shape[-1])
    bias = bias.float()
    speech = full_logits[:, offset:offset + SPEECH_ROWS]
    logp_orig = torch.log_softmax(speech + bias, dim=-1)
    logp_speech = torch.log_softmax(speech, dim=-1)
    logp_full = torch.log_softmax(full_logits, dim=-1)
    p_orig = logp_orig.exp()
    kl_bias = (p_orig * (logp_orig - logp_speech)).sum(-1)
    kl_total = (p_orig * (logp_orig - logp_full[:, offset:offset + SPEECH_ROWS])).sum(-1)
    nonspeech = 1.0 - logp_full[:, offset:offset + SPEECH_ROWS].exp().sum(-1)
    top1 = (logp_orig.argmax(-1) == (full_logits.argmax(-1) - offset)).float()
    return {
        "positions": int(full_logits.shape[0]),
        "kl_bias_mean": float(kl_bias.mean()), "kl_bias_max": float(kl_bias.max()),
        "kl_total_mean": float(kl_total.mean()), "kl_total_max": float(kl_total.max()),
        "max_abs_logprob_diff": float((logp_orig - logp_speech).abs().max()),
        "nonspeech_mass_mean": float(nonspeech.clamp_min(0).mean()),
        "nonspeech_mass_max": float(nonspeech.clamp_min(0).max()),
        "top1_agreement": float(top1.mean()),
        "bias_bound": llm_bias_bound(bias),
    }


MEASURE_TEXTS = ("今天天气很好，我们一起去公园散步吧。", "扁担长，板凳宽，扁担绑在板凳上。", "请在二零二四年三月五日之前提交报告。")


@torch.inference_mode()
def measure_conversion(model, tokenizer, bias: torch.Tensor, texts=MEASURE_TEXTS, steps: int = 50,
                       seed: int = 0) -> dict[str, float]:
    """``bias_effect`` along trajectories that CosyVoice2 itself would sample.

    For each text: prompt ``<|sos|>text<|task_id|>``; at each step take the
    converted model's logits, compare (``bias_effect``), and feed the next
    speech token drawn from CosyVoice2's biased distribution (top-k 25), so
    the positions measured are ones the original model visits.
    """
    offset = speech_token_offset(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for text in texts:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        past = None
        for _ in range(steps):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1:].float()
            rows.append(logits)
            scores = logits[0, offset:offset + SPEECH_ROWS] + bias.float()
            top = torch.topk(scores, TOP_K)
            choice = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)]
            token = int(choice)
            if token >= SPEECH_VOCAB_SIZE:
                break
            ids = torch.tensor([[offset + token]])
    return bias_effect(torch.cat(rows), offset, bias)


# --------------------------------------------------------------------------------------
# Hugging Face -> CosyVoice2 llm.pt


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
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CosyVoice2 ``llm.pt`` tensors for a converted (possibly trained) Hugging Face model.

    ``reference``: the original ``llm.pt``; gives the Qwen2 embedding size, the
    tying of its lm_head, the unreachable embedding rows and the dtype, and the
    result has exactly its keys and shapes. Without it, ``qwen2_vocab_size`` and
    ``tie_word_embeddings`` must be given (the converter records them in
    config.json) and unreachable rows are zero.
    ``llm_decoder.bias`` is zero: the Hugging Face model has none, so this is the
    bias that makes CosyVoice2 compute the same speech distribution.
    """
    if "lm_head.weight" not in hf_state:
        raise ConversionError("Hugging Face checkpoint has no lm_head.weight (tied embeddings?); "
                              "not a converted CosyVoice2 LLM")
    embed = hf_state["model.embed_tokens.weight"]
    lm_head = hf_state["lm_head.weight"]
    if embed.shape[0] < offset + ADDED_ROWS:
        raise ConversionError(f"embedding has {embed.shape[0]} rows, fewer than the {offset + ADDED_ROWS} "
                              "the tokenizer's speech tokens need")
    ref_embed = reference[_BACKBONE + "embed_tokens.weight"] if reference is not None else None
    if reference is not None:
        qwen2_vocab_size = ref_embed.shape[0]
        ref_head = reference.get(_QWEN_LM_HEAD)
        tie_word_embeddings = ref_head is None or ref_head.data_ptr() == ref_embed.data_ptr() or torch.equal(
            ref_head, ref_embed)
        dtype = dtype or ref_embed.dtype
        if tuple(ref_embed.shape[1:]) != tuple(embed.shape[1:]):
            raise ConversionError(f"hidden size {embed.shape[1]} differs from the reference llm.pt's "
                                  f"{ref_embed.shape[1]}")
    if qwen2_vocab_size is None or tie_word_embeddings is None:
        raise ConversionError("the Qwen2 embedding size and lm_head tying are unknown: give the original "
                              "llm.pt as reference, or a directory whose config.json has the "
                              f"'{CONFIG_KEY}' entry the converter writes")
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
            out[_BACKBONE + key[len("model."):]] = tensor.to(dtype).clone()
        elif not key.startswith("model.") and key not in ("lm_head.weight", "lm_head.bias"):
            raise ConversionError(f"unexpected tensor {key!r} in the Hugging Face checkpoint")
    out[_BACKBONE + "embed_tokens.weight"] = new_embed
    if tie_word_embeddings:
        out[_QWEN_LM_HEAD] = new_embed  # the same tensor, as in the tied model's state_dict()
    elif reference is not None and _QWEN_LM_HEAD in reference:
        out[_QWEN_LM_HEAD] = reference[_QWEN_LM_HEAD].to(dtype).clone()
    else:
        out[_QWEN_LM_HEAD] = torch.zeros_like(new_embed)
    out["speech_embedding.weight"] = embed[offset:offset + SPEECH_ROWS].to(dtype).clone()
    out["llm_embedding.weight"] = embed[offset + SPEECH_ROWS:offset + ADDED_ROWS].to(dtype).clone()
    out["llm_decoder.weight"] = lm_head[offset:offset + SPEECH_ROWS].to(dtype).clone()
    out["llm_decoder.bias"] = torch.zeros(SPEECH_ROWS, dtype=dtype)
    if reference is not None and _QWEN_LM_HEAD not in reference:
        del out[_QWEN_LM_HEAD]  # a layout saved without the tied copy
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


def check_export(exported: dict[str, torch.Tensor], hf_state: dict[str, torch.Tensor], offset: int) -> list[str]:
    """Converting ``exported`` back must give the Hugging Face tensors CosyVoice2 can hold.

    Compared: every backbone tensor, the text and speech rows of the embedding,
    the speech rows of lm_head (in the exported dtype). Not compared: lm_head's
    non-speech rows and padding rows, which CosyVoice2 has no place for.
    Returns the mismatches (empty when the export is faithful).
    """
    back = hf_state_dict_from_llm(exported, offset)
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
            want, got = want[:offset + ADDED_ROWS], got[:offset + ADDED_ROWS]
        elif key == "lm_head.weight":
            want, got = want[offset:offset + SPEECH_ROWS], got[offset:offset + SPEECH_ROWS]
        if want.shape != got.shape or not torch.equal(want, got):
            problems.append(f"{key}: differs after the round trip")
    return problems


def export_hf_dir(hf_dir: str | Path, reference_llm_pt: str | Path | None = None,
                  dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Export a Hugging Face model directory; returns (llm.pt state, HF state, speech offset)."""
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    offset = speech_token_offset(tokenizer)
    hf_state = load_hf_state_dict(hf_dir)
    layout = json.loads((hf_dir / "config.json").read_text()).get(CONFIG_KEY) or {}
    if layout and layout.get("speech_token_offset") not in (None, offset):
        raise ConversionError(f"{hf_dir}: tokenizer puts <|s_0|> at {offset} but config.json records "
                              f"{layout['speech_token_offset']}")
    reference = load_llm_state_dict(reference_llm_pt) if reference_llm_pt else None
    exported = export_llm_state_dict(
        hf_state, offset, qwen2_vocab_size=layout.get("qwen2_vocab_size"),
        tie_word_embeddings=layout.get("qwen2_tie_word_embeddings"), reference=reference, dtype=dtype)
    return exported, hf_state, offset


def save_llm_state_dict(state: dict[str, torch.Tensor], output: str | Path) -> Path:
    """``torch.save`` to ``output`` via a temporary file in the same directory."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output

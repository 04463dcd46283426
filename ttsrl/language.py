"""The language of an item (its text), which picks the reward's and the evaluation's error metric.

Supported languages (``LANGUAGES``) and their metric (``ttsrl.scoring``):

- ``zh``: pinyin error rate or CER, as the configured metric says (today's scoring);
- ``en``: WER after Whisper-style English normalization (``ttsrl.text_norm.normalize_english``);
- ``ja``, ``ko``, ``yue`` (Cantonese, declared only: its script is Han, which reads as zh): CER over
  the characters left after removing punctuation and whitespace.

Each item's language also reaches the ASR (SenseVoice's ``language``: ``ASR_LANGUAGES``), for the
reward and for evaluation; ``auto`` (SenseVoice's own language identification) where a request
carries none.

``FALLBACK_LANGUAGE`` (``zh``) is what a text whose script says nothing gets (digits and
punctuation only, or a script none of the four uses, such as Cyrillic): it is scored exactly
as every item was before languages existed.

``detect_language(text)`` reads the script, in this order (mixed text: the first rule that
applies wins):

1. any kana (hiragana, katakana) -> ``ja`` (Japanese mixes kanji and kana; Chinese has no kana);
2. any Hangul -> ``ko``;
3. at least one Han character and no more Latin words than Han characters -> ``zh``
   (Chinese with English words in it stays Chinese, the zh scoring takes a Latin word as one
   token);
4. any Latin word -> ``en``;
5. else ``FALLBACK_LANGUAGE``.

``normalize_language(value, where)`` turns a declared language (a data record's
``language`` field, a request's LANGUAGE input, a manifest's column) into one of
``LANGUAGES``: case and ``_``/``-`` do not matter, and common aliases are accepted (``cmn``,
``zh-cn``, ``en-us``, ``jpn``, ``kor``...: ``ALIASES``). An unknown value is a ValueError that
names the value, ``where`` it came from and the accepted ones.
"""
from __future__ import annotations

import re

from .text_norm import HAN_CHARS

LANGUAGES = ("zh", "en", "ja", "ko", "yue")
FALLBACK_LANGUAGE = "zh"
AUTO = "auto"
ASR_LANGUAGES = LANGUAGES + (AUTO,)
"""What SenseVoice is told an item's language is: one of LANGUAGES, or ``auto`` (none given)."""
ALIASES = {
    "zh": "zh", "cmn": "zh", "zho": "zh", "chi": "zh", "chinese": "zh", "mandarin": "zh", "zh-cn": "zh",
    "zh-hans": "zh", "zh-tw": "zh", "zh-hant": "zh", "zh-hk": "zh", "zh-sg": "zh", "cmn-hans-cn": "zh",
    "en": "en", "eng": "en", "english": "en", "en-us": "en", "en-gb": "en", "en-au": "en", "en-ca": "en",
    "en-in": "en",
    "ja": "ja", "jp": "ja", "jpn": "ja", "japanese": "ja", "ja-jp": "ja",
    "ko": "ko", "kor": "ko", "korean": "ko", "ko-kr": "ko",
    "yue": "yue", "cantonese": "yue", "zh-yue": "yue", "yue-hk": "yue", "yue-hant": "yue",
}
"""Accepted spellings (lower case, ``_`` read as ``-``) -> language."""

_KANA = re.compile("[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
_HAN = re.compile(f"[{HAN_CHARS}]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")


def script_counts(text: str) -> dict:
    """Characters of each script in ``text``: kana, hangul, han; and Latin words (``latin``)."""
    return {"kana": len(_KANA.findall(text)), "hangul": len(_HANGUL.findall(text)),
            "han": len(_HAN.findall(text)), "latin": len(_LATIN_WORD.findall(text))}


def language_of_counts(counts: dict) -> str:
    """The rules of the module doc applied to ``script_counts`` (of one text or of many)."""
    if counts["kana"]:
        return "ja"
    if counts["hangul"]:
        return "ko"
    if counts["han"] and counts["han"] >= counts["latin"]:
        return "zh"
    if counts["latin"]:
        return "en"
    return FALLBACK_LANGUAGE


def detect_language(text: str) -> str:
    """The language of ``text`` from its script (module doc)."""
    if not isinstance(text, str):
        raise TypeError(f"detect_language needs a str, got {type(text).__name__}")
    return language_of_counts(script_counts(text))


def normalize_language(value, where: str = "language") -> str:
    """``value`` as one of LANGUAGES (aliases accepted); ValueError naming ``where`` and the value."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: language must be a non-empty string such as 'zh' or 'en', got {value!r}")
    key = value.strip().lower().replace("_", "-")
    if key not in ALIASES:
        raise ValueError(f"{where}: unknown language {value!r}; expected one of {list(LANGUAGES)} "
                         f"(or an alias: {', '.join(sorted(a for a in ALIASES if a not in LANGUAGES))})")
    return ALIASES[key]

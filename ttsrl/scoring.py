"""Error rates between a reference text and an ASR transcript: pinyin and character error rates
(Chinese), word error rate (English), character error rate (Japanese, Korean).

The item's language (``ttsrl.language``) picks the metric (``metric_name``):

- no language (``None``, every caller before languages existed) or ``zh``: the configured
  ``metric``, ``pinyin`` or ``char``, described below, exactly as before;
- ``en``: WER over the words of ``ttsrl.text_norm.normalize_english`` (Whisper's rules);
- ``ja``, ``ko``, ``yue``: CER over the characters of ``ttsrl.text_norm.normalize_characters``
  (punctuation and whitespace removed).

For en, ja and ko the ``metric`` argument is not used (it chooses between the two Chinese
metrics). The rest of this doc is about the Chinese scoring.

Both texts go through ``ttsrl.text_norm``. The reference's numbers may be read
several ways (see ``reading_slots``); the error rate is the lowest over the
readings we accept, so a policy that says 二零二四 for "2024" is not punished
for disagreeing with one normalizer.

Tokens: in ``pinyin`` mode each Han character is a TONE3 syllable (tone sandhi
applied, neutral tone as 5), so homophones with the same tones match; in
``char`` mode each Han character is a token. In both modes a run of Latin
letters/digits is one word, and any other non-space character is a token.

Speed (GRPO scores 4+ transcripts per reference): reference readings and their
tokens are cached; pinyin is computed with pypinyin's own segmentation and
converter, cached per segmented word (pypinyin applies tone sandhi within a
word, so this is exactly ``lazy_pinyin`` of the whole run); wetext only runs
on text with digits; the edit distance is rapidfuzz's.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

from pypinyin import Style
from pypinyin.converter import UltimateConverter
from pypinyin.core import Pinyin
from rapidfuzz.distance import Levenshtein

from .language import normalize_language
from .text_norm import (HAN_CHARS, ReadingSlots, join_pieces, normalize_characters, normalize_english,
                        normalize_text, reading_slots)

METRICS = ("pinyin", "char")
LANGUAGE_METRICS = {"en": "wer", "ja": "cer", "ko": "cer", "yue": "cer"}
"""The metric of each language that does not use the configured (Chinese) one."""
MAX_ENUMERATED_READINGS = 64
"""Up to this many combinations of number readings are scored exhaustively;
beyond it, each number's reading is chosen in turn (coordinate descent)."""
MAX_HYPOTHESIS_READINGS = 16

_TOKEN_RUN = re.compile(rf"(?P<han>[{HAN_CHARS}]+)|(?P<word>(?:(?![{HAN_CHARS}])[\w'])+)|(?P<other>\S)")

_CONVERTER = UltimateConverter(neutral_tone_with_five=True, tone_sandhi=True)
_PINYIN = Pinyin(_CONVERTER)


class EmptyReferenceError(ValueError):
    """The reference has nothing left to score against after normalization."""


@lru_cache(maxsize=262144)
def _word_pinyin(word: str) -> tuple[str, ...]:
    return tuple(readings[0] for readings in _CONVERTER.convert(word, Style.TONE3, False, "default", True))


def han_pinyin(run: str) -> list[str]:
    """TONE3 pinyin of a run of Han characters; equals pypinyin's ``lazy_pinyin(run,
    style=TONE3, neutral_tone_with_five=True, tone_sandhi=True)``."""
    out: list[str] = []
    for word in _PINYIN.seg(run):
        out.extend(_word_pinyin(word))
    return out


def tokenize(normalized: str, metric: str = "pinyin") -> tuple[str, ...]:
    """Scoring tokens of an already normalized text."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    out: list[str] = []
    for match in _TOKEN_RUN.finditer(normalized):
        han = match.group("han")
        if han is None:
            out.append(match.group(0))
        elif metric == "pinyin":
            out.extend(han_pinyin(han))
        else:
            out.extend(han)
    return tuple(out)


@dataclass(frozen=True)
class Alignment:
    """Edit counts of a hypothesis against the reference reading that fits it best."""

    substitutions: int
    deletions: int
    insertions: int
    reference: tuple[str, ...]
    hypothesis: tuple[str, ...]

    @property
    def ref_length(self) -> int:
        return len(self.reference)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def error_rate(self) -> float:
        return self.errors / len(self.reference)


def _align(reference: tuple[str, ...], hypothesis: tuple[str, ...]) -> Alignment:
    counts = {"replace": 0, "delete": 0, "insert": 0}
    for op in Levenshtein.editops(reference, hypothesis):
        counts[op.tag] += 1
    return Alignment(counts["replace"], counts["delete"], counts["insert"], reference, hypothesis)


@lru_cache(maxsize=65536)
def _reading_tokens(pieces: tuple[str, ...], metric: str) -> tuple[str, ...]:
    return tokenize(join_pieces(pieces), metric)


@lru_cache(maxsize=65536)
def _enumerated_readings(text: str, metric: str) -> tuple[tuple[str, ...], ...] | None:
    """Every accepted reading's tokens, or None when there are too many to list."""
    slots = reading_slots(text)
    options = [piece if isinstance(piece, tuple) else (piece,) for piece in slots.pieces]
    total = 1
    for option in options:
        total *= len(option)
    if total > MAX_ENUMERATED_READINGS:
        return None
    readings = [tokenize(slots.guess, metric)]
    readings += [_reading_tokens(choice, metric) for choice in itertools.product(*options)]
    return tuple(dict.fromkeys(readings))


def _rate_key(alignment: Alignment):
    return (alignment.error_rate, alignment.errors, -alignment.ref_length)


def _best_by_descent(slots: ReadingSlots, hypothesis: tuple[str, ...], metric: str) -> Alignment:
    """Choose each number's reading in turn, keeping the others fixed, until nothing improves."""
    choice = [0 if isinstance(piece, tuple) else None for piece in slots.pieces]

    def reading(current) -> tuple[str, ...]:
        pieces = tuple(piece[c] if c is not None else piece for piece, c in zip(slots.pieces, current))
        return _reading_tokens(pieces, metric)

    best = _align(reading(choice), hypothesis)
    improved = True
    while improved:
        improved = False
        for index, piece in enumerate(slots.pieces):
            if choice[index] is None:
                continue
            for alternative in range(len(piece)):
                if alternative == choice[index]:
                    continue
                trial = list(choice)
                trial[index] = alternative
                candidate = _align(reading(trial), hypothesis)
                if _rate_key(candidate) < _rate_key(best):
                    best, choice, improved = candidate, trial, True
    guess = _align(tokenize(slots.guess, metric), hypothesis)
    return min((best, guess), key=_rate_key)


def reference_readings(reference: str, metric: str = "pinyin") -> tuple[tuple[str, ...], ...] | None:
    """Token sequences of every accepted reading of ``reference`` (None if too many)."""
    return _enumerated_readings(reference, metric)


def _hypothesis_readings(hypothesis: str, metric: str) -> list[tuple[str, ...]]:
    slots = reading_slots(hypothesis)
    if not slots.has_numbers:
        return [tokenize(slots.guess, metric)]
    readings = _enumerated_readings(hypothesis, metric)
    if readings is None:
        return [tokenize(slots.guess, metric)]
    return list(readings[:MAX_HYPOTHESIS_READINGS])


def metric_name(metric: str = "pinyin", language: str | None = None) -> str:
    """The metric an item of ``language`` is scored with: ``metric`` (pinyin/char) for zh and for
    no language, ``wer`` for en, ``cer`` for ja and ko."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if language is None:
        return metric
    return LANGUAGE_METRICS.get(normalize_language(language, "scoring"), metric)


@lru_cache(maxsize=65536)
def language_tokens(text: str, language: str) -> tuple[str, ...]:
    """The tokens of ``text`` for a language with its own metric: English words (normalized the
    Whisper way) for en, characters for ja and ko."""
    if language == "en":
        return tuple(normalize_english(text).split())
    if language in ("ja", "ko", "yue"):
        return tuple(normalize_characters(text))
    raise ValueError(f"language {language!r} has no token rule of its own; expected one of {sorted(LANGUAGE_METRICS)}")


def align(reference: str, hypothesis: str, metric: str = "pinyin", language: str | None = None) -> Alignment:
    """Best alignment of ``hypothesis`` against ``reference`` with the metric of ``language``
    (module doc; None: the configured ``metric``, as before languages existed). For zh, the
    best over every accepted reading of the reference's numbers.

    Raises EmptyReferenceError when the reference normalizes to nothing, ValueError for an
    unknown metric or language.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if not isinstance(reference, str) or not isinstance(hypothesis, str):
        raise TypeError("reference and hypothesis must be str")
    if language is not None:
        language = normalize_language(language, "scoring")
        if language in LANGUAGE_METRICS:
            ref_tokens = language_tokens(reference, language)
            if not ref_tokens:
                raise EmptyReferenceError(f"reference {reference!r} is empty after {language} normalization")
            return _align(ref_tokens, language_tokens(hypothesis, language))
    slots = reading_slots(reference)
    if not slots.has_numbers:
        ref_tokens = tokenize(slots.guess, metric)
        if not ref_tokens:
            raise EmptyReferenceError(f"reference {reference!r} is empty after normalization")
        if not any(c.isdigit() for c in hypothesis):
            return _align(ref_tokens, tokenize(normalize_text(hypothesis), metric))
    best: Alignment | None = None
    for hyp_tokens in _hypothesis_readings(hypothesis, metric):
        readings = _enumerated_readings(reference, metric)
        if readings is None:
            candidate = _best_by_descent(slots, hyp_tokens, metric)
        else:
            candidate = min((_align(r, hyp_tokens) for r in readings if r), key=_rate_key, default=None)
        if candidate is None:
            raise EmptyReferenceError(f"reference {reference!r} is empty after normalization")
        if best is None or _rate_key(candidate) < _rate_key(best):
            best = candidate
    assert best is not None
    return best


def error_rate(reference: str, hypothesis: str, metric: str = "pinyin", language: str | None = None) -> float:
    """Error rate of ``hypothesis`` with the metric of ``language`` (``align``); for zh and no
    language, the lowest over the accepted readings of ``reference``."""
    return align(reference, hypothesis, metric, language).error_rate

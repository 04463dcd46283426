"""CER (zh) and WER (en) as the Seed-TTS-eval protocol computes them, for comparable numbers;
CER for ja and ko as CosyVoice3-Eval reports them.

Published zero-shot TTS results (Seed-TTS-eval ``test_zh`` / ``test_en``, CosyVoice3-Eval)
are scored by Seed-TTS-eval's ``run_wer.py`` + ``average_wer.py``; this module is our own
implementation of that procedure, so stage 4's numbers can be set beside the papers':

1. zh: the ASR transcript is converted to simplified Chinese (``zhconv``, ``zh-cn``);
   the reference is left as it is.
2. Both texts lose every punctuation mark of ``zhon.hanzi.punctuation`` and
   ``string.punctuation`` except the apostrophe (``don't`` stays one word). Nothing else
   is normalized: no number reading, no case folding for zh, no full-width folding.
3. zh: every non-space character is a token (Latin words split into letters; spaces
   vanish). en: the texts are lower-cased and split on whitespace.
   ja, ko (CosyVoice3-Eval's zero-shot ja/ko subsets, scored by CER): as zh, characters
   without punctuation and spaces, but without the ``zhconv`` conversion of step 1 (it would
   rewrite kanji, and Hangul has no simplified form).
4. Per utterance: (substitutions + deletions + insertions) / reference tokens.
5. The set's figure is the plain mean of the per-utterance rates (not errors over all
   reference tokens), as ``average_wer.py`` reports it.

6. An utterance whose audio is missing is left out of the mean, as ``run_wer.py`` skips a
   wav that does not exist. Our callers (``ttsrl.evaluation.wer``) do the same for any
   utterance without a transcript, and count and list those on their own (``missing``),
   so the figure is comparable and what it leaves out stays visible.

Our own scoring (``ttsrl.scoring``: number readings, pinyin) stays the reward and the
extra "pinyin error rate" column, under the same missing-audio rule; this module only
reproduces the published metric.
"""
from __future__ import annotations

import string

from rapidfuzz.distance import Levenshtein

from .scoring import Alignment, EmptyReferenceError

LANGUAGES = ("zh", "en", "ja", "ko", "yue")
METRIC_OF_LANGUAGE = {"zh": "cer", "en": "wer", "ja": "cer", "ko": "cer", "yue": "cer"}
_CHARACTER_LANGUAGES = ("zh", "ja", "ko", "yue")
"""Languages whose protocol token is a character (CER); the others' is a word (WER)."""


def _punctuation() -> str:
    from zhon.hanzi import punctuation as hanzi_punctuation

    return "".join(sorted(set(hanzi_punctuation + string.punctuation) - {"'"}))


_REMOVE_PUNCTUATION = str.maketrans("", "", _punctuation())


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; the protocol scores {LANGUAGES}")


def metric_of(language: str) -> str:
    """``cer`` for zh, ja and ko, ``wer`` for en."""
    _check_language(language)
    return METRIC_OF_LANGUAGE[language]


def protocol_tokens(text: str, language: str, hypothesis: bool = False) -> tuple[str, ...]:
    """The tokens the protocol compares (``hypothesis``: the ASR side, converted to
    simplified Chinese for zh)."""
    _check_language(language)
    if language == "zh" and hypothesis:
        import zhconv

        text = zhconv.convert(text, "zh-cn")
    text = text.translate(_REMOVE_PUNCTUATION)
    if language in _CHARACTER_LANGUAGES:
        return tuple(char for char in text if not char.isspace())
    return tuple(text.lower().split())


def protocol_align(reference: str, hypothesis: str, language: str) -> Alignment:
    """Edit counts of the transcript against the reference, protocol tokens. Raises
    EmptyReferenceError when the reference has no token (the protocol cannot score it)."""
    ref = protocol_tokens(reference, language)
    if not ref:
        raise EmptyReferenceError(f"reference {reference!r} has no {metric_of(language)} token after the "
                                  "protocol's punctuation removal")
    hyp = protocol_tokens(hypothesis, language, hypothesis=True)
    counts = {"replace": 0, "delete": 0, "insert": 0}
    for op in Levenshtein.editops(ref, hyp):
        counts[op.tag] += 1
    return Alignment(counts["replace"], counts["delete"], counts["insert"], ref, hyp)


def protocol_error_rate(reference: str, hypothesis: str, language: str) -> float:
    return protocol_align(reference, hypothesis, language).error_rate


def mean_error_rate(rates) -> float | None:
    """The set's figure: the plain mean of the per-utterance rates of the utterances that have
    audio (step 6); None for none (0.0 would read as a perfect set)."""
    rates = list(rates)
    return sum(rates) / len(rates) if rates else None

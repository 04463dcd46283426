"""The speech-token format of the policy's responses, in one place.

Both model families' LLMs emit speech tokens 0..6560 (a 6561-entry FSQ codebook). In the
Hugging Face form of the model each one is a text token ``<|s_N|>``; what follows them (the
special speech rows, their names, which of them stop generation) is the family's
(``ttsrl.model_family``). Every function takes an optional ``family`` (a name or
``ModelFamily``); without one it is CosyVoice2's: its three extra speech rows (6561, 6562,
6563) become ``<|eos1|>``..``<|eos3|>`` (6561 is the stop token CosyVoice2 uses), and its two
``llm_embedding`` rows become ``<|sos|>`` and ``<|task_id|>``. The names match the reference
conversion so checkpoints made by either tool agree.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ttsrl.model_family import COSYVOICE2, SOS_TOKEN, SPEECH_VOCAB_SIZE, TASK_ID_TOKEN, ModelFamily, get_family

__all__ = ["SPEECH_VOCAB_SIZE", "SPEECH_END_TOKENS", "SOS_TOKEN", "TASK_ID_TOKEN", "LLM_EMBEDDING_TOKENS",
           "ParsedSpeech", "speech_token", "all_speech_tokens", "added_tokens", "speech_end_tokens",
           "format_speech_tokens", "parse_speech_tokens"]

SPEECH_END_TOKENS = COSYVOICE2.stop_tokens
"""Tokens for CosyVoice2's speech rows 6561..6563; generation stops at any (other families:
``speech_end_tokens(family)``)."""

LLM_EMBEDDING_TOKENS = COSYVOICE2.llm_embedding_tokens
"""Rows 0 and 1 of CosyVoice2's ``llm_embedding`` (sos/eos and task id)."""

_SPECIAL_PIECE = re.compile(r"<\|[^|<>]*\|>")
_SPEECH_TOKEN = re.compile(r"<\|s_(\d+)\|>")
# The usual policy response: speech tokens only (some tokenizers decode them space-separated),
# perhaps one more special piece, which must be one of the family's end tokens. An end token of
# the form <|s_N|> (CosyVoice3's rows 6565..6760) is out of the speech range and takes the
# general parser.
_ONLY_SPEECH = re.compile(r"\s*(?:<\|s_\d+\|>\s*)+(?P<end><\|[^|<>]*\|>)?\s*")


@functools.lru_cache(maxsize=None)
def _end_tokens(family: ModelFamily) -> frozenset[str]:
    return frozenset(family.stop_tokens)


def speech_token(index: int) -> str:
    """The text form of speech token ``index``."""
    if not 0 <= index < SPEECH_VOCAB_SIZE:
        raise ValueError(f"speech token id {index} outside [0, {SPEECH_VOCAB_SIZE})")
    return f"<|s_{index}|>"


def all_speech_tokens() -> list[str]:
    """``<|s_0|>``..``<|s_6560|>`` in id order."""
    return [f"<|s_{i}|>" for i in range(SPEECH_VOCAB_SIZE)]


def added_tokens(family: str | ModelFamily | None = None) -> list[str]:
    """Every token the HF conversion appends to the text vocabulary, in order."""
    return get_family(family).added_tokens()


def speech_end_tokens(family: str | ModelFamily | None = None) -> tuple[str, ...]:
    """The tokens at which ``family``'s generation stops."""
    return get_family(family).stop_tokens


def format_speech_tokens(ids) -> str:
    """Speech token ids -> ``<|s_a|><|s_b|>...`` (the form policy responses take)."""
    return "".join(speech_token(int(i)) for i in ids)


@dataclass(frozen=True)
class ParsedSpeech:
    """What a policy response contains.

    ``ids``: speech token ids in order, up to the first end token.
    ``ignored``: pieces that are not speech tokens (runs of other text, other
    special tokens, out-of-range ``<|s_N|>``, anything after an end token).
    ``ended``: whether a speech end token was present.
    """

    ids: list[int]
    ignored: int
    ended: bool


def parse_speech_tokens(text: str, family: str | ModelFamily | None = None) -> ParsedSpeech:
    """Extract speech token ids from a decoded policy response of ``family`` (default CosyVoice2).

    Whitespace between tokens is not counted; every other run of text between
    tokens counts as one ignored piece. Any of the family's stop tokens ends the speech
    (CosyVoice3's 200, ``<|s_6565|>``..``<|s_6760|>`` among them).
    """
    family = get_family(family)
    usual = _ONLY_SPEECH.fullmatch(text)
    if usual is not None:  # fast path: the reward hook parses every rollout
        end = usual.group("end")
        ids = [int(x) for x in _SPEECH_TOKEN.findall(text)]
        if max(ids) < SPEECH_VOCAB_SIZE and (end is None or end in _end_tokens(family)):
            return ParsedSpeech(ids=ids, ignored=0, ended=end is not None)
    return _parse_any(text, family)


def _parse_any(text: str, family: str | ModelFamily | None = None) -> ParsedSpeech:
    """The general parser behind ``parse_speech_tokens``."""
    end_tokens = _end_tokens(get_family(family))
    ids: list[int] = []
    ignored = 0
    ended = False
    position = 0
    for match in _SPECIAL_PIECE.finditer(text):
        if text[position:match.start()].strip():
            ignored += 1
        position = match.end()
        piece = match.group(0)
        if ended:
            ignored += 1
            continue
        if piece in end_tokens:
            ended = True
            continue
        speech = _SPEECH_TOKEN.fullmatch(piece)
        if speech is not None and int(speech.group(1)) < SPEECH_VOCAB_SIZE:
            ids.append(int(speech.group(1)))
        else:
            ignored += 1
    if text[position:].strip():
        ignored += 1
    return ParsedSpeech(ids=ids, ignored=ignored, ended=ended)

"""The CosyVoice2 speech-token format, in one place.

CosyVoice2's LLM emits speech tokens 0..6560 (a 6561-entry FSQ codebook). In
the Hugging Face form of the model each one is a text token ``<|s_N|>``; the
three extra rows of CosyVoice2's speech embedding/decoder (6561, 6562, 6563)
become ``<|eos1|>``..``<|eos3|>`` (6561 is the stop token CosyVoice2 uses), and
its two ``llm_embedding`` rows become ``<|sos|>`` and ``<|task_id|>``. The names
match the reference conversion so checkpoints made by either tool agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SPEECH_VOCAB_SIZE = 6561
"""Number of real speech tokens: ids 0..6560."""

SPEECH_END_TOKENS = ("<|eos1|>", "<|eos2|>", "<|eos3|>")
"""Tokens for CosyVoice2's speech rows 6561..6563; generation stops at any."""

SOS_TOKEN = "<|sos|>"
TASK_ID_TOKEN = "<|task_id|>"
LLM_EMBEDDING_TOKENS = (SOS_TOKEN, TASK_ID_TOKEN)
"""Rows 0 and 1 of CosyVoice2's ``llm_embedding`` (sos/eos and task id)."""

_SPECIAL_PIECE = re.compile(r"<\|[^|<>]*\|>")
_SPEECH_TOKEN = re.compile(r"<\|s_(\d+)\|>")
# The usual policy response: speech tokens only (some tokenizers decode them space-separated),
# perhaps one end token.
_ONLY_SPEECH = re.compile(r"\s*(?:<\|s_\d+\|>\s*)+(?P<end>" + "|".join(re.escape(t) for t in SPEECH_END_TOKENS)
                          + r")?\s*")


def speech_token(index: int) -> str:
    """The text form of speech token ``index``."""
    if not 0 <= index < SPEECH_VOCAB_SIZE:
        raise ValueError(f"speech token id {index} outside [0, {SPEECH_VOCAB_SIZE})")
    return f"<|s_{index}|>"


def all_speech_tokens() -> list[str]:
    """``<|s_0|>``..``<|s_6560|>`` in id order."""
    return [f"<|s_{i}|>" for i in range(SPEECH_VOCAB_SIZE)]


def added_tokens() -> list[str]:
    """Every token the HF conversion appends to the text vocabulary, in order."""
    return all_speech_tokens() + list(SPEECH_END_TOKENS) + list(LLM_EMBEDDING_TOKENS)


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


def parse_speech_tokens(text: str) -> ParsedSpeech:
    """Extract speech token ids from a decoded policy response.

    Whitespace between tokens is not counted; every other run of text between
    tokens counts as one ignored piece.
    """
    usual = _ONLY_SPEECH.fullmatch(text)
    if usual is not None:  # fast path: the reward hook parses every rollout
        ids = [int(x) for x in _SPEECH_TOKEN.findall(text)]
        if max(ids) < SPEECH_VOCAB_SIZE:
            return ParsedSpeech(ids=ids, ignored=0, ended=usual.group("end") is not None)
    return _parse_any(text)


def _parse_any(text: str) -> ParsedSpeech:
    """The general parser behind ``parse_speech_tokens``."""
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
        if piece in SPEECH_END_TOKENS:
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

"""Requests -> items: reading and checking the inputs of the served models, one item at a time.

Triton's dynamic batcher hands a model a list of requests (dicts of numpy arrays), each
with a batch of rows. Every row becomes an ``Item``; a row whose input is bad gets the
reason in ``Item.error`` (later its ``ERRORS`` output) instead of failing the call, and
the other rows go on (``serving.Pipeline`` runs the good ones).

Token models (``token2wav``, ``token2wav_asr``): TOKENS (padded) with TOKEN_LENS, GT_TEXT,
and optionally each row's own speaker prompt: PROMPT_WAV (FP32, padded), PROMPT_WAV_LENS,
PROMPT_SAMPLE_RATE and PROMPT_TEXT, checked like a bank prompt (``prompt_bank.check_prompt``).
A row with PROMPT_WAV_LENS 0 (or a request without PROMPT_WAV) takes a prompt of the bank,
chosen by the request parameter ``prompt`` or by its tokens; a row with its own PROMPT_WAV in
a request that also names a bank prompt is refused (the prompt given both ways). ``token2wav_asr`` also takes an
optional LANGUAGE (BYTES, one per row: zh, en, ja, ko or an alias, ``ttsrl.language``) that
picks the row's error metric; an empty cell or a request without LANGUAGE (older clients)
scores as before (the configured metric). Waveform models (``asr``,
``asr_eval``, ``speaker``, ``speech_tokenizer``): WAV (padded), WAV_LENS, SAMPLE_RATE.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ttsrl.language import normalize_language
from ttsrl.triton_client import BANK_PROMPT_PREFIX, speaker_prompt_key

from .engines import SpeakerPrompt
from .prompt_bank import PromptBank, PromptBankError, check_prompt

SPEECH_VOCAB_SIZE = 6561  # ttsrl.speech_tokens.SPEECH_VOCAB_SIZE
DEFAULT_MAX_TOKENS = 4000  # 160 s of CosyVoice2 speech (25 tokens/s)
DEFAULT_MAX_WAVE_SECONDS = 300.0
PROMPT_PARAMETER = "prompt"


class ItemError(ValueError):
    """A problem with one item of a request; reported in its ``ERRORS`` output."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_wave_seconds: float = DEFAULT_MAX_WAVE_SECONDS


@dataclasses.dataclass
class Item:
    """One row of one request, from its inputs to its outputs."""

    request: int
    row: int
    tokens: Optional[np.ndarray] = None
    text: str = ""
    language: Optional[str] = None  # from LANGUAGE; None: the configured metric (older clients)
    prompt: int = 0
    speaker_prompt: Optional[SpeakerPrompt] = None  # the item's own prompt, when the request sent one
    prompt_key: str = ""  # its speaker_prompt_key
    prompt_features: object = None  # its prepared features (PromptCache)
    error: str = ""
    wave: Optional[np.ndarray] = None
    transcript: str = ""
    nll: Optional[float] = None
    similarity: Optional[float] = None
    component_values: dict = dataclasses.field(default_factory=dict)  # plug-in name -> its engine's values
    targets: dict = dataclasses.field(default_factory=dict)  # TARGET_<FIELD> inputs: field -> value (None: empty)
    rate: int = 0  # sample rate of ``wave`` for the waveform models
    prompt_name: str = ""  # the bank prompt's name, or ``item-<key prefix>`` for the item's own

    def describe(self) -> str:
        """Which item this is, for an error message: request, row, size and prompt."""
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.tokens.size} speech tokens")
        elif self.wave is not None and self.rate:
            parts.append(f"{self.wave.size / self.rate:.2f} s of audio")
        if self.prompt_name:
            parts.append(f"prompt {self.prompt_name}")
        return f"request {self.request} row {self.row}" + (f" ({', '.join(parts)})" if parts else "")


def _rows(request: dict, name: str, batch: int) -> np.ndarray:
    """Input ``name`` as a 2-D (batch, n) array, checking its batch size."""
    array = np.asarray(request[name])
    if array.ndim == 1:
        array = array.reshape(batch, -1) if batch and array.size % batch == 0 else array.reshape(1, -1)
    if array.ndim != 2 or array.shape[0] != batch:
        raise ItemError(f"{name} has shape {list(array.shape)}, expected [{batch}, n]")
    return array


def request_batch_size(request: dict, main_input: str) -> int:
    array = np.asarray(request[main_input])
    return 1 if array.ndim < 2 else int(array.shape[0])


def parse_tokens(tokens_row: np.ndarray, length, limits: Limits) -> np.ndarray:
    """One item's speech token ids (int64) from a padded row and its declared length."""
    if length is None:
        length = tokens_row.shape[0]
    length = int(length)
    if length < 0:
        raise ItemError(f"TOKEN_LENS is {length}: must be >= 0")
    if length > tokens_row.shape[0]:
        raise ItemError(f"TOKEN_LENS is {length} but TOKENS has only {tokens_row.shape[0]} values")
    if length > limits.max_tokens:
        raise ItemError(f"{length} speech tokens is over the server's maximum of {limits.max_tokens} (--max-tokens)")
    ids = tokens_row[:length].astype(np.int64)
    if ids.size:
        bad = np.flatnonzero((ids < 0) | (ids >= SPEECH_VOCAB_SIZE))
        if bad.size:
            raise ItemError(
                f"speech token id {int(ids[bad[0]])} at position {int(bad[0])} is outside [0, {SPEECH_VOCAB_SIZE})"
            )
    return ids


def _decoded(value, name: str):
    """A BYTES cell (UTF-8) as str; a value of another type is returned as it is."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ItemError(f"{name} is not valid UTF-8 ({error})") from None
    return value


def parse_text(value) -> str:
    """One item's ground-truth text: UTF-8 bytes (or str), non-empty."""
    value = _decoded(value, "GT_TEXT")
    if not isinstance(value, str):
        raise ItemError(f"GT_TEXT must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ItemError("GT_TEXT is empty")
    return value


def parse_language(value) -> Optional[str]:
    """One item's LANGUAGE cell -> one of ``ttsrl.language.LANGUAGES``, or None for an empty cell."""
    value = _decoded(value, "LANGUAGE")
    if not isinstance(value, str):
        raise ItemError(f"LANGUAGE must be a string, got {type(value).__name__}")
    if not value.strip():
        return None
    try:
        return normalize_language(value, "LANGUAGE")
    except ValueError as error:
        raise ItemError(str(error)) from None


class PromptRows:
    """The optional per-item prompt inputs of one request."""

    def __init__(self, request: dict, batch: int):
        self.present = "PROMPT_WAV" in request
        if not self.present:
            return
        for name in ("PROMPT_SAMPLE_RATE", "PROMPT_TEXT"):
            if name not in request:
                raise ItemError(f"PROMPT_WAV needs {name} too")
        self.waves = _rows(request, "PROMPT_WAV", batch)
        self.lens = (_rows(request, "PROMPT_WAV_LENS", batch)[:, 0] if "PROMPT_WAV_LENS" in request
                     else [self.waves.shape[1]] * batch)
        self.rates = _rows(request, "PROMPT_SAMPLE_RATE", batch)[:, 0]
        self.texts = _rows(request, "PROMPT_TEXT", batch)[:, 0]

    def prompt(self, row: int) -> Optional[SpeakerPrompt]:
        """Row ``row``'s prompt (None: zero length, the bank's), validated like a bank prompt."""
        if not self.present:
            return None
        length = int(self.lens[row])
        if length == 0:
            return None
        if not 0 < length <= self.waves.shape[1]:
            raise ItemError(f"PROMPT_WAV_LENS is {length} but PROMPT_WAV has {self.waves.shape[1]} samples")
        wave = np.ascontiguousarray(self.waves[row, :length], dtype=np.float32)
        rate = int(self.rates[row])
        text = str(_decoded(self.texts[row], "PROMPT_TEXT")).strip()
        try:
            check_prompt(wave, rate, text, "speaker prompt of this item")
        except PromptBankError as error:
            raise ItemError(str(error)) from None
        return SpeakerPrompt("", wave, rate, text)


TARGET_PREFIX = "TARGET_"
"""Optional per-item target inputs of plug-in components (``TARGET_EMOTION``: the item's
``extra_info["emotion"]``); an empty cell is no target."""


def parse_target(value, name: str) -> Optional[str]:
    value = _decoded(value, name)
    if not isinstance(value, str):
        raise ItemError(f"{name} must be a string, got {type(value).__name__}")
    return value.strip() or None


def token_items(requests: list, parameters: list, limits: Limits, bank: PromptBank, with_text: bool) -> list:
    """Parse TOKENS, TOKEN_LENS, GT_TEXT (``with_text``) and the per-item prompt inputs of
    every request -> one Item per row, with its tokens and its prompt (own or of ``bank``),
    or ``error``."""
    items = []
    for r, request in enumerate(requests):
        batch = request_batch_size(request, "TOKENS")
        try:
            tokens = _rows(request, "TOKENS", batch)
            lens = _rows(request, "TOKEN_LENS", batch)[:, 0] if "TOKEN_LENS" in request else [None] * batch
            texts = _rows(request, "GT_TEXT", batch)[:, 0] if with_text and "GT_TEXT" in request else None
            languages = _rows(request, "LANGUAGE", batch)[:, 0] if with_text and "LANGUAGE" in request else None
            targets = {name: _rows(request, name, batch)[:, 0] for name in request
                       if with_text and name.startswith(TARGET_PREFIX)}
            prompt_rows = PromptRows(request, batch)
        except ItemError as error:
            items.extend(Item(r, row, error=str(error)) for row in range(batch))
            continue
        prompt_name = (parameters[r] or {}).get(PROMPT_PARAMETER)
        for row in range(batch):
            item = Item(r, row)
            try:
                item.tokens = parse_tokens(tokens[row], lens[row], limits)
                if texts is not None:
                    item.text = parse_text(texts[row])
                if languages is not None:
                    item.language = parse_language(languages[row])
                for name, column in targets.items():
                    item.targets[name[len(TARGET_PREFIX):].lower()] = parse_target(column[row], name)
                item.speaker_prompt = prompt_rows.prompt(row)
                if item.speaker_prompt is not None and prompt_name:
                    raise ItemError(
                        f"the speaker prompt is given both ways: request parameter '{PROMPT_PARAMETER}' "
                        f"({prompt_name!r}, a prompt of the bank) and this row's PROMPT_WAV "
                        f"({item.speaker_prompt.wave.size} samples); send one (PROMPT_WAV_LENS 0 takes the named "
                        "bank prompt for a row)")
                if item.speaker_prompt is None:
                    item.prompt = bank.choose(item.tokens, str(prompt_name) if prompt_name else None)
                    item.prompt_name = BANK_PROMPT_PREFIX + bank.names[item.prompt]
                else:
                    sp = item.speaker_prompt
                    item.prompt_key = speaker_prompt_key(sp.wave, sp.sample_rate, sp.text)
                    item.prompt_name = f"item-{item.prompt_key[:16]}"
                    item.speaker_prompt = dataclasses.replace(sp, name=item.prompt_name)
            except (ItemError, KeyError) as error:
                item.error = str(error).strip("'\"")
                item.tokens = None
            items.append(item)
    return items


def wave_items(requests: list, default_rate: int, limits: Limits, with_language: bool = False) -> list:
    """Parse WAV (padded), WAV_LENS (optional), SAMPLE_RATE (optional, default
    ``default_rate``) and, ``with_language``, LANGUAGE (optional, ``parse_language``) of every
    request -> one Item per row, with ``wave``, ``rate`` (and ``language``) set, or ``error``."""
    items = []
    for r, request in enumerate(requests):
        batch = request_batch_size(request, "WAV")
        try:
            waves = _rows(request, "WAV", batch).astype(np.float32, copy=False)
            lens = _rows(request, "WAV_LENS", batch)[:, 0] if "WAV_LENS" in request else [None] * batch
            rate_rows = _rows(request, "SAMPLE_RATE", batch)[:, 0] if "SAMPLE_RATE" in request else None
            languages = (_rows(request, "LANGUAGE", batch)[:, 0] if with_language and "LANGUAGE" in request
                         else None)
        except ItemError as error:
            items.extend(Item(r, row, error=str(error), rate=default_rate) for row in range(batch))
            continue
        for row in range(batch):
            rate = int(rate_rows[row]) if rate_rows is not None else default_rate
            item = Item(r, row, rate=rate)
            length = waves.shape[1] if lens[row] is None else int(lens[row])
            if not 1000 <= rate <= 192000:
                item.error = f"SAMPLE_RATE {rate} is outside [1000, 192000]"
            elif not 0 < length <= waves.shape[1]:
                item.error = f"WAV_LENS is {length} but WAV has {waves.shape[1]} samples"
            elif length > limits.max_wave_seconds * rate:
                item.error = f"{length / rate:.1f} s of audio is over the maximum of {limits.max_wave_seconds} s"
            elif not np.all(np.isfinite(waves[row, :length])):
                item.error = "WAV has NaN or infinite samples"
            else:
                item.wave = waves[row, :length]
            if languages is not None and not item.error:
                try:
                    item.language = parse_language(languages[row])
                except ItemError as error:
                    item.error = str(error)
            items.append(item)
    return items

"""Speaker prompts for token2wav: loaded once at start-up, chosen per request deterministically.

A prompt bank is one of:

- a ``.wav`` file: one prompt; its transcript comes from a sibling ``.txt`` file
  (same stem) or, for CosyVoice's ``asset/zero_shot_prompt.wav``, the known text;
- a directory: every ``*.wav`` in it (sorted by name) with its sibling ``.txt``;
- a ``.jsonl`` file: one ``{"wav": PATH, "text": TRANSCRIPT, "name": NAME}`` per line
  (``name`` optional, default the wav's stem; relative paths are relative to the file).

Each request uses the prompt named by its ``prompt`` request parameter, or else
prompt number ``crc32(token ids as little-endian int32) % len(bank)``, so the same
tokens always get the same prompt and rewards are reproducible.

Per-item prompts (evaluation: each utterance in its own prompt's voice) come with the
request instead; ``check_prompt`` validates them like bank prompts, and ``PromptCache``
prepares each distinct one once (bounded LRU keyed by ``ttsrl.triton_client.speaker_prompt_key``).
"""
from __future__ import annotations

import collections
import json
import logging
import pathlib
import threading
import zlib
from typing import Callable, Optional

import numpy as np

from .engines import SpeakerPrompt

LOGGER = logging.getLogger(__name__)

DEFAULT_PROMPT_WAV = "CosyVoice/asset/zero_shot_prompt.wav"
KNOWN_TRANSCRIPTS = {"zero_shot_prompt.wav": "希望你以后能够做的比我还好呦。"}
SILENT_PROMPT_NAME = "silence"
MAX_PROMPT_SECONDS = 30.0
"""CosyVoice2's frontend asserts on longer prompts (and zero-shot prompts are a few seconds)."""
MIN_PROMPT_SECONDS = 1.0
"""The shortest prompt stage 0 accepts for training data (25 speech tokens). Not enforced by
``check_prompt``: requests and tests may condition on shorter prompts."""
MIN_PROMPT_SAMPLE_RATE = 16000
"""CosyVoice2's frontend resamples prompts down to 16 kHz and asserts on lower rates."""
DEFAULT_PROMPT_CACHE_SIZE = 512


class PromptBankError(ValueError):
    """A prompt bank entry that cannot be used (the message names file and line)."""


def _read_wav(path: pathlib.Path) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises its own error types
        raise PromptBankError(f"cannot read prompt wav {path}: {error}") from error
    wave = wave.mean(axis=1).astype(np.float32)
    if wave.size == 0:
        raise PromptBankError(f"prompt wav {path} is empty")
    return wave, int(rate)


def check_prompt(wave: np.ndarray, sample_rate: int, text: str, what: str) -> None:
    """Raise PromptBankError (naming ``what``) unless the prompt is usable: non-empty finite
    mono samples, a sample rate of at least MIN_PROMPT_SAMPLE_RATE, at most
    MAX_PROMPT_SECONDS long, and a non-empty transcript."""
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.size == 0:
        raise PromptBankError(f"{what}: no audio samples")
    if not MIN_PROMPT_SAMPLE_RATE <= int(sample_rate) <= 192000:
        raise PromptBankError(f"{what}: sample rate {sample_rate} Hz is outside [{MIN_PROMPT_SAMPLE_RATE}, 192000]")
    seconds = wave.size / int(sample_rate)
    if seconds > MAX_PROMPT_SECONDS:
        raise PromptBankError(f"{what}: {seconds:.1f} s long, over the maximum of {MAX_PROMPT_SECONDS:g} s for a prompt")
    if not np.all(np.isfinite(wave)):
        raise PromptBankError(f"{what}: audio has NaN or infinite samples")
    if not isinstance(text, str) or not text.strip():
        raise PromptBankError(f"{what}: no transcript (a zero-shot prompt needs the text spoken in it)")


def _transcript_for(wav: pathlib.Path) -> str:
    txt = wav.with_suffix(".txt")
    if txt.is_file():
        text = txt.read_text(encoding="utf-8").strip()
        if not text:
            raise PromptBankError(f"transcript {txt} is empty")
        return text
    if wav.name in KNOWN_TRANSCRIPTS:
        return KNOWN_TRANSCRIPTS[wav.name]
    raise PromptBankError(f"prompt {wav} has no transcript: write it to {txt}")


def _load_jsonl(path: pathlib.Path) -> list[SpeakerPrompt]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptBankError(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(record, dict) or not isinstance(record.get("wav"), str):
            raise PromptBankError(f"{path}:{number}: needs a string field 'wav'")
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise PromptBankError(f"{path}:{number}: needs a non-empty string field 'text'")
        wav = pathlib.Path(record["wav"])
        if not wav.is_absolute():
            wav = path.parent / wav
        if not wav.is_file():
            raise PromptBankError(f"{path}:{number}: wav {wav} not found")
        wave, rate = _read_wav(wav)
        prompts.append(SpeakerPrompt(str(record.get("name") or wav.stem), wave, rate, text.strip(), str(wav)))
    if not prompts:
        raise PromptBankError(f"{path}: no prompts")
    return prompts


def load_prompts(source: Optional[str]) -> list[SpeakerPrompt]:
    """Read a prompt bank (see the module doc). ``None``: CosyVoice's default prompt if
    present, else one second of silence named ``silence`` (enough for stand-in engines)."""
    if source is None:
        default = pathlib.Path(DEFAULT_PROMPT_WAV)
        if default.is_file():
            source = str(default)
        else:
            LOGGER.warning("no prompt bank given and %s not found: using a silent prompt", default)
            return [SpeakerPrompt(SILENT_PROMPT_NAME, np.zeros(16000, dtype=np.float32), 16000, "")]
    path = pathlib.Path(source)
    if path.is_dir():
        wavs = sorted(path.glob("*.wav"))
        if not wavs:
            raise PromptBankError(f"prompt directory {path} has no .wav files")
        prompts = []
        for wav in wavs:
            wave, rate = _read_wav(wav)
            prompts.append(SpeakerPrompt(wav.stem, wave, rate, _transcript_for(wav), str(wav)))
    elif path.suffix == ".jsonl" and path.is_file():
        prompts = _load_jsonl(path)
    elif path.suffix == ".wav" and path.is_file():
        wave, rate = _read_wav(path)
        prompts = [SpeakerPrompt(path.stem, wave, rate, _transcript_for(path), str(path))]
    else:
        raise PromptBankError(f"prompt bank {path} is not a .wav file, a .jsonl file or a directory of .wav files")
    names = [p.name for p in prompts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PromptBankError(f"prompt bank {path} has duplicate names: {duplicates}")
    return prompts


class PromptBank:
    """Prompts plus each engine's precomputed features of them (computed once)."""

    def __init__(self, prompts: list[SpeakerPrompt], prepare):
        if not prompts:
            raise PromptBankError("prompt bank is empty")
        self.prompts = list(prompts)
        self.names = [p.name for p in self.prompts]
        self._index = {name: i for i, name in enumerate(self.names)}
        self.features = [prepare(p) for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def choose(self, tokens: np.ndarray, name: Optional[str] = None) -> int:
        """Index of the prompt for a request: ``name`` if given, else a hash of the tokens."""
        if name:
            if name not in self._index:
                raise KeyError(f"unknown prompt {name!r}; the bank has {self.names}")
            return self._index[name]
        data = np.ascontiguousarray(np.asarray(tokens).astype("<i4")).tobytes()
        return zlib.crc32(data) % len(self.prompts)


class PromptCache:
    """Prepared features of per-item prompts, each distinct prompt prepared once.

    Bounded LRU keyed by the prompt's content hash: at most ``capacity`` prepared prompts
    are kept, the least recently used one is dropped first. Thread-safe; ``prepare`` runs
    outside the cache's own lock (callers serialize engine use themselves)."""

    def __init__(self, prepare: Callable[[SpeakerPrompt], object], capacity: int = DEFAULT_PROMPT_CACHE_SIZE):
        if capacity < 1:
            raise ValueError(f"prompt cache capacity must be >= 1, got {capacity}")
        self.prepare = prepare
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def features(self, key: str, prompt: SpeakerPrompt) -> object:
        """The engine's features of ``prompt`` (stored under ``key``), preparing it on a miss."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
        features = self.prepare(prompt)
        with self._lock:
            self._entries[key] = features
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return features

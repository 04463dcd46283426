"""Stand-in engines: a deterministic, weight-free token2wav / ASR / speaker pipeline.

They implement the engine interface of ``token2wav_server.engines`` so the whole
recipe (reward server, reward hook, evaluation, smoke runs) runs on CPU without
model weights, with transcripts and error rates a test can predict.

- Token -> audio: every speech token id ``i`` becomes ``SAMPLES_PER_TOKEN`` (640)
  samples at ``SAMPLE_RATE`` (16 kHz, i.e. 25 tokens/s like CosyVoice2) that all
  equal ``(i + 1) / 8192`` (exact in float32), except in a voice other than 0 (below).
- Voices (the speaker prompt made observable): the audio is spoken in one of ``VOICES``
  (16) voices; in voice ``v`` the last ``v * VOICE_GAP`` (8v) samples of every segment are
  0, so the stand-in speaker embedding (its fraction of non-zero samples) and
  ``wave_voice`` tell the voice, while the ASR reads the same text. Voice 0 is the plain
  audio above. ``prompt_voice`` gives the voice a prompt conditions: the voice of a prompt
  that is itself stand-in audio (a test writes prompts with ``tokens_to_wave(ids, voice)``),
  0 for silence, else ``1 + crc32(samples) % 15``.
- Audio -> text: a waveform cut into 640-sample segments, each constant at
  ``k / 8192`` with ``1 <= k <= 6561`` (up to its voice's trailing zeros), is stand-in audio; segment ``k`` reads as
  character ``TABLE[k - 1]``. Any other waveform (a real recording, a resampled
  or truncated one) transcribes as ``UNKNOWN_AUDIO_TEXT`` with ``nll`` 5.0, so it
  never crashes and is always scored the same.
- ``TABLE`` maps token id ``i`` to the character ``chr(0x4E00 + i)`` (the first
  6561 CJK unified ideographs: 一 丁 七 万 丈 三 上 下 ...). ``text_to_tokens(text)``
  inverts it: ids the pipeline transcribes as exactly ``text``.
- ``tokens_per_char`` (engine option, default 1): real speech has several tokens per
  character (CosyVoice2: 25 tokens/s, about 4-6 per Chinese character). With ``k``, the
  ASR reads each run of ``k`` segments as one character (the run's first id), and
  ``text_to_tokens(text, k)`` repeats each id ``k`` times.
- ASR confidence: stand-in audio has ``nll`` 0.0.
- Speaker embedding: a 4-dim vector of waveform statistics (mean, std, mean
  absolute first difference, fraction of non-zero samples), L2-normalized; equal
  for equal waveforms.
- Speech tokenizer: ``wave_to_tokens`` of stand-in audio, i.e. exactly the ids that
  made it (16 kHz); any other waveform raises ``ValueError`` ("not stand-in audio"),
  which the server reports as that item's error.

Voice tokens (engine option ``voice_tokens=true``; default false, everything above unchanged):
the stand-in's caricature of "the speech tokens carry the voice", so a policy must learn to
speak in its prompt's voice. Speech ids ``VOICE_TOKEN_BASE + v`` (``VOICE_TOKEN_BASE`` =
``SPEECH_VOCAB_SIZE - VOICES`` = 6545, ``0 <= v < VOICES``) are voice tokens: they make no
audio, and the audio of a sequence is its other (content) ids spoken in the voice of its
LAST voice token (voice 0 when it has none); the prompt's voice is not used for synthesis.
The ASR reads the content only, as before. The speech tokenizer prepends
``VOICE_TOKEN_BASE + voice`` to the content ids of a stand-in wave, so a zero-shot prompt's
speech tokens name its voice. The tokenizer and the speaker engine read trailing all-zero
segments as silence, which has no tokens (a prompt recording may end in silence: the smoke
prompts are a few characters padded with silence to the 1 s a prompt needs). The speaker embedding is one-hot: dimension ``v`` for
stand-in audio in voice ``v`` and dimension ``VOICES`` (a fixed "unknown" direction) for
any other waveform (real audio, silence, empty), so the cosine of two voices is 1 when they
are the same and 0 when not (two unknown waveforms: 1). ``targets_for(text, prompt_tokens)``
is the sequence a perfect zero-shot policy emits: the prompt's last voice token, then
``text_to_tokens(text)``. In this mode content ids must stay below ``VOICE_TOKEN_BASE``
(the last 16 characters of ``TABLE`` cannot be said; ``targets_for`` refuses them).

The token2wav engine counts ``prepare_prompt`` calls (``prepared_prompts``) and
records the prepared prompt (``StandinPrompt(name, voice)``) of each synthesized item
(``last_prompts``) so tests can check prompts are prepared once and chosen
deterministically; it synthesizes each item in its prompt's voice. Options
(``--engine-option KEY=VALUE``): ``delay_ms`` sleeps that long per batch in each
engine, to imitate model cost; ``item_delay_ms`` sleeps that long per item in token2wav (a
slot then serves at most 1000 / item_delay_ms items/s, however the items are batched: what
``benchmarks/bench_reward_routing.py`` gives each server); ``tokens_per_char`` and
``voice_tokens`` as above.
"""
from __future__ import annotations

import time
import zlib
from typing import NamedTuple, Optional

import numpy as np

from .engines import AsrResult, EngineOptions, Engines, SpeakerPrompt

SAMPLE_RATE = 16000
SAMPLES_PER_TOKEN = 640
SPEECH_VOCAB_SIZE = 6561  # equals ttsrl.speech_tokens.SPEECH_VOCAB_SIZE (kept numpy-only here)
SCALE = 8192.0
TABLE = "".join(chr(0x4E00 + i) for i in range(SPEECH_VOCAB_SIZE))
UNKNOWN_AUDIO_TEXT = "未知音频"
UNKNOWN_AUDIO_NLL = 5.0
VOICES = 16
VOICE_GAP = 8  # trailing zero samples per segment per voice step
VOICE_TOKEN_BASE = SPEECH_VOCAB_SIZE - VOICES  # 6545: first voice token (voice_tokens mode)
_CHAR_TO_ID = {char: index for index, char in enumerate(TABLE)}


def text_to_tokens(text: str, tokens_per_char: int = 1) -> list[int]:
    """Speech token ids that the stand-in pipeline (with ``tokens_per_char``) transcribes
    as exactly ``text``."""
    ids = []
    for position, char in enumerate(text):
        if char not in _CHAR_TO_ID:
            raise ValueError(
                f"character {char!r} at position {position} of {text!r} is not in the stand-in table "
                f"(U+4E00..U+{0x4E00 + SPEECH_VOCAB_SIZE - 1:04X})"
            )
        ids.extend([_CHAR_TO_ID[char]] * tokens_per_char)
    return ids


def is_voice_token(token: int) -> bool:
    """Whether ``token`` is a voice token (voice_tokens mode)."""
    return VOICE_TOKEN_BASE <= int(token) < SPEECH_VOCAB_SIZE


def split_voice(ids) -> tuple:
    """voice_tokens mode: (content ids, voice of the last voice token or 0) of a token sequence."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    voice_positions = np.flatnonzero(ids >= VOICE_TOKEN_BASE)
    voice = int(ids[voice_positions[-1]]) - VOICE_TOKEN_BASE if voice_positions.size else 0
    return ids[ids < VOICE_TOKEN_BASE], voice


def targets_for(text: str, prompt_tokens=(), tokens_per_char: int = 1) -> list[int]:
    """voice_tokens mode: what a perfect zero-shot policy says for ``text`` after a prompt
    with speech tokens ``prompt_tokens``: the prompt's last voice token (none when it has
    none), then ``text_to_tokens(text, tokens_per_char)``. Characters whose ids are voice
    tokens cannot be said and are refused."""
    voices = [int(t) for t in prompt_tokens if is_voice_token(t)]
    content = text_to_tokens(text, tokens_per_char)
    for position, token in enumerate(content[::tokens_per_char]):
        if is_voice_token(token):
            raise ValueError(f"character {text[position]!r} at position {position} of {text!r} is a voice token "
                             f"(id {token} >= {VOICE_TOKEN_BASE}) in voice_tokens mode and cannot be said")
    return voices[-1:] + content


def tokens_to_text(ids, tokens_per_char: int = 1) -> str:
    """What the stand-in pipeline transcribes for these speech token ids."""
    return "".join(TABLE[int(i)] for i in list(ids)[::tokens_per_char])


def tokens_to_wave(ids, voice: int = 0) -> np.ndarray:
    """The stand-in waveform of speech token ids (float32, ``SAMPLE_RATE``) in ``voice``."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= SPEECH_VOCAB_SIZE):
        raise ValueError(f"speech token ids must be in [0, {SPEECH_VOCAB_SIZE})")
    if not 0 <= voice < VOICES:
        raise ValueError(f"voice must be in [0, {VOICES}), got {voice}")
    segments = np.repeat(((ids + 1) / SCALE).astype(np.float32)[:, None], SAMPLES_PER_TOKEN, axis=1)
    if voice:
        segments[:, SAMPLES_PER_TOKEN - voice * VOICE_GAP:] = 0.0
    return segments.reshape(-1)


def _decode(wave, trailing_silence: bool = False) -> Optional[tuple]:
    """(token ids, voice) of a stand-in waveform, or None when it is not stand-in audio.
    ``trailing_silence``: all-zero segments at the end are silence, not tokens (voice_tokens
    mode reads prompts that way)."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0 or wave.size % SAMPLES_PER_TOKEN:
        return None
    segments = wave.reshape(-1, SAMPLES_PER_TOKEN)
    if trailing_silence:
        spoken = np.flatnonzero(np.any(segments != 0, axis=1))
        if spoken.size == 0:
            return None
        segments = segments[: spoken[-1] + 1]
    nonzero = np.flatnonzero(segments[0])
    if nonzero.size == 0:
        return None
    zeros = SAMPLES_PER_TOKEN - 1 - int(nonzero[-1])
    voice, rest = divmod(zeros, VOICE_GAP)
    if rest or voice >= VOICES:
        return None
    body = segments[:, :SAMPLES_PER_TOKEN - zeros]
    first = body[:, :1]
    if not np.array_equal(body, np.broadcast_to(first, body.shape)) or np.any(segments[:, body.shape[1]:]):
        return None
    codes = first[:, 0] * SCALE
    ids = np.rint(codes).astype(np.int64)
    if not np.array_equal(codes, ids.astype(np.float32)) or ids.min() < 1 or ids.max() > SPEECH_VOCAB_SIZE:
        return None
    return ids - 1, voice


def wave_to_tokens(wave: np.ndarray):
    """Token ids of a stand-in waveform (any voice), or None when it is not stand-in audio."""
    decoded = _decode(wave)
    return None if decoded is None else decoded[0]


def wave_voice(wave: np.ndarray) -> Optional[int]:
    """The voice of a stand-in waveform, or None when it is not stand-in audio."""
    decoded = _decode(wave)
    return None if decoded is None else decoded[1]


def prompt_voice(wave: np.ndarray) -> int:
    """The voice a speaker prompt's samples condition (see the module doc)."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    voice = wave_voice(wave)
    if voice is not None:
        return voice
    if not np.any(wave):
        return 0
    return 1 + zlib.crc32(np.ascontiguousarray(wave.astype("<f4")).tobytes()) % (VOICES - 1)


class StandinPrompt(NamedTuple):
    """The stand-in token2wav's prepared prompt: its name and the voice it conditions."""

    name: str
    voice: int


def _sleep(delay_ms: float) -> None:
    if delay_ms > 0:
        time.sleep(delay_ms / 1000.0)


class StandinToken2Wav:
    sample_rate = SAMPLE_RATE

    def __init__(self, delay_ms: float = 0.0, voice_tokens: bool = False, item_delay_ms: float = 0.0):
        self.delay_ms = delay_ms
        self.item_delay_ms = item_delay_ms
        self.voice_tokens = voice_tokens
        self.prepared_prompts = 0
        self.last_prompts: list = []

    def prepare_prompt(self, prompt: SpeakerPrompt) -> StandinPrompt:
        self.prepared_prompts += 1
        return StandinPrompt(prompt.name, prompt_voice(prompt.wave))

    def synthesize(self, token_batch: list, prompts: list) -> list:
        _sleep(self.delay_ms + self.item_delay_ms * len(token_batch))
        self.last_prompts = list(prompts)
        if self.voice_tokens:  # the tokens carry the voice; the prompt's is not used
            return [tokens_to_wave(*split_voice(tokens)) for tokens in token_batch]
        return [tokens_to_wave(tokens, prompt.voice if isinstance(prompt, StandinPrompt) else 0)
                for tokens, prompt in zip(token_batch, prompts)]


class StandinAsr:
    sample_rate = SAMPLE_RATE

    def __init__(self, delay_ms: float = 0.0, tokens_per_char: int = 1):
        if tokens_per_char < 1:
            raise ValueError(f"tokens_per_char must be >= 1, got {tokens_per_char}")
        self.delay_ms = delay_ms
        self.tokens_per_char = tokens_per_char

    def transcribe(self, waves: list, languages: list | None = None) -> list:
        _sleep(self.delay_ms)
        results = []
        for wave in waves:
            ids = wave_to_tokens(wave)
            if ids is None:
                results.append(AsrResult(UNKNOWN_AUDIO_TEXT, UNKNOWN_AUDIO_NLL))
            else:
                results.append(AsrResult(tokens_to_text(ids, self.tokens_per_char), 0.0))
        return results


class StandinSpeaker:
    sample_rate = SAMPLE_RATE

    def __init__(self, voice_tokens: bool = False):
        self.voice_tokens = voice_tokens

    def embed(self, waves: list) -> np.ndarray:
        if self.voice_tokens:  # one-hot of the voice; VOICES: not stand-in audio
            rows = np.zeros((len(waves), VOICES + 1), dtype=np.float32)
            for row, wave in enumerate(waves):
                decoded = _decode(wave, trailing_silence=True)
                rows[row, VOICES if decoded is None else decoded[1]] = 1.0
            return rows
        rows = []
        for wave in waves:
            wave = np.asarray(wave, dtype=np.float64).reshape(-1)
            if wave.size == 0:
                rows.append(np.zeros(4))
                continue
            diff = np.abs(np.diff(wave)).mean() if wave.size > 1 else 0.0
            row = np.array([wave.mean(), wave.std(), diff, np.count_nonzero(wave) / wave.size])
            norm = np.linalg.norm(row)
            rows.append(row / norm if norm > 0 else row)
        return np.stack(rows).astype(np.float32)


class StandinSpeechTokenizer:
    sample_rate = SAMPLE_RATE

    def __init__(self, voice_tokens: bool = False):
        self.voice_tokens = voice_tokens

    def tokenize(self, waves: list) -> list:
        results = []
        for wave in waves:
            decoded = _decode(wave, trailing_silence=self.voice_tokens)
            if decoded is None:
                raise ValueError("not stand-in audio: the stand-in speech tokenizer only reads audio made by "
                                 "tokens_to_wave (640 equal samples per token at 16 kHz)")
            ids, voice = decoded
            results.append(np.concatenate([[VOICE_TOKEN_BASE + voice], ids]) if self.voice_tokens else ids)
        return results


def create_engines(options: EngineOptions | None = None) -> Engines:
    """Factory for ``--engines token2wav_server.standin:create_engines``."""
    from .engines_cosyvoice2 import parse_bool_option  # the one reading of KEY=true|false options

    options = options or EngineOptions()
    delay_ms = float(options.extra.get("delay_ms", 0.0))
    item_delay_ms = float(options.extra.get("item_delay_ms", 0.0))
    if delay_ms < 0 or item_delay_ms < 0:
        raise ValueError(f"--engine-option delay_ms={delay_ms:g} / item_delay_ms={item_delay_ms:g}: must be >= 0")
    tokens_per_char = int(options.extra.get("tokens_per_char", 1))
    voice_tokens = parse_bool_option(options, "voice_tokens")
    speaker = StandinSpeaker(voice_tokens)
    return Engines(
        token2wav=StandinToken2Wav(delay_ms, voice_tokens, item_delay_ms),
        asr=StandinAsr(delay_ms, tokens_per_char),
        speaker=speaker if options.wants("speaker") else None,
        reward_speaker=speaker if options.wants("reward_speaker") and not options.wants("speaker") else None,
        asr_eval=StandinAsr(delay_ms, tokens_per_char) if options.wants("asr_eval") else None,
        speech_tokenizer=StandinSpeechTokenizer(voice_tokens),
    )


"""The served models: the batched token2wav -> ASR -> reward pipeline of one slot.

Nothing here imports PyTriton: ``Pipeline`` turns a list of requests (dicts of numpy
arrays, as Triton's dynamic batcher hands them over) into a list of output dicts, so the
logic is tested without a server; ``triton_worker`` binds these methods to Triton.

Bad input never fails a call: each item of each request is checked on its own
(``request_items``), and an item that fails gets its message in the ``ERRORS`` output
(empty string when fine) and NaN in its numeric outputs, while the other items of the batch
are served normally. (PyTriton 0.7 can only fail a whole batch of requests, so per-item
errors travel in-band.) An engine that fails on a batch is retried item by item, so one
pathological input fails only itself. A failure that can pass (``is_transient``: CUDA out of
memory) is retried up to ``TRANSIENT_ATTEMPTS`` times per item, after
``torch.cuda.empty_cache()`` where torch with CUDA is loaded and a short backoff; if it
persists, the item's ERRORS names it (request, row, number of tokens, prompt), the error
and the number of attempts. No score is made up for it. A rollout with zero speech tokens
is not an error: it gets ``reward_scoring.minimum_score``.

The reward's speaker similarity uses ``Engines.similarity_speaker`` (``reward_speaker``,
else ``speaker``); the ``speaker`` model (evaluation) always uses ``speaker``.

An item's own speaker prompt (``token2wav`` and ``token2wav_asr``) is prepared once per
distinct prompt (``prompt_bank.PromptCache``, keyed by ``ttsrl.triton_client.speaker_prompt_key``)
and conditions that item's audio; the others use the prompt bank. ``token2wav`` reports the
prompt it used in PROMPT_ID: the prompt's key, or ``bank:<name>``.
Wrong dtypes, missing inputs and mismatched batch sizes are refused by Triton itself,
per request, before they reach the model.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Optional

import numpy as np

from ttsrl.language import AUTO
from ttsrl.scoring import EmptyReferenceError
from ttsrl.triton_client import BANK_PROMPT_PREFIX, pad_rows

from .engines import Engines, SpeakerPrompt, resample
from .prompt_bank import DEFAULT_PROMPT_CACHE_SIZE, PromptBank, PromptCache
from .request_items import SPEECH_VOCAB_SIZE, Item, Limits, token_items, wave_items
from .reward_scoring import RewardConfig, minimum_score, score_item

LOGGER = logging.getLogger(__name__)
TRANSIENT_ATTEMPTS = 3
"""Attempts per item for a failure that can pass (out of memory), the first included."""
TRANSIENT_BACKOFF_S = 0.2
"""Wait before the second attempt; doubles for each further one."""
UTILITY_OUTPUTS = {"UTILITY_ERROR_RATE": "error_rate", "UTILITY_SIMILARITY": "similarity",
                   "UTILITY_CONFIDENCE": "confidence"}
"""token2wav_asr's per-component utility outputs of the built-in components -> reward component
(NaN: not weighted). A weighted plug-in component adds ``UTILITY_<NAME>`` and one output per
reported value (``utility_outputs``, ``report_outputs``)."""


def utility_outputs(config: RewardConfig) -> dict:
    """{output: component} of the utility outputs: every built-in component's, and those of the
    plug-ins ``config`` weights (a plug-in's outputs exist only where it is weighted, so a client
    reading the model config knows what is computed)."""
    return {**UTILITY_OUTPUTS, **{f"UTILITY_{name.upper()}": name for name in config.weighted_plugins()}}


def target_inputs(config: RewardConfig) -> dict:
    """{input: stage 0 field} of the per-item targets of the plug-ins ``config`` weights (``TARGET_<FIELD>``)."""
    return {f"TARGET_{spec.target.upper()}": spec.target for spec in config.weighted_plugins().values() if spec.target}


def report_outputs(config: RewardConfig) -> dict:
    """{output: reported key} of the plug-ins ``config`` weights (``<REPORT>`` upper case)."""
    return {report.upper(): report for spec in config.weighted_plugins().values() for report in spec.reports}


def _text_array(texts: list) -> np.ndarray:
    return np.array([[t.encode("utf-8")] for t in texts], dtype=object).reshape(len(texts), 1)


def _float_column(values: list) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(len(values), 1)


class Slot:
    """One model instance's engines plus its precomputed prompt features."""

    def __init__(self, engines: Engines, prompts: list, need_speaker: bool = False,
                 prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE):
        self.engines = engines
        self.lock = threading.Lock()  # the three models of a slot share its engines
        self.bank = PromptBank(prompts, engines.token2wav.prepare_prompt)
        self.prompt_cache = PromptCache(engines.token2wav.prepare_prompt, prompt_cache_size)
        self.item_prompt_embeddings = PromptCache(self._embed_prompt, prompt_cache_size)
        self.prompt_embeddings = None
        if need_speaker:
            speaker = engines.similarity_speaker
            if speaker is None:
                raise ValueError("the reward config weights speaker similarity but the engines have no speaker engine")
            waves = [resample(p.wave, p.sample_rate, speaker.sample_rate) for p in self.bank.prompts]
            self.prompt_embeddings = np.asarray(speaker.embed(waves), dtype=np.float32)

    def _embed_prompt(self, prompt: SpeakerPrompt) -> np.ndarray:
        speaker = self.engines.similarity_speaker
        wave = resample(prompt.wave, prompt.sample_rate, speaker.sample_rate)
        return np.asarray(speaker.embed([wave]), dtype=np.float32).reshape(-1)


def is_transient(error: BaseException) -> bool:
    """A failure that may pass on a retry: the device ran out of memory (torch's
    ``OutOfMemoryError``, or a RuntimeError / ORT error saying so)."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def _free_device_memory() -> None:
    """Return PyTorch's cached CUDA blocks, when an engine has loaded torch with CUDA."""
    torch = sys.modules.get("torch")  # never imported here: stand-in servers do not load torch
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing memory is best effort; the retry says what is left
        LOGGER.exception("torch.cuda.empty_cache() failed")


def _call(function, inputs: list, what: str) -> list:
    outputs = list(function(inputs))
    if len(outputs) != len(inputs):
        raise RuntimeError(f"{what} engine returned {len(outputs)} results for {len(inputs)} inputs")
    return outputs


def _run_one(function, x, item: Item, what: str, error: Exception) -> object:
    """Retry one item that failed with ``error`` while it is transient (at most
    TRANSIENT_ATTEMPTS attempts in all); a failure that persists sets ``item.error``."""
    attempts = 1
    while is_transient(error) and attempts < TRANSIENT_ATTEMPTS:
        _free_device_memory()
        time.sleep(TRANSIENT_BACKOFF_S * 2 ** (attempts - 1))
        LOGGER.warning("%s: %s on %s; attempt %d of %d", what, error, item.describe(), attempts + 1,
                       TRANSIENT_ATTEMPTS)
        attempts += 1
        try:
            return _call(function, [x], what)[0]
        except Exception as again:  # an engine may raise anything
            error = again
    item.error = (f"{what} failed on {item.describe()} after {attempts} attempt(s): "
                  f"{type(error).__name__}: {error}")
    LOGGER.error("%s", item.error, exc_info=error)
    return None


def _run_batched(function, inputs: list, items: list, what: str) -> list:
    """``function(inputs)`` for the whole batch; when that fails, item by item, so one
    pathological input fails only itself, each transient failure retried (``_run_one``).
    Failed items get an error and result None."""
    try:
        return _call(function, inputs, what)
    except Exception as error:  # an engine may raise anything
        if len(inputs) == 1:
            return [_run_one(function, inputs[0], items[0], what, error)]
        LOGGER.warning("%s failed on a batch of %d (%s); retrying item by item", what, len(inputs), error)
        if is_transient(error):
            _free_device_memory()
    results = []
    for x, item in zip(inputs, items):
        try:
            results.append(_call(function, [x], what)[0])
        except Exception as error:  # an engine may raise anything
            results.append(_run_one(function, x, item, what, error))
    return results


def _with_languages(asr):
    """``asr.transcribe`` over (wave, language) pairs, so a retry item by item keeps each language."""
    return lambda pairs: asr.transcribe([wave for wave, _ in pairs], [language for _, language in pairs])


class Pipeline:
    """The served computations of one slot."""

    def __init__(self, slot: Slot, reward_config: RewardConfig, limits: Limits = Limits()):
        self.slot = slot
        self.config = reward_config
        self.limits = limits

    # ---- stages --------------------------------------------------------------------
    def _prepare_item_prompts(self, items: list) -> None:
        """Features of each item's own prompt, each distinct prompt prepared once (cached)."""
        cache = self.slot.prompt_cache
        for item in items:
            if item.error or item.speaker_prompt is None or item.tokens is None or not item.tokens.size:
                continue
            item.prompt_features = _run_batched(lambda batch: [cache.features(it.prompt_key, it.speaker_prompt)
                                                               for it in batch],
                                                [item], [item], "preparing the speaker prompt")[0]

    def _synthesize(self, items: list) -> None:
        self._prepare_item_prompts(items)
        todo = [it for it in items if not it.error and it.tokens is not None and it.tokens.size]
        if not todo:
            return
        engine = self.slot.engines.token2wav
        bank = self.slot.bank.features

        def run(batch):
            return engine.synthesize([it.tokens for it in batch],
                                     [bank[it.prompt] if it.speaker_prompt is None else it.prompt_features
                                      for it in batch])

        waves = _run_batched(run, todo, todo, "token2wav")
        for item, wave in zip(todo, waves):
            if wave is not None:
                item.wave = np.asarray(wave, dtype=np.float32).reshape(-1)

    def _transcribe(self, items: list, rate: int, asr=None) -> None:
        """Each item's transcript, the ASR told the item's language (``auto`` for an item without one)."""
        asr = asr or self.slot.engines.asr
        todo = [it for it in items if not it.error and it.wave is not None]
        if not todo:
            return
        waves = [(resample(it.wave, rate, asr.sample_rate), it.language or AUTO) for it in todo]
        results = _run_batched(_with_languages(asr), waves, todo, "ASR")
        for item, result in zip(todo, results):
            if result is not None:
                item.transcript = str(result.text)
                item.nll = None if result.nll is None else float(result.nll)

    def _score_components(self, items: list, rate: int) -> None:
        """Each weighted plug-in component's engine on the batch's waves (batched, as the ASR)."""
        for name in self.config.weighted_plugins():
            engine = self.slot.engines.components.get(name)
            todo = [it for it in items if not it.error and it.wave is not None and it.wave.size]
            if not todo:
                continue
            if engine is None:
                for item in todo:
                    item.error = f"reward component {name!r} is weighted but this server has no engine for it"
                continue
            waves = [np.clip(resample(it.wave, rate, engine.sample_rate), -1.0, 1.0) for it in todo]
            field = self.config.plugins[name].target
            targets = [it.targets.get(field) if field else None for it in todo]
            results = _run_batched(lambda batch: engine.score([w for w, _ in batch], [t for _, t in batch]),
                                   list(zip(waves, targets)), todo, f"reward component {name}")
            for item, values in zip(todo, results):
                if values is not None:
                    item.component_values[name] = values

    def _embed(self, items: list, rate: int) -> None:
        todo = [it for it in items if not it.error and it.wave is not None]
        speaker = self.slot.engines.similarity_speaker
        if not todo or speaker is None or self.slot.prompt_embeddings is None:
            return
        waves = [resample(it.wave, rate, speaker.sample_rate) for it in todo]
        rows = _run_batched(lambda w: list(np.asarray(speaker.embed(w), dtype=np.float32)), waves, todo, "speaker")
        for item, row in zip(todo, rows):
            if row is None:
                continue
            if item.speaker_prompt is None:
                reference = self.slot.prompt_embeddings[item.prompt]
            else:
                cache = self.slot.item_prompt_embeddings
                reference = _run_batched(lambda batch: [cache.features(it.prompt_key, it.speaker_prompt)
                                                        for it in batch],
                                         [item], [item], "speaker embedding of the prompt")[0]
                if reference is None:
                    continue
            norm = float(np.linalg.norm(row) * np.linalg.norm(reference))
            item.similarity = float(np.dot(row, reference) / norm) if norm > 0 else 0.0

    # ---- served models -------------------------------------------------------------
    def token2wav_asr(self, requests: list, parameters: Optional[list] = None) -> list:
        """Inputs TOKENS, TOKEN_LENS, GT_TEXT (+ optional per-item PROMPT_WAV, PROMPT_WAV_LENS,
        PROMPT_SAMPLE_RATE, PROMPT_TEXT, and LANGUAGE: the error metric's language) -> REWARDS, TRANSCRIPTS, ERROR_RATE,
        SPEAKER_SIMILARITY, ASR_NLL, ERRORS, UTILITY_ERROR_RATE, UTILITY_SIMILARITY,
        UTILITY_CONFIDENCE, and per weighted plug-in component UTILITY_<NAME> and its reported
        values (one row per item; a built-in utility is NaN when its component is not weighted)."""
        parameters = parameters or [None] * len(requests)
        items = token_items(requests, parameters, self.limits, self.slot.bank, with_text=True)
        for item in items:
            if not item.error and "GT_TEXT" not in requests[item.request]:
                item.error = "GT_TEXT is missing"
        rate = self.slot.engines.token2wav.sample_rate
        with self.slot.lock:
            self._synthesize(items)
            self._transcribe(items, rate)
            if self.config.uses("similarity"):
                self._embed(items, rate)
            self._score_components(items, rate)
        scores = []
        for item in items:
            if item.error:
                scores.append(None)
                continue
            if item.tokens.size == 0:
                scores.append(minimum_score(self.config))
                continue
            try:
                scores.append(score_item(self.config, item.text, item.transcript, item.similarity, item.nll,
                                         item.language, item.component_values))
            except EmptyReferenceError as error:
                item.error = f"GT_TEXT has nothing to score: {error}"
                scores.append(None)
            except ValueError as error:
                item.error = f"scoring failed: {error}"
                scores.append(None)
        outputs = []
        for r in range(len(requests)):
            mine = [(it, s) for it, s in zip(items, scores) if it.request == r]
            outputs.append(
                {
                    "REWARDS": _float_column([s.reward if s else math.nan for _, s in mine]),
                    "TRANSCRIPTS": _text_array([it.transcript for it, _ in mine]),
                    "ERROR_RATE": _float_column([s.error_rate if s else math.nan for _, s in mine]),
                    "SPEAKER_SIMILARITY": _float_column([s.similarity if s else math.nan for _, s in mine]),
                    "ASR_NLL": _float_column([s.nll if s else math.nan for _, s in mine]),
                    "ERRORS": _text_array([it.error for it, _ in mine]),
                    **{output: _float_column([s.utility(component) if s else math.nan for _, s in mine])
                       for output, component in utility_outputs(self.config).items()},
                    **{output: _float_column([s.reports.get(key, math.nan) if s else math.nan for _, s in mine])
                       for output, key in report_outputs(self.config).items()},
                }
            )
        return outputs

    def _prompt_id(self, item: Item) -> str:
        if item.error or item.tokens is None:
            return ""
        return item.prompt_key if item.speaker_prompt is not None else BANK_PROMPT_PREFIX + self.slot.bank.names[item.prompt]

    def token2wav(self, requests: list, parameters: Optional[list] = None) -> list:
        """Inputs TOKENS, TOKEN_LENS (+ optional per-item PROMPT_WAV, PROMPT_WAV_LENS,
        PROMPT_SAMPLE_RATE, PROMPT_TEXT) -> WAV (padded with zeros), WAV_LENS, SAMPLE_RATE,
        PROMPT_ID, ERRORS."""
        parameters = parameters or [None] * len(requests)
        items = token_items(requests, parameters, self.limits, self.slot.bank, with_text=False)
        for item in items:
            if not item.error and item.tokens.size == 0:
                item.error = "no speech tokens to synthesize"
        with self.slot.lock:
            self._synthesize(items)
        rate = self.slot.engines.token2wav.sample_rate
        outputs = []
        for r in range(len(requests)):
            mine = [it for it in items if it.request == r]
            waves, lens = pad_rows([it.wave for it in mine], np.float32)
            outputs.append(
                {
                    "WAV": waves,
                    "WAV_LENS": lens,
                    "SAMPLE_RATE": np.full((len(mine), 1), rate, dtype=np.int32),
                    "PROMPT_ID": _text_array([self._prompt_id(it) for it in mine]),
                    "ERRORS": _text_array([it.error for it in mine]),
                }
            )
        return outputs

    def _run_on_waves(self, engine, method, items: list, what: str) -> list:
        """``method`` (an engine's batch method) on the good items' waves, resampled to the
        engine's rate, under the slot lock -> results aligned with ``items`` (None: no result)."""
        results = [None] * len(items)
        todo = [i for i, it in enumerate(items) if not it.error]
        if todo:
            with self.slot.lock:
                waves = [resample(items[i].wave, items[i].rate, engine.sample_rate) for i in todo]
                outputs = _run_batched(method, waves, [items[i] for i in todo], what)
            for i, output in zip(todo, outputs):
                results[i] = output
        return results

    def asr(self, requests: list, parameters: Optional[list] = None, which: str = "asr") -> list:
        """Inputs WAV (FP32, padded), WAV_LENS (optional), SAMPLE_RATE (optional, default the
        ASR's rate), LANGUAGE (optional: each item's language, told to the ASR; empty or absent:
        auto) -> TRANSCRIPTS, ASR_NLL, ERRORS. ``which``: ``asr`` or ``asr_eval``."""
        asr = getattr(self.slot.engines, which)
        items = wave_items(requests, asr.sample_rate, self.limits, with_language=True)
        todo = [i for i, it in enumerate(items) if not it.error]
        results = [None] * len(items)
        if todo:
            with self.slot.lock:
                waves = [(resample(items[i].wave, items[i].rate, asr.sample_rate), items[i].language or AUTO)
                         for i in todo]
                for i, output in zip(todo, _run_batched(_with_languages(asr), waves, [items[i] for i in todo], which)):
                    results[i] = output
        for item, result in zip(items, results):
            if result is not None:
                item.transcript = str(result.text)
                item.nll = None if result.nll is None else float(result.nll)
        outputs = []
        for r in range(len(requests)):
            mine = [it for it in items if it.request == r]
            outputs.append(
                {
                    "TRANSCRIPTS": _text_array([it.transcript for it in mine]),
                    "ASR_NLL": _float_column([math.nan if it.nll is None else it.nll for it in mine]),
                    "ERRORS": _text_array([it.error for it in mine]),
                }
            )
        return outputs

    def speaker(self, requests: list, parameters: Optional[list] = None) -> list:
        """Inputs WAV, WAV_LENS, SAMPLE_RATE (as ``asr``) -> EMBEDDING (FP32, one speaker
        embedding per item; NaN for a failed item), ERRORS."""
        engine = self.slot.engines.speaker
        items = wave_items(requests, engine.sample_rate, self.limits)

        def embed(waves):
            return list(np.asarray(engine.embed(waves), dtype=np.float32).reshape(len(waves), -1))

        embeddings = self._run_on_waves(engine, embed, items, "speaker")
        outputs = []
        for r in range(len(requests)):
            mine = [(it, e) for it, e in zip(items, embeddings) if it.request == r]
            width = max([e.size for _, e in mine if e is not None] + [1])
            rows = np.full((len(mine), width), math.nan, dtype=np.float32)
            for i, (_, embedding) in enumerate(mine):
                if embedding is not None:
                    rows[i, : embedding.size] = embedding
            outputs.append({"EMBEDDING": rows, "ERRORS": _text_array([it.error for it, _ in mine])})
        return outputs

    def speech_tokenizer(self, requests: list, parameters: Optional[list] = None) -> list:
        """Inputs WAV, WAV_LENS, SAMPLE_RATE (as ``asr``) -> TOKENS (INT32 speech token ids,
        zero-padded), TOKEN_LENS, ERRORS."""
        engine = self.slot.engines.speech_tokenizer
        items = wave_items(requests, engine.sample_rate, self.limits)
        token_lists = self._run_on_waves(engine, engine.tokenize, items, "speech_tokenizer")
        for item, ids in zip(items, token_lists):
            if ids is None:
                continue
            ids = np.asarray(ids).reshape(-1)
            if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= SPEECH_VOCAB_SIZE):
                item.error = f"speech_tokenizer returned ids outside [0, {SPEECH_VOCAB_SIZE})"
            else:
                item.tokens = ids.astype(np.int32)
        outputs = []
        for r in range(len(requests)):
            mine = [it for it in items if it.request == r]
            tokens, lens = pad_rows([it.tokens for it in mine], np.int32)
            outputs.append({"TOKENS": tokens, "TOKEN_LENS": lens, "ERRORS": _text_array([it.error for it in mine])})
        return outputs

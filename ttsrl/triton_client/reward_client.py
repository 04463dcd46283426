"""The pooled asynchronous client of the reward model (``token2wav_asr``): what the GRPO
reward hook (reward_tts.py) scores rollouts with.

One client per event loop (``get_client``) keeps every rollout veRL awaits in flight:
rollouts scored at the same moment are coalesced into batched requests, each sent to the
server with the least outstanding work per slot (``pool``: load-aware routing, servers on this
node first), and transient failures (connection refused, a server restarting,
timeouts) are retried with backoff within a budget, then ``RewardServerUnavailable`` is
raised. An input the server refuses raises ``RewardRequestError`` at once.

A rollout may bring its own speaker prompt (``SpeakerPromptAudio``): the server then decodes
it in that voice and measures similarity to that prompt. Rollouts with and without prompts
share requests (PROMPT_WAV zero-padded, PROMPT_WAV_LENS 0 for a row that takes the bank's
voice). The audio travels with every rollout; the server hashes it and prepares each
distinct prompt once (its PromptCache).

A rollout may name its language (``score(..., language="en")``: zh, en, ja, ko,
``ttsrl.language``), which picks the server's error metric for it (the LANGUAGE input). A
request whose rollouts name none sends no LANGUAGE, so servers older than that input still
answer it; a row without a language in a request with others gets an empty cell (the server's
configured metric).
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ttsrl.language import normalize_language

from .pool import Endpoint, EndpointPool, RoutingError, model_slots
from .ready import server_ready
from .wire import REWARD_MODEL, SpeakerPromptAudio, infer_request, pad_rows, text_column, text_of

COMPONENT_OUTPUTS = {"SPEAKER_SIMILARITY": "speaker_similarity", "ASR_NLL": "asr_nll",
                     "UTILITY_ERROR_RATE": "utility_error_rate", "UTILITY_SIMILARITY": "utility_similarity",
                     "UTILITY_CONFIDENCE": "utility_confidence"}
"""Optional reward components of every server: server output -> result key (NaN from the
server: switched off). The ``utility_*`` keys are each weighted component's utility in [0, 1]
(what veRL's ``gdpo`` estimator normalizes one by one: ``algorithm.gdpo_reward_keys``). A
server's weighted plug-in components (``UTILITY_<NAME>`` and their reported values, declared
only when weighted) are read from its model config (``server_component_outputs``): every FP32
output but REWARDS and ERROR_RATE is a component, its key the output name in lower case."""
UTILITY_KEYS = tuple(key for key in COMPONENT_OUTPUTS.values() if key.startswith("utility_"))
FLOAT_OUTPUTS = ["REWARDS", "ERROR_RATE", *COMPONENT_OUTPUTS]
OUTPUTS = ["REWARDS", "TRANSCRIPTS", "ERROR_RATE", "SPEAKER_SIMILARITY", "ASR_NLL", "ERRORS",
           "UTILITY_ERROR_RATE", "UTILITY_SIMILARITY", "UTILITY_CONFIDENCE"]
READY_CHECK_TIMEOUT_S = 5.0


def server_target_inputs(config) -> dict:
    """{input: extra_info field} of the optional ``TARGET_<FIELD>`` inputs a ``token2wav_asr``
    model config declares (plug-in components' per-item targets: ``TARGET_EMOTION`` -> ``emotion``)."""
    if isinstance(config, dict):
        names = [i.get("name") for i in config.get("input") or []]
    else:
        names = [i.name for i in getattr(config, "config", config).input]
    return {name: name[len("TARGET_"):].lower() for name in names if name and name.startswith("TARGET_")}


def server_component_outputs(config) -> dict:
    """{output: key} of the component outputs in a ``token2wav_asr`` model config (tritonclient's
    HTTP dict or gRPC ``ModelConfigResponse``): COMPONENT_OUTPUTS, then every other FP32 output
    but REWARDS and ERROR_RATE (plug-in components), keyed by its name in lower case."""
    if isinstance(config, dict):
        outputs = [(o.get("name"), o.get("data_type")) for o in config.get("output") or []]
    else:
        from tritonclient.grpc import model_config_pb2

        outputs = [(o.name, model_config_pb2.DataType.Name(o.data_type))
                   for o in getattr(config, "config", config).output]
    found = dict(COMPONENT_OUTPUTS)
    for name, data_type in outputs:
        if data_type == "TYPE_FP32" and name not in ("REWARDS", "ERROR_RATE") and name not in found:
            found[name] = name.lower()
    return found
LOGGER = logging.getLogger(__name__)


class RewardServerUnavailable(RuntimeError):
    """No reward server answered within the retry budget (or at start-up)."""


class RewardRequestError(ValueError):
    """The server refused this rollout's input (bad ground truth, bad tokens...)."""


@dataclass(frozen=True)
class RewardSettings:
    urls: tuple
    model_name: str = REWARD_MODEL
    request_timeout_s: float = 120.0
    retry_budget_s: float = 300.0
    startup_wait_s: float = 60.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    prompt: Optional[str] = None
    max_batch: int = 32
    batch_window_ms: float = 5.0
    routing: str = "least_work"  # pool.ROUTINGS: least outstanding work per slot, or round_robin


def _is_request_error(error: Exception) -> bool:
    """Errors that retrying cannot fix: the server understood the request and refused it."""
    status = getattr(error, "status", None)
    status = str(status() or "") if callable(status) else ""
    text = str(error).lower()
    if "not found" in text or "not ready" in text or "unknown model" in text:
        return False  # a server still loading its models after a restart: transient
    return status in ("StatusCode.INVALID_ARGUMENT", "400")


class RewardClient:
    """Pooled Triton clients for one event loop: load-aware routing over servers, failover, retries."""

    def __init__(self, settings: RewardSettings):
        self.settings = settings
        self.pool = EndpointPool(settings.urls, settings.routing)
        self._ready: Optional[asyncio.Task] = None
        self.components: tuple = ()
        self.component_outputs: dict = dict(COMPONENT_OUTPUTS)  # the servers' (server_component_outputs)
        self.target_inputs: dict = {}  # TARGET_<FIELD> inputs of the servers -> extra_info field
        self.max_batch = max(1, settings.max_batch)
        self._pending: list = []
        self._flush_handle = None
        self._tasks: set = set()

    # ---- start-up ------------------------------------------------------------------
    async def _endpoint_ready(self, endpoint: Endpoint) -> bool:
        ready = await asyncio.to_thread(server_ready, endpoint.url, timeout_s=READY_CHECK_TIMEOUT_S,
                                        model=self.settings.model_name)
        if not ready:
            endpoint.reset(endpoint.client)  # a connection opened before the server went away
        return ready

    async def _check(self) -> None:
        deadline = time.monotonic() + self.settings.startup_wait_s
        waiting = list(self.pool)
        while True:
            states = await asyncio.gather(*(self._endpoint_ready(e) for e in waiting))
            waiting = [e for e, ok in zip(waiting, states) if not ok]
            if not waiting:
                break
            if time.monotonic() >= deadline:
                names = ", ".join(e.url for e in waiting)
                raise RewardServerUnavailable(
                    f"reward server not answering at {names} (model {self.settings.model_name!r} not ready after "
                    f"{self.settings.startup_wait_s:.0f} s): start it with `bash run.sh 1 1` or check the URL "
                    f"(REWARD_SERVER_URL / reward_kwargs.server_url)"
                )
            await asyncio.sleep(1.0)
        # No request may exceed the server's batch limit; routing weighs each server by its slots.
        self.max_batch = min(self.max_batch, await self._read_server_configs())
        LOGGER.info("reward servers (routing %s, at most %d rollouts per request): %s", self.settings.routing,
                    self.max_batch, self.pool.describe())
        # Which optional components does the server compute? (NaN = switched off.)
        probe = (await self._infer_with_retries([(np.zeros(1, dtype=np.int64), "一", None, None, None)]))[0]
        if isinstance(probe, Exception):
            raise probe
        # (A plug-in component's outputs exist only where the server weights it: always on.)
        self.components = tuple(key for output, key in self.component_outputs.items()
                                if output not in COMPONENT_OUTPUTS or math.isfinite(probe[output]))

    async def _read_server_configs(self) -> int:
        """Each server's slots (``pool.model_slots``) from its model config; the smallest
        ``max_batch_size`` of them (the most rollouts one request may carry)."""
        limits = []
        for endpoint in self.pool:
            model = self.settings.model_name
            config = await endpoint.connect().get_model_config(model)
            try:
                endpoint.slots = model_slots(config, endpoint.url, model)
            except RoutingError as error:
                raise RewardServerUnavailable(str(error)) from None
            size = config["max_batch_size"] if isinstance(config, dict) else config.config.max_batch_size
            limits.append(int(size) if int(size) > 0 else 1)
            outputs = server_component_outputs(config)
            if endpoint is self.pool.endpoints[0]:
                self.component_outputs = outputs
                self.target_inputs = server_target_inputs(config)
            elif outputs != self.component_outputs:
                raise RewardServerUnavailable(
                    f"reward servers disagree on their reward components: {endpoint.url} has "
                    f"{sorted(outputs.values())}, another {sorted(self.component_outputs.values())}; start them "
                    "with the same reward config and preset")
        return min(limits)

    async def ensure_ready(self) -> None:
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._check())
        try:
            await asyncio.shield(self._ready)
        except Exception:
            self._ready = None  # let a later call check again
            raise

    # ---- scoring -------------------------------------------------------------------
    async def _infer_once(self, endpoint: Endpoint, client, batch: list, timeout: float) -> list:
        """One request for a batch of (ids, ground truth, prompt or None, language or None): a
        result dict or a RewardRequestError per item (the server reports bad items in-band)."""
        tokens, lengths = pad_rows([np.asarray(ids) for ids, *_ in batch], np.int32)
        arrays = {"TOKENS": tokens, "TOKEN_LENS": lengths, "GT_TEXT": text_column(text for _, text, *_ in batch)}
        languages = [language for _, _, _, language, _ in batch]
        if any(language is not None for language in languages):
            arrays["LANGUAGE"] = text_column("" if language is None else language for language in languages)
        prompts = [prompt for _, _, prompt, _, _ in batch]
        for name, field in self.target_inputs.items():  # plug-in components' per-item targets
            values = [(targets or {}).get(field) for *_, targets in batch]
            values = [v if isinstance(v, str) and v.strip() else None for v in values]  # None/NaN: no target
            if any(value is not None for value in values):
                arrays[name] = text_column("" if value is None else str(value) for value in values)
        if any(prompt is not None for prompt in prompts):
            # Rows without a prompt get length 0: the server's bank voice for that row.
            waves, wave_lens = pad_rows([None if p is None else p.wave for p in prompts], np.float32)
            arrays.update(
                PROMPT_WAV=waves, PROMPT_WAV_LENS=wave_lens,
                PROMPT_SAMPLE_RATE=np.array([[0 if p is None else p.sample_rate] for p in prompts], dtype=np.int32),
                PROMPT_TEXT=text_column("" if p is None else p.text for p in prompts))
        names = [*OUTPUTS, *(name for name in self.component_outputs if name not in OUTPUTS)]
        inputs, outputs = infer_request(endpoint.scheme, arrays, names)
        parameters = {"prompt": self.settings.prompt} if self.settings.prompt else None
        result = await asyncio.wait_for(
            client.infer(self.settings.model_name, inputs, outputs=outputs, parameters=parameters),
            timeout=timeout,
        )
        columns = {name: result.as_numpy(name).reshape(-1) for name in names}
        if any(len(column) != len(batch) for column in columns.values()):
            raise RuntimeError(f"reward server {endpoint.url} answered {len(columns['REWARDS'])} rows for "
                               f"{len(batch)} rollouts")
        items = []
        for row in range(len(batch)):
            error = text_of(columns["ERRORS"][row])
            if error:
                items.append(RewardRequestError(f"reward server {endpoint.url} refused the rollout: {error}"))
                continue
            item = {name: float(columns[name][row]) for name in [*FLOAT_OUTPUTS, *self.component_outputs]}
            item["TRANSCRIPT"] = text_of(columns["TRANSCRIPTS"][row])
            items.append(item)
        return items

    async def _infer_with_retries(self, batch: list) -> list:
        settings = self.settings
        start = time.monotonic()
        delay = settings.backoff_initial_s
        attempts = 0
        last_errors: dict = {}
        while True:
            endpoint = self.pool.pick()
            client = endpoint.connect()
            attempts += 1
            try:
                # An attempt never outlives the retry budget: a hung server (accepts, never
                # answers) must not hold rollouts for request_timeout_s past it.
                remaining = settings.retry_budget_s - (time.monotonic() - start)
                with endpoint.in_flight(len(batch)):
                    return await self._infer_once(endpoint, client, batch,
                                                  min(settings.request_timeout_s, max(1.0, remaining)))
            except Exception as error:  # tritonclient / grpc / aiohttp raise many types
                if _is_request_error(error):
                    raise RewardRequestError(f"reward server {endpoint.url} refused the request: {error}") from error
                last_errors[endpoint.url] = f"{type(error).__name__}: {error}".strip()
                endpoint.failed_until = time.monotonic() + delay
                endpoint.reset(client)
            elapsed = time.monotonic() - start
            if elapsed + delay > settings.retry_budget_s:
                details = "; ".join(f"{url}: {text[:300]}" for url, text in last_errors.items())
                raise RewardServerUnavailable(
                    f"reward server failed {attempts} time(s) over {elapsed:.1f} s (retry budget "
                    f"{settings.retry_budget_s:.0f} s); no reward is returned for these rollouts. Last errors: "
                    f"{details}"
                )
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, settings.backoff_max_s)

    # ---- coalescing ----------------------------------------------------------------
    # Rollouts scored at the same moment (veRL awaits a whole batch of them) travel
    # together: one Triton request of up to max_batch items, sent after batch_window_ms
    # or as soon as it is full. Per-request transport costs more than the scoring itself
    # with cheap engines, so this is where the throughput comes from.
    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list) -> None:
        try:
            results = await self._infer_with_retries([item for *item, _ in batch])
        except BaseException as error:  # noqa: B036 - every waiting rollout must learn of the failure
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def score(self, ids: np.ndarray, ground_truth: str, prompt: Optional[SpeakerPromptAudio] = None,
                    language: Optional[str] = None, targets: Optional[dict] = None) -> dict:
        """One rollout's server outputs: REWARDS, ERROR_RATE, SPEAKER_SIMILARITY, ASR_NLL, the
        UTILITY_* outputs and TRANSCRIPT. ``prompt``: the rollout's own speaker prompt (None:
        the server's bank voice). ``language``: the language of its error metric (zh, en, ja,
        ko or an alias; None: the server's configured metric); an unknown one is a ValueError
        here, before anything is sent. ``targets``: the rollout's ``extra_info``, from which each
        per-item target input the server declares (``target_inputs``) takes its field."""
        if language is not None:
            language = normalize_language(language, "RewardClient.score")
        await self.ensure_ready()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((ids, ground_truth, prompt, language, targets, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self.settings.batch_window_ms / 1000.0, self._flush)
        return await future

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()


_CLIENTS: dict = {}


def get_client(settings: RewardSettings) -> RewardClient:
    """The pooled client of the running event loop for these settings."""
    loop = asyncio.get_running_loop()
    key = (id(loop), settings)
    client = _CLIENTS.get(key)
    if client is None or client._loop is not loop:
        client = RewardClient(settings)
        client._loop = loop
        _CLIENTS[key] = client
    return client


async def close_clients() -> None:
    """Close the clients of the running event loop (tests, CLI)."""
    loop = asyncio.get_running_loop()
    for key in [k for k, c in _CLIENTS.items() if c._loop is loop]:
        await _CLIENTS.pop(key).close()

"""veRL reward hook: score CosyVoice2 speech-token rollouts with the Triton reward server.

veRL 0.9.1 settings (stage 2 of run.sh)::

    reward.reward_manager.name=naive
    reward.custom_reward_function.path=reward_tts.py
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.server_url=grpc://127.0.0.1:8001   # optional

``compute_score`` is an ``async def``: veRL's reward loop awaits it for every rollout at
once, and one pooled Triton client per event loop keeps all of them in flight so Triton
batches them. It returns a dict (``score`` plus components), which veRL logs per key.

Settings (``reward_kwargs`` first, then environment, then default):

==================  =========================  ===========================================
kwarg               environment                meaning
==================  =========================  ===========================================
server_url          REWARD_SERVER_URL          ``grpc://host:port`` or ``http://host:port``;
                                               comma-separated for several servers
                                               (round robin, failover). Default
                                               ``grpc://127.0.0.1:8001``.
protocol            REWARD_PROTOCOL            ``grpc`` / ``http`` for URLs without scheme
model_name          REWARD_MODEL_NAME          Triton model, default ``token2wav_asr``
request_timeout_s   REWARD_REQUEST_TIMEOUT_S   one attempt's limit, default 120 (capped by
                                               what is left of the retry budget)
retry_budget_s      REWARD_RETRY_BUDGET_S      keep retrying transient failures this long
                                               (exponential backoff), then raise; default 300
startup_wait_s      REWARD_STARTUP_WAIT_S      how long the first call waits for every server
                                               to be ready before naming the one that is not;
                                               default 60
prompt              REWARD_PROMPT              speaker prompt name (default: the server picks
                                               one from a hash of the tokens)
==================  =========================  ===========================================

Failures are loud: a rollout is never given a made-up score. Transient failures
(connection refused, server restarting, timeouts) are retried with backoff within the
budget, then ``RewardServerUnavailable`` is raised, failing the training step. An input
the server refuses raises ``RewardRequestError`` at once. A response with no speech
tokens gets the documented minimum (score 0, error rate 1) without a server call.

CLI: ``python reward_tts.py --input FILE.jsonl`` (lines with ``text`` and ``code``).
"""
# No `from __future__ import annotations`: veRL loads this file with a module name that
# is not in sys.modules, where dataclasses cannot resolve string annotations.
import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# veRL imports this file by path inside Ray workers, whose sys.path need not contain the
# repository root; ttsrl lives next to this file, so add its directory explicitly.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from ttsrl.speech_tokens import parse_speech_tokens  # noqa: E402
from ttsrl.triton_client import parse_urls  # noqa: E402  (re-exported: the hook's URL format)

DEFAULT_SERVER_URL = "grpc://127.0.0.1:8001"
DEFAULT_MODEL_NAME = "token2wav_asr"
COMPONENT_OUTPUTS = {"SPEAKER_SIMILARITY": "speaker_similarity", "ASR_NLL": "asr_nll"}
OUTPUTS = ["REWARDS", "TRANSCRIPTS", "ERROR_RATE", "SPEAKER_SIMILARITY", "ASR_NLL", "ERRORS"]
MIN_SCORE = 0.0


class RewardServerUnavailable(RuntimeError):
    """No reward server answered within the retry budget (or at start-up)."""


class RewardRequestError(ValueError):
    """The server refused this rollout's input (bad ground truth, bad tokens...)."""


@dataclass(frozen=True)
class Settings:
    urls: tuple
    model_name: str = DEFAULT_MODEL_NAME
    request_timeout_s: float = 120.0
    retry_budget_s: float = 300.0
    startup_wait_s: float = 60.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    prompt: Optional[str] = None
    max_batch: int = 32
    batch_window_ms: float = 5.0


def _setting(kwargs: dict, key: str, env: str, default):
    if kwargs.get(key) is not None:
        return kwargs[key]
    if os.environ.get(env):
        return os.environ[env]
    return default


def settings_from(kwargs: dict) -> Settings:
    protocol = _setting(kwargs, "protocol", "REWARD_PROTOCOL", None)
    return Settings(
        urls=parse_urls(_setting(kwargs, "server_url", "REWARD_SERVER_URL", DEFAULT_SERVER_URL), protocol),
        model_name=str(_setting(kwargs, "model_name", "REWARD_MODEL_NAME", DEFAULT_MODEL_NAME)),
        request_timeout_s=float(_setting(kwargs, "request_timeout_s", "REWARD_REQUEST_TIMEOUT_S", 120.0)),
        retry_budget_s=float(_setting(kwargs, "retry_budget_s", "REWARD_RETRY_BUDGET_S", 300.0)),
        startup_wait_s=float(_setting(kwargs, "startup_wait_s", "REWARD_STARTUP_WAIT_S", 60.0)),
        backoff_initial_s=float(kwargs.get("backoff_initial_s", 0.2)),
        backoff_max_s=float(kwargs.get("backoff_max_s", 10.0)),
        prompt=_setting(kwargs, "prompt", "REWARD_PROMPT", None) or None,
        max_batch=int(_setting(kwargs, "max_batch", "REWARD_MAX_BATCH", 32)),
        batch_window_ms=float(_setting(kwargs, "batch_window_ms", "REWARD_BATCH_WINDOW_MS", 5.0)),
    )


def _is_request_error(error: Exception) -> bool:
    """Errors that retrying cannot fix: the server understood the request and refused it."""
    status = getattr(error, "status", None)
    status = str(status() or "") if callable(status) else ""
    text = str(error).lower()
    if "not found" in text or "not ready" in text or "unknown model" in text:
        return False  # a server still loading its models after a restart: transient
    return status in ("StatusCode.INVALID_ARGUMENT", "400")


@dataclass
class _Endpoint:
    scheme: str
    address: str
    client: object = None
    failed_until: float = 0.0
    retired: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def connect(self):
        if self.client is None:
            if self.scheme == "grpc":
                import tritonclient.grpc.aio as grpc_aio

                self.client = grpc_aio.InferenceServerClient(url=self.address)
            else:
                import tritonclient.http.aio as http_aio

                self.client = http_aio.InferenceServerClient(url=self.address, conn_limit=1024)
        return self.client

    def reset(self, failed_client) -> None:
        """Replace the connection that just failed: a fresh channel reconnects at once after a
        server restart (a broken gRPC channel would sit in its own reconnect backoff). The old
        one is closed later, not now, since closing cancels other rollouts' calls on it."""
        if failed_client is not None and failed_client is self.client:
            self.retired.append(self.client)
            self.client = None

    async def close(self) -> None:
        clients = self.retired + ([self.client] if self.client is not None else [])
        self.retired, self.client = [], None
        for client in clients:
            try:
                await client.close()
            except Exception:  # closing a broken connection may fail; it is discarded anyway
                pass


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _build_inputs(scheme: str, batch: list):
    """Triton inputs for [(ids, ground truth)]: TOKENS padded to the longest, TOKEN_LENS, GT_TEXT."""
    if scheme == "grpc":
        from tritonclient.grpc import InferInput, InferRequestedOutput
    else:
        from tritonclient.http import InferInput, InferRequestedOutput
    width = max(1, max(len(ids) for ids, _ in batch))
    tokens = np.zeros((len(batch), width), dtype=np.int32)
    for row, (ids, _) in enumerate(batch):
        tokens[row, : len(ids)] = ids
    arrays = [
        ("TOKENS", tokens, "INT32"),
        ("TOKEN_LENS", np.array([[len(ids)] for ids, _ in batch], dtype=np.int32), "INT32"),
        ("GT_TEXT", np.array([[text.encode("utf-8")] for _, text in batch], dtype=object), "BYTES"),
    ]
    inputs = []
    for name, array, dtype in arrays:
        tensor = InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs, [InferRequestedOutput(name) for name in OUTPUTS]


class RewardClient:
    """Pooled Triton clients for one event loop: round robin over servers, failover, retries."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.endpoints = [_Endpoint(scheme, address) for scheme, address in settings.urls]
        self._next = random.randrange(len(self.endpoints))
        self._ready: Optional[asyncio.Task] = None
        self.components: tuple = ()
        self.max_batch = max(1, settings.max_batch)
        self._pending: list = []
        self._flush_handle = None
        self._tasks: set = set()

    # ---- start-up ------------------------------------------------------------------
    async def _endpoint_ready(self, endpoint: _Endpoint) -> bool:
        client = endpoint.connect()
        try:
            ready = await asyncio.wait_for(client.is_model_ready(self.settings.model_name), timeout=5.0)
            return bool(ready)
        except Exception:
            endpoint.reset(client)
            return False

    async def _check(self) -> None:
        deadline = time.monotonic() + self.settings.startup_wait_s
        waiting = list(self.endpoints)
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
        # No request may exceed the server's batch limit.
        self.max_batch = min(self.max_batch, await self._server_max_batch())
        # Which optional components does the server compute? (NaN = switched off.)
        probe = (await self._infer_with_retries([(np.zeros(1, dtype=np.int64), "一")]))[0]
        if isinstance(probe, Exception):
            raise probe
        self.components = tuple(key for output, key in COMPONENT_OUTPUTS.items() if math.isfinite(probe[output]))

    async def _server_max_batch(self) -> int:
        limits = []
        for endpoint in self.endpoints:
            config = await endpoint.connect().get_model_config(self.settings.model_name)
            size = config["max_batch_size"] if isinstance(config, dict) else config.config.max_batch_size
            limits.append(int(size) if int(size) > 0 else 1)
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
    def _pick(self) -> _Endpoint:
        now = time.monotonic()
        count = len(self.endpoints)
        for _ in range(count):
            endpoint = self.endpoints[self._next % count]
            self._next += 1
            if endpoint.failed_until <= now:
                return endpoint
        return min(self.endpoints, key=lambda e: e.failed_until)

    async def _infer_once(self, endpoint: _Endpoint, client, batch: list, timeout: float) -> list:
        """One request for a batch of (ids, ground truth): a result dict or a
        RewardRequestError per item (the server reports bad items in-band)."""
        inputs, outputs = _build_inputs(endpoint.scheme, batch)
        parameters = {"prompt": self.settings.prompt} if self.settings.prompt else None
        result = await asyncio.wait_for(
            client.infer(self.settings.model_name, inputs, outputs=outputs, parameters=parameters),
            timeout=timeout,
        )
        columns = {name: result.as_numpy(name).reshape(-1) for name in OUTPUTS}
        if any(len(column) != len(batch) for column in columns.values()):
            raise RuntimeError(f"reward server {endpoint.url} answered {len(columns['REWARDS'])} rows for "
                               f"{len(batch)} rollouts")
        items = []
        for row in range(len(batch)):
            error = _text(columns["ERRORS"][row])
            if error:
                items.append(RewardRequestError(f"reward server {endpoint.url} refused the rollout: {error}"))
                continue
            items.append({
                "REWARDS": float(columns["REWARDS"][row]),
                "ERROR_RATE": float(columns["ERROR_RATE"][row]),
                "SPEAKER_SIMILARITY": float(columns["SPEAKER_SIMILARITY"][row]),
                "ASR_NLL": float(columns["ASR_NLL"][row]),
                "TRANSCRIPT": _text(columns["TRANSCRIPTS"][row]),
            })
        return items

    async def _infer_with_retries(self, batch: list) -> list:
        settings = self.settings
        start = time.monotonic()
        delay = settings.backoff_initial_s
        attempts = 0
        last_errors: dict = {}
        while True:
            endpoint = self._pick()
            client = endpoint.connect()
            attempts += 1
            try:
                # An attempt never outlives the retry budget: a hung server (accepts, never
                # answers) must not hold rollouts for request_timeout_s past it.
                remaining = settings.retry_budget_s - (time.monotonic() - start)
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
            results = await self._infer_with_retries([(ids, text) for ids, text, _ in batch])
        except BaseException as error:  # noqa: B036 - every waiting rollout must learn of the failure
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for (_, _, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def score(self, ids: np.ndarray, ground_truth: str) -> dict:
        await self.ensure_ready()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((ids, ground_truth, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self.settings.batch_window_ms / 1000.0, self._flush)
        return await future

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for endpoint in self.endpoints:
            await endpoint.close()


_CLIENTS: dict = {}


def get_client(settings: Settings) -> RewardClient:
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


def _result(score: float, error_rate: float, parsed, transcript_length: int, components: dict) -> dict:
    result = {
        "score": float(score),
        "error_rate": float(error_rate),
        "num_speech_tokens": len(parsed.ids),
        "ignored_pieces": parsed.ignored,
        "transcript_length": transcript_length,
    }
    result.update(components)
    return result


async def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """Reward of one rollout (veRL custom reward function, async).

    ``score`` in [0, 1] plus ``error_rate``, ``num_speech_tokens``, ``ignored_pieces``
    (text or special tokens in the response that are not speech tokens),
    ``transcript_length`` and, when the server computes them, ``speaker_similarity`` and
    ``asr_nll``. Raises instead of returning a score it could not compute.
    """
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise RewardRequestError(f"ground truth of a rollout from {data_source!r} is empty or not text: {ground_truth!r}")
    settings = settings_from(kwargs)
    client = get_client(settings)
    parsed = parse_speech_tokens(solution_str or "")
    await client.ensure_ready()
    if not parsed.ids:
        minimum = {"speaker_similarity": 0.0, "asr_nll": math.inf}
        return _result(MIN_SCORE, 1.0, parsed, 0, {key: minimum[key] for key in client.components})
    response = await client.score(np.asarray(parsed.ids, dtype=np.int64), ground_truth)
    components = {key: response[output] for output, key in COMPONENT_OUTPUTS.items() if key in client.components}
    return _result(response["REWARDS"], response["ERROR_RATE"], parsed, len(response["TRANSCRIPT"]), components)


# ---- command line ----------------------------------------------------------------------
def load_jsonl(path: str) -> list:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(record.get("text"), str) or not isinstance(record.get("code"), list):
                raise ValueError(f"{path}:{number}: needs 'text' (string) and 'code' (list of token ids)")
            records.append(record)
    return records


async def score_records(records: list, reward_kwargs: dict) -> list:
    from ttsrl.speech_tokens import format_speech_tokens

    try:
        return await asyncio.gather(*(
            compute_score(record.get("index", f"line{i + 1}"), format_speech_tokens(record["code"]), record["text"],
                          **reward_kwargs)
            for i, record in enumerate(records)
        ))
    finally:
        await close_clients()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Score speech-token rollouts with the reward server.")
    parser.add_argument("--input", "-i", required=True, help="JSONL with 'text' and 'code' (token id list) per line")
    parser.add_argument("--max-samples", "-n", type=int, default=None)
    parser.add_argument("--server-url", default=None, help=f"default $REWARD_SERVER_URL or {DEFAULT_SERVER_URL}")
    parser.add_argument("--retry-budget-s", type=float, default=None)
    parser.add_argument("--startup-wait-s", type=float, default=None)
    parser.add_argument("--prompt", default=None, help="speaker prompt name")
    parser.add_argument("--interactive", action="store_true", help="pause after each sample")
    args = parser.parse_args(argv)
    try:
        records = load_jsonl(args.input)[: args.max_samples]
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kwargs = {"server_url": args.server_url, "retry_budget_s": args.retry_budget_s,
              "startup_wait_s": args.startup_wait_s, "prompt": args.prompt}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    start = time.perf_counter()
    try:
        results = asyncio.run(score_records(records, kwargs))
    except (RewardServerUnavailable, RewardRequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    for i, (record, result) in enumerate(zip(records, results)):
        print(json.dumps({"index": record.get("index", i), "text": record["text"], **result}, ensure_ascii=False))
        if args.interactive and i < len(records) - 1:
            if input("Enter to continue, q to quit: ").strip().lower() == "q":
                break
    mean = sum(r["score"] for r in results) / max(1, len(results))
    print(f"{len(results)} rollouts, mean score {mean:.4f}, {elapsed:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reward server's public HTTP port: checks each request, then forwards it to Triton.

Triton 2.51 (the binary PyTriton 0.7 ships) parses JSON request bodies with a recursive
parser: a body of about 100 KB of ``[`` (deep nesting) overflows its stack and the whole
``tritonserver`` process dies with SIGSEGV (upstream triton-inference-server issue 5840;
large malformed bodies of other shapes are refused correctly). So Triton's own HTTP
endpoint listens on a loopback port only, and this guard owns the public one:

- a body over ``max_body_bytes`` is refused with 413 before anything reaches Triton;
- the JSON part of a body (all of it, or the first ``Inference-Header-Content-Length``
  bytes of a binary-protocol request) must parse with Python's ``json`` and nest at most
  ``max_json_depth`` levels, else 400;
- an inference request (``POST .../infer``) whose input carries more items (its shape's first
  dimension) than the server takes per request (``max_items``: ``--max-batch-size``) is
  refused with 400 naming the input, its shape and the limit (Triton's own answer, over gRPC,
  says only ``inference request batch-size must be <= N``);
- everything else is forwarded unchanged (method, path, query, headers, body) and
  Triton's answer is streamed back unchanged (status, headers, binary outputs);
- while Triton is down (the supervisor is restarting it) requests get 503, so clients
  retry instead of failing (the reward hook retries 503 within its budget);
- bytes that are not HTTP at all get aiohttp's own 400 (counted, not logged).

Error bodies have Triton's shape, ``{"error": "..."}``, so Triton clients show the message.
Runs in the server environment (aiohttp, numpy).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np

LOGGER = logging.getLogger("token2wav_server.http_guard")

DEFAULT_MAX_BODY_MB = 64
# A Triton inference request nests object > inputs > input > data by tensor rank:
# well under 20 levels. Triton itself crashes somewhere between 10 000 and 100 000.
DEFAULT_MAX_JSON_DEPTH = 64
# Bodies larger than this are parsed in a thread, so one big body does not stall the others.
_PARSE_INLINE_BYTES = 256 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade"}
# Not forwarded: aiohttp already decompressed the body and sets its own length and host.
_REQUEST_DROP = _HOP_BY_HOP | {"host", "content-length", "content-encoding", "expect"}
_RESPONSE_DROP = _HOP_BY_HOP | {"content-length"}
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = frozenset(b"[{")
_BUFFERED_RESPONSE_BYTES = 1024 * 1024  # answers up to this size are relayed in one piece
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class GuardLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 1024 * 1024
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_items: int = 0  # items per inference request (--max-batch-size); 0: not checked here

    def __post_init__(self):
        if self.max_body_bytes < 1:
            raise ValueError(f"the HTTP body limit must be at least 1 byte, got {self.max_body_bytes}")
        if self.max_json_depth < 1:
            raise ValueError(f"the JSON depth limit must be at least 1, got {self.max_json_depth}")


def json_depth(data: bytes) -> int:
    """How deeply the arrays and objects of ``data`` nest (brackets inside strings ignored).

    Counts brackets only, without parsing, so it is safe on any input; for malformed
    JSON it is an estimate, which is fine since such a body is refused anyway."""
    skeleton = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if len(skeleton) <= 256:  # a typical request: a loop is cheaper than numpy's set-up
        depth = deepest = 0
        for code in skeleton:
            depth += 1 if code in _OPENING else -1
            deepest = max(deepest, depth)
        return deepest
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return max(0, int(np.cumsum(steps, dtype=np.int64).max()))


def check_json(data: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Optional[str]:
    """Why ``data`` is not JSON Triton may parse, or None when it is."""
    depth = json_depth(data)
    if depth > max_depth:
        return f"JSON nested {depth} levels deep; the limit is {max_depth}"
    try:
        json.loads(data)
    except UnicodeDecodeError as error:
        return f"JSON is not valid UTF-8: {error}"
    except (ValueError, RecursionError) as error:
        return f"not valid JSON: {error}"
    return None


def check_body(headers: Mapping[str, str], body: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Optional[str]:
    """Why Triton must not see this request body, or None to forward it.

    A binary-protocol request (``Inference-Header-Content-Length: N``) starts with N bytes
    of JSON followed by raw tensor bytes; only those N bytes are JSON. Any other body is
    JSON as a whole. An empty body is left to Triton (GET requests, bodiless POSTs)."""
    header_length = headers.get(HEADER_LENGTH)
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            return f"{HEADER_LENGTH} {header_length!r} is not a whole number"
        if not 0 < length <= len(body):
            return f"{HEADER_LENGTH} {length} is outside the body's {len(body)} bytes"
        reason = check_json(body[:length], max_depth)
        return None if reason is None else f"the JSON header of the binary request is {reason}"
    if not body:
        return None
    reason = check_json(body, max_depth)
    return None if reason is None else f"request body is {reason}"


def check_items(headers: Mapping[str, str], body: bytes, max_items: int) -> Optional[str]:
    """Why an inference request (its JSON, already checked by ``check_body``) carries too many
    items, or None. The items are each input's first dimension (Triton's batch dimension)."""
    length = headers.get(HEADER_LENGTH)
    try:
        request = json.loads(body[:int(length)] if length is not None else body) if body else {}
    except ValueError:
        return None  # check_body has passed it: nothing more to say here
    inputs = request.get("inputs") if isinstance(request, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if isinstance(shape, list) and shape and isinstance(shape[0], int) and shape[0] > max_items:
            return (f"input {tensor.get('name')!r} has {shape[0]} items (the first dimension of its shape {shape}): "
                    f"this reward server takes at most {max_items} items per request (--max-batch-size; the model "
                    "config's max_batch_size); send them in several requests")
    return None


def error_response(status: int, message: str):
    from aiohttp import web

    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")


class _CountMalformedHttp(logging.Filter):
    """aiohttp answers a request that is not valid HTTP (garbage bytes, a header line over
    8 KB, a bad Content-Length) with 400 itself and logs it with a traceback: count it
    instead, so clients cannot fill the log."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            self.counts["bad_http"] += 1
            return False
        return True


class HttpGuard:
    """aiohttp application that checks requests and forwards them to ``upstream()``.

    ``upstream`` returns Triton's HTTP base URL (``http://127.0.0.1:PORT``), or None while
    Triton is not running; it is asked per request, so Triton may move between ports
    across restarts. ``counts`` holds the outcome of every request (for metrics)."""

    def __init__(self, upstream: Callable[[], Optional[str]], limits: GuardLimits = GuardLimits()):
        self.upstream = upstream
        self.limits = limits
        self.counts: Counter = Counter()
        self._session = None

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=self.limits.max_body_bytes)
        logging.getLogger("aiohttp.server").addFilter(_CountMalformedHttp(self.counts))
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._close)
        return app

    async def _client(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256),
                # Forward bodies as they come: no decompression, no headers the client did not send.
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
            )
        return self._session

    async def reset(self) -> None:
        """Drop pooled connections to Triton (after it restarted: they lead nowhere)."""
        await self._close()

    async def _close(self, _app=None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _refuse(self, outcome: str, status: int, message: str):
        self.counts[outcome] += 1
        return error_response(status, message)

    async def handle(self, request):
        import aiohttp
        from aiohttp import web

        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse("too_large", 413, f"request body larger than the reward server's limit of "
                                                  f"{self.limits.max_body_bytes} bytes (--http-max-body-mb)")
        except Exception as error:  # a body that cannot be read: bad gzip, broken chunks...
            return self._refuse("bad_json", 400, f"cannot read the request body: {type(error).__name__}: {error}")
        if len(body) > _PARSE_INLINE_BYTES:
            reason = await asyncio.get_running_loop().run_in_executor(
                None, check_body, request.headers, body, self.limits.max_json_depth)
        else:
            reason = check_body(request.headers, body, self.limits.max_json_depth)
        if reason is not None:
            LOGGER.debug("refused %s %s: %s", request.method, request.path, reason)
            return self._refuse("bad_json", 400, reason)
        if self.limits.max_items and request.method == "POST" and request.path.endswith("/infer"):
            reason = check_items(request.headers, body, self.limits.max_items)
            if reason is not None:
                return self._refuse("too_many_items", 400, reason)
        upstream = self.upstream()
        if upstream is None:
            return self._refuse("triton_down", 503, "the reward server's Triton process is restarting; retry shortly")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP]
        session = await self._client()
        response = None
        try:
            async with session.request(request.method, upstream + request.raw_path, data=body if body else None,
                                       headers=headers, allow_redirects=False) as upstream_response:
                relayed = [(k, v) for k, v in upstream_response.headers.items() if k.lower() not in _RESPONSE_DROP]
                length = upstream_response.content_length
                if length is not None and length <= _BUFFERED_RESPONSE_BYTES:
                    payload = await upstream_response.read()
                    self.counts["forwarded"] += 1
                    return web.Response(status=upstream_response.status, reason=upstream_response.reason,
                                        body=payload, headers=relayed)
                response = web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason)
                for key, value in relayed:
                    response.headers.add(key, value)
                if length is not None:
                    response.content_length = length
                await response.prepare(request)
                async for chunk in upstream_response.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
        except aiohttp.ClientConnectorError:
            if response is None:
                return self._refuse("triton_down", 503,
                                    "the reward server's Triton process is not answering (restarting); retry shortly")
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            if response is None or not response.prepared:
                return self._refuse("triton_failed", 502, f"Triton dropped the request ({type(error).__name__}); "
                                                          "it may have crashed and is being restarted; retry")
            self.counts["triton_failed"] += 1
            raise  # headers already sent: aiohttp closes the connection, the client sees a truncated answer
        self.counts["forwarded"] += 1
        return response

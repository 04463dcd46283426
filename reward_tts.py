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
max_batch           REWARD_MAX_BATCH           rollouts per request at most, default 32 (and
                                               never more than the server's max batch size)
batch_window_ms     REWARD_BATCH_WINDOW_MS     how long a request waits for more rollouts,
                                               default 5
==================  =========================  ===========================================

Failures are loud: a rollout is never given a made-up score. Transient failures
(connection refused, server restarting, timeouts) are retried with backoff within the
budget, then ``RewardServerUnavailable`` is raised, failing the training step. An input
the server refuses raises ``RewardRequestError`` at once. A response with no speech
tokens gets the documented minimum (score 0, error rate 1) without a server call.
The client doing this is ``ttsrl.triton_client.RewardClient``; this file is its settings
and the result veRL logs.

CLI: ``python reward_tts.py --input FILE.jsonl`` (lines with ``text`` and ``code``).
"""
# No `from __future__ import annotations`: veRL loads this file with a module name that
# is not in sys.modules, where dataclasses cannot resolve string annotations.
import argparse
import asyncio
import json
import math
import os
import sys
import time

import numpy as np

# veRL imports this file by path inside Ray workers, whose sys.path need not contain the
# repository root; ttsrl lives next to this file, so add its directory explicitly.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from ttsrl.speech_tokens import format_speech_tokens, parse_speech_tokens  # noqa: E402
# parse_urls, close_clients and the exceptions are re-exported: the hook's URL format and
# what its callers catch and clean up with.
from ttsrl.triton_client import (COMPONENT_OUTPUTS, REWARD_MODEL, RewardRequestError,  # noqa: E402,F401
                                 RewardServerUnavailable, RewardSettings, close_clients, get_client, parse_urls)
from ttsrl.triton_client.wire import DEFAULT_SERVER_URL  # noqa: E402

DEFAULT_MODEL_NAME = REWARD_MODEL
MIN_SCORE = 0.0
Settings = RewardSettings  # what settings_from returns


def _setting(kwargs: dict, key: str, env: str, default):
    if kwargs.get(key) is not None:
        return kwargs[key]
    if os.environ.get(env):
        return os.environ[env]
    return default


def settings_from(kwargs: dict) -> RewardSettings:
    """The client settings of the table above: ``reward_kwargs`` first, then environment, then default."""
    protocol = _setting(kwargs, "protocol", "REWARD_PROTOCOL", None)
    return RewardSettings(
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
    """The CLI's input: one {"text": str, "code": [token ids]} record per non-empty line."""
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

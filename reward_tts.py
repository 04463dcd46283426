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
                                               (load-aware routing, failover). Default
                                               ``grpc://127.0.0.1:8001``.
routing             REWARD_ROUTING             ``least_work`` (default: least outstanding
                                               work per server slot, this node's servers
                                               first) or ``round_robin``
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

and ``max_response_length`` (``reward_kwargs`` only): the rollout length limit,
``data.max_response_length``, which ``configs/grpo.yaml`` passes
(``reward.custom_reward_function.reward_kwargs.max_response_length``), with
``max_token_text_ratio`` (``data.max_token_text_ratio``): a row's own, lower limit is upstream's
bound, the ``max_speech_tokens`` the tts_frontend agent loop asked vLLM for (in ``extra_info``),
else the ratio times stage 0's ``text_tokens``. Without any, no rollout counts as truncated
(below).

Per-item speaker prompts (zero-shot training). A row whose ``extra_info`` has ``prompt_wav``
(absolute path), ``prompt_text``, ``prompt_id`` and ``prompt_hash`` (stage 0 writes them) is
decoded by the server in that prompt's voice and its speaker similarity is measured against
that prompt; a row without them (text-only) takes the server's bank voice. The audio is read
here (a per-process LRU cache of ``PROMPT_CACHE_SIZE`` prompts, keyed by path, size and mtime)
and sent with every rollout. Its ``speaker_prompt_key`` must equal ``prompt_hash``: a prompt
file that changed since stage 0 would leave the parquet's prompt speech tokens stale, so it
raises ``RewardRequestError`` naming the file ("rerun stage 0"). A prompt that is missing,
unreadable, or that the server refuses (under 16 kHz, over 30 s, no transcript) raises too,
naming the rollout and the prompt; it never gets a made-up score.

Language. The error metric follows the rollout's language (``ttsrl.language``: zh -> pinyin
or char error rate, as the reward config says; en -> WER after Whisper-style normalization;
ja, ko -> CER): ``extra_info["language"]`` when stage 0 wrote one (a record's ``language``
field), else ``detect_language`` of the ground truth (its script). It travels to the server
as the LANGUAGE input; a language that is not one we support raises ``RewardRequestError``
naming the rollout.

The result dict (every rollout of a run has the same keys, as veRL's reward loop needs):
``score``; ``error_rate``; ``num_speech_tokens``; ``ignored_pieces``; ``transcript_length``;
``speaker_similarity`` and ``asr_nll`` when the server computes them; ``utility_error_rate``,
``utility_similarity``, ``utility_confidence`` for each component the reward preset weights
(each utility in [0, 1]: ``algorithm.adv_estimator=gdpo`` with
``algorithm.gdpo_reward_keys=[utility_error_rate,utility_similarity]`` normalizes them one by
one); each weighted plug-in component's ``utility_<name>`` and reported values (the quality
component: ``utility_quality``, ``quality_ovrl``, ``quality_sig``, ``quality_bak``), whatever
the server's model config lists; ``truncated`` (1.0 or 0.0).

Truncated rollouts. A rollout is truncated when its response has no speech end token
(``<|eos1|>``..``<|eos3|>``: plain added tokens, so they survive veRL's
``skip_special_tokens=True`` decoding, and vLLM keeps the stop token in the response) and
its length (speech tokens plus ignored pieces) reaches its limit (above). Rule: a
truncated rollout's ``score`` and every ``utility_*`` are 0, the minimum, so that neither
GRPO nor GDPO ever prefers a cut-off utterance; its measured ``error_rate`` and
``speaker_similarity`` are still reported. ``truncated`` is logged per step as
``reward/truncated/mean``.

Failures are loud: a rollout is never given a made-up score. Transient failures
(connection refused, server restarting, timeouts) are retried with backoff within the
budget, then ``RewardServerUnavailable`` is raised, failing the training step. An input
the server refuses, or an item the server's engines failed on (after its own retries of a
transient failure such as CUDA out of memory), is a refused rollout: ``RewardRequestError``
naming the rollout (data source, split and index, prompt, ground truth), raised at once. A
response with no speech tokens gets the documented minimum (score 0, error rate 1, utilities
0) without a server call. The client doing this is ``ttsrl.triton_client.RewardClient``; this
file is its settings and the result veRL logs.

Refused rollouts in training (``on_refused``, ``reward_kwargs`` only: ``raise``, the default,
or ``report``, what ``configs/grpo.yaml`` sets). veRL 0.9.1's agent loop catches an exception of
the hook, logs it from a Ray worker and drops the rollout, so the step trains on the rest with
nothing counted. With ``report`` a refused rollout returns instead the same keys as every other
rollout of the run (``result_keys``) plus ``failed`` (1.0; 0.0 for a scored rollout) and
``failure`` (the error message; "" for a scored one): ``score`` is 0.0, a placeholder that the
``tts_sync`` trainer (verl_plugins/tts_trainer.py) never uses, and what the server would have
measured is None; what the hook knows without the server (``num_speech_tokens``,
``ignored_pieces``, ``truncated``) is filled in. The trainer gives it no gradient, counts and
logs it, and stops the run when a step's failures exceed ``reward_failure_budget``
(docs/training.md "Refused rollouts"). ``RewardServerUnavailable`` is not a refused rollout: it
is raised in both modes.

CLI: ``python reward_tts.py --input FILE.jsonl`` (lines with ``text`` and ``code``, and
optionally ``extra_info`` with a speaker prompt as above).
"""
# No `from __future__ import annotations`: veRL loads this file with a module name that
# is not in sys.modules, where dataclasses cannot resolve string annotations.
import argparse
import asyncio
import functools
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

from ttsrl.language import detect_language, normalize_language  # noqa: E402
from ttsrl.model_family import family_from_env  # noqa: E402
from ttsrl.speech_tokens import format_speech_tokens, parse_speech_tokens  # noqa: E402
# parse_urls, close_clients and the exceptions are re-exported: the hook's URL format and
# what its callers catch and clean up with.
from ttsrl.triton_client import (COMPONENT_OUTPUTS, REWARD_MODEL, RewardRequestError,  # noqa: E402,F401
                                 RewardServerUnavailable, RewardSettings, SpeakerPromptAudio, UTILITY_KEYS,
                                 close_clients, get_client, parse_urls)
from ttsrl.triton_client.wire import DEFAULT_SERVER_URL  # noqa: E402

DEFAULT_MODEL_NAME = REWARD_MODEL
MIN_SCORE = 0.0
PROMPT_CACHE_SIZE = 256
"""Speaker prompts kept in memory per process (a 5 s prompt at 24 kHz is 480 kB)."""
MINIMUM_COMPONENTS = {"speaker_similarity": 0.0, "asr_nll": math.inf, **{key: 0.0 for key in UTILITY_KEYS}}
"""Components of a rollout with no speech tokens (score 0, error rate 1); a plug-in component's
utility is 0 too and its reported values NaN (nothing to measure: left out of the step's metrics)."""


def minimum_component(key: str) -> float:
    """A component's value for a rollout with no speech tokens (MINIMUM_COMPONENTS)."""
    if key in MINIMUM_COMPONENTS:
        return MINIMUM_COMPONENTS[key]
    return 0.0 if key.startswith("utility_") else math.nan
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
        routing=str(_setting(kwargs, "routing", "REWARD_ROUTING", "least_work")),
    )


ON_REFUSED = ("raise", "report")
REFUSED_PLACEHOLDER_SCORE = 0.0
"""``score`` of a refused rollout under ``on_refused=report``: a number veRL's reward tensor can
hold, never trained on or averaged (the tts_sync trainer masks the rollout)."""


def result_keys(components) -> list[str]:
    """The keys of every result of a run whose server computes ``components`` (without the
    ``failed``/``failure`` pair that ``on_refused=report`` adds)."""
    return ["score", "error_rate", "num_speech_tokens", "ignored_pieces", "transcript_length", *components,
            "truncated"]


def refused_result(reason: str, components, parsed=None, truncated: bool = False) -> dict:
    """The result of a refused rollout under ``on_refused=report`` (module doc): the run's keys,
    nothing the server would have measured, ``failed`` 1.0 and the reason."""
    result = dict.fromkeys(result_keys(components))
    result["score"] = REFUSED_PLACEHOLDER_SCORE
    if parsed is not None:
        result.update(num_speech_tokens=len(parsed.ids), ignored_pieces=parsed.ignored)
    result["truncated"] = 1.0 if truncated else 0.0
    result.update(failed=1.0, failure=str(reason))
    return result


def _on_refused(kwargs: dict) -> str:
    value = str(kwargs.get("on_refused") or "raise").strip().lower()
    if value not in ON_REFUSED:
        raise ValueError(f"reward_kwargs.on_refused must be one of {', '.join(ON_REFUSED)}, got {value!r} "
                         "(configs/grpo.yaml: reward.custom_reward_function.reward_kwargs.on_refused)")
    return value


def _result(score: float, error_rate: float, parsed, transcript_length: int, components: dict,
            truncated: bool) -> dict:
    result = {
        "score": float(score),
        "error_rate": float(error_rate),
        "num_speech_tokens": len(parsed.ids),
        "ignored_pieces": parsed.ignored,
        "transcript_length": transcript_length,
    }
    result.update(components)
    if truncated:  # the documented rule (module doc): the minimum score and utilities
        result["score"] = MIN_SCORE
        result.update({key: 0.0 for key in result if key.startswith("utility_")})
    result["truncated"] = 1.0 if truncated else 0.0
    return result


def length_limit(max_response_length, extra_info=None, max_token_text_ratio=None):
    """The most tokens the rollout could have: ``max_response_length``, or its own upstream bound
    when lower: ``extra_info["max_speech_tokens"]`` (what the tts_frontend agent loop asked vLLM
    for), else ``max_token_text_ratio`` times ``extra_info["text_tokens"]`` (stage 0). None: no limit known."""
    info = extra_info if isinstance(extra_info, dict) else {}
    limits = [int(max_response_length)] if max_response_length is not None else []
    if _present(info.get("max_speech_tokens")):
        limits.append(int(info["max_speech_tokens"]))
    elif _present(info.get("text_tokens")) and max_token_text_ratio is not None:
        limits.append(int(int(info["text_tokens"]) * float(max_token_text_ratio)))
    return min(limits) if limits else None


def is_truncated(parsed, max_response_length, extra_info=None, max_token_text_ratio=None) -> bool:
    """No speech end token, and as long as the length limit allows (module doc, ``length_limit``)."""
    limit = length_limit(max_response_length, extra_info, max_token_text_ratio)
    if parsed.ended or limit is None:
        return False
    return len(parsed.ids) + parsed.ignored >= limit


def _present(value) -> bool:
    """A set extra_info field: not None, not NaN (pandas' missing value), not empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


def describe_rollout(data_source, ground_truth, extra_info) -> str:
    """Which rollout this is, for an error message."""
    info = extra_info if isinstance(extra_info, dict) else {}
    parts = [f"data_source {str(data_source) if isinstance(data_source, str) else data_source!r}"]
    for key in ("split", "index", "id", "prompt_id", "prompt_wav"):
        if _present(info.get(key)):
            parts.append(f"{key} {info[key]!r}")
    text = ground_truth if not isinstance(ground_truth, str) or len(ground_truth) <= 60 else ground_truth[:60] + "..."
    parts.append(f"ground truth {text!r}")
    return "rollout (" + ", ".join(parts) + ")"


@functools.lru_cache(maxsize=PROMPT_CACHE_SIZE)
def _read_prompt(path: str, size: int, mtime_ns: int, text: str) -> tuple:
    """(the prompt audio as stage 0 hashed it, its key): ``read_wave`` (float32, channels
    averaged); size and mtime are in the cache key so a rewritten file is read again."""
    from ttsrl.evaluation.outputs import read_wave

    wave, rate = read_wave(path)
    prompt = SpeakerPromptAudio(np.ascontiguousarray(wave, dtype=np.float32), int(rate), text)
    return prompt, prompt.key  # the key once: hashing a 5 s prompt costs about as much as scoring


def item_prompt(extra_info, rollout: str = "rollout") -> "SpeakerPromptAudio | None":
    """The rollout's own speaker prompt from ``extra_info`` (None: a text-only row), checked
    against its ``prompt_hash``; RewardRequestError naming the file when it cannot be used."""
    info = extra_info if isinstance(extra_info, dict) else {}
    path = info.get("prompt_wav")
    if not _present(path):
        return None
    path = str(path)
    text = info.get("prompt_text")
    if not _present(text) or not isinstance(text, str):
        raise RewardRequestError(f"{rollout}: extra_info has prompt_wav {path} but no prompt_text; rerun stage 0")
    try:
        stat = os.stat(path)
        prompt, key = _read_prompt(path, stat.st_size, stat.st_mtime_ns, text.strip())
    except Exception as error:  # soundfile raises its own error types
        raise RewardRequestError(f"{rollout}: speaker prompt {path} cannot be read ({type(error).__name__}: "
                                 f"{error}); restore the file or rerun stage 0") from error
    expected = info.get("prompt_hash")
    if _present(expected) and str(expected) != key:
        raise RewardRequestError(
            f"{rollout}: speaker prompt {path} changed since stage 0 (its content hash is {key[:16]}..., "
            f"the data's prompt_hash {str(expected)[:16]}...), so the prompt speech tokens in the parquet are "
            f"stale; rerun stage 0")
    return prompt


def item_language(extra_info, ground_truth: str, rollout: str = "rollout") -> str:
    """The rollout's language: ``extra_info["language"]`` (stage 0) when set, else detected from
    the ground truth's script; RewardRequestError naming the rollout for an unknown one."""
    info = extra_info if isinstance(extra_info, dict) else {}
    declared = info.get("language")
    if not _present(declared):
        return detect_language(ground_truth)
    try:
        return normalize_language(declared, f"{rollout}: extra_info language")
    except ValueError as error:
        raise RewardRequestError(str(error)) from None


async def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """Reward of one rollout (veRL custom reward function, async): the dict of the module doc.

    Raises instead of returning a score it could not compute; with ``on_refused=report`` a
    refused rollout returns ``refused_result`` instead (module doc).
    """
    on_refused = _on_refused(kwargs)
    settings = settings_from(kwargs)
    client = get_client(settings)
    parsed = parse_speech_tokens(solution_str or "", family_from_env())  # the family's stop tokens
    truncated = is_truncated(parsed, kwargs.get("max_response_length"), extra_info, kwargs.get("max_token_text_ratio"))
    if on_refused == "report":
        await client.ensure_ready()  # the keys of a refused rollout's result are the server's components
    try:
        result = await _score(client, data_source, parsed, truncated, ground_truth, extra_info)
    except RewardRequestError as error:
        if on_refused == "raise":
            raise
        return refused_result(str(error), client.components, parsed, truncated)
    if on_refused == "report":
        result.update(failed=0.0, failure="")
    return result


async def _score(client, data_source, parsed, truncated: bool, ground_truth, extra_info) -> dict:
    """``compute_score`` for one rollout: RewardRequestError naming it when it is refused."""
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise RewardRequestError(f"ground truth of a rollout from {data_source!r} is empty or not text: {ground_truth!r}")
    rollout = describe_rollout(data_source, ground_truth, extra_info)
    prompt = item_prompt(extra_info, rollout)
    language = item_language(extra_info, ground_truth, rollout)
    await client.ensure_ready()
    if not parsed.ids:
        minimum = {key: minimum_component(key) for key in client.components}
        return _result(MIN_SCORE, 1.0, parsed, 0, minimum, truncated)
    try:
        response = await client.score(np.asarray(parsed.ids, dtype=np.int64), ground_truth, prompt, language,
                                      extra_info if isinstance(extra_info, dict) else None)
    except RewardRequestError as error:
        raise RewardRequestError(f"{rollout}: {error}") from error
    components = {key: response[output] for output, key in client.component_outputs.items()
                  if key in client.components}
    return _result(response["REWARDS"], response["ERROR_RATE"], parsed, len(response["TRANSCRIPT"]), components,
                   truncated)


# ---- command line ----------------------------------------------------------------------
def load_jsonl(path: str) -> list:
    """The CLI's input: one {"text": str, "code": [token ids], "extra_info": {...} (optional)}
    record per non-empty line."""
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
                          extra_info=record.get("extra_info"), **reward_kwargs)
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

"""Per-rollout cost of the training reward path with per-item speaker prompts (zero-shot GRPO).

Scores a step's rollouts the way veRL's reward loop does (every rollout of the step in flight
at once through ``reward_tts.compute_score``: prompt read and checked by the hook, pooled
gRPC client, coalesced requests, Triton's dynamic batching, token2wav -> ASR -> speaker ->
reward on the server) against a real reward server with stand-in engines and the
``zero_shot`` reward preset (error rate + similarity), three ways:

- bank voice: text-only rows, no prompt sent (the recipe before zero-shot training);
- per-item prompt, cached: each row brings one of ``--prompts`` prompt wavs (a group's rollouts
  share their row's prompt), already seen, so the hook's prompt cache and the server's
  PromptCache hit; the audio still travels with every rollout;
- per-item prompt, uncached: every rollout's prompt is a file neither the hook nor the server
  has seen (read, hashed, sent, prepared and embedded once each).

once with stand-in engines that cost nothing (``delay_ms`` 0: the pure overhead of the path)
and once with ``--delay-ms`` per engine batch, imitating model cost. Prints one table:
milliseconds per rollout (wall time of a step / rollouts, median of ``--rounds``), rollouts/s
and the ratio to the bank voice at the same delay. Prompts are ``--prompt-seconds`` of audio
at ``--prompt-rate`` Hz (float32 on the wire: 4 bytes a sample).

    .venv/bin/python benchmarks/bench_reward_prompts.py [--rollouts 128] [--prompts 16] [--delay-ms 20]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_prompt(folder: Path, name: str, seconds: float, rate: int, seed: int) -> dict:
    """One prompt wav and the extra_info stage 0 writes for a row that uses it."""
    import numpy as np
    import soundfile

    from ttsrl.evaluation.outputs import read_wave
    from ttsrl.triton_client import speaker_prompt_key

    wave = np.random.default_rng(seed).normal(0.0, 0.1, int(seconds * rate)).astype(np.float32)
    path = folder / f"{name}.wav"
    soundfile.write(str(path), wave, rate, subtype="FLOAT")
    read, read_rate = read_wave(path)
    text = f"提示{seed}"
    return {"split": "train", "index": seed, "prompt_wav": str(path), "prompt_text": text, "prompt_id": name,
            "prompt_hash": speaker_prompt_key(read, read_rate, text)}


def make_rollouts(count: int, tokens: int, seed: int = 0) -> list:
    """(response, ground truth): stand-in speech of ``tokens`` tokens each, an end token after it."""
    import numpy as np

    from token2wav_server.standin import TABLE, text_to_tokens
    from ttsrl.speech_tokens import format_speech_tokens

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        text = "".join(TABLE[i] for i in rng.integers(0, 3000, tokens))
        rows.append((format_speech_tokens(text_to_tokens(text)) + "<|eos1|>", text))
    return rows


async def score_step(rollouts: list, infos: list, kwargs: dict) -> float:
    """Seconds to score one step: every rollout in flight at once, as veRL's reward loop does."""
    import reward_tts

    start = time.perf_counter()
    results = await asyncio.gather(*(reward_tts.compute_score("tts", response, text, extra_info=info, **kwargs)
                                     for (response, text), info in zip(rollouts, infos)))
    elapsed = time.perf_counter() - start
    if any(r["error_rate"] != 0.0 for r in results):
        raise RuntimeError("a rollout was not transcribed exactly: the benchmark's rollouts are wrong")
    return elapsed


async def run_server_modes(url: str, args, folder: Path, delay_ms: float) -> list:
    import reward_tts

    kwargs = {"server_url": url, "max_response_length": args.tokens + 1}
    rollouts = make_rollouts(args.rollouts, args.tokens)
    group = max(1, args.rollouts // args.prompts)
    shared = [write_prompt(folder, f"shared{i}", args.prompt_seconds, args.prompt_rate, i) for i in range(args.prompts)]
    cached_infos = [shared[min(i // group, args.prompts - 1)] for i in range(args.rollouts)]
    bank_infos = [{"split": "train", "index": i} for i in range(args.rollouts)]
    try:
        await score_step(rollouts, bank_infos, kwargs)      # start-up and warm-up
        await score_step(rollouts, cached_infos, kwargs)    # fills both prompt caches
        times = {"bank": [], "cached": [], "uncached": []}
        for round_index in range(args.rounds):
            fresh = [write_prompt(folder, f"d{delay_ms:g}_r{round_index}_{i}", args.prompt_seconds, args.prompt_rate,
                                  10_000 + round_index * args.rollouts + i) for i in range(args.rollouts)]
            times["bank"].append(await score_step(rollouts, bank_infos, kwargs))
            times["cached"].append(await score_step(rollouts, cached_infos, kwargs))
            times["uncached"].append(await score_step(rollouts, fresh, kwargs))
            for info in fresh:
                Path(info["prompt_wav"]).unlink()
    finally:
        await reward_tts.close_clients()
    return [(name, delay_ms, statistics.median(values) / args.rollouts) for name, values in times.items()]


def main(argv=None) -> int:
    from token2wav_server.launch import start_server

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=128, help="rollouts per step")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts in the cached case (rows of a step)")
    parser.add_argument("--tokens", type=int, default=150, help="speech tokens per rollout (25 per second)")
    parser.add_argument("--prompt-seconds", type=float, default=5.0)
    parser.add_argument("--prompt-rate", type=int, default=24000, help="prompt wav sample rate, Hz")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="imitated model cost per engine batch")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per case (the median is reported)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_reward_prompts_") as tmp:
        for delay_ms in (0.0, args.delay_ms):
            extra = ["--reward-preset", "zero_shot", "--max-batch-size", "64", "--max-queue-delay-us", "2000",
                     "--engine-option", f"delay_ms={delay_ms:g}"]
            with start_server(extra_args=extra) as server:
                rows += asyncio.run(run_server_modes(server.grpc_url, args, Path(tmp), delay_ms))
    labels = {"bank": "bank voice (text-only rows)", "cached": f"per-item prompt, cached ({args.prompts} distinct)",
              "uncached": "per-item prompt, uncached (all distinct)"}
    base = {delay: per for name, delay, per in rows if name == "bank"}
    kib = args.prompt_seconds * args.prompt_rate * 4 / 1024
    print(f"{args.rollouts} rollouts per step of {args.tokens} speech tokens, all in flight; prompts "
          f"{args.prompt_seconds:g} s at {args.prompt_rate} Hz ({kib:.0f} KiB each on the wire); stand-in engines, "
          f"zero_shot preset; median of {args.rounds} steps")
    print(f"| {'what':<42} | {'delay_ms':>8} | {'ms/rollout':>10} | {'rollouts/s':>10} | {'vs bank':>7} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 12}|{'-' * 12}|{'-' * 9}|")
    for name, delay, per in rows:
        print(f"| {labels[name]:<42} | {delay:8g} | {per * 1000:10.2f} | {1 / per:10.0f} | {per / base[delay]:6.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of decoding each utterance in its own prompt's voice, against a real reward server.

Times the server's ``token2wav`` (stand-in engines) on N utterances of ``--seconds`` of
speech tokens each:

- bank voice: tokens only (what stage 4 did before per-item prompts): the baseline;
- per-item prompts, ``--prompts`` distinct prompt wavs of ``--prompt-seconds`` shared by the
  utterances (a test set's layout): every item carries its prompt audio and transcript, the
  server hashes it and prepares each distinct prompt once (``PromptCache``);
- the same with every utterance's prompt distinct (every item a cache miss).

and prints one table with seconds, utterances/s and the ratio to the bank voice. Stand-in
engines cost almost nothing, so the numbers are the wire, hashing and caching overhead of
per-item prompts, not a GPU model's cost (with CosyVoice2, a cache miss adds one
``prepare_prompt``: speech tokenizer, mel and CAM++ embedding of the prompt).

    .venv/bin/python benchmarks/bench_item_prompts.py [--utterances 400] [--prompts 10] [--seconds 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import numpy as np

    from token2wav_server import standin
    from token2wav_server.launch import start_server
    from ttsrl.triton_client import SpeakerPromptAudio, TritonModelClient

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0, help="speech per utterance")
    parser.add_argument("--prompt-seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=16, help="utterances per client call (infer_dist's --batch-size)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    tokens = int(args.seconds * 25)
    token_lists = [rng.integers(0, 6561, tokens).tolist() for _ in range(args.utterances)]
    prompt_tokens = int(args.prompt_seconds * 25)

    def prompt(index: int) -> SpeakerPromptAudio:
        wave = standin.tokens_to_wave(rng.integers(0, 6561, prompt_tokens), voice=index % standin.VOICES)
        return SpeakerPromptAudio(wave, standin.SAMPLE_RATE, f"提示{index}")

    shared = [prompt(i) for i in range(args.prompts)]
    shared_prompts = [shared[i % args.prompts] for i in range(args.utterances)]
    distinct_prompts = [prompt(i) for i in range(args.utterances)]

    with start_server(extra_args=["--max-batch-size", "64"]) as server:
        client = TritonModelClient(server.grpc_url, "token2wav")

        def run(prompts) -> float:
            start = time.perf_counter()
            for first in range(0, args.utterances, args.batch):
                chunk = slice(first, first + args.batch)
                results = client.synthesize(token_lists[chunk], None if prompts is None else prompts[chunk])
                failed = [r for r in results if isinstance(r, Exception)]
                if failed:
                    raise RuntimeError(f"token2wav failed: {failed[0]}")
            return time.perf_counter() - start

        try:
            run(None)  # warm-up
            rows = [("bank voice (tokens only)", run(None)),
                    (f"per-item prompts, {args.prompts} distinct (cached)", run(shared_prompts)),
                    ("per-item prompts, all distinct (cache misses)", run(distinct_prompts))]
        finally:
            client.close()
    base = rows[0][1]
    print(f"{args.utterances} utterances of {args.seconds:g} s, prompts of {args.prompt_seconds:g} s, "
          f"{args.batch} per call, stand-in engines")
    print(f"| {'what':<46} | {'seconds':>8} | {'utt/s':>8} | {'vs bank':>7} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    for name, seconds in rows:
        print(f"| {name:<46} | {seconds:8.2f} | {args.utterances / seconds:8.1f} | {seconds / base:6.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

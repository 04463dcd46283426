"""Supervised warm-up of the policy on (text, speech tokens) pairs, before GRPO (stage 2).

    python scripts/sft_warmup.py --model DIR --data pairs.jsonl --output-dir OUT \\
        [--steps 200] [--lr 1e-3] [--batch-size 16] [--seed 0] [--standin-targets] [--force]

``pairs.jsonl``: one ``{"text": ..., "speech_tokens": [int, ...]}`` per line; with
``--standin-targets`` plain ``{"text": ...}`` records, targets from the stand-in engines.
``OUT`` gets the full Hugging Face model directory and ``sft_warmup.json``; a complete ``OUT``
is left as it is unless ``--force``. What and why: ``ttsrl.policy.sft_warmup``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: the repository root holds ttsrl
    sys.path.insert(0, str(REPO))

from ttsrl.policy.sft_warmup import PairsError, warm_up  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (the converted LLM)")
    parser.add_argument("--data", required=True, help="JSONL of {text, speech_tokens} (or {text} with --standin-targets)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--standin-targets", action="store_true",
                        help="targets are the stand-in engines' tokens of each text (CPU smoke task)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        warm_up(args.model, args.data, args.output_dir, args.steps, args.lr, args.batch_size, args.seed,
                args.standin_targets, args.force)
    except (PairsError, ValueError, OSError) as error:
        print(f"sft_warmup: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

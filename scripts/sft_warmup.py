"""Supervised warm-up of the policy on (prompt, speech tokens) examples, before GRPO (stage 2).

    python scripts/sft_warmup.py --model DIR --data FILE --output-dir OUT \\
        [--steps 200] [--lr 1e-5] [--batch-size 16] [--seed 0] [--device auto|cuda|cpu] \\
        [--standin-targets] [--force]
    torchrun --nproc_per_node=N scripts/sft_warmup.py ...      # DDP over N GPUs (gloo on the CPU)

``FILE``: stage 0's ``train.parquet`` (each row's own prompt, as GRPO sees it; targets from
``extra_info.speech_tokens``) or a JSONL of ``{"text": ..., "speech_tokens": [int, ...]}``; with
``--standin-targets`` the targets are the stand-in engines' tokens (smoke profile). On CUDA it
trains with bf16 autocast over fp32 weights; on the CPU in fp32. ``OUT`` gets the full Hugging
Face model directory and ``sft_warmup.json`` (the stamp of its inputs); a finished ``OUT`` of the
same inputs is reused, one of other inputs is refused unless ``--force``. What and why:
``ttsrl.policy.sft_warmup``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: the repository root holds ttsrl
    sys.path.insert(0, str(REPO))

from ttsrl.policy.sft_warmup import DEFAULT_LR, STANDIN_TARGETS, PairsError, StampMismatch, warm_up  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (the converted LLM)")
    parser.add_argument("--data", required=True,
                        help="stage 0's train.parquet, or a JSONL of {text, speech_tokens} ({text} with "
                             "--standin-targets)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help="AdamW learning rate, constant (default %(default)s: fit for the 0.5B model)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step, over all ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when torch sees a GPU (bf16 autocast), else the CPU (fp32)")
    parser.add_argument("--standin-targets", nargs="?", const="prompt", default=False, choices=STANDIN_TARGETS,
                        help="targets are the stand-in engines' tokens of each text (CPU smoke task), in the "
                             "prompt's voice (default) or, with 'any-voice', in any voice of the data's prompts")
    parser.add_argument("--force", action="store_true", help="redo a finished warm-up, whatever its inputs")
    args = parser.parse_args(argv)
    try:
        warm_up(args.model, args.data, args.output_dir, args.steps, args.lr, args.batch_size, args.seed,
                args.standin_targets, args.force, args.device)
    except (PairsError, StampMismatch, ValueError, OSError) as error:
        print(f"sft_warmup: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

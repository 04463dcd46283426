"""Stage 3: merge veRL FSDP actor checkpoints into Hugging Face models, then check them.

    python scripts/merge_checkpoints.py --exp_dir exp/cosyvoice2_grpo            # every saved step
    python scripts/merge_checkpoints.py --exp_dir exp/cosyvoice2_grpo --steps latest   # the newest only
    python scripts/merge_checkpoints.py --exp_dir exp/cosyvoice2_grpo --steps 100,200

For each ``$exp_dir/global_step_N/actor`` it runs veRL's own merger

    python -m verl.model_merger merge --backend fsdp --local_dir .../actor --target_dir ...

into a temporary directory, checks that the result loads with transformers,
carries every speech token ``<|s_0|>``..``<|s_6560|>`` and the end tokens, and
generates a few tokens, writes ``merge_complete.json`` into it and only then
renames it to ``$exp_dir/global_step_N/merged_hf_model``. A directory with that
marker is skipped on the next run (``--force`` merges again); a half-written one
never has it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as `python scripts/merge_checkpoints.py`: make the repo root (ttsrl) importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ttsrl.training.checkpoints import MergeError, merge_checkpoint, select_checkpoints  # noqa: E402


def parse_steps(text: str) -> list[int] | str:
    """``100,200`` -> [100, 200]; ``all`` and ``latest`` pass through."""
    if text.strip() in ("all", "latest"):
        return text.strip()
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps wants all, latest or comma-separated integers like 100,200; "
                                         f"got {text!r}")
    if not steps:
        raise argparse.ArgumentTypeError("--steps is empty")
    return steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp_dir", required=True, type=Path,
                        help="experiment directory holding global_step_N/actor (stage 2's trainer.default_local_dir)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--steps", type=parse_steps, default="all",
                       help="all (default), latest, or comma-separated steps such as 100,200")
    which.add_argument("--latest", action="store_true", help="same as --steps latest")
    parser.add_argument("--force", action="store_true", help="merge again even where merged_hf_model is complete")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip loading/generating with the merged model")
    args = parser.parse_args(argv)
    if args.latest:
        args.steps = "latest"
    return args


def say(message: str) -> None:
    print(message, flush=True)  # flushed: merges take minutes, and logs should show each step as it ends


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        steps = args.steps if isinstance(args.steps, list) else None
        checkpoints = select_checkpoints(args.exp_dir, steps, latest=args.steps == "latest", log=say)
        for checkpoint in checkpoints:
            started = time.monotonic()
            outcome = merge_checkpoint(checkpoint, force=args.force, check=args.check)
            if outcome == "skipped":
                say(f"step {checkpoint.step}: already merged at {checkpoint.merged_dir}, skipping")
            else:
                say(f"step {checkpoint.step}: merged to {checkpoint.merged_dir} ({time.monotonic() - started:.1f} s)")
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Check a composed GRPO job config as veRL checks it at start-up, without starting anything.

    bash scripts/train_grpo.sh --compose-only > job.yaml     # (TTSRL_DEVICE=cuda: the GPU command)
    python scripts/check_grpo_job.py job.yaml

runs veRL's own validation at the job's world size (trainer.n_gpus_per_node x trainer.nnodes)
and builds the actor as veRL's FSDP engine does, with the job's attention implementation
(ttsrl/training/composition.py). --no-actor skips the second. Exit status 1 names what veRL
refuses and the setting to change. bash run.sh --rehearse runs it on the real-size GPU command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from ttsrl.training.composition import CompositionError, check_job, load_job  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_config", help="the composed job config (train_grpo.sh --compose-only's output)")
    parser.add_argument("--no-actor", action="store_true", help="veRL's validation only; do not build the actor")
    args = parser.parse_args(argv)
    path = Path(args.job_config)
    if not path.is_file() or path.stat().st_size == 0:
        print(f"check_grpo_job: {path} is missing or empty: compose it with scripts/train_grpo.sh --compose-only",
              file=sys.stderr)
        return 1
    try:
        result = check_job(load_job(path), build_actor=not args.no_actor)
    except CompositionError as error:
        print(f"check_grpo_job: {path}: {error}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())

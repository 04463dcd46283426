"""The environment every Ray worker of a GRPO run needs: the one list of what reaches them.

veRL runs the reward hook (``reward_tts.py``), the recipe's plugins (``verl_plugins/``) and
their ``ttsrl`` imports in Ray workers. A worker on another node was started by ``ray start``
there, so it sees none of the variables of the shell that launched the run: only what the
job's runtime environment carries (``ray_kwargs.ray_init.runtime_env.env_vars``).
``scripts/train_grpo.sh`` passes every variable of ``WORKER_ENV`` that has a value (and every
other ``REWARD_*`` variable the user exported), and ``tests/test_train_grpo.py`` checks that
each environment variable the hook, the plugins and the modules they import read is in this
list. Standard library only.

    python -m ttsrl.worker_env        # the names, one per line (what train_grpo.sh reads)
"""
from __future__ import annotations

import sys

WORKER_ENV = {
    "PYTHONPATH": "the hook and the plugins import ttsrl from the repository root",
    "VERL_USE_EXTERNAL_MODULES": "veRL imports verl_plugins (the tts_sync trainer, the CPU platform) in every process",
    "TTSRL_MODEL_FAMILY": "the hook and the validation audio parse responses with the family's stop tokens "
                          "(ttsrl.model_family): CosyVoice3's differ from CosyVoice2's",
    "REWARD_SERVER_URL": "where the hook and the validation audio reach the reward server",
    "REWARD_PROTOCOL": "grpc or http for server URLs without a scheme (reward_tts.py, the preflight)",
    "REWARD_MODEL_NAME": "the Triton model the hook calls",
    "REWARD_REQUEST_TIMEOUT_S": "the hook's limit per request",
    "REWARD_RETRY_BUDGET_S": "how long the hook retries a failing server",
    "REWARD_STARTUP_WAIT_S": "how long the hook's first call waits for the servers",
    "REWARD_PROMPT": "the speaker prompt of text-only rows",
    "REWARD_MAX_BATCH": "rollouts per reward request",
    "REWARD_BATCH_WINDOW_MS": "how long a reward request waits for more rollouts",
    "REWARD_ROUTING": "how the hook spreads requests over the servers (least_work, or round_robin)",
    "TENSORBOARD_DIR": "where the trainer writes TensorBoard events and validation audio",
    "VERL_FILE_LOGGER_PATH": "the per-step metrics file ($exp_dir/metrics/<time>.jsonl)",
    "VERL_PLATFORM": "cpu selects verl_plugins/cpu.py's platform (CPU runs only)",
    "cosyvoice_src": "the CosyVoice checkout whose ttsfrd resources ttsrl.frontend's normalizer uses when "
                     "ttsfrd is installed (the agent loop normalizes as stage 0 did)",
}
"""Name -> why a worker needs it."""

SET_BY_THE_LAUNCHER = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES",
                                  "RAY_ADDRESS", "VLLM_ENABLE_V1_MULTIPROCESSING"})
"""Read by the same modules but set per process by torchrun, Ray or vLLM (or only read outside
a GRPO job, like RAY_ADDRESS by the preflight): never passed from the launching shell."""


def main(argv: list[str] | None = None) -> int:
    if argv if argv is not None else sys.argv[1:]:
        print("usage: python -m ttsrl.worker_env", file=sys.stderr)
        return 2
    print("\n".join(WORKER_ENV))
    return 0


if __name__ == "__main__":
    sys.exit(main())

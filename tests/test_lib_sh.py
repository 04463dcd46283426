"""The shell helpers of scripts/lib.sh and scripts/run_helpers.sh, sourced by bash as run.sh sources them:
the GPU checks behind train_device, stage 2's --force set-aside, stage -1/4's test-set helpers, and the
SIM download's use of the server environment's one gdown pin."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bash(script: str, env: dict | None = None, path_prefix: Path | None = None):
    """Run `script` in bash after sourcing lib.sh and run_helpers.sh (set -euo pipefail, as run.sh)."""
    full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env.update(env or {})
    if path_prefix is not None:
        full_env["PATH"] = f"{path_prefix}:{full_env['PATH']}"
    prologue = f"set -euo pipefail; cd {REPO}; source scripts/lib.sh; source scripts/run_helpers.sh\n"
    return subprocess.run(["bash", "-c", prologue + script], env=full_env, capture_output=True, text=True,
                          timeout=60)


def fake_nvidia_smi(tmp_path: Path, gpus: int = 0, fail: bool = False) -> Path:
    """A directory with an nvidia-smi that lists `gpus` GPUs, or fails as it does without a driver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    if fail:
        tool.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                        "driver.\"\nexit 9\n")
    else:
        tool.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i:04d}aa)'\n"
                                                for i in range(gpus)))
    tool.chmod(0o755)
    return bin_dir


# ---- train_device: select_train_device / cuda_gpu_problem --------------------------------------------------

def test_cuda_with_a_failing_nvidia_smi_dies_naming_the_check_and_the_fixes(tmp_path):
    done = bash("select_train_device cuda 8", path_prefix=fake_nvidia_smi(tmp_path, fail=True))
    assert done.returncode == 1 and done.stdout == ""
    assert "train_device=cuda needs 8 CUDA GPU(s) per node" in done.stderr
    assert "check 'nvidia-smi -L' failed: NVIDIA-SMI has failed because it couldn't communicate" in done.stderr
    assert "driver (>= 580" in done.stderr and "set train_device=cpu" in done.stderr


@pytest.mark.parametrize("visible, needed, problem", [
    (None, 8, "nvidia-smi lists 2 GPU(s). Fix: lower n_gpus_per_node to 2"),
    ("0,1,2,3,4,5,6,7", 8, "CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7' names 2 of the 2 GPU(s)"),
    ("0,5", 2, "CUDA_VISIBLE_DEVICES='0,5' names 1 of the 2 GPU(s)"),
    ("", 1, "CUDA_VISIBLE_DEVICES='' names 0 of the 2 GPU(s)"),
])
def test_too_few_visible_gpus_is_named(tmp_path, visible, needed, problem):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    done = bash(f"select_train_device cuda {needed}", env=env, path_prefix=fake_nvidia_smi(tmp_path, gpus=2))
    assert done.returncode == 1
    assert f"check 'GPUs visible >= {needed}' failed: {problem}" in done.stderr


@pytest.mark.parametrize("visible", [None, "0,1", "1,GPU-0000aa"])
def test_cuda_passes_when_enough_gpus_are_visible(tmp_path, visible):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    done = bash("select_train_device cuda 2", env=env, path_prefix=fake_nvidia_smi(tmp_path, gpus=2))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "cuda\n"
    assert "training device: cuda (train_device=cuda; 2 GPU(s) per node visible)" in done.stderr


def test_auto_says_which_device_it_picked_and_why(tmp_path):
    (tmp_path / "a").mkdir()
    cpu = bash("select_train_device auto 8", path_prefix=fake_nvidia_smi(tmp_path / "a", fail=True))
    assert cpu.returncode == 0 and cpu.stdout == "cpu\n"
    assert "WARNING: training device: cpu. train_device=auto picked the CPU because the check 'nvidia-smi -L'" \
        in cpu.stderr
    (tmp_path / "b").mkdir()
    gpu = bash("select_train_device auto 2", path_prefix=fake_nvidia_smi(tmp_path / "b", gpus=2))
    assert gpu.stdout == "cuda\n" and "train_device=auto picked cuda" in gpu.stderr


def test_cpu_and_bad_values(tmp_path):
    done = bash("select_train_device cpu 8", path_prefix=fake_nvidia_smi(tmp_path, fail=True))
    assert done.returncode == 0 and done.stdout == "cpu\n" and "train_device=cpu" in done.stderr
    bad = bash("select_train_device gpu 8")
    assert bad.returncode == 1
    assert "train_device must be auto, cuda or cpu, got 'gpu'" in bad.stderr


def test_skip_gpu_check_lets_cuda_through_loudly(tmp_path):
    done = bash("select_train_device cuda 8", env={"TTSRL_SKIP_GPU_CHECK": "1"},
                path_prefix=fake_nvidia_smi(tmp_path, fail=True))
    assert done.returncode == 0 and done.stdout == "cuda\n"
    assert "WITHOUT the GPU check (TTSRL_SKIP_GPU_CHECK=1" in done.stderr


# ---- stage 2 --force: set_aside_previous_run ----------------------------------------------------------------

def test_force_moves_the_previous_run_aside_and_keeps_everything(tmp_path):
    exp = tmp_path / "exp"
    (exp / "global_step_2" / "actor").mkdir(parents=True)
    (exp / "global_step_2" / "actor" / "model.pt").write_text("weights 2")
    (exp / "global_step_4" / "merged_hf_model").mkdir(parents=True)
    (exp / "latest_checkpointed_iteration.txt").write_text("4")
    (exp / "eval" / "step_4").mkdir(parents=True)
    (exp / "eval" / "step_4" / "wer.json").write_text("{}")
    (exp / "logs").mkdir()
    (exp / "logs" / "train_1.log").write_text("old log")
    (exp / "sft_model").mkdir()

    done = bash("set_aside_previous_run", env={"exp_dir": str(exp)})
    assert done.returncode == 0, done.stderr
    backups = list(exp.glob("replaced_*"))
    assert len(backups) == 1
    backup = backups[0]
    assert f"moved to {backup}" in done.stdout
    assert (backup / "global_step_2" / "actor" / "model.pt").read_text() == "weights 2"
    assert (backup / "global_step_4" / "merged_hf_model").is_dir()
    assert (backup / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert (backup / "eval" / "step_4" / "wer.json").exists()
    # what resume_mode=auto and stages 3/4 look for is gone from exp_dir; the rest stays
    assert not list(exp.glob("global_step_*")) and not (exp / "latest_checkpointed_iteration.txt").exists()
    assert not (exp / "eval").exists()
    assert (exp / "logs" / "train_1.log").read_text() == "old log" and (exp / "sft_model").is_dir()

    again = bash("set_aside_previous_run", env={"exp_dir": str(exp)})
    assert again.returncode == 0 and "no previous GRPO run" in again.stdout
    assert len(list(exp.glob("replaced_*"))) == 1


# ---- stage -1 / 4: the test set -----------------------------------------------------------------------------

def test_eval_manifest_help_and_stage_4_message(tmp_path):
    missing = tmp_path / "data" / "seedtts_testset" / "zh" / "meta.lst"
    done = bash("require_eval_manifest", env={"eval_manifest": str(missing)})
    assert done.returncode == 1
    assert f"eval_manifest '{missing}' not found: stage -1 on a CUDA machine downloads it" in done.stderr
    assert "k2-fsa/TTS_eval_datasets seedtts_testset.tar.gz" in done.stderr
    assert f"-C {tmp_path / 'data'}" in done.stderr
    other = bash("require_eval_manifest", env={"eval_manifest": str(tmp_path / "mine.jsonl")})
    assert "CV3-Eval" in other.stderr and "JSONL (id, text, prompt_text, prompt_wav" in other.stderr
    # stage -1 cannot download a set that is not in the Seed-TTS-eval layout: it says so and goes on
    skipped = bash("force=false; download_seedtts_eval", env={"eval_manifest": str(tmp_path / "mine.jsonl")})
    assert skipped.returncode == 0 and "is not in the Seed-TTS-eval layout" in skipped.stdout
    present = tmp_path / "present.lst"
    present.write_text("")
    kept = bash("force=true; download_seedtts_eval", env={"eval_manifest": str(present)})
    assert kept.returncode == 0 and f"test set already at {present}" in kept.stdout


# ---- stage -1: the SIM model download installs nothing -----------------------------------------------------

def test_sim_download_uses_the_server_envs_gdown_and_installs_none(tmp_path):
    # the trainer environment has no gdown: the download stops and says where gdown comes from
    done = bash("force=false; download_sim_model",
                env={"eval_sim_model": str(tmp_path / "sim.pth"), "eval_sim_model_gdrive_id": "x",
                     "server_python": str(REPO / ".venv" / "bin" / "python"), "cosyvoice_src": "CosyVoice"})
    assert done.returncode == 1
    assert "gdown is not in the server environment" in done.stderr
    assert "requirements-cosyvoice.txt" in done.stderr
    assert not (tmp_path / "sim.pth").exists()


def test_only_setup_env_installs_packages():
    """One pin per package: nothing but setup_env.sh runs pip install (so its stamp covers everything)."""
    offenders = []
    for path in [REPO / "run.sh", *sorted((REPO / "scripts").glob("*.sh")), *sorted((REPO / "scripts").glob("*.sbatch"))]:
        if path.name == "setup_env.sh":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # a pip command, not a message that tells the user to run one
            if re.search(r"-m pip install|^\s*(uv )?pip3? install", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


# ---- issue 25: an NVIDIA driver older than the CUDA wheels need --------------------------------------------

def fake_driver(tmp_path: Path, version: str) -> Path:
    """An nvidia-smi that lists 8 GPUs and reports driver `version` (--query-gpu=driver_version)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text("#!/bin/sh\ncase \"$*\" in\n  *driver_version*) for i in 0 1 2 3 4 5 6 7; do echo "
                    f"'{version}'; done ;;\n  *) for i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 80GB HBM3 "
                    "(UUID: GPU-$i)\"; done ;;\nesac\n")
    tool.chmod(0o755)
    return bin_dir


def trainer_env_with_stamp(tmp_path: Path, wheels: str | None) -> dict:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / ".ttsrl-requirements").write_text("device cuda\npin verl[vllm]==0.9.1\n"
                                               + (f"cuda_wheels {wheels}\n" if wheels else ""))
    return {"trainer_python": str(venv / "bin" / "python")}


def test_a_driver_older_than_580_is_named_with_both_fixes(tmp_path):
    path = fake_driver(tmp_path, "535.183.01")
    env = trainer_env_with_stamp(tmp_path, "cu130")
    done = bash('trainer_python=$trainer_python; select_train_device cuda 8', env=env, path_prefix=path)
    assert done.returncode == 1
    assert "check 'NVIDIA driver >= 580 for the cu130 wheels' failed: nvidia-smi reports driver 535.183.01" \
        in done.stderr
    assert "cuda-compat-13-0" in done.stderr and "cuda_compat_dir=/usr/local/cuda-13.0/compat" in done.stderr
    assert "cuda_wheels=cu128 bash run.sh --force -1 -1" in done.stderr
    server = bash("current_stage=1; require_gpus 1", env=env, path_prefix=path)  # stage 1's reward server on GPUs
    assert server.returncode == 1 and "stage 1 needs CUDA GPUs, but the check 'NVIDIA driver >= 580" in server.stderr
    # the CUDA 12.8 wheels run on it; so does a forward-compatibility libcuda
    assert bash("select_train_device cuda 8", env=trainer_env_with_stamp(tmp_path, "cu128"),
                path_prefix=path).stdout.strip() == "cuda"
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / "libcuda.so.1").write_text("")
    ok = bash('select_train_device cuda 8; use_cuda_compat; echo "LD=$LD_LIBRARY_PATH"',
              env={**env, "cuda_compat_dir": str(compat)}, path_prefix=path)
    assert ok.returncode == 0 and ok.stdout.splitlines()[0] == "cuda" and f"LD={compat}" in ok.stdout
    assert bash("select_train_device cuda 8", env=env, path_prefix=fake_driver(tmp_path / "new", "580.65.06")
                ).stdout.strip() == "cuda"
    missing = bash("use_cuda_compat", env={"cuda_compat_dir": str(tmp_path / "nope")})
    assert missing.returncode == 1 and "has no libcuda.so.1" in missing.stderr


# ---- issue 25: stage -1 on a GPU-less login node, essential steps first -------------------------------------

def test_stage_minus_1_for_cuda_downloads_what_training_needs_first_and_goes_on_past_optional_failures(tmp_path):
    """TTSRL_DEVICE=cuda decides on a machine without GPUs (a login node). The downloads themselves
    need the internet: the functions that reach it are replaced by ones that record the order (and
    fail for two optional assets); the stage's own logic is what runs."""
    script = r'''
record() { echo "$*" >> "$calls"; }
setup_environment() { record "env $1 $2"; }
get_cosyvoice_source() { record source; }
download_model() { record "download $1"; [ "$1" != iic/paraformer-zh ] || die "ModelScope unreachable"; }
download_whisper_model() { record whisper; }
download_emotion_model() { record emotion; }
download_sim_model() { record sim; die "Google Drive quota exceeded"; }
download_seedtts_eval() { record seedtts; }
convert_llm() { record convert; }
family_field() { echo iic/CosyVoice2-0.5B; }
config=configs/default.sh; force=false; source configs/default.sh
install_stage
echo "stage -1 returned"
'''
    calls = tmp_path / "calls.txt"
    done = bash(script, env={"TTSRL_DEVICE": "cuda", "calls": str(calls), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "stage -1 returned" in done.stdout and "install for cuda (TTSRL_DEVICE=cuda)" in done.stdout
    assert calls.read_text().splitlines() == [
        "env cuda trainer", "env cuda server", "source", "env cuda server", "download iic/CosyVoice2-0.5B",
        "download iic/SenseVoiceSmall", "emotion", "convert", "download iic/paraformer-zh", "whisper", "sim", "seedtts"]
    output = done.stdout + done.stderr
    assert "optional: Paraformer-zh (stage 4's Chinese ASR)" in output and "paraformer_dir=" in output
    assert "optional: the SIM model" in output and "To go without it: eval_sim_model=" in output
    assert "stage -1 finished without 2 optional evaluation asset(s)" in output
    # an essential download failing stops the stage
    essential = bash(script.replace('[ "$1" != iic/paraformer-zh ]', '[ "$1" != iic/SenseVoiceSmall ]'),
                     env={"TTSRL_DEVICE": "cuda", "calls": str(tmp_path / "c2.txt"), "PATH": "/usr/bin:/bin"})
    assert essential.returncode == 1 and "stage -1 returned" not in essential.stdout
    assert "convert" not in (tmp_path / "c2.txt").read_text()


# ---- stage 1 / 4: the servers' command lines from the config's knobs ------------------------------------------

def fake_server_python(tmp_path: Path) -> Path:
    """A 'python' that prints the command it was given (foreground: the server; else the launcher)."""
    tool = tmp_path / "fake_python"
    tool.write_text("#!/bin/sh\necho \"SERVER $*\"\n")
    tool.chmod(0o755)
    return tool


def server_command(tmp_path: Path, call: str = "start_server", **knobs: str):
    env = {"server_python": str(fake_server_python(tmp_path)), "trainer_python": str(REPO / ".venv/bin/python"),
           "exp_dir": str(tmp_path / "exp"), "server_engines": "token2wav_server.standin:create_engines",
           "server_foreground": "true", "n_gpus_per_node": "4", **knobs}
    done = bash(f"source configs/default.sh; {call}", env=env)
    line = next((line for line in done.stdout.splitlines() if "SERVER " in line), "")
    return done, line.split("SERVER ", 1)[-1].split()


def test_the_training_server_takes_the_gpu_defaults_and_loads_what_training_needs(tmp_path):
    sim = tmp_path / "sim.pth"
    sim.write_text("")
    done, args = server_command(tmp_path, eval_sim_model=str(sim))
    assert done.returncode == 0, done.stderr
    assert args[args.index("--devices") + 1] == "0,1,2,3"  # every training GPU of the node, one instance each
    assert args[args.index("--instances-per-device") + 1] == "1"
    assert args[args.index("--models") + 1] == "training"
    assert not {"--fp16", "--no-fp16", "--flow-batch", "--no-flow-batch", "--load-jit", "--load-trt"} & set(args)
    assert "token2wav_server.engines_wavlm_sv:create_engines" not in args  # the SIM model is evaluation's
    assert (tmp_path / "exp" / "logs" / "reward_server.log").read_text().startswith("SERVER ")


def test_decoding_knobs_become_server_flags_and_bad_values_are_named(tmp_path):
    done, args = server_command(tmp_path, server_fp16="false", server_flow_batch="true", server_load_jit="true",
                                server_load_trt="false")
    assert done.returncode == 0, done.stderr
    assert [a for a in args if a.startswith("--") and ("fp16" in a or "flow" in a or "load" in a)] == [
        "--no-fp16", "--flow-batch", "--load-jit"]
    done, args = server_command(tmp_path, server_fp16="auto", server_flow_batch="false", server_load_trt="true")
    assert "--no-flow-batch" in args and "--load-trt" in args and "--fp16" not in args
    done, _ = server_command(tmp_path, server_fp16="maybe")
    assert done.returncode != 0 and "server_fp16 must be auto, true or false, got 'maybe'" in done.stderr
    done, _ = server_command(tmp_path, server_models="eval")
    assert done.returncode == 1 and "server_models must be training or all, got 'eval'" in done.stderr


def test_a_foreground_server_without_a_log_file_writes_to_its_output_only(tmp_path):
    done, args = server_command(tmp_path, server_log="")
    assert done.returncode == 0, done.stderr
    assert "log on this output only (server_log=)" in done.stdout and args[0] == "-m"
    assert not (tmp_path / "exp" / "logs" / "reward_server.log").exists()


def test_stage_4s_evaluation_server_serves_every_model_on_its_own_ports(tmp_path):
    sim = tmp_path / "sim.pth"
    sim.write_text("")
    done, args = server_command(tmp_path, "start_server evaluation; echo started=$eval_server_started_here",
                                eval_sim_model=str(sim), eval_grpc_port="8111", eval_http_port="8110",
                                eval_server_devices="2")
    assert done.returncode == 0, done.stderr
    # the launcher's command line: its own pid and log files, then the server's flags
    assert args[:2] == ["-m", "token2wav_server.launch"]
    assert args[args.index("--pid-file") + 1] == str(tmp_path / "exp" / "eval_server.pid")
    assert args[args.index("--log-file") + 1] == str(tmp_path / "exp" / "logs" / "eval_server.log")
    assert args[args.index("--url") + 1] == "http://127.0.0.1:8110"
    server = args[args.index("--") + 1:]
    assert server[server.index("--models") + 1] == "all" and server[server.index("--grpc-port") + 1] == "8111"
    assert server[server.index("--devices") + 1] == "2"
    assert "token2wav_server.engines_wavlm_sv:create_engines" in server  # the SIM model as 'speaker'
    assert "evaluation server ready: http://127.0.0.1:8110" in done.stdout and "started=true" in done.stdout


def test_stage_4_evaluates_on_a_server_that_serves_its_models(tmp_path, reward_server):
    from token2wav_server.launch import free_ports

    # the stage 1 server serves the evaluation models (server_models=all, as the stand-in server here): reused
    done, _ = server_command(tmp_path, "evaluation_server_url; echo url=$eval_url",
                             REWARD_SERVER_URL=reward_server.grpc_url)
    assert done.returncode == 0, done.stderr
    assert f"url={reward_server.grpc_url}" in done.stdout and "it serves the evaluation models" in done.stdout
    # eval_server_url names a server without them: stopped, naming it and the models
    dead = f"grpc://127.0.0.1:{free_ports(1)[0]}"
    done, _ = server_command(tmp_path, "evaluation_server_url", eval_server_url=dead)
    assert done.returncode == 1
    assert f"eval_server_url {dead} does not serve stage 4's models (--model asr_eval --model speaker)" in done.stderr
    # neither: stage 4 starts its own (here a fake launcher that starts nothing, so the check after it fails)
    port = free_ports(1)[0]
    done, args = server_command(tmp_path, "evaluation_server_url", REWARD_SERVER_URL=dead, eval_grpc_port=str(port),
                                eval_http_port=str(free_ports(1)[0]), eval_similarity="false")
    assert done.returncode == 1 and args[:2] == ["-m", "token2wav_server.launch"]
    assert "starting an evaluation server (--models all)" in done.stdout
    assert (f"the evaluation server at grpc://127.0.0.1:{port} does not serve --model asr_eval: see "
            f"{tmp_path / 'exp' / 'logs' / 'eval_server.log'}") in done.stderr


# ---- stage -1: the emotion model only when the reward preset weights emotion ----------------------------------

def test_emotion_model_is_downloaded_only_for_a_preset_that_weights_emotion(tmp_path):
    env = {"reward_config": "configs/reward.yaml", "trainer_python": str(REPO / ".venv" / "bin" / "python"),
           "emotion2vec_dir": str(tmp_path / "e2v")}
    assert bash("reward_weights emotion", {**env, "reward_preset": "expressive"}).returncode == 0
    assert bash("reward_weights emotion", {**env, "reward_preset": "zero_shot_quality"}).returncode == 1
    skipped = bash("force=false; download_emotion_model", {**env, "reward_preset": "zero_shot"})
    assert skipped.returncode == 0 and "does not weight emotion: no emotion2vec+ download" in skipped.stdout
    (tmp_path / "e2v").mkdir()
    (tmp_path / "e2v" / "model.pt").write_bytes(b"x")  # already there: no download
    kept = bash("force=false; download_emotion_model", {**env, "reward_preset": "expressive"})
    assert kept.returncode == 0 and f"iic/emotion2vec_plus_large already in {tmp_path / 'e2v'}" in kept.stdout

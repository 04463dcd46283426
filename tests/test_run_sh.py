"""run.sh: argument handling, stage selection, idempotent stage 0, loud failures."""
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_sh(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", str(REPO / "run.sh"), *args], cwd=REPO, env=full_env, capture_output=True, text=True)


def test_help_lists_every_stage():
    done = run_sh("--help")
    assert done.returncode == 0
    for stage in ("-1  install", "0  prepare data", "1  reward server", "2  train", "3  merge",
                  "4  evaluate", "5  synthesize", "6  export"):
        assert stage in done.stdout


def test_bad_arguments_fail_with_a_message():
    assert "give START and STOP" in run_sh("0").stderr
    assert "START (3) is after STOP (1)" in run_sh("3", "1").stderr
    assert "config file 'nope.sh' not found" in run_sh("--config", "nope.sh", "0", "0").stderr
    assert "unknown argument '--frobnicate'" in run_sh("--frobnicate").stderr


def test_stage_0_builds_then_skips_then_rebuilds_with_force(tmp_path):
    env = {"train_file": str(REPO / "assets" / "zh_texts.jsonl"), "test_file": "", "test_size": "10",
           "data_dir": str(tmp_path / "parquet")}
    first = run_sh("0", "0", env=env)
    assert first.returncode == 0, first.stderr
    assert "train: " in first.stdout and (tmp_path / "parquet" / "train.parquet").exists()
    mtime = (tmp_path / "parquet" / "train.parquet").stat().st_mtime_ns
    second = run_sh("0", "0", env=env)
    assert second.returncode == 0 and "skipping (--force rebuilds)" in second.stdout
    assert (tmp_path / "parquet" / "train.parquet").stat().st_mtime_ns == mtime
    third = run_sh("--force", "0", "0", env=env)
    assert third.returncode == 0 and (tmp_path / "parquet" / "train.parquet").stat().st_mtime_ns != mtime


def test_stage_0_missing_input_names_the_file_and_the_stage(tmp_path):
    done = run_sh("0", "0", env={"train_file": str(tmp_path / "missing.jsonl"), "data_dir": str(tmp_path / "p")})
    assert done.returncode != 0
    assert f"train_file '{tmp_path / 'missing.jsonl'}' not found" in done.stderr
    assert "stage 0 failed" in done.stderr


def test_stop_server_without_a_running_server_says_so(tmp_path):
    done = run_sh("--stop-server", env={"exp_dir": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert f"no reward server pid file ({tmp_path / 'reward_server.pid'})" in done.stdout
    # a stage 4 evaluation server left behind by a killed run is stopped too (its pid file goes)
    (tmp_path / "eval_server.pid").write_text("999999999\n")
    done = run_sh("--stop-server", env={"exp_dir": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "eval_server.pid").exists()


# ---- stage 2: the training device (train_device) and --force --------------------------------------------

def no_gpu_path(tmp_path):
    """PATH with an nvidia-smi that fails as it does on a machine without a driver (so the test means the
    same on a machine that has GPUs); on this GPU-less machine the real PATH has no nvidia-smi at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'"
                    "\nexit 9\n")
    tool.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_stage_2_on_the_gpu_profile_without_gpus_stops_naming_the_check(tmp_path):
    env = {"exp_dir": str(tmp_path / "exp"), "train_device": "cuda"}
    if shutil.which("nvidia-smi") is None:  # this machine as it is: no driver at all
        done = run_sh("2", "2", env=env)
        assert done.returncode == 1
        assert "train_device=cuda needs 8 CUDA GPU(s) per node (n_gpus_per_node=8), but the check" \
               " 'nvidia-smi on PATH' failed: nvidia-smi not found" in done.stderr
        assert "install the NVIDIA driver (>= 580" in done.stderr and "set train_device=cpu" in done.stderr
        assert "stage 2 failed (exit 1)" in done.stderr
    done = run_sh("2", "2", env={**env, "PATH": no_gpu_path(tmp_path)})
    assert done.returncode == 1
    assert "but the check 'nvidia-smi -L' failed: NVIDIA-SMI has failed" in done.stderr
    assert "stage 2 failed (exit 1)" in done.stderr
    assert not (tmp_path / "exp").exists()  # stopped before anything ran or was written
    # the default config is the GPU profile
    default = run_sh("2", "2", env={"exp_dir": str(tmp_path / "exp"), "PATH": no_gpu_path(tmp_path)})
    assert default.returncode == 1 and "train_device=cuda needs 8 CUDA GPU(s)" in default.stderr


def test_stage_2_refuses_a_bad_train_device(tmp_path):
    done = run_sh("2", "2", env={"exp_dir": str(tmp_path / "exp"), "train_device": "bogus"})
    assert done.returncode == 1
    assert "train_device must be auto, cuda or cpu, got 'bogus'" in done.stderr
    assert "stage 2 failed" in done.stderr


def test_stage_2_auto_says_it_falls_back_to_the_cpu(tmp_path):
    done = run_sh("2", "2", env={"exp_dir": str(tmp_path / "exp"), "train_device": "auto",
                                 "PATH": no_gpu_path(tmp_path), "TRAINER_VENV": str(tmp_path / "no-venv")})
    assert "WARNING: training device: cpu. train_device=auto picked the CPU because the check 'nvidia-smi -L'" \
        in done.stderr
    assert "stage 2: GRPO on the CPU" in done.stdout
    assert done.returncode == 1 and "the trainer environment is missing" in done.stderr  # went on to stage 2's checks


def fake_trainer_venv(tmp_path: Path, exp: Path) -> Path:
    """A trainer 'python' that passes the preflight and, as the trainer, records what veRL would find in
    exp_dir to resume from; anything else (the folder claim, the workers' environment list) is the real
    trainer Python. Only stage 2's wiring is under test; the real training is tests/test_grpo_cpu.py's."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"""#!/bin/bash
case "$*" in
  *preflight_grpo.py*) echo "preflight: all checks passed" ;;
  *verl.trainer.main_ppo*) ls {exp} > {tmp_path / 'seen_by_trainer.txt'}; echo "$*" > {tmp_path / 'trainer_args.txt'} ;;
  *) exec {REPO / '.venv' / 'bin' / 'python'} "$@" ;;
esac
""")
    python.chmod(0o755)
    return venv


def test_force_makes_grpo_start_afresh_with_the_old_run_kept(tmp_path):
    exp = tmp_path / "exp"
    (exp / "global_step_100" / "actor").mkdir(parents=True)
    (exp / "global_step_100" / "actor" / "model.pt").write_text("step 100")
    (exp / "latest_checkpointed_iteration.txt").write_text("100")
    # what the tts_sync trainer keeps beside the checkpoints: the best step and refused rollouts
    (exp / "best_checkpoint.json").write_text('{"step": 100, "validation_reward": 0.5}')
    (exp / ".best_checkpoint" / "global_step_100" / "actor").mkdir(parents=True)
    (exp / "reward_failures.jsonl").write_text('{"step": 7}\n')
    env = {"exp_dir": str(exp), "train_device": "cpu", "TRAINER_VENV": str(fake_trainer_venv(tmp_path, exp)),
           "n_gpus_per_node": "1", "CUDA_VISIBLE_DEVICES": ""}

    resumed = run_sh("2", "2", env=env)  # without --force: veRL finds the checkpoint (resume_mode=auto)
    assert resumed.returncode == 0, resumed.stderr
    assert "global_step_100" in (tmp_path / "seen_by_trainer.txt").read_text()

    fresh = run_sh("--force", "2", "2", env=env)
    assert fresh.returncode == 0, fresh.stderr
    seen = (tmp_path / "seen_by_trainer.txt").read_text().split()
    assert "global_step_100" not in seen and "latest_checkpointed_iteration.txt" not in seen
    [backup] = exp.glob("replaced_*")
    assert f"moved to {backup}" in fresh.stdout
    assert (backup / "global_step_100" / "actor" / "model.pt").read_text() == "step 100"
    # a fresh run must not take the old run's best step for its own (retention would restore it)
    for name in ("best_checkpoint.json", ".best_checkpoint", "reward_failures.jsonl"):
        assert (backup / name).exists() and not (exp / name).exists()
    assert "trainer.resume_mode" not in (tmp_path / "trainer_args.txt").read_text()  # auto: nothing to resume


def test_stage_0_refuses_training_on_the_test_sets_prompts_naming_both_files(tmp_path, reward_server):
    """run.sh passes eval_manifest to stage 0. configs/smoke.sh's stand-in task evaluates in its 8 training
    prompts on purpose (allow_held_out_prompts=true there); by default that is refused before any prompt
    is tokenized."""
    smoke = REPO / "assets" / "smoke_zero_shot"
    env = {"train_file": str(smoke / "texts.jsonl"), "test_file": "", "test_size": "10", "max_chars": "6",
           "data_dir": str(tmp_path / "parquet"), "train_prompts": str(smoke / "prompts.jsonl"),
           "eval_manifest": str(smoke / "meta.lst"), "dev_manifest": "", "allow_held_out_prompts": "false",
           "server_host": reward_server.host, "http_port": str(reward_server.http_port),
           "REWARD_SERVER_URL": reward_server.grpc_url}
    done = run_sh("0", "0", env=env)
    assert done.returncode != 0
    assert "8 training speaker prompt(s) are prompts of a held-out set" in done.stderr
    assert f"{smoke / 'prompts.jsonl'}:1: prompt wav {smoke / 'prompt-wavs' / 'voice3_0.wav'} is the recording of " \
           f"evaluation set {smoke / 'meta.lst'} utterance 'zs00' ({smoke / 'meta.lst'}:1: " in done.stderr
    assert not (tmp_path / "parquet" / "train.parquet").exists()
    # (allow_held_out_prompts=true, a warning instead: tests/ttsrl/training/test_held_out.py and the smoke run)


# ---- issue 25: selection never touches the test set unless asked -------------------------------------------

def test_stage_4_without_a_dev_set_stops_before_inferring_naming_the_fixes(tmp_path):
    env = {"exp_dir": str(tmp_path / "exp"), "data_dir": str(tmp_path / "data"), "dev_manifest": ""}
    done = run_sh("4", "4", env=env)
    assert done.returncode == 1
    assert "stage 4 chooses the best step on a dev set, and there is none" in done.stderr
    assert "set dev_size" in done.stderr and "eval_select_on=test" in done.stderr
    assert not (tmp_path / "exp" / "eval").exists()
    asked = run_sh("4", "4", env={**env, "eval_select_on": "test", "eval_manifest": str(tmp_path / "none.lst")})
    assert asked.returncode == 1 and "(eval_select_on=test: the test set chooses the best step)" in asked.stdout
    assert f"eval_manifest '{tmp_path / 'none.lst'}' not found" in asked.stderr  # went on to the next check


def test_a_stage_refuses_another_runs_folder(tmp_path):
    """Defect 4: a DPO run in a GRPO run's folder (or a CosyVoice3 run on CosyVoice2's data) stops,
    naming both, before it writes anything."""
    exp = tmp_path / "exp"
    (exp / "global_step_100" / "actor").mkdir(parents=True)  # a GRPO run's checkpoint, from before run.json
    done = run_sh("3", "3", env={"exp_dir": str(exp), "train_algorithm": "dpo"})
    assert done.returncode == 1 and "stage 3 failed" in done.stderr
    assert "holds the outputs of another run (train_algorithm=grpo" in done.stderr
    assert "this run is model_family=cosyvoice2, train_algorithm=dpo" in done.stderr
    assert sorted(p.name for p in exp.iterdir()) == ["global_step_100"]
    data = tmp_path / "data"
    first = run_sh("0", "0", env={"data_dir": str(data), "train_file": str(REPO / "assets" / "zh_texts.jsonl"),
                                  "test_file": "", "test_size": "4", "dev_size": "4"})
    assert first.returncode == 0, first.stderr
    other = run_sh("0", "0", env={"data_dir": str(data), "model_family": "cosyvoice3"})
    assert other.returncode == 1 and "data folder" in other.stderr and "model_family=cosyvoice2" in other.stderr

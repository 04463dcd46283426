"""run.sh: argument handling, stage selection, idempotent stage 0, loud failures."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_sh(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", str(REPO / "run.sh"), *args], cwd=REPO, env=full_env, capture_output=True, text=True)


def test_help_lists_every_stage():
    done = run_sh("--help")
    assert done.returncode == 0
    for stage in ("-1  install", "0  prepare data", "1  reward server", "2  GRPO training", "3  merge",
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

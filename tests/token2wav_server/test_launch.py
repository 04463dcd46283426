"""token2wav_server.launch's CLI, what run.sh stage 1 and --stop-server run: start detached
and wait until ready, stop the whole session; a server that dies or is late at start-up."""
import subprocess

from token2wav_server.launch import REPO_ROOT, STANDIN_ENGINES, free_ports, server_python, session_members
from ttsrl.triton_client import server_ready


def launch(*args, timeout=300):
    return subprocess.run([server_python(), "-m", "token2wav_server.launch", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def start(tmp_path, *server_args, timeout="240"):
    http_port, grpc_port, metrics_port = free_ports(3)
    url = f"http://127.0.0.1:{http_port}"
    done = launch("start", "--pid-file", str(tmp_path / "server.pid"), "--log-file", str(tmp_path / "server.log"),
                  "--url", url, "--timeout", timeout, "--", "--host", "127.0.0.1", "--http-port", str(http_port),
                  "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--engines", STANDIN_ENGINES,
                  "--devices", "cpu", *server_args)
    return done, url


def test_start_waits_until_ready_and_stop_leaves_nothing(tmp_path):
    pid_file = tmp_path / "server.pid"
    started, url = start(tmp_path)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pid = int(pid_file.read_text())
        assert f"reward server starting (pid {pid}, log {tmp_path / 'server.log'}); waiting up to 240s" in started.stdout
        assert server_ready(url) and pid in session_members(pid)
    finally:
        stopped = launch("stop", "--pid-file", str(pid_file))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"stopping the reward server (pid {pid})" in stopped.stdout
    assert session_members(pid) == [] and not pid_file.exists() and not server_ready(url)
    again = launch("stop", "--pid-file", str(pid_file))
    assert again.returncode == 0 and f"no reward server pid file ({pid_file})" in again.stdout


def test_a_server_that_exits_or_is_late_at_start_up(tmp_path):
    exited, _ = start(tmp_path, "--engine-option", "delay_ms=soon")
    assert exited.returncode == 3  # EXITED_DURING_START: run.sh tells it from a crash of launch itself (1)
    assert "could not start (configuration error above): not restarting" in exited.stderr  # the log's tail
    assert not (tmp_path / "server.pid").exists()

    late, url = start(tmp_path, timeout="0.5")
    assert late.returncode == 124
    assert "stopping the reward server (pid" in late.stdout
    assert not (tmp_path / "server.pid").exists() and not server_ready(url)
    pid = int(late.stdout.split("(pid ", 1)[1].split(",", 1)[0])
    assert session_members(pid) == []


def test_usage_errors():
    assert launch("start", "--pid-file", "p", "--log-file", "l", "--url", "http://h:1").returncode == 2
    assert launch("stop", "--pid-file", "p", "--", "x").returncode == 2

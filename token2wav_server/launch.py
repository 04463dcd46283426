"""Start a reward server in a subprocess on free ports, wait until it is ready, stop it.

Runs from either environment (standard library only), so trainer-side tests,
benchmarks and smoke runs can bring up a real server::

    from token2wav_server.launch import start_server
    with start_server(extra_args=["--max-batch-size", "64"]) as server:
        print(server.grpc_url, server.http_url)

The server runs in ``.venv-server`` (``SERVER_PYTHON`` overrides), in its own
process group, with stand-in engines unless ``engines`` says otherwise.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
STANDIN_ENGINES = "token2wav_server.standin:create_engines"


def server_python() -> str:
    """The server environment's interpreter: $SERVER_PYTHON, else .venv-server/bin/python."""
    if os.environ.get("SERVER_PYTHON"):
        return os.environ["SERVER_PYTHON"]
    candidate = REPO_ROOT / ".venv-server" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago (bound to port 0, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_ready(http_url: str, timeout: float = 2.0, model: str = "token2wav_asr") -> bool:
    """Whether the server is ready and ``model`` is loaded (Triton starts answering
    before PyTriton has loaded the models, so server readiness alone is not enough)."""
    for path in ("/v2/health/ready", f"/v2/models/{model}/ready"):
        try:
            with urllib.request.urlopen(f"{http_url}{path}", timeout=timeout) as response:
                if response.status != 200:
                    return False
        except (urllib.error.URLError, ConnectionError, OSError):
            return False
    return True


class ServerProcess:
    """A reward server subprocess (see ``start_server``)."""

    def __init__(self, args: Sequence[str], host: str, ports: Sequence[int], log_path: pathlib.Path,
                 python: Optional[str] = None, cwd: Optional[pathlib.Path] = None, env: Optional[dict] = None):
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = ports
        self.log_path = log_path
        self.command = [python or server_python(), "-m", "token2wav_server", "--host", host,
                        "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                        "--metrics-port", str(self.metrics_port), *args]
        self.cwd = cwd or REPO_ROOT
        self.env = env
        self.process: Optional[subprocess.Popen] = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        """Start (or restart) the process and wait until it reports ready."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("server already running")
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"reward server exited with {self.process.returncode}; log {self.log_path}:\n"
                                   + self.log()[-4000:])
            if is_ready(self.http_url, timeout=1.0):
                return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"reward server not ready after {timeout} s; log {self.log_path}:\n" + self.log()[-4000:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Kill the whole process group at once (SIGKILL): a crash, for fault tests."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 40.0) -> None:
        """SIGINT (clean shutdown), then SIGKILL of the process group if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Triton and its stubs live in the same group: make sure none survives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def start_server(engines: str = STANDIN_ENGINES, extra_args: Sequence[str] = (), host: str = "127.0.0.1",
                 python: Optional[str] = None, log_path: Optional[str] = None, timeout: float = 180.0,
                 devices: str = "cpu") -> ServerProcess:
    """Start ``python -m token2wav_server`` on free ports and wait until ready."""
    if log_path is None:
        handle, log_path = tempfile.mkstemp(prefix="token2wav_server_", suffix=".log")
        os.close(handle)
    args = ["--engines", engines, "--devices", devices, *extra_args]
    server = ServerProcess(args, host, free_ports(3, host), pathlib.Path(log_path), python=python)
    return server.start(timeout=timeout)

"""Start a reward server in a subprocess on free ports, wait until it is ready, stop it.

Runs from either environment (standard library only), so trainer-side tests,
benchmarks and smoke runs can bring up a real server::

    from token2wav_server.launch import start_server
    with start_server(extra_args=["--max-batch-size", "64"]) as server:
        print(server.grpc_url, server.http_url)

The server runs in ``.venv-server`` (``SERVER_PYTHON`` overrides), in its own
session, with stand-in engines unless ``engines`` says otherwise. Its front process
(token2wav_server/supervisor.py) restarts Triton when it dies; ``kill_triton()`` and
``kill_worker()`` crash those on purpose, ``kill()`` crashes everything.
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
from typing import NamedTuple, Optional, Sequence

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


class ProcessInfo(NamedTuple):
    pid: int
    ppid: int
    pgid: int
    sid: int
    name: str


def processes() -> list[ProcessInfo]:
    """Every live (not zombie) process on this machine, from /proc (Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode("utf-8", "replace")
        except OSError:
            continue  # ended meanwhile
        # "pid (name) state ppid pgrp session ...": the name may hold spaces and parentheses.
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue  # a zombie holds no ports and no memory; its parent reaps it
        found.append(ProcessInfo(int(entry), int(fields[1]), int(fields[2]), int(fields[3]), name))
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    return [p.pid for p in processes() if p.pgid == pgid]


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    return [p.pid for p in processes() if p.sid == sid]


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

    def members(self) -> list[ProcessInfo]:
        """The server's live processes: the front, its worker, tritonserver and the stubs
        (all in the session the front leads)."""
        if self.process is None:
            return []
        return [p for p in processes() if p.sid == self.process.pid]

    def _kill_session(self) -> None:
        # The worker has its own process group inside the front's session: killing the
        # session's members is what reaches every one of them.
        kill_session(self.process.pid)

    def kill(self) -> None:
        """Kill every process of the server at once (SIGKILL): a crash, for fault tests."""
        if self.process is None:
            return
        self._kill_session()
        self.process.wait()

    def _member(self, name: str) -> ProcessInfo:
        for info in self.members():
            if info.name == name and info.pid != self.process.pid:
                return info
        raise RuntimeError(f"no {name} process in the reward server's session (is it running?)")

    def worker_pid(self) -> int:
        """The Triton worker process (the front's child running PyTriton)."""
        for info in self.members():
            if info.ppid == self.process.pid:
                return info.pid
        raise RuntimeError("the reward server has no worker process now")

    def triton_pid(self) -> int:
        return self._member("tritonserver").pid

    def kill_worker(self, signum: int = signal.SIGKILL) -> int:
        """Signal the worker process only (the front stays): a crash the front recovers from."""
        pid = self.worker_pid()
        os.kill(pid, signum)
        return pid

    def kill_triton(self, signum: int = signal.SIGKILL) -> int:
        """Signal the tritonserver process only (as a segfault would end it)."""
        pid = self.triton_pid()
        os.kill(pid, signum)
        return pid

    def stop(self, timeout: float = 40.0) -> None:
        """SIGINT to the front (it stops the worker cleanly), then SIGKILL of whatever is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_session()
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


def kill_session(sid: int, timeout: float = 10.0) -> list[int]:
    """SIGKILL every live process of session ``sid`` until none is left; the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = session_members(sid)
        if not members:
            break
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
        time.sleep(0.1)
    return killed


def main(argv=None) -> int:
    """``python -m token2wav_server.launch kill-session SID``: what run.sh --stop-server uses
    to make sure no process of the server it started (front, worker, Triton, stubs) is left."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m token2wav_server.launch")
    commands = parser.add_subparsers(dest="command", required=True)
    kill = commands.add_parser("kill-session", help="SIGKILL every process of a session (a server started with setsid)")
    kill.add_argument("sid", type=int)
    args = parser.parse_args(argv)
    killed = kill_session(args.sid)
    left = session_members(args.sid)
    if killed:
        print(f"killed leftover processes of session {args.sid}: {killed}")
    if left:
        print(f"processes of session {args.sid} still alive: {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one server lifecycle: start a reward server in its own session, wait until it is
ready, stop the whole session.

Runs from either environment (standard library, plus ttsrl.triton_client's readiness
check: both environments have tritonclient), so trainer-side tests, benchmarks and
smoke runs can bring up a real server::

    from token2wav_server.launch import start_server
    with start_server(extra_args=["--max-batch-size", "64"]) as server:
        print(server.grpc_url, server.http_url)

The server runs in ``.venv-server`` (``SERVER_PYTHON`` overrides), in its own
session, with stand-in engines unless ``engines`` says otherwise. Its front process
(token2wav_server/supervisor.py) restarts Triton when it dies; ``kill_triton()`` and
``kill_worker()`` crash those on purpose, ``kill()`` crashes everything.

run.sh's stage 1 and ``--stop-server`` use the same code through the CLI::

    python -m token2wav_server.launch start --pid-file F --log-file L --url http://HOST:PORT \
        --timeout S [--python SERVER_PYTHON] -- <python -m token2wav_server args>
        # exit 0: ready; 3: the server exited during start-up; 124: not ready in time (stopped)
    python -m token2wav_server.launch stop --pid-file F
    python -m token2wav_server.launch kill-session SID
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
from typing import NamedTuple, Optional, Sequence

from ttsrl.atomic_write import write_text
from ttsrl.triton_client import server_ready

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


def process_info(pid: int) -> Optional[ProcessInfo]:
    """``pid`` from /proc (Linux); None when it is gone or a zombie (a zombie holds no
    ports and no memory; its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("utf-8", "replace")
    except OSError:
        return None  # ended meanwhile
    # "pid (name) state ppid pgrp session ...": the name may hold spaces and parentheses.
    name = stat[stat.index("(") + 1: stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return ProcessInfo(int(pid), int(fields[1]), int(fields[2]), int(fields[3]), name)


def processes() -> list[ProcessInfo]:
    """Every live (not zombie) process on this machine."""
    found = (process_info(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [info for info in found if info is not None]


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    return [p.pid for p in processes() if p.pgid == pgid]


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    return [p.pid for p in processes() if p.sid == sid]


class ServerExited(RuntimeError):
    """The server process ended before it was ready."""

    def __init__(self, returncode: int):
        super().__init__(f"reward server exited with {returncode}")
        self.returncode = returncode


def spawn(command: Sequence[str], log_path: pathlib.Path, cwd: pathlib.Path = REPO_ROOT,
          env: Optional[dict] = None) -> subprocess.Popen:
    """Run ``command`` in a session of its own (so stopping the session stops Triton and its
    stubs too), stdin closed, stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(command), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float, poll_s: float = 0.3) -> None:
    """Return once the server at ``url`` is ready; ServerExited if the process ends first,
    TimeoutError after ``timeout`` seconds (the process is left running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerExited(process.returncode)
        if server_ready(url, timeout_s=1.0):
            return
        time.sleep(poll_s)
    raise TimeoutError(f"reward server not ready after {timeout} s")


def stop_session(sid: int, timeout: float = 40.0) -> list[int]:
    """Stop the server whose front leads session ``sid``: SIGINT to its process group (the
    front stops its worker cleanly), up to ``timeout`` s for the front to end, SIGKILL of the
    group, then of whatever else is left of the session (a Triton worker whose front died).
    Returns the pids of that last step: processes that outlived their group."""
    if process_info(sid) is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while process_info(sid) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    return kill_session(sid)


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
        self.process = spawn(self.command, self.log_path, cwd=self.cwd, env=env)
        try:
            wait_until_ready(self.process, self.http_url, timeout)
        except ServerExited as exited:
            raise RuntimeError(f"{exited}; log {self.log_path}:\n" + self.log()[-4000:]) from None
        except TimeoutError as late:
            self.stop()
            raise TimeoutError(f"{late}; log {self.log_path}:\n" + self.log()[-4000:]) from None
        return self

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
        stop_session(self.process.pid, timeout)
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


EXITED_DURING_START = 3  # not 1, which any uncaught error of this CLI exits with
NOT_READY_IN_TIME = 124  # as timeout(1) says it


def _say(message: str) -> None:
    # run.sh reads these lines as they come and logs each one
    print(message, flush=True)


def log_tail(path: pathlib.Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log that may have grown large over many runs."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "".join(text.splitlines(keepends=True)[-lines:])


def start_detached(server_args: Sequence[str], pid_file: pathlib.Path, log_file: pathlib.Path, url: str,
                   timeout: float, python: str = sys.executable, say=_say) -> int:
    """``python -m token2wav_server SERVER_ARGS`` in its own session, its pid in ``pid_file``,
    left running once ready at ``url``: 0. It exits during start-up: its log's tail on stderr,
    no pid file, EXITED_DURING_START. Not ready in ``timeout`` s: stopped, NOT_READY_IN_TIME."""
    process = spawn([python, "-m", "token2wav_server", *server_args], log_file)
    write_text(pid_file, f"{process.pid}\n")
    say(f"reward server starting (pid {process.pid}, log {log_file}); waiting up to {timeout:g}s until it is ready")
    try:
        wait_until_ready(process, url, timeout)
    except ServerExited:
        sys.stderr.write(log_tail(log_file))
        pid_file.unlink(missing_ok=True)
        return EXITED_DURING_START
    except TimeoutError:
        stop_from_pid_file(pid_file, say=say)
        return NOT_READY_IN_TIME
    return 0


def stop_from_pid_file(pid_file: pathlib.Path, timeout: float = 40.0, say=_say) -> int:
    """Stop the server ``start_detached`` recorded in ``pid_file`` (``stop_session``), then
    remove the file. 1 when some process of its session outlives SIGKILL, else 0."""
    if not pid_file.is_file():
        say(f"no reward server pid file ({pid_file})")
        return 0
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        say(f"{pid_file} holds no pid; removing it")
        pid_file.unlink(missing_ok=True)
        return 0
    if process_info(pid) is not None:
        say(f"stopping the reward server (pid {pid})")
    status = _report_leftovers(pid, stop_session(pid, timeout), say)
    pid_file.unlink(missing_ok=True)
    return status


def _report_leftovers(sid: int, killed: list[int], say=_say) -> int:
    left = session_members(sid)
    if killed:
        say(f"killed leftover processes of session {sid}: {killed}")
    if left:
        print(f"processes of session {sid} still alive: {left}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """``start`` / ``stop`` a server for run.sh (stage 1, --stop-server); ``kill-session SID``
    SIGKILLs whatever is left of a session."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:  # everything after it is the server's own command line
        server_args, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    parser = argparse.ArgumentParser(prog="python -m token2wav_server.launch")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start python -m token2wav_server ARGS (after --) in its own session "
                                              "and wait until it is ready")
    start.add_argument("--pid-file", type=pathlib.Path, required=True)
    start.add_argument("--log-file", type=pathlib.Path, required=True, help="the server's output is appended here")
    start.add_argument("--url", required=True, help="where to check readiness, e.g. http://127.0.0.1:8000")
    start.add_argument("--timeout", type=float, default=900.0, help="seconds to wait until it is ready")
    start.add_argument("--python", default=sys.executable,
                       help="the server environment's interpreter (default: the one running this)")
    stop = commands.add_parser("stop", help="stop the server of a pid file: SIGINT, then SIGKILL of its session")
    stop.add_argument("--pid-file", type=pathlib.Path, required=True)
    stop.add_argument("--timeout", type=float, default=40.0, help="seconds to wait after SIGINT")
    kill = commands.add_parser("kill-session", help="SIGKILL every process of a session (a server started with setsid)")
    kill.add_argument("sid", type=int)
    args = parser.parse_args(argv)
    if args.command == "start":
        if not server_args:
            parser.error("start needs the server's arguments after --")
        return start_detached(server_args, args.pid_file, args.log_file, args.url, args.timeout, args.python)
    if server_args:
        parser.error(f"{args.command} takes no arguments after --")
    if args.command == "stop":
        return stop_from_pid_file(args.pid_file, args.timeout)
    return _report_leftovers(args.sid, kill_session(args.sid))


if __name__ == "__main__":
    sys.exit(main())

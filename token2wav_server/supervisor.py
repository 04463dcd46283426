"""The reward server's front process: owns the public HTTP and metrics ports, runs Triton in a
worker process, and restarts that worker when it dies.

::

    python -m token2wav_server ...          (this front process, asyncio)
      ├─ HTTP guard    on HOST:http_port    -> Triton HTTP on 127.0.0.1:<internal port>
      ├─ metrics       on HOST:metrics_port -> Triton metrics (internal port) + our own lines
      └─ worker        python -m token2wav_server --worker ...   (own process group)
           └─ tritonserver (gRPC on HOST:grpc_port) + Python-backend stubs

When the worker exits or Triton stops answering for ``hang_timeout_s``, the worker's whole
process group is killed and a new worker starts on the same public ports after a backoff
(``backoff_initial_s``, doubling per restart within ``window_s``, at most
``backoff_max_s``). More than ``max_restarts`` restarts within ``window_s`` means
something is persistently wrong: the front gives up and exits with the worker's status.
``max_restarts=0`` (``--no-supervise``) never restarts, for running under an external
supervisor (systemd, SLURM) that restarts the whole server instead.

A worker that exits with status 2 before it ever became ready has a configuration
problem (missing model, bad option): no restart helps, the front exits with 2.

SIGINT / SIGTERM stop the front: it sends SIGINT to the worker (PyTriton stops Triton,
finishing in-flight requests), waits ``stop_timeout_s``, kills what is left of the
worker's group, and exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .http_guard import GuardLimits, HttpGuard
from .launch import free_ports, group_members

LOGGER = logging.getLogger("token2wav_server.supervisor")
EXIT_CONFIG_ERROR = 2  # the worker's status for a start-up configuration error: never restarted
READY_MODEL = "token2wav_asr"  # bound last, so every model is loaded once it is ready


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 10
    window_s: float = 600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    hang_timeout_s: float = 30.0
    stop_timeout_s: float = 30.0  # with the ports' 5 s, within run.sh --stop-server's 40 s

    def __post_init__(self):
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.window_s <= 0 or self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"bad restart timing: window {self.window_s} s, backoff {self.backoff_initial_s}.."
                             f"{self.backoff_max_s} s")
        if self.hang_timeout_s < 0:
            raise ValueError(f"--hang-timeout-s must be >= 0 (0: off), got {self.hang_timeout_s}")

    def backoff(self, recent_restarts: int) -> float:
        """Wait before the ``recent_restarts``-th restart within the window (1, 2, ...)."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, recent_restarts - 1))


@dataclass(frozen=True)
class FrontConfig:
    host: str
    http_port: int
    metrics_port: int
    http_guard: bool = True
    limits: GuardLimits = GuardLimits()


def client_host(host: str) -> str:
    """The address a local client uses for a server bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def exit_status(returncode: int) -> int:
    """A shell-style status for a child's return code (-9 -> 137)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class WorkerState:
    process: Optional[asyncio.subprocess.Process] = None
    http_url: Optional[str] = None       # Triton's HTTP (internal when guarded)
    metrics_url: Optional[str] = None    # Triton's metrics (always internal)
    ready: bool = False
    started_at: float = 0.0
    ready_once: bool = False


@dataclass
class Counters:
    starts: int = 0
    restarts: int = 0
    unhealthy_kills: int = 0
    last_exit_status: Optional[int] = None
    restart_times: deque = field(default_factory=deque)


class Supervisor:
    """Runs the worker command, restarting it by ``policy``; serves the guard and metrics."""

    def __init__(self, worker_command: Sequence[str], front: FrontConfig, policy: RestartPolicy = RestartPolicy()):
        self.worker_command = list(worker_command)
        self.front = front
        self.policy = policy
        self.worker = WorkerState()
        self.counters = Counters()
        self.guard = HttpGuard(self._guard_upstream, front.limits)
        self._stop = None  # asyncio.Event, created in the loop
        self._stop_signal: Optional[int] = None
        self._runners = []
        self._session = None

    # ---- public ports -----------------------------------------------------------------
    def _guard_upstream(self) -> Optional[str]:
        # Forward while the worker process is up, ready or not: Triton answers health and
        # readiness requests itself while models load (clients poll those).
        process = self.worker.process
        if process is None or process.returncode is not None:
            return None
        return self.worker.http_url

    async def _start_sites(self) -> None:
        from aiohttp import web

        sites = [(self._metrics_app(), self.front.metrics_port, "metrics")]
        if self.front.http_guard:
            sites.insert(0, (self.guard.app(), self.front.http_port, "HTTP guard"))
        for app, port, what in sites:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
            await runner.setup()
            self._runners.append(runner)
            await web.TCPSite(runner, self.front.host, port, reuse_address=True).start()
            LOGGER.info("%s listening on %s:%d", what, self.front.host, port)

    def _metrics_app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        return app

    def metrics_text(self) -> str:
        """Our Prometheus lines (appended to Triton's own metrics)."""
        c = self.counters
        lines = [
            "# HELP token2wav_server_worker_up 1 when the Triton worker is running and its models are ready.",
            "# TYPE token2wav_server_worker_up gauge",
            f"token2wav_server_worker_up {int(self.worker.ready)}",
            "# HELP token2wav_server_worker_starts_total Triton worker starts (the first one included).",
            "# TYPE token2wav_server_worker_starts_total counter",
            f"token2wav_server_worker_starts_total {c.starts}",
            "# HELP token2wav_server_worker_restarts_total Restarts after the Triton worker died or hung.",
            "# TYPE token2wav_server_worker_restarts_total counter",
            f"token2wav_server_worker_restarts_total {c.restarts}",
            "# HELP token2wav_server_worker_hang_kills_total Workers killed because Triton stopped answering.",
            "# TYPE token2wav_server_worker_hang_kills_total counter",
            f"token2wav_server_worker_hang_kills_total {c.unhealthy_kills}",
        ]
        if c.last_exit_status is not None:
            lines += ["# HELP token2wav_server_worker_last_exit_status Exit status of the last worker that ended "
                      "(128+N: killed by signal N).",
                      "# TYPE token2wav_server_worker_last_exit_status gauge",
                      f"token2wav_server_worker_last_exit_status {c.last_exit_status}"]
        if self.front.http_guard:
            lines += ["# HELP token2wav_server_http_requests_total Requests on the public HTTP port, by outcome.",
                      "# TYPE token2wav_server_http_requests_total counter"]
            for outcome in ("forwarded", "too_large", "bad_json", "too_many_items", "bad_http", "triton_down",
                            "triton_failed"):
                lines.append(f'token2wav_server_http_requests_total{{outcome="{outcome}"}} '
                             f"{self.guard.counts[outcome]}")
        return "\n".join(lines) + "\n"

    async def _metrics(self, _request):
        from aiohttp import web

        triton = ""
        if self.worker.metrics_url and self._guard_upstream() is not None:
            try:
                async with self._session.get(self.worker.metrics_url + "/metrics") as response:
                    if response.status == 200:
                        triton = await response.text()
            except Exception as error:  # Triton going down mid-scrape: serve our lines anyway
                LOGGER.debug("Triton metrics unavailable: %s", error)
        if triton and not triton.endswith("\n"):
            triton += "\n"
        return web.Response(text=triton + self.metrics_text(), content_type="text/plain", charset="utf-8")

    # ---- the worker -------------------------------------------------------------------
    async def _spawn(self) -> None:
        internal_http, internal_metrics = free_ports(2, "127.0.0.1")
        command = list(self.worker_command)
        if self.front.http_guard:
            command += ["--triton-http-address", "127.0.0.1", "--triton-http-port", str(internal_http)]
            http_url = f"http://127.0.0.1:{internal_http}"
        else:
            command += ["--triton-http-address", self.front.host, "--triton-http-port", str(self.front.http_port)]
            http_url = f"http://{_url_host(client_host(self.front.host))}:{self.front.http_port}"
        command += ["--triton-metrics-port", str(internal_metrics)]
        # Its own process group: a restart kills exactly this worker's tree (Triton, stubs),
        # and a Ctrl-C at a terminal reaches only the front, which stops the worker in order.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL, **group)
        self.worker = WorkerState(process=process, http_url=http_url,
                                  metrics_url=f"http://127.0.0.1:{internal_metrics}", started_at=time.monotonic())
        self.counters.starts += 1
        LOGGER.info("worker started (pid %d, start %d): Triton HTTP %s", process.pid, self.counters.starts, http_url)

    async def _get_ok(self, path: str) -> bool:
        try:
            async with self._session.get(self.worker.http_url + path) as response:
                return response.status == 200
        except Exception:
            return False

    async def _watch(self) -> Optional[int]:
        """Until the worker ends (its status), hangs (killed: its status), or a stop is asked (None)."""
        process = self.worker.process
        silent_since: Optional[float] = None
        while True:
            wait_exit = asyncio.ensure_future(process.wait())
            wait_stop = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait({wait_exit, wait_stop}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            for task in (wait_exit, wait_stop):
                if task not in done:
                    task.cancel()
            if wait_stop in done:
                return None
            if wait_exit in done:
                return process.returncode
            live = await self._get_ok("/v2/health/live")
            if not self.worker.ready_once:
                # Loading models can take minutes: no hang detection before the first ready.
                if live and await self._get_ok(f"/v2/models/{READY_MODEL}/ready"):
                    self.worker.ready = self.worker.ready_once = True
                    LOGGER.info("worker ready (pid %d) %.1f s after its start", process.pid,
                                time.monotonic() - self.worker.started_at)
                continue
            if live:
                if not self.worker.ready:
                    LOGGER.info("Triton answers again (worker pid %d)", process.pid)
                self.worker.ready, silent_since = True, None
                continue
            self.worker.ready = False
            silent_since = silent_since or time.monotonic()
            silent = time.monotonic() - silent_since
            if self.policy.hang_timeout_s and silent >= self.policy.hang_timeout_s:
                LOGGER.error("Triton has not answered health checks for %.0f s (worker pid %d): killing it",
                             silent, process.pid)
                self.counters.unhealthy_kills += 1
                await self._kill_group(process)
                return process.returncode

    async def _kill_group(self, process) -> None:
        """SIGKILL the worker's process group and wait until every member is gone, so the
        next worker can bind the gRPC port (no stray Triton keeps it)."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if process.returncode is None:
            await process.wait()
        deadline = time.monotonic() + 10.0
        while group_members(process.pid) and time.monotonic() < deadline:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            await asyncio.sleep(0.1)
        leftovers = group_members(process.pid)
        if leftovers:
            LOGGER.error("processes %s of worker group %d survived SIGKILL", leftovers, process.pid)

    async def _stop_worker(self) -> None:
        process = self.worker.process
        if process is None:
            return
        if process.returncode is None:
            LOGGER.info("stopping the worker (pid %d): SIGINT, up to %.0f s", process.pid, self.policy.stop_timeout_s)
            try:
                process.send_signal(signal.SIGINT)
                await asyncio.wait_for(process.wait(), timeout=self.policy.stop_timeout_s)
            except (ProcessLookupError, asyncio.TimeoutError):
                LOGGER.warning("worker (pid %d) still running after %.0f s: killing its process group", process.pid,
                               self.policy.stop_timeout_s)
        await self._kill_group(process)

    def _request_stop(self, signum: int) -> None:
        if self._stop_signal is None:
            LOGGER.info("signal %d: stopping", signum)
        self._stop_signal = signum
        self._stop.set()

    # ---- main loop --------------------------------------------------------------------
    async def run(self) -> int:
        import aiohttp

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._request_stop, signum)
        # No keep-alive for health checks: Triton's shutdown waits for open connections.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0),
                                              connector=aiohttp.TCPConnector(force_close=True))
        status = 0
        try:
            await self._start_sites()
            while not self._stop.is_set():
                await self._spawn()
                returncode = await self._watch()
                self.worker.ready = False
                if returncode is None:
                    break  # stop requested
                await self._kill_group(self.worker.process)
                await self.guard.reset()  # its pooled connections went to the dead Triton
                status = exit_status(self.worker.process.returncode)
                self.counters.last_exit_status = status
                uptime = time.monotonic() - self.worker.started_at
                LOGGER.error("worker (pid %d) exited with status %d after %.1f s%s", self.worker.process.pid, status,
                             uptime, "" if self.worker.ready_once else ", before the front saw it ready")
                if status == EXIT_CONFIG_ERROR and not self.worker.ready_once:
                    LOGGER.error("the worker could not start (configuration error above): not restarting")
                    return status
                delay = self._next_restart_delay()
                if delay is None:
                    return status or 1
                LOGGER.warning("restarting the worker in %.1f s (restart %d; %d in the last %.0f s, limit %d)", delay,
                               self.counters.restarts + 1, len(self.counters.restart_times), self.policy.window_s,
                               self.policy.max_restarts)
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                    break  # stopped while waiting
                except asyncio.TimeoutError:
                    pass
                self.counters.restarts += 1
            return 0
        finally:
            # Close the public ports and our connections to Triton first: Triton's shutdown
            # waits (up to 30 s) for open client connections, ours included.
            for runner in self._runners:
                await runner.cleanup()
            await self._session.close()
            await self._stop_worker()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            LOGGER.info("front stopped (status %d)", status if not self._stop.is_set() else 0)

    def _next_restart_delay(self) -> Optional[float]:
        """The backoff before the next restart, or None to give up."""
        policy = self.policy
        if policy.max_restarts == 0:
            LOGGER.error("not restarting (--no-supervise / --max-restarts 0): an external supervisor restarts the "
                         "server")
            return None
        now = time.monotonic()
        recent = self.counters.restart_times
        while recent and now - recent[0] > policy.window_s:
            recent.popleft()
        if len(recent) >= policy.max_restarts:
            LOGGER.error("giving up: %d restarts in the last %.0f s (--max-restarts %d --restart-window-s %.0f); "
                         "the log above says why the worker keeps dying", len(recent), policy.window_s,
                         policy.max_restarts, policy.window_s)
            return None
        recent.append(now)
        return policy.backoff(len(recent))


def run_supervisor(worker_command: Sequence[str], front: FrontConfig, policy: RestartPolicy) -> int:
    return asyncio.run(Supervisor(worker_command, front, policy).run())

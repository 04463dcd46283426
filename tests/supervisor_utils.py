"""Reading a reward server's log (token2wav_server.supervisor's lines) in the fault tests.

On a loaded machine a worker can fail to start (PyTriton's model handshake, for one, times out
after 1 s inside Triton's Python stub), and the front restarts it: a test that kills a worker
accounts for such failed starts of the replacement instead of assuming there are none."""
from __future__ import annotations

import re
from typing import NamedTuple

_EXIT = re.compile(r"worker \(pid (\d+)\) exited with status (\d+) after [\d.]+ s(, before the front saw it ready)?")


class WorkerExit(NamedTuple):
    pid: int
    status: int
    before_ready: bool  # it never became ready: a start that failed


def worker_exits(log: str) -> list[WorkerExit]:
    """Every worker exit the front logged in ``log``, in order."""
    return [WorkerExit(int(m.group(1)), int(m.group(2)), m.group(3) is not None) for m in _EXIT.finditer(log)]


def assert_one_exit_then_failed_starts(log: str, pid: int, status: int) -> list[WorkerExit]:
    """``log`` (the server's log since a fault was injected) has the exit of worker ``pid`` with
    ``status`` first, and after it at most exits of replacements that never became ready; each
    of those exits was restarted too. Returns the exits.

    Whether the first exit says "before the front saw it ready" is not checked: the front polls
    once a second, and a loaded machine can delay that poll past the moment the worker already
    served the test's requests."""
    exits = worker_exits(log)
    assert exits and (exits[0].pid, exits[0].status) == (pid, status), (exits, log[-3000:])
    assert all(e.before_ready for e in exits[1:]), (exits, log[-3000:])
    return exits

"""The async client's servers and which one each request goes to (the one home of routing).

Every server is an ``Endpoint``: one lazily opened connection, the server's *slots* (the
model instances of its reward model: devices x instances per device, which the server reports
as its model config's ``instance_group[].count``; ``model_slots`` reads it), the items this
process has in flight there, whether it runs on this node, and, after a failure, until when it
is benched.

Routing ``least_work`` (the default) sends a request to the server with the least outstanding
work per slot (items this process has in flight there / its slots); among servers equally
loaded (all idle, say) it draws one at random with probability proportional to its slots. So a
server with 4 slots takes about four times the traffic of one with 1 slot, whether this process
keeps many requests in flight (then the load decides) or few (then the draw does: several
worker processes, each with one request out, still spread by capacity), and a server that is
slow right now takes less. When any listed server runs on this node (``is_local_host``),
requests go to those alone while one of them is healthy (the reference layout: one server per
training node, each node scoring its own rollouts); otherwise, as with dedicated reward nodes,
to all.
``round_robin`` is the older rule (equal turns, whatever the size or load), kept for comparison
(``benchmarks/bench_reward_routing.py``).

A server that fails is benched for its backoff delay (``Endpoint.failed_until``) and tried
again after it; when every server is benched, the one back soonest is picked, so a pick always
returns a server and the caller's retry budget decides when to give up.
"""
from __future__ import annotations

import contextlib
import functools
import ipaddress
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

ROUTINGS = ("least_work", "round_robin")
"""``RewardSettings.routing`` values (``REWARD_ROUTING``)."""
SLOTS_FIELD = "instance_group[].count"
"""Where a server reports its slots: its reward model's Triton model config."""


class RoutingError(ValueError):
    """A server's routing facts are unusable (it reports no slots); the message names the field."""


@functools.lru_cache(maxsize=256)
def is_local_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, as in a server URL) is this machine: a loopback
    address, or an address one of this machine's interfaces holds (binding a socket to it works
    only then). A name that does not resolve is not local."""
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    for family, _, _, _, address in infos:
        ip = address[0]
        try:
            if ipaddress.ip_address(ip.split("%")[0]).is_loopback:
                return True
        except ValueError:
            continue
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((ip, 0) if family == socket.AF_INET else (ip, 0, 0, address[3]))
            return True
        except OSError:
            continue
    return False


def model_slots(config, url: str, model: str) -> int:
    """The slots a server reports for ``model``: the sum of its model config's
    ``instance_group[].count`` (tritonclient's gRPC ``ModelConfigResponse`` or HTTP dict).
    None, an empty group or a count under 1 is a RoutingError naming the field and the URL."""
    if isinstance(config, dict):
        groups = config.get("instance_group") or []
        counts = [group.get("count") for group in groups if isinstance(group, dict)]
    else:
        groups = getattr(getattr(config, "config", config), "instance_group", None) or []
        counts = [getattr(group, "count", None) for group in groups]
    try:
        slots = sum(int(count) for count in counts)
    except (TypeError, ValueError):
        slots = 0
    if not counts or slots < 1 or any(count is None or int(count) < 0 for count in counts):
        raise RoutingError(
            f"reward server {url} reports no slots for model {model!r}: its model config's {SLOTS_FIELD} is "
            f"{counts or 'missing'}; routing weighs each server by its slots, so it needs at least 1 "
            f"(is this a token2wav_server of this checkout? python -m token2wav_server reports "
            f"--devices x --instances-per-device there)")
    return slots


@dataclass
class Endpoint:
    scheme: str
    address: str
    client: object = None
    failed_until: float = 0.0
    retired: list = field(default_factory=list)
    slots: Optional[int] = None  # what the server reports (model_slots); None until read
    outstanding: int = 0  # items this process has in flight at this server
    local: bool = False  # the server runs on this node

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def load(self) -> float:
        """Outstanding work per slot."""
        return self.outstanding / (self.slots or 1)

    @contextlib.contextmanager
    def in_flight(self, items: int):
        """Count ``items`` as outstanding here for the duration of a request, whatever its end."""
        self.outstanding += items
        try:
            yield self
        finally:
            self.outstanding -= items

    def connect(self):
        if self.client is None:
            if self.scheme == "grpc":
                import tritonclient.grpc.aio as grpc_aio

                self.client = grpc_aio.InferenceServerClient(url=self.address)
            else:
                import tritonclient.http.aio as http_aio

                self.client = http_aio.InferenceServerClient(url=self.address, conn_limit=1024)
        return self.client

    def reset(self, failed_client) -> None:
        """Replace the connection that just failed: a fresh channel reconnects at once after a
        server restart (a broken gRPC channel would sit in its own reconnect backoff). The old
        one is closed later, not now, since closing cancels other rollouts' calls on it."""
        if failed_client is not None and failed_client is self.client:
            self.retired.append(self.client)
            self.client = None

    async def close(self) -> None:
        clients = self.retired + ([self.client] if self.client is not None else [])
        self.retired, self.client = [], None
        for client in clients:
            try:
                await client.close()
            except Exception:  # closing a broken connection may fail; it is discarded anyway
                pass


class EndpointPool:
    """The servers of one client and the routing rule (see the module doc)."""

    def __init__(self, urls, routing: str = "least_work", local: Callable[[str], bool] = is_local_host,
                 rng: Optional[random.Random] = None):
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r}: expected one of {', '.join(ROUTINGS)}")
        self.routing = routing
        self.endpoints = [Endpoint(scheme, address) for scheme, address in urls]
        for endpoint in self.endpoints:
            endpoint.local = local(endpoint.host)
        self._rng = rng or random.Random()
        self._next = self._rng.randrange(len(self.endpoints))

    def __iter__(self):
        return iter(self.endpoints)

    def pick(self) -> Endpoint:
        """The server for the next request (never None: see the module doc)."""
        now = time.monotonic()
        healthy = [e for e in self.endpoints if e.failed_until <= now]
        if not healthy:
            return min(self.endpoints, key=lambda e: e.failed_until)
        if self.routing == "round_robin":
            count = len(self.endpoints)
            for _ in range(count):
                endpoint = self.endpoints[self._next % count]
                self._next += 1
                if endpoint.failed_until <= now:
                    return endpoint
        candidates = [e for e in healthy if e.local] or healthy
        best = min(e.load for e in candidates)
        least = [e for e in candidates if e.load <= best + 1e-9]
        return self._rng.choices(least, weights=[e.slots or 1 for e in least])[0]

    def describe(self) -> str:
        """One line per server for the log: URL, slots, local or not."""
        return "; ".join(f"{e.url} ({e.slots if e.slots is not None else '?'} slot(s)"
                         f"{', this node' if e.local else ''})" for e in self.endpoints)

    async def close(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.close()

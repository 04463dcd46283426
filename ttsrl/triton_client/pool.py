"""The async client's servers: one lazily opened connection per URL, round robin over
the healthy ones, a failed one benched for its backoff delay."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass
class Endpoint:
    scheme: str
    address: str
    client: object = None
    failed_until: float = 0.0
    retired: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

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
    """Round robin from a random start (workers of one job spread over the servers), skipping
    endpoints benched after a failure; when all are benched, the one back soonest."""

    def __init__(self, urls):
        self.endpoints = [Endpoint(scheme, address) for scheme, address in urls]
        self._next = random.randrange(len(self.endpoints))

    def __iter__(self):
        return iter(self.endpoints)

    def pick(self) -> Endpoint:
        now = time.monotonic()
        count = len(self.endpoints)
        for _ in range(count):
            endpoint = self.endpoints[self._next % count]
            self._next += 1
            if endpoint.failed_until <= now:
                return endpoint
        return min(self.endpoints, key=lambda e: e.failed_until)

    async def close(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.close()

"""ttsrl.triton_client.pool: which server a request goes to (load-aware routing, this node first,
failed servers benched) and the slots a server reports. No server needed: the pool's own logic
on endpoints whose load the test sets."""
import random
import socket
import time
from types import SimpleNamespace

import pytest

from ttsrl.triton_client.pool import EndpointPool, RoutingError, is_local_host, model_slots

URLS = (("grpc", "a:1"), ("grpc", "b:1"), ("grpc", "c:1"))


def pool(slots=(1, 2, 4), routing="least_work", local=lambda host: False, seed=0) -> EndpointPool:
    made = EndpointPool(URLS[:len(slots)], routing, local=local, rng=random.Random(seed))
    for endpoint, count in zip(made, slots):
        endpoint.slots = count
    return made


def test_requests_in_flight_spread_in_proportion_to_slots():
    """35 requests kept in flight over servers of 1, 2 and 4 slots: 5, 10 and 20, equal work per slot."""
    servers = pool()
    for _ in range(35):
        servers.pick().outstanding += 1
    assert [e.outstanding for e in servers] == [5, 10, 20]


def test_a_slow_server_gets_less_and_an_idle_pool_draws_by_slots():
    servers = pool()
    a, b, c = servers.endpoints
    c.outstanding = 8  # the 4-slot server is busy right now (load 2 per slot)
    a.outstanding = 1  # load 1
    assert servers.pick() is b  # idle
    # Nothing in flight (a worker with one request out at a time): picks drawn by slots.
    c.outstanding = a.outstanding = 0
    counts = {e.address: 0 for e in servers}
    for _ in range(7000):
        counts[servers.pick().address] += 1
    assert counts["a:1"] == pytest.approx(1000, rel=0.1)
    assert counts["b:1"] == pytest.approx(2000, rel=0.1)
    assert counts["c:1"] == pytest.approx(4000, rel=0.1)


def test_round_robin_gives_equal_turns_whatever_the_size():
    servers = pool(routing="round_robin")
    picks = [servers.pick().address for _ in range(30)]
    assert {address: picks.count(address) for address in set(picks)} == {"a:1": 10, "b:1": 10, "c:1": 10}
    with pytest.raises(ValueError, match="routing 'fastest': expected one of least_work, round_robin"):
        EndpointPool(URLS, "fastest")


def test_servers_on_this_node_are_preferred_while_one_is_healthy():
    servers = pool(local=lambda host: host == "a")
    assert servers.endpoints[0].local and not servers.endpoints[2].local
    for _ in range(20):
        servers.pick().outstanding += 1
    assert [e.outstanding for e in servers] == [20, 0, 0]  # however loaded, the local one
    servers.endpoints[0].failed_until = time.monotonic() + 60
    assert {servers.pick().address for _ in range(50)} == {"b:1", "c:1"}


def test_failed_servers_are_benched_and_the_soonest_back_is_tried_when_all_are():
    servers = pool()
    a, b, c = servers.endpoints
    now = time.monotonic()
    c.failed_until, b.failed_until = now + 60, now + 30
    assert {servers.pick().address for _ in range(20)} == {"a:1"}
    a.failed_until = now + 90
    assert servers.pick() is b  # every one benched: the one back soonest, never nothing


def test_outstanding_work_is_released_whatever_the_request_ends_with():
    (endpoint,) = pool(slots=(2,)).endpoints
    with endpoint.in_flight(5):
        assert endpoint.outstanding == 5 and endpoint.load == 2.5
    with pytest.raises(TimeoutError):
        with endpoint.in_flight(3):
            raise TimeoutError("the server hung")
    assert endpoint.outstanding == 0


def test_slots_come_from_the_model_config_and_none_is_an_error_naming_the_field():
    grpc_like = SimpleNamespace(config=SimpleNamespace(instance_group=[SimpleNamespace(count=3),
                                                                       SimpleNamespace(count=1)]))
    assert model_slots(grpc_like, "grpc://h:1", "token2wav_asr") == 4
    assert model_slots({"instance_group": [{"count": 2, "kind": "KIND_CPU"}]}, "http://h:2", "token2wav_asr") == 2
    for config in ({}, {"instance_group": []}, {"instance_group": [{"count": 0}]},
                   SimpleNamespace(config=SimpleNamespace(instance_group=[]))):
        with pytest.raises(RoutingError, match=r"reward server http://h:2 reports no slots for model "
                                               r"'token2wav_asr': its model config's instance_group\[\]\.count"):
            model_slots(config, "http://h:2", "token2wav_asr")


def test_which_hosts_are_this_node():
    assert is_local_host("127.0.0.1") and is_local_host("localhost")
    assert is_local_host(socket.gethostname())
    assert not is_local_host("203.0.113.7")  # TEST-NET-3: documentation only, never assigned
    assert not is_local_host("no-such-host.invalid")

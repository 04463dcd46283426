"""Training rides through a reward-server crash: the reward hook (reward_tts.compute_score,
as veRL calls it) scores many concurrent rollouts over gRPC and HTTP while Triton is killed
with SIGKILL; the server's front restarts it on the same ports, and every rollout gets its
true score (from the stand-in engines' known answers), none made up."""
import asyncio
import random
import signal
import threading
import time

import pytest
import requests

import reward_tts
from tests.supervisor_utils import assert_one_exit_then_failed_starts
from token2wav_server.launch import start_server
from token2wav_server.standin import text_to_tokens
from token2wav_server.triton_worker import EXIT_TRITON_DIED
from ttsrl.speech_tokens import format_speech_tokens

TEXTS = ["一丁七万", "三上下丈", "七万三上丁", "丈三一丁七上", "下丈七"]
CLIENTS = 32
ROLLOUTS_PER_CLIENT = 12


def _metric(server, name: str) -> float:
    for line in requests.get(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise AssertionError(f"no {name} in the metrics")


def _jobs(seed: int) -> list:
    """(ground truth, what the rollout says, expected error rate): half exact, half one char wrong."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(ROLLOUTS_PER_CLIENT):
        text = rng.choice(TEXTS)
        said = text if rng.random() < 0.5 else text[:-1] + ("万" if text[-1] != "万" else "丁")
        jobs.append((text, said, 0.0 if said == text else 1 / len(text)))
    return jobs


def test_rollouts_ride_through_a_triton_kill_with_true_scores():
    server = start_server(extra_args=["--restart-backoff-s", "0.5", "--engine-option", "delay_ms=20"])
    killed = threading.Event()
    try:
        urls = {"grpc": server.grpc_url, "http": server.http_url}
        first_triton = server.triton_pid()
        # A first start that failed on a loaded machine was retried: count from here.
        restarts_before = _metric(server, "token2wav_server_worker_restarts_total")
        results, started, fault = [], threading.Event(), {}

        async def client(index: int):
            protocol = "grpc" if index % 2 == 0 else "http"
            kwargs = {"server_url": urls[protocol], "retry_budget_s": 240, "backoff_initial_s": 0.2,
                      "backoff_max_s": 2.0}
            out = []
            for text, said, expected in _jobs(index):
                result = await reward_tts.compute_score("tts", format_speech_tokens(text_to_tokens(said)), text,
                                                        **kwargs)
                out.append((protocol, expected, result, killed.is_set()))
                started.set()
                await asyncio.sleep(0.3)  # rollouts keep arriving through the outage
            return out

        def kill_triton_once_traffic_flows():
            started.wait(timeout=120)
            time.sleep(1.0)
            fault.update(worker=server.worker_pid(), since=len(server.log()))
            server.kill_triton(signal.SIGKILL)  # as a segfault would end it
            killed.set()

        async def short_budget_rollout_during_the_outage():
            """A client whose retry budget is shorter than the restart raises, and says why."""
            kwargs = {"server_url": urls["grpc"], "retry_budget_s": 2, "backoff_initial_s": 0.1}
            tokens = format_speech_tokens(text_to_tokens("一丁"))
            assert (await reward_tts.compute_score("tts", tokens, "一丁", **kwargs))["score"] == pytest.approx(1.0)
            while not killed.is_set():
                await asyncio.sleep(0.05)
            with pytest.raises(reward_tts.RewardServerUnavailable, match="retry budget 2 s"):
                await reward_tts.compute_score("tts", format_speech_tokens(text_to_tokens("一丁")), "一丁", **kwargs)
            return _metric(server, "token2wav_server_worker_up")

        async def go():
            try:
                return await asyncio.gather(short_budget_rollout_during_the_outage(),
                                            *(client(i) for i in range(CLIENTS)))
            finally:
                await reward_tts.close_clients()

        killer = threading.Thread(target=kill_triton_once_traffic_flows)
        killer.start()
        up_when_short_budget_failed, *per_client = asyncio.run(go())
        killer.join()

        assert up_when_short_budget_failed == 0  # it gave up while the server was still down
        results = [r for rollouts in per_client for r in rollouts]
        assert len(results) == CLIENTS * ROLLOUTS_PER_CLIENT
        wrong = [(p, e, r) for p, e, r, _ in results if r["error_rate"] != pytest.approx(e, abs=1e-6)]
        assert not wrong, wrong[:5]
        for protocol in ("grpc", "http"):  # both protocols scored rollouts after the kill
            assert sum(1 for p, _, _, after in results if p == protocol and after) >= CLIENTS // 2
        assert server.triton_pid() != first_triton
        # the worker whose Triton died, restarted; then any replacement that failed to start on a loaded machine
        exits = assert_one_exit_then_failed_starts(server.log()[fault["since"]:], fault["worker"], EXIT_TRITON_DIED)
        assert _metric(server, "token2wav_server_worker_restarts_total") == restarts_before + len(exits)
        assert "restarting the worker in" in server.log()
    finally:
        killed.set()
        server.stop()

"""ttsrl.triton_client.RewardClient (the reward hook's pooled async client) against the live
reward server (stand-in engines): start-up check, coalescing, load, a server that dies."""
import asyncio
import threading

import numpy as np
import pytest

from tests.reward_utils import request_count, run
from token2wav_server.launch import free_ports, start_server
from token2wav_server.standin import text_to_tokens
from ttsrl.triton_client import RewardRequestError, RewardServerUnavailable, RewardSettings, get_client, parse_urls

TEXTS = ["一丁七万", "三上下", "丈三上", "万丈", "七七七", "下上"]


def settings(url: str, **extra) -> RewardSettings:
    return RewardSettings(urls=parse_urls(url), **extra)


async def score(config: RewardSettings, said: str, text: str) -> dict:
    """The server's outputs for a rollout that says ``said`` (stand-in tokens) where ``text`` was asked."""
    return await get_client(config).score(np.asarray(text_to_tokens(said), dtype=np.int64), text)


def test_startup_health_check_names_the_url_not_answering(reward_server):
    dead = f"grpc://127.0.0.1:{free_ports(1)[0]}"
    config = settings(f"{reward_server.grpc_url},{dead}", startup_wait_s=1)

    async def check():
        await get_client(config).ensure_ready()

    with pytest.raises(RewardServerUnavailable) as error:
        run(check())
    assert dead in str(error.value) and reward_server.grpc_url not in str(error.value)


def test_concurrent_rollouts_share_requests_and_a_bad_one_fails_alone(reward_server):
    config = settings(reward_server.grpc_url, max_batch=16)

    async def go():
        client = get_client(config)
        await client.score(np.asarray([1]), "一")  # start-up done
        before = request_count(reward_server)
        calls = [score(config, t, t) for t in TEXTS * 10]
        calls.insert(7, client.score(np.asarray([1, 2]), "。。"))
        results = await asyncio.gather(*calls, return_exceptions=True)
        return before, results

    before, results = run(go())
    assert isinstance(results[7], RewardRequestError)
    good = results[:7] + results[8:]
    assert len(good) == 60 and all(r["REWARDS"] == pytest.approx(1.0) for r in good)
    requests_made = request_count(reward_server) - before
    assert 61 / 16 <= requests_made < 61  # coalesced into batches of at most 16


@pytest.mark.slow
def test_load_32_concurrent_clients_x_100_requests(reward_server):
    config = settings(reward_server.grpc_url)
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(32 * 100):
        text = TEXTS[rng.integers(len(TEXTS))]
        said = text if rng.random() < 0.5 else text[:-1] + "丁"
        jobs.append((text, said))

    async def client(my_jobs):
        return [await score(config, said, text) for text, said in my_jobs]

    async def go():
        return await asyncio.gather(*(client(jobs[i::32]) for i in range(32)))

    per_client = run(go())
    failures = 0
    for i, results in enumerate(per_client):
        for (text, said), result in zip(jobs[i::32], results):
            expected = 0.0 if text == said else sum(a != b for a, b in zip(text, said)) / len(text)
            failures += result["ERROR_RATE"] != pytest.approx(expected, abs=1e-6)
    assert sum(len(r) for r in per_client) == 3200 and failures == 0
    assert reward_server.alive()
    assert run(score(config, "三上", "三上"))["REWARDS"] == pytest.approx(1.0)


@pytest.mark.slow
def test_server_killed_mid_run_recovers_and_down_server_raises():
    server = start_server()
    thread = None
    try:
        short_budget = settings(server.grpc_url, retry_budget_s=2, backoff_initial_s=0.1)
        long_budget = settings(server.grpc_url, retry_budget_s=90, backoff_initial_s=0.1)
        results, killed_at = [], []
        give_up = threading.Event()

        def kill_and_restart():
            while len(results) < 40:
                if give_up.wait(0.01):
                    return
            server.kill()
            killed_at.append(len(results))
            if not give_up.wait(1.0):
                server.start()

        async def worker(count):
            for _ in range(count):
                results.append(await score(long_budget, "一丁七万", "一丁七万"))

        async def go():
            nonlocal thread
            # A client that is up and healthy, then loses the server past its budget: it raises.
            assert (await score(short_budget, "一丁七万", "一丁七万"))["REWARDS"] == 1.0
            server.kill()
            with pytest.raises(RewardServerUnavailable, match="retry budget"):
                await score(short_budget, "一丁七万", "一丁七万")
            server.start()
            # Killed mid-run and restarted: every rollout still gets its true score.
            thread = threading.Thread(target=kill_and_restart)
            thread.start()
            await asyncio.gather(*(worker(25) for _ in range(8)))

        run(go())
        assert killed_at and killed_at[0] < 200
        assert len(results) == 200 and all(r["REWARDS"] == 1.0 for r in results)
    finally:
        if thread is not None:
            give_up.set()
            thread.join()
        server.stop()


def test_rollouts_with_and_without_prompts_share_one_request(reward_server):
    """Per-item prompts travel row by row (PROMPT_WAV padded, length 0 = the bank's voice): one
    request carries all of them, and a prompt the server refuses fails only its rollout."""
    from token2wav_server import standin
    from ttsrl.triton_client import SpeakerPromptAudio

    config = settings(reward_server.grpc_url, max_batch=16, batch_window_ms=50)
    long_prompt = SpeakerPromptAudio(standin.tokens_to_wave(list(range(40)), voice=3), 16000, "长提示")
    short_prompt = SpeakerPromptAudio(standin.tokens_to_wave([5], voice=6), 16000, "短")
    low_rate = SpeakerPromptAudio(np.full(800, 0.1, dtype=np.float32), 8000, "低")

    async def go():
        client = get_client(config)
        await client.score(np.asarray([1]), "一")  # start-up done
        before = request_count(reward_server)
        prompts = [long_prompt, None, short_prompt, low_rate, None]
        calls = [client.score(np.asarray(text_to_tokens(text)), text, prompt) for text, prompt in zip(TEXTS, prompts)]
        return before, await asyncio.gather(*calls, return_exceptions=True)

    before, results = run(go())
    assert request_count(reward_server) - before == 1
    assert isinstance(results[3], RewardRequestError) and "sample rate 8000 Hz" in str(results[3])
    for result in results[:3] + results[4:]:
        assert result["REWARDS"] == pytest.approx(1.0) and result["UTILITY_ERROR_RATE"] == pytest.approx(1.0)
        assert np.isnan(result["UTILITY_SIMILARITY"]) and np.isnan(result["SPEAKER_SIMILARITY"])  # not weighted


def test_the_client_reads_each_servers_slots_and_routes_by_them(reward_server):
    """Start-up reads the slots a server reports (its reward model's instance count); the request
    goes to the server with the least work per slot; a server that reports no slots fails every
    waiting rollout with an error naming the field, and none is left waiting."""
    from ttsrl.triton_client import RewardClient

    class NoSlots:
        """The real server's answers, but a model config without instance_group."""

        def __init__(self, real):
            self.real = real

        async def get_model_config(self, model):
            config = await self.real.get_model_config(model)  # HTTP: the config as a dict
            return {key: value for key, value in config.items() if key != "instance_group"}

        def __getattr__(self, name):
            return getattr(self.real, name)

    async def go():
        good = RewardClient(settings(reward_server.grpc_url))
        await good.ensure_ready()
        (endpoint,) = good.pool.endpoints
        slots = endpoint.slots
        result = await good.score(np.asarray(text_to_tokens("三上下")), "三上下")
        assert endpoint.outstanding == 0
        await good.close()
        broken = RewardClient(settings(reward_server.http_url))
        (endpoint,) = broken.pool.endpoints
        endpoint.client = NoSlots(endpoint.connect())
        outcomes = await asyncio.gather(*(broken.score(np.asarray(text_to_tokens(t)), t) for t in TEXTS),
                                        return_exceptions=True)
        await broken.close()
        return slots, result, outcomes

    slots, result, outcomes = run(go())
    assert slots == 1 and result["REWARDS"] == pytest.approx(1.0)  # the session server: --devices cpu, 1 instance
    assert len(outcomes) == len(TEXTS)
    for outcome in outcomes:
        assert isinstance(outcome, RewardServerUnavailable)
        assert (f"reward server {reward_server.http_url} reports no slots for model 'token2wav_asr': its model "
                "config's instance_group[].count is missing") in str(outcome)


def test_routing_setting_of_the_hook(monkeypatch):
    import reward_tts

    assert reward_tts.settings_from({}).routing == "least_work"
    monkeypatch.setenv("REWARD_ROUTING", "round_robin")
    assert reward_tts.settings_from({}).routing == "round_robin"
    assert reward_tts.settings_from({"routing": "least_work"}).routing == "least_work"


def test_readiness_cli_checks_the_models_a_stage_needs(reward_server, capsys):
    """What run.sh's stage 4 asks before it evaluates on a server: every --model is served."""
    from ttsrl.triton_client.__main__ import main

    assert main([reward_server.grpc_url]) == 0
    assert main(["--model", "asr_eval", "--model", "speaker", reward_server.http_url]) == 0
    assert main(["--model", "asr_eval_en", reward_server.grpc_url]) == 1
    assert (f"reward server at {reward_server.grpc_url} is up but model 'asr_eval_en' is not ready"
            in capsys.readouterr().err)

"""Helpers of the tests that score against a live reward server (the hook and its client)."""
import asyncio
import re
import socket
import urllib.request

from ttsrl.triton_client import close_clients


def run(coroutine):
    """``asyncio.run`` that closes the reward clients the coroutine opened (on its own loop)."""
    async def wrapper():
        try:
            return await coroutine
        finally:
            await close_clients()

    return asyncio.run(wrapper())


def request_count(server, model: str = "token2wav_asr") -> float:
    """Successful Triton requests ``model`` has served so far (each batch counts once)."""
    url = f"http://{server.host}:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    match = re.search(r'nv_inference_request_success\{model="' + re.escape(model) + r'",version="1"\} (\d+)', body)
    return float(match.group(1))


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (a stopped server left none of its ports behind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

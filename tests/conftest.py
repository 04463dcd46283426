"""Shared fixtures of the trainer-environment tests.

``reward_server``: one real reward server (Triton, stand-in engines) for the whole
session, started from the server environment on free ports (token2wav_server.launch).
"""
import pytest

from token2wav_server.launch import start_server

REWARD_SERVER_MAX_TOKENS = 1000


@pytest.fixture(scope="session")
def reward_server():
    server = start_server(extra_args=["--max-tokens", str(REWARD_SERVER_MAX_TOKENS), "--max-batch-size", "64",
                                      "--max-queue-delay-us", "2000"])
    try:
        yield server
    finally:
        server.stop()

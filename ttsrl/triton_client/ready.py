"""The one readiness check of a reward server: what launch waits for, what the reward
hook checks at start-up, what the CLI, preflight and evaluation scripts ask."""
from __future__ import annotations

from .wire import REWARD_MODEL, client_module, parse_url

READY_MODEL = REWARD_MODEL
"""The server loads this model last: once it is ready, every model is."""

NOT_ANSWERING = "does not answer"
NOT_READY = "answers but is not ready (models still loading?)"


def readiness_problem(url: str, timeout_s: float = 5.0, model: str | None = READY_MODEL) -> str | None:
    """None when the server at ``url`` (grpc:// or http://) is ready and serves ``model`` (None:
    the server's own readiness only); else
    why not, in words callers put after the URL: ``does not answer (<transport error>)``,
    ``answers but is not ready (...)`` or ``is up but model 'X' is not ready``.

    Both are asked: Triton answers "server ready" before PyTriton has loaded the models.
    Blocking; async callers run it with ``asyncio.to_thread``.
    """
    protocol, address = parse_url(url)
    try:
        module = client_module(protocol)
        if protocol == "grpc":
            client = module.InferenceServerClient(address)
            timeout = {"client_timeout": timeout_s}
        else:
            client = module.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)
            timeout = {}
        try:
            if not client.is_server_ready(**timeout):
                return NOT_READY
            if model is not None and not client.is_model_ready(model, **timeout):
                return f"is up but model {model!r} is not ready"
            return None
        finally:
            client.close()
    except ImportError:  # no tritonclient: a broken environment, not a server that is down
        raise
    except Exception as error:  # connection refused, timeout, DNS: all mean "not reachable"
        text = str(error).strip()
        return f"{NOT_ANSWERING} ({text.splitlines()[0] if text else type(error).__name__})"


def server_ready(url: str, timeout_s: float = 5.0, model: str = READY_MODEL) -> bool:
    """Whether the server at ``url`` is ready and serves ``model`` (``readiness_problem`` is None)."""
    return readiness_problem(url, timeout_s, model) is None

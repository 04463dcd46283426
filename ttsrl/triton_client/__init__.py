"""Clients of the reward server (both environments; tritonclient is imported lazily).

- ``wire``: server URLs, padded batch tensors, Triton inputs, per-item errors, speaker-prompt keys;
- ``ready``: ``server_ready``, the one readiness check (launch, the reward hook, preflight, evaluation);
- ``model_client``: ``TritonModelClient``, synchronous batch calls to the audio models (evaluation);
- ``pool`` and ``reward_client``: ``RewardClient``, the pooled asynchronous client of the reward
  model that the GRPO hook (reward_tts.py) scores rollouts with;
- ``python -m ttsrl.triton_client URL[,URL...]``: exit 0 when every server is ready.
"""
from .model_client import REQUEST_ITEMS, TritonModelClient
from .ready import READY_MODEL, server_ready
from .reward_client import (COMPONENT_OUTPUTS, UTILITY_KEYS, RewardClient, RewardRequestError,
                            RewardServerUnavailable, RewardSettings, close_clients, get_client)
from .wire import (BANK_PROMPT_PREFIX, REWARD_MODEL, ServerItemError, SpeakerPromptAudio, Synthesis,
                   cosine_similarity, pad_rows, parse_url, parse_urls, speaker_prompt_key)

__all__ = [
    "BANK_PROMPT_PREFIX", "COMPONENT_OUTPUTS", "READY_MODEL", "REQUEST_ITEMS", "REWARD_MODEL", "RewardClient",
    "RewardRequestError", "RewardServerUnavailable", "RewardSettings", "ServerItemError", "SpeakerPromptAudio",
    "Synthesis", "TritonModelClient", "UTILITY_KEYS", "close_clients", "cosine_similarity", "get_client", "pad_rows", "parse_url",
    "parse_urls", "server_ready", "speaker_prompt_key",
]

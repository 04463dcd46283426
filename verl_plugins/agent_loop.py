"""The recipe's veRL agent loop (``tts_frontend``) and dataset class: the policy reads exactly
upstream CosyVoice's LLM input.

veRL's ``single_turn_agent`` renders a row's chat messages with the tokenizer's chat template
and tokenizes the result once; upstream CosyVoice tokenizes the prompt text and the text apart
and joins the ids (a BPE merge across the join gives other ids). ``TTSFrontendAgentLoop``
builds the prompt ids of a stage-0 row with ``ttsrl.frontend.row_policy_input`` instead, and
asks vLLM for at least ``min_tokens`` and at most ``max_tokens`` speech tokens per request,
upstream's bounds (``data.min_token_text_ratio`` / ``data.max_token_text_ratio`` times the
text's tokens), never more than ``rollout.response_length``. The bounds used go with the
rollout (``extra_fields``: ``min_speech_tokens``, ``max_speech_tokens``) to the reward hook.
``TTSFrontendDataset`` is veRL's ``RLHFDataset`` whose over-long filter counts those same ids.

Both go through veRL's extension points, no file of veRL is edited: the agent loop is
registered by ``actor_rollout_ref.rollout.agent.agent_loop_config_path`` (configs/agent_loop.yaml)
and chosen by ``agent.default_agent_loop``; the dataset by ``data.custom_cls``
(scripts/train_grpo.sh passes all three).
"""
from __future__ import annotations

import functools
import logging
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.utils.profiler import simple_timer

from ttsrl.frontend import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO, PolicyFrontend, row_policy_input
from ttsrl.model_family import get_family

LOGGER = logging.getLogger(__name__)


def frontend_ratios(data_config) -> tuple[float, float]:
    """(min, max) token-text ratios of the run (``data.*_token_text_ratio``, default upstream's)."""
    get = data_config.get if hasattr(data_config, "get") else (lambda key, default=None: default)
    return (float(get("min_token_text_ratio", MIN_TOKEN_TEXT_RATIO)),
            float(get("max_token_text_ratio", MAX_TOKEN_TEXT_RATIO)))


@functools.lru_cache(maxsize=8)
def _policy_family(model_path: str) -> str:
    from ttsrl.model_family import family_of_hf_dir

    return family_of_hf_dir(model_path).name


class TTSFrontendAgentLoop(AgentLoopBase):
    """One rollout: upstream's LLM input, upstream's length bounds (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_length = self.rollout_config.prompt_length
        self.response_length = self.rollout_config.response_length
        family = get_family(_policy_family(str(self.config.actor_rollout_ref.model.path)))
        minimum, maximum = frontend_ratios(self.data_config)
        self.frontend = PolicyFrontend(self.tokenizer, family, min_ratio=minimum, max_ratio=maximum)

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs) -> AgentLoopOutput:
        policy_input = row_policy_input(self.frontend, kwargs.get("extra_info"), kwargs.get("raw_prompt"))
        prompt_ids = list(policy_input.ids)
        if len(prompt_ids) > self.prompt_length:
            info = kwargs.get("extra_info") or {}
            raise ValueError(f"row {info.get('split')}:{info.get('index')} ({info.get('text')!r}): its input is "
                             f"{len(prompt_ids)} tokens, over data.max_prompt_length {self.prompt_length}")
        params = dict(sampling_params)
        params["max_tokens"] = policy_input.max_new_tokens(self.response_length)
        params["min_tokens"] = policy_input.min_new_tokens(self.response_length)
        metrics = {}
        with simple_timer("generate_sequences", metrics):
            request_id = (f"det-{int(priority)}" if getattr(self.rollout_config, "full_determinism", False)
                          else uuid4().hex)
            output = await self.server_manager.generate(request_id=request_id, prompt_ids=prompt_ids,
                                                        sampling_params=params, priority=int(priority))
        response_ids = list(output.token_ids)[: self.response_length]
        logprobs = list(output.log_probs)[: len(response_ids)] if output.log_probs else None
        metrics["num_preempted"] = output.num_preempted if output.num_preempted is not None else -1
        extra_fields = dict(output.extra_fields or {})
        extra_fields.update(min_speech_tokens=params["min_tokens"], max_speech_tokens=params["max_tokens"],
                            turn_scores=[], tool_rewards=[])
        return AgentLoopOutput(prompt_ids=prompt_ids, response_ids=response_ids, response_mask=[1] * len(response_ids),
                               response_logprobs=logprobs, multi_modal_data={}, num_turns=2,
                               metrics=AgentLoopMetrics(**metrics), extra_fields=extra_fields)


class TTSFrontendDataset(RLHFDataset):
    """veRL's dataset, with the over-long filter counting the ids the policy reads."""

    def maybe_filter_out_long_prompts(self, dataframe=None):
        if not self.filter_overlong_prompts:
            return dataframe
        frontends: dict = {}
        tokenizer, limit, key = self.tokenizer, self.max_prompt_length, self.prompt_key
        minimum, maximum = frontend_ratios(self.config)

        def length(doc) -> int:
            family = (doc.get("extra_info") or {}).get("model_family") or "cosyvoice2"
            if family not in frontends:
                frontends[family] = PolicyFrontend(tokenizer, family, min_ratio=minimum, max_ratio=maximum)
            return len(row_policy_input(frontends[family], doc.get("extra_info"), doc[key]).ids)

        dataframe = dataframe.filter(lambda doc: length(doc) <= limit, num_proc=self.num_workers,
                                     desc=f"Filtering prompts longer than {limit} tokens")
        print(f"filter dataset len: {len(dataframe)}")
        return dataframe

"""verl_plugins.agent_loop: the tts_frontend agent loop and dataset feed the policy the ids
ttsrl.frontend builds, with upstream's per-request length bounds, through veRL's own
AgentLoopBase and RLHFDataset. The rollout server here records the request it gets (what vLLM
would be asked); a real vLLM serves it in tests/test_grpo_cpu.py and the smoke run."""
from __future__ import annotations

import asyncio

import pytest
from omegaconf import OmegaConf

from tests.policy_utils import tiny_policy  # noqa: F401 - fixture
from tests.ttsrl.training.test_data import read, write_jsonl
from ttsrl.frontend import PolicyFrontend, row_policy_input
from ttsrl.training.data import prepare


class RecordingServer:
    """Answers every request with the same speech tokens; keeps what it was asked."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append((list(prompt_ids), dict(sampling_params)))
        return TokenOutput(token_ids=list(self.answer))


def _agent_loop(model_dir, tokenizer, server, response_length=16, min_ratio=2.0, max_ratio=20.0):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from verl_plugins.agent_loop import TTSFrontendAgentLoop

    config = OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": str(model_dir)},
                              "rollout": {"prompt_length": 64, "response_length": response_length}},
        "data": {"min_token_text_ratio": min_ratio, "max_token_text_ratio": max_ratio},
    })
    return TTSFrontendAgentLoop(trainer_config=DictConfigWrap(config), server_manager=server, tokenizer=tokenizer,
                                processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
                                hf_model_type="qwen2")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent_loop")
    texts = ["今天是2024年3月5日。", "我们的第1站是北京。", "价格是12元", "好"]
    prepare(write_jsonl(folder / "a.jsonl", [{"text": t} for t in texts]), str(folder / "o"), test_size=1, seed=0)
    return folder / "o" / "train.parquet"


def test_the_rollout_reads_the_frontends_ids_within_upstreams_bounds(tiny_policy, rows):  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_policy))
    server = RecordingServer([tokenizer.convert_tokens_to_ids("<|s_5|>")] * 40)
    loop = _agent_loop(tiny_policy, tokenizer, server)
    frontend = PolicyFrontend(tokenizer, "cosyvoice2")
    for row in read(rows):
        output = asyncio.run(loop.run({"temperature": 1.0}, raw_prompt=row["prompt"], extra_info=row["extra_info"]))
        expected = row_policy_input(frontend, row["extra_info"], row["prompt"])
        prompt_ids, params = server.requests[-1]
        assert prompt_ids == list(expected.ids) == output.prompt_ids
        assert expected.text == row["extra_info"]["normalized_text"]
        assert params["max_tokens"] == min(20 * expected.text_tokens, 16)
        assert params["min_tokens"] == min(2 * expected.text_tokens, params["max_tokens"])
        assert len(output.response_ids) == 16  # cut at response_length, as veRL's own loop does
        assert output.extra_fields["max_speech_tokens"] == params["max_tokens"]


def test_a_row_of_another_family_or_an_old_stage_0_is_refused(tiny_policy, rows):  # noqa: F811
    from transformers import AutoTokenizer

    from ttsrl.frontend import FrontendError

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_policy))
    loop = _agent_loop(tiny_policy, tokenizer, RecordingServer([1]))
    row = read(rows)[0]
    wrong = dict(row["extra_info"], model_family="cosyvoice3")
    with pytest.raises(FrontendError, match="prepared for cosyvoice3 but the policy is cosyvoice2"):
        asyncio.run(loop.run({}, raw_prompt=row["prompt"], extra_info=wrong))
    old = {k: v for k, v in row["extra_info"].items() if k != "normalized_text"}
    with pytest.raises(FrontendError, match="rerun stage 0"):
        asyncio.run(loop.run({}, raw_prompt=row["prompt"], extra_info=old))


def test_the_dataset_filters_by_the_ids_the_policy_reads(tiny_policy, rows, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    from verl_plugins.agent_loop import TTSFrontendDataset

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_policy))
    frontend = PolicyFrontend(tokenizer, "cosyvoice2")
    lengths = sorted(len(row_policy_input(frontend, r["extra_info"], r["prompt"]).ids) for r in read(rows))
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": lengths[1],
                               "filter_overlong_prompts": True, "filter_overlong_prompts_workers": 1,
                               "cache_dir": str(tmp_path / "cache")})
    dataset = TTSFrontendDataset(str(rows), tokenizer, config)
    assert len(dataset) == sum(length <= lengths[1] for length in lengths) == 2

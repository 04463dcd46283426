"""DPO step 4 (ttsrl.training.dpo): TRL's DPOTrainer on a tiny converted policy raises the chosen
response over the rejected one, the checkpoint lands where stages 3-6 find it (step numbering over
rounds), stage 3 copies it, and bad settings are refused."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.policy_utils import tiny_policy  # noqa: F401 (fixture)
from ttsrl.chat_template import prompt_messages
from ttsrl.frontend import PolicyFrontend, row_policy_input
from ttsrl.training import dpo
from ttsrl.training.checkpoints import merge_checkpoint, select_checkpoints


def pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"prompt": prompt_messages(f"文本{i}。"),
                    "extra_info": {"split": "train", "index": i, "normalized_text": f"文本{i}。", "llm_prompt_text": "",
                                   "model_family": "cosyvoice2"},
                    "chosen": [{"role": "assistant", "content": f"<|s_{100 + i}|><|s_7|><|eos1|>"}],
                    "rejected": [{"role": "assistant", "content": f"<|s_{900 + i}|><|s_9|><|s_9|><|eos1|>"}]})
    return out


def margin(model_dir, examples) -> float:
    """Mean log p(chosen) - log p(rejected) under the model, after the ids the policy reads
    (upstream's input, ttsrl.frontend)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    frontend = PolicyFrontend(tokenizer, "cosyvoice2")
    total = 0.0
    for example in examples:
        prompt = list(row_policy_input(frontend, example["extra_info"], example["prompt"]).ids)
        values = []
        for side in ("chosen", "rejected"):
            answer = tokenizer(example[side][0]["content"], add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + answer])
            start = len(prompt)
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].log_softmax(-1)
            values.append(logits[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]].sum().item())
        total += values[0] - values[1]
    return total / len(examples)


def test_dpo_raises_the_chosen_response_and_saves_a_checkpoint_stage_3_copies(tiny_policy, tmp_path):  # noqa: F811
    train, validation = pairs(12), pairs(14)[12:]
    before = margin(tiny_policy, train)
    settings = dpo.DpoSettings(beta=0.1, loss="sigmoid", sft_weight=1.0, lr=1e-3, epochs=2, batch_size=4)
    marker = dpo.train_dpo(tiny_policy, train, validation, tmp_path, first_step=10, settings=settings,
                           work_dir=tmp_path / "dpo" / "round_2", round_number=2, log=lambda _: None)
    assert marker["steps"] == 6 and marker["step"] == 16 and marker["round"] == 2
    saved = tmp_path / "global_step_16" / "hf_model"
    assert json.loads((saved / "dpo_checkpoint.json").read_text())["settings"]["sft_weight"] == 1.0
    assert "eval_rewards/accuracies" in marker["metrics"]
    assert margin(saved, train) > before + 1.0  # the preference was learned, not only logged

    # stage 3: a Hugging Face checkpoint is copied (and checked), not handed to veRL's merger
    (checkpoint,) = select_checkpoints(tmp_path)
    assert checkpoint.is_hf and checkpoint.step == 16
    assert merge_checkpoint(checkpoint) == "merged"
    merged = tmp_path / "global_step_16" / "merged_hf_model"
    assert (merged / "merge_complete.json").is_file() and (merged / "model.safetensors").is_file()
    assert merge_checkpoint(checkpoint) == "skipped"


def test_dpo_reads_the_prompt_ids_grpo_reads(tiny_policy):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    [row] = dpo._trl_rows(pairs(1), tokenizer)
    expected = row_policy_input(PolicyFrontend(tokenizer, "cosyvoice2"), pairs(1)[0]["extra_info"], pairs(1)[0]["prompt"])
    assert row["prompt_ids"] == list(expected.ids)
    assert row["chosen_ids"] == tokenizer.convert_tokens_to_ids(["<|s_100|>", "<|s_7|>", "<|eos1|>"])


def test_rounds_chain_their_policies_and_steps(tmp_path):
    assert dpo.round_start(tmp_path, 1, "start") == (tmp_path.__class__("start"), 0)
    with pytest.raises(FileNotFoundError, match="round 2 starts from round 1's policy"):
        dpo.round_start(tmp_path, 2, "start")
    done = dpo.round_dir(tmp_path, 1) / dpo.ROUND_DONE_FILE
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"step": 24}))
    assert dpo.round_start(tmp_path, 2, "start") == (tmp_path / "global_step_24" / "hf_model", 24)
    assert dpo.round_trained(tmp_path, 1) is None  # recorded, but its checkpoint is not whole
    (tmp_path / "global_step_24" / "hf_model").mkdir(parents=True)
    (tmp_path / "global_step_24" / "hf_model" / dpo.CHECKPOINT_MARKER).write_text("{}")
    assert dpo.round_trained(tmp_path, 1) == {"step": 24}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="'hinge' is not one of"):
        dpo.DpoSettings(loss="hinge")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo.DpoSettings(beta=0)
    assert dpo.DpoSettings(loss="ipo", sft_weight=0.5).trl_losses() == (["ipo", "sft"], [1.0, 0.5])
    assert dpo.DpoSettings().trl_losses() == (["sigmoid"], None)

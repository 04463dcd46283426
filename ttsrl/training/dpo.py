"""Step 4 of offline preference optimization: train the policy on the pairs with TRL's
``DPOTrainer``, and save a checkpoint stages 3-6 take as they take GRPO's.

The loss is TRL's: ``loss="sigmoid"`` (DPO) or ``"ipo"``, and ``sft_weight > 0`` adds TRL's
``"sft"`` loss on the chosen response with that weight (RPO-style: the chosen answer's likelihood
is kept up while the margin grows). The reference model is the round's starting policy; its log
probabilities are computed once before training (``precompute_ref_log_probs``), so only the policy
is held in memory while it trains.

Pairs hold the row's chat messages and ``extra_info`` and the chosen and rejected answers as one
assistant message each, the response exactly as the policy produced it (speech tokens, then the
end token when it stopped). TRL's DPOTrainer would render them with the chat template and tokenize
the prompt as one string; ``FrontendDPOTrainer`` (a subclass through TRL's ``_prepare_dataset``)
hands it the ids instead: the prompt as GRPO's rollouts and inference build it
(``ttsrl.frontend.row_policy_input``: upstream CosyVoice's input, prompt text and text tokenized
apart), each answer's tokens after it.

Checkpoints: ``exp_dir/global_step_N/hf_model`` (a Hugging Face model; N counts optimizer steps
over all rounds, as GRPO's ``global_step_N`` does), written whole and marked complete by
``dpo_checkpoint.json``; stage 3 copies it to ``merged_hf_model``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ttsrl.atomic_write import atomic_dir, write_json

HF_CHECKPOINT_DIRNAME = "hf_model"
CHECKPOINT_MARKER = "dpo_checkpoint.json"
LOSSES = ("sigmoid", "ipo")


@dataclass(frozen=True)
class DpoSettings:
    beta: float = 0.1
    loss: str = "sigmoid"
    sft_weight: float = 0.0
    lr: float = 5e-7
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"dpo loss {self.loss!r} is not one of {LOSSES} (an RPO-style SFT term: sft_weight > 0)")
        if self.beta <= 0:
            raise ValueError(f"dpo beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"dpo sft_weight must be >= 0, got {self.sft_weight}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs <= 0 or self.lr <= 0:
            raise ValueError(f"dpo batch_size, grad_accum, epochs and lr must be positive: {self}")

    def trl_losses(self) -> tuple[list[str], list[float] | None]:
        if self.sft_weight > 0:
            return [self.loss, "sft"], [1.0, self.sft_weight]
        return [self.loss], None


def checkpoint_dir(exp_dir: Path, step: int) -> Path:
    return Path(exp_dir) / f"global_step_{step}" / HF_CHECKPOINT_DIRNAME


def _trl_rows(pairs: list[dict], tokenizer) -> list[dict]:
    """TRL's tokenized pair rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) of ``pairs``."""
    from ttsrl.frontend import PolicyFrontend, row_policy_input

    frontends: dict = {}
    rows = []
    for pair in pairs:
        info = pair.get("extra_info") or {}
        family = info.get("model_family") or "cosyvoice2"
        if family not in frontends:
            frontends[family] = PolicyFrontend(tokenizer, family)
        prompt = list(row_policy_input(frontends[family], info, pair["prompt"]).ids)

        def answer(messages):
            text = "".join(m["content"] for m in messages)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"prompt_ids": prompt, "chosen_ids": answer(pair["chosen"]),
                     "rejected_ids": answer(pair["rejected"])})
    return rows


def frontend_dpo_trainer():
    """TRL's DPOTrainer taking pairs already as ids (``_trl_rows``): the prompt is upstream's input."""
    from trl import DPOTrainer

    class FrontendDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids / chosen_ids / rejected_ids, built by _trl_rows

    return FrontendDPOTrainer


def train_dpo(policy_dir: str | Path, train_pairs: list[dict], val_pairs: list[dict], exp_dir: Path,
              first_step: int, settings: DpoSettings, work_dir: Path, round_number: int = 1, log=print) -> dict:
    """Train ``policy_dir`` on the pairs and save ``global_step_{first_step + steps}/hf_model``.
    Returns the checkpoint's marker (step, steps, metrics). Under ``torchrun`` each rank trains on
    its share of the batches (DDP, through the trainer's accelerate) and rank 0 saves."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    cuda = settings.device.startswith("cuda")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    losses, weights = settings.trl_losses()
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps_per_epoch = math.ceil(len(train_pairs) / (settings.batch_size * settings.grad_accum * world))
    config = DPOConfig(
        output_dir=str(work_dir / "trainer"), beta=settings.beta, loss_type=losses, loss_weights=weights,
        learning_rate=settings.lr, num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        lr_scheduler_type="constant", warmup_steps=0, seed=settings.seed, data_seed=settings.seed,
        max_length=None, precompute_ref_log_probs=True, logging_steps=1, save_strategy="no",
        eval_strategy="epoch" if val_pairs else "no", report_to="none", use_cpu=not cuda, bf16=cuda,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = frontend_dpo_trainer()(
        model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(_trl_rows(train_pairs, tokenizer)),
        eval_dataset=Dataset.from_list(_trl_rows(val_pairs, tokenizer)) if val_pairs else None,
        processing_class=tokenizer)
    log(f"DPO round {round_number}: {len(train_pairs)} pairs ({len(val_pairs)} validation), about "
        f"{steps_per_epoch * settings.epochs:.0f} optimizer steps, beta {settings.beta}, loss {'+'.join(losses)}"
        f"{f' {weights}' if weights else ''}, lr {settings.lr}")
    result = trainer.train()
    steps = int(trainer.state.global_step)
    history = [entry for entry in trainer.state.log_history]
    last = _last_values(history)
    step = first_step + steps
    marker = {"step": step, "steps": steps, "round": round_number, "policy": str(policy_dir),
              "train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "settings": asdict(settings),
              "train_loss": result.training_loss, "metrics": last}
    if trainer.is_world_process_zero():
        target = checkpoint_dir(exp_dir, step)
        with atomic_dir(target) as staging:
            trainer.model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "dpo_log_history.jsonl").write_text(
                "".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
            write_json(staging / CHECKPOINT_MARKER, marker, indent=2)  # last: it marks the directory whole
        log(f"DPO round {round_number}: {steps} steps -> {target} (train loss {result.training_loss:.4f}; "
            + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)) + ")")
    trainer.accelerator.wait_for_everyone()
    return marker


def _last_values(history: list[dict]) -> dict:
    """The last logged value of each reward/accuracy/margin/loss metric (train and eval)."""
    wanted = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies",
              "eval_rewards/margins", "logps/chosen", "logps/rejected")
    last = {}
    for entry in history:
        for key in wanted:
            if key in entry:
                last[key] = float(entry[key])
    return last


def read_checkpoint_marker(model_dir: Path) -> dict | None:
    path = Path(model_dir) / CHECKPOINT_MARKER
    return json.loads(path.read_text()) if path.is_file() else None


# ---- rounds (iterated DPO) ---------------------------------------------------------------
ROUND_DONE_FILE = "trained.json"


def round_dir(exp_dir: Path, round_number: int) -> Path:
    """Where round R's samples, scores, pairs and its training record live."""
    return Path(exp_dir) / "dpo" / f"round_{round_number}"


def round_start(exp_dir: Path, round_number: int, start_policy: str | Path) -> tuple[Path, int]:
    """(the policy round R samples from and trains, the step its checkpoints count from): round 1
    starts from ``start_policy`` at step 0, round R from round R-1's checkpoint at its step."""
    if round_number < 1:
        raise ValueError(f"DPO rounds count from 1, got {round_number}")
    if round_number == 1:
        return Path(start_policy), 0
    done = round_dir(exp_dir, round_number - 1) / ROUND_DONE_FILE
    if not done.is_file():
        raise FileNotFoundError(f"round {round_number} starts from round {round_number - 1}'s policy, but {done} "
                                "does not exist: run the rounds in order")
    record = json.loads(done.read_text())
    return checkpoint_dir(exp_dir, int(record["step"])), int(record["step"])


def round_trained(exp_dir: Path, round_number: int) -> dict | None:
    """Round R's training record when its checkpoint is complete, else None."""
    done = round_dir(exp_dir, round_number) / ROUND_DONE_FILE
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    return record if (checkpoint_dir(exp_dir, int(record["step"])) / CHECKPOINT_MARKER).is_file() else None

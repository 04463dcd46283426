"""Stage 3 as a library: find veRL's FSDP actor checkpoints, pick the complete ones, merge
each with veRL's own merger and check the merged Hugging Face model. A checkpoint that is a
Hugging Face model already (``global_step_N/hf_model``, what ``train_algorithm=dpo`` writes) is
copied instead, and checked the same way.

A merged model is staged beside its checkpoint and renamed to
``global_step_N/merged_hf_model`` only after it loaded, generated and got its
``merge_complete.json`` marker (``ttsrl.atomic_write.atomic_dir``), so a directory with the
marker is always whole. ``scripts/merge_checkpoints.py`` is the CLI.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ttsrl.atomic_write import atomic_dir, write_json
# what train_algorithm=dpo saves; ttsrl.training.dpo writes the marker last, so a directory with it is whole
from ttsrl.training.dpo import CHECKPOINT_MARKER as HF_CHECKPOINT_MARKER
from ttsrl.training.dpo import HF_CHECKPOINT_DIRNAME

MERGED_DIRNAME = "merged_hf_model"
COMPLETE_MARKER = "merge_complete.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_STEP_DIR = re.compile(r"global_step_(\d+)")


class MergeError(RuntimeError):
    """A checkpoint could not be merged or the merged model failed its check."""




@dataclass(frozen=True)
class Checkpoint:
    step: int
    actor_dir: Path  # veRL's FSDP actor dir, or a Hugging Face model dir when is_hf

    @property
    def is_hf(self) -> bool:
        return self.actor_dir.name == HF_CHECKPOINT_DIRNAME

    @property
    def merged_dir(self) -> Path:
        return self.actor_dir.parent / MERGED_DIRNAME

    @property
    def is_merged(self) -> bool:
        return (self.merged_dir / COMPLETE_MARKER).is_file()


def checkpoint_problem(actor_dir: Path) -> str | None:
    """Why ``actor_dir`` is not a complete FSDP actor checkpoint, or a complete Hugging Face
    checkpoint (``hf_model``), (None when it is)."""
    if not actor_dir.is_dir():
        return f"{actor_dir} does not exist"
    if actor_dir.name == HF_CHECKPOINT_DIRNAME:
        if not (actor_dir / HF_CHECKPOINT_MARKER).is_file():
            return f"{actor_dir / HF_CHECKPOINT_MARKER} is missing (the save did not finish)"
        return None
    config_path = actor_dir / "fsdp_config.json"
    if not config_path.is_file():
        return f"{config_path} is missing (the save did not finish)"
    try:
        world_size = int(json.loads(config_path.read_text())["world_size"])
    except (ValueError, KeyError, TypeError) as error:
        return f"{config_path} has no valid world_size ({error})"
    missing = [f"model_world_size_{world_size}_rank_{rank}.pt" for rank in range(world_size)
               if not (actor_dir / f"model_world_size_{world_size}_rank_{rank}.pt").is_file()]
    if missing:
        return f"{actor_dir} lacks {len(missing)} of {world_size} model shards (first: {missing[0]})"
    if not (actor_dir / "huggingface" / "config.json").is_file():
        return f"{actor_dir / 'huggingface' / 'config.json'} is missing"
    # veRL writes latest_checkpointed_iteration.txt after every part of a step's save (actor,
    # dataloader): a step beyond it was still being saved when the run stopped.
    tracker = actor_dir.parent.parent / TRACKER_FILE
    step = _STEP_DIR.fullmatch(actor_dir.parent.name)
    if tracker.is_file() and step:
        try:
            latest = int(tracker.read_text().strip())
        except ValueError:
            latest = None
        if latest is not None and int(step.group(1)) > latest:
            return (f"step {step.group(1)} is newer than {tracker} ({latest}): the run stopped while "
                    "saving it")
    return None


def find_checkpoints(exp_dir: Path) -> list[Checkpoint]:
    """Every ``global_step_N/actor`` (GRPO) or ``global_step_N/hf_model`` (DPO) directory under
    ``exp_dir``, by step."""
    found = []
    for child in exp_dir.iterdir() if exp_dir.is_dir() else []:
        match = _STEP_DIR.fullmatch(child.name)
        for kind in ("actor", HF_CHECKPOINT_DIRNAME):
            if match and (child / kind).is_dir():
                found.append(Checkpoint(int(match.group(1)), child / kind))
                break
    return sorted(found, key=lambda c: c.step)


def select_checkpoints(exp_dir: Path, steps: list[int] | None = None, latest: bool = False,
                       log=print) -> list[Checkpoint]:
    """The complete checkpoints to merge: all of them, the listed ``steps``, or the latest.

    Incomplete checkpoints (a crash during a save) are skipped with a note when
    merging all or the latest; a listed step that is missing or incomplete is an error.
    """
    available = find_checkpoints(exp_dir)
    if not available:
        raise MergeError(f"no checkpoints under {exp_dir}: expected global_step_N/actor (GRPO) or "
                         "global_step_N/hf_model (DPO) directories written by stage 2; check exp_dir, or that "
                         "trainer.save_freq > 0")
    if steps is not None:
        by_step = {c.step: c for c in available}
        unknown = [s for s in steps if s not in by_step]
        if unknown:
            raise MergeError(f"no checkpoint for step(s) {unknown} under {exp_dir}; "
                             f"saved steps: {sorted(by_step)}")
        chosen = [by_step[s] for s in steps]
        for checkpoint in chosen:
            problem = checkpoint_problem(checkpoint.actor_dir)
            if problem:
                raise MergeError(f"step {checkpoint.step} is incomplete: {problem}")
        return chosen
    complete = []
    for checkpoint in available:
        problem = checkpoint_problem(checkpoint.actor_dir)
        if problem:
            log(f"step {checkpoint.step}: skipping incomplete checkpoint: {problem}")
        else:
            complete.append(checkpoint)
    if not complete:
        raise MergeError(f"no complete checkpoint under {exp_dir}")
    return complete[-1:] if latest else complete


def run_verl_merger(actor_dir: Path, target_dir: Path, python: str = sys.executable) -> None:
    """veRL's own FSDP merger, in a subprocess (exactly the documented command)."""
    command = [python, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
               "--local_dir", str(actor_dir), "--target_dir", str(target_dir)]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-30:])
        raise MergeError(f"veRL merger failed (exit {result.returncode}) on {actor_dir}:\n"
                         f"  {' '.join(command)}\n{tail}")


def check_merged_model(model_dir: Path, text: str = "你好，世界。", max_new_tokens: int = 4) -> dict:
    """Load ``model_dir`` with transformers, check the speech tokens, generate a few tokens.

    Returns a summary (parameter count, dtype, generated token ids). Raises
    MergeError naming what is wrong.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttsrl.chat_template import prompt_messages
    from ttsrl.model_family import UnknownFamilyError, family_of_hf_dir
    from ttsrl.speech_tokens import all_speech_tokens

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except Exception as error:  # transformers raises many types; the message is what matters
        raise MergeError(f"{model_dir} does not load with transformers: {error}") from error

    try:
        family = family_of_hf_dir(model_dir)
    except UnknownFamilyError as error:
        raise MergeError(str(error)) from error
    required = all_speech_tokens() + list(family.stop_tokens)
    ids = tokenizer.convert_tokens_to_ids(required)
    unknown = [token for token, i in zip(required, ids) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise MergeError(f"{model_dir}: tokenizer lacks {len(unknown)} speech tokens (first: {unknown[0]}); "
                         "was the model converted with the speech tokens added?")
    if len(set(ids)) != len(ids):
        raise MergeError(f"{model_dir}: speech tokens do not map to distinct ids")
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        raise MergeError(f"{model_dir}: token id {max(ids)} is outside the embedding table ({rows} rows)")

    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(prompt_messages(text), tokenize=True, return_dict=True,
                                               return_tensors="pt")
    else:
        inputs = tokenizer(text, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False)
    generated = output[0, prompt_length:].tolist()
    if not generated:
        raise MergeError(f"{model_dir}: generate() produced no tokens")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "generated_ids": generated,
        "generated_text": tokenizer.decode(generated),
    }


def merge_checkpoint(checkpoint: Checkpoint, force: bool = False, check: bool = True,
                     python: str = sys.executable) -> str:
    """Merge one checkpoint into ``merged_dir`` atomically. Returns "merged" or "skipped"."""
    if checkpoint.is_merged and not force:
        return "skipped"
    # A merge killed half-way (SIGKILL skips atomic_dir's clean-up) leaves a staging
    # directory as large as the model; the next merge of that step removes it.
    for stale in checkpoint.actor_dir.parent.glob(f".{MERGED_DIRNAME}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    with atomic_dir(checkpoint.merged_dir) as staging:
        if checkpoint.is_hf:  # already a Hugging Face model: the merge is a copy
            shutil.copytree(checkpoint.actor_dir, staging, dirs_exist_ok=True)
        else:
            run_verl_merger(checkpoint.actor_dir, staging, python)
        summary = check_merged_model(staging) if check else {}
        marker = {"step": checkpoint.step, "source": str(checkpoint.actor_dir.resolve()),
                  "merge_seconds": round(time.monotonic() - started, 2), "checked": check, **summary}
        # Written last: its presence is what marks the merged directory complete.
        write_json(staging / COMPLETE_MARKER, marker, indent=2)
    return "merged"

"""Stage 3: merge veRL FSDP actor checkpoints into Hugging Face models, then check them.

    python scripts/merge_checkpoints.py --exp_dir exp/cosyvoice2_grpo            # every saved step
    python scripts/merge_checkpoints.py --exp_dir exp/cosyvoice2_grpo --steps latest   # the newest only
    python scripts/merge_checkpoints.py --exp_dir exp/cosyvoice2_grpo --steps 100,200

For each ``$exp_dir/global_step_N/actor`` it runs veRL's own merger

    python -m verl.model_merger merge --backend fsdp --local_dir .../actor --target_dir ...

into a temporary directory, checks that the result loads with transformers,
carries every speech token ``<|s_0|>``..``<|s_6560|>`` and the end tokens, and
generates a few tokens, writes ``merge_complete.json`` into it and only then
renames it to ``$exp_dir/global_step_N/merged_hf_model``. A directory with that
marker is skipped on the next run (``--force`` merges again); a half-written one
never has it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run as `python scripts/merge_checkpoints.py`: make the repo root (ttsrl) importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MERGED_DIRNAME = "merged_hf_model"
COMPLETE_MARKER = "merge_complete.json"
_STEP_DIR = re.compile(r"global_step_(\d+)")
_MODEL_SHARD = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")


class MergeError(RuntimeError):
    """A checkpoint could not be merged or the merged model failed its check."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    actor_dir: Path

    @property
    def merged_dir(self) -> Path:
        return self.actor_dir.parent / MERGED_DIRNAME

    @property
    def is_merged(self) -> bool:
        return (self.merged_dir / COMPLETE_MARKER).is_file()


TRACKER_FILE = "latest_checkpointed_iteration.txt"


def checkpoint_problem(actor_dir: Path) -> str | None:
    """Why ``actor_dir`` is not a complete FSDP actor checkpoint (None when it is)."""
    if not actor_dir.is_dir():
        return f"{actor_dir} does not exist"
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
    """Every ``global_step_N/actor`` directory under ``exp_dir``, by step."""
    found = []
    for child in exp_dir.iterdir() if exp_dir.is_dir() else []:
        match = _STEP_DIR.fullmatch(child.name)
        if match and (child / "actor").is_dir():
            found.append(Checkpoint(int(match.group(1)), child / "actor"))
    return sorted(found, key=lambda c: c.step)


def select_checkpoints(exp_dir: Path, steps: list[int] | None = None, latest: bool = False) -> list[Checkpoint]:
    """The complete checkpoints to merge: all of them, the listed ``steps``, or the latest.

    Incomplete checkpoints (a crash during a save) are skipped with a note when
    merging all or the latest; a listed step that is missing or incomplete is an error.
    """
    available = find_checkpoints(exp_dir)
    if not available:
        raise MergeError(f"no checkpoints under {exp_dir}: expected global_step_N/actor directories written by "
                         "stage 2 (trainer.default_local_dir); check exp_dir, or that trainer.save_freq > 0")
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
            print(f"step {checkpoint.step}: skipping incomplete checkpoint: {problem}", flush=True)
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
    from ttsrl.speech_tokens import SPEECH_END_TOKENS, all_speech_tokens

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except Exception as error:  # transformers raises many types; the message is what matters
        raise MergeError(f"{model_dir} does not load with transformers: {error}") from error

    required = all_speech_tokens() + list(SPEECH_END_TOKENS)
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
    staging = checkpoint.actor_dir.parent / f".{MERGED_DIRNAME}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    run_verl_merger(checkpoint.actor_dir, staging, python)
    summary = check_merged_model(staging) if check else {}
    marker = {"step": checkpoint.step, "source": str(checkpoint.actor_dir.resolve()),
              "merge_seconds": round(time.monotonic() - started, 2), "checked": check, **summary}
    (staging / COMPLETE_MARKER).write_text(json.dumps(marker, ensure_ascii=False, indent=2) + "\n")
    if checkpoint.merged_dir.exists():
        shutil.rmtree(checkpoint.merged_dir)
    os.replace(staging, checkpoint.merged_dir)
    return "merged"


def parse_steps(text: str) -> list[int] | str:
    """``100,200`` -> [100, 200]; ``all`` and ``latest`` pass through."""
    if text.strip() in ("all", "latest"):
        return text.strip()
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps wants all, latest or comma-separated integers like 100,200; "
                                         f"got {text!r}")
    if not steps:
        raise argparse.ArgumentTypeError("--steps is empty")
    return steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp_dir", required=True, type=Path,
                        help="experiment directory holding global_step_N/actor (stage 2's trainer.default_local_dir)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--steps", type=parse_steps, default="all",
                       help="all (default), latest, or comma-separated steps such as 100,200")
    which.add_argument("--latest", action="store_true", help="same as --steps latest")
    parser.add_argument("--force", action="store_true", help="merge again even where merged_hf_model is complete")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip loading/generating with the merged model")
    args = parser.parse_args(argv)
    if args.latest:
        args.steps = "latest"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        steps = args.steps if isinstance(args.steps, list) else None
        checkpoints = select_checkpoints(args.exp_dir, steps, latest=args.steps == "latest")
        for checkpoint in checkpoints:
            started = time.monotonic()
            outcome = merge_checkpoint(checkpoint, force=args.force, check=args.check)
            if outcome == "skipped":
                print(f"step {checkpoint.step}: already merged at {checkpoint.merged_dir}, skipping", flush=True)
            else:
                print(f"step {checkpoint.step}: merged to {checkpoint.merged_dir} "
                      f"({time.monotonic() - started:.1f} s)", flush=True)
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Checkpoint retention for GRPO: keep the last few checkpoints and the best one.

veRL deletes checkpoints itself: with ``trainer.max_actor_ckpt_to_keep=K`` its checkpoint
manager (in the actor worker) removes the oldest ``global_step_N/actor`` this process saved
once there are more than K. That leaves two gaps, which the ``tts_sync`` trainer
(verl_plugins/tts_trainer.py) closes with ``Retention``:

- **The best.** The best checkpoint so far is the saved step with the highest validation reward
  (``validation_reward``: veRL's ``val-core/<data source>/reward/mean@N``, averaged over data
  sources; refused rollouts are left out of it). A validation of a step that was not saved
  (``test_freq`` not a multiple of ``save_freq``) does not count. The best is recorded in
  ``<exp_dir>/best_checkpoint.json`` and hard-linked into ``<exp_dir>/.best_checkpoint/``
  (no second copy on disk; a copy where the filesystem has no hard links), so when veRL's
  rotation removes ``global_step_N/actor``, it is renamed back right after the save. Stage 3
  then finds it where it always was.
- **Resumed runs.** veRL only remembers the checkpoints of its own process; after a resume the
  older ones would stay forever. After every save the same rule is applied to the folder: the
  ``global_step_N/actor`` of the last K saved steps (up to the current one) and of the best stay,
  the others are removed. Only ``actor/`` goes, as veRL removes it: ``data.pt``, merged models
  and exports of a step are left alone.

K = ``None`` or 0 keeps everything (veRL's meaning).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

from ttsrl.atomic_write import write_json

BEST_FILE = "best_checkpoint.json"
PIN_DIR = ".best_checkpoint"
_STEP_DIR = re.compile(r"global_step_(\d+)")
_VALIDATION_REWARD = re.compile(r"^val-(?:core|aux)/(.+)/reward/mean@(\d+)$")


def validation_reward(metrics: dict) -> float | None:
    """The mean validation reward of one validation: per data source veRL's
    ``val-*/<source>/reward/mean@N`` with the largest N, averaged over the sources (None: none)."""
    per_source: dict = {}
    for key, value in metrics.items():
        match = _VALIDATION_REWARD.match(key)
        if not match:
            continue
        source, n = match.group(1), int(match.group(2))
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and (source not in per_source or n > per_source[source][0]):
            per_source[source] = (n, value)
    if not per_source:
        return None
    return sum(value for _, value in per_source.values()) / len(per_source)


def saved_steps(root: Path) -> list[int]:
    """Steps with a ``global_step_N/actor`` directory under ``root``, in order."""
    steps = []
    for child in root.iterdir() if root.is_dir() else []:
        match = _STEP_DIR.fullmatch(child.name)
        if match and (child / "actor").is_dir():
            steps.append(int(match.group(1)))
    return sorted(steps)


def steps_to_remove(steps: list[int], keep_last: int | None, best: int | None, current: int) -> list[int]:
    """The saved ``steps`` (up to ``current``) beyond the last ``keep_last`` that are not the best."""
    if not keep_last or keep_last <= 0:
        return []
    done = sorted(step for step in steps if step <= current)
    kept = set(done[-keep_last:]) | ({best} if best is not None else set())
    return [step for step in done if step not in kept]


def _link_tree(source: Path, target: Path) -> bool:
    """Hard-link every file of ``source`` into ``target`` (True), or copy it where links fail (False)."""
    linked = True
    for folder, _dirs, files in os.walk(source):
        destination = target / Path(folder).relative_to(source)
        destination.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder) / name, destination / name)
            except OSError:
                shutil.copy2(Path(folder) / name, destination / name)
                linked = False
    return linked


class Retention:
    """Keep the last ``keep_last`` checkpoints under ``root`` and, with ``keep_best``, the best."""

    def __init__(self, root: Path, keep_last: int | None, keep_best: bool = True, log=print):
        self.root = Path(root)
        self.keep_last = int(keep_last) if keep_last else None
        self.keep_best = keep_best
        self.log = log

    # ---- the best so far
    def best(self) -> dict | None:
        """{"step", "validation_reward"} of ``best_checkpoint.json`` (None: no best yet)."""
        path = self.root / BEST_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return record if isinstance(record.get("step"), int) else None
        except (OSError, ValueError, AttributeError):
            return None

    def best_step(self) -> int | None:
        record = self.best() if self.keep_best else None
        return record["step"] if record else None

    def _pin(self, step: int) -> Path:
        return self.root / PIN_DIR / f"global_step_{step}" / "actor"

    def after_validation(self, step: int, metrics: dict) -> bool:
        """Record step ``step`` as the best when it is saved and its validation reward beats the
        best so far; returns whether it did."""
        reward = validation_reward(metrics)
        actor = self.root / f"global_step_{step}" / "actor"
        if not self.keep_best or reward is None or not actor.is_dir():
            return False
        previous = self.best()
        if previous is not None and previous["step"] != step and reward <= previous["validation_reward"]:
            return False
        pin = self._pin(step)
        if pin.exists():
            shutil.rmtree(pin)
        if not _link_tree(actor, pin):
            self.log(f"checkpoint retention: {self.root} has no hard links; the best checkpoint (step {step}) is "
                     f"copied to {pin}")
        write_json(self.root / BEST_FILE, {"step": step, "validation_reward": reward}, indent=1)
        if previous is not None and previous["step"] != step:
            shutil.rmtree(self._pin(previous["step"]).parent, ignore_errors=True)
        self.log(f"checkpoint retention: step {step} is the best so far (validation reward {reward:.4f}"
                 + (f", was step {previous['step']}: {previous['validation_reward']:.4f})" if previous and
                    previous["step"] != step else ")"))
        self.apply(step)
        return True

    # ---- after every save
    def restore_best(self, current: int) -> None:
        """Put the best checkpoint back where veRL's rotation removed it (from its hard links); never
        a step after ``current`` (a record left by another run)."""
        step = self.best_step()
        if step is None or step > current:
            return
        actor, pin = self.root / f"global_step_{step}" / "actor", self._pin(step)
        if not actor.exists() and pin.is_dir():
            actor.parent.mkdir(parents=True, exist_ok=True)
            pin.rename(actor)
            _link_tree(actor, pin)  # keep it pinned for the next rotation
            self.log(f"checkpoint retention: kept the best checkpoint {actor} (trainer.max_actor_ckpt_to_keep "
                     f"would have removed it)")

    def apply(self, current: int) -> list[int]:
        """Restore the best, then remove the actor checkpoints beyond the rule; returns their steps."""
        self.restore_best(current)
        removed = steps_to_remove(saved_steps(self.root), self.keep_last, self.best_step(), current)
        for step in removed:
            shutil.rmtree(self.root / f"global_step_{step}" / "actor", ignore_errors=True)
        if removed:
            self.log(f"checkpoint retention: removed the actor checkpoints of steps {removed} (keeping the last "
                     f"{self.keep_last} and the best: trainer.max_actor_ckpt_to_keep, tts.keep_best_checkpoint)")
        return removed

"""Refused rollouts in GRPO training: which rollouts carry no gradient, when the run stops, and
what is logged. The ``tts_sync`` trainer (verl_plugins/tts_trainer.py) applies these rules to
every step; this module is the rules, free of veRL.

A rollout is refused when the reward server refuses its item (``reward_tts.compute_score`` with
``on_refused=report`` returns ``failed`` 1.0 and the reason in ``failure`` instead of raising).
Such a rollout has no score, so:

- **No gradient.** GRPO's group statistics are computed by veRL's own estimator over the rollouts
  that were scored; a refused rollout's advantage is 0 and its ``response_mask`` is 0, so it adds
  no policy-gradient, entropy or KL term (as veRL's rollout rejection sampling excludes a
  sequence). A group left with a single scored rollout has no baseline to compare it with
  (veRL's estimator would use its raw score): that rollout gets no gradient either.
- **Counted and logged.** ``reward/failed/mean`` (share of the step's rollouts) and
  ``reward/failed/count`` every step; one JSON line per refused rollout in
  ``<exp_dir>/reward_failures.jsonl`` (step, data source, split, index, speaker prompt, text,
  reason, and the advantage and loss tokens the actor trained it with).
- **The run stops** before training on a step, naming the items, when
  (a) the step's refused rollouts exceed ``reward_failure_budget`` times its rollouts
  (default 0.01: 1 of 128 rollouts passes, 2 stop the run), or
  (b) it is the ``reward_failure_max_consecutive_steps``-th step in a row (default 3; 0 switches
  this rule off) with at least one refused rollout: a steady trickle of refusals under the
  budget is a broken data set or server, not bad luck. The count starts afresh when a run
  (re)starts.

A reward server that stays unavailable past the hook's retry budget is not a refused item: the
hook raises ``RewardServerUnavailable``, veRL's agent loop drops that rollout, and the trainer
stops the run when a step has fewer rollouts than it asked for (``lost_rollouts``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ttsrl.json_lines import plain

FAILED_KEY = "failed"
"""compute_score's key: 1.0 for a refused rollout, 0.0 for a scored one."""
REASON_KEY = "failure"
"""compute_score's key: why the rollout was refused ("" for a scored one)."""
FAILURE_LOG = "reward_failures.jsonl"
DEFAULT_BUDGET = 0.01
DEFAULT_MAX_CONSECUTIVE_STEPS = 3
BUDGET_KNOB = "reward_failure_budget"
CONSECUTIVE_KNOB = "reward_failure_max_consecutive_steps"
KNOBS_WHERE = "configs/default.sh, or tts.<knob> among veRL's overrides"
MAX_NAMED_ITEMS = 10


class RewardFailureStop(RuntimeError):
    """Refused rollouts stopped the run (the message names the items and the fix)."""


def is_refused(reward_info) -> bool:
    """Whether one rollout's stored reward components (``reward_extra_info``) mark it refused."""
    if not isinstance(reward_info, dict):
        return False
    value = reward_info.get(FAILED_KEY)
    try:
        return value is not None and float(value) >= 0.5
    except (TypeError, ValueError):
        return False


def rows_without_gradient(groups: list, refused: list) -> list[bool]:
    """Which rows get advantage 0 and no loss: the refused rows, and the one scored row of a
    group whose other rows were all refused (module doc). ``groups``: each row's GRPO group (uid)."""
    members: dict = {}
    scored: dict = {}
    for group, bad in zip(groups, refused):
        members[group] = members.get(group, 0) + 1
        scored[group] = scored.get(group, 0) + (not bad)
    return [bool(bad) or (members[group] > 1 and scored[group] == 1) for group, bad in zip(groups, refused)]


@dataclass(frozen=True)
class FailurePolicy:
    """When refused rollouts stop the run (module doc)."""

    budget: float = DEFAULT_BUDGET
    max_consecutive_steps: int = DEFAULT_MAX_CONSECUTIVE_STEPS

    def __post_init__(self):
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < 1 \
                or math.isnan(budget):
            raise ValueError(f"{BUDGET_KNOB} ({KNOBS_WHERE}) must be a share of a step's rollouts in [0, 1), got "
                             f"{budget!r} (0.01: at most 1% of them may be refused; a step with none scored never "
                             "trains)")
        steps = self.max_consecutive_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{CONSECUTIVE_KNOB} ({KNOBS_WHERE}) must be an integer >= 0 (0: off), got {steps!r}")

    @classmethod
    def from_settings(cls, settings) -> "FailurePolicy":
        """From the ``tts`` section of veRL's config (a mapping; missing keys take the defaults)."""
        settings = settings or {}
        budget = settings.get("reward_failure_budget", DEFAULT_BUDGET)
        steps = settings.get("reward_failure_max_consecutive_steps", DEFAULT_MAX_CONSECUTIVE_STEPS)
        try:
            budget = float(budget)
        except (TypeError, ValueError):
            pass  # __post_init__ names the value
        if isinstance(steps, str) and steps.strip().lstrip("-").isdigit():
            steps = int(steps)
        return cls(budget, steps)

    def allowed(self, rollouts: int) -> int:
        """The most refused rollouts a step of ``rollouts`` may have."""
        return math.floor(self.budget * rollouts + 1e-9)


class FailureTracker:
    """Applies a FailurePolicy step by step (it remembers the run of steps with refusals)."""

    def __init__(self, policy: FailurePolicy):
        self.policy = policy
        self.streak = 0  # consecutive steps with a refused rollout, up to the last one checked

    def check(self, refused: int, rollouts: int) -> str | None:
        """Count one step; why the run must stop before training on it (None: it trains)."""
        self.streak = self.streak + 1 if refused else 0
        if refused > self.policy.allowed(rollouts):
            return (f"{refused} of its {rollouts} rollouts were refused, over {BUDGET_KNOB}={self.policy.budget:g} "
                    f"({self.policy.allowed(rollouts)} allowed)")
        limit = self.policy.max_consecutive_steps
        if refused and limit and self.streak >= limit:
            return (f"{self.streak} steps in a row have refused rollouts ({refused} of {rollouts} in this one; "
                    f"{CONSECUTIVE_KNOB}={limit})")
        return None


def lost_rollouts(expected: int, present: int) -> str | None:
    """Why a step with ``present`` of the ``expected`` rollouts must not train (None: all there)."""
    if present >= expected:
        return None
    return (f"{expected - present} of its {expected} rollouts are missing: veRL's agent loop dropped them after an "
            "error (the traceback is in the log above, from an AgentLoopWorker): usually the reward server stayed "
            "unavailable past REWARD_RETRY_BUDGET_S (reward_tts.py), or the reward hook or the rollout failed. Fix "
            "the cause and rerun stage 2; it resumes from the last checkpoint")


def failure_record(step: int, key: str, data_source, extra_info, ground_truth, reason: str) -> dict:
    """One refused rollout as logged: the step, the item and the reason."""
    info = plain(extra_info, nan_as_none=True) if isinstance(extra_info, dict) else {}
    record = {"step": int(step), "rollout": key, "data_source": plain(data_source, nan_as_none=True)}
    for name in ("split", "index", "id", "prompt_id", "prompt_wav"):
        if info.get(name) not in (None, ""):
            record[name] = info[name]
    record["text"] = plain(ground_truth, nan_as_none=True)
    record["reason"] = str(reason)
    return record


def item_of(record: dict) -> tuple:
    return record.get("data_source"), record.get("split"), record.get("index"), record.get("text")


def _reason(record: dict) -> str:
    """The reason without the hook's own "rollout (...): " prefix (the line names the item already)."""
    reason = str(record.get("reason", ""))
    if reason.startswith("rollout (") and "): " in reason:
        return reason.split("): ", 1)[1]
    return reason


def describe_items(records: list[dict], limit: int = MAX_NAMED_ITEMS) -> str:
    """The refused items of ``records``, one line each (its rollouts counted), the first ``limit``."""
    by_item: dict = {}
    for record in records:
        by_item.setdefault(item_of(record), []).append(record)
    lines = []
    for (data_source, split, index, text), group in list(by_item.items())[:limit]:
        first = group[0]
        where = f"data_source {data_source!r}"
        if split is not None:
            where += f", {split} index {index}"
        for name in ("id", "prompt_id", "prompt_wav"):
            if name in first:
                where += f", {name} {first[name]!r}"
        lines.append(f"  - {where}, text {text!r}: {len(group)} rollout(s) refused: {_reason(first)}")
    if len(by_item) > limit:
        lines.append(f"  ... and {len(by_item) - limit} more items")
    return "\n".join(lines)


def append_records(path: Path, records: list[dict]) -> None:
    """Append JSON lines (one write, flushed: a crash leaves whole lines behind)."""
    if not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()

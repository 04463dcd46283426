"""Step 3 of offline preference optimization: chosen/rejected pairs from scored samples.

The pair rule, per prompt (its group of N scored responses):

1. a group with fewer than 2 scored responses is dropped (``fewer_than_2_scored``);
2. the chosen response is the highest-reward response whose error rate is at most
   ``max_chosen_error``; a group with none is dropped (``no_chosen_under_threshold``): there is
   nothing right to prefer;
3. the rejected response is the lowest-reward response of the rest, which gives the pair the
   largest reward margin the group has under rule 2;
4. a pair whose margin is below ``min_margin``, or whose two responses are the same tokens, is a
   tie and dropped (``tie``); an all-bad group ends at rule 2.

Ties between equal rewards are broken by the lower sample number, so the same scores always give
the same pairs. ``val_fraction`` of the prompts (drawn with ``seed``) go to the validation pairs.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ttsrl.atomic_write import write_json, write_text
from ttsrl.json_lines import json_lines

PAIRS_FILE = "pairs.jsonl"
VAL_PAIRS_FILE = "val_pairs.jsonl"
STATS_FILE = "pairs_stats.json"
DROP_REASONS = ("fewer_than_2_scored", "no_chosen_under_threshold", "tie")


class NoPairsError(RuntimeError):
    """The pair rule kept no pair; the message gives the counts by reason."""


@dataclass(frozen=True)
class PairRule:
    max_chosen_error: float = 0.0
    min_margin: float = 1e-6
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.max_chosen_error:
            raise ValueError(f"max_chosen_error must be >= 0, got {self.max_chosen_error}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {self.min_margin}")


def pair_of_group(scored: list[dict], rule: PairRule) -> tuple[dict, dict] | str:
    """The (chosen, rejected) scored samples of one group, or the reason it has none."""
    if len(scored) < 2:
        return "fewer_than_2_scored"
    ranked = sorted(scored, key=lambda s: (-s["score"], s["sample"]))
    good = [s for s in ranked if s["error_rate"] <= rule.max_chosen_error]
    if not good:
        return "no_chosen_under_threshold"
    chosen = good[0]
    rest = [s for s in ranked if s is not chosen]
    rejected = min(rest, key=lambda s: (s["score"], s["sample"]))
    if chosen["score"] - rejected["score"] < rule.min_margin or chosen["response"] == rejected["response"]:
        return "tie"
    return chosen, rejected


def build_pairs(samples: list[dict], scores: list[dict], rows: dict, rule: PairRule,
                refused: int = 0) -> tuple[list[dict], list[dict], dict]:
    """(train pairs, validation pairs, stats) from every sample, its score where it has one, and the
    training rows (``PromptRow`` by index: the prompt, ground truth). Raises ``NoPairsError`` when
    no pair is left, with the counts by reason."""
    score_of = {(s["prompt_index"], s["sample"]): s for s in scores}
    groups: dict[int, list[dict]] = {}
    for sample in samples:
        groups.setdefault(sample["prompt_index"], [])
        score = score_of.get((sample["prompt_index"], sample["sample"]))
        if score is not None:
            groups[sample["prompt_index"]].append({**score, "response": sample["response"]})
    dropped: Counter = Counter()
    pairs = []
    for index in sorted(groups):
        outcome = pair_of_group(groups[index], rule)
        if isinstance(outcome, str):
            dropped[outcome] += 1
            continue
        chosen, rejected = outcome
        row = rows[index]
        pairs.append({
            "prompt_index": index, "prompt": row.messages, "ground_truth": row.ground_truth,
            "extra_info": row.extra_info,  # its normalized texts: the ids the policy reads (ttsrl.frontend)
            "chosen": [{"role": "assistant", "content": chosen["response"]}],
            "rejected": [{"role": "assistant", "content": rejected["response"]}],
            "chosen_score": chosen["score"], "rejected_score": rejected["score"],
            "chosen_error_rate": chosen["error_rate"], "rejected_error_rate": rejected["error_rate"],
            "chosen_components": _components(chosen), "rejected_components": _components(rejected),
        })
    stats = {"prompts": len(groups), "samples": len(samples), "scored": len(scores), "refused_by_server": refused,
             "pairs": len(pairs), "dropped": {reason: dropped.get(reason, 0) for reason in DROP_REASONS},
             "rule": rule.__dict__}
    if not pairs:
        raise NoPairsError(
            f"no preference pair from {len(groups)} prompts ({len(scores)} of {len(samples)} samples scored, "
            f"{refused} refused by the server): dropped {stats['dropped']}. "
            + ("Most groups have no response under the error threshold: raise dpo_max_chosen_error or warm "
               "the policy up first (sft_data)." if dropped["no_chosen_under_threshold"] >= max(dropped.values())
               else "Sample more per prompt (dpo_samples_per_prompt) or check the reward server's scores."))
    validation_count = int(round(rule.val_fraction * len(pairs)))
    if rule.val_fraction > 0 and len(pairs) >= 2:
        validation_count = max(1, validation_count)
    held = set(random.Random(rule.seed).sample(range(len(pairs)), min(validation_count, len(pairs) - 1)))
    train = [p for k, p in enumerate(pairs) if k not in held]
    validation = [p for k, p in enumerate(pairs) if k in held]
    stats.update(train_pairs=len(train), val_pairs=len(validation),
                 mean_margin=sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / len(pairs))
    return train, validation, stats


def _components(scored: dict) -> dict:
    return {k: v for k, v in scored.items() if k not in ("prompt_index", "sample", "response", "score")}


def write_pairs(out_dir: Path, train: list[dict], validation: list[dict], stats: dict) -> None:
    """pairs.jsonl, val_pairs.jsonl and pairs_stats.json, each written whole or not at all."""
    for name, pairs in ((PAIRS_FILE, train), (VAL_PAIRS_FILE, validation)):
        write_text(out_dir / name, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    write_json(out_dir / STATS_FILE, stats, indent=2)


def read_pairs(path: Path) -> list[dict]:
    """A pairs file written by ``write_pairs`` (a bad line: an error naming file and line)."""
    records = []
    for number, record, error in json_lines(Path(path).read_text(encoding="utf-8")):
        if error is not None or not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
            raise ValueError(f"{path}:{number}: not a preference pair (JSON with prompt, chosen, rejected)"
                             + (f": {error}" if error else ""))
        records.append(record)
    return records

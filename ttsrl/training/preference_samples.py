"""Steps 1 and 2 of offline preference optimization (``train_algorithm=dpo``): sample N responses
per prompt of stage 0's training parquet with the policy, then score every response through the
reward server with the same veRL hook GRPO uses (``reward_tts.compute_score``: all components).

Both steps are resumable and exactly-once. Each writes JSON lines, one complete line per record,
flushed as it goes; a rerun reads what is there (a line torn by a crash is dropped and redone),
skips what is done and appends the rest, so a killed sampler or a reward server that fails half-way
loses nothing and repeats nothing. Sampling shards the prompts over ``torchrun`` ranks
(``RANK``/``WORLD_SIZE``), one file per rank, as ``infer_dist.py`` does.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ttsrl.atomic_write import write_text
from ttsrl.eval_sets import EvalUtterance
from ttsrl.json_lines import json_lines, plain
from ttsrl.model_family import get_family
from ttsrl.speech_tokens import format_speech_tokens, parse_speech_tokens

SAMPLES_GLOB = "samples.rank*.jsonl"
SCORES_FILE = "scores.jsonl"
SCORE_ERRORS_FILE = "score_errors.jsonl"


class PreferenceDataError(ValueError):
    """A training row, a samples file or a scores file is not what these steps need."""


@dataclass(frozen=True)
class PromptRow:
    """One row of stage 0's parquet: what the policy is prompted with and what the reward needs."""

    index: int  # row number in the parquet: the key samples and scores refer to
    messages: list
    ground_truth: str
    data_source: str
    extra_info: dict = field(default_factory=dict)

    def utterance(self) -> EvalUtterance:
        """The row as the generators take it: they build its input as GRPO's rollouts do
        (``ttsrl.frontend.row_policy_input``), so DPO samples exactly the GRPO prompt."""
        user = next((m["content"] for m in self.messages if m.get("role") == "user"), None)
        if user is None:
            raise PreferenceDataError(f"training row {self.index}: its prompt has no user message: {self.messages}")
        if not self.extra_info.get("normalized_text"):
            raise PreferenceDataError(f"training row {self.index}: no extra_info.normalized_text (a parquet from a "
                                      "stage 0 before the policy read upstream CosyVoice's input); rerun stage 0")
        return EvalUtterance(id=str(self.index), text=self.ground_truth, where=f"row {self.index}",
                             row={"extra_info": self.extra_info, "messages": self.messages})


def read_prompt_rows(parquet: str | Path) -> list[PromptRow]:
    """Every row of a stage 0 training parquet; a row without a prompt or ground truth is an error
    naming the file and row."""
    import pandas as pd

    frame = pd.read_parquet(parquet)
    missing = [c for c in ("prompt", "reward_model") if c not in frame.columns]
    if missing:
        raise PreferenceDataError(f"{parquet}: no column(s) {missing}; is this stage 0's train.parquet?")
    rows = []
    for index, record in enumerate(frame.to_dict("records")):
        messages = plain(record["prompt"])
        reward_model = plain(record["reward_model"]) or {}
        ground_truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        if not isinstance(messages, list) or not messages or not isinstance(ground_truth, str) or not ground_truth:
            raise PreferenceDataError(f"{parquet} row {index}: needs a 'prompt' (chat messages) and "
                                      f"reward_model.ground_truth (text); got {messages!r}, {reward_model!r}")
        rows.append(PromptRow(index, messages, ground_truth, str(record.get("data_source", "")),
                              plain(record.get("extra_info")) or {}))
    if not rows:
        raise PreferenceDataError(f"{parquet} has no rows")
    return rows


def choose_prompts(rows: list[PromptRow], count: int, seed: int) -> list[PromptRow]:
    """``count`` rows drawn without replacement with ``seed`` (all rows when count <= 0 or larger),
    in row order: each round of iterated DPO passes its own seed and sees other prompts."""
    if count <= 0 or count >= len(rows):
        return list(rows)
    picked = random.Random(seed).sample(range(len(rows)), count)
    return [rows[i] for i in sorted(picked)]


# ---- JSON lines that survive a crash -----------------------------------------------------
def read_complete_lines(path: Path, repair: bool = True) -> list[dict]:
    """The records of a JSON-lines file this module appends to. A last line without its newline was
    torn by a crash: it is not returned, and with ``repair`` (only the file's own writer may) it is
    cut off the file so appends start on a clean line. A bad line elsewhere is an error naming the
    file and line: nothing is silently dropped."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data) and repair:
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    records = []
    for number, record, error in json_lines(complete.decode("utf-8")):
        if error is not None:
            raise PreferenceDataError(f"{path}:{number}: not JSON ({error}); move the file away to redo this step")
        records.append(record)
    return records


class LineAppender:
    """Appends one JSON line per record and flushes it, so a record on disk is always whole."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        for record in records:
            self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- step 1: sampling ---------------------------------------------------------------------
def canonical_response(text: str, family=None) -> tuple[str, list[int], bool]:
    """A generated answer as the policy's token sequence: its speech tokens, then the family's end
    token when it stopped at any of its stop tokens (padding and anything after the end are not
    part of the response)."""
    parsed = parse_speech_tokens(text, family)
    response = format_speech_tokens(parsed.ids) + (get_family(family).eos_token if parsed.ended else "")
    return response, parsed.ids, parsed.ended


def rank_and_world(environ=None) -> tuple[int, int]:
    environ = os.environ if environ is None else environ
    return int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))


def complete_prompts(records: list[dict], samples_per_prompt: int) -> set[int]:
    """The prompts that have all ``samples_per_prompt`` samples among ``records``."""
    seen: dict[int, set] = {}
    for record in records:
        seen.setdefault(record["prompt_index"], set()).add(record["sample"])
    return {index for index, samples in seen.items() if len(samples) >= samples_per_prompt}


def first_of_each_sample(records) -> list[dict]:
    """``records`` with each (prompt_index, sample) kept once, the first time it appears."""
    kept, seen = [], set()
    for record in records:
        key = (record["prompt_index"], record["sample"])
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def sample_responses(prompts: list[PromptRow], samples_per_prompt: int, generate, out_dir: Path,
                     prompts_per_batch: int = 8, rank: int = 0, world_size: int = 1, log=print,
                     family=None) -> Path:
    """Sample ``samples_per_prompt`` responses for this rank's share of ``prompts`` with
    ``generate(list[EvalUtterance]) -> list[str]`` and append them to ``samples.rank{rank}.jsonl``,
    one line per response: prompt_index, sample, response, ids, ended. A prompt whose N lines are
    all there is skipped; a prompt with fewer (a crash within a batch) is sampled again from
    scratch after its partial lines are discarded, so each prompt ends with exactly N samples."""
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2 to make a pair, got {samples_per_prompt}")
    path = out_dir / f"samples.rank{rank}.jsonl"
    existing = read_complete_lines(path)
    done = complete_prompts(existing, samples_per_prompt)
    if len(done) != len({r["prompt_index"] for r in existing}):  # partial prompts: keep the complete ones' lines
        kept = [r for r in existing if r["prompt_index"] in done]
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    # prompts another rank finished (a rerun with another world size shards differently) are done too
    for other in out_dir.glob(SAMPLES_GLOB):
        if other != path:
            done |= complete_prompts(read_complete_lines(other, repair=False), samples_per_prompt)
    mine = [p for k, p in enumerate(prompts) if k % world_size == rank]
    pending = [p for p in mine if p.index not in done]
    log(f"rank {rank}: {len(mine)} prompts x {samples_per_prompt} samples; {len(mine) - len(pending)} already "
        f"sampled in {path}")
    with LineAppender(path) as out:
        for start in range(0, len(pending), prompts_per_batch):
            batch = pending[start:start + prompts_per_batch]
            utterances = [u for p in batch for u in [p.utterance()] * samples_per_prompt]
            texts = generate(utterances)
            if len(texts) != len(utterances):
                raise RuntimeError(f"the generator returned {len(texts)} answers for {len(utterances)} prompts")
            for utterance, text in zip(utterances, texts):
                if isinstance(text, Exception):
                    raise PreferenceDataError(f"training {utterance.where}: {text}")
            records = []
            for k, text in enumerate(texts):
                prompt = batch[k // samples_per_prompt]
                response, ids, ended = canonical_response(text, family)
                records.append({"prompt_index": prompt.index, "sample": k % samples_per_prompt,
                                "response": response, "ids": ids, "ended": ended})
            out.write(records)
    return path


def read_samples(out_dir: Path) -> list[dict]:
    """Every rank's samples, each (prompt_index, sample) once."""
    return first_of_each_sample(record for path in sorted(out_dir.glob(SAMPLES_GLOB))
                                for record in read_complete_lines(path, repair=False))


# ---- step 2: scoring ----------------------------------------------------------------------
async def score_samples(samples: list[dict], rows: dict[int, PromptRow], score, out_dir: Path,
                        reward_kwargs: dict | None = None, concurrency: int = 256, log=print) -> dict:
    """Score every sample not yet in ``scores.jsonl`` with ``score`` (``reward_tts.compute_score``'s
    signature) and append each result as it arrives: prompt_index, sample, score and every component.

    A sample the server refuses (``RewardRequestError``: this item is bad) is recorded in
    ``score_errors.jsonl`` with the reason and left unscored; its group may then have too few
    scores for a pair, which the pair step counts. Any other failure (the server went away) stops
    the step after what was scored is on disk; a rerun scores only the rest. Returns counts."""
    from ttsrl.triton_client.reward_client import RewardRequestError

    reward_kwargs = dict(reward_kwargs or {})
    scores_path, errors_path = out_dir / SCORES_FILE, out_dir / SCORE_ERRORS_FILE
    finished = {(r["prompt_index"], r["sample"]) for r in read_complete_lines(scores_path)}
    finished |= {(r["prompt_index"], r["sample"]) for r in read_complete_lines(errors_path)}
    pending = [s for s in samples if (s["prompt_index"], s["sample"]) not in finished]
    log(f"scoring {len(pending)} samples ({len(samples) - len(pending)} already scored in {scores_path})")
    gate = asyncio.Semaphore(concurrency)
    counts = {"scored": 0, "refused": 0, "already": len(samples) - len(pending)}
    with LineAppender(scores_path) as scores_out, LineAppender(errors_path) as errors_out:
        async def one(sample: dict) -> None:
            row = rows[sample["prompt_index"]]
            key = {"prompt_index": sample["prompt_index"], "sample": sample["sample"]}
            async with gate:
                try:
                    result = await score(row.data_source, sample["response"], row.ground_truth,
                                         extra_info=row.extra_info, **reward_kwargs)
                except RewardRequestError as error:
                    errors_out.write([{**key, "error": str(error)}])
                    counts["refused"] += 1
                    return
            scores_out.write([{**key, **{k: v for k, v in result.items() if isinstance(v, (int, float, bool))}}])
            counts["scored"] += 1

        tasks = [asyncio.create_task(one(sample)) for sample in pending]
        try:
            for task in asyncio.as_completed(tasks):
                await task
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log(f"scoring stopped after {counts['scored']} new scores ({counts['already']} from before); "
                "they are kept, and a rerun scores only the rest")
            raise
    return counts


def read_scores(out_dir: Path) -> tuple[list[dict], int]:
    """The scores (each sample once) and how many samples the server refused."""
    scores = first_of_each_sample(read_complete_lines(out_dir / SCORES_FILE))
    return scores, len(read_complete_lines(out_dir / SCORE_ERRORS_FILE))

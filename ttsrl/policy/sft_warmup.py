"""Supervised warm-up of the policy on (prompt, speech tokens) examples, before GRPO (stage 2).

GRPO only sharpens what the policy already does: a group whose rollouts all score the same
has zero advantage. A short supervised pass on paired data gives it something to sharpen, as
F5-TTS RL and the Inworld TTS trainer do before their RL stage. Each example is the policy's
real GRPO input (its chat messages through the model's chat template, exactly as veRL renders
them) followed by the target speech tokens and ``<|eos1|>``; the loss is cross-entropy on the
response only.

    [torchrun --nproc_per_node=N] scripts/sft_warmup.py --model DIR --data FILE --output-dir OUT \\
        [--steps 200] [--lr 1e-5] [--batch-size 16] [--seed 0] [--device auto|cuda|cpu] \\
        [--standin-targets] [--force]

(that CLI is a thin layer over ``warm_up`` here; torch + transformers: trainer environment)

``--data`` is one of:

- ``*.parquet``: stage 0's ``train.parquet`` (veRL's RL schema). Each row's input is built as
  GRPO's rollouts build it (``ttsrl.frontend.row_policy_input``: upstream CosyVoice's LLM input,
  prompt text and text tokenized apart, zero-shot prompt speech tokens included), so the
  warm-up trains on the very ids GRPO samples from; the targets are ``extra_info.speech_tokens`` when the row has them,
  else (``--standin-targets``) ``token2wav_server.standin.targets_for`` of the row's
  ``reward_model.ground_truth`` in the voice of the prompt's speech tokens. With
  ``--standin-targets any-voice`` each target is in one of the data's prompt voices drawn per
  row (fixed by the row's index), not the prompt's own: a warm-up that teaches reading but
  not voice cloning, as a multi-speaker corpus paired with arbitrary prompts would; the smoke
  profile uses it so that GRPO's similarity reward has the cloning left to teach.
- JSONL: one ``{"text": ..., "speech_tokens": [int, ...]}`` per line (the speech tokens of a
  recording of the text: the reward server's ``speech_tokenizer`` model makes them from wavs);
  the prompt is the text-only input of the text, normalized as upstream normalizes it
  (``ttsrl.frontend``; a text upstream would synthesize in several calls is a bad record). ``--standin-targets`` instead takes plain
  ``{"text": ...}`` records and uses the stand-in engines' tokens of each text
  (``token2wav_server.standin.text_to_tokens``): the CPU smoke profile's task.

Device and precision: ``--device auto`` trains on the GPU when torch sees one. On CUDA the
weights and AdamW's state stay fp32 and the forward pass runs under bf16 autocast: the simple
correct choice, since a 1e-5 step is below bf16's resolution for most weights (a bf16 copy
updated in place would mostly not move). The CPU trains in fp32. The output is saved in the
dtype of the input model's config. Under torchrun (``WORLD_SIZE`` > 1) the ranks form a DDP
group (NCCL on GPUs, gloo on the CPU): every rank draws the same batch of ``--batch-size``
examples and takes every WORLD_SIZE-th of it, and the loss is scaled so the averaged gradient
is the token mean of the whole batch; N ranks thus train the same model one process would, N
times faster. Rank 0 writes ``OUT``.

``OUT`` gets the full Hugging Face model directory (config, weights, tokenizer, chat template)
and ``sft_warmup.json``: the stamp of its inputs (model and data content hashes, targets,
steps, lr, batch size, seed), the device, precision, world size and the first and last loss.
It is written to a temporary folder and renamed when complete. A complete ``OUT`` with the same
stamp is reused; one with another stamp is refused, naming the fields that differ (``--force``
redoes it, or pick another output directory).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from dataclasses import dataclass

from ttsrl.atomic_write import atomic_dir
from ttsrl.chat_template import prompt_messages
from ttsrl.frontend import FrontendError, PolicyFrontend, row_policy_input
from ttsrl.model_family import family_of_hf_dir
from ttsrl.json_lines import json_lines
from ttsrl.speech_tokens import SPEECH_END_TOKENS, SPEECH_VOCAB_SIZE, format_speech_tokens, parse_speech_tokens

DONE_FILE = "sft_warmup.json"

DEFAULT_LR = 1e-5
"""Full fine-tuning of the pretrained 0.5B LLM: CosyVoice's own SFT recipe uses 1e-5 with a
constant schedule (no warm-up). A warm-up is not needed for a few hundred steps: Adam moves each
weight by at most about lr per step from the first one on. 1e-3, the tiny smoke model's rate
(which the smoke profile passes itself), would wreck a pretrained model within steps."""

STAMP_FIELDS = ("model_sha256", "data_sha256", "targets", "steps", "lr", "batch_size", "seed")
"""The inputs a finished warm-up must match to be reused (paths are recorded but not compared:
a moved copy of the same model or data is the same input)."""


DATA_HELP = "--data: stage 0's train.parquet or a JSONL of {text, speech_tokens}"


class PairsError(ValueError):
    """A record of the data file is unusable; the message names file:line (or file:row)."""


class StampMismatch(ValueError):
    """A finished ``OUT`` was made from other inputs; the message names the differing fields."""


@dataclass(frozen=True)
class Example:
    """One supervised example: the policy's chat messages and the speech token ids it should
    answer; a stage-0 row's ``extra_info`` (its normalized texts) or a record's raw ``text``."""

    messages: list
    targets: list
    extra_info: dict | None = None
    text: str = ""


def _bad_ids(ids) -> bool:
    return (not isinstance(ids, list) or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < SPEECH_VOCAB_SIZE for i in ids))


def _raise_problems(path: str, problems: list[str], examples: list) -> None:
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PairsError(f"{len(problems)} bad record(s) in {path}:\n  {shown}{more}")
    if not examples:
        raise PairsError(f"{path}: no records")


def load_jsonl(path: str, standin_targets: bool = False) -> list[Example]:
    """Text-only examples of a pairs JSONL; every bad record is reported as ``file:line: reason``."""
    if standin_targets:
        from token2wav_server.standin import text_to_tokens
    examples, problems = [], []
    for number, record, bad_json in json_lines(pathlib.Path(path).read_text(encoding="utf-8")):
        where = f"{path}:{number}"
        if bad_json is not None:
            problems.append(f"{where}: not JSON ({bad_json.msg})")
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: 'text' must be a non-empty string")
            continue
        if standin_targets:
            try:
                ids = text_to_tokens(text)
            except ValueError as error:
                problems.append(f"{where}: {error}")
                continue
        else:
            ids = record.get("speech_tokens")
            if _bad_ids(ids):
                problems.append(f"{where}: 'speech_tokens' must be a non-empty list of ints in "
                                f"[0, {SPEECH_VOCAB_SIZE})")
                continue
        examples.append(Example(prompt_messages(text), ids, text=text))
    _raise_problems(path, problems, examples)
    return examples


def _row_prompt(messages) -> tuple[list[dict], list[int]]:
    """(the row's messages, the prompt speech token ids in its assistant message); raises ValueError."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise ValueError("'prompt' must be a list of {role, content} messages (veRL's RL schema)")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    speech = "".join(m["content"] for m in messages if m["role"] == "assistant")
    if not speech.strip():
        return messages, []
    parsed = parse_speech_tokens(speech)
    if parsed.ignored or parsed.ended:
        raise ValueError(f"the assistant message must hold only prompt speech tokens <|s_N|> (got {speech[:80]!r})")
    return messages, parsed.ids


STANDIN_TARGETS = ("prompt", "any-voice")
"""``--standin-targets`` modes: in the prompt's voice, or in any of the data's prompt voices."""


def _any_voice_prompts(rows: list) -> list:
    """Per row, a one-token prompt naming a voice of the data's prompts, drawn by the row's index."""
    import zlib

    from token2wav_server.standin import is_voice_token

    voices = set()
    for row in rows:
        try:
            voices.update(t for t in _row_prompt(row["prompt"])[1] if is_voice_token(t))
        except ValueError:
            continue  # a bad row is reported with its number by load_parquet
    voices = sorted(voices)
    if not voices:
        raise PairsError("--standin-targets any-voice needs zero-shot rows whose prompt tokens name a voice "
                         "(stage 0 with train_prompts and a voice_tokens stand-in server)")
    return [[voices[zlib.crc32(str(number).encode()) % len(voices)]] for number in range(len(rows))]


def load_parquet(path: str, standin_targets: bool | str = False) -> list[Example]:
    """Examples of stage 0's parquet rows (their own prompt messages); bad rows as ``file:row N: reason``."""
    import pyarrow.parquet as pq

    if standin_targets:
        from token2wav_server.standin import targets_for
    try:
        rows = pq.read_table(path, columns=["prompt", "reward_model", "extra_info"]).to_pylist()
    except (OSError, KeyError, ValueError) as error:  # pyarrow's errors subclass these
        raise PairsError(f"{path}: not a stage-0 parquet with columns prompt, reward_model, extra_info ({error})")
    examples, problems = [], []
    voice_of = None
    if standin_targets == "any-voice":
        try:
            voice_of = _any_voice_prompts(rows)
        except ValueError as error:
            raise PairsError(f"{path}: {error}") from None
    for number, row in enumerate(rows):
        where = f"{path}:row {number}"
        try:
            messages, prompt_tokens = _row_prompt(row["prompt"])
        except ValueError as error:
            problems.append(f"{where}: {error}")
            continue
        text = (row.get("reward_model") or {}).get("ground_truth")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: 'reward_model.ground_truth' must be a non-empty string")
            continue
        ids = (row.get("extra_info") or {}).get("speech_tokens")
        if ids is not None:
            if _bad_ids(ids):
                problems.append(f"{where}: 'extra_info.speech_tokens' must be a non-empty list of ints in "
                                f"[0, {SPEECH_VOCAB_SIZE})")
                continue
        elif standin_targets:
            try:
                ids = targets_for(text, prompt_tokens if voice_of is None else voice_of[number], tokens_per_char=1)
            except ValueError as error:
                problems.append(f"{where}: {error}")
                continue
        else:
            problems.append(f"{where}: no 'extra_info.speech_tokens' (the targets); add them to the data, or "
                            "pass --standin-targets for the stand-in engines' tokens (smoke profile)")
            continue
        examples.append(Example(messages, list(ids), extra_info=row.get("extra_info") or {}))
    _raise_problems(path, problems, examples)
    return examples


def load_examples(path: str, standin_targets: bool = False) -> list[Example]:
    """The examples of ``--data``: stage 0's parquet (``*.parquet``) or a pairs JSONL."""
    if not pathlib.Path(path).is_file():
        raise PairsError(f"{path}: no such file ({DATA_HELP})")
    if str(path).endswith(".parquet"):
        return load_parquet(path, standin_targets)
    return load_jsonl(path, standin_targets)


def prompt_ids(frontend: PolicyFrontend, example: Example) -> list[int]:
    """The ids the policy reads for ``example``: a stage-0 row's as GRPO's rollouts build them, a
    record's text as upstream's frontend makes it (one LLM call)."""
    try:
        if example.extra_info is not None:
            return list(row_policy_input(frontend, example.extra_info, example.messages).ids)
        inputs = frontend.inputs(example.text)
    except FrontendError as error:
        raise PairsError(str(error)) from None
    if len(inputs) != 1:
        raise PairsError(f"text {example.text!r}: upstream synthesizes it as {len(inputs)} separate LLM inputs; "
                         "give each as a record of its own")
    return list(inputs[0].ids)


def encode_examples(tokenizer, examples: list[Example], family=None) -> list[tuple[list[int], int]]:
    """(token ids of prompt + response, prompt length) per example; ``family``: the policy's
    (default CosyVoice2)."""
    frontend = PolicyFrontend(tokenizer, family)
    encoded = []
    for example in examples:
        prompt = prompt_ids(frontend, example)
        ids = example.targets
        response = tokenizer(format_speech_tokens(ids) + SPEECH_END_TOKENS[0], add_special_tokens=False)["input_ids"]
        if len(response) != len(ids) + 1:
            raise PairsError(f"the tokenizer of the model does not have the speech tokens as single tokens "
                             f"('{format_speech_tokens(ids[:1])}' -> {response[:3]}...): not a converted CosyVoice2 LLM")
        encoded.append((prompt + response, len(prompt)))
    return encoded


def _sha256_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_digest(model_dir) -> str:
    """Content hash of the model directory's files (config, weights, tokenizer, chat template).
    Content, not mtimes: a copy of the same model is the same input. For the 0.5B model that is
    about 1 GB read once, seconds next to the training."""
    return _sha256_files(sorted(p for p in pathlib.Path(model_dir).iterdir() if p.is_file()))


def _targets_name(standin_targets: bool | str) -> str:
    if not standin_targets:
        return "data"
    return "standin" if standin_targets in (True, "prompt") else f"standin:{standin_targets}"


def input_stamp(model_dir, data, steps: int, lr: float, batch_size: int, seed: int, standin_targets: bool) -> dict:
    """What a warm-up was made from (``STAMP_FIELDS`` are compared on reuse)."""
    return {"model": str(model_dir), "model_sha256": model_digest(model_dir),
            "data": str(data), "data_sha256": _sha256_files([pathlib.Path(data)]),
            "targets": _targets_name(standin_targets),
            "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}


def stamp_differences(recorded: dict, wanted: dict) -> list[str]:
    """``field: done -> asked`` for every stamp field that differs."""
    if not isinstance(recorded, dict) or "model_sha256" not in recorded:
        return ["stamp: none (made by an older sft_warmup that did not record its inputs)"]
    shown = {"model_sha256": "model", "data_sha256": "data"}  # a changed file: show its path, not the hash
    differences = []
    for field in STAMP_FIELDS:
        if recorded.get(field) != wanted[field]:
            if field in shown:
                path = shown[field]
                differences.append(f"{path} content: {recorded.get(path)} (as it was) -> {wanted[path]} (as it is)")
            else:
                differences.append(f"{field}: {recorded.get(field)!r} -> {wanted[field]!r}")
    return differences


def check_finished(output: pathlib.Path, stamp: dict) -> bool:
    """True when ``output`` is a finished warm-up of exactly ``stamp``; raises StampMismatch when it
    is one of other inputs; False when there is none."""
    done = output / DONE_FILE
    if not done.is_file():
        return False
    try:
        recorded = json.loads(done.read_text(encoding="utf-8")).get("stamp")
    except (json.JSONDecodeError, AttributeError):
        recorded = None
    differences = stamp_differences(recorded, stamp)
    if differences:
        listed = "\n  ".join(differences)
        raise StampMismatch(f"{output} is a finished warm-up of other inputs ({done}):\n  {listed}\n"
                            "Redo it with --force (run.sh: force=true) or write this one elsewhere (--output-dir); "
                            "a GRPO run started from the old warm-up does not match the new one.")
    return True


def resolve_device(requested: str, local_rank: int = 0) -> str:
    """``--device``: auto (CUDA when torch sees a GPU), cuda (this rank's GPU, or a clear error) or cpu."""
    import torch

    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device {requested!r}: expected auto, cuda or cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device cuda, but torch {torch.__version__} ({build}) sees no GPU: check nvidia-smi and "
                         "the CUDA trainer environment (TTSRL_DEVICE=cuda bash scripts/setup_env.sh trainer), "
                         "or pass --device cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"local rank {local_rank} has no GPU: {count} visible; run torchrun "
                         f"--nproc_per_node={count} or fewer")
    return f"cuda:{local_rank}"


def _collate(batch, device: str):
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, prompt_length:len(ids)] = torch.tensor(ids[prompt_length:])
        attention[row, :len(ids)] = 1
    return input_ids.to(device), labels.to(device), attention.to(device)


def shard_loss(model, examples, picks: list[int], rank: int = 0, world_size: int = 1, device: str = "cpu"):
    """(loss to backpropagate, summed token NLL) of this rank's share ``picks[rank::world_size]`` of
    the batch ``picks``. DDP averages the ranks' gradients; the loss is scaled so that average is
    the gradient of the whole batch's token mean, as one process with the whole batch computes it."""
    import torch
    import torch.nn.functional as F

    tokens = sum(len(examples[i][0]) - examples[i][1] for i in picks)  # response tokens of the whole batch
    input_ids, labels, attention = _collate([examples[i] for i in picks[rank::world_size]], device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        logits = model(input_ids=input_ids, attention_mask=attention).logits
    targets = labels[:, 1:]
    keep = targets != -100
    nll = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
    return nll * (world_size / tokens), nll.detach()


def train(model, examples, steps: int, lr: float, batch_size: int, seed: int, device: str = "cpu",
          rank: int = 0, world_size: int = 1, log_every: int = 25) -> list[float]:
    """AdamW on response-only cross-entropy; ``model`` may be DDP-wrapped (``world_size`` ranks).
    Returns the loss of every step (the token mean over the whole batch, all ranks)."""
    import torch

    generator = torch.Generator().manual_seed(seed)  # same on every rank: all ranks draw the same batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        loss, total = shard_loss(model, examples, picks, rank, world_size, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        losses.append(float(total) / sum(len(examples[i][0]) - examples[i][1] for i in picks))
        if rank == 0 and log_every and (step % log_every == 0 or step == steps - 1):
            print(f"sft step {step + 1}/{steps}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    return losses


def warm_up(model_dir: str, data: str, output_dir: str, steps: int = 200, lr: float = DEFAULT_LR,
            batch_size: int = 16, seed: int = 0, standin_targets: bool = False, force: bool = False,
            device: str = "auto") -> pathlib.Path:
    """Train the model of ``model_dir`` on the examples of ``data`` and write it to ``output_dir``
    (reused when it is a finished warm-up of the same inputs, refused when of others, redone
    under ``force``); returns ``output_dir``. Under torchrun every rank calls this."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    output = pathlib.Path(output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if steps < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, lr > 0, batch_size >= 1 (got {steps}, {lr}, {batch_size})")
    if batch_size < world_size:
        raise ValueError(f"--batch-size {batch_size} is smaller than the {world_size} ranks: each rank needs an "
                         f"example per step; use --batch-size {world_size} or more, or fewer ranks")
    if not (pathlib.Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json): convert the LLM "
                         "first (bash run.sh -1 -1) or set hf_model_dir")
    if not pathlib.Path(data).is_file():
        raise PairsError(f"{data}: no such file ({DATA_HELP})")
    stamp = input_stamp(model_dir, data, steps, lr, batch_size, seed, standin_targets)
    if not force and check_finished(output, stamp):  # every rank reads the same files, so all agree
        if rank == 0:
            print(f"{output} is a finished warm-up of the same inputs ({DONE_FILE}); reusing it (--force redoes it)")
        return output
    examples = load_examples(data, standin_targets)
    device = resolve_device(device, local_rank)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_examples(tokenizer, examples, family_of_hf_dir(model_dir))
    save_dtype = AutoConfig.from_pretrained(model_dir).dtype or torch.float32
    if isinstance(save_dtype, str):
        save_dtype = getattr(torch, save_dtype)
    torch.manual_seed(seed)
    # fp32 weights (and AdamW state) everywhere; CUDA runs the forward pass in bf16 autocast.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    trained = model
    if world_size > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        trained = DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    try:
        losses = train(trained, encoded, steps, lr, batch_size, seed, device, rank, world_size)
        if rank == 0:
            _write_output(model, model_dir, output, save_dtype, {
                "stamp": stamp, "examples": len(examples),
                "zero_shot_examples": sum(1 for e in examples if any(m["role"] == "assistant" and m["content"]
                                                                     for m in e.messages)),
                "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                "device": device.split(":")[0], "world_size": world_size,
                "precision": "bf16 autocast, fp32 weights" if device.startswith("cuda") else "fp32",
                "saved_dtype": str(save_dtype).replace("torch.", ""),
                "first_loss": losses[0], "last_loss": losses[-1]})
            print(f"wrote {output} ({len(examples)} examples, {steps} steps on {world_size} {device.split(':')[0]} "
                  f"rank(s), loss {losses[0]:.3f} -> {losses[-1]:.3f})")
        if world_size > 1:
            dist.barrier()  # the others return once OUT is complete
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    return output


def _write_output(model, model_dir, output: pathlib.Path, save_dtype, summary: dict) -> None:
    with atomic_dir(output) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)  # tokenizer, chat template, conversion notes
        for stale in staging.glob("*.safetensors*"):
            stale.unlink()
        model.to(save_dtype).save_pretrained(staging)
        (staging / DONE_FILE).write_text(json.dumps(summary, indent=1) + "\n")

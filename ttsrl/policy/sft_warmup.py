"""Supervised warm-up of the policy on (text, speech tokens) pairs, before GRPO (stage 2).

GRPO only sharpens what the policy already does: a group whose rollouts all score the same
has zero advantage. A short supervised pass on paired data gives it something to sharpen, as
F5-TTS RL and the Inworld TTS trainer do before their RL stage. Each example is the policy's
real GRPO input (``<|sos|>`` + text + ``<|task_id|>``, ``ttsrl.chat_template``) followed by
the target speech tokens and ``<|eos1|>``; the loss is cross-entropy on the response only.

    python scripts/sft_warmup.py --model DIR --data pairs.jsonl --output-dir OUT \\
        [--steps 200] [--lr 1e-3] [--batch-size 16] [--seed 0]

(that CLI is a thin layer over ``warm_up`` here; torch + transformers: trainer environment)

``pairs.jsonl``: one ``{"text": ..., "speech_tokens": [int, ...]}`` per line (the speech tokens
of a recording of the text: the reward server's ``speech_tokenizer`` model makes them from wavs).
``--standin-targets`` instead takes plain ``{"text": ...}`` records and uses the stand-in
engines' tokens for each text (``token2wav_server.standin.text_to_tokens``): the CPU smoke
profile's task, where those are exactly the tokens the stand-in server transcribes as the text.

``OUT`` gets the full Hugging Face model directory (config, weights, tokenizer, chat template)
and ``sft_warmup.json`` (settings, first and last loss). It is written to a temporary folder
and renamed when complete; a complete ``OUT`` is left as it is unless ``--force``.
"""
from __future__ import annotations

import json
import pathlib
import shutil

from ttsrl.atomic_write import atomic_dir
from ttsrl.chat_template import expected_prompt
from ttsrl.speech_tokens import SPEECH_END_TOKENS, SPEECH_VOCAB_SIZE, format_speech_tokens

DONE_FILE = "sft_warmup.json"


class PairsError(ValueError):
    """A record of the pairs file is unusable; the message names file:line."""


def load_pairs(path: str, standin_targets: bool = False) -> list[tuple[str, list[int]]]:
    """(text, speech token ids) per record; every bad record is reported as ``file:line: reason``."""
    if standin_targets:
        from token2wav_server.standin import text_to_tokens
    pairs, problems = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: not JSON ({error.msg})")
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
                if not isinstance(ids, list) or not ids or not all(
                        isinstance(i, int) and 0 <= i < SPEECH_VOCAB_SIZE for i in ids):
                    problems.append(f"{where}: 'speech_tokens' must be a non-empty list of ints in "
                                    f"[0, {SPEECH_VOCAB_SIZE})")
                    continue
            pairs.append((text, ids))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PairsError(f"{len(problems)} bad record(s) in {path}:\n  {shown}{more}")
    if not pairs:
        raise PairsError(f"{path}: no records")
    return pairs


def encode_pairs(tokenizer, pairs) -> list[tuple[list[int], int]]:
    """(token ids of prompt + response, prompt length) per pair."""
    examples = []
    for text, ids in pairs:
        prompt = tokenizer(expected_prompt(text), add_special_tokens=False)["input_ids"]
        response = tokenizer(format_speech_tokens(ids) + SPEECH_END_TOKENS[0], add_special_tokens=False)["input_ids"]
        if len(response) != len(ids) + 1:
            raise PairsError(f"the tokenizer of the model does not have the speech tokens as single tokens "
                             f"('{format_speech_tokens(ids[:1])}' -> {response[:3]}...): not a converted CosyVoice2 LLM")
        examples.append((prompt + response, len(prompt)))
    return examples


def train(model, examples, steps: int, lr: float, batch_size: int, seed: int, log_every: int = 25) -> list[float]:
    """Plain AdamW on response-only cross-entropy; returns the loss of every step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        picks = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=generator).tolist()
        width = max(len(examples[i][0]) for i in picks)
        input_ids = torch.zeros(len(picks), width, dtype=torch.long)
        labels = torch.full((len(picks), width), -100, dtype=torch.long)
        attention = torch.zeros(len(picks), width, dtype=torch.long)
        for row, index in enumerate(picks):
            ids, prompt_length = examples[index]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, prompt_length:len(ids)] = torch.tensor(ids[prompt_length:])
            attention[row, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"sft step {step + 1}/{steps}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    return losses


def warm_up(model_dir: str, data: str, output_dir: str, steps: int, lr: float, batch_size: int, seed: int,
            standin_targets: bool = False, force: bool = False) -> pathlib.Path:
    """Train the model of ``model_dir`` on the pairs of ``data`` and write it to ``output_dir``
    (skipped when that is complete, unless ``force``); returns ``output_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = pathlib.Path(output_dir)
    if (output / DONE_FILE).is_file() and not force:
        print(f"{output} is complete ({DONE_FILE}); --force redoes it")
        return output
    if steps < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, lr > 0, batch_size >= 1 (got {steps}, {lr}, {batch_size})")
    if not (pathlib.Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json): convert the LLM "
                         "first (bash run.sh -1 -1) or set hf_model_dir")
    pairs = load_pairs(data, standin_targets)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = encode_pairs(tokenizer, pairs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    losses = train(model, examples, steps, lr, batch_size, seed)

    with atomic_dir(output) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)  # tokenizer, chat template, conversion notes
        for stale in staging.glob("*.safetensors*"):
            stale.unlink()
        model.save_pretrained(staging)
        summary = {"model": str(model_dir), "data": str(data), "standin_targets": standin_targets,
                   "pairs": len(pairs), "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                   "first_loss": losses[0], "last_loss": losses[-1]}
        (staging / DONE_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {output} ({len(pairs)} pairs, {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    return output

"""Stage 0's guard against training on the test speakers: the training prompts (the prompt set,
``train_prompts``, and the training records' own prompts) must not share a prompt recording or
a prompt transcript with a held-out set (the evaluation set ``eval_manifest``; a dev set
``dev_manifest``), read with ``ttsrl.eval_sets`` (Seed-TTS-eval meta.lst, CV3-Eval folder, JSONL).

- **Same recording**: the audio's content hash (``speaker_prompt_key`` of the mono float32
  samples and the sample rate, no transcript), so a copy under another name or folder, or in
  another wav sample format, is caught. Only wavs whose header (sample rate, length) matches a
  held-out prompt's are read and hashed.
- **Same transcript**: the prompt transcripts after NFKC, lower case, and with punctuation,
  symbols and whitespace removed (``ttsrl.text_norm.normalize_characters``), which catches the
  same recording resampled or re-encoded.

A match stops stage 0 before anything is written (``HeldOutError``), naming the training prompt
(its file:line and wav) and the held-out prompt (its file:line, utterance and wav) for each.
With ``allow`` (``allow_held_out_prompts=true``: a task that evaluates held-out texts in its
training voices on purpose, as configs/smoke.sh's stand-in task does) the same list is logged as
a warning instead. A held-out prompt wav that is missing or unreadable is compared by transcript
only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_NAMED = 20


class HeldOutError(Exception):
    """Training prompts are prompts of a held-out set; the message names each pair and the fix."""


@dataclass(frozen=True)
class HeldOutPrompt:
    set_name: str   # "evaluation set", "dev set"
    manifest: str   # the held-out set's path, as configured
    where: str      # file:line of the utterance
    utt_id: str
    wav: str
    transcript: str


def _header(path: str):
    import soundfile

    try:
        info = soundfile.info(path)
        return int(info.samplerate), int(info.frames)
    except (OSError, RuntimeError):  # soundfile's LibsndfileError is a RuntimeError
        return None


def audio_key(path: str) -> str | None:
    """The recording's content hash (samples and sample rate; None when it cannot be read)."""
    from ttsrl.evaluation.outputs import read_wave
    from ttsrl.triton_client.wire import speaker_prompt_key

    try:
        wave, rate = read_wave(Path(path))
    except (OSError, RuntimeError):
        return None
    return speaker_prompt_key(wave, rate, "")


def _transcript(text: str) -> str:
    from ttsrl.text_norm import normalize_characters

    return normalize_characters(text or "")


def read_held_out(set_name: str, manifest: str) -> list[HeldOutPrompt]:
    """The prompts of one held-out set (raises HeldOutError when it cannot be read)."""
    from ttsrl.eval_sets import EvalSetError, load_eval_set

    try:
        utterances = load_eval_set(manifest).utterances
    except EvalSetError as error:
        raise HeldOutError(f"the {set_name} cannot be read to check the training prompts against it: {error}") \
            from None
    return [HeldOutPrompt(set_name, manifest, utt.where, utt.id, utt.prompt_wav, utt.prompt_text)
            for utt in utterances if utt.prompt_wav or utt.prompt_text.strip()]


def overlaps(prompts: list, held_out: list[HeldOutPrompt]) -> list[str]:
    """One line per training prompt (``ttsrl.training.speaker_prompts.Prompt``) that is a held-out
    prompt's recording or transcript, naming both."""
    by_header: dict = {}
    by_transcript: dict = {}
    for held in held_out:
        if held.wav:
            header = _header(held.wav)
            if header is not None:
                by_header.setdefault(header, []).append(held)
        transcript = _transcript(held.transcript)
        if transcript:
            by_transcript.setdefault(transcript, held)
    keys: dict = {}  # held-out wav -> its content hash, each read once

    def held_key(held: HeldOutPrompt):
        if held.wav not in keys:
            keys[held.wav] = audio_key(held.wav)
        return keys[held.wav]

    found = []
    for prompt in prompts:
        same = None
        candidates = by_header.get(_header(prompt.wav), []) if prompt.wav else []
        if candidates:
            key = audio_key(prompt.wav)
            same = next((held for held in candidates if key is not None and held_key(held) == key), None)
        if same is not None:
            found.append(f"{prompt.where}: prompt wav {prompt.wav} is the recording of {same.set_name} "
                         f"{same.manifest} utterance {same.utt_id!r} ({same.where}: {same.wav})")
            continue
        held = by_transcript.get(_transcript(prompt.text))
        if held is not None:
            found.append(f"{prompt.where}: prompt transcript {prompt.text!r} ({prompt.wav}) is the prompt transcript "
                         f"of {held.set_name} {held.manifest} utterance {held.utt_id!r} ({held.where}: {held.wav})")
    return found


def check_held_out(prompts: list, held_out_sets: dict, log=print, allow: bool = False) -> None:
    """Raise HeldOutError when a training prompt is a prompt of a held-out set (``allow``: log it).
    ``held_out_sets``: {set name: manifest path}; a path that does not exist is logged, not checked."""
    if not prompts:
        return
    held: list[HeldOutPrompt] = []
    checked = []
    for set_name, manifest in held_out_sets.items():
        if not manifest:
            continue
        if not Path(manifest).exists():
            log(f"{set_name} {manifest} does not exist yet: the training prompts are not checked against its "
                "speakers (get it first, e.g. stage -1 on a GPU machine, then rebuild the data with "
                "bash run.sh --force 0 0)")
            continue
        held += read_held_out(set_name, manifest)
        checked.append(f"{set_name} {manifest}")
    if not checked:
        return
    found = overlaps(prompts, held)
    shown = found[:MAX_NAMED] + ([f"... and {len(found) - MAX_NAMED} more"] if len(found) > MAX_NAMED else [])
    if found and allow:
        log(f"WARNING: {len(found)} training speaker prompt(s) are prompts of a held-out set; trained on all the "
            "same (allow_held_out_prompts=true):\n" + "\n".join(shown))
        return
    if found:
        raise HeldOutError(
            f"{len(found)} training speaker prompt(s) are prompts of a held-out set: training on them would "
            "train on the test speakers and inflate what stage 4 measures (nothing written):\n" + "\n".join(shown)
            + "\nFix: use a prompt set without these speakers (train_prompts), or drop these records' "
            "prompt_wav/prompt_text; eval_manifest and dev_manifest (configs/default.sh) name the held-out sets "
            "(allow_held_out_prompts=true trains on them anyway, for a task that evaluates in its training voices)")
    log(f"training speaker prompts: {len(prompts)} checked against the prompts of the {', '.join(checked)}: "
        "none shared")

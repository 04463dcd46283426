"""Zero-shot TTS test sets as they are published: Seed-TTS-eval, CosyVoice3-Eval, and our JSONL.

Every layout loads into ``EvalUtterance`` rows (the text to speak, and the prompt recording
whose voice it is to be spoken in, with that recording's transcript), each remembering the
``file:line`` it came from so errors can point at it. Prompt wav paths come out absolute.

Layouts (``detect_layout`` tells them apart):

- ``seed-tts``: a Seed-TTS-eval meta file (``zh/meta.lst``, ``en/meta.lst``,
  ``zh/hardcase.lst``), one ``utt|prompt_text|prompt_wav|text`` line per utterance, with an
  optional fifth field (the ground-truth wav of ``text``, unused here); prompt paths are
  relative to the meta file's folder (``prompt-wavs/...`` as published).
- ``cv3-eval``: a CosyVoice3-Eval (CV3-Eval) task folder such as ``data/zero_shot/zh``, in
  Kaldi style: ``text`` and ``prompt_text`` (``utt_id text`` lines) and ``prompt_wav.scp``
  (``utt_id path`` lines). As published, the scp paths are relative to the CV3-Eval
  checkout (``data/zero_shot//zh/waveform/prompt_audio_1.wav``); a relative path is looked
  up against the folder itself and then each folder above it, so both a whole checkout and
  a copy of just the task folder (with its ``waveform/``) work.
- ``jsonl``: one ``{"id", "text", "prompt_text"?, "prompt_wav"?, "prompt_tokens"?}`` object
  per line (``prompt_tokens``: the prompt's CosyVoice2 speech tokens, precomputed).

Where to get them (machines with internet): Seed-TTS-eval's test set is linked from its
repository's README (github.com/BytedanceSpeech/seed-tts-eval, a Google Drive archive
``seedtts_testset``; k2-fsa keeps a copy in the Hugging Face dataset
``k2-fsa/TTS_eval_datasets``, file ``seedtts_testset.tar.gz``); CV3-Eval is the repository
github.com/FunAudioLLM/CV3-Eval (``git clone``; the zero-shot Chinese set is its
``data/zero_shot/zh``).

``detect_language`` reads the texts: a set with at least as many Han characters as Latin
words is ``zh`` (scored by CER), else ``en`` (scored by WER); see ``ttsrl.protocol_scoring``.

Per-utterance language (``EvalUtterance.language``; "" when the set does not say, and the
scorer then detects it from the text, ``ttsrl.language``): a JSONL row's ``language`` field;
for CV3-Eval and Seed-TTS-eval, the name of the subset folder, as published: CV3-Eval's
``data/zero_shot/{zh,en,ja,ko,hard_zh,hard_en}`` and ``data/cross_lingual_zeroshot/to_{zh,en,ja,ko,
hard_zh,hard_en}`` (``hard_`` and ``to_`` are read past), Seed-TTS-eval's ``zh/`` and ``en/``.
A subset of a language we do not score on its own (CV3-Eval's de, es, fr, it, ru) gets "".
A declared language that is not one of ``ttsrl.language.LANGUAGES`` is an error naming
file:line.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from .language import language_of_counts, normalize_language, script_counts

LAYOUTS = ("seed-tts", "cv3-eval", "jsonl")
CV3_FILES = ("text", "prompt_text", "prompt_wav.scp")
_SUBSET_PREFIXES = re.compile(r"^(?:to_)?(?:hard_)?")


class EvalSetError(ValueError):
    """A test set that cannot be read; the message names the file and line."""


@dataclasses.dataclass
class EvalUtterance:
    id: str
    text: str
    prompt_text: str = ""
    prompt_wav: str = ""  # absolute path, or "" when the row has none
    prompt_tokens: list = dataclasses.field(default_factory=list)
    where: str = ""  # "file:line" of the row that defined it
    language: str = ""  # zh, en, ja, ko (ttsrl.language); "": not declared by the set
    row: dict | None = None  # a stage-0 row ({"extra_info", "messages"}): the policy reads the row's input


@dataclasses.dataclass
class EvalSet:
    path: str
    layout: str
    utterances: list
    language: str  # "zh" or "en"


def detect_layout(path: str) -> str:
    """``cv3-eval`` for a folder with a ``prompt_wav.scp``, ``jsonl`` for .jsonl/.json, else ``seed-tts``."""
    location = Path(path)
    if location.is_dir():
        if (location / "prompt_wav.scp").is_file():
            return "cv3-eval"
        raise EvalSetError(f"{path}: a folder but not a CV3-Eval task folder (no prompt_wav.scp); "
                           "give a Seed-TTS-eval meta.lst, a CV3-Eval folder such as data/zero_shot/zh, or a JSONL")
    if location.suffix in (".jsonl", ".json"):
        return "jsonl"
    return "seed-tts"


def detect_language(texts) -> str:
    """The protocol language of a whole set: zh or en (the two ``ttsrl.protocol_scoring`` scores)."""
    han = latin = 0
    for text in texts:
        counts = script_counts(text)
        han += counts["han"]
        latin += counts["latin"]
    return "zh" if han >= latin else "en"


def subset_language(folder: Path) -> str:
    """The language a published subset folder's name says (module doc), or ""."""
    name = _SUBSET_PREFIXES.sub("", folder.name.lower())
    try:
        return normalize_language(name)
    except ValueError:
        return ""


def utterance_languages(utterances) -> dict:
    """utt id -> language for every utterance: its declared one, else detected from its text."""
    return {u.id: u.language or language_of_counts(script_counts(u.text)) for u in utterances}


def _check_id(utt_id: str, where: str, seen: dict) -> None:
    if not utt_id:
        raise EvalSetError(f"{where}: empty utterance id")
    if "/" in utt_id or utt_id in (".", ".."):
        raise EvalSetError(f"{where}: utterance id {utt_id!r} cannot be a file name")
    if utt_id in seen:
        raise EvalSetError(f"{where}: duplicate utterance id {utt_id!r} (first at {seen[utt_id]})")
    seen[utt_id] = where


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalSetError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise EvalSetError(f"{path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def _read_seed_tts(path: Path) -> list:
    base = path.resolve().parent
    utterances = []
    for number, line in _lines(path):
        where = f"{path}:{number}"
        fields = line.split("|")
        if len(fields) not in (4, 5):
            raise EvalSetError(f"{where}: expected 'utt|prompt_text|prompt_wav|text' (and optionally "
                               f"'|ground_truth_wav'), got {len(fields)} fields")
        utt_id, prompt_text, prompt_wav, text = (f.strip() for f in fields[:4])
        utterances.append(EvalUtterance(utt_id, text, prompt_text,
                                        str((base / prompt_wav).resolve()) if prompt_wav else "", [], where,
                                        subset_language(base)))
    return utterances


def _read_jsonl(path: Path) -> list:
    base = path.resolve().parent
    utterances = []
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalSetError(f"{where}: malformed JSON: {error.msg}") from None
        if not isinstance(record, dict):
            raise EvalSetError(f"{where}: expected a JSON object")
        tokens = record.get("prompt_tokens") or []
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise EvalSetError(f"{where}: prompt_tokens must be a list of integers")
        text = record.get("text", "")
        if not isinstance(text, str):
            raise EvalSetError(f"{where}: text must be a string")
        prompt_wav = str(record.get("prompt_wav") or "")
        language = record.get("language")
        if language is not None:
            try:
                language = normalize_language(language, f'{where}: field "language"')
            except ValueError as error:
                raise EvalSetError(str(error)) from None
        utterances.append(EvalUtterance(str(record.get("id", "")), text, str(record.get("prompt_text") or ""),
                                        str((base / prompt_wav).resolve()) if prompt_wav else "", tokens, where,
                                        language or ""))
    return utterances


def _read_kaldi_map(path: Path) -> dict:
    """``utt_id value`` lines -> {utt_id: (value, "file:line")}."""
    table: dict = {}
    for number, line in _lines(path):
        utt_id, _, value = line.strip().partition(" ")
        where = f"{path}:{number}"
        if utt_id in table:
            raise EvalSetError(f"{where}: duplicate utterance id {utt_id!r} (first at {table[utt_id][1]})")
        table[utt_id] = (value.strip(), where)
    return table


def _resolve_cv3_wav(folder: Path, value: str) -> str:
    path = Path(value)
    if path.is_absolute():
        return str(path)
    for base in [folder, *folder.parents]:
        candidate = base / path
        if candidate.exists():
            return str(candidate.resolve())
    # Not found anywhere: report it relative to the folder; the prompt check names it.
    return str((folder / path).resolve())


def _read_cv3(folder: Path) -> list:
    folder = folder.resolve()
    missing = [name for name in CV3_FILES if not (folder / name).is_file()]
    if missing:
        raise EvalSetError(f"{folder}: a CV3-Eval task folder needs {', '.join(CV3_FILES)}; missing {', '.join(missing)}")
    texts = _read_kaldi_map(folder / "text")
    prompt_texts = _read_kaldi_map(folder / "prompt_text")
    wavs = _read_kaldi_map(folder / "prompt_wav.scp")
    utterances = []
    language = subset_language(folder)
    for utt_id, (text, where) in texts.items():
        prompt_text, _ = prompt_texts.get(utt_id, ("", ""))
        wav, wav_where = wavs.get(utt_id, ("", ""))
        if not wav and utt_id not in wavs:
            raise EvalSetError(f"{where}: utterance {utt_id!r} has no line in {folder / 'prompt_wav.scp'}")
        utterances.append(EvalUtterance(utt_id, text, prompt_text, _resolve_cv3_wav(folder, wav) if wav else "",
                                        [], where, language))
    extra = sorted(set(wavs) - set(texts))
    if extra:
        raise EvalSetError(f"{wavs[extra[0]][1]}: utterance {extra[0]!r} is not in {folder / 'text'}")
    return utterances


def load_eval_set(path: str, layout: str = "auto") -> EvalSet:
    """Read a test set (see the module doc); checks ids and texts, not the prompt audio."""
    location = Path(path)
    if not location.exists():
        raise EvalSetError(f"{path}: no such file or folder")
    if layout == "auto":
        layout = detect_layout(path)
    if layout not in LAYOUTS:
        raise EvalSetError(f"unknown test-set layout {layout!r}; expected one of {LAYOUTS} or auto")
    reader = {"seed-tts": _read_seed_tts, "cv3-eval": _read_cv3, "jsonl": _read_jsonl}[layout]
    utterances = reader(location)
    seen: dict = {}
    for utt in utterances:
        _check_id(utt.id, utt.where, seen)
        if not utt.text.strip():
            raise EvalSetError(f"{utt.where}: utterance {utt.id!r} has no text")
    if not utterances:
        raise EvalSetError(f"{path}: no utterances")
    return EvalSet(str(path), layout, utterances, detect_language(u.text for u in utterances))

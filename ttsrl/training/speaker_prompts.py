"""Speaker prompts of zero-shot training data (stage 0): read a prompt set, check every prompt,
pair texts with prompts, and get each prompt's speech tokens once.

A prompt is a recording (wav) and its transcript. Training rows in a prompt's voice carry
upstream CosyVoice's zero-shot LLM input (``ttsrl.frontend``), which needs
the prompt's speech tokens; those come from the reward server's ``speech_tokenizer``
model (the tokenizer of the model family the policy was converted from), batched, and are
kept in an on-disk cache keyed by the tokenizer and by the prompt's content
(``speaker_prompt_key``: sample rate, transcript and float32 samples). The tokenizer is
recognised by what it does: the tokens it gives a fixed probe wave (``tokenizer_fingerprint``,
one small request), so CosyVoice2's, CosyVoice3's and the stand-in's tokens never mix in one
cache, and a second run with the same prompts and tokenizer asks the server only that probe.

Prompt sets (``read_prompt_set``):

- a folder of ``*.wav`` files (searched recursively, sorted), each with its transcript in
  a sibling ``.txt`` (as the server's prompt bank: ``token2wav_server.prompt_bank``) or
  ``.lab`` file; a CV3-Eval task folder (with ``prompt_wav.scp``) is read as such;
- a ``.jsonl`` file: one ``{"prompt_wav" (or "wav"), "prompt_text" (or "text"),
  "id"?, "speaker"?}`` object per line, relative paths relative to the file's folder;
- anything else: a Seed-TTS-eval ``meta.lst`` (``utt|prompt_text|prompt_wav|text``; only
  the prompt columns are used), read by ``ttsrl.eval_sets``.

A prompt's speaker is its ``speaker`` field, else the name of the folder its wav is in,
else its id; ``pair_prompts`` balances texts across speakers.

Every check names the prompt's ``file:line`` (a folder entry: the wav's path) and why.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from ttsrl.atomic_write import write_json
from ttsrl.json_lines import json_lines

TOKENIZER_MODEL = "speech_tokenizer"
TOKENIZE_BATCH = 16
"""Prompts per ``tokenize`` call (the client splits them into requests of its own size)."""
CACHE_FORMAT = "ttsrl-prompt-tokens/2"
LEGACY_CACHE_FORMAT = "ttsrl-prompt-tokens/1"
"""A cache written before tokens were keyed by tokenizer: its entries are kept (under
``UNKNOWN_TOKENIZER``) and never used."""
UNKNOWN_TOKENIZER = "unknown: cached before the tokenizer was recorded"
PROBE_TOKEN_IDS = tuple(range(100, 6500, 256))
"""The probe wave's content: stand-in audio of these 25 ids (``token2wav_server.standin``), 1 s at
16 kHz; every speech tokenizer (real or stand-in) tokenizes it, each in its own way."""

# Reasons a prompt cannot be used (the keys of the counts stage 0 logs with --on_bad_prompt skip).
NOT_FOUND = "prompt wav not found"
UNREADABLE = "unreadable prompt wav"
TOO_SHORT = "prompt too short"
TOO_LONG = "prompt too long"
LOW_RATE = "prompt sample rate too low"
UNTRANSCRIBED = "untranscribed prompt"
NO_WAV = "no prompt wav"
MALFORMED = "malformed prompt entry"
DUPLICATE = "duplicate prompt id"
REFUSED = "refused by the speech tokenizer"


class PromptError(Exception):
    """Prompts cannot be prepared at all (no prompt set, no server); the message says why and the fix."""


@dataclasses.dataclass
class Prompt:
    wav: str  # absolute path
    text: str  # transcript, stripped
    id: str
    speaker: str
    where: str  # "file:line" of the entry (a folder entry: the wav's path)
    key: str = ""  # speaker_prompt_key of the samples, once read
    tokens: list | None = None  # speech token ids, once known


@dataclasses.dataclass
class PromptProblem:
    where: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"  # each detail says its reason in words


# ------------------------------------------------------------------ header checks

def wav_problem(path: str, max_seconds: float, min_seconds: float = 0.0) -> tuple[str, str] | None:
    """(reason, message) when the wav at ``path`` cannot be a prompt, judged from its header
    alone: missing, unreadable, empty, below the server's minimum sample rate, longer than
    ``max_seconds`` or shorter than ``min_seconds``; None if it can."""
    import soundfile

    from token2wav_server.prompt_bank import MIN_PROMPT_SAMPLE_RATE

    if not os.path.isfile(path):
        return NOT_FOUND, f"prompt wav {path} not found"
    try:
        info = soundfile.info(path)
    except (OSError, RuntimeError) as error:  # soundfile's LibsndfileError is a RuntimeError
        return UNREADABLE, f"cannot read prompt wav {path}: {error}"
    if info.frames <= 0:
        return UNREADABLE, f"prompt wav {path} has no samples"
    if info.samplerate < MIN_PROMPT_SAMPLE_RATE:
        return LOW_RATE, (f"prompt wav {path} is {info.samplerate} Hz, below the {MIN_PROMPT_SAMPLE_RATE} Hz "
                          "a prompt needs")
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        return TOO_LONG, (f"prompt wav {path} is {seconds:.1f} s long, over the maximum of "
                          f"{max_seconds:g} s (--max-prompt-seconds)")
    if seconds < min_seconds:
        return TOO_SHORT, (f"prompt wav {path} is {seconds:.2f} s long, under the minimum of "
                           f"{min_seconds:g} s for a speaker prompt")
    return None


def check_prompts(prompts: list[Prompt], min_seconds: float | None = None,
                  max_seconds: float | None = None) -> dict[int, PromptProblem]:
    """{position in ``prompts``: problem} for each prompt that cannot be used (wav header
    checks as ``wav_problem``, each distinct wav once; an empty transcript)."""
    from token2wav_server.prompt_bank import MAX_PROMPT_SECONDS, MIN_PROMPT_SECONDS

    min_seconds = MIN_PROMPT_SECONDS if min_seconds is None else min_seconds
    max_seconds = MAX_PROMPT_SECONDS if max_seconds is None else max_seconds
    header: dict[str, tuple[str, str] | None] = {}
    bad: dict[int, PromptProblem] = {}
    for position, prompt in enumerate(prompts):
        if prompt.wav not in header:
            header[prompt.wav] = wav_problem(prompt.wav, max_seconds, min_seconds)
        problem = header[prompt.wav]
        if problem is None and not prompt.text.strip():
            problem = UNTRANSCRIBED, f"prompt wav {prompt.wav} has no transcript (the text spoken in it)"
        if problem is not None:
            bad[position] = PromptProblem(prompt.where, *problem)
    return bad


# ------------------------------------------------------------------ prompt sets

def speaker_of(speaker, wav: str, prompt_id: str) -> str:
    if isinstance(speaker, (str, int)) and str(speaker).strip():
        return str(speaker).strip()
    return Path(wav).parent.name or prompt_id


def _folder_transcript(wav: Path) -> str:
    """The prompt bank's transcript rule (``.txt`` beside the wav, or a known CosyVoice
    asset), else a ``.lab`` beside it; "" when there is none."""
    from token2wav_server.prompt_bank import PromptBankError, _transcript_for

    lab = wav.with_suffix(".lab")
    if not wav.with_suffix(".txt").is_file() and lab.is_file():
        return lab.read_text(encoding="utf-8").strip()
    try:
        return _transcript_for(wav)
    except PromptBankError:
        return ""


def _read_folder(folder: Path) -> list[Prompt]:
    wavs = sorted(folder.rglob("*.wav"))
    if not wavs:
        raise PromptError(f"prompt set {folder}: no .wav files in this folder (give a folder of wavs with "
                          ".txt/.lab transcripts, a JSONL or a Seed-TTS-eval meta.lst)")
    prompts = []
    for wav in wavs:
        prompt_id = wav.relative_to(folder).with_suffix("").as_posix()
        path = str(wav.resolve())
        prompts.append(Prompt(path, _folder_transcript(wav), prompt_id, speaker_of(None, path, prompt_id), str(wav)))
    return prompts


def _read_jsonl(path: Path) -> tuple[list[Prompt], list[PromptProblem]]:
    base = path.resolve().parent
    prompts: list[Prompt] = []
    problems: list[PromptProblem] = []
    seen: dict[str, str] = {}
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PromptError(f"prompt set {path}: not UTF-8 text ({error})") from None
    for number, record, error in json_lines(content):
        where = f"{path}:{number}"
        if error is not None:
            problems.append(PromptProblem(where, MALFORMED, f"malformed JSON: {error.msg} (column {error.colno})"))
            continue
        if not isinstance(record, dict):
            problems.append(PromptProblem(where, MALFORMED, f"malformed entry: expected a JSON object, got a {type(record).__name__}"))
            continue
        wav = record.get("prompt_wav", record.get("wav"))
        text = record.get("prompt_text", record.get("text"))
        if not isinstance(wav, str) or not wav.strip():
            problems.append(PromptProblem(where, NO_WAV, 'no prompt wav: needs a string "prompt_wav" (or "wav")'))
            continue
        if text is not None and not isinstance(text, str):
            problems.append(PromptProblem(where, MALFORMED, 'malformed entry: "prompt_text" (or "text") must be a string'))
            continue
        wav_path = str((base / wav).resolve())
        prompt_id = str(record.get("id") or Path(wav).stem)
        if prompt_id in seen:
            problems.append(PromptProblem(where, DUPLICATE, f"duplicate prompt id {prompt_id!r} (first at {seen[prompt_id]})"))
            continue
        seen[prompt_id] = where
        prompts.append(Prompt(wav_path, (text or "").strip(), prompt_id,
                              speaker_of(record.get("speaker"), wav_path, prompt_id), where))
    return prompts, problems


def _read_eval_set(path: Path) -> list[Prompt]:
    """The prompt columns of a Seed-TTS-eval meta.lst or CV3-Eval folder, each wav once."""
    from ttsrl.eval_sets import EvalSetError, load_eval_set

    try:
        utterances = load_eval_set(str(path)).utterances
    except EvalSetError as error:
        raise PromptError(f"prompt set: {error}") from None
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for utt in utterances:
        if utt.prompt_wav in seen:
            continue
        seen.add(utt.prompt_wav)
        if not utt.prompt_wav:
            prompts.append(Prompt("", utt.prompt_text, utt.id, utt.id, utt.where))
            continue
        prompt_id = Path(utt.prompt_wav).stem
        prompts.append(Prompt(utt.prompt_wav, utt.prompt_text.strip(), prompt_id,
                              speaker_of(None, utt.prompt_wav, prompt_id), utt.where))
    return prompts


def read_prompt_set(source: str) -> tuple[list[Prompt], list[PromptProblem]]:
    """The prompts of a prompt set (see the module doc) and the entries that are not prompts
    (malformed lines, no wav, duplicate ids). Wavs are not opened here (``check_prompts``)."""
    path = Path(source)
    if not path.exists():
        raise PromptError(f"prompt set {source} not found (--train_prompts: a folder of wavs with transcripts, "
                          "a JSONL of prompt_wav/prompt_text, or a Seed-TTS-eval meta.lst)")
    if path.is_dir() and not (path / "prompt_wav.scp").is_file():
        prompts, problems = _read_folder(path), []
    elif path.is_file() and path.suffix in (".jsonl", ".json"):
        prompts, problems = _read_jsonl(path)
    else:
        prompts, problems = _read_eval_set(path), []
    for prompt in [p for p in prompts if not p.wav]:
        problems.append(PromptProblem(prompt.where, NO_WAV, "no prompt wav: the entry names none"))
    prompts = [p for p in prompts if p.wav]
    if not prompts and not problems:
        raise PromptError(f"prompt set {source} has no prompts")
    return prompts, problems


# ------------------------------------------------------------------ pairing

def pair_prompts(count: int, prompts: list[Prompt], seed: int) -> np.ndarray:
    """For ``count`` texts in order, the position in ``prompts`` of each one's prompt:
    texts go round the speakers in a seeded order, and each speaker's texts round that
    speaker's prompts in a seeded order, so the counts per speaker (and per prompt of one
    speaker) differ by at most one. Deterministic in (``seed``, prompts)."""
    if not prompts:
        raise ValueError("no prompts to pair texts with")
    by_speaker: dict[str, list[int]] = {}
    for position, prompt in enumerate(prompts):
        by_speaker.setdefault(prompt.speaker, []).append(position)
    speakers = sorted(by_speaker)
    rng = np.random.default_rng(seed)
    order = [speakers[i] for i in rng.permutation(len(speakers))]
    cycles = {s: np.asarray(by_speaker[s], dtype=np.int64)[rng.permutation(len(by_speaker[s]))] for s in speakers}
    row = np.arange(count, dtype=np.int64)
    turn = row // len(order)  # how many texts this text's speaker had before it
    out = np.empty(count, dtype=np.int64)
    for rank, speaker in enumerate(order):
        mine = row % len(order) == rank
        cycle = cycles[speaker]
        out[mine] = cycle[turn[mine] % len(cycle)]
    return out


# ------------------------------------------------------------------ speech tokens

class PromptTokenCache:
    """Speech tokens by tokenizer, then by ``speaker_prompt_key``, in one JSON file written atomically.

    The key is the prompt's content, not its path: a moved file keeps its tokens, an edited
    one gets new ones. ``use_tokenizer`` (``extract_tokens`` calls it with the server's
    ``tokenizer_fingerprint``) selects whose tokens ``get`` and ``put`` see: tokens of another
    tokenizer stay in the file, unused."""

    def __init__(self, path: str):
        self.path = path
        self.by_tokenizer: dict[str, dict[str, list[int]]] = {}
        self.tokenizer: str | None = None
        self.changed = False
        self.fetched = 0  # entries put since this cache was read
        if os.path.isfile(path):
            try:
                payload = json.loads(Path(path).read_text(encoding="utf-8"))
                if payload.get("format") == LEGACY_CACHE_FORMAT and isinstance(payload.get("tokens"), dict):
                    tables = {UNKNOWN_TOKENIZER: payload["tokens"]}
                elif payload.get("format") == CACHE_FORMAT and isinstance(payload.get("tokenizers"), dict):
                    tables = payload["tokenizers"]
                else:
                    raise ValueError(f"not a {CACHE_FORMAT} file")
                for tokenizer, table in tables.items():
                    if not isinstance(table, dict):
                        raise ValueError(f"tokenizer {tokenizer!r}: not a mapping of prompt keys to token ids")
                    for key, ids in table.items():
                        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                            raise ValueError(f"entry {key!r} is not a list of token ids")
                    self.by_tokenizer[tokenizer] = dict(table)
            except (ValueError, AttributeError, UnicodeDecodeError) as error:
                raise PromptError(f"prompt token cache {path} cannot be read ({error}): delete it (it is rebuilt "
                                  "from the reward server) or point --prompt_token_cache elsewhere") from None

    def use_tokenizer(self, tokenizer: str) -> None:
        self.tokenizer = tokenizer

    @property
    def tokens(self) -> dict[str, list[int]]:
        """The selected tokenizer's entries."""
        if self.tokenizer is None:
            raise RuntimeError("PromptTokenCache: call use_tokenizer first (extract_tokens does)")
        return self.by_tokenizer.setdefault(self.tokenizer, {})

    def get(self, key: str) -> list[int] | None:
        return self.tokens.get(key)

    def put(self, key: str, ids: list[int]) -> None:
        self.tokens[key] = [int(i) for i in ids]
        self.changed = True
        self.fetched += 1

    def save(self) -> None:
        if self.changed:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tables = {name: table for name, table in self.by_tokenizer.items() if table}
            write_json(self.path, {"format": CACHE_FORMAT, "tokenizers": tables})
            self.changed = False


def probe_wave() -> tuple[np.ndarray, int]:
    """The fixed wave ``tokenizer_fingerprint`` sends (stand-in audio, so the stand-in tokenizer reads it too)."""
    from token2wav_server import standin

    return standin.tokens_to_wave(list(PROBE_TOKEN_IDS), voice=3).astype(np.float32), standin.SAMPLE_RATE


def tokenizer_fingerprint(client, server_url: str) -> str:
    """The speech tokenizer behind ``client`` (a ``TritonModelClient`` of ``speech_tokenizer``), named
    by the tokens it gives the probe wave: the same tokenizer always gives the same name."""
    import hashlib

    wave, rate = probe_wave()
    try:
        (result,) = client.tokenize([wave], [rate])
    except Exception as error:  # transport errors: the server went away or timed out
        raise PromptError(f"the reward server at {server_url} failed to tokenize the probe wave that names its "
                          f"speech tokenizer: {error}") from None
    if isinstance(result, Exception) or not result:
        raise PromptError(f"the reward server at {server_url} refused the probe wave that names its speech "
                          f"tokenizer ({result or 'no tokens'}): is {TOKENIZER_MODEL!r} a speech tokenizer?")
    digest = hashlib.sha256(json.dumps([int(i) for i in result]).encode()).hexdigest()[:16]
    return f"{TOKENIZER_MODEL}:{digest}"


def read_prompt_wave(path: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and sample rate, read the way evaluation reads prompts."""
    from ttsrl.evaluation.outputs import read_wave

    wave, rate = read_wave(Path(path))
    return np.asarray(wave, dtype=np.float32), int(rate)


def extract_tokens(prompts: list[Prompt], server_url: str, cache: PromptTokenCache,
                   batch_size: int = TOKENIZE_BATCH) -> dict[int, PromptProblem]:
    """Give every prompt its ``key`` and ``tokens`` (in place): from ``cache`` (the entries of the
    server's tokenizer, ``tokenizer_fingerprint``), else from the server's ``speech_tokenizer`` in
    batches of ``batch_size`` (then cached). Returns {position: problem} for prompts that cannot be
    read or that the server refused; raises PromptError when the server is not ready or fails as a
    whole. The cache keeps what was fetched, even then."""
    from ttsrl.triton_client import TritonModelClient, speaker_prompt_key
    from ttsrl.triton_client.ready import readiness_problem

    bad: dict[int, PromptProblem] = {}
    pending: list[tuple[int, np.ndarray, int]] = []
    if not prompts:
        return bad
    problem = readiness_problem(server_url, model=TOKENIZER_MODEL)
    if problem is not None:
        first = prompts[0]
        raise PromptError(
            f"{first.where}: prompt {first.wav} needs speech tokens, but the reward server at {server_url} "
            f"{problem}: start the reward server first (run.sh stage 1) or point --server_url at one "
            f"(its speech tokenizer also names the tokens cached in {cache.path})")
    client = TritonModelClient(server_url, TOKENIZER_MODEL)

    def flush() -> None:
        first = prompts[pending[0][0]]
        try:
            results = client.tokenize([wave for _, wave, _ in pending], [rate for _, _, rate in pending])
        except Exception as error:  # transport errors: the server went away or timed out
            raise PromptError(f"{first.where}: the reward server at {server_url} failed while tokenizing prompt "
                              f"{first.wav} (and {len(pending) - 1} more of its batch): {error}") from None
        for (position, _, _), result in zip(pending, results):
            prompt = prompts[position]
            if isinstance(result, Exception) or not result:
                why = result if isinstance(result, Exception) else "no speech tokens"
                bad[position] = PromptProblem(prompt.where, REFUSED,
                                              f"{server_url} model {TOKENIZER_MODEL!r} refused prompt {prompt.wav}: {why}")
            else:
                prompt.tokens = [int(i) for i in result]
                cache.put(prompt.key, prompt.tokens)
        pending.clear()

    try:
        cache.use_tokenizer(tokenizer_fingerprint(client, server_url))
        for position, prompt in enumerate(prompts):
            try:
                wave, rate = read_prompt_wave(prompt.wav)
            except (OSError, RuntimeError) as error:  # soundfile raises LibsndfileError (a RuntimeError)
                bad[position] = PromptProblem(prompt.where, UNREADABLE, f"cannot read prompt wav {prompt.wav}: {error}")
                continue
            prompt.key = speaker_prompt_key(wave, rate, prompt.text)
            cached = cache.get(prompt.key)
            if cached is not None:
                prompt.tokens = list(cached)
                continue
            # Only waves waiting for the server are held in memory (per-record prompts can be many).
            pending.append((position, wave, rate))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    finally:
        client.close()
        cache.save()
    return bad

"""Stage 0 as a library: JSON/JSONL text records -> the veRL RL tables (train, test) and a dev set.

``prepare()`` is the whole stage (the ``prepare_data.py`` CLI is a thin wrapper over it):
read and validate each input (``read_records``: Arrow's JSON reader when it can vouch for
the file, else the line-by-line reader that names file:line of every bad record),
optionally drop duplicate texts, give texts their speaker prompts (the record's own
``prompt_wav``/``prompt_text``, or one paired from a prompt set; checked, and tokenized
once by the reward server: ``ttsrl.training.speaker_prompts``), split off a seeded test
set and dev slice, build each table (``build_table``: veRL's RL schema, see
prepare_data.py; text-only tables column-wise from Arrow arrays) and write every output
so that none appears before all are complete.

A record's optional ``language`` (zh, en, ja, ko or an alias such as ``cmn`` or ``en-US``:
``ttsrl.language.normalize_language``) is checked and copied, normalized, into its row's
``extra_info["language"]``, where the reward hook reads it to pick the error metric; an
unknown language is a bad record named by file:line. Without it the hook detects the
language from the text.

The policy reads what upstream CosyVoice's ``inference_zero_shot`` would feed its LLM
(``ttsrl.frontend``): each text is normalized as upstream normalizes it, and a text that
normalizes to nothing to say, or that upstream would synthesize in several LLM calls (over
its 60-80 character/token segments), is a bad record named by file:line. A row's
``extra_info`` keeps the raw ``text`` (the reward's and the evaluation's reference, as
Seed-TTS-eval scores against the raw text) and adds ``normalized_text`` (what the policy
reads), ``llm_prompt_text`` (the prompt text as the family's LLM reads it, normalized), the
row's ``model_family`` and, when stage 0 is given the policy's tokenizer, ``text_tokens``
(the normalized text's token count, from which the length bounds follow). The prompt speech
tokens are trimmed as upstream trims them for its 24 kHz models. The ``prompt`` messages
hold the same strings (user: llm_prompt_text + normalized_text; assistant: the prompt speech
tokens); the ids the policy reads are built from them by ``ttsrl.frontend`` (prompt text and
text tokenized apart). Rows whose text is shorter than half their prompt text's (upstream
warns that this may lead to bad performance) are counted and logged per split.

A record's optional ``emotion`` (the target of the ``emotion`` reward component: one of
``token2wav_server.engines_emotion2vec.TARGET_LABELS``, the emotions the emotion2vec+ model
knows) is checked and copied, in lower case, into ``extra_info["emotion"]``; a label the model
does not know is a bad record named by file:line.
"""
from __future__ import annotations

import contextlib
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ttsrl.atomic_write import atomic_file
from ttsrl.chat_template import prompt_messages
from ttsrl.frontend import (FrontendError, TextNormalizer, default_normalizer, llm_prompt_text, short_text,
                            trim_prompt_tokens)
from ttsrl.json_lines import json_lines
from ttsrl.language import normalize_language
from ttsrl.model_family import ModelFamily, family_from_env, get_family
from ttsrl.speech_tokens import format_speech_tokens
from ttsrl.training import held_out
from ttsrl.training import speaker_prompts as sp
from token2wav_server.engines_emotion2vec import check_target as check_emotion

ABILITY = "text-to-speech"
OPTIONAL_FIELDS = ("id", "prompt_text", "prompt_wav", "language", "emotion")
PROMPT_FIELDS = ("prompt_text", "prompt_wav")
PROMPT_INFO = ("prompt_wav", "prompt_text", "prompt_id", "prompt_hash")
"""extra_info keys of a zero-shot row (null in the text-only rows of a table that has both)."""
MAX_REPORTED_ERRORS = 20
DEV_FILE = "dev.jsonl"
ON_BAD_PROMPT = ("fail", "skip")
NOTHING_TO_SCORE = "nothing to score after normalization"
NOTHING_TO_SAY = "nothing to say after upstream's text normalization"
SEVERAL_CALLS = "several LLM calls upstream"
NOT_NORMALIZABLE = "text upstream's frontend cannot normalize"
_LETTER_OR_NUMBER = r"[\p{L}\p{N}]"
"""A text with a letter or number keeps a word through the scorer's normalization (NFKC maps
no letter or number to punctuation or symbols alone); only the others need ``nothing_to_score``."""
_PROMPT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class DataError(Exception):
    """Input records are invalid; the message lists them."""


@dataclass
class Records:
    """Validated records of one input file, as Arrow arrays."""

    text: pa.Array
    optional: dict[str, pa.Array] = field(default_factory=dict)
    path: str = ""
    lines: np.ndarray | None = None  # file line of each record (line reader); None from the fast reader
    prompt: np.ndarray | None = None  # each record's position in the run's prompt list, -1: text-only
    normalized: pa.Array | None = None  # the text as upstream's frontend normalizes it (one segment)

    def __len__(self) -> int:
        return len(self.text)

    def take(self, indices) -> "Records":
        indices = np.asarray(indices, dtype=np.int64)
        arrow = pa.array(indices, type=pa.int64())
        return Records(self.text.take(arrow), {k: v.take(arrow) for k, v in self.optional.items()}, self.path,
                       None if self.lines is None else self.lines[indices],
                       None if self.prompt is None else self.prompt[indices],
                       None if self.normalized is None else self.normalized.take(arrow))

    def where(self, row: int) -> str:
        return f"{self.path}:{self.lines[row]}" if self.lines is not None else f"{self.path} (record {row + 1})"


@dataclass
class Problem:
    path: str
    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.detail}"


def nothing_to_score(text: str) -> bool:
    """Whether ``text`` is empty after the scorer's normalization, so the reward server would
    refuse it as a ground truth (``reward_scoring.score_item`` raises EmptyReferenceError).
    A cheap test first: the scorer removes only punctuation, symbols and whitespace after
    NFKC, so a text with any other character after NFKC keeps something; the rest are
    asked of the scorer itself (``ttsrl.scoring.align``)."""
    normalized = unicodedata.normalize("NFKC", text)
    if any(unicodedata.category(char)[0] not in "PSZC" for char in normalized):
        return False
    from ttsrl.scoring import METRICS, EmptyReferenceError, align

    for metric in METRICS:
        try:
            align(text, "", metric)
        except EmptyReferenceError:
            return True
    return False


def _check_text(value, max_chars: int | None) -> tuple[str, str] | None:
    """None if ``value`` is a usable text, else (reason, detail)."""
    if value is None:
        return "missing text", 'no "text" field'
    if not isinstance(value, str):
        return "non-string text", f'"text" is {type(value).__name__} {json.dumps(value, ensure_ascii=False)[:60]}'
    if not value.strip():
        return "empty text", f'"text" is {json.dumps(value)}'
    if max_chars is not None and len(value) > max_chars:
        return "text too long", f"{len(value)} characters > --max_chars {max_chars}"
    if nothing_to_score(value):
        return NOTHING_TO_SCORE, (f'"text" is {json.dumps(value, ensure_ascii=False)[:60]}: the reward server '
                                  "scores no word of it (punctuation and symbols only); drop or fix the record")
    return None


def _iter_json_array(content: str, path: str):
    """Yield (line, record) for the elements of a JSON array, with the line each starts on."""
    decoder = json.JSONDecoder()
    position = content.index("[") + 1
    line = content.count("\n", 0, position) + 1
    length = len(content)

    def skip_space(pos: int) -> int:
        nonlocal line
        while pos < length and content[pos] in " \t\r\n":
            line += content[pos] == "\n"
            pos += 1
        return pos

    position = skip_space(position)
    if position < length and content[position] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(content, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: malformed JSON: {error.msg} (column {error.colno}); "
                            "a JSON array input must parse as a whole") from None
        yield line, record
        line += content.count("\n", position, end)
        position = skip_space(end)
        if position < length and content[position] == ",":
            position = skip_space(position + 1)
            continue
        if position < length and content[position] == "]":
            return
        raise DataError(f"{path}:{line}: malformed JSON array: expected ',' or ']'")


def _iter_jsonl(content: str, path: str, problems: list[Problem]):
    for number, record, error in json_lines(content):
        if error is not None:
            problems.append(Problem(path, number, "malformed JSON", f"{error.msg} (column {error.colno})"))
        else:
            yield number, record


def read_records_by_line(path: str, max_chars: int | None) -> tuple[Records, list[Problem]]:
    """The line-by-line reader: every record's file line is known for error messages."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    problems: list[Problem] = []
    stripped = content.lstrip()
    records = _iter_json_array(content, path) if stripped.startswith("[") else _iter_jsonl(content, path, problems)
    texts: list[str] = []
    lines: list[int] = []
    optional: dict[str, list] = {name: [] for name in OPTIONAL_FIELDS}
    for line, record in records:
        if not isinstance(record, dict):
            problems.append(Problem(path, line, "not an object", f"record is a JSON {type(record).__name__}"))
            continue
        bad = _check_text(record.get("text"), max_chars)
        if bad is None:
            wrong = [name for name in PROMPT_FIELDS if record.get(name) is not None and not isinstance(record[name], str)]
            if wrong:
                bad = "non-string prompt field", f'"{wrong[0]}" is {type(record[wrong[0]]).__name__}, not a string'
        if bad is None and record.get("language") is not None:
            try:
                record["language"] = normalize_language(record["language"], 'field "language"')
            except ValueError as error:
                bad = "bad language", str(error)
        if bad is None and record.get("emotion") is not None:
            try:
                record["emotion"] = check_emotion(record["emotion"], 'field "emotion"')
            except ValueError as error:
                bad = "unknown emotion", str(error)
        if bad is not None:
            problems.append(Problem(path, line, *bad))
            continue
        texts.append(record["text"])
        lines.append(line)
        for name in OPTIONAL_FIELDS:
            value = record.get(name)
            optional[name].append(None if value is None else str(value))
    carried = {name: pa.array(values, type=pa.string()) for name, values in optional.items()
               if any(v is not None for v in values)}
    return Records(pa.array(texts, type=pa.string()), carried, path, np.asarray(lines, dtype=np.int64)), problems


def read_records_fast(path: str, max_chars: int | None) -> Records | None:
    """Arrow's JSONL reader; None when the file needs the line-by-line reader."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        return None
    try:
        table = pa_json.read_json(path)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    names = table.column_names
    if "text" not in names or not pa.types.is_string(table.schema.field("text").type):
        return None
    text = table.column("text").combine_chunks()
    invalid = pc.or_kleene(pc.is_null(text),
                           pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0))
    if max_chars is not None:
        invalid = pc.or_kleene(invalid, pc.greater(pc.utf8_length(text), max_chars))
    if pc.any(invalid).as_py():
        return None
    no_word = pc.invert(pc.match_substring_regex(text, _LETTER_OR_NUMBER))
    if pc.any(no_word).as_py() and any(nothing_to_score(value) for value in text.filter(no_word).to_pylist()):
        return None  # the line reader names each such record's file:line
    optional = {}
    for name in OPTIONAL_FIELDS:
        if name in names:
            column = table.column(name).combine_chunks()
            if not (pa.types.is_string(column.type) or pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
                return None
            if column.null_count < len(column):
                if name in PROMPT_FIELDS:
                    return None  # per-record prompts: their errors must name file:line
                column = column.cast(pa.string())
                if name == "language":
                    try:
                        column = pa.array([None if v is None else normalize_language(v) for v in column.to_pylist()],
                                          type=pa.string())
                    except ValueError:
                        return None  # the line reader names the record's file:line
                if name == "emotion":
                    try:
                        column = pa.array([None if v is None else check_emotion(v, "emotion")
                                           for v in column.to_pylist()], type=pa.string())
                    except ValueError:
                        return None  # the line reader names the record's file:line
                optional[name] = column
    return Records(text, optional, path)


@dataclass
class TextFrontend:
    """How stage 0 normalizes texts: upstream's normalizer and, when given, the policy's
    tokenizer (it measures non-Chinese segments, and gives ``text_tokens``)."""

    normalizer: TextNormalizer
    family: ModelFamily
    tokenizer: object = None
    _cache: dict = field(default_factory=dict)

    def tokenize(self, text: str) -> list:
        return list(self.tokenizer([text])["input_ids"][0]) if text else []

    def segments(self, text: str) -> tuple[list | None, tuple[str, str] | None]:
        """(upstream's segments of ``text``, None) or (None, (reason, detail)), each text once."""
        if text not in self._cache:
            try:
                segments = self.normalizer.normalize(text, split=True,
                                                     tokenize=self.tokenize if self.tokenizer is not None else None)
            except FrontendError as error:
                self._cache[text] = None, (NOT_NORMALIZABLE, str(error))
            else:
                quoted = json.dumps(text, ensure_ascii=False)[:60]
                if not segments or not any(segments):
                    self._cache[text] = None, (NOTHING_TO_SAY, f'"text" is {quoted}: upstream\'s text frontend '
                                                               "leaves no segment to synthesize; drop or fix the record")
                elif len(segments) > 1:
                    self._cache[text] = None, (SEVERAL_CALLS, f'"text" is {quoted}...: upstream synthesizes it as '
                                                              f"{len(segments)} separate LLM inputs ({segments[0][:20]}... "
                                                              "and more); give each as a record of its own")
                else:
                    self._cache[text] = segments, None
        return self._cache[text]

    def prompt_text(self, transcript: str, text: str = "") -> str:
        """The prompt text as the family's LLM reads it, normalized (FrontendError: cannot be)."""
        prompt = llm_prompt_text(self.family, transcript, text)
        if not prompt:
            return ""
        return self.normalizer.normalize(prompt, split=False,
                                         tokenize=self.tokenize if self.tokenizer is not None else None)


def normalize_records(records: Records, frontend: TextFrontend) -> tuple[list[Problem], list[int]]:
    """Set ``records.normalized``; (problems at the records' lines, their rows)."""
    problems, rows, normalized = [], [], []
    for row, text in enumerate(records.text.to_pylist()):
        segments, bad = frontend.segments(text)
        if bad is not None:
            line = records.lines[row] if records.lines is not None else row + 1
            problems.append(Problem(records.path, int(line), *bad))
            rows.append(row)
        normalized.append(segments[0] if segments else None)
    records.normalized = pa.array(normalized, type=pa.string())
    return problems, rows


def read_records(path: str, max_chars: int | None, fast: bool = True,
                 frontend: TextFrontend | None = None) -> tuple[Records, list[Problem]]:
    """Read and check ``path``; with ``frontend`` also normalize each text (bad ones are
    problems and left out)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if fast:
        records = read_records_fast(path, max_chars)
        if records is not None:
            if frontend is None or not normalize_records(records, frontend)[0]:
                return records, []
            # a text upstream cannot use: the line reader names its file:line
    records, problems = read_records_by_line(path, max_chars)
    if frontend is not None:
        bad, rows = normalize_records(records, frontend)
        if bad:
            problems = sorted(problems + bad, key=lambda p: p.line)
            records = _drop_rows(records, rows)
    return records, problems


def deduplicate(records: Records) -> tuple[Records, int]:
    """Keep the first record of each distinct text."""
    rows = pa.table({"text": records.text, "row": pa.array(np.arange(len(records), dtype=np.int64))})
    first = rows.group_by("text", use_threads=False).aggregate([("row", "min")]).column("row_min")
    keep = np.sort(first.to_numpy())
    return records.take(keep), len(records) - len(keep)


def split_test(records: Records, test_size: int, seed, flag: str = "--test_size") -> tuple[Records, Records]:
    """Deterministic split: ``test_size`` rows chosen by a seeded permutation; both keep file order."""
    if test_size >= len(records):
        raise DataError(f"{flag} {test_size} leaves no training data ({len(records)} valid records)")
    chosen = np.random.default_rng(seed).permutation(len(records))[:test_size]
    is_test = np.zeros(len(records), dtype=bool)
    is_test[chosen] = True
    return records.take(np.flatnonzero(~is_test)), records.take(np.flatnonzero(is_test))


def _constant(value: str, n: int) -> pa.Array:
    return pa.array([value], type=pa.string()).take(pa.array(np.zeros(n, dtype=np.int64)))


def build_table(records: Records, split: str, data_source: str, prompts: list | None = None,
                frontend: TextFrontend | None = None, log=None) -> pa.Table:
    """veRL RL rows for one split. ``prompts``: the run's speaker prompts (``records.prompt``
    indexes them, their tokens already trimmed); ``frontend``: how texts are normalized (default:
    upstream's normalizer for ``$TTSRL_MODEL_FAMILY``, no tokenizer). Each row's messages hold
    the policy's input as strings (module doc); ``extra_info`` the raw and normalized texts and
    the prompt's identity. ``log``: where the count of texts shorter than half their prompt
    text goes."""
    frontend = frontend or TextFrontend(default_normalizer(), family_from_env())
    if records.normalized is None:
        bad, _ = normalize_records(records, frontend)
        if bad:
            raise DataError(format_problems(bad))
    n = len(records)
    text = records.text
    normalized = records.normalized.to_pylist()
    index = records.prompt if records.prompt is not None else np.full(n, -1, dtype=np.int64)
    zero_shot = bool((index >= 0).any())
    llm_prompts: dict = {}
    users, assistants, prompt_texts, short = [], [], [], 0
    for raw, segment, position in zip(text.to_pylist(), normalized, index.tolist()):
        prompt = prompts[position] if position >= 0 else None
        key = (position, "<|endofprompt|>" in raw)
        if key not in llm_prompts:
            try:
                llm_prompts[key] = frontend.prompt_text(prompt.text if prompt else "", raw)
            except FrontendError as error:
                raise DataError(f"{prompt.where}: the prompt transcript cannot be normalized: {error}") from None
        llm = llm_prompts[key]
        prompt_texts.append(llm)
        users.append(llm + segment)
        assistants.append(format_speech_tokens(prompt.tokens) if prompt else "")
        short += bool(prompt and short_text(segment, llm))
    if short and log is not None:
        log(f"{split}: {short} of {n} texts are shorter than half their prompt text (upstream CosyVoice warns that "
            "this may lead to bad performance)")
    prompt_column = pa.array([prompt_messages(u, a) for u, a in zip(users, assistants)], type=_PROMPT_TYPE)
    reward_model = pa.StructArray.from_arrays([_constant("rule", n), text], names=["style", "ground_truth"])
    carried = {k: v for k, v in records.optional.items() if k not in PROMPT_FIELDS}
    text_tokens = [None] * n
    if frontend.tokenizer is not None and n:
        text_tokens = [len(ids) for ids in frontend.tokenizer(normalized)["input_ids"]]
    info_names = ["split", "index", "text", "normalized_text", "llm_prompt_text", "model_family", "text_tokens"] \
        + list(carried)
    info_arrays = [_constant(split, n), pa.array(np.arange(n, dtype=np.int64)), text, records.normalized,
                   pa.array(prompt_texts, type=pa.string()), _constant(frontend.family.name, n),
                   pa.array(text_tokens, type=pa.int64())] + list(carried.values())
    if zero_shot:
        take = pa.array(np.where(index >= 0, index, len(prompts)))  # the extra last entry: null
        for name, values in (("prompt_wav", [p.wav for p in prompts]), ("prompt_text", [p.text for p in prompts]),
                             ("prompt_id", [p.id for p in prompts]), ("prompt_hash", [p.key for p in prompts])):
            info_names.append(name)
            info_arrays.append(pa.array(values + [None], type=pa.string()).take(take))
    extra_info = pa.StructArray.from_arrays(info_arrays, names=info_names)
    return pa.table({
        "data_source": _constant(data_source, n),
        "prompt": prompt_column,
        "ability": _constant(ABILITY, n),
        "reward_model": reward_model,
        "extra_info": extra_info,
    })


def dev_manifest(records: Records, prompts: list) -> str:
    """The dev slice in ``ttsrl.eval_sets``' JSONL layout (id, text, prompt_text, prompt_wav,
    prompt_tokens, and language where the record declares one), which stage 4 evaluates to
    choose the best step. Ids: the records' own when every dev record has a distinct one that
    is a valid file name, else dev00000..."""
    n = len(records)
    ids = records.optional["id"].to_pylist() if "id" in records.optional else [None] * n
    if any(i is None or not i or "/" in i or i in (".", "..") for i in ids) or len(set(ids)) < n:
        ids = [f"dev{row:05d}" for row in range(n)]
    languages = records.optional["language"].to_pylist() if "language" in records.optional else [None] * n
    index = records.prompt if records.prompt is not None else np.full(n, -1, dtype=np.int64)
    lines = []
    for row, (utt_id, text, position) in enumerate(zip(ids, records.text.to_pylist(), index.tolist())):
        prompt = prompts[position] if position >= 0 else None
        line = {"id": utt_id, "text": text, "prompt_text": prompt.text if prompt else "",
                "prompt_wav": prompt.wav if prompt else "", "prompt_tokens": list(prompt.tokens) if prompt else []}
        if languages[row]:
            line["language"] = languages[row]
        lines.append(json.dumps(line, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def write_tables_atomically(tables: dict[str, pa.Table], local_dir: str, texts: dict[str, str] | None = None) -> list[str]:
    """Write every table as ``local_dir/NAME.parquet`` and every text as ``local_dir/NAME``; each
    file is renamed into place only when all of them are written (so a failure leaves the
    previous outputs, never a new train.parquet beside an old test.parquet or dev.jsonl)."""
    os.makedirs(local_dir, exist_ok=True)
    texts = texts or {}
    paths = [os.path.join(local_dir, f"{name}.parquet") for name in tables]
    text_paths = [os.path.join(local_dir, name) for name in texts]
    with contextlib.ExitStack() as written:
        temporaries = [written.enter_context(atomic_file(path)) for path in paths + text_paths]
        for table, temporary in zip(tables.values(), temporaries):
            pq.write_table(table, temporary)
        for content, temporary in zip(texts.values(), temporaries[len(paths):]):
            temporary.write_text(content, encoding="utf-8")
    return paths + text_paths


def format_problems(problems: list, what: str = "invalid records") -> str:
    lines = [str(p) for p in problems[:MAX_REPORTED_ERRORS]]
    if len(problems) > MAX_REPORTED_ERRORS:
        lines.append(f"... and {len(problems) - MAX_REPORTED_ERRORS} more {what}")
    return "\n".join(lines)


def count_by_reason(problems: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.reason] = counts.get(problem.reason, 0) + 1
    return counts


def _reasons(problems: list) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(count_by_reason(problems).items()))


# ------------------------------------------------------------------ speaker prompts

@dataclass
class PromptPlan:
    """The run's speaker prompts: every distinct prompt (records' own, then the prompt set's),
    and which of them the prompt set offers for pairing."""

    prompts: list = field(default_factory=list)
    pairable: list = field(default_factory=list)  # positions in ``prompts`` (prompt-set entries)
    source: str = ""


def _attach_record_prompts(records: Records, plan: PromptPlan, index_of: dict) -> list:
    """Set ``records.prompt`` from the records' own prompt_wav/prompt_text (paths relative to
    the records' file); returns (row, problem) for records whose prompt is incomplete."""
    n = len(records)
    records.prompt = np.full(n, -1, dtype=np.int64)
    wavs = records.optional.get("prompt_wav")
    texts = records.optional.get("prompt_text")
    if wavs is None and texts is None:
        return []
    wavs = wavs.to_pylist() if wavs is not None else [None] * n
    texts = texts.to_pylist() if texts is not None else [None] * n
    base = Path(records.path).resolve().parent
    bad = []
    for row, (wav, text) in enumerate(zip(wavs, texts)):
        # Empty strings mean "no prompt", as in the eval-set JSONL layout (dev.jsonl's text-only rows).
        wav = wav if wav and wav.strip() else None
        text = text if text and text.strip() else None
        if wav is None and text is None:
            continue
        if wav is None:
            bad.append((row, sp.PromptProblem(records.where(row), sp.NO_WAV,
                                              'no prompt wav: the record has a "prompt_text" but no "prompt_wav"')))
            continue
        path = str((base / wav).resolve())
        key = (path, (text or "").strip())
        if key not in index_of:
            index_of[key] = len(plan.prompts)
            plan.prompts.append(sp.Prompt(path, key[1], Path(wav).stem, Path(wav).stem, records.where(row)))
        records.prompt[row] = index_of[key]
    return bad


def _record_problems(records: Records, bad_prompts: dict) -> list:
    """(row, problem at the record's own line) for each record whose prompt is bad."""
    return [(row, sp.PromptProblem(records.where(row), bad_prompts[p].reason, bad_prompts[p].detail))
            for row, p in enumerate(records.prompt.tolist()) if p in bad_prompts]


def _drop_rows(records: Records, rows) -> Records:
    keep = np.ones(len(records), dtype=bool)
    keep[list(rows)] = False
    return records.take(np.flatnonzero(keep))


def _handle_bad_prompts(splits: dict, record_bad: dict, set_bad: list, on_bad_prompt: str, log) -> dict:
    """Fail listing every bad prompt (file:line and why), or drop the records / prompt-set
    entries they belong to and log the counts by reason."""
    record_problems = [problem for name in splits
                       for _, problem in sorted(record_bad.get(name, []), key=lambda item: item[0])]
    if not record_problems and not set_bad:
        return splits
    if on_bad_prompt == "fail":
        problems = record_problems + set_bad
        raise DataError(f"{len(problems)} bad speaker prompts (nothing written; --on_bad_prompt skip skips "
                        "them):\n" + format_problems(problems, "bad speaker prompts"))
    if record_problems:
        log(f"skipped {len(record_problems)} records with a bad speaker prompt ({_reasons(record_problems)})")
    if set_bad:
        log(f"skipped {len(set_bad)} prompts of the prompt set ({_reasons(set_bad)})")
    return {name: _drop_rows(records, [row for row, _ in record_bad.get(name, [])]) for name, records in splits.items()}


def _prepare_prompts(splits: dict, train_prompts: str | None, on_bad_prompt: str, server_url: str | None,
                     cache_path: str, log, held_out_sets: dict | None = None,
                     allow_held_out: bool = False) -> tuple[dict, PromptPlan]:
    """Attach, check and tokenize every speaker prompt the splits use or may be paired with."""
    plan = PromptPlan(source=train_prompts or "")
    index_of: dict = {}
    record_bad = {name: _attach_record_prompts(records, plan, index_of) for name, records in splits.items()}
    own = len(plan.prompts)
    set_bad: list = []
    if train_prompts:
        entries, set_bad = sp.read_prompt_set(train_prompts)
        plan.pairable = list(range(own, own + len(entries)))
        plan.prompts.extend(entries)
    if not plan.prompts and not any(record_bad.values()):
        return splits, plan  # text-only
    header_bad = sp.check_prompts(plan.prompts)
    for name, records in splits.items():
        record_bad[name] += _record_problems(records, {p: b for p, b in header_bad.items() if p < own})
    set_bad += [b for p, b in header_bad.items() if p >= own]
    splits = _handle_bad_prompts(splits, record_bad, set_bad, on_bad_prompt, log)
    plan.pairable = [p for p in plan.pairable if p not in header_bad]
    # no training on the test speakers: the prompt set and the train file's own prompts (ttsrl.training.held_out)
    training = sorted({p for p in splits["train"].prompt.tolist() if p >= 0} | set(plan.pairable))
    held_out.check_held_out([plan.prompts[p] for p in training], held_out_sets or {}, log, allow_held_out)

    used = sorted({p for records in splits.values() for p in records.prompt.tolist() if p >= 0} | set(plan.pairable))
    if train_prompts and not plan.pairable:
        raise DataError(f"prompt set {train_prompts}: no usable prompt left; nothing written")
    if not used:
        return splits, plan
    url = server_url or _default_server_url()
    cache = sp.PromptTokenCache(cache_path)
    wanted = [plan.prompts[p] for p in used]
    token_bad = sp.extract_tokens(wanted, url, cache)
    fetched = cache.fetched
    refused = {used[position]: problem for position, problem in token_bad.items()}
    record_bad = {name: _record_problems(records, {p: b for p, b in refused.items() if p < own})
                  for name, records in splits.items()}
    set_bad = [b for p, b in refused.items() if p >= own]
    splits = _handle_bad_prompts(splits, record_bad, set_bad, on_bad_prompt, log)
    plan.pairable = [p for p in plan.pairable if p not in refused]
    if train_prompts and not plan.pairable:
        raise DataError(f"prompt set {train_prompts}: no usable prompt left; nothing written")
    log(f"speaker prompts: {len(used) - len(refused)} with speech tokens ({fetched} from the speech tokenizer at "
        f"{url}, the rest from {cache_path})")
    _trim_prompt_tokens(plan.prompts, [p for p in used if p not in refused])
    return splits, plan


def text_frontend(model_family=None, tokenizer=None) -> TextFrontend:
    """Stage 0's ``TextFrontend``: upstream's normalizer, the family (checked against a
    tokenizer folder's), and the tokenizer loaded from a folder when one is named."""
    family = get_family(model_family) if model_family is not None else family_from_env()
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from ttsrl.model_family import WrongFamilyError, check_family, family_of_hf_dir

        try:
            check_family(family, family_of_hf_dir(tokenizer), tokenizer)
        except (WrongFamilyError, ValueError) as error:
            raise DataError(f"--tokenizer: {error}") from None
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return TextFrontend(default_normalizer(), family, tokenizer)


def _trim_prompt_tokens(prompts: list, positions) -> None:
    """Each used prompt's speech tokens as upstream keeps them for the LLM (and the flow):
    ``min(mel_frames // 2, tokens)`` of its wav (``ttsrl.frontend.trim_prompt_tokens``)."""
    import soundfile

    for position in positions:
        prompt = prompts[position]
        if prompt.tokens is not None:
            info = soundfile.info(prompt.wav)
            prompt.tokens = trim_prompt_tokens(prompt.tokens, int(info.frames), int(info.samplerate))


def _default_server_url() -> str:
    from ttsrl.triton_client.wire import env_server_url

    return env_server_url(first=True)


def _pair(records: Records, plan: PromptPlan, seed, split: str, log) -> None:
    """Give each text-only record of ``records`` a prompt of the prompt set (in place)."""
    if not plan.pairable or records.prompt is None:
        return
    free = np.flatnonzero(records.prompt < 0)
    if not len(free):
        return
    candidates = [plan.prompts[p] for p in plan.pairable]
    chosen = sp.pair_prompts(len(free), candidates, seed)
    records.prompt[free] = np.asarray(plan.pairable, dtype=np.int64)[chosen]
    speakers = len({p.speaker for p in candidates})
    log(f"{split}: paired {len(free)} texts with {len(candidates)} prompts of {speakers} speakers from {plan.source}")


# ------------------------------------------------------------------ the stage

def prepare(train_file: str, local_dir: str, test_file: str | None = None, test_size: int | None = None,
            seed: int = 0, max_chars: int | None = None, dedup: bool = False, skip_invalid: bool = False,
            data_source: str | None = None, fast: bool = True, log=print, train_prompts: str | None = None,
            on_bad_prompt: str = "fail", server_url: str | None = None, prompt_token_cache: str | None = None,
            dev_size: int = 0, held_out_sets: dict | None = None, allow_held_out: bool = False,
            model_family: str | ModelFamily | None = None, tokenizer=None) -> dict[str, int]:
    """Read, validate, normalize, pair with speaker prompts, split and write; returns the rows per
    output (train, test, and dev when ``dev_size``). ``held_out_sets`` ({name: manifest}): sets whose
    prompts the training prompts must not share (``ttsrl.training.held_out``; ``allow_held_out``:
    a warning instead). ``model_family``: the policy's (default ``$TTSRL_MODEL_FAMILY``, else
    cosyvoice2); ``tokenizer``: the policy's converted model folder (or a tokenizer), which measures
    long non-Chinese texts as upstream does and gives ``text_tokens`` (module doc)."""
    if (test_file is None) == (test_size is None):
        raise DataError("give exactly one of --test_file and --test_size")
    if test_size is not None and test_size < 1:
        raise DataError(f"--test_size must be at least 1, got {test_size}")
    if max_chars is not None and max_chars < 1:
        raise DataError(f"--max_chars must be at least 1, got {max_chars}")
    if dev_size < 0:
        raise DataError(f"--dev_size must be 0 (no dev slice) or more, got {dev_size}")
    if on_bad_prompt not in ON_BAD_PROMPT:
        raise DataError(f"--on_bad_prompt must be one of {', '.join(ON_BAD_PROMPT)}, got {on_bad_prompt!r}")
    data_source = data_source or Path(train_file).stem
    cache_path = prompt_token_cache or os.path.join(local_dir, "prompt_tokens.json")
    own_dev = os.path.abspath(os.path.join(local_dir, DEV_FILE))  # this stage's own dev slice: training prompts
    held_out_sets = {name: path for name, path in (held_out_sets or {}).items()
                     if path and os.path.abspath(path) != own_dev}
    frontend = text_frontend(model_family, tokenizer)
    log(f"text normalization: {frontend.normalizer.kind}, as upstream CosyVoice picks it ({frontend.family.name})")

    train, problems = read_records(train_file, max_chars, fast, frontend)
    test = None
    if test_file is not None:
        test, test_problems = read_records(test_file, max_chars, fast, frontend)
        problems += test_problems
    if problems:
        if not skip_invalid:
            raise DataError(f"{len(problems)} invalid records (nothing written; --skip_invalid skips them):\n"
                            + format_problems(problems))
        log(f"skipped {len(problems)} invalid records ({_reasons(problems)})")
    if dedup:
        train, dropped = deduplicate(train)
        if test is not None:
            test, dropped_test = deduplicate(test)
            dropped += dropped_test
        log(f"dropped {dropped} duplicate texts")
    splits = {"train": train} if test is None else {"train": train, "test": test}
    try:
        splits, plan = _prepare_prompts(splits, train_prompts, on_bad_prompt, server_url, cache_path, log,
                                        held_out_sets, allow_held_out)
    except (sp.PromptError, held_out.HeldOutError) as error:
        raise DataError(str(error)) from None
    train, test = splits["train"], splits.get("test")
    if test is None:
        train, test = split_test(train, test_size, seed)
    dev = None
    if dev_size:
        train, dev = split_test(train, dev_size, (seed, 1), "--dev_size")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"no valid records left (train: {len(train)}, test: {len(test)}); nothing written")
    outputs = {"train": train, "test": test} if dev is None else {"train": train, "dev": dev, "test": test}
    # Each output is paired on its own (its own seeded order), so each is balanced across speakers.
    for salt, (name, records) in enumerate(outputs.items()):
        _pair(records, plan, (seed, 2, salt), name, log)
    tables = {name: build_table(outputs[name], name, data_source, plan.prompts, frontend, log)
              for name in ("train", "test")}
    texts = {DEV_FILE: dev_manifest(dev, plan.prompts)} if dev is not None else {}
    for path in write_tables_atomically(tables, local_dir, texts):
        log(f"wrote {path}")
    stale = os.path.join(local_dir, DEV_FILE)
    if dev is None and os.path.exists(stale):
        os.remove(stale)  # an earlier run's dev slice is not held out of this train.parquet
        log(f"removed {stale} of an earlier run (--dev_size 0)")
    return {name: len(records) for name, records in outputs.items()}

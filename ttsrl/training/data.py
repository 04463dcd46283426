"""Stage 0 as a library: JSON/JSONL text records -> the veRL RL tables (train, test).

``prepare()`` is the whole stage (the ``prepare_data.py`` CLI is a thin wrapper over it):
read and validate each input (``read_records``: Arrow's JSON reader when it can vouch for
the file, else the line-by-line reader that names file:line of every bad record),
optionally drop duplicate texts, split off a seeded test set, build each table column-wise
from Arrow arrays (``build_table``: veRL's RL schema, see prepare_data.py) and write both
parquet files so that neither appears before both are complete.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ttsrl.atomic_write import atomic_file

ABILITY = "text-to-speech"
OPTIONAL_FIELDS = ("id", "prompt_text", "prompt_wav")
MAX_REPORTED_ERRORS = 20


class DataError(Exception):
    """Input records are invalid; the message lists them."""


@dataclass
class Records:
    """Validated records of one input file, as Arrow arrays."""

    text: pa.Array
    optional: dict[str, pa.Array] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text)

    def take(self, indices) -> "Records":
        indices = pa.array(indices, type=pa.int64())
        return Records(self.text.take(indices), {k: v.take(indices) for k, v in self.optional.items()})


@dataclass
class Problem:
    path: str
    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.detail}"


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
    for number, raw in enumerate(content.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as error:
            problems.append(Problem(path, number, "malformed JSON", f"{error.msg} (column {error.colno})"))


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
    optional: dict[str, list] = {name: [] for name in OPTIONAL_FIELDS}
    for line, record in records:
        if not isinstance(record, dict):
            problems.append(Problem(path, line, "not an object", f"record is a JSON {type(record).__name__}"))
            continue
        bad = _check_text(record.get("text"), max_chars)
        if bad is not None:
            problems.append(Problem(path, line, *bad))
            continue
        texts.append(record["text"])
        for name in OPTIONAL_FIELDS:
            value = record.get(name)
            optional[name].append(None if value is None else str(value))
    carried = {name: pa.array(values, type=pa.string()) for name, values in optional.items()
               if any(v is not None for v in values)}
    return Records(pa.array(texts, type=pa.string()), carried), problems


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
    optional = {}
    for name in OPTIONAL_FIELDS:
        if name in names:
            column = table.column(name).combine_chunks()
            if not (pa.types.is_string(column.type) or pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
                return None
            if column.null_count < len(column):
                optional[name] = column.cast(pa.string())
    return Records(text, optional)


def read_records(path: str, max_chars: int | None, fast: bool = True) -> tuple[Records, list[Problem]]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if fast:
        records = read_records_fast(path, max_chars)
        if records is not None:
            return records, []
    return read_records_by_line(path, max_chars)


def deduplicate(records: Records) -> tuple[Records, int]:
    """Keep the first record of each distinct text."""
    rows = pa.table({"text": records.text, "row": pa.array(np.arange(len(records), dtype=np.int64))})
    first = rows.group_by("text", use_threads=False).aggregate([("row", "min")]).column("row_min")
    keep = np.sort(first.to_numpy())
    return records.take(keep), len(records) - len(keep)


def split_test(records: Records, test_size: int, seed: int) -> tuple[Records, Records]:
    """Deterministic split: ``test_size`` rows chosen by a seeded permutation; both keep file order."""
    if test_size >= len(records):
        raise DataError(f"--test_size {test_size} leaves no training data ({len(records)} valid records)")
    chosen = np.random.default_rng(seed).permutation(len(records))[:test_size]
    is_test = np.zeros(len(records), dtype=bool)
    is_test[chosen] = True
    return records.take(np.flatnonzero(~is_test)), records.take(np.flatnonzero(is_test))


def _constant(value: str, n: int) -> pa.Array:
    return pa.array([value], type=pa.string()).take(pa.array(np.zeros(n, dtype=np.int64)))


def build_table(records: Records, split: str, data_source: str) -> pa.Table:
    """veRL RL rows for one split, assembled column-wise from Arrow arrays."""
    n = len(records)
    text = records.text
    interleave = np.empty(2 * n, dtype=np.int64)
    interleave[0::2] = np.arange(n)
    interleave[1::2] = n
    contents = pa.concat_arrays([text, pa.array([""], type=pa.string())]).take(pa.array(interleave))
    roles = pa.array(["user", "assistant"], type=pa.string()).take(pa.array(np.tile(np.array([0, 1], dtype=np.int64), n)))
    messages = pa.StructArray.from_arrays([roles, contents], names=["role", "content"])
    prompt = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), messages)
    reward_model = pa.StructArray.from_arrays([_constant("rule", n), text], names=["style", "ground_truth"])
    info_names = ["split", "index", "text"] + list(records.optional)
    info_arrays = [_constant(split, n), pa.array(np.arange(n, dtype=np.int64)), text] + list(records.optional.values())
    extra_info = pa.StructArray.from_arrays(info_arrays, names=info_names)
    return pa.table({
        "data_source": _constant(data_source, n),
        "prompt": prompt,
        "ability": _constant(ABILITY, n),
        "reward_model": reward_model,
        "extra_info": extra_info,
    })


def write_tables_atomically(tables: dict[str, pa.Table], local_dir: str) -> list[str]:
    """Write every table as ``local_dir/NAME.parquet``; each file is renamed into place only
    when all of them are written (so a failure leaves the previous outputs, never a new
    train.parquet beside an old test.parquet)."""
    os.makedirs(local_dir, exist_ok=True)
    paths = [os.path.join(local_dir, f"{name}.parquet") for name in tables]
    with contextlib.ExitStack() as written:
        temporaries = [written.enter_context(atomic_file(path)) for path in paths]
        for table, temporary in zip(tables.values(), temporaries):
            pq.write_table(table, temporary)
    return paths


def format_problems(problems: list[Problem]) -> str:
    lines = [str(p) for p in problems[:MAX_REPORTED_ERRORS]]
    if len(problems) > MAX_REPORTED_ERRORS:
        lines.append(f"... and {len(problems) - MAX_REPORTED_ERRORS} more invalid records")
    return "\n".join(lines)


def count_by_reason(problems: list[Problem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.reason] = counts.get(problem.reason, 0) + 1
    return counts


def prepare(train_file: str, local_dir: str, test_file: str | None = None, test_size: int | None = None,
            seed: int = 0, max_chars: int | None = None, dedup: bool = False, skip_invalid: bool = False,
            data_source: str | None = None, fast: bool = True, log=print) -> dict[str, int]:
    """Read, validate, split and write; returns the number of rows per split."""
    if (test_file is None) == (test_size is None):
        raise DataError("give exactly one of --test_file and --test_size")
    if test_size is not None and test_size < 1:
        raise DataError(f"--test_size must be at least 1, got {test_size}")
    if max_chars is not None and max_chars < 1:
        raise DataError(f"--max_chars must be at least 1, got {max_chars}")
    data_source = data_source or Path(train_file).stem

    train, problems = read_records(train_file, max_chars, fast)
    test = None
    if test_file is not None:
        test, test_problems = read_records(test_file, max_chars, fast)
        problems += test_problems
    if problems:
        if not skip_invalid:
            raise DataError(f"{len(problems)} invalid records (nothing written; --skip_invalid skips them):\n"
                            + format_problems(problems))
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(count_by_reason(problems).items()))
        log(f"skipped {len(problems)} invalid records ({reasons})")
    if dedup:
        train, dropped = deduplicate(train)
        if test is not None:
            test, dropped_test = deduplicate(test)
            dropped += dropped_test
        log(f"dropped {dropped} duplicate texts")
    if test is None:
        train, test = split_test(train, test_size, seed)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"no valid records left (train: {len(train)}, test: {len(test)}); nothing written")
    tables = {"train": build_table(train, "train", data_source), "test": build_table(test, "test", data_source)}
    for path in write_tables_atomically(tables, local_dir):
        log(f"wrote {path}")
    return {name: table.num_rows for name, table in tables.items()}

"""JSON Lines, read with each record's line number: the one reading loop of every JSONL input
that reports bad records as ``file:line`` (stage 0's records, prompt sets, warm-up pairs).
Each caller words its own messages; this only says which line holds what. ``plain`` turns
values read back from parquet or veRL's batch into what ``json.dumps`` takes."""
from __future__ import annotations

import json
import math
from typing import Iterator


def json_lines(content: str) -> Iterator[tuple[int, object, json.JSONDecodeError | None]]:
    """``(line number, parsed value, None)`` for each non-blank line of ``content``, or
    ``(line number, None, the decode error)`` for a line that is not JSON."""
    for number, raw in enumerate(content.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw), None
        except json.JSONDecodeError as error:
            yield number, None, error


def plain(value, nan_as_none: bool = False):
    """A JSON-ready copy of a value read back from parquet or veRL's batch: numpy arrays and
    scalars become Python lists and numbers, dict keys strings; ``nan_as_none``: float NaN becomes
    None (strict JSON has no NaN)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v, nan_as_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, nan_as_none) for v in value]
    if nan_as_none and isinstance(value, float) and math.isnan(value):
        return None
    return value

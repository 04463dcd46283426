"""JSON Lines, read with each record's line number: the one reading loop of every JSONL input
that reports bad records as ``file:line`` (stage 0's records, prompt sets, warm-up pairs).
Each caller words its own messages; this only says which line holds what."""
from __future__ import annotations

import json
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

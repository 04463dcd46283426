"""Write a file or a directory so that readers see either the old one or the whole new one.

The one home of "write into a temporary name beside the target, then rename it into
place": a run killed half-way leaves the previous output (or nothing) and at most a
hidden temporary, never a half-written file that a later stage would take as finished.

    with atomic_file(path) as tmp:        # tmp: a Path in the same folder
        soundfile.write(tmp, wave, rate)  # anything that writes to a path
    write_text(path, text)                # the common cases
    write_json(path, payload)
    with atomic_dir(model_dir) as tmp:    # a whole directory; an old one is replaced
        model.save_pretrained(tmp)

Standard library only: both environments import it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden temporary used for ``path``: ``.STEM.tmp-PID.SUFFIX`` beside it (the suffix is kept,
    so writers that pick a format from it, like soundfile and matplotlib, still do)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block ends
    without an exception, remove it otherwise."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` (UTF-8), whole or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload, indent: int | None = None) -> None:
    """``payload`` as JSON (non-ASCII kept, newline-terminated), whole or not at all."""
    write_text(path, json.dumps(payload, ensure_ascii=False, indent=indent) + "\n")


def replace_dir(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished directory ``staged`` to ``target``, replacing what is there. An old
    ``target`` is renamed aside first and removed after, so there is no moment without one."""
    staged, target = Path(staged), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target`` (mode 0755, parents created); when
    the block ends without an exception it replaces ``target`` (``replace_dir``), otherwise it
    is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(staged, 0o755)
    try:
        yield staged
        replace_dir(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise

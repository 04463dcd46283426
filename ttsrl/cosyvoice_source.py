"""The pinned CosyVoice source (FunAudioLLM/CosyVoice at ace7c47, with Matcha-TTS): find it,
unpack it, make it importable. Standard library only; what imports CosyVoice from it runs in the
server environment (the real engines, the tests and benchmarks that build tiny CosyVoice2
models from the real classes).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PINNED_SOURCE_ARCHIVE = REPO_ROOT.parent / "shared" / "third_party" / "cosyvoice-ace7c47.tar.gz"
"""The upstream source stage -1 clones (FunAudioLLM/CosyVoice at ace7c47, with Matcha-TTS),
as a tarball for machines without GitHub access (development, CI)."""
SOURCE_CACHE = REPO_ROOT / ".cache" / "third_party"  # gitignored


def unpack_pinned_source(archive: Path = PINNED_SOURCE_ARCHIVE, root: Path = SOURCE_CACHE) -> Path:
    """``root/<archive stem>/CosyVoice``, unpacked once (atomically: a half-written tree is
    never seen by a concurrent run)."""
    import tarfile

    target = root / archive.name.replace(".tar.gz", "")
    source = target / "CosyVoice"
    if (source / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
        return source
    root.mkdir(parents=True, exist_ok=True)
    # Not ttsrl.atomic_write.atomic_dir: that replaces an existing target, and a concurrent
    # run that unpacked first may be importing from it; here the first finished tree wins.
    staging = Path(tempfile.mkdtemp(prefix=".unpack.", dir=root))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="tar")  # our own archive; it has an absolute symlink
        if not (staging / "CosyVoice" / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
            raise RuntimeError(f"{archive} does not unpack to CosyVoice/cosyvoice/cli/cosyvoice.py")
        try:
            os.replace(staging, target)
        except OSError:  # another run unpacked it first
            if not source.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return source


def find_cosyvoice_source() -> Path:
    """``$cosyvoice_src`` if set, else the pinned archive unpacked into ``.cache/third_party``;
    an error saying how to get one otherwise."""
    configured = os.environ.get("cosyvoice_src")
    if configured:
        source = Path(configured).resolve()
        if not (source / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
            raise FileNotFoundError(f"$cosyvoice_src={configured} is not a CosyVoice checkout "
                                    "(no cosyvoice/cli/cosyvoice.py)")
        return source
    if PINNED_SOURCE_ARCHIVE.is_file():
        return unpack_pinned_source()
    raise FileNotFoundError(
        "the CosyVoice source is needed: set $cosyvoice_src to a checkout of FunAudioLLM/CosyVoice at "
        f"ace7c47 (with submodules), or provide {PINNED_SOURCE_ARCHIVE}")


def add_cosyvoice_to_path(cosyvoice_src: str | Path | None) -> None:
    """Make ``cosyvoice`` and ``matcha`` importable from a CosyVoice checkout (as run.sh
    does with $cosyvoice_src); ``None``: they must be importable already."""
    if cosyvoice_src is not None:
        source = Path(cosyvoice_src).resolve()
        if not (source / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
            raise FileNotFoundError(f"--cosyvoice-src {source}: not a CosyVoice checkout (no cosyvoice/cli/cosyvoice.py)")
        for path in (source / "third_party" / "Matcha-TTS", source):
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))
    try:
        import cosyvoice  # noqa: F401
        import matcha  # noqa: F401
    except ImportError as error:
        raise ImportError(f"cannot import CosyVoice ({error}): pass --cosyvoice-src (a checkout of the pinned "
                          "commit, e.g. from ../shared/third_party/cosyvoice-ace7c47.tar.gz)") from error


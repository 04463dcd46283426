"""Fixtures of the server-environment tests that run the real CosyVoice2 / FunASR code.

``cosyvoice_src``: the pinned CosyVoice source, importable (``$cosyvoice_src`` when set,
else ``../shared/third_party/cosyvoice-ace7c47.tar.gz`` unpacked once into the gitignored
``.cache/third_party/``). Neither present: the requesting test FAILS (never skips), since
CI must run these tests.

``real_models``: a complete tiny CosyVoice2-0.5B-layout directory from the real classes,
plus tiny SenseVoiceSmall and Paraformer directories (scripts/make_tiny_cosyvoice2.py),
built once per session.
"""
import dataclasses
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PINNED_TARBALL = REPO_ROOT.parent / "shared" / "third_party" / "cosyvoice-ace7c47.tar.gz"
UNPACK_ROOT = REPO_ROOT / ".cache" / "third_party"


def unpack_pinned_source(tarball: pathlib.Path = PINNED_TARBALL, root: pathlib.Path = UNPACK_ROOT) -> pathlib.Path:
    """``root/<tarball stem>/CosyVoice``, unpacked once (atomically: a half-written tree is
    never seen by a concurrent run)."""
    target = root / tarball.name.replace(".tar.gz", "")
    source = target / "CosyVoice"
    if (source / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
        return source
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".unpack.", dir=root))
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(staging, filter="tar")  # trusted; has an absolute symlink (Matcha-TTS/data)
        if not (staging / "CosyVoice" / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
            raise RuntimeError(f"{tarball} does not unpack to CosyVoice/cosyvoice/cli/cosyvoice.py")
        try:
            os.replace(staging, target)
        except OSError:  # another run unpacked it first
            if not source.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return source


def find_cosyvoice_source() -> pathlib.Path:
    """``$cosyvoice_src`` if set, else the unpacked pinned tarball; a clear error otherwise."""
    configured = os.environ.get("cosyvoice_src")
    if configured:
        source = pathlib.Path(configured).resolve()
        if not (source / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
            raise FileNotFoundError(f"$cosyvoice_src={configured} is not a CosyVoice checkout "
                                    "(no cosyvoice/cli/cosyvoice.py)")
        return source
    if PINNED_TARBALL.is_file():
        return unpack_pinned_source()
    raise FileNotFoundError(
        f"the real-engine tests need the pinned CosyVoice source: set $cosyvoice_src to a checkout of "
        f"FunAudioLLM/CosyVoice at ace7c47 (with submodules), or provide {PINNED_TARBALL}")


@pytest.fixture(scope="session")
def cosyvoice_src() -> pathlib.Path:
    try:
        source = find_cosyvoice_source()
    except (FileNotFoundError, RuntimeError) as error:
        pytest.fail(str(error), pytrace=False)
    for path in (source, source / "third_party" / "Matcha-TTS"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return source


@dataclasses.dataclass(frozen=True)
class RealModels:
    cosyvoice_src: pathlib.Path
    cosyvoice2_dir: pathlib.Path
    sensevoice_dir: pathlib.Path
    paraformer_dir: pathlib.Path

    @property
    def prompt_wav(self) -> pathlib.Path:
        return self.cosyvoice_src / "asset" / "zero_shot_prompt.wav"

    def pythonpath(self) -> str:
        """PYTHONPATH entries a server subprocess needs to import CosyVoice (as run.sh sets)."""
        return os.pathsep.join([str(self.cosyvoice_src), str(self.cosyvoice_src / "third_party" / "Matcha-TTS")])


@pytest.fixture(scope="session")
def real_models(cosyvoice_src, tmp_path_factory) -> RealModels:
    from scripts.make_tiny_cosyvoice2 import write_full_cosyvoice2, write_tiny_paraformer, write_tiny_sensevoice

    root = tmp_path_factory.mktemp("real_models")
    return RealModels(
        cosyvoice_src=cosyvoice_src,
        cosyvoice2_dir=write_full_cosyvoice2(root / "CosyVoice2-0.5B", seed=0, cosyvoice_src=cosyvoice_src),
        sensevoice_dir=write_tiny_sensevoice(root / "SenseVoiceSmall", seed=0),
        paraformer_dir=write_tiny_paraformer(root / "paraformer-zh", seed=0),
    )

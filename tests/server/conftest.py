"""Fixtures of the server-environment tests that run the real CosyVoice2 / FunASR code.

``cosyvoice_src``: the pinned CosyVoice source, importable (``$cosyvoice_src`` when set,
else ``../shared/third_party/cosyvoice-ace7c47.tar.gz`` unpacked once into the gitignored
``.cache/third_party/``). Neither present: the requesting test FAILS (never skips), since
CI must run these tests.

``real_models``: a complete tiny CosyVoice2-0.5B-layout directory from the real classes,
plus tiny SenseVoiceSmall and Paraformer directories (ttsrl.tiny_models),
built once per session.
"""
import dataclasses
import os
import pathlib
import sys

import pytest

from ttsrl.cosyvoice_source import find_cosyvoice_source


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
    from ttsrl.tiny_models.asr import write_tiny_paraformer, write_tiny_sensevoice
    from ttsrl.tiny_models.cosyvoice2 import write_full_cosyvoice2

    root = tmp_path_factory.mktemp("real_models")
    return RealModels(
        cosyvoice_src=cosyvoice_src,
        cosyvoice2_dir=write_full_cosyvoice2(root / "CosyVoice2-0.5B", seed=0, cosyvoice_src=cosyvoice_src),
        sensevoice_dir=write_tiny_sensevoice(root / "SenseVoiceSmall", seed=0),
        paraformer_dir=write_tiny_paraformer(root / "paraformer-zh", seed=0),
    )

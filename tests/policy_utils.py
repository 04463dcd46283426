"""A tiny converted CosyVoice2 policy (Hugging Face form) for tests that generate speech tokens."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import run_script
from ttsrl.tiny_models.llm import write_tiny_cosyvoice2


def build_tiny_policy(root: Path, seed: int = 0) -> Path:
    """root/cosyvoice2 (tiny CosyVoice2-shaped dir) converted by the real script into root/hf."""
    write_tiny_cosyvoice2(root / "cosyvoice2", seed=seed)
    argv = ["--cosyvoice2-dir", str(root / "cosyvoice2"), "--output-dir", str(root / "hf")]
    code = run_script("convert_cosyvoice2_to_hf", argv)
    assert code == 0
    return root / "hf"


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """A converted tiny policy shared by the tests of a session (import this fixture where needed)."""
    return build_tiny_policy(tmp_path_factory.mktemp("policy"))

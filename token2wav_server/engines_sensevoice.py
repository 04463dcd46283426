"""ASR engines through FunASR: SenseVoiceSmall (the reward ASR) and any FunASR model
(Paraformer for evaluation), loaded from a local directory (no download at run time).

The whole batch goes to ``AutoModel.generate`` in one call, with the front end's random
dither off (same audio, same transcript); SenseVoice's rich-transcription
tags (``<|zh|><|NEUTRAL|><|Speech|><|woitn|>``) are stripped from the text. FunASR gives no
per-token likelihood through ``generate``, so ``nll`` is None (the reward's confidence
component then needs another ASR engine).
"""
from __future__ import annotations

import logging
import pathlib
import re
from typing import Optional

import numpy as np

from .engines import AsrResult

LOGGER = logging.getLogger(__name__)
SAMPLE_RATE = 16000
_TAG = re.compile(r"<\|[^|<>]*\|>")


def clean_transcript(text: str) -> str:
    """SenseVoice output without its ``<|...|>`` tags and surrounding space."""
    return _TAG.sub("", text).strip()


def check_model_dir(path: Optional[str], option: str, what: str) -> pathlib.Path:
    """A model directory that exists, or an error naming the option and how to get it."""
    if not path:
        raise FileNotFoundError(f"{what} needs {option} (downloaded by `bash run.sh -1 -1`)")
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{option} {directory}: not a directory (download it with `bash run.sh -1 -1`)")
    return directory


class FunasrAsr:
    """A FunASR model as an ``AsrEngine``."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model_dir: str, device: str = "cpu", language: str = "zh", use_itn: bool = False,
                 option: str = "--sensevoice-dir", model=None):
        self.language = language
        self.use_itn = use_itn
        if model is None:
            directory = check_model_dir(model_dir, option, "the ASR engine")
            from funasr import AutoModel

            # FunASR's fbank front end adds random dither by default; a reward must not
            # depend on a random draw, so switch it off (merged into the model's frontend_conf).
            model = AutoModel(model=str(directory), device=device, disable_update=True, log_level="ERROR",
                              frontend_conf={"dither": 0.0})
        self.model = model
        # Warm up: load kernels and lazily built state before the first request.
        self.transcribe([np.zeros(SAMPLE_RATE, dtype=np.float32)])

    def transcribe(self, waves: list) -> list:
        if not waves:
            return []
        inputs = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
        outputs = self.model.generate(input=inputs, cache={}, language=self.language, use_itn=self.use_itn,
                                      batch_size=len(inputs), disable_pbar=True)
        if len(outputs) != len(inputs):
            raise RuntimeError(f"FunASR returned {len(outputs)} results for {len(inputs)} waveforms")
        return [AsrResult(clean_transcript(str(out.get("text", "")))) for out in outputs]


def sensevoice(model_dir: Optional[str], device: str = "cpu") -> FunasrAsr:
    return FunasrAsr(model_dir, device, option="--sensevoice-dir")


def paraformer(model_dir: Optional[str], device: str = "cpu") -> FunasrAsr:
    return FunasrAsr(model_dir, device, option="--asr-eval-dir")

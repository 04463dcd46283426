"""ASR engines through FunASR: SenseVoiceSmall (the reward ASR) and any FunASR model
(Paraformer for evaluation), loaded from a local directory (no download at run time).

The whole batch goes to ``AutoModel.generate`` in one call per language, with the front end's
random dither off (same audio, same transcript). Each wave's language (``languages``: zh, en,
ja, ko, yue, or auto for SenseVoice's own language identification) is SenseVoice's
``language``, the query its decoder reads first; a batch of several languages is one call per
language. Without languages every wave gets the engine's ``language`` (default auto). Paraformer
has no language input and ignores it. SenseVoice's rich-transcription
tags (``<|zh|><|NEUTRAL|><|Speech|><|woitn|>``) are stripped from the text.

Confidence (``AsrResult.nll``, the reward's ``confidence`` component): for SenseVoice, the
mean per-token negative log-likelihood of its own transcript under its CTC posteriors.
The CTC log-probabilities of the very ``generate`` call that produced the transcript are
captured with forward hooks (encoder lengths, ``ctc.ctc_lo`` logits); over the speech
frames (after SenseVoice's 4 query frames: language, emotion, event, text norm) the
greedy CTC path is collapsed to its token sequence, whose negative log-likelihood summed
over all CTC alignments (``torch.nn.functional.ctc_loss``) is divided by its length (by 1
for an empty transcript). Other FunASR models (Paraformer) give ``nll=None``.
"""
from __future__ import annotations

import logging
import pathlib
import re
import threading
from typing import Optional

import numpy as np

from ttsrl.language import ASR_LANGUAGES, AUTO

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


FUNASR_FILES = {"config.yaml": "the model config", "model.pt": "the model weights"}


def check_funasr_dir(path: Optional[str], option: str, what: str) -> pathlib.Path:
    """A FunASR model directory with the files ``AutoModel`` loads, or an error naming each
    missing file and where the directory comes from."""
    directory = check_model_dir(path, option, what)
    missing = [f"{name} ({meaning})" for name, meaning in FUNASR_FILES.items() if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{option} {directory} lacks " + "; ".join(missing)
                                + " (a FunASR model directory, e.g. iic/SenseVoiceSmall downloaded by "
                                  "`bash run.sh -1 -1`)")
    return directory


SENSEVOICE_QUERY_FRAMES = 4
"""Frames SenseVoiceSmall prepends to the speech frames: language, emotion, event, text norm."""


class CtcPosteriors:
    """Captures the CTC log-probabilities (and encoder output lengths) of a FunASR CTC model's
    forward passes, through forward hooks on its encoder and ``ctc.ctc_lo``."""

    def __init__(self, model):
        import torch

        self._torch = torch
        self._lengths = []
        self._logits = []
        model.encoder.register_forward_hook(lambda _m, _i, out: self._lengths.append(out[1].detach()))
        model.ctc.ctc_lo.register_forward_hook(lambda _m, _i, out: self._logits.append(out.detach()))

    def clear(self) -> None:
        self._lengths.clear()
        self._logits.clear()

    def take(self) -> list:
        """Per utterance of the captured passes (in order): log-probs [frames, vocab]."""
        rows = []
        for logits, lengths in zip(self._logits, self._lengths):
            log_probs = self._torch.log_softmax(logits.float(), dim=-1)
            rows.extend(log_probs[i, : int(lengths[i])] for i in range(log_probs.shape[0]))
        self.clear()
        return rows


def ctc_transcript_nll(log_probs, blank_id: int = 0) -> float:
    """Mean per-token negative log-likelihood of the greedy CTC transcript of ``log_probs``
    [frames, vocab]: the greedy path collapsed (repeats merged, blanks dropped) is the
    transcript; its NLL sums over every CTC alignment; divided by the token count (by 1 when
    the transcript is empty)."""
    import torch
    import torch.nn.functional as F

    path = torch.unique_consecutive(log_probs.argmax(dim=-1))
    targets = path[path != blank_id]
    total = F.ctc_loss(log_probs[:, None, :], targets[None].long(), torch.tensor([log_probs.shape[0]]),
                       torch.tensor([targets.numel()]), blank=blank_id, reduction="sum", zero_infinity=False)
    return float(total) / max(1, targets.numel())


class FunasrAsr:
    """A FunASR model as an ``AsrEngine``."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model_dir: str, device: str = "cpu", language: str = "auto", use_itn: bool = False,
                 option: str = "--sensevoice-dir", model=None):
        self.language = language
        self.use_itn = use_itn
        if model is None:
            directory = check_funasr_dir(model_dir, option, "the ASR engine")
            from funasr import AutoModel

            # FunASR's fbank front end adds random dither by default; a reward must not
            # depend on a random draw, so switch it off (merged into the model's frontend_conf).
            model = AutoModel(model=str(directory), device=device, disable_update=True, log_level="ERROR",
                              frontend_conf={"dither": 0.0})
        self.model = model
        self._lock = threading.Lock()  # the slot's models may transcribe from different threads
        inner = getattr(model, "model", None)
        # SenseVoice: CTC over speech frames after its query frames -> confidence (module doc).
        self._posteriors = None
        if inner is not None and hasattr(inner, "ctc") and hasattr(inner, "textnorm_dict"):
            self._posteriors = CtcPosteriors(inner)
            self._blank_id = int(getattr(inner, "blank_id", 0))
        # Warm up: load kernels and lazily built state before the first request.
        self.transcribe([np.zeros(SAMPLE_RATE, dtype=np.float32)])

    def transcribe(self, waves: list, languages: list | None = None) -> list:
        if not waves:
            return []
        inputs = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
        languages = [self.language] * len(inputs) if languages is None else [str(x or AUTO) for x in languages]
        if len(languages) != len(inputs):
            raise ValueError(f"{len(languages)} languages for {len(inputs)} waveforms")
        unknown = sorted(set(languages) - set(ASR_LANGUAGES))
        if unknown:
            raise ValueError(f"ASR language(s) {unknown}: SenseVoice takes {list(ASR_LANGUAGES)}")
        outputs, posteriors = [None] * len(inputs), [None] * len(inputs)
        with self._lock:
            for language in dict.fromkeys(languages):  # one generate call per language, in first-seen order
                rows = [i for i, x in enumerate(languages) if x == language]
                if self._posteriors is not None:
                    self._posteriors.clear()
                got = self.model.generate(input=[inputs[i] for i in rows], cache={}, language=language,
                                          use_itn=self.use_itn, batch_size=len(rows), disable_pbar=True)
                if len(got) != len(rows):
                    raise RuntimeError(f"FunASR returned {len(got)} results for {len(rows)} waveforms")
                taken = self._posteriors.take() if self._posteriors is not None else [None] * len(rows)
                if len(taken) != len(rows):
                    raise RuntimeError(f"captured CTC posteriors of {len(taken)} utterances for {len(rows)} waveforms")
                for i, out, log_probs in zip(rows, got, taken):
                    outputs[i], posteriors[i] = out, log_probs
        if self._posteriors is None:
            posteriors = None
        texts = [clean_transcript(str(out.get("text", ""))) for out in outputs]
        if posteriors is None:
            return [AsrResult(text) for text in texts]
        return [AsrResult(text, ctc_transcript_nll(log_probs[SENSEVOICE_QUERY_FRAMES:], self._blank_id))
                for text, log_probs in zip(texts, posteriors)]


def sensevoice(model_dir: Optional[str], device: str = "cpu") -> FunasrAsr:
    return FunasrAsr(model_dir, device, option="--sensevoice-dir")


def paraformer(model_dir: Optional[str], device: str = "cpu") -> FunasrAsr:
    return FunasrAsr(model_dir, device, option="--asr-eval-dir")

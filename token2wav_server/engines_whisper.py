"""Whisper (openai-whisper) as an ``AsrEngine``: the English evaluation ASR ``asr_eval_en``.

Seed-TTS-eval and CV3-Eval score English with Whisper-large-v3; ``--asr-eval-en PATH`` names
a Whisper checkpoint file (``large-v3.pt`` as openai-whisper downloads it, or any checkpoint
in its format: a ``torch.save`` of ``{"dims": ModelDimensions fields, "model_state_dict": ...}``),
loaded with ``whisper.load_model`` from that path (never by model name, so nothing is
downloaded at run time).

Decoding is fixed: ``language="en"``, ``task="transcribe"``, greedy (temperature 0, no
temperature fallback), no timestamps, fp16 only on CUDA. The server resamples every waveform
to ``sample_rate`` (16 kHz) before ``transcribe``, as for the other ASR engines.

Batching: waveforms of at most 30 s (Whisper's window) are padded to 30 s and decoded
together in one ``whisper.decode`` call; a longer one goes alone through
``whisper.transcribe`` (Whisper's own sliding-window long-form decoding: greedy, English,
no conditioning on the previous window's text). Batched results can differ from one-by-one
results in the last float digits (nll), as any batched matmul; texts of the tests match.

``AsrResult.nll`` is ``-avg_logprob`` of Whisper's result: the mean negative log-likelihood
of the transcript's tokens and its end-of-text token.
"""
from __future__ import annotations

import pathlib
import pickle
import threading
from typing import Optional

import numpy as np

from .engines import AsrResult

SAMPLE_RATE = 16000  # whisper.audio.SAMPLE_RATE
LANGUAGE = "en"
OPTION = "--asr-eval-en"


def check_whisper_checkpoint(path: Optional[str], option: str = OPTION) -> pathlib.Path:
    """A Whisper checkpoint path that is a file, or an error naming the option and how to get it."""
    if not path:
        raise FileNotFoundError(f"the Whisper ASR engine needs {option} (a checkpoint file such as large-v3.pt, "
                                "downloaded by `bash run.sh -1 -1`)")
    checkpoint = pathlib.Path(path)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{option} {checkpoint}: no such file (a Whisper checkpoint such as large-v3.pt, "
                                "downloaded by `bash run.sh -1 -1`)")
    return checkpoint


def load_whisper(path: Optional[str], device: str = "cpu", option: str = OPTION):
    """``whisper.load_model`` of a checkpoint file, with errors that name the file."""
    import whisper

    checkpoint = check_whisper_checkpoint(path, option)
    try:
        return whisper.load_model(str(checkpoint), device=device)
    except (KeyError, TypeError, AttributeError, pickle.UnpicklingError, EOFError) as error:
        # a torch file that is not {"dims": ..., "model_state_dict": ...}, or not a torch file at all
        raise ValueError(f"{option} {checkpoint}: not a Whisper checkpoint (expected a torch.save of a dict with "
                         f"'dims' and 'model_state_dict'): {type(error).__name__}: {error}") from error
    except RuntimeError as error:  # a torch archive torch.load cannot read, or weights that do not fit the dims
        raise ValueError(f"{option} {checkpoint}: not a loadable Whisper checkpoint: {error}") from error


class WhisperAsr:
    """An openai-whisper model as an ``AsrEngine`` (module doc)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, checkpoint: Optional[str], device: str = "cpu", model=None, option: str = OPTION):
        import whisper

        self.model = model if model is not None else load_whisper(checkpoint, device, option)
        self.fp16 = str(self.model.device).startswith("cuda")  # whisper's fp16 kernels are CUDA-only
        self.options = whisper.DecodingOptions(language=LANGUAGE, task="transcribe", temperature=0.0,
                                               without_timestamps=True, fp16=self.fp16)
        self._lock = threading.Lock()  # the slot's models may transcribe from different threads
        # Warm up: load kernels and lazily built state before the first request.
        self.transcribe([np.zeros(SAMPLE_RATE, dtype=np.float32)])

    def transcribe(self, waves: list, languages: list | None = None) -> list:
        """English transcripts (this engine serves the utterances declared en; ``languages`` unused)."""
        import whisper

        inputs = []
        for index, wave in enumerate(waves):
            wave = np.asarray(wave, dtype=np.float32).reshape(-1)
            if wave.size == 0:
                raise ValueError(f"waveform {index} of {len(waves)}: empty (no samples to transcribe)")
            inputs.append(wave)
        results: list = [None] * len(inputs)
        short = [i for i, wave in enumerate(inputs) if wave.size <= whisper.audio.N_SAMPLES]
        with self._lock:
            if short:
                import torch

                mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(inputs[i])),
                                                                self.model.dims.n_mels, device=self.model.device)
                                    for i in short])
                decoded = whisper.decode(self.model, mels, self.options)
                for i, result in zip(short, decoded):
                    results[i] = AsrResult(result.text.strip(), -float(result.avg_logprob))
            for i, wave in enumerate(inputs):
                if results[i] is None:
                    results[i] = self._transcribe_long(wave)
        return results

    def _transcribe_long(self, wave: np.ndarray) -> AsrResult:
        """Over 30 s: Whisper's long-form decoding (greedy, English, each 30 s window on its own
        audio only); nll over all segments' tokens."""
        import whisper

        output = whisper.transcribe(self.model, wave, verbose=None, temperature=0.0, language=LANGUAGE,
                                    task="transcribe", fp16=self.fp16, condition_on_previous_text=False)
        segments = output.get("segments") or []
        weights = [len(s["tokens"]) + 1 for s in segments]
        nll = (-sum(s["avg_logprob"] * w for s, w in zip(segments, weights)) / sum(weights)) if segments else None
        return AsrResult(str(output.get("text", "")).strip(), nll)


def whisper_asr(checkpoint: Optional[str], device: str = "cpu") -> WhisperAsr:
    """The ``asr_eval_en`` engine of ``--asr-eval-en PATH``."""
    return WhisperAsr(checkpoint, device, option=OPTION)

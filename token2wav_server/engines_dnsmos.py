"""Reward component ``quality``: DNSMOS P.835 speech quality (Microsoft's ``speechmos`` package).

``speechmos`` (MIT, on PyPI) ships the DNSMOS P.835 ONNX models inside its wheel, so this
component runs with its real pretrained weights on CPU (and in CI). The engine calls the
package's documented API, ``speechmos.dnsmos.run(wave, sr=16000)``, once per waveform of the
batch and keeps its ``ovrl_mos``, ``sig_mos`` and ``bak_mos``; the package does its own input
handling (16 kHz only, values in [-1, 1], clips shorter than 9.01 s repeated to that length,
longer ones scored over 9.01 s windows a second apart and averaged).

- Reported per item: ``quality_ovrl`` (overall), ``quality_sig`` (speech signal) and
  ``quality_bak`` (background noise), DNSMOS P.835 MOS on its 1-5 scale.
- Utility: ``clip((OVRL - 1) / 4, 0, 1)``, the MOS scale mapped linearly onto [0, 1]
  (1 = bad -> 0, 5 = excellent -> 1). Real clean speech scores OVRL about 3-3.5 (utility about
  0.5-0.6); noise and tones score 1-1.6.
- Audio it cannot score is an error for that item, never a made-up score: a waveform shorter
  than ``MIN_SAMPLES`` (320 samples at 16 kHz, 20 ms: one DNSMOS analysis frame; an empty
  waveform would make ``speechmos`` repeat it forever) or one the package refuses.

The server resamples the decoded audio to 16 kHz and clips it to [-1, 1] (resampling can
overshoot a full-scale waveform by a little, which ``speechmos`` would refuse).
"""
from __future__ import annotations

import numpy as np

from .engines import ComponentSpec, EngineOptions

SAMPLE_RATE = 16000
MIN_SAMPLES = 320
"""The shortest waveform scored (20 ms at 16 kHz: one DNSMOS analysis frame)."""
REPORTS = ("quality_ovrl", "quality_sig", "quality_bak")
MOS_KEYS = {"quality_ovrl": "ovrl_mos", "quality_sig": "sig_mos", "quality_bak": "bak_mos"}


def quality_utility(values: dict, settings: dict) -> float:
    """DNSMOS OVRL (1-5) -> utility ``clip((OVRL - 1) / 4, 0, 1)``."""
    return float(np.clip((float(values["quality_ovrl"]) - 1.0) / 4.0, 0.0, 1.0))


class DnsmosQuality:
    """``ComponentEngine`` over ``speechmos.dnsmos`` (P.835, not the personalized model)."""

    sample_rate = SAMPLE_RATE

    def __init__(self):
        from speechmos import dnsmos  # onnxruntime + librosa; server environment only

        self._dnsmos = dnsmos

    def score(self, waves: list, targets: list) -> list:
        for index, wave in enumerate(waves):
            size = np.asarray(wave).size
            if size < MIN_SAMPLES:
                raise ValueError(f"DNSMOS cannot score waveform {index}: {size} samples at {SAMPLE_RATE} Hz "
                                 f"({size / SAMPLE_RATE * 1000:.0f} ms), shorter than {MIN_SAMPLES} samples "
                                 f"({MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms)")
        results = []
        for wave in waves:
            wave = np.clip(np.asarray(wave, dtype=np.float32).reshape(-1), -1.0, 1.0)
            mos = self._dnsmos.run(wave, sr=SAMPLE_RATE)
            results.append({report: float(mos[key]) for report, key in MOS_KEYS.items()})
        return results


def create_engine(options: EngineOptions) -> DnsmosQuality:
    return DnsmosQuality()


COMPONENT = ComponentSpec(
    name="quality",
    reports=REPORTS,
    utility=quality_utility,
    create_engine=create_engine,
    serve_hint="any server with the speechmos package (requirements-server.txt) and the preset weighting quality: "
               "--reward-preset (run.sh reward_preset) or --reward-config",
)

"""Reward component ``emotion``: does the audio carry the item's target emotion? (emotion2vec+)

The classifier is FunASR's ``emotion2vec_plus`` family (``iic/emotion2vec_plus_large`` by
default; ``_base`` and ``_seed`` are smaller), loaded with ``funasr.AutoModel``, which downloads
it from ModelScope on first use (GPU machines; a local directory in FunASR's layout works too:
``--engine-option emotion2vec_model=DIR_OR_ID``). The engine calls the model's own
``generate(waves, granularity="utterance", extract_embedding=False)`` on 16 kHz audio and reads
its softmax over the model's label tokens (``生气/angry``, ..., ``<unk>``).

- Target: the item's ``emotion`` (stage 0's optional field, in ``extra_info["emotion"]``; the hook
  sends it as ``TARGET_EMOTION``): one of ``TARGET_LABELS``, matched against the English part of
  the model's labels. Stage 0 refuses any other label with file:line.
- Reported per item: ``emotion_target_prob``, the model's probability of the target emotion
  (NaN for an item without a target).
- Utility: that probability (in [0, 1]). An item without a target has no emotion utility: the
  component is left out of its reward (the other weighted components are averaged as usual) and
  its ``utility_emotion`` is NaN. (GDPO over ``utility_emotion`` therefore needs a target on
  every item.)
"""
from __future__ import annotations

import math

import numpy as np

from .engines import ComponentSpec, EngineOptions

SAMPLE_RATE = 16000
DEFAULT_MODEL = "iic/emotion2vec_plus_large"
MODEL_OPTION = "emotion2vec_model"
TARGET_LABELS = ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised")
"""The emotions an item may ask for: the named classes of the emotion2vec_plus models."""
REPORTS = ("emotion_target_prob",)


def label_name(token: str) -> str:
    """A model label token -> its emotion name (``开心/happy`` -> ``happy``)."""
    return token.rsplit("/", 1)[-1].strip().lower()


def check_target(value, where: str) -> str:
    """An item's ``emotion`` -> the normalized label; ValueError naming ``where`` otherwise."""
    if not isinstance(value, str) or value.strip().lower() not in TARGET_LABELS:
        raise ValueError(f"{where}: emotion {value!r} is not one the emotion model knows; known: {list(TARGET_LABELS)}")
    return value.strip().lower()


def emotion_utility(values: dict, settings: dict):
    """The probability of the target emotion; None (left out) for an item without a target."""
    probability = float(values["emotion_target_prob"])
    return None if math.isnan(probability) else probability


class Emotion2vecEmotion:
    """``ComponentEngine`` over a FunASR emotion2vec+ model."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "cpu"):
        from funasr import AutoModel

        self.model = AutoModel(model=model, hub="ms", disable_update=True, device=device)
        self.labels = [label_name(token) for token in self.model.kwargs["tokenizer"].token_list]
        missing = [label for label in TARGET_LABELS if label not in self.labels]
        if missing:
            raise ValueError(f"emotion model {model} does not know the emotions {missing} (its labels: {self.labels})")

    def score(self, waves: list, targets: list) -> list:
        for index, target in enumerate(targets):
            if target is not None:
                check_target(target, f"item {index}")
        results = [{"emotion_target_prob": math.nan} for _ in waves]
        todo = [i for i, target in enumerate(targets) if target is not None]
        if not todo:
            return results
        outputs = self.model.generate([np.asarray(waves[i], dtype=np.float32) for i in todo], granularity="utterance",
                                      extract_embedding=False, disable_pbar=True)
        if len(outputs) != len(todo):
            raise RuntimeError(f"emotion model returned {len(outputs)} results for {len(todo)} waveforms")
        for i, output in zip(todo, outputs):
            scores = dict(zip((label_name(token) for token in output["labels"]), output["scores"]))
            results[i] = {"emotion_target_prob": float(scores[targets[i].strip().lower()])}
        return results


def create_engine(options: EngineOptions) -> Emotion2vecEmotion:
    return Emotion2vecEmotion(options.extra.get(MODEL_OPTION, DEFAULT_MODEL), options.device)


COMPONENT = ComponentSpec(
    name="emotion",
    reports=REPORTS,
    utility=emotion_utility,
    create_engine=create_engine,
    target="emotion",
    serve_hint="a server whose preset weights emotion (--reward-preset expressive, run.sh reward_preset) with "
               f"funasr and an emotion2vec+ model (--engine-option {MODEL_OPTION}=DIR_OR_ID, default {DEFAULT_MODEL})",
)

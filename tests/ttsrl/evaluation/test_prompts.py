"""ttsrl.evaluation.prompts: the prompt checks of a test set (the wav header checks shared with stage 0,
ttsrl.training.speaker_prompts, without stage 0's minimum length)."""
from __future__ import annotations

import numpy as np
import soundfile

from ttsrl.eval_sets import EvalUtterance
from ttsrl.evaluation.prompts import check_prompts
from ttsrl.training.speaker_prompts import TOO_SHORT, check_prompts as check_training_prompts
from ttsrl.training.speaker_prompts import Prompt


def _wav(path, seconds, rate=16000):
    soundfile.write(str(path), np.full(int(seconds * rate), 0.1, np.float32), rate, subtype="FLOAT")
    return str(path)


def test_test_set_prompts_are_checked_by_header_and_transcript(tmp_path):
    short = _wav(tmp_path / "short.wav", 0.5)
    utterances = [
        EvalUtterance("ok", "文本", "提示", short, where="m.lst:1"),  # short prompts are fine for evaluation
        EvalUtterance("missing", "文本", "提示", str(tmp_path / "nope.wav"), where="m.lst:2"),
        EvalUtterance("low", "文本", "提示", _wav(tmp_path / "low.wav", 2, rate=8000), where="m.lst:3"),
        EvalUtterance("long", "文本", "提示", _wav(tmp_path / "long.wav", 3), where="m.lst:4"),
        EvalUtterance("silent", "文本", "", short, where="m.lst:5"),
        EvalUtterance("none", "文本", "提示", "", where="m.lst:6"),
    ]
    bad = check_prompts(utterances, max_seconds=2.5)
    assert sorted(bad) == ["long", "low", "missing", "none", "silent"]
    assert bad["missing"] == f"m.lst:2: utterance 'missing': prompt wav {tmp_path / 'nope.wav'} not found"
    assert "8000 Hz, below the 16000 Hz a prompt needs" in bad["low"]
    assert "3.0 s long, over the maximum of 2.5 s (--max-prompt-seconds)" in bad["long"]
    assert "no prompt transcript" in bad["silent"] and "no prompt wav" in bad["none"]
    # Stage 0 refuses the same short wav as a training prompt.
    refused = check_training_prompts([Prompt(short, "提示", "short", "s", "p.jsonl:1")])
    assert refused[0].reason == TOO_SHORT

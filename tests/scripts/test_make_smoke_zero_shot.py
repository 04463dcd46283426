"""The committed zero-shot smoke assets are what scripts/make_smoke_zero_shot.py makes, and they
are what the smoke profile needs: prompts of at least 1 s in distinct stand-in voices whose
audio says their transcript (then silence), and test texts that the training set does not contain, with each length as common in both."""
import json
from pathlib import Path

import soundfile

from tests.cli import load_script
from token2wav_server import standin

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets" / "smoke_zero_shot"


def test_committed_assets_are_what_the_script_makes(tmp_path):
    script = load_script("make_smoke_zero_shot")
    assert script.main(["--output-dir", str(tmp_path)]) == 0
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(ASSETS) for p in ASSETS.rglob("*") if p.is_file())
    assert made == committed
    for relative in made:
        assert (tmp_path / relative).read_bytes() == (ASSETS / relative).read_bytes(), relative


def test_prompts_say_their_transcript_in_distinct_voices():
    prompts = [json.loads(line) for line in (ASSETS / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    voices = {}
    for prompt in prompts:
        wave, rate = soundfile.read(ASSETS / prompt["prompt_wav"], dtype="float32")
        assert rate == standin.SAMPLE_RATE and len(wave) >= rate  # stage 0's minimum: 1 s
        ids, voice = standin._decode(wave, trailing_silence=True)  # speech, then silence up to 1 s
        assert standin.tokens_to_text(ids) == prompt["prompt_text"]
        voices.setdefault(prompt["speaker"], set()).add(voice)
    assert all(len(v) == 1 for v in voices.values())
    assert len({next(iter(v)) for v in voices.values()}) == len(voices) >= 3


def test_test_texts_are_held_out_and_prompted_by_the_prompt_set():
    train = [json.loads(line)["text"] for line in (ASSETS / "texts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(set(train)) == len(train) >= 1000 and all(set(t) <= set("一二三四五六七八九十") for t in train)
    rows = [line.split("|") for line in (ASSETS / "meta.lst").read_text(encoding="utf-8").splitlines()]
    # Each length as common in training as in the test set: half the texts 3 numerals, half 4.
    for texts in (train, [text for *_, text in rows]):
        assert sorted({len(t) for t in texts}) == [3, 4]
        assert sum(len(t) == 3 for t in texts) * 2 == len(texts)
    train = set(train)
    prompt_wavs = {json.loads(line)["prompt_wav"] for line in (ASSETS / "prompts.jsonl").read_text().splitlines()}
    assert len(rows) >= 16
    assert not {text for *_, text in rows} & train
    assert {wav for _, _, wav, _ in rows} == prompt_wavs

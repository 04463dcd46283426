"""Write the zero-shot smoke assets: stand-in speaker prompts in several voices and a held-out
numeral test set prompted with them (configs/smoke.sh uses both; the files are committed, this
script is how they were made and how to remake them).

    python scripts/make_smoke_zero_shot.py [--output-dir assets/smoke_zero_shot] [--seed 0]

Writes, deterministically from the seed:

- ``prompt-wavs/voice<V>_<K>.wav``: stand-in audio (``token2wav_server.standin.tokens_to_wave``)
  of ``PROMPT_CHARS`` non-numeral characters in stand-in voice ``V``, then silence up to 1.0 s
  (the shortest prompt stage 0 accepts; with ``voice_tokens=true`` the stand-in tokenizer reads
  trailing silence as no tokens, so the prompt's speech tokens are its voice token and 4 ids),
  16 kHz 16-bit PCM (stand-in samples ``k / 8192`` are exact in it).
- ``prompts.jsonl``: the prompt set (``train_prompts=``): ``id``, ``speaker``, ``prompt_wav``
  (relative to this folder), ``prompt_text`` (what the audio says).
- ``meta.lst``: the test set in Seed-TTS-eval layout (``id|prompt_text|prompt_wav|text``), texts of
  3-4 numerals that are not in the training texts, each prompted with one of the prompts above
  in turn.
- ``texts.jsonl``: the training texts (``train_file``), ``TRAIN_TEXTS`` distinct texts of 3-4
  numerals, none of them a test text, each length as common as in the test set. Many texts, each
  seen about once per GRPO run, so the tiny policy learns to read numerals rather than memorize
  texts (the held-out test set measures the former).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Iterable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: the repository root holds the packages
    sys.path.insert(0, str(REPO))

from token2wav_server.standin import SAMPLE_RATE, text_to_tokens, tokens_to_wave  # noqa: E402
from ttsrl.atomic_write import atomic_file, write_text  # noqa: E402

NUMERALS = "一二三四五六七八九十"
# What the prompts say: characters of the stand-in table (U+4E00..U+59A0) that are not numerals,
# so the policy can tell the prompt transcript from the numerals it is to speak.
PROMPT_CHARACTERS = "上下中人从们会你全公出分前力北去友口古可右合同名后向吗听和商因国在地坐多大天太头好"
VOICES = (3, 6, 9, 12)  # stand-in voices far enough apart to tell by ear in the stand-in's terms
PROMPTS_PER_VOICE = 2
PROMPT_CHARS = 4
PROMPT_SECONDS = 1.0
# Texts of 3 or 4 numerals, each length half the time in the test set and in training. Not 2:
# only 100 two-numeral texts exist, too few to hold test texts out and still train on each
# length as often as the test set has it.
TEXT_LENGTHS = (3, 4)
TEST_TEXTS = 48
TRAIN_TEXTS = 1536


def random_text(rng: np.random.Generator, length: int, characters: str = NUMERALS) -> str:
    return "".join(characters[i] for i in rng.integers(0, len(characters), size=length))


def distinct_texts(rng: np.random.Generator, count: int, exclude: Iterable[str] = ()) -> list[str]:
    """``count`` distinct texts of numerals, none in ``exclude``, the lengths of ``TEXT_LENGTHS`` in
    turn (so each is as common), each text drawn among those of its length not taken yet."""
    texts: list[str] = []
    taken = set(exclude)
    while len(texts) < count:
        length = TEXT_LENGTHS[len(texts) % len(TEXT_LENGTHS)]
        text = random_text(rng, length)
        while text in taken:
            text = random_text(rng, length)
        taken.add(text)
        texts.append(text)
    return texts


def write_assets(output_dir: pathlib.Path, seed: int = 0) -> None:
    import soundfile

    rng = np.random.default_rng(seed)
    wav_dir = output_dir / "prompt-wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    prompts = []
    for voice in VOICES:
        for k in range(PROMPTS_PER_VOICE):
            text = random_text(rng, PROMPT_CHARS, PROMPT_CHARACTERS)
            relative = f"prompt-wavs/voice{voice}_{k}.wav"
            with atomic_file(output_dir / relative) as tmp:
                speech = tokens_to_wave(text_to_tokens(text), voice)
                wave = np.zeros(int(PROMPT_SECONDS * SAMPLE_RATE), dtype=np.float32)
                wave[: speech.size] = speech
                soundfile.write(tmp, wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
            prompts.append({"id": f"voice{voice}_{k}", "speaker": f"voice{voice}", "prompt_wav": relative,
                            "prompt_text": text})
    write_text(output_dir / "prompts.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))

    texts = distinct_texts(rng, TEST_TEXTS)
    train = distinct_texts(rng, TRAIN_TEXTS, texts)
    write_text(output_dir / "texts.jsonl", "".join(json.dumps({"id": f"zt{i:04d}", "text": text}, ensure_ascii=False)
                                                   + "\n" for i, text in enumerate(train)))
    lines = [f"zs{i:02d}|{prompts[i % len(prompts)]['prompt_text']}|{prompts[i % len(prompts)]['prompt_wav']}|{text}"
             for i, text in enumerate(texts)]
    write_text(output_dir / "meta.lst", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(REPO / "assets" / "smoke_zero_shot"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_assets(pathlib.Path(args.output_dir), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

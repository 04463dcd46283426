"""Scoring throughput on a GRPO-shaped workload: ours vs the reference approach, same run.

Workload: every text of assets/zh_texts.jsonl (about 20 characters, a third with
numbers) is a reference scored against 4 distinct hypotheses, as GRPO scores
n=4 rollouts per prompt: one reading of the text with no punctuation (numbers
spoken as Chinese, the way an ASR without ITN writes them) and three with 1-3
random character edits.

Reference approach (seed 000's server): wetext normalize both texts, pypinyin
lazy_pinyin(TONE3, tone sandhi, neutral tone 5), jiwer.wer over the syllables.
Ours: ttsrl.scoring.align (number readings, caches), starting cold.

    .venv/bin/python benchmarks/bench_scoring.py [--repeat-texts N]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, only benchmarks/ is on sys.path; ttsrl lives in the repo root


def make_workload(texts: list[str], seed: int = 0) -> list[tuple[str, str]]:
    from ttsrl.text_norm import join_pieces, reading_slots

    rng = random.Random(seed)
    alphabet = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天"
    pairs = []
    for text in texts:
        slots = reading_slots(text)
        spoken = join_pieces(rng.choice(p) if isinstance(p, tuple) else p for p in slots.pieces)
        hypotheses = {spoken}
        while len(hypotheses) < 4:
            chars = list(spoken)
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(chars))
                op = rng.choice("sdi")
                if op == "s":
                    chars[i] = rng.choice(alphabet)
                elif op == "d" and len(chars) > 1:
                    del chars[i]
                else:
                    chars.insert(i, rng.choice(alphabet))
            hypotheses.add("".join(chars))
        pairs += [(text, h) for h in sorted(hypotheses)]
    return pairs


def reference_score(pairs):
    import jiwer
    from pypinyin import Style, lazy_pinyin
    from wetext import Normalizer

    normalizer = Normalizer(lang="zh", operator="tn", remove_puncts=True)
    rates = []
    for ref, hyp in pairs:
        ref_py = lazy_pinyin(normalizer.normalize(ref).lower(), style=Style.TONE3, tone_sandhi=True,
                             neutral_tone_with_five=True)
        hyp_py = lazy_pinyin(normalizer.normalize(hyp).lower(), style=Style.TONE3, tone_sandhi=True,
                             neutral_tone_with_five=True)
        rates.append(jiwer.wer(" ".join(ref_py), " ".join(hyp_py)) if hyp_py else 1.0)
    return rates


def our_score(pairs):
    from ttsrl.scoring import error_rate

    return [error_rate(ref, hyp, "pinyin") for ref, hyp in pairs]


def timed(function, pairs):
    start = time.perf_counter()
    rates = function(pairs)
    return rates, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", default=str(REPO / "assets" / "zh_texts.jsonl"))
    parser.add_argument("--repeat-texts", type=int, default=1, help="use the text set this many times (new hypotheses)")
    args = parser.parse_args(argv)
    texts = [json.loads(line)["text"] for line in open(args.texts, encoding="utf-8")]
    pairs = []
    for round_ in range(args.repeat_texts):
        # A suffix makes each round's references new to our caches, as new prompts are in training.
        pairs += make_workload([t + "呀" * round_ for t in texts], seed=round_)
    ours, our_seconds = timed(our_score, pairs)
    theirs, their_seconds = timed(reference_score, pairs)
    with_numbers = [i for i, (ref, _) in enumerate(pairs) if any(c.isdigit() for c in ref)]
    spoken_numbers_zero = sum(1 for i in with_numbers if ours[i] == 0.0)
    spoken_numbers_zero_ref = sum(1 for i in with_numbers if theirs[i] == 0.0)
    print(f"{len(pairs)} pairs ({len(pairs) // 4} references x 4 distinct hypotheses), one core")
    print(f"| approach | seconds | pairs/s | pairs with numbers scored 0 |")
    print(f"|---|---|---|---|")
    print(f"| reference: wetext + lazy_pinyin + jiwer per pair | {their_seconds:.3f} | {len(pairs) / their_seconds:,.0f} "
          f"| {spoken_numbers_zero_ref}/{len(with_numbers)} |")
    print(f"| ours: ttsrl.scoring (cold caches) | {our_seconds:.3f} | {len(pairs) / our_seconds:,.0f} "
          f"| {spoken_numbers_zero}/{len(with_numbers)} |")
    print(f"speed-up: {their_seconds / our_seconds:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

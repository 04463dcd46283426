"""Stage 4 summary: every evaluated checkpoint -> table, plot, best checkpoint.

    python scripts/summarize_eval.py --eval-dir EXP/eval [--select-by cer|wer|pinyin|sim]

Reads EVAL_DIR/step_<N>/wer.json (from compute_wer.sh: the published metric, CER for a zh
set or WER for an en set, Seed-TTS-eval protocol; with the mean speaker similarity to the
prompts, ``speaker_similarity_mean``, when the server has a ``speaker`` model) and, when
present, per.json (our pinyin error rate of the same transcripts); step 0 is the base model.

Writes EVAL_DIR/cer_by_step.tsv, EVAL_DIR/cer_by_step.md, EVAL_DIR/cer_by_step.png (error
rates, and SIM on a second axis) and EVAL_DIR/best_step.txt, and prints the table. The best
step is chosen by ``--select-by``: ``cer`` (default) or ``wer`` (both: the set's published
error rate, lowest wins), ``pinyin`` (lowest pinyin error rate) or ``sim`` (highest speaker
similarity); ties go to the earlier step, and steps without the chosen metric are passed over.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from ttsrl.evaluation.summary import SELECT_BY, EvalError, summarize  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True)
    parser.add_argument("--select-by", choices=SELECT_BY, default="cer",
                        help="metric that picks best_step.txt: cer/wer (the set's published error rate), "
                             "pinyin (our pinyin error rate) or sim (speaker similarity, highest wins)")
    args = parser.parse_args(argv)
    try:
        result = summarize(Path(args.eval_dir), args.select_by)
    except EvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result["table"])
    winner = result["best"]
    scores = f"{winner['label']} {100 * winner['error_rate']:.2f}%"
    if winner.get("sim") is not None:
        scores += f", SIM {winner['sim']:.4f}"
    print(f"best checkpoint by {args.select_by}: step {winner['step']} ({scores}), "
          f"plot: {Path(args.eval_dir) / 'cer_by_step.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

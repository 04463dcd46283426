"""Stage 4 summary: every evaluated checkpoint -> table, plot, JSON summary, best checkpoint.

    python scripts/summarize_eval.py --eval-dir EXP/eval [--dev-dir EXP/eval/dev]
                                     [--select-by cer|wer|pinyin|sim|cer_sim] [--sim-tolerance 0.02]
                                     [--allow-missing]

Reads, for each set, SET_DIR/step_<N>/wer.json (from compute_wer.sh: the published metric,
CER for a zh set or WER for an en set, Seed-TTS-eval protocol; with the mean speaker
similarity to the prompts, ``speaker_similarity_mean``, when the server has a ``speaker``
model) and, when present, per.json (our pinyin error rate of the same transcripts); step 0
is the base model. The test set is --eval-dir; the dev set is --dev-dir.

The best step is chosen on the dev set when --dev-dir has scored steps, and the test set is
reported for it. Without them it is chosen on the test set, and the table, the JSON summary
and stderr carry the warning "best step chosen on the test set: optimistic; set
dev_manifest= or a dev slice". The chosen step must have a test score (else an error names
it); a step scored on one set only gets '-' in the other set's columns and a warning.

``--select-by``: ``cer`` (default) or ``wer`` (both: the set's published error rate, lowest
wins), ``pinyin`` (lowest pinyin error rate), ``sim`` (highest speaker similarity) or
``cer_sim`` (the zero_shot preset's default in run.sh, following its training objective: the
lowest error rate among the steps whose SIM is within --sim-tolerance of the best SIM); ties
go to the earlier step, and steps without the chosen metric are passed over.

Utterances without audio are left out of each set's means (Seed-TTS-eval's rule) and counted
in the ``missing`` columns. A step missing more of the choosing set's utterances than step 0
cannot be chosen (its means leave out its hardest utterances): the table's ``selection``
column says so; --allow-missing lifts the rule.

A set whose eval set declares several languages (a CV3-Eval folder of subsets, a JSONL with a
``language`` field; compute_wer.py then scores each utterance with its language's metric) gets
one more column per language, ``<set> <language> CER %`` or ``WER %``, and its rows in
summary.json a ``by_language`` entry (label, error_rate, utterances, missing_count).

Writes into EVAL_DIR:
  cer_by_step.md    the table (each set's columns, the best step marked), warnings, notes
  cer_by_step.tsv   the same numbers, one column per set and metric, ``best`` = 1 on the chosen step
  cer_by_step.png   error rates by step (test solid, dev dashed), SIM on a second axis
  summary.json      select_by, selected_on (dev|test), best_step, warnings, every step's rows per set
  best_step.txt     the chosen step (stages 5 and 6 read it), written last
and prints the table and the chosen step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from ttsrl.evaluation.summary import SELECT_BY, SIM_TOLERANCE, EvalError, describe, summarize  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, help="the test set's scores: step_N/wer.json folders")
    parser.add_argument("--dev-dir", default=None,
                        help="the dev set's scores (run.sh: EVAL_DIR/dev); when it has scored steps, the best "
                             "step is chosen on it")
    parser.add_argument("--select-by", choices=SELECT_BY, default="cer",
                        help="metric that picks best_step.txt: cer/wer (the set's published error rate), "
                             "pinyin (our pinyin error rate) or sim (speaker similarity, highest wins)")
    parser.add_argument("--sim-tolerance", type=float, default=SIM_TOLERANCE,
                        help="cer_sim: a SIM within this of the best counts as the best's (default %(default)s)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="let a step that misses more utterances than step 0 be chosen")
    args = parser.parse_args(argv)
    try:
        result = summarize(Path(args.eval_dir), args.select_by, Path(args.dev_dir) if args.dev_dir else None,
                           args.allow_missing, args.sim_tolerance)
    except EvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result["table"])
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    best = result["best"]
    scores = "; ".join(f"{name} {describe(best[name])}" for name in ("dev", "test") if name in result["labels"])
    print(f"best checkpoint by {args.select_by} on the {result['selected_on']} set: step {result['best_step']} "
          f"({scores}), plot: {Path(args.eval_dir) / 'cer_by_step.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 0: JSON/JSONL text records -> veRL RL parquet files (train.parquet, test.parquet).

Each input record needs a non-empty string ``text``; ``id``, ``prompt_text`` and
``prompt_wav`` are carried into ``extra_info`` when present. Output rows follow
veRL's RL schema::

    data_source   str
    prompt        [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
    ability       "text-to-speech"
    reward_model  {"style": "rule", "ground_truth": text}
    extra_info    {"split", "index", "text", ["id", "prompt_text", "prompt_wav"]}

Reference-compatible: ``python prepare_data.py --train_file F --test_file F --local_dir D``.
One input split deterministically: ``--train_file F --test_size N --seed S``.

Bad records (malformed JSON, missing or non-string ``text``, empty or
whitespace-only text, text over ``--max_chars``) stop the run with file:line
and reason for each (first 20, then a count) and nothing is written; with
``--skip_invalid`` they are skipped and counted by reason. Outputs are written
to temporary files and renamed only when both are complete.

Speed: clean JSONL is parsed and validated by Arrow's C++ JSON reader and
compute kernels, and the output columns are assembled from Arrow arrays, so
no Python object is made per row. Anything the fast path cannot vouch for
(a JSON array, a parse error, a non-string field, an invalid record) goes
through the line-by-line path, which knows file and line of every record.
"""
from __future__ import annotations

import argparse
import sys

from ttsrl.training.data import DataError, prepare


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True, help="JSON array or JSONL file of records with a 'text' field")
    parser.add_argument("--test_file", default=None, help="test records (else use --test_size)")
    parser.add_argument("--local_dir", required=True, help="output directory for train.parquet and test.parquet")
    parser.add_argument("--test_size", type=int, default=None, help="split this many test rows off --train_file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --test_size split (default 0)")
    parser.add_argument("--max_chars", type=int, default=None, help="texts longer than this are invalid")
    parser.add_argument("--dedup", action="store_true", help="keep only the first record of each text")
    parser.add_argument("--skip_invalid", action="store_true", help="skip invalid records instead of failing")
    parser.add_argument("--data_source", default=None, help="data_source column (default: train file name stem)")
    parser.add_argument("--hdfs_dir", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.hdfs_dir is not None:
        print("error: --hdfs_dir is not supported; copy --local_dir yourself", file=sys.stderr)
        return 2
    try:
        counts = prepare(args.train_file, args.local_dir, test_file=args.test_file, test_size=args.test_size,
                         seed=args.seed, max_chars=args.max_chars, dedup=args.dedup,
                         skip_invalid=args.skip_invalid, data_source=args.data_source)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"train: {counts['train']} rows, test: {counts['test']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())

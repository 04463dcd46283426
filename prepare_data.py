"""Stage 0: JSON/JSONL text records -> veRL RL parquet files (train.parquet, test.parquet)
and, with --dev_size, a dev set (dev.jsonl).

Each input record needs a non-empty string ``text``; ``id`` is carried into
``extra_info`` when present. Output rows follow veRL's RL schema::

    data_source   str
    prompt        [{"role": "user", "content": llm_prompt_text + normalized_text},
                   {"role": "assistant", "content": prompt speech tokens <|s_N|>... (trimmed)}]
    ability       "text-to-speech"
    reward_model  {"style": "rule", "ground_truth": text}   (the raw text: what the scorer compares with)
    extra_info    {"split", "index", "text", "normalized_text", "llm_prompt_text", "model_family",
                   "text_tokens", ["id", "language"],
                   zero-shot rows: "prompt_wav", "prompt_text", "prompt_id", "prompt_hash"}

The policy reads upstream CosyVoice's LLM input (``ttsrl.frontend``): the text normalized as
upstream normalizes it (wetext, or ttsfrd where it is installed), the prompt text as the
family's LLM reads it (CosyVoice2: normalized; CosyVoice3: its system prefix + transcript),
each tokenized on its own, then the prompt's speech tokens trimmed as upstream trims them.
The rollouts, the warm-up, DPO sampling and infer_dist.py build the ids from these fields with
the same module. Text-only rows have no prompt speech (CosyVoice2: the text alone; CosyVoice3:
its system prefix + the text). A text that normalizes to nothing to say, or that upstream
would synthesize as several LLM calls (longer than its 60-80 character/token segments), is a
bad record. Rows whose text is shorter than half their prompt text's are counted per split
(upstream warns about them).
A row is zero-shot when its record has its own ``prompt_wav`` (relative to the
record file's folder, or absolute) and ``prompt_text``, or when
``--train_prompts`` names a prompt set (a folder of wavs with .txt/.lab
transcripts, a JSONL of prompt_wav/prompt_text[/id/speaker], or a Seed-TTS-eval
meta.lst): each text without its own prompt is then paired with one of the
set's, deterministically by --seed and balanced across speakers.
``extra_info.prompt_hash`` is ``ttsrl.triton_client.speaker_prompt_key`` of the
prompt, the id the reward server caches it under.

Each distinct prompt's speech tokens come once from the reward server's
``speech_tokenizer`` (--server_url; start the server first) and are cached by
tokenizer and content hash in --prompt_token_cache: a second run with the same
prompts asks the server only the probe that names its tokenizer.

Reference-compatible: ``python prepare_data.py --train_file F --test_file F --local_dir D``.
One input split deterministically: ``--train_file F --test_size N --seed S``.
``--dev_size N`` holds N more rows out of train.parquet as ``dev.jsonl`` (the
``ttsrl.eval_sets`` JSONL layout), on which stage 4 chooses the best step.

No training on the test speakers: with --eval_manifest (and --dev_manifest), a training
speaker prompt (of --train_prompts, or a train_file record's own) whose recording (content
hash) or transcript is a prompt of that set stops the run, naming both files and lines
(``ttsrl.training.held_out``).

Bad records (malformed JSON, missing or non-string ``text``, empty or
whitespace-only text, text over ``--max_chars``, text with nothing left to score
after the reward scorer's normalization, such as punctuation only) stop the run
with file:line and reason for each (first 20, then a count) and nothing is
written; with ``--skip_invalid`` they are skipped and counted by reason. Bad
speaker prompts (wav missing, unreadable, under 1 s, over 30 s, below 16 kHz,
no transcript, refused by the speech tokenizer) stop it the same way; with
``--on_bad_prompt skip`` their records (or prompt-set entries) are skipped and
counted. Outputs are written to temporary files and renamed only when all are
complete.

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
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the --test_size and --dev_size splits and of prompt pairing (default 0)")
    parser.add_argument("--max_chars", type=int, default=None, help="texts longer than this are invalid")
    parser.add_argument("--dedup", action="store_true", help="keep only the first record of each text")
    parser.add_argument("--skip_invalid", action="store_true", help="skip invalid records instead of failing")
    parser.add_argument("--data_source", default=None, help="data_source column (default: train file name stem)")
    parser.add_argument("--train_prompts", default=None,
                        help="prompt set to pair texts with (folder of wavs + .txt/.lab, JSONL, or meta.lst); "
                             "default: none (text-only rows, except records with their own prompt_wav)")
    parser.add_argument("--on_bad_prompt", "--on-bad-prompt", choices=("fail", "skip"), default="fail",
                        help="a bad speaker prompt stops the run (fail, default) or is skipped and counted (skip)")
    parser.add_argument("--server_url", default=None,
                        help="reward server whose speech_tokenizer tokenizes the prompts "
                             "(default: the first of $REWARD_SERVER_URL, else the local default)")
    parser.add_argument("--prompt_token_cache", default=None,
                        help="JSON cache of prompt speech tokens by content hash (default: LOCAL_DIR/prompt_tokens.json)")
    parser.add_argument("--dev_size", type=int, default=0,
                        help="hold this many training rows out as LOCAL_DIR/dev.jsonl (default 0: none)")
    parser.add_argument("--eval_manifest", default=None,
                        help="the evaluation set (Seed-TTS-eval meta.lst, CV3-Eval folder or JSONL): no training "
                             "speaker prompt may share its recording or transcript with its prompts (not yet there: "
                             "logged and not checked)")
    parser.add_argument("--dev_manifest", default=None, help="a dev set, checked as --eval_manifest")
    parser.add_argument("--allow_held_out_prompts", action="store_true",
                        help="train on prompts of --eval_manifest/--dev_manifest all the same (a warning lists them)")
    parser.add_argument("--model_family", default=None, choices=("cosyvoice2", "cosyvoice3"),
                        help="the policy's family: its prompt layout (default $TTSRL_MODEL_FAMILY, else cosyvoice2)")
    parser.add_argument("--tokenizer", default=None,
                        help="the policy's converted model folder: measures long non-Chinese texts as upstream "
                             "splits them and records each text's token count (run.sh passes $hf_model_dir)")
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
                         skip_invalid=args.skip_invalid, data_source=args.data_source,
                         train_prompts=args.train_prompts or None, on_bad_prompt=args.on_bad_prompt,
                         server_url=args.server_url or None, prompt_token_cache=args.prompt_token_cache or None,
                         dev_size=args.dev_size,
                         held_out_sets={"evaluation set": args.eval_manifest, "dev set": args.dev_manifest},
                         allow_held_out=args.allow_held_out_prompts, model_family=args.model_family,
                         tokenizer=args.tokenizer or None)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(", ".join(f"{name}: {rows} rows" for name, rows in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 0 wall-clock on an AISHELL-3-sized input: ours vs the reference approach, same run.

Input: an 88,000-line JSONL ({"id", "text"}) built from assets/zh_texts.jsonl.
Reference approach (seed 000): datasets.load_dataset("json") + .map(make row) +
.to_parquet, no validation. Ours: prepare_data.py with full validation. Both run
as fresh processes, so interpreter start-up and imports are counted.

    .venv/bin/python benchmarks/bench_prepare_data.py [--lines 88000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

REFERENCE_SCRIPT = r'''
import sys, datasets
train_file, out = sys.argv[1], sys.argv[2]
dataset = datasets.load_dataset("json", data_files=train_file)["train"]
def make_row(example, idx):
    text = example.pop("text")
    return {"data_source": "bench", "prompt": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}],
            "ability": "text-to-speech", "reward_model": {"style": "rule", "ground_truth": text},
            "extra_info": {"split": "train", "index": idx, "text": text}}
dataset.map(make_row, with_indices=True).to_parquet(out + "/train.parquet")
'''


def write_input(path: Path, lines: int) -> None:
    texts = [json.loads(line)["text"] for line in open(REPO / "assets" / "zh_texts.jsonl", encoding="utf-8")]
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(lines):
            handle.write(json.dumps({"id": f"SSB{i:07d}", "text": texts[i % len(texts)] + f"（{i}）"},
                                    ensure_ascii=False) + "\n")


def run(command: list[str], env: dict) -> tuple[float, float]:
    """Wall-clock seconds and peak RSS (MiB) of one child process."""
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=88000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "metadata.jsonl"
        write_input(data, args.lines)
        env = dict(os.environ, HF_DATASETS_CACHE=str(tmp / "hf_cache"), PYTHONPATH=str(REPO))
        (tmp / "ours").mkdir()
        (tmp / "reference").mkdir()
        # Ours first: its peak RSS is read before the reference's child can raise the maximum.
        ours, our_rss = run([sys.executable, str(REPO / "prepare_data.py"), "--train_file", str(data),
                             "--test_size", "100", "--local_dir", str(tmp / "ours")], env)
        theirs, their_rss = run([sys.executable, "-c", REFERENCE_SCRIPT, str(data), str(tmp / "reference")], env)
    print(f"{args.lines} JSONL lines, wall-clock including interpreter start-up")
    print("| approach | seconds | peak RSS MiB |")
    print("|---|---|---|")
    print(f"| reference: datasets.load_dataset + map + to_parquet (no validation) | {theirs:.2f} | {their_rss:.0f} (max of both) |")
    print(f"| ours: prepare_data.py (full validation, train/test split) | {ours:.2f} | {our_rss:.0f} |")
    print(f"speed-up: {theirs / ours:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

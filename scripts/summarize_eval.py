"""Stage 4 summary: CER of every evaluated checkpoint -> table, plot, best checkpoint.

    python scripts/summarize_eval.py --eval-dir EXP/eval

Reads EVAL_DIR/step_<N>/wer.json (CER, from compute_wer.sh) and, when present,
per.json (pinyin error rate); step 0 is the base model. When any wer.json has a
speaker similarity (``speaker_similarity_mean``, from a server with a ``speaker``
model), the table and TSV get a SIM column (mean cosine similarity to the prompt). Writes
EVAL_DIR/cer_by_step.tsv, EVAL_DIR/cer_by_step.md, EVAL_DIR/cer_by_step.png and
EVAL_DIR/best_step.txt (the step with the lowest CER; ties go to the earlier
step), and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d+)$")


class EvalError(Exception):
    pass


def collect(eval_dir: Path) -> list[dict]:
    """One row per step_N folder that has a wer.json, sorted by step."""
    rows = []
    if not eval_dir.is_dir():
        raise EvalError(f"{eval_dir}: no such folder")
    for child in eval_dir.iterdir():
        match = STEP_DIR.match(child.name)
        if not match or not (child / "wer.json").exists():
            continue
        try:
            cer = json.loads((child / "wer.json").read_text(encoding="utf-8"))["summary"]
            per = None
            if (child / "per.json").exists():
                per = json.loads((child / "per.json").read_text(encoding="utf-8"))["summary"]["error_rate"]
        except (json.JSONDecodeError, KeyError) as error:
            raise EvalError(f"{child}: unreadable score file ({error})") from None
        rows.append({"step": int(match.group(1)), "cer": cer["error_rate"], "per": per,
                     "sim": cer.get("speaker_similarity_mean"),
                     "utterances": cer["utterances"], "missing": len(cer["missing"]), "dir": str(child)})
    if not rows:
        raise EvalError(f"{eval_dir}: no step_N/wer.json found (run inference and compute_wer.sh first)")
    return sorted(rows, key=lambda r: r["step"])


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: (r["cer"], r["step"]))


def has_similarity(rows: list[dict]) -> bool:
    return any(r.get("sim") is not None for r in rows)


def table(rows: list[dict]) -> str:
    winner = best(rows)["step"]
    with_sim = has_similarity(rows)
    lines = ["| step | CER % | pinyin ER % | " + ("SIM | " if with_sim else "") + "utterances | missing |",
             "|---:|---:|---:|" + ("---:|" if with_sim else "") + "---:|---:|"]
    for r in rows:
        per = f"{100 * r['per']:.2f}" if r["per"] is not None else "-"
        sim = (f"{r['sim']:.4f} | " if r.get("sim") is not None else "- | ") if with_sim else ""
        mark = " (best)" if r["step"] == winner else ""
        lines.append(f"| {r['step']}{mark} | {100 * r['cer']:.2f} | {per} | {sim}{r['utterances']} | {r['missing']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(steps, [100 * r["cer"] for r in rows], marker="o", label="CER")
    if all(r["per"] is not None for r in rows):
        axis.plot(steps, [100 * r["per"] for r in rows], marker="s", label="pinyin error rate")
    winner = best(rows)
    axis.annotate("best", (winner["step"], 100 * winner["cer"]), textcoords="offset points", xytext=(0, 8),
                  ha="center")
    axis.set_xlabel("training step (0: base model)")
    axis.set_ylabel("error rate (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summarize(eval_dir: Path) -> dict:
    rows = collect(eval_dir)
    with_sim = has_similarity(rows)
    tsv = ["step\tcer\tper\t" + ("sim\t" if with_sim else "") + "utterances\tmissing"]
    for r in rows:
        per = "" if r["per"] is None else f"{r['per']:.6f}"
        sim = ("" if r.get("sim") is None else f"{r['sim']:.6f}") + "\t" if with_sim else ""
        tsv.append(f"{r['step']}\t{r['cer']:.6f}\t{per}\t{sim}{r['utterances']}\t{r['missing']}")
    write_text(eval_dir / "cer_by_step.tsv", "\n".join(tsv) + "\n")
    markdown = table(rows)
    write_text(eval_dir / "cer_by_step.md", markdown + "\n")
    plot(rows, eval_dir / "cer_by_step.png")
    winner = best(rows)
    write_text(eval_dir / "best_step.txt", f"{winner['step']}\n")
    return {"rows": rows, "best": winner, "table": markdown}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True)
    args = parser.parse_args(argv)
    try:
        result = summarize(Path(args.eval_dir))
    except EvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result["table"])
    print(f"best checkpoint: step {result['best']['step']} (CER {100 * result['best']['cer']:.2f}%), "
          f"plot: {Path(args.eval_dir) / 'cer_by_step.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

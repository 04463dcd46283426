"""Stage 4 summary: the scores of every evaluated checkpoint (``EVAL_DIR/step_<N>/wer.json``
and ``per.json``, step 0 the base model) -> a table, a plot and the best step.
``scripts/summarize_eval.py`` documents the files and the choice of the best step."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ttsrl.atomic_write import atomic_file, write_text

STEP_DIR = re.compile(r"^step_(\d+)$")
SELECT_BY = ("cer", "wer", "pinyin", "sim")
_COLUMN = {"cer": "error_rate", "wer": "error_rate", "pinyin": "per", "sim": "sim"}


class EvalError(Exception):
    """Nothing to summarize, or score files that cannot be read together."""


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
            summary = json.loads((child / "wer.json").read_text(encoding="utf-8"))["summary"]
            per = None
            if (child / "per.json").exists():
                per = json.loads((child / "per.json").read_text(encoding="utf-8"))["summary"]["error_rate"]
            row = {"step": int(match.group(1)), "error_rate": summary["error_rate"], "per": per,
                   "label": summary.get("label", "CER"), "sim": summary.get("speaker_similarity_mean"),
                   "utterances": summary["utterances"], "missing": len(summary["missing"]),
                   "bad_prompt": len(summary.get("bad_prompt", [])), "dir": str(child)}
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise EvalError(f"{child}: unreadable score file ({error})") from None
        rows.append(row)
    if not rows:
        raise EvalError(f"{eval_dir}: no step_N/wer.json found (run inference and compute_wer.sh first)")
    labels = sorted({r["label"] for r in rows})
    if len(labels) > 1:
        raise EvalError(f"{eval_dir}: steps were scored with different metrics {labels} (one test set per eval dir)")
    return sorted(rows, key=lambda r: r["step"])


def best(rows: list[dict], select_by: str = "cer") -> dict:
    if select_by not in SELECT_BY:
        raise EvalError(f"unknown --select-by {select_by!r}; expected one of {SELECT_BY}")
    column = _COLUMN[select_by]
    scored = [r for r in rows if r.get(column) is not None]
    if not scored:
        raise EvalError(f"no step has a {select_by} score to select by"
                        + (" (the server serves no speaker model)" if select_by == "sim" else ""))
    sign = -1.0 if select_by == "sim" else 1.0
    return min(scored, key=lambda r: (sign * r[column], r["step"]))


def has_similarity(rows: list[dict]) -> bool:
    return any(r.get("sim") is not None for r in rows)


def table(rows: list[dict], select_by: str = "cer") -> str:
    winner = best(rows, select_by)["step"]
    with_sim = has_similarity(rows)
    label = rows[0]["label"]
    lines = [f"| step | {label} % | pinyin ER % | " + ("SIM | " if with_sim else "") + "utterances | missing | bad prompts |",
             "|---:|---:|---:|" + ("---:|" if with_sim else "") + "---:|---:|---:|"]
    for r in rows:
        per = f"{100 * r['per']:.2f}" if r["per"] is not None else "-"
        sim = (f"{r['sim']:.4f} | " if r.get("sim") is not None else "- | ") if with_sim else ""
        mark = " (best)" if r["step"] == winner else ""
        lines.append(f"| {r['step']}{mark} | {100 * r['error_rate']:.2f} | {per} | {sim}{r['utterances']} | "
                     f"{r['missing']} | {r['bad_prompt']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, select_by: str = "cer") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    label = rows[0]["label"]
    figure, axis = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    axis.plot(steps, [100 * r["error_rate"] for r in rows], marker="o", label=f"{label} (Seed-TTS-eval protocol)")
    if all(r["per"] is not None for r in rows):
        axis.plot(steps, [100 * r["per"] for r in rows], marker="s", label="pinyin error rate (ours)")
    handles, labels = axis.get_legend_handles_labels()
    if has_similarity(rows):
        sim_axis = axis.twinx()
        sim_rows = [r for r in rows if r.get("sim") is not None]
        sim_axis.plot([r["step"] for r in sim_rows], [r["sim"] for r in sim_rows], marker="^", color="tab:green",
                      label="SIM")
        sim_axis.set_ylabel("speaker similarity")
        more_handles, more_labels = sim_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    winner = best(rows, select_by)
    axis.annotate(f"best by {select_by}", (winner["step"], 100 * winner["error_rate"]), textcoords="offset points",
                  xytext=(0, 8), ha="center")
    axis.set_xlabel("training step (0: base model)")
    axis.set_ylabel("error rate (%)")
    axis.grid(alpha=0.3)
    axis.legend(handles, labels, fontsize="small")
    figure.tight_layout()
    try:
        with atomic_file(path) as tmp:
            figure.savefig(tmp)
    finally:
        plt.close(figure)


def summarize(eval_dir: Path, select_by: str = "cer") -> dict:
    rows = collect(eval_dir)
    winner = best(rows, select_by)
    with_sim = has_similarity(rows)
    metric = rows[0]["label"].lower()
    tsv = [f"step\t{metric}\tper\t" + ("sim\t" if with_sim else "") + "utterances\tmissing\tbad_prompt"]
    for r in rows:
        per = "" if r["per"] is None else f"{r['per']:.6f}"
        sim = ("" if r.get("sim") is None else f"{r['sim']:.6f}") + "\t" if with_sim else ""
        tsv.append(f"{r['step']}\t{r['error_rate']:.6f}\t{per}\t{sim}{r['utterances']}\t{r['missing']}\t{r['bad_prompt']}")
    write_text(eval_dir / "cer_by_step.tsv", "\n".join(tsv) + "\n")
    markdown = table(rows, select_by)
    write_text(eval_dir / "cer_by_step.md", markdown + "\n")
    plot(rows, eval_dir / "cer_by_step.png", select_by)
    write_text(eval_dir / "best_step.txt", f"{winner['step']}\n")
    return {"rows": rows, "best": winner, "table": markdown, "select_by": select_by}

"""Stage 4 summary: the scores of every evaluated checkpoint on two sets -> a table, a plot, a
JSON summary and the best step.

- the test set: ``EVAL_DIR/step_<N>/wer.json`` (and ``per.json``), step 0 the base model;
- the dev set (optional): ``DEV_DIR/step_<N>/wer.json`` (and ``per.json``), run.sh's
  ``EVAL_DIR/dev``.

The best step is chosen on the dev set when it has scores, so the test numbers reported for
that step are not the ones that picked it; without dev scores it is chosen on the test set,
and every output says that this is optimistic. ``scripts/summarize_eval.py`` documents the
files.

Selection (``select_by``): ``cer``/``wer`` (the lowest published error rate), ``pinyin``,
``sim`` (the highest SIM), or ``cer_sim``, the zero_shot preset's default, which follows its
training objective (error rate and similarity together): among the steps whose SIM is within
``sim_tolerance`` (0.02) of the best SIM on the set, the lowest error rate. A step that only
read better by losing its voice is passed over, and a SIM difference within the tolerance
(about the spread between repeated evaluations of one checkpoint) does not outweigh the error
rate. Without SIM scores it is the error rate alone, with a warning.

Missing audio counts against a step: a step with more utterances without audio (or
transcript) than step 0 (the base model; without a step 0, the fewest of any step) on the set
that chooses cannot be chosen, since its means leave its hardest utterances out; the table's
``selection`` column says why. ``allow_missing`` lifts this rule.

A set scored per language (its wer.json summary has ``by_language``: the eval set declared
languages, ``ttsrl.evaluation.wer``) gets a ``by_language`` entry in each of its rows in
summary.json and, when it holds more than one language (a single-language column would
repeat the set's own), one column per language after its usual ones, with that language's
own metric (``<set> <language> <CER|WER> %``); a set without languages looks exactly as before.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ttsrl.atomic_write import atomic_file, write_json, write_text

STEP_DIR = re.compile(r"^step_(\d+)$")
SELECT_BY = ("cer", "wer", "pinyin", "sim", "cer_sim")
SIM_TOLERANCE = 0.02
"""``cer_sim``: SIM within this of the best counts as the best's (module doc)."""
SETS = ("dev", "test")
_COLUMN = {"cer": "error_rate", "wer": "error_rate", "pinyin": "per", "sim": "sim", "cer_sim": "error_rate"}
TEST_SELECTION_WARNING = "best step chosen on the test set: optimistic; set dev_manifest= or a dev slice"
MISSING_NOTE = ("missing: utterances without audio (or a transcript), left out of that set's means as "
                "Seed-TTS-eval's run_wer.py leaves them out; read each mean with its count")


class EvalError(Exception):
    """Nothing to summarize, or score files that cannot be read together."""


def collect(eval_dir: Path) -> list[dict]:
    """One row per step_N folder that has a wer.json, sorted by step. A row's ``error_rate``
    is None when none of the set's utterances had audio."""
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
                   "utterances": summary["utterances"],
                   "missing": summary.get("missing_count", len(summary["missing"])),
                   "bad_prompt": len(summary.get("bad_prompt", [])), "dir": str(child)}
            if summary.get("by_language"):
                row["by_language"] = {language: {key: part[key] for key in
                                                 ("label", "error_rate", "utterances", "missing_count")}
                                      for language, part in summary["by_language"].items()}
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise EvalError(f"{child}: unreadable score file ({error})") from None
        rows.append(row)
    if not rows:
        raise EvalError(f"{eval_dir}: no step_N/wer.json found (run inference and compute_wer.sh first)")
    labels = sorted({r["label"] for r in rows})
    if len(labels) > 1:
        raise EvalError(f"{eval_dir}: steps were scored with different metrics {labels} (one set per folder)")
    return sorted(rows, key=lambda r: r["step"])


def excluded(rows: list[dict], allow_missing: bool = False) -> dict[int, str]:
    """{step: why it cannot be chosen}: more utterances without audio than step 0 (or than the
    fewest of any step when there is no step 0), unless ``allow_missing``."""
    if allow_missing or not rows:
        return {}
    base = next((r for r in rows if r["step"] == 0), None)
    allowed = base["missing"] if base is not None else min(r["missing"] for r in rows)
    what = "step 0's" if base is not None else "the fewest of any step,"
    return {r["step"]: f"{r['missing']} missing > {what} {allowed}" for r in rows if r["missing"] > allowed}


def best(rows: list[dict], select_by: str = "cer", set_name: str = "test", allow_missing: bool = False,
         sim_tolerance: float = SIM_TOLERANCE) -> dict:
    """The row with the best ``select_by`` score (module doc: lowest error rate, highest SIM,
    or cer_sim); ties go to the earlier step, rows without the score or ``excluded`` for their
    missing audio are passed over."""
    if select_by not in SELECT_BY:
        raise EvalError(f"unknown --select-by {select_by!r}; expected one of {SELECT_BY}")
    column = _COLUMN[select_by]
    barred = excluded(rows, allow_missing)
    scored = [r for r in rows if r.get(column) is not None and r["step"] not in barred]
    if not scored:
        why = " (the server serves no speaker model)" if select_by == "sim" else ""
        if barred and any(r.get(column) is not None for r in rows):
            why = f" that is not missing more audio than step 0 ({'; '.join(f'step {s}: {w}' for s, w in barred.items())}; " \
                  "--allow-missing lifts this)"
        raise EvalError(f"no step has a {select_by} score on the {set_name} set to select by{why}")
    if select_by == "cer_sim":
        with_sim = [r for r in scored if r.get("sim") is not None]
        if with_sim:
            top = max(r["sim"] for r in with_sim)
            scored = [r for r in with_sim if r["sim"] >= top - sim_tolerance]
    sign = -1.0 if select_by == "sim" else 1.0
    return min(scored, key=lambda r: (sign * r[column], r["step"]))


def has_similarity(rows: list[dict]) -> bool:
    return any(r.get("sim") is not None for r in rows)


def _by_step(rows: list[dict] | None) -> dict[int, dict]:
    return {r["step"]: r for r in rows or []}


def merge_steps(dev_rows: list[dict] | None, test_rows: list[dict]) -> list[dict]:
    """{step, dev, test} for every step either set scored; a set that did not score it has None."""
    dev, test = _by_step(dev_rows), _by_step(test_rows)
    return [{"step": step, "dev": dev.get(step), "test": test.get(step)} for step in sorted(set(dev) | set(test))]


def read_dev_rows(dev_dir: Path | None) -> tuple[list[dict] | None, str | None]:
    """The dev rows, or (None, why there are none) when there is no dev dir or no scored step in it."""
    if dev_dir is None:
        return None, "no --dev-dir"
    if not dev_dir.is_dir():
        return None, f"--dev-dir {dev_dir} does not exist"
    if not any(STEP_DIR.match(c.name) and (c / "wer.json").exists() for c in dev_dir.iterdir()):
        return None, f"--dev-dir {dev_dir} has no step_N/wer.json"
    return collect(dev_dir), None


def choose(dev_rows: list[dict] | None, test_rows: list[dict], select_by: str,
           dev_dir: Path | None = None, eval_dir: Path | None = None, allow_missing: bool = False,
           sim_tolerance: float = SIM_TOLERANCE) -> tuple[int, str]:
    """(best step, the set that selected it: dev or test). The chosen step must have a test score."""
    if not dev_rows:
        return best(test_rows, select_by, "test", allow_missing, sim_tolerance)["step"], "test"
    step = best(dev_rows, select_by, "dev", allow_missing, sim_tolerance)["step"]
    if step not in _by_step(test_rows):
        test_file = Path(eval_dir or ".") / f"step_{step}" / "wer.json"
        dev_folder = Path(dev_dir or ".") / f"step_{step}"
        raise EvalError(f"step {step} was chosen on the dev set by {select_by} but has no test score ({test_file} "
                        f"is missing): evaluate step {step} on the test set (run stage 4 again), or remove "
                        f"{dev_folder} to choose among the steps both sets scored")
    return step, "dev"


def notes(steps: list[dict], best_step: int, selected_on: str, select_by: str, no_dev_why: str | None,
          allow_missing: bool = False, sim_tolerance: float = SIM_TOLERANCE) -> dict:
    """What the reader of the table must know: warnings (the selection is optimistic, a step
    is scored on one set only, the chosen step lacks audio, steps barred for missing audio) and
    the notes that explain the columns; ``selection``: {step: why it could not be chosen}."""
    warnings, lines = [], []
    selecting = [s[selected_on] for s in steps if s[selected_on] is not None]
    barred = excluded(selecting, allow_missing)
    if barred:
        warnings.append(f"step(s) {', '.join(map(str, barred))} cannot be chosen: more {selected_on} utterances "
                        "without audio than the base model (see the selection column; --allow-missing, "
                        "eval_allow_missing=true, lifts this)")
    if select_by == "cer_sim" and not any(r.get("sim") is not None for r in selecting):
        warnings.append(f"cer_sim without SIM scores on the {selected_on} set: chosen by the error rate alone")
    if selected_on == "test":
        warnings.append(TEST_SELECTION_WARNING + (f" ({no_dev_why})" if no_dev_why else ""))
    else:
        for name, other in (("dev", "test"), ("test", "dev")):
            only = [str(s["step"]) for s in steps if s[name] is not None and s[other] is None]
            if only:
                warnings.append(f"step(s) {', '.join(only)} scored on the {name} set only ('-' in the {other} "
                                "columns)")
    chosen = next(s for s in steps if s["step"] == best_step)[selected_on]
    if chosen["missing"]:
        warnings.append(f"the chosen step {best_step} has {chosen['missing']} {selected_on} utterance(s) without "
                        f"audio, left out of its {selected_on} means: compare the missing column across steps")
    metric = {"pinyin": "lowest pinyin error rate", "sim": "highest SIM",
              "cer_sim": f"lowest {chosen['label']} among the steps whose SIM is within {sim_tolerance} of the "
                         "best"}.get(select_by) or f"lowest {chosen['label']}"
    reported = "; the test columns report it" if selected_on == "dev" else ""
    lines.append(f"best step: {best_step}, chosen on the {selected_on} set by {select_by} ({metric}){reported}")
    lines.append(MISSING_NOTE)
    return {"warnings": warnings, "notes": lines, "selection": barred}


def _set_names(steps: list[dict]) -> list[str]:
    return [name for name in SETS if any(s[name] is not None for s in steps)]


def _columns(steps: list[dict], name: str) -> tuple[str, bool]:
    rows = [s[name] for s in steps if s[name] is not None]
    return rows[0]["label"], has_similarity(rows)


def _languages(steps: list[dict], name: str) -> list[tuple[str, str]]:
    """(language, its metric label) for every language any row of the set was scored in; none
    for a set of one language (its columns already are that language's)."""
    labels = {}
    for s in steps:
        for language, part in ((s[name] or {}).get("by_language") or {}).items():
            labels.setdefault(language, part["label"])
    return sorted(labels.items()) if len(labels) > 1 else []


def _language_rates(row: dict, languages: list[tuple[str, str]]) -> list:
    """The row's error rate in each language (None where it has none)."""
    parts = row.get("by_language") or {}
    return [(parts.get(language) or {}).get("error_rate") for language, _ in languages]


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def table(steps: list[dict], best_step: int, info: dict) -> str:
    """The markdown table: a step per line, each set's columns ('-' where the set has no
    score), the chosen step marked, then the warnings and notes."""
    header, rule = ["step"], ["---:"]
    sets = _set_names(steps)
    for name in sets:
        label, with_sim = _columns(steps, name)
        more = [f"{name} {label} %", f"{name} pinyin ER %"] + ([f"{name} SIM"] if with_sim else []) + \
            [f"{name} utterances", f"{name} missing", f"{name} bad prompts"] + \
            [f"{name} {language} {language_label} %" for language, language_label in _languages(steps, name)]
        header += more
        rule += ["---:"] * len(more)
    header.append("selection")
    rule.append(":---")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for s in steps:
        cells = [f"{s['step']}" + (" (best)" if s["step"] == best_step else "")]
        for name in sets:
            _, with_sim = _columns(steps, name)
            languages = _languages(steps, name)
            r = s[name]
            width = (6 if with_sim else 5) + len(languages)
            if r is None:
                cells += ["-"] * width
                continue
            cells += [_percent(r["error_rate"]), _percent(r["per"])]
            if with_sim:
                cells.append("-" if r.get("sim") is None else f"{r['sim']:.4f}")
            cells += [str(r["utterances"]), str(r["missing"]), str(r["bad_prompt"])]
            cells += [_percent(rate) for rate in _language_rates(r, languages)]
        barred = info.get("selection", {}).get(s["step"])
        cells.append("best" if s["step"] == best_step else (f"excluded: {barred}" if barred else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"warning: {w}" for w in info["warnings"]] + info["notes"]
    return "\n".join(lines)


def tsv(steps: list[dict], best_step: int) -> str:
    sets = _set_names(steps)
    header = ["step"]
    for name in sets:
        label, with_sim = _columns(steps, name)
        header += [f"{name}_{label.lower()}", f"{name}_per"] + ([f"{name}_sim"] if with_sim else []) + \
            [f"{name}_utterances", f"{name}_missing", f"{name}_bad_prompt"] + \
            [f"{name}_{language}_{language_label.lower()}" for language, language_label in _languages(steps, name)]
    header.append("best")
    lines = ["\t".join(header)]
    for s in steps:
        cells = [str(s["step"])]
        for name in sets:
            _, with_sim = _columns(steps, name)
            languages = _languages(steps, name)
            r = s[name]
            if r is None:
                cells += [""] * ((6 if with_sim else 5) + len(languages))
                continue
            cells += ["" if r[key] is None else f"{r[key]:.6f}" for key in ("error_rate", "per")]
            if with_sim:
                cells.append("" if r.get("sim") is None else f"{r['sim']:.6f}")
            cells += [str(r["utterances"]), str(r["missing"]), str(r["bad_prompt"])]
            cells += ["" if rate is None else f"{rate:.6f}" for rate in _language_rates(r, languages)]
        cells.append("1" if s["step"] == best_step else "0")
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def plot(steps: list[dict], path: Path, best_step: int, selected_on: str, select_by: str) -> None:
    """Error rates by step (a colour per metric; test solid, dev dashed), SIM on a second axis,
    the chosen step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.0, 4.0), dpi=120)
    sim_axis = None
    for name in _set_names(steps):
        rows = [s[name] for s in steps if s[name] is not None]
        style = "--" if name == "dev" else "-"
        label = rows[0]["label"]
        scored = [r for r in rows if r["error_rate"] is not None]
        axis.plot([r["step"] for r in scored], [100 * r["error_rate"] for r in scored], style, marker="o",
                  color="tab:blue", label=f"{name} {label} (Seed-TTS-eval protocol)")
        with_per = [r for r in rows if r["per"] is not None]
        if with_per:
            axis.plot([r["step"] for r in with_per], [100 * r["per"] for r in with_per], style, marker="s",
                      color="tab:orange", label=f"{name} pinyin error rate (ours)")
        with_sim = [r for r in rows if r.get("sim") is not None]
        if with_sim:
            sim_axis = sim_axis or axis.twinx()
            sim_axis.plot([r["step"] for r in with_sim], [r["sim"] for r in with_sim], style, marker="^",
                          color="tab:green", label=f"{name} SIM")
    handles, labels = axis.get_legend_handles_labels()
    if sim_axis is not None:
        sim_axis.set_ylabel("speaker similarity")
        more_handles, more_labels = sim_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.axvline(best_step, color="gray", alpha=0.5, linestyle=":")
    how = f"best step {best_step}: chosen on the {selected_on} set by {select_by}"
    axis.set_title(how + (" (optimistic)" if selected_on == "test" else ""), fontsize="medium")
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


def summarize(eval_dir: Path, select_by: str = "cer", dev_dir: Path | None = None, allow_missing: bool = False,
              sim_tolerance: float = SIM_TOLERANCE) -> dict:
    """Read both sets, choose the best step, write EVAL_DIR/cer_by_step.{tsv,md,png},
    summary.json and best_step.txt (last, so it names a step whose summary is written)."""
    test_rows = collect(eval_dir)
    dev_rows, no_dev_why = read_dev_rows(dev_dir)
    best_step, selected_on = choose(dev_rows, test_rows, select_by, dev_dir, eval_dir, allow_missing, sim_tolerance)
    steps = merge_steps(dev_rows, test_rows)
    info = notes(steps, best_step, selected_on, select_by, no_dev_why, allow_missing, sim_tolerance)
    markdown = table(steps, best_step, info)
    chosen = next(s for s in steps if s["step"] == best_step)
    result = {"eval_dir": str(eval_dir), "dev_dir": None if dev_dir is None else str(dev_dir),
              "select_by": select_by, "selected_on": selected_on, "best_step": best_step, "best": chosen,
              "allow_missing": allow_missing, "sim_tolerance": sim_tolerance,
              "excluded": {str(k): v for k, v in info["selection"].items()},
              "labels": {name: _columns(steps, name)[0] for name in _set_names(steps)},
              "warnings": info["warnings"], "notes": info["notes"], "steps": steps}
    write_text(eval_dir / "cer_by_step.tsv", tsv(steps, best_step))
    write_text(eval_dir / "cer_by_step.md", markdown + "\n")
    plot(steps, eval_dir / "cer_by_step.png", best_step, selected_on, select_by)
    write_json(eval_dir / "summary.json", result, indent=1)
    write_text(eval_dir / "best_step.txt", f"{best_step}\n")
    return {**result, "table": markdown}


def describe(row: dict | None) -> str:
    """``CER 5.00%, SIM 0.7500`` for one set's row."""
    if row is None:
        return "not scored"
    text = f"{row['label']} {_percent(row['error_rate'])}%"
    if row.get("sim") is not None:
        text += f", SIM {row['sim']:.4f}"
    if row["missing"]:
        text += f", {row['missing']} missing"
    return text

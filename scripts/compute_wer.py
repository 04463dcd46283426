"""Corpus error rate of ASR transcripts against reference texts (text mode).

    python scripts/compute_wer.py --ref REF --hyp HYP [--metric pinyin|char] [--json OUT] [--details OUT]

REF and HYP hold ``utt_id text`` lines (the text may be empty in HYP). Scoring is
ttsrl.scoring: texts are normalized, numbers may be read any accepted way, and
``pinyin`` compares TONE3 syllables (homophones match) while ``char`` compares
characters. An utterance missing from HYP counts as deleted in full and is
listed; a duplicate id in either file is an error.

The last line printed is the summary, Kaldi style::

    %PER 4.35 [ 12 / 276, 2 ins, 3 del, 7 sub ] 20 utterances, 1 missing from hyp

Per-utterance details go to --details (default: printed before the summary);
--json writes the summary plus every utterance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from ttsrl.scoring import METRICS, EmptyReferenceError, align  # noqa: E402

METRIC_LABEL = {"pinyin": "PER", "char": "CER"}


class TranscriptError(Exception):
    """A transcript file is malformed; the message names file and line."""


def read_transcripts(path: str, allow_empty_text: bool) -> dict[str, str]:
    """``utt_id text`` lines -> {utt_id: text}; blank lines are skipped."""
    transcripts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise TranscriptError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise TranscriptError(f"{path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        utt_id, _, text = line.partition(" ")
        text = text.strip()
        if utt_id in transcripts:
            raise TranscriptError(f"{path}:{number}: duplicate utterance id {utt_id!r} (first on line {first_line[utt_id]})")
        if not text and not allow_empty_text:
            raise TranscriptError(f"{path}:{number}: utterance {utt_id!r} has no reference text")
        transcripts[utt_id] = text
        first_line[utt_id] = number
    return transcripts


@dataclass
class UtteranceScore:
    utt_id: str
    reference: str
    hypothesis: str | None  # None: missing from the hypotheses
    substitutions: int
    deletions: int
    insertions: int
    ref_length: int
    error_rate: float
    aligned_reference: str = ""
    aligned_hypothesis: str = ""


@dataclass
class CorpusScore:
    metric: str
    utterances: list[UtteranceScore] = field(default_factory=list)
    extra_hypotheses: list[str] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(u, name) for u in self.utterances)

    @property
    def errors(self) -> int:
        return self.total("substitutions") + self.total("deletions") + self.total("insertions")

    @property
    def error_rate(self) -> float:
        length = self.total("ref_length")
        return self.errors / length if length else 0.0

    @property
    def missing(self) -> list[str]:
        return [u.utt_id for u in self.utterances if u.hypothesis is None]

    def summary_line(self) -> str:
        line = (f"%{METRIC_LABEL[self.metric]} {100 * self.error_rate:.2f} [ {self.errors} / {self.total('ref_length')}, "
                f"{self.total('insertions')} ins, {self.total('deletions')} del, {self.total('substitutions')} sub ] "
                f"{len(self.utterances)} utterances")
        if self.missing:
            line += f", {len(self.missing)} missing from hyp"
        return line

    def summary(self) -> dict:
        return {"metric": self.metric, "error_rate": self.error_rate, "errors": self.errors,
                "substitutions": self.total("substitutions"), "deletions": self.total("deletions"),
                "insertions": self.total("insertions"), "ref_length": self.total("ref_length"),
                "utterances": len(self.utterances), "missing": self.missing,
                "extra_hypotheses": self.extra_hypotheses}


def score_corpus(references: dict[str, str], hypotheses: dict[str, str], metric: str = "pinyin") -> CorpusScore:
    """Score every reference utterance; a missing hypothesis is scored as an empty one and flagged."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    result = CorpusScore(metric, extra_hypotheses=sorted(set(hypotheses) - set(references)))
    for utt_id, reference in references.items():
        hypothesis = hypotheses.get(utt_id)
        try:
            alignment = align(reference, hypothesis or "", metric)
        except EmptyReferenceError as error:
            raise TranscriptError(f"utterance {utt_id!r}: {error}") from None
        result.utterances.append(UtteranceScore(
            utt_id, reference, hypothesis, alignment.substitutions, alignment.deletions, alignment.insertions,
            alignment.ref_length, alignment.error_rate, " ".join(alignment.reference), " ".join(alignment.hypothesis)))
    return result


def format_details(result: CorpusScore, worst: int = 10) -> str:
    """Per-utterance lines (file order), then the worst utterances and the missing ones."""
    label = METRIC_LABEL[result.metric]
    lines = [f"# per utterance: id {label}% errors/ref_length (sub del ins)"]
    for u in result.utterances:
        lines.append(f"{u.utt_id} {100 * u.error_rate:.2f} {u.substitutions + u.deletions + u.insertions}/{u.ref_length}"
                     f" ({u.substitutions} {u.deletions} {u.insertions})")
        lines.append(f"  ref: {u.reference}")
        lines.append(f"  hyp: {u.hypothesis if u.hypothesis is not None else '<missing>'}")
    ranked = sorted(result.utterances, key=lambda u: (-u.error_rate, u.utt_id))[:worst]
    lines.append(f"# worst {len(ranked)} utterances")
    lines += [f"{u.utt_id} {100 * u.error_rate:.2f}" for u in ranked]
    if result.missing:
        lines.append(f"# missing from hyp ({len(result.missing)}): " + " ".join(result.missing))
    if result.extra_hypotheses:
        lines.append(f"# in hyp but not in ref, not scored ({len(result.extra_hypotheses)}): "
                     + " ".join(result.extra_hypotheses))
    return "\n".join(lines)


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_json(result: CorpusScore, path: str) -> None:
    payload = {"summary": result.summary(), "utterances": [asdict(u) for u in result.utterances]}
    write_atomically(path, json.dumps(payload, ensure_ascii=False, indent=1) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="reference transcripts: 'utt_id text' lines")
    parser.add_argument("--hyp", required=True, help="hypothesis transcripts: 'utt_id text' lines")
    parser.add_argument("--metric", choices=METRICS, default="pinyin")
    parser.add_argument("--json", default=None, help="write the summary and per-utterance scores here")
    parser.add_argument("--details", default=None, help="write per-utterance details here (default: stdout)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        references = read_transcripts(args.ref, allow_empty_text=False)
        hypotheses = read_transcripts(args.hyp, allow_empty_text=True)
        if not references:
            raise TranscriptError(f"{args.ref}: no utterances")
        result = score_corpus(references, hypotheses, args.metric)
    except TranscriptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    details = format_details(result)
    if args.details:
        write_atomically(args.details, details + "\n")
    else:
        print(details)
    if args.json:
        write_json(result, args.json)
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

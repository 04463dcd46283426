"""Error rate of ASR transcripts against reference texts, the published protocol's or ours,
and the files it is reported in (``scripts/compute_wer.py`` documents the metrics, the
summary line and wer.txt/wer.json).

- ``protocol``: CER for zh, WER for en, as Seed-TTS-eval scores zero-shot TTS
  (``ttsrl.protocol_scoring``; the set's figure is the mean of the utterance rates);
- ``pinyin`` / ``char``: our own scoring (``ttsrl.scoring``), the reward's.

An utterance with no transcript (no wav, a failed transcription, an id missing from the
hypotheses) is left out of every metric's figure, as Seed-TTS-eval's ``run_wer.py`` leaves
out an utterance whose wav does not exist, and is listed and counted on its own
(``missing``, ``missing_count``). An empty transcript is a transcript: every reference
token deleted.

Per-utterance languages (``score_corpus(..., languages=...)``; ``ttsrl.language``): each
utterance is scored with its language's metric (protocol, ``ttsrl.protocol_scoring``: zh CER
and en WER as Seed-TTS-eval, ja and ko CER as CosyVoice3-Eval; ours: pinyin/char for zh, WER
for en, CER for ja and ko),
the overall figures cover every utterance as before, and the summary gets ``by_language``:
the same figures for each language's utterances. Without ``languages`` nothing changes: one
language for the whole set, no ``by_language``.

Transcript files hold ``utt_id text`` lines.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ttsrl.atomic_write import write_json, write_text
from ttsrl.eval_sets import detect_language
from ttsrl.language import detect_language as detect_text_language, normalize_language
from ttsrl.protocol_scoring import LANGUAGES, mean_error_rate, metric_of, protocol_align
from ttsrl.scoring import METRICS as OUR_METRICS, EmptyReferenceError, align, metric_name

METRICS = ("protocol",) + OUR_METRICS
METRIC_LABEL = {"pinyin": "PER", "char": "CER", "wer": "WER", "cer": "CER"}


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
    hypothesis: str
    substitutions: int
    deletions: int
    insertions: int
    ref_length: int
    error_rate: float
    aligned_reference: str = ""
    aligned_hypothesis: str = ""
    speaker_similarity: float | None = None  # cosine to the prompt's speaker embedding, when computed
    language: str = ""  # the language it was scored as (per-utterance languages only)


@dataclass
class CorpusScore:
    metric: str
    utterances: list[UtteranceScore] = field(default_factory=list)
    extra_hypotheses: list[str] = field(default_factory=list)
    similarity: "SimilarityResult | None" = None  # wav mode with a served speaker model
    language: str = ""  # protocol metric: zh (CER) or en (WER)
    bad_prompt: list[str] = field(default_factory=list)  # skipped by infer_dist for a bad prompt, not scored
    # References without a transcript, left out of the figures (Seed-TTS-eval's rule), in reference order;
    # missing_reasons says why where the caller knows (wav mode: no wav, transcription failed).
    missing: list[str] = field(default_factory=list)
    missing_reasons: dict[str, str] = field(default_factory=dict)
    # Per-utterance languages: utt_id -> language of every reference (missing ones too); empty: one for the set.
    languages: dict[str, str] = field(default_factory=dict)
    group_language: str = ""  # set on the parts of by_language

    @property
    def label(self) -> str:
        if self.group_language:
            if self.metric == "protocol":
                return metric_of(self.group_language).upper()
            return METRIC_LABEL[metric_name(self.metric, self.group_language)]
        return metric_of(self.language).upper() if self.metric == "protocol" else METRIC_LABEL[self.metric]

    def by_language(self) -> dict:
        """language -> the figures of its utterances alone (empty without per-utterance languages)."""
        groups = {}
        for language in sorted(set(self.languages.values())):
            part = CorpusScore(self.metric, [u for u in self.utterances if u.language == language],
                               language=self.language, group_language=language,
                               missing=[m for m in self.missing if self.languages.get(m) == language])
            groups[language] = {"label": part.label, "error_rate": part.error_rate,
                                "corpus_error_rate": part.corpus_error_rate, "errors": part.errors,
                                "ref_length": part.total("ref_length"), "utterances": len(part.utterances),
                                "missing_count": len(part.missing)}
        return groups

    def by_language_lines(self) -> list[str]:
        """One line per language: ``zh %CER 1.23 [ 4 / 325 ] 10 utterances``."""
        lines = []
        for language, part in self.by_language().items():
            rate = "n/a" if part["error_rate"] is None else f"{100 * part['error_rate']:.2f}"
            lines.append(f"{language} %{part['label']} {rate} [ {part['errors']} / {part['ref_length']} ] "
                         f"{part['utterances']} utterances" + (f", {part['missing_count']} missing"
                                                               if part["missing_count"] else ""))
        return lines

    def total(self, name: str) -> int:
        return sum(getattr(u, name) for u in self.utterances)

    @property
    def errors(self) -> int:
        return self.total("substitutions") + self.total("deletions") + self.total("insertions")

    @property
    def corpus_error_rate(self) -> float | None:
        """Errors over all reference tokens of the scored utterances; None when none was scored."""
        length = self.total("ref_length")
        return self.errors / length if length else None

    @property
    def error_rate(self) -> float | None:
        """The set's figure: the protocol's mean of utterance rates, or our corpus rate, over the
        utterances that have a transcript; None when none has (a 0.0 would read as perfect)."""
        if self.metric == "protocol":
            return mean_error_rate(u.error_rate for u in self.utterances)
        return self.corpus_error_rate

    def summary_line(self) -> str:
        rate = "n/a" if self.error_rate is None else f"{100 * self.error_rate:.2f}"
        line = (f"%{self.label} {rate} [ {self.errors} / {self.total('ref_length')}, "
                f"{self.total('insertions')} ins, {self.total('deletions')} del, {self.total('substitutions')} sub ] "
                f"{len(self.utterances)} utterances")
        if self.metric == "protocol":
            line += f", Seed-TTS-eval protocol ({self.language}, mean of utterance rates)"
        if self.missing:
            line += f", {len(self.missing)} missing (no transcript, left out)"
        if self.bad_prompt:
            line += f", {len(self.bad_prompt)} skipped for a bad prompt"
        return line

    def summary(self) -> dict:
        protocol = {"language": self.language, "label": self.label} if self.metric == "protocol" else {}
        return {"metric": self.metric, **protocol, "error_rate": self.error_rate,
                "corpus_error_rate": self.corpus_error_rate, "errors": self.errors,
                "substitutions": self.total("substitutions"), "deletions": self.total("deletions"),
                "insertions": self.total("insertions"), "ref_length": self.total("ref_length"),
                "utterances": len(self.utterances), "missing": self.missing, "missing_count": len(self.missing),
                "missing_reasons": self.missing_reasons, "bad_prompt": self.bad_prompt,
                "extra_hypotheses": self.extra_hypotheses, **(self.similarity.summary() if self.similarity else {}),
                **({"by_language": self.by_language()} if self.languages else {})}

    def similarity_line(self) -> str | None:
        return self.similarity.line() if self.similarity else None


def score_corpus(references: dict[str, str], hypotheses: dict[str, str], metric: str = "pinyin",
                 language: str = "auto", languages: dict[str, str] | None = None) -> CorpusScore:
    """Score every reference utterance that has a hypothesis; one without is left out of the
    figures and listed in ``missing`` (Seed-TTS-eval's rule). ``language`` (protocol metric):
    zh, en, ja, ko or auto (zh or en, from the references). ``languages``: per-utterance languages (utt_id ->
    zh, en, ja, ko or an alias; an utterance it lacks, or maps to "", is detected from its
    reference's script), each utterance then scored with its language's metric and the
    summary broken down ``by_language``; None: one language for the set, as before."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if language == "auto":
        language = detect_language(references.values())
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; expected auto or one of {LANGUAGES}")
    result = CorpusScore(metric, extra_hypotheses=sorted(set(hypotheses) - set(references)),
                         language=language if metric == "protocol" else "")
    if languages is not None:
        result.languages = {utt_id: normalize_language(languages[utt_id], f"utterance {utt_id!r}")
                            if languages.get(utt_id) else detect_text_language(reference)
                            for utt_id, reference in references.items()}
    for utt_id, reference in references.items():
        hypothesis = hypotheses.get(utt_id)
        utt_language = result.languages.get(utt_id, "")
        try:  # a missing one's reference is checked too: a reference that cannot be scored is a bad set
            if metric == "protocol":
                alignment = protocol_align(reference, hypothesis or "", utt_language or language)
            else:
                alignment = align(reference, hypothesis or "", metric, utt_language or None)
        except EmptyReferenceError as error:
            raise TranscriptError(f"utterance {utt_id!r}: {error}") from None
        if hypothesis is None:
            result.missing.append(utt_id)
            continue
        result.utterances.append(UtteranceScore(
            utt_id, reference, hypothesis, alignment.substitutions, alignment.deletions, alignment.insertions,
            alignment.ref_length, alignment.error_rate, " ".join(alignment.reference), " ".join(alignment.hypothesis),
            language=utt_language))
    return result


def format_details(result: CorpusScore, worst: int = 10) -> str:
    """Per-utterance lines (file order), then the worst utterances and the missing ones."""
    label = result.label
    lines = [f"# per utterance: id {label}% errors/ref_length (sub del ins)"]
    for u in result.utterances:
        lines.append(f"{u.utt_id} {100 * u.error_rate:.2f} {u.substitutions + u.deletions + u.insertions}/{u.ref_length}"
                     f" ({u.substitutions} {u.deletions} {u.insertions})")
        lines.append(f"  ref: {u.reference}")
        lines.append(f"  hyp: {u.hypothesis}")
        if u.speaker_similarity is not None:
            lines.append(f"  sim: {u.speaker_similarity:.4f}")
    ranked = sorted(result.utterances, key=lambda u: (-u.error_rate, u.utt_id))[:worst]
    lines.append(f"# worst {len(ranked)} utterances")
    lines += [f"{u.utt_id} {100 * u.error_rate:.2f}" for u in ranked]
    if result.missing:
        lines.append(f"# missing, no transcript, left out of the figures ({len(result.missing)}): "
                     + " ".join(f"{utt_id} ({result.missing_reasons[utt_id]})" if utt_id in result.missing_reasons
                                else utt_id for utt_id in result.missing))
    if result.extra_hypotheses:
        lines.append(f"# in hyp but not in ref, not scored ({len(result.extra_hypotheses)}): "
                     + " ".join(result.extra_hypotheses))
    if result.bad_prompt:
        lines.append(f"# skipped by infer_dist for a bad prompt, not scored ({len(result.bad_prompt)}): "
                     + " ".join(result.bad_prompt))
    if result.similarity and result.similarity.skipped:
        lines.append(f"# no speaker similarity ({len(result.similarity.skipped)}): "
                     + " ".join(f"{utt_id} ({why})" for utt_id, why in result.similarity.skipped.items()))
    return "\n".join(lines)


@dataclass
class SimilarityResult:
    """Speaker similarity of generated wavs to their prompt wavs (wav mode)."""

    values: dict[str, float] = field(default_factory=dict)   # utt_id -> cosine similarity
    skipped: dict[str, str] = field(default_factory=dict)    # utt_id -> why it has none

    @property
    def mean(self) -> float | None:
        return sum(self.values.values()) / len(self.values) if self.values else None

    def summary(self) -> dict:
        return {"speaker_similarity_mean": self.mean, "speaker_similarity_utterances": len(self.values),
                "speaker_similarity_skipped": len(self.skipped)}

    def line(self) -> str:
        mean = "n/a" if self.mean is None else f"{self.mean:.4f}"
        return (f"%SIM {mean} mean speaker similarity to the prompt over {len(self.values)} utterances, "
                f"{len(self.skipped)} skipped")


def write_score_json(result: CorpusScore, path: str) -> None:
    """wer.json: the summary plus every utterance."""
    payload = {"summary": result.summary(), "utterances": [asdict(u) for u in result.utterances]}
    write_json(path, payload, indent=1)


def write_transcripts(path: Path, transcripts: dict[str, str]) -> None:
    """``utt_id text`` lines, as ``read_transcripts`` reads them."""
    write_text(path, "".join(f"{utt_id} {text}\n" for utt_id, text in transcripts.items()))

"""Error rate of ASR transcripts against reference texts: the published protocol, or ours.

Text mode:
    python scripts/compute_wer.py --ref REF --hyp HYP [--metric protocol|pinyin|char] [--language auto|zh|en]
                                  [--json OUT] [--details OUT]
Wav mode (the output folder of infer_dist.py):
    python scripts/compute_wer.py --output-dir OUT [--server-url URL] [--asr-model asr_eval]
                                  [--metric protocol] [--language auto] [--no-similarity]

Metrics:
- ``protocol``: CER for zh, WER for en, exactly as Seed-TTS-eval scores zero-shot TTS
  (ttsrl.protocol_scoring: its punctuation removal, traditional -> simplified transcripts,
  characters for zh / lower-cased words for en, and the set's figure is the mean of the
  per-utterance rates). ``--language auto`` reads the references (ttsrl.eval_sets).
  The summary line is ``%CER`` or ``%WER``; the summary also has the corpus rate
  (errors over all reference tokens) as ``corpus_error_rate``.
- ``pinyin`` / ``char``: our own scoring (ttsrl.scoring, below), the reward's.

In wav mode the references are the texts of OUT/manifest.jsonl, every
OUT/wavs/<id>.wav is transcribed by the reward server's evaluation ASR
(``asr_eval``: Paraformer-zh on GPU servers, so the metric is not the model the
policy was rewarded by; ``--asr-model asr`` uses the reward ASR), and the
results land in OUT/ref.txt, OUT/hyp.txt, OUT/wer.txt (details, worst
utterances, summary last) and OUT/wer.json. An utterance whose wav is missing
or fails to transcribe counts as deleted in full and is listed.

Speaker similarity (wav mode): when the server serves the ``speaker`` model (and
--no-similarity is not given), every utterance whose manifest record has a
``prompt_wav`` that exists gets the cosine similarity between the speaker
embeddings of its generated wav and of its prompt wav (``speaker_similarity``
per utterance in wer.json and an ``sim:`` line in wer.txt), and the summary gets
``speaker_similarity_mean`` plus a ``%SIM`` line just before the error-rate line.
Utterances without a prompt wav (or without a generated wav) are skipped for it
and counted.

Utterances infer_dist.py skipped for a bad prompt (``bad_prompt`` records) are not
scored; they are counted (``bad_prompt`` in the summary) and listed.

REF and HYP hold ``utt_id text`` lines (the text may be empty in HYP). Our scoring is
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

from ttsrl.eval_sets import detect_language  # noqa: E402
from ttsrl.protocol_scoring import LANGUAGES, mean_error_rate, metric_of, protocol_align  # noqa: E402
from ttsrl.scoring import METRICS as OUR_METRICS, EmptyReferenceError, align  # noqa: E402

METRICS = ("protocol",) + OUR_METRICS
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
    speaker_similarity: float | None = None  # cosine to the prompt's speaker embedding, when computed


@dataclass
class CorpusScore:
    metric: str
    utterances: list[UtteranceScore] = field(default_factory=list)
    extra_hypotheses: list[str] = field(default_factory=list)
    similarity: "SimilarityResult | None" = None  # wav mode with a served speaker model
    language: str = ""  # protocol metric: zh (CER) or en (WER)
    bad_prompt: list[str] = field(default_factory=list)  # skipped by infer_dist for a bad prompt, not scored

    @property
    def label(self) -> str:
        return metric_of(self.language).upper() if self.metric == "protocol" else METRIC_LABEL[self.metric]

    def total(self, name: str) -> int:
        return sum(getattr(u, name) for u in self.utterances)

    @property
    def errors(self) -> int:
        return self.total("substitutions") + self.total("deletions") + self.total("insertions")

    @property
    def corpus_error_rate(self) -> float:
        length = self.total("ref_length")
        return self.errors / length if length else 0.0

    @property
    def error_rate(self) -> float:
        """The set's figure: the protocol's mean of utterance rates, or our corpus rate."""
        if self.metric == "protocol":
            return mean_error_rate(u.error_rate for u in self.utterances)
        return self.corpus_error_rate

    @property
    def missing(self) -> list[str]:
        return [u.utt_id for u in self.utterances if u.hypothesis is None]

    def summary_line(self) -> str:
        line = (f"%{self.label} {100 * self.error_rate:.2f} [ {self.errors} / {self.total('ref_length')}, "
                f"{self.total('insertions')} ins, {self.total('deletions')} del, {self.total('substitutions')} sub ] "
                f"{len(self.utterances)} utterances")
        if self.metric == "protocol":
            line += f", Seed-TTS-eval protocol ({self.language}, mean of utterance rates)"
        if self.missing:
            line += f", {len(self.missing)} missing from hyp"
        if self.bad_prompt:
            line += f", {len(self.bad_prompt)} skipped for a bad prompt"
        return line

    def summary(self) -> dict:
        protocol = {"language": self.language, "label": self.label} if self.metric == "protocol" else {}
        return {"metric": self.metric, **protocol, "error_rate": self.error_rate,
                "corpus_error_rate": self.corpus_error_rate, "errors": self.errors,
                "substitutions": self.total("substitutions"), "deletions": self.total("deletions"),
                "insertions": self.total("insertions"), "ref_length": self.total("ref_length"),
                "utterances": len(self.utterances), "missing": self.missing, "bad_prompt": self.bad_prompt,
                "extra_hypotheses": self.extra_hypotheses, **(self.similarity.summary() if self.similarity else {})}

    def similarity_line(self) -> str | None:
        return self.similarity.line() if self.similarity else None


def score_corpus(references: dict[str, str], hypotheses: dict[str, str], metric: str = "pinyin",
                 language: str = "auto") -> CorpusScore:
    """Score every reference utterance; a missing hypothesis is scored as an empty one and flagged.
    ``language`` (protocol metric): zh, en or auto (from the references)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if language == "auto":
        language = detect_language(references.values())
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; expected auto or one of {LANGUAGES}")
    result = CorpusScore(metric, extra_hypotheses=sorted(set(hypotheses) - set(references)),
                         language=language if metric == "protocol" else "")
    for utt_id, reference in references.items():
        hypothesis = hypotheses.get(utt_id)
        try:
            if metric == "protocol":
                alignment = protocol_align(reference, hypothesis or "", language)
            else:
                alignment = align(reference, hypothesis or "", metric)
        except EmptyReferenceError as error:
            raise TranscriptError(f"utterance {utt_id!r}: {error}") from None
        result.utterances.append(UtteranceScore(
            utt_id, reference, hypothesis, alignment.substitutions, alignment.deletions, alignment.insertions,
            alignment.ref_length, alignment.error_rate, " ".join(alignment.reference), " ".join(alignment.hypothesis)))
    return result


def format_details(result: CorpusScore, worst: int = 10) -> str:
    """Per-utterance lines (file order), then the worst utterances and the missing ones."""
    label = result.label
    lines = [f"# per utterance: id {label}% errors/ref_length (sub del ins)"]
    for u in result.utterances:
        lines.append(f"{u.utt_id} {100 * u.error_rate:.2f} {u.substitutions + u.deletions + u.insertions}/{u.ref_length}"
                     f" ({u.substitutions} {u.deletions} {u.insertions})")
        lines.append(f"  ref: {u.reference}")
        lines.append(f"  hyp: {u.hypothesis if u.hypothesis is not None else '<missing>'}")
        if u.speaker_similarity is not None:
            lines.append(f"  sim: {u.speaker_similarity:.4f}")
    ranked = sorted(result.utterances, key=lambda u: (-u.error_rate, u.utt_id))[:worst]
    lines.append(f"# worst {len(ranked)} utterances")
    lines += [f"{u.utt_id} {100 * u.error_rate:.2f}" for u in ranked]
    if result.missing:
        lines.append(f"# missing from hyp ({len(result.missing)}): " + " ".join(result.missing))
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


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_json(result: CorpusScore, path: str) -> None:
    payload = {"summary": result.summary(), "utterances": [asdict(u) for u in result.utterances]}
    write_atomically(path, json.dumps(payload, ensure_ascii=False, indent=1) + "\n")


def read_infer_records(path: Path) -> dict[str, dict]:
    """OUT/manifest.jsonl of infer_dist.py -> {id: record} (each with a ``text``)."""
    records: dict[str, dict] = {}
    if not path.is_file():
        raise TranscriptError(f"{path}: no such file (run infer_dist.py first)")
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            utt_id = str(record["id"])
            if not isinstance(record["text"], str):
                raise TypeError(f"text is {type(record['text']).__name__}, not a string")
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise TranscriptError(f"{path}:{number}: malformed record ({error})") from None
        if utt_id in records:
            raise TranscriptError(f"{path}:{number}: duplicate utterance id {utt_id!r}")
        records[utt_id] = record
    return records


def read_infer_manifest(path: Path) -> dict[str, str]:
    """OUT/manifest.jsonl of infer_dist.py -> {id: reference text}, without the utterances it
    skipped for a bad prompt (``bad_prompt_ids`` lists those)."""
    return {utt_id: record["text"] for utt_id, record in read_infer_records(path).items()
            if not record.get("bad_prompt")}


def bad_prompt_ids(path: Path) -> list[str]:
    return [utt_id for utt_id, record in read_infer_records(path).items() if record.get("bad_prompt")]


def read_wave(path: Path) -> tuple:
    """A wav file -> (float32 mono waveform, sample rate)."""
    import soundfile

    wave, rate = soundfile.read(str(path), dtype="float32", always_2d=False)
    return (wave if wave.ndim == 1 else wave.mean(axis=1)), rate


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


def speaker_similarity_of_output_dir(output_dir: Path, records: dict[str, dict], server_url: str,
                                     model: str = "speaker", log=print) -> SimilarityResult:
    """Cosine similarity between each generated OUT/wavs/<id>.wav and its record's ``prompt_wav``,
    with the server's speaker embeddings; each distinct prompt wav is embedded once."""
    from ttsrl.triton_client import TritonModelClient, cosine_similarity

    result = SimilarityResult()
    pairs: list[tuple[str, Path, Path]] = []
    for utt_id, record in records.items():
        if record.get("bad_prompt"):
            continue  # not decoded; counted by the error-rate summary
        prompt = record.get("prompt_wav") or ""
        prompt_path = output_dir / prompt if prompt else None  # infer_dist writes absolute paths
        generated = output_dir / "wavs" / f"{utt_id}.wav"
        if not prompt:
            result.skipped[utt_id] = "no prompt wav"
        elif not prompt_path.is_file():
            result.skipped[utt_id] = f"prompt wav {prompt} not found"
        elif not generated.exists():
            result.skipped[utt_id] = "no generated wav"
        else:
            pairs.append((utt_id, generated, prompt_path))
    audio: dict[Path, tuple] = {}
    for path in sorted({generated for _, generated, _ in pairs} | {prompt for _, _, prompt in pairs}):
        try:
            audio[path] = read_wave(path)
        except (OSError, RuntimeError) as error:  # soundfile's LibsndfileError is a RuntimeError
            log(f"cannot read {path}: {error}")
    for utt_id, generated, prompt in list(pairs):
        unreadable = [str(path) for path in (generated, prompt) if path not in audio]
        if unreadable:
            result.skipped[utt_id] = f"cannot read {' '.join(unreadable)}"
            pairs.remove((utt_id, generated, prompt))
    prompts = sorted({prompt for _, _, prompt in pairs})
    paths = [generated for _, generated, _ in pairs] + prompts
    if not paths:
        return result
    waves, rates = zip(*(audio[path] for path in paths))
    client = TritonModelClient(server_url, model)
    try:
        embeddings = client.embed(list(waves), list(rates))
    finally:
        client.close()
    prompt_embedding = dict(zip(prompts, embeddings[len(pairs):]))
    for (utt_id, _, prompt), embedding in zip(pairs, embeddings[:len(pairs)]):
        reference = prompt_embedding[prompt]
        for what, value in (("generated wav", embedding), ("prompt wav", reference)):
            if isinstance(value, Exception):
                result.skipped[utt_id] = f"speaker embedding of the {what} failed: {value}"
                log(f"speaker similarity skipped for {utt_id}: {result.skipped[utt_id]}")
                break
        else:
            result.values[utt_id] = cosine_similarity(embedding, reference)
    return result


def transcribe_output_dir(output_dir: Path, server_url: str, asr_model: str, log=print) -> tuple[dict, dict]:
    """Transcribe OUT/wavs with the server -> (references, hypotheses); missing wavs are left out."""
    from ttsrl.triton_client import TritonModelClient

    references = read_infer_manifest(output_dir / "manifest.jsonl")
    hypotheses: dict[str, str] = {}
    ids, waves, rates = [], [], []
    for utt_id in references:
        wav = output_dir / "wavs" / f"{utt_id}.wav"
        if not wav.exists():
            log(f"missing wav: {wav}")
            continue
        wave, rate = read_wave(wav)
        ids.append(utt_id)
        waves.append(wave)
        rates.append(rate)
    client = TritonModelClient(server_url, asr_model)
    try:
        for utt_id, result in zip(ids, client.transcribe(waves, rates) if ids else []):
            if isinstance(result, Exception):
                log(f"transcription failed for {utt_id}: {result}")
            else:
                hypotheses[utt_id] = result
    finally:
        client.close()
    return references, hypotheses


def add_speaker_similarity(result: CorpusScore, output_dir: Path, server_url: str, model: str = "speaker",
                           log=print) -> None:
    """Fill ``result.similarity`` and each utterance's ``speaker_similarity`` when the server
    serves ``model``; otherwise say so and leave them empty."""
    from ttsrl.triton_client import server_ready

    if not server_ready(server_url, model=model):
        log(f"no speaker similarity: {server_url} does not serve a ready {model!r} model")
        return
    records = read_infer_records(output_dir / "manifest.jsonl")
    result.similarity = speaker_similarity_of_output_dir(output_dir, records, server_url, model, log)
    for utterance in result.utterances:
        utterance.speaker_similarity = result.similarity.values.get(utterance.utt_id)


def write_transcripts(path: Path, transcripts: dict[str, str]) -> None:
    write_atomically(str(path), "".join(f"{utt_id} {text}\n" for utt_id, text in transcripts.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="text mode: reference transcripts, 'utt_id text' lines")
    parser.add_argument("--hyp", help="text mode: hypothesis transcripts, 'utt_id text' lines")
    parser.add_argument("--output-dir", help="wav mode: an infer_dist.py output folder")
    parser.add_argument("--server-url", default=os.environ.get("REWARD_SERVER_URL", "grpc://127.0.0.1:8001").split(",")[0],
                        help="wav mode: reward server (default: first of $REWARD_SERVER_URL, else grpc://127.0.0.1:8001)")
    parser.add_argument("--asr-model", default="asr_eval", help="wav mode: served ASR model (asr_eval or asr)")
    parser.add_argument("--speaker-model", default="speaker",
                        help="wav mode: served speaker-embedding model for speaker similarity to the prompt")
    parser.add_argument("--no-similarity", action="store_true",
                        help="wav mode: skip speaker similarity even when the server serves the speaker model")
    parser.add_argument("--set-name", default="", help="label printed with the summary")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="protocol (Seed-TTS-eval CER/WER; default in wav mode) or our pinyin / char "
                             "(default in text mode: pinyin)")
    parser.add_argument("--language", choices=("auto",) + LANGUAGES, default="auto",
                        help="protocol metric: zh (CER) or en (WER); auto reads the references")
    parser.add_argument("--json", default=None, help="write the summary and per-utterance scores here")
    parser.add_argument("--details", default=None, help="write per-utterance details here (default: stdout)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    wav_mode = args.output_dir is not None
    if wav_mode == bool(args.ref or args.hyp) or (not wav_mode and not (args.ref and args.hyp)):
        parser.error("give --ref and --hyp (text mode) or --output-dir (wav mode)")
    args.metric = args.metric or ("protocol" if wav_mode else "pinyin")
    try:
        if wav_mode:
            output_dir = Path(args.output_dir)
            references, hypotheses = transcribe_output_dir(output_dir, args.server_url, args.asr_model)
            write_transcripts(output_dir / "ref.txt", references)
            write_transcripts(output_dir / "hyp.txt", hypotheses)
            args.details = args.details or str(output_dir / "wer.txt")
            args.json = args.json or str(output_dir / "wer.json")
        else:
            references = read_transcripts(args.ref, allow_empty_text=False)
            hypotheses = read_transcripts(args.hyp, allow_empty_text=True)
        if not references:
            raise TranscriptError(f"{args.ref or args.output_dir}: no utterances")
        result = score_corpus(references, hypotheses, args.metric, args.language)
        if wav_mode:
            result.bad_prompt = bad_prompt_ids(output_dir / "manifest.jsonl")
        if wav_mode and not args.no_similarity:
            add_speaker_similarity(result, output_dir, args.server_url, args.speaker_model)
    except TranscriptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = result.summary_line() + (f" ({args.set_name})" if args.set_name else "")
    details = format_details(result)
    similarity = result.similarity_line()
    tail = (similarity + "\n" if similarity else "") + summary + "\n"
    if args.details:
        write_atomically(args.details, details + "\n" + tail)
    else:
        print(details)
    if args.json:
        write_json(result, args.json)
    print(tail, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

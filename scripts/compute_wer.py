"""Error rate of ASR transcripts against reference texts: the published protocol, or ours.

Text mode:
    python scripts/compute_wer.py --ref REF --hyp HYP [--metric protocol|pinyin|char] [--language auto|zh|en|ja|ko]
                                  [--per-language] [--languages LANGS] [--json OUT] [--details OUT]
Wav mode (the output folder of infer_dist.py):
    python scripts/compute_wer.py --output-dir OUT [--server-url URL] [--asr-model asr_eval]
                                  [--metric protocol] [--language auto] [--no-similarity] [--per-language]

Metrics:
- ``protocol``: CER for zh, WER for en, exactly as Seed-TTS-eval scores zero-shot TTS
  (ttsrl.protocol_scoring: its punctuation removal, traditional -> simplified transcripts,
  characters for zh / lower-cased words for en, and the set's figure is the mean of the
  per-utterance rates); CER for ja and ko (characters, as CosyVoice3-Eval).
  ``--language auto`` reads the references (ttsrl.eval_sets: zh or en).
  The summary line is ``%CER`` or ``%WER``; the summary also has the corpus rate
  (errors over all reference tokens) as ``corpus_error_rate``.
- ``pinyin`` / ``char``: our own scoring (ttsrl.scoring, below), the reward's.

In wav mode the references are the texts of OUT/manifest.jsonl, every
OUT/wavs/<id>.wav is transcribed by the reward server's evaluation ASR
(``asr_eval``: Paraformer-zh on GPU servers, so the metric is not the model the
policy was rewarded by; ``--asr-model asr`` uses the reward ASR), and the
results land in OUT/ref.txt, OUT/hyp.txt, OUT/wer.txt (details, worst
utterances, summary last) and OUT/wer.json.

Missing audio, as Seed-TTS-eval's run_wer.py treats it: an utterance without a
transcript (wav mode: its wav is missing, e.g. synthesis generated no speech
tokens, or it fails to transcribe; text mode: its id is not in HYP) is LEFT OUT
of the figure, whatever the metric (protocol CER/WER and our pinyin/char rates
alike), and counted on its own: ``missing`` (the ids), ``missing_count`` and, in
wav mode, ``missing_reasons`` in the summary, a ``# missing`` line in the details
and ", N missing (no transcript, left out)" in the summary line. Read the
figure together with that count: a checkpoint that fails to speak an utterance
is not charged for it in the mean. A set where no utterance has a transcript has
no figure (``error_rate`` null, ``%CER n/a``). An empty transcript is scored
(every reference token deleted).

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
characters. An utterance missing from HYP is left out and listed (above); a
duplicate id in either file is an error.

The last line printed is the summary, Kaldi style (utterances: those scored)::

    %PER 4.35 [ 12 / 276, 2 ins, 3 del, 7 sub ] 20 utterances, 1 missing (no transcript, left out)

Per-utterance languages: ``--per-language`` scores each utterance with the metric of its
own language (ttsrl.evaluation.wer: protocol zh/ja/ko CER and en WER; ours zh pinyin/char, en
WER after Whisper-style normalization, ja/ko CER), detected from its reference's script, or,
in text mode, read from LANGS (``--languages``: ``utt_id language`` lines, zh/en/ja/ko or an
alias; implies --per-language). In wav mode it is on whenever OUT/manifest.jsonl declares a
language for any utterance (the eval set does: a CV3-Eval subset folder, a JSONL ``language``
field), each utterance scored as its record's ``language`` (else detected), and the languages
used are written to OUT/languages.txt (for ``--languages`` on OUT/ref.txt and OUT/hyp.txt).
The summary then has ``by_language`` (each language's figures) and one
``<language> %CER ...`` line per language is printed just before the summary line.

Per-utterance details go to --details (default: printed before the summary);
--json writes the summary plus every utterance.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from ttsrl.atomic_write import write_text  # noqa: E402
from ttsrl.evaluation.output_scoring import score_output_dir  # noqa: E402
from ttsrl.evaluation.outputs import OutputDirError, manifest_languages  # noqa: E402
from ttsrl.evaluation.wer import (METRICS, TranscriptError, format_details, read_transcripts,  # noqa: E402
                                  score_corpus, write_score_json)
from ttsrl.protocol_scoring import LANGUAGES  # noqa: E402
from ttsrl.triton_client.wire import env_server_url  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="text mode: reference transcripts, 'utt_id text' lines")
    parser.add_argument("--hyp", help="text mode: hypothesis transcripts, 'utt_id text' lines")
    parser.add_argument("--output-dir", help="wav mode: an infer_dist.py output folder")
    parser.add_argument("--server-url", default=env_server_url(first=True),
                        help="wav mode: reward server (default: first of $REWARD_SERVER_URL, else grpc://127.0.0.1:8001)")
    parser.add_argument("--asr-model", default="asr_eval", help="wav mode: served ASR model (asr_eval or asr)")
    parser.add_argument("--english-asr-model", default=None,
                        help="wav mode: served ASR model for the utterances the manifest declares en (asr_eval_en: "
                             "Whisper-large-v3, the protocol's English ASR); default: --asr-model for all")
    parser.add_argument("--speaker-model", default="speaker",
                        help="wav mode: served speaker-embedding model for speaker similarity to the prompt")
    parser.add_argument("--no-similarity", action="store_true",
                        help="wav mode: skip speaker similarity even when the server serves the speaker model")
    parser.add_argument("--set-name", default="", help="label printed with the summary")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="protocol (Seed-TTS-eval CER/WER; default in wav mode) or our pinyin / char "
                             "(default in text mode: pinyin)")
    parser.add_argument("--language", choices=("auto",) + LANGUAGES, default="auto",
                        help="protocol metric: zh, ja, ko (CER) or en (WER); auto reads the references (zh or en)")
    parser.add_argument("--per-language", action="store_true",
                        help="score each utterance with its language's metric (detected from the reference; "
                             "wav mode: the manifest's language first, and on whenever the manifest declares "
                             "one) and report by_language")
    parser.add_argument("--languages", default=None,
                        help="text mode: 'utt_id language' lines (zh, en, ja, ko); implies --per-language")
    parser.add_argument("--json", default=None, help="write the summary and per-utterance scores here")
    parser.add_argument("--details", default=None, help="write per-utterance details here (default: stdout)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    wav_mode = args.output_dir is not None
    if wav_mode == bool(args.ref or args.hyp) or (not wav_mode and not (args.ref and args.hyp)):
        parser.error("give --ref and --hyp (text mode) or --output-dir (wav mode)")
    if wav_mode and args.languages:
        parser.error("--languages is for text mode (--ref/--hyp); wav mode reads OUT/manifest.jsonl's languages")
    args.metric = args.metric or ("protocol" if wav_mode else "pinyin")
    try:
        if wav_mode:
            declared = any(manifest_languages(Path(args.output_dir) / "manifest.jsonl").values())
            result = score_output_dir(args.output_dir, args.server_url, args.asr_model, args.metric, args.language,
                                      None if args.no_similarity else args.speaker_model,
                                      per_language=args.per_language or declared,
                                      english_asr_model=args.english_asr_model)
            args.details = args.details or str(Path(args.output_dir) / "wer.txt")
            args.json = args.json or str(Path(args.output_dir) / "wer.json")
        else:
            references = read_transcripts(args.ref, allow_empty_text=False)
            hypotheses = read_transcripts(args.hyp, allow_empty_text=True)
            if not references:
                raise TranscriptError(f"{args.ref}: no utterances")
            languages = None
            if args.languages:
                languages = read_transcripts(args.languages, allow_empty_text=False)
            elif args.per_language:
                languages = {}
            try:
                result = score_corpus(references, hypotheses, args.metric, args.language, languages)
            except ValueError as error:  # an unknown language in LANGS
                raise TranscriptError(f"{args.languages}: {error}") from None
    except (TranscriptError, OutputDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = result.summary_line() + (f" ({args.set_name})" if args.set_name else "")
    details = format_details(result)
    similarity = result.similarity_line()
    per_language = "".join(line + "\n" for line in result.by_language_lines())
    tail = (similarity + "\n" if similarity else "") + per_language + summary + "\n"
    if args.details:
        write_text(args.details, details + "\n" + tail)
    else:
        print(details)
    if args.json:
        write_score_json(result, args.json)
    print(tail, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

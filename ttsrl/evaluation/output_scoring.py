"""Scoring of a synthesis output folder (``infer_dist.py --output-dir OUT``) with the reward
server's models: its wavs transcribed by the evaluation ASR, scored against the texts of
OUT/manifest.jsonl (``ttsrl.evaluation.wer``), and the speaker similarity of each wav to
its utterance's prompt wav.

An utterance without a transcript (its wav is missing, e.g. synthesis generated no speech
tokens, or it fails to transcribe) is left out of the set's figure, as Seed-TTS-eval's
``run_wer.py`` leaves out a missing wav, and is listed with why (``missing``,
``missing_reasons``); one synthesis skipped for a bad prompt is not scored, only counted.

Per-utterance languages (``score_output_dir(per_language=True)``; ``scripts/compute_wer.py``
turns it on whenever the manifest declares a language): each utterance is scored with the
metric of the language its manifest record declares (``ttsrl.evaluation.outputs``), or of the
one its reference's script says where it declares none, the summary gets ``by_language``, and
OUT/languages.txt (``utt_id language`` lines) records the language each was scored as, for
scoring the same transcripts again (``compute_wer.py --languages``).
"""
from __future__ import annotations

from pathlib import Path

from ttsrl.evaluation.outputs import (OutputDirError, bad_prompt_ids, manifest_languages, read_records,
                                     read_references, read_wave, wav_path)
from ttsrl.evaluation.wer import CorpusScore, SimilarityResult, TranscriptError, score_corpus, write_transcripts


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
        generated = wav_path(output_dir, utt_id)
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


def transcribe_output_dir(output_dir: Path, server_url: str, asr_model: str,
                          log=print, english_asr_model: str | None = None) -> tuple[dict, dict, dict]:
    """Transcribe OUT/wavs with the server -> (references, hypotheses, why each reference
    without a hypothesis has none). With ``english_asr_model`` (the server's ``asr_eval_en``:
    Whisper-large-v3, as Seed-TTS-eval and CV3-Eval transcribe English), the utterances the
    manifest declares ``en`` go to that model and the rest to ``asr_model``. Each utterance's
    declared language is told to the ASR (SenseVoice's ``language``; auto where it declares
    none); a language no ASR here takes is an error naming the utterance."""
    from ttsrl.language import normalize_language

    references = read_references(output_dir / "manifest.jsonl")
    records = read_records(output_dir / "manifest.jsonl")
    languages = {}
    for utt_id, declared in manifest_languages(output_dir / "manifest.jsonl").items():
        try:
            languages[utt_id] = normalize_language(declared, f"utterance {utt_id!r}") if declared else ""
        except ValueError as error:
            raise OutputDirError(f"{output_dir / 'manifest.jsonl'}: {error}") from None
    hypotheses: dict[str, str] = {}
    missing: dict[str, str] = {}
    by_model: dict[str, tuple[list, list, list]] = {}
    for utt_id in references:
        wav = wav_path(output_dir, utt_id)
        if not wav.exists():
            error = records[utt_id].get("error")
            missing[utt_id] = f"no wav: {error}" if error else "no wav"
            log(f"missing wav: {wav}" + (f" ({error})" if error else ""))
            continue
        wave, rate = read_wave(wav)
        model = english_asr_model if english_asr_model and languages.get(utt_id) == "en" else asr_model
        ids, waves, rates = by_model.setdefault(model, ([], [], []))
        ids.append(utt_id)
        waves.append(wave)
        rates.append(rate)
    for model, (ids, waves, rates) in by_model.items():
        _transcribe_with(server_url, model, ids, waves, rates, hypotheses, missing, log,
                         [languages.get(utt_id, "") for utt_id in ids])
    return references, hypotheses, missing


def _transcribe_with(server_url: str, model: str, ids: list, waves: list, rates: list, hypotheses: dict,
                     missing: dict, log, languages: list | None = None) -> None:
    from ttsrl.triton_client import TritonModelClient

    client = TritonModelClient(server_url, model)
    try:
        try:
            results = client.transcribe(waves, rates, languages)
        except Exception as error:  # the whole request failed (e.g. the server does not serve the model)
            raise OutputDirError(f"transcribing {len(ids)} utterances with the server's {model!r} at {server_url} "
                                 f"failed: {error}") from error
        for utt_id, result in zip(ids, results):
            if isinstance(result, Exception):
                missing[utt_id] = f"transcription failed ({model}): {result}"
                log(f"transcription failed for {utt_id} ({model}): {result}")
            else:
                hypotheses[utt_id] = result
    finally:
        client.close()


def add_speaker_similarity(result: CorpusScore, output_dir: Path, server_url: str, model: str = "speaker",
                           log=print) -> None:
    """Fill ``result.similarity`` and each utterance's ``speaker_similarity`` when the server
    serves ``model``; otherwise say so and leave them empty."""
    from ttsrl.triton_client import server_ready

    if not server_ready(server_url, model=model):
        log(f"no speaker similarity: {server_url} does not serve a ready {model!r} model")
        return
    records = read_records(output_dir / "manifest.jsonl")
    result.similarity = speaker_similarity_of_output_dir(output_dir, records, server_url, model, log)
    for utterance in result.utterances:
        utterance.speaker_similarity = result.similarity.values.get(utterance.utt_id)


def score_output_dir(output_dir: str | Path, server_url: str, asr_model: str = "asr_eval", metric: str = "protocol",
                     language: str = "auto", speaker_model: str | None = "speaker", log=print,
                     per_language: bool = False, english_asr_model: str | None = None) -> CorpusScore:
    """Transcribe OUT/wavs (writing OUT/ref.txt and OUT/hyp.txt) and score them; with a
    ``speaker_model`` (None: none), add the speaker similarity when the server serves it;
    ``per_language``: each utterance with its language's metric (module doc);
    ``english_asr_model``: the ASR of the utterances declared ``en`` (``transcribe_output_dir``). Raises
    TranscriptError or OutputDirError (the message names file and line)."""
    folder = Path(output_dir)
    references, hypotheses, missing = transcribe_output_dir(folder, server_url, asr_model, log, english_asr_model)
    write_transcripts(folder / "ref.txt", references)
    write_transcripts(folder / "hyp.txt", hypotheses)
    if not references:
        raise TranscriptError(f"{output_dir}: no utterances")
    languages = manifest_languages(folder / "manifest.jsonl") if per_language else None
    try:
        result = score_corpus(references, hypotheses, metric, language, languages)
    except ValueError as error:  # a declared language that is not one we score
        if languages is None:
            raise
        raise OutputDirError(f"{folder / 'manifest.jsonl'}: {error}") from None
    if per_language:
        write_transcripts(folder / "languages.txt", result.languages)
    else:
        (folder / "languages.txt").unlink(missing_ok=True)  # a per-language run's, not this scoring's
    result.missing_reasons = {utt_id: missing[utt_id] for utt_id in result.missing if utt_id in missing}
    result.bad_prompt = bad_prompt_ids(folder / "manifest.jsonl")
    if speaker_model:
        add_speaker_similarity(result, folder, server_url, speaker_model, log)
    return result

"""Synthesis of a test set with a policy checkpoint, on one rank of a torchrun job (or alone),
and of one text (stage 5). ``infer_dist.py``'s module doc describes the job and its files.

Exactly once and resumable: every rank lists the utterances without a record of success,
the ranks agree on that list at a barrier before anyone writes, and rank r takes every
world_size-th of it. A failed utterance gets a record with its reason and is retried by
the next run; it does not stop this one.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ttsrl.eval_sets import EvalUtterance, load_eval_set
from ttsrl.evaluation import outputs
from ttsrl.evaluation.decoders import InProcessToken2Wav, ServerToken2Wav
from ttsrl.evaluation.prompts import BadPromptError, check_prompts, fill_prompt_tokens, read_prompt_audio
from ttsrl.sampling import SamplingOptions, options_from_args
from ttsrl.speech_tokens import parse_speech_tokens

LOGGER = logging.getLogger("infer_dist")  # log lines keep the name of the job users run


def init_distributed():
    """(rank, world_size, device): gloo on CPU, NCCL on GPUs; no process group when run alone."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if world_size > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world_size, device


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def shard(items: list, rank: int, world_size: int) -> list:
    return items[rank::world_size]


def synthesize_batch(batch: list[EvalUtterance], generator, token2wav, output_dir: Path,
                     prompt_sources: dict | None = None, prompt_voice: str = "utterance") -> list[dict]:
    """Generate, decode and write one batch; each utterance gets a record, success or not.

    ``prompt_voice``: ``utterance`` decodes each utterance in the voice of its own prompt wav
    (the record's ``prompt_id`` is the content hash of that prompt, checked against what the
    decoder reports); ``bank`` decodes in the server's prompt-bank voice (``bank:<name>``)."""
    prompt_sources = prompt_sources or {}
    records: list[dict] = []
    try:
        responses = generator.generate(batch)
    except Exception as error:  # a broken batch is recorded, the run goes on
        LOGGER.exception("generation failed for %s", [u.id for u in batch])
        responses = [error] * len(batch)
    to_decode = []
    for utt, response in zip(batch, responses):
        record = {"id": utt.id, "text": utt.text, "prompt_text": utt.prompt_text, "prompt_wav": utt.prompt_wav,
                  "zero_shot": bool(utt.prompt_tokens),
                  "prompt_tokens_source": prompt_sources.get(utt.id, "manifest" if utt.prompt_tokens else "none"),
                  "prompt_voice": prompt_voice, "prompt_id": None,
                  "tokens": 0, "duration": 0.0, "error": None}
        if isinstance(response, Exception):
            record["error"] = f"generation failed: {response}"
            if isinstance(response, ValueError):  # ttsrl.frontend.FrontendError: upstream cannot say this text
                record["error"] = f"upstream's frontend refuses the text: {response}"
        else:
            parsed = parse_speech_tokens(response, getattr(generator, "family", None))
            record["tokens"] = len(parsed.ids)
            record["ignored_pieces"] = parsed.ignored
            record["ended"] = parsed.ended
            if not parsed.ids:
                record["error"] = "no speech tokens generated"
            else:
                prompt = None
                if prompt_voice == "utterance":
                    try:
                        prompt = read_prompt_audio(utt)
                    except (OSError, RuntimeError) as error:  # soundfile's LibsndfileError is a RuntimeError
                        record["error"] = f"cannot read prompt wav {utt.prompt_wav}: {error}"
                if record["error"] is None:
                    to_decode.append((record, parsed.ids, prompt))
        records.append(record)
    if to_decode:
        try:
            results = token2wav.decode([ids for _, ids, _ in to_decode], [prompt for _, _, prompt in to_decode])
        except Exception as error:
            results = [error] * len(to_decode)
        for (record, _, prompt), result in zip(to_decode, results):
            if isinstance(result, Exception):
                record["error"] = f"token2wav failed: {result}"
                continue
            if prompt is not None and result.prompt_id != prompt.key:
                # Never keep audio spoken in another voice than the utterance's prompt.
                record["error"] = (f"token2wav conditioned the audio on prompt {result.prompt_id or '(none reported)'}, "
                                   f"not on this utterance's prompt {prompt.key} (a server without per-item prompts?)")
                continue
            record["prompt_id"] = result.prompt_id
            outputs.write_wave(outputs.wav_path(output_dir, record["id"]), result.wave, result.sample_rate)
            record["duration"] = round(len(result.wave) / result.sample_rate, 4)
            record["sample_rate"] = result.sample_rate
    for record in records:
        outputs.write_record(output_dir, record)
    return records


def _synthesize_shard(args, mine: list[EvalUtterance], rank: int, world_size: int, device: str,
                      generator_factory, token2wav) -> dict:
    """This rank's part of the job: generate, decode and write ``mine`` batch by batch."""
    import torch

    from ttsrl.policy.generation import make_generator

    output_dir = Path(args.output_dir)
    prompt_voice = getattr(args, "prompt_voice", "utterance")
    counts = {"done": 0, "failed": 0}
    torch.manual_seed(args.seed + rank)
    sampling = options_from_args(args)
    if generator_factory is not None:
        generator = generator_factory(device, sampling)
    else:
        generator = make_generator(args.backend, args.model, device, sampling)
    if args.engines:
        token2wav = token2wav or InProcessToken2Wav(args.engines, device, args.cosyvoice2_dir, args.prompt_bank)
        prompt_sources = {u.id: "manifest" if u.prompt_tokens else "none" for u in mine}
    else:
        prompt_sources = fill_prompt_tokens(mine, args.server_url)
    counts_by_source = {k: list(prompt_sources.values()).count(k) for k in ("manifest", "server", "none")}
    LOGGER.info("rank %d: prompt speech tokens from the manifest for %d, from the server's speech_tokenizer for %d, "
                "text-only prompting for %d utterance(s)", rank, counts_by_source["manifest"],
                counts_by_source["server"], counts_by_source["none"])
    token2wav = token2wav or ServerToken2Wav(args.server_url)
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(mine), desc=f"rank 0 of {world_size}", unit="utt")
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        records = synthesize_batch(batch, generator, token2wav, output_dir, prompt_sources, prompt_voice)
        outputs.append_rank_log(output_dir, rank, records)
        for record in records:
            counts["failed" if record["error"] else "done"] += 1
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.close()
    return counts


def run(args, generator_factory=None, token2wav=None) -> dict:
    """The whole job on this rank (``args``: infer_dist.py's flags); returns rank 0's summary
    (others return their own counts). ``generator_factory(device, sampling)`` and ``token2wav``
    replace the checkpoint's generator and the decoder (tests)."""
    output_dir = Path(args.output_dir)
    utterances = load_eval_set(args.manifest, getattr(args, "layout", "auto")).utterances
    if args.max_utterances:
        utterances = utterances[:args.max_utterances]
    prompt_voice = getattr(args, "prompt_voice", "utterance")
    bad = check_prompts(utterances, getattr(args, "max_prompt_seconds", None)) if prompt_voice == "utterance" else {}
    bad = {utt_id: why for utt_id, why in bad.items() if not outputs.is_done(output_dir, utt_id)}  # done stays done
    if bad and getattr(args, "on_bad_prompt", "fail") == "fail":
        # Every rank reads the same set and finds the same rows, so all stop here together.
        listed = "\n  ".join(bad[u.id] for u in utterances if u.id in bad)
        raise BadPromptError(f"{len(bad)} utterance(s) have a prompt that cannot condition their audio "
                             f"(--on-bad-prompt skip leaves them out):\n  {listed}")
    rank, world_size, device = init_distributed()
    outputs.make_output_dirs(output_dir)
    pending = [u for u in outputs.pending_utterances(utterances, output_dir) if u.id not in bad]
    if rank == 0:
        outputs.remove_stale_temporaries(output_dir)
    # Everyone has listed the pending utterances before anyone writes, so all ranks split the same list.
    barrier(world_size)
    mine = shard(pending, rank, world_size)
    if rank == 0:
        if bad:
            LOGGER.warning("skipping %d utterance(s) with a bad prompt (--on-bad-prompt skip), listed in %s",
                           len(bad), output_dir / "bad_prompts.txt")
            outputs.write_bad_prompt_records(bad, utterances, output_dir)
        else:
            (output_dir / "bad_prompts.txt").unlink(missing_ok=True)  # from an earlier run
        LOGGER.info("%d utterances, %d already done, %d skipped for a bad prompt, %d to do on %d ranks",
                    len(utterances), len(utterances) - len(pending) - len(bad), len(bad), len(pending), world_size)
    counts = {"done": 0, "failed": 0}
    if mine:
        counts = _synthesize_shard(args, mine, rank, world_size, device, generator_factory, token2wav)
    barrier(world_size)
    summary = counts
    if rank == 0:
        summary = outputs.write_manifest(utterances, output_dir)
        summary["produced_this_run"] = len(pending)
        LOGGER.info("summary: %s", json.dumps(summary))
        print(f"infer_dist: {summary['ok']}/{summary['utterances']} utterances ok, {summary['failed']} failed, "
              f"{summary['bad_prompt']} skipped for a bad prompt, "
              f"{summary['missing']} missing, {summary['seconds_of_audio']:.1f} s of audio; "
              f"{len(pending)} attempted this run; manifest: {output_dir / 'manifest.jsonl'}")
    if world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


def synthesize_text(model: str, output: Path, text: str, server_url: str, sampling: SamplingOptions,
                    prompt_text: str = "", prompt_tokens: list[int] | None = None) -> dict:
    """Stage 5: generate and decode one utterance (transformers, the server's prompt-bank
    voice) into the wav ``output``; returns its record (raises on failure)."""
    import torch

    from ttsrl.policy.generation import TransformersGenerator

    torch.manual_seed(sampling.seed)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    generator = TransformersGenerator(model, device, sampling)
    utterance = EvalUtterance(output.stem, text, prompt_text=prompt_text, prompt_tokens=prompt_tokens or [])
    parsed = parse_speech_tokens(generator.generate([utterance])[0], generator.family)
    if not parsed.ids:
        raise RuntimeError("the model generated no speech tokens (try another --seed or check the checkpoint)")
    result = ServerToken2Wav(server_url).synthesize([parsed.ids])[0]
    if isinstance(result, Exception):
        raise RuntimeError(f"token2wav failed: {result}")
    wave, sample_rate = result
    output.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_wave(output, wave, sample_rate)
    return {"wav": str(output), "tokens": len(parsed.ids), "duration": len(wave) / sample_rate, "ended": parsed.ended}

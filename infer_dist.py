"""Distributed speech synthesis of a test set with a (merged) policy checkpoint.

    torchrun --nproc_per_node=N infer_dist.py --model DIR --manifest FILE --output-dir OUT [options]
    python infer_dist.py --model DIR --manifest FILE --output-dir OUT     # one process

Test sets (``--manifest``, read by ttsrl.eval_sets; prompt paths as each layout publishes them):
  - Seed-TTS-eval ``meta.lst`` (zh or en): ``utt|prompt_text|prompt_wav|text`` per line;
  - a CosyVoice3-Eval task folder (``data/zero_shot/zh``): ``text``, ``prompt_text``, ``prompt_wav.scp``;
  - JSONL: ``id``, ``text``, optional ``prompt_text``, ``prompt_wav`` and
    ``prompt_tokens`` (the prompt's CosyVoice2 speech tokens, precomputed).

Each rank generates speech tokens with transformers (batched, left padding, the
model's chat template, sampling flags) or vLLM (``--backend vllm``), turns them
into audio with the reward server's ``token2wav`` model (``--server-url``), and
writes ``OUT/wavs/<id>.wav`` plus ``OUT/records/<id>.json`` (text, token count,
duration, the prompt that conditioned the audio, error) and a line in
``OUT/logs/rank_<r>.log``. Rank 0 then writes ``OUT/manifest.jsonl`` of every
utterance and prints a summary.

Voice (zero-shot protocol): by default every utterance is decoded in the voice of
its own prompt wav, sent to ``token2wav`` with its transcript (or prepared by the
in-process engines); the record's ``prompt_id`` is that prompt's content hash
(``ttsrl.triton_client.speaker_prompt_key``) as the decoder reported it, and audio
the decoder says it conditioned on anything else is refused. ``--prompt-voice bank``
decodes everything in the server's prompt-bank voice instead (``prompt_id``
``bank:<name>``). A row whose prompt wav is missing, unreadable, empty, below 16 kHz,
too long (``--max-prompt-seconds``) or without a prompt transcript is reported with
its file:line; ``--on-bad-prompt fail`` (default) stops before generating anything,
``skip`` leaves those rows out (a record each, OUT/bad_prompts.txt, counted as
``bad_prompt`` in the summary).

Zero-shot prompting of the LLM (prompt text + text, then the prompt's speech tokens as
the start of the answer) is used when an utterance's prompt speech tokens are known:
from the manifest's ``prompt_tokens``, else, for an utterance with a
``prompt_wav``, from the reward server's ``speech_tokenizer`` model (each rank
tokenizes the prompt wavs of its own utterances before generating, each distinct
wav once). When the server does not serve ``speech_tokenizer`` or fails on a wav,
that utterance is prompted with its text only. Each record says which
(``zero_shot``, ``prompt_tokens_source``: manifest, server or none) and the
rank's log line counts them.

Exactly once and resumable: every rank lists the utterances without a record
of success, the ranks agree on that list at a barrier before anyone writes,
and rank r takes every world_size-th of it. Files are written to a temp name
and renamed, so a killed run leaves only whole files; run it again and it does
the rest. A failed utterance (no speech tokens, server error) gets a record
with its reason and is retried by the next run; it does not stop this one.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # torchrun may start us from elsewhere

from ttsrl.chat_template import prompt_messages  # noqa: E402
from ttsrl.eval_sets import LAYOUTS as EVAL_LAYOUTS, EvalSetError, EvalUtterance, load_eval_set  # noqa: E402
from ttsrl.speech_tokens import SPEECH_END_TOKENS, format_speech_tokens, parse_speech_tokens  # noqa: E402

LOGGER = logging.getLogger("infer_dist")


ManifestError = EvalSetError  # a test set that cannot be read (the message names file and line)
Utterance = EvalUtterance


class BadPromptError(Exception):
    """Utterances whose prompt cannot condition their audio, with --on-bad-prompt fail."""


def read_manifest(path: str, layout: str = "auto") -> list[Utterance]:
    """A Seed-TTS-eval meta.lst, a CV3-Eval task folder or a JSONL -> utterances (ttsrl.eval_sets)."""
    return load_eval_set(path, layout).utterances


def check_prompts(utterances: list[Utterance], max_seconds: float | None = None) -> dict[str, str]:
    """{utt_id: "file:line: why"} for every utterance whose prompt cannot condition its audio:
    no prompt wav, a wav that is missing, unreadable, empty, of too low a sample rate or
    longer than ``max_seconds`` (default: the server's limit), or no prompt transcript.
    Reads only the wav headers; each distinct wav once."""
    import soundfile

    from token2wav_server.prompt_bank import MAX_PROMPT_SECONDS, MIN_PROMPT_SAMPLE_RATE

    max_seconds = MAX_PROMPT_SECONDS if max_seconds is None else max_seconds
    header_problem: dict[str, str | None] = {}
    bad: dict[str, str] = {}
    for utt in utterances:
        if not utt.prompt_wav:
            why = "no prompt wav (its own voice is unknown; --prompt-voice bank decodes in the server's voice)"
        else:
            if utt.prompt_wav not in header_problem:
                problem = None
                if not os.path.isfile(utt.prompt_wav):
                    problem = f"prompt wav {utt.prompt_wav} not found"
                else:
                    try:
                        info = soundfile.info(utt.prompt_wav)
                        seconds = info.frames / info.samplerate if info.samplerate else 0.0
                        if info.frames <= 0:
                            problem = f"prompt wav {utt.prompt_wav} has no samples"
                        elif info.samplerate < MIN_PROMPT_SAMPLE_RATE:
                            problem = (f"prompt wav {utt.prompt_wav} is {info.samplerate} Hz, below the "
                                       f"{MIN_PROMPT_SAMPLE_RATE} Hz a prompt needs")
                        elif seconds > max_seconds:
                            problem = (f"prompt wav {utt.prompt_wav} is {seconds:.1f} s long, over the maximum of "
                                       f"{max_seconds:g} s (--max-prompt-seconds)")
                    except (OSError, RuntimeError) as error:  # soundfile's LibsndfileError is a RuntimeError
                        problem = f"cannot read prompt wav {utt.prompt_wav}: {error}"
                header_problem[utt.prompt_wav] = problem
            why = header_problem[utt.prompt_wav]
            if why is None and not utt.prompt_text.strip():
                why = "no prompt transcript (prompt_text)"
        if why:
            bad[utt.id] = f"{utt.where}: utterance {utt.id!r}: {why}"
    return bad


@functools.lru_cache(maxsize=64)
def _read_prompt_file(path: str):
    import soundfile

    wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1).astype("float32")
    wave.setflags(write=False)  # shared by every utterance of this prompt
    return wave, int(rate)


def read_prompt_audio(utt: Utterance):
    """The utterance's prompt as ``ttsrl.triton_client.SpeakerPromptAudio`` (mono float32);
    a prompt shared by several utterances is read once (small LRU)."""
    from ttsrl.triton_client import SpeakerPromptAudio

    wave, rate = _read_prompt_file(utt.prompt_wav)
    return SpeakerPromptAudio(wave, rate, utt.prompt_text.strip())


# ---- output files -----------------------------------------------------------------------------


def wav_path(output_dir: Path, utt_id: str) -> Path:
    return output_dir / "wavs" / f"{utt_id}.wav"


def record_path(output_dir: Path, utt_id: str) -> Path:
    return output_dir / "records" / f"{utt_id}.json"


def write_json_atomically(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_wav_atomically(path: Path, wave, sample_rate: int) -> None:
    import soundfile

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.wav")
    # 32-bit float keeps the decoder's output exactly (stand-in audio relies on it).
    soundfile.write(str(tmp), wave, sample_rate, subtype="FLOAT")
    os.replace(tmp, path)


def is_done(output_dir: Path, utt_id: str) -> bool:
    """Finished means a success record and its wav; failed ones are retried."""
    record = record_path(output_dir, utt_id)
    if not record.exists() or not wav_path(output_dir, utt_id).exists():
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("error") is None
    except (json.JSONDecodeError, OSError):
        return False


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temp files a killed run left behind (nothing writes before the start-up barrier)."""
    for folder in (output_dir / "wavs", output_dir / "records"):
        for path in folder.glob(".*.tmp-*"):
            path.unlink(missing_ok=True)


def pending_utterances(utterances: list[Utterance], output_dir: Path) -> list[Utterance]:
    return [u for u in utterances if not is_done(output_dir, u.id)]


def shard(items: list, rank: int, world_size: int) -> list:
    return items[rank::world_size]


def write_manifest(utterances: list[Utterance], output_dir: Path) -> dict:
    """Collect every utterance's record into OUT/manifest.jsonl; returns the summary."""
    lines = []
    summary = {"utterances": len(utterances), "ok": 0, "failed": 0, "bad_prompt": 0, "missing": 0,
               "seconds_of_audio": 0.0}
    for utt in utterances:
        path = record_path(output_dir, utt.id)
        if path.exists():
            record = json.loads(path.read_text(encoding="utf-8"))
        else:
            record = {"id": utt.id, "text": utt.text, "error": "not produced"}
            summary["missing"] += 1
        if record.get("error") is None:
            summary["ok"] += 1
            summary["seconds_of_audio"] += record.get("duration", 0.0)
        elif record.get("bad_prompt"):
            summary["bad_prompt"] += 1
        elif path.exists():
            summary["failed"] += 1
        lines.append(json.dumps(record, ensure_ascii=False))
    tmp = output_dir / f".manifest.jsonl.tmp-{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / "manifest.jsonl")
    return summary


# ---- generation -------------------------------------------------------------------------------


@dataclass
class SamplingOptions:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 25
    max_new_tokens: int = 1000
    greedy: bool = False
    seed: int = 0


def build_messages(utt: Utterance) -> list[dict]:
    """Zero-shot when the prompt's speech tokens are known, else text-only."""
    if utt.prompt_tokens:
        return prompt_messages(utt.prompt_text + utt.text, format_speech_tokens(utt.prompt_tokens))
    return prompt_messages(utt.text)


def chat_prompts(tokenizer, batch: list[Utterance]) -> list[str]:
    """The generation prompts of a batch: each utterance's messages through the model's chat template."""
    return [tokenizer.apply_chat_template(build_messages(u), tokenize=False) for u in batch]


class TransformersGenerator:
    """Batched sampling with transformers; left padding so every prompt ends where generation starts."""

    def __init__(self, model_dir: str, device: str, sampling: SamplingOptions):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device
        self.sampling = sampling
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.end_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in SPEECH_END_TOKENS]
        unknown = self.tokenizer.unk_token_id
        if any(i is None or (unknown is not None and i == unknown) for i in self.end_ids):
            raise ValueError(f"{model_dir}: the tokenizer lacks the speech end tokens {SPEECH_END_TOKENS}; "
                             "is this a converted CosyVoice2 checkpoint?")

    def generate(self, batch: list[Utterance]) -> list[str]:
        torch = self.torch
        prompts = chat_prompts(self.tokenizer, batch)
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        s = self.sampling
        kwargs = dict(max_new_tokens=s.max_new_tokens, eos_token_id=self.end_ids,
                      pad_token_id=self.tokenizer.pad_token_id)
        if s.greedy:
            kwargs.update(do_sample=False, top_p=None, top_k=None, temperature=None)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        with torch.no_grad():
            output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=False) for row in new_tokens]


class VllmGenerator:
    """vLLM offline generation (CUDA machines with vllm installed)."""

    def __init__(self, model_dir: str, sampling: SamplingOptions):
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.llm = LLM(model=model_dir, seed=sampling.seed)
        end_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in SPEECH_END_TOKENS]
        if sampling.greedy:
            self.params = SamplingParams(temperature=0.0, max_tokens=sampling.max_new_tokens, stop_token_ids=end_ids)
        else:
            self.params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                         max_tokens=sampling.max_new_tokens, stop_token_ids=end_ids)

    def generate(self, batch: list[Utterance]) -> list[str]:
        prompts = chat_prompts(self.tokenizer, batch)
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=False) for o in outputs]


# ---- speech tokens -> audio -------------------------------------------------------------------


def fill_prompt_tokens(utterances: list[Utterance], server_url: str, model: str = "speech_tokenizer") -> dict:
    """Give every utterance that has a prompt wav but no prompt tokens the server's tokens
    for that wav (in place). Returns {utt_id: "manifest" | "server" | "none"}: where each
    utterance's prompt tokens came from ("none": text-only prompting)."""
    sources = {u.id: "manifest" if u.prompt_tokens else "none" for u in utterances}
    wanted = sorted({u.prompt_wav for u in utterances if u.prompt_wav and not u.prompt_tokens})
    if not wanted:
        return sources
    from ttsrl.triton_client import TritonModelClient, server_ready

    if not server_ready(server_url, model=model):
        LOGGER.warning("%s does not serve a ready %r model: %d prompt wav(s) without prompt_tokens get text-only "
                       "prompting", server_url, model, len(wanted))
        return sources
    import soundfile

    tokens_of: dict[str, list[int]] = {}
    readable, waves, rates = [], [], []
    for path in wanted:
        try:
            wave, rate = soundfile.read(path, dtype="float32", always_2d=False)
        except (OSError, RuntimeError) as error:  # soundfile raises LibsndfileError (a RuntimeError)
            LOGGER.warning("cannot read prompt wav %s (%s): text-only prompting for it", path, error)
            continue
        readable.append(path)
        waves.append(wave if wave.ndim == 1 else wave.mean(axis=1))
        rates.append(rate)
    if readable:
        client = TritonModelClient(server_url, model)
        try:
            results = client.tokenize(waves, rates)
        finally:
            client.close()
        for path, result in zip(readable, results):
            if isinstance(result, Exception) or not result:
                LOGGER.warning("%s could not tokenize prompt wav %s (%s): text-only prompting for it", model, path,
                               result if isinstance(result, Exception) else "no tokens")
            else:
                tokens_of[path] = result
    for utt in utterances:
        if not utt.prompt_tokens and utt.prompt_wav in tokens_of:
            utt.prompt_tokens = list(tokens_of[utt.prompt_wav])
            sources[utt.id] = "server"
    return sources


class ServerToken2Wav:
    """The reward server's ``token2wav`` model over gRPC or HTTP (tritonclient)."""

    def __init__(self, url: str, model_name: str = "token2wav", timeout_s: float = 600.0):
        from ttsrl.triton_client import TritonModelClient

        self.client = TritonModelClient(url, model_name, timeout_s)

    def synthesize(self, token_lists: list[list[int]]):
        """In the server's prompt-bank voice -> list of (waveform float32, sample_rate) or an Exception per item."""
        return self.client.token2wav(token_lists)

    def decode(self, token_lists: list[list[int]], prompts: list):
        """Each item in the voice of its own prompt (``SpeakerPromptAudio``; None: the bank's)
        -> list of ``ttsrl.triton_client.Synthesis`` or an Exception per item."""
        return self.client.synthesize(token_lists, prompts)


class InProcessToken2Wav:
    """token2wav engines loaded in this process instead of a server (``--engines MODULE_OR_FILE:FACTORY``).

    For runs in the server environment (it has torch, transformers and the engines'
    packages). Each item is decoded with its own prompt, prepared once per distinct prompt
    (the server's ``PromptCache`` and ``check_prompt``); an item without one uses the prompt
    bank's first prompt (``--prompt-bank``).
    """

    def __init__(self, spec: str, device: str, cosyvoice2_dir: str | None = None, prompt_bank: str | None = None):
        from token2wav_server.engines import EngineOptions, create_engines
        from token2wav_server.prompt_bank import PromptCache, load_prompts

        self.engine = create_engines(EngineOptions(device=device, cosyvoice2_dir=cosyvoice2_dir), spec).token2wav
        self.prompt_bank = prompt_bank
        self._bank = None
        self.cache = PromptCache(self.engine.prepare_prompt)
        self._load_prompts = load_prompts

    def _bank_prompt(self):
        if self._bank is None:
            prompt = self._load_prompts(self.prompt_bank)[0]
            self._bank = (prompt.name, self.engine.prepare_prompt(prompt))
        return self._bank

    def synthesize(self, token_lists: list[list[int]]):
        return [r if isinstance(r, Exception) else (r.wave, r.sample_rate)
                for r in self.decode(token_lists, [None] * len(token_lists))]

    def decode(self, token_lists: list[list[int]], prompts: list):
        import numpy as np

        from token2wav_server.engines import SpeakerPrompt
        from token2wav_server.prompt_bank import PromptBankError, check_prompt
        from ttsrl.triton_client import BANK_PROMPT_PREFIX, Synthesis

        results: list = [None] * len(token_lists)
        todo, features, prompt_ids = [], [], []
        for index, prompt in enumerate(prompts):
            try:
                if prompt is None:
                    name, prepared = self._bank_prompt()
                    prompt_ids.append(BANK_PROMPT_PREFIX + name)
                else:
                    check_prompt(prompt.wave, prompt.sample_rate, prompt.text, "speaker prompt")
                    key = prompt.key
                    prepared = self.cache.features(key, SpeakerPrompt(f"item-{key[:16]}", np.asarray(prompt.wave),
                                                                      prompt.sample_rate, prompt.text))
                    prompt_ids.append(key)
            except (PromptBankError, RuntimeError, ValueError) as error:
                results[index] = error
                continue
            todo.append(index)
            features.append(prepared)
        if todo:
            waves = self.engine.synthesize([np.asarray(token_lists[i], dtype=np.int64) for i in todo], features)
            for index, wave, prompt_id in zip(todo, waves, prompt_ids):
                results[index] = Synthesis(np.asarray(wave, dtype=np.float32), self.engine.sample_rate, prompt_id)
        return results


# ---- the run ----------------------------------------------------------------------------------


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


def append_rank_log(output_dir: Path, rank: int, records: list[dict]) -> None:
    """OUT/logs/rank_<r>.log: one line per utterance this rank finished (ok or failed), in order."""
    with open(output_dir / "logs" / f"rank_{rank}.log", "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(f"{record['id']}\t{'failed: ' + record['error'] if record['error'] else 'ok'}\n")


def synthesize_batch(batch: list[Utterance], generator, token2wav, output_dir: Path,
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
        else:
            parsed = parse_speech_tokens(response)
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
            write_wav_atomically(wav_path(output_dir, record["id"]), result.wave, result.sample_rate)
            record["duration"] = round(len(result.wave) / result.sample_rate, 4)
            record["sample_rate"] = result.sample_rate
    for record in records:
        write_json_atomically(record_path(output_dir, record["id"]), record)
    return records


def write_bad_prompt_records(bad: dict[str, str], utterances: list[Utterance], output_dir: Path) -> None:
    """--on-bad-prompt skip: a record per skipped utterance (retried by the next run, like a
    failure) and OUT/bad_prompts.txt listing them with file:line."""
    for utt in utterances:
        if utt.id in bad:
            write_json_atomically(record_path(output_dir, utt.id), {
                "id": utt.id, "text": utt.text, "prompt_text": utt.prompt_text, "prompt_wav": utt.prompt_wav,
                "prompt_voice": "utterance", "prompt_id": None, "tokens": 0, "duration": 0.0,
                "bad_prompt": True, "error": f"skipped, bad prompt: {bad[utt.id]}"})
    tmp = output_dir / f".bad_prompts.txt.tmp-{os.getpid()}"
    tmp.write_text("".join(f"{bad[u.id]}\n" for u in utterances if u.id in bad), encoding="utf-8")
    os.replace(tmp, output_dir / "bad_prompts.txt")


def run(args, generator_factory=None, token2wav=None) -> dict:
    """The whole job on this rank; returns rank 0's summary (others return their own counts)."""
    output_dir = Path(args.output_dir)
    utterances = read_manifest(args.manifest, getattr(args, "layout", "auto"))
    if args.max_utterances:
        utterances = utterances[:args.max_utterances]
    prompt_voice = getattr(args, "prompt_voice", "utterance")
    bad = check_prompts(utterances, getattr(args, "max_prompt_seconds", None)) if prompt_voice == "utterance" else {}
    bad = {utt_id: why for utt_id, why in bad.items() if not is_done(output_dir, utt_id)}  # done stays done
    if bad and getattr(args, "on_bad_prompt", "fail") == "fail":
        # Every rank reads the same set and finds the same rows, so all stop here together.
        listed = "\n  ".join(bad[u.id] for u in utterances if u.id in bad)
        raise BadPromptError(f"{len(bad)} utterance(s) have a prompt that cannot condition their audio "
                             f"(--on-bad-prompt skip leaves them out):\n  {listed}")
    rank, world_size, device = init_distributed()
    (output_dir / "wavs").mkdir(parents=True, exist_ok=True)
    (output_dir / "records").mkdir(parents=True, exist_ok=True)
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    pending = [u for u in pending_utterances(utterances, output_dir) if u.id not in bad]
    if rank == 0:
        remove_stale_temporaries(output_dir)
    # Everyone has listed the pending utterances before anyone writes, so all ranks split the same list.
    barrier(world_size)
    mine = shard(pending, rank, world_size)
    if rank == 0:
        if bad:
            LOGGER.warning("skipping %d utterance(s) with a bad prompt (--on-bad-prompt skip), listed in %s",
                           len(bad), output_dir / "bad_prompts.txt")
            write_bad_prompt_records(bad, utterances, output_dir)
        else:
            (output_dir / "bad_prompts.txt").unlink(missing_ok=True)  # from an earlier run
        LOGGER.info("%d utterances, %d already done, %d skipped for a bad prompt, %d to do on %d ranks",
                    len(utterances), len(utterances) - len(pending) - len(bad), len(bad), len(pending), world_size)
    counts = {"done": 0, "failed": 0}
    if mine:
        import torch

        torch.manual_seed(args.seed + rank)
        sampling = SamplingOptions(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.greedy, args.seed)
        if generator_factory is not None:
            generator = generator_factory(device, sampling)
        elif args.backend == "vllm":
            generator = VllmGenerator(args.model, sampling)
        else:
            generator = TransformersGenerator(args.model, device, sampling)
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
            append_rank_log(output_dir, rank, records)
            for record in records:
                counts["failed" if record["error"] else "done"] += 1
            if progress is not None:
                progress.update(len(batch))
        if progress is not None:
            progress.close()
    barrier(world_size)
    summary = counts
    if rank == 0:
        summary = write_manifest(utterances, output_dir)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory (merged or converted)")
    parser.add_argument("--manifest", required=True,
                        help="test set: a Seed-TTS-eval meta.lst, a CV3-Eval task folder (text, prompt_text, "
                             "prompt_wav.scp) or a JSONL (see ttsrl/eval_sets.py)")
    parser.add_argument("--layout", choices=("auto",) + EVAL_LAYOUTS, default="auto",
                        help="layout of --manifest (auto: a folder is cv3-eval, .jsonl is jsonl, else seed-tts)")
    parser.add_argument("--prompt-voice", choices=("utterance", "bank"), default="utterance",
                        help="utterance: decode each utterance in the voice of its own prompt wav (the zero-shot "
                             "protocol); bank: decode every utterance in the server's prompt-bank voice")
    parser.add_argument("--on-bad-prompt", choices=("fail", "skip"), default="fail",
                        help="an utterance whose prompt wav is missing, unreadable, too long or has no transcript: "
                             "fail (stop before generating, listing every such row) or skip it (recorded, counted "
                             "in the summary, listed in OUT/bad_prompts.txt)")
    parser.add_argument("--max-prompt-seconds", type=float, default=None,
                        help="longest prompt wav accepted (default: the server's limit, 30 s)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--server-url", default=os.environ.get("REWARD_SERVER_URL", "grpc://127.0.0.1:8001"),
                        help="reward server serving token2wav (and speech_tokenizer for prompt wavs without "
                             "prompt_tokens) (grpc://host:port or http://host:port; "
                             "default $REWARD_SERVER_URL or grpc://127.0.0.1:8001; first of a list)")
    parser.add_argument("--engines", default="",
                        help="decode in this process with MODULE_OR_FILE:FACTORY engines instead of the server "
                             "(run in the server environment), e.g. token2wav_server.standin:create_engines")
    parser.add_argument("--cosyvoice2-dir", default=None, help="with --engines: the CosyVoice2-0.5B directory")
    parser.add_argument("--prompt-bank", default=None, help="with --engines: speaker prompt wav/JSONL/folder")
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=1000)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=25)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0, help="rank r samples with seed + r")
    parser.add_argument("--max-utterances", type=int, default=0, help="only the first N of the manifest (0: all)")
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    args.server_url = args.server_url.split(",")[0].strip()
    try:
        run(args)
    except (ManifestError, BadPromptError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

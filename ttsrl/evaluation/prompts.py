"""The prompts of a zero-shot test set: whether each utterance's prompt wav can condition its
audio, the prompt audio itself, and the prompt's speech tokens for zero-shot prompting of
the LLM (from the reward server's ``speech_tokenizer`` when the test set has none)."""
from __future__ import annotations

import functools
import logging

from ttsrl.eval_sets import EvalUtterance
from ttsrl.evaluation.outputs import read_wave

LOGGER = logging.getLogger("infer_dist")  # log lines keep the name of the job users run


class BadPromptError(Exception):
    """Utterances whose prompt cannot condition their audio, with --on-bad-prompt fail."""


def _header_problem(path: str, max_seconds: float) -> str | None:
    """Why the wav at ``path`` cannot be a prompt, from its header alone; None if it can
    (the checks of ``ttsrl.training.speaker_prompts.wav_problem``, without its minimum
    length: the server takes short prompts, only training data asks for MIN_PROMPT_SECONDS)."""
    from ttsrl.training.speaker_prompts import wav_problem

    problem = wav_problem(path, max_seconds)
    return None if problem is None else problem[1]


def check_prompts(utterances: list[EvalUtterance], max_seconds: float | None = None) -> dict[str, str]:
    """{utt_id: "file:line: why"} for every utterance whose prompt cannot condition its audio:
    no prompt wav, a wav that is missing, unreadable, empty, of too low a sample rate or
    longer than ``max_seconds`` (default: the server's limit), or no prompt transcript.
    Reads only the wav headers; each distinct wav once."""
    from token2wav_server.prompt_bank import MAX_PROMPT_SECONDS

    max_seconds = MAX_PROMPT_SECONDS if max_seconds is None else max_seconds
    header_problem: dict[str, str | None] = {}
    bad: dict[str, str] = {}
    for utt in utterances:
        if not utt.prompt_wav:
            why = "no prompt wav (its own voice is unknown; --prompt-voice bank decodes in the server's voice)"
        else:
            if utt.prompt_wav not in header_problem:
                header_problem[utt.prompt_wav] = _header_problem(utt.prompt_wav, max_seconds)
            why = header_problem[utt.prompt_wav]
            if why is None and not utt.prompt_text.strip():
                why = "no prompt transcript (prompt_text)"
        if why:
            bad[utt.id] = f"{utt.where}: utterance {utt.id!r}: {why}"
    return bad


@functools.lru_cache(maxsize=64)
def _read_prompt_file(path: str):
    wave, rate = read_wave(path)
    wave = wave.astype("float32")
    wave.setflags(write=False)  # shared by every utterance of this prompt
    return wave, int(rate)


def read_prompt_audio(utt: EvalUtterance):
    """The utterance's prompt as ``ttsrl.triton_client.SpeakerPromptAudio`` (mono float32);
    a prompt shared by several utterances is read once (small LRU)."""
    from ttsrl.triton_client import SpeakerPromptAudio

    wave, rate = _read_prompt_file(utt.prompt_wav)
    return SpeakerPromptAudio(wave, rate, utt.prompt_text.strip())


def fill_prompt_tokens(utterances: list[EvalUtterance], server_url: str, model: str = "speech_tokenizer") -> dict:
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
    tokens_of: dict[str, list[int]] = {}
    readable, waves, rates = [], [], []
    for path in wanted:
        try:
            wave, rate = read_wave(path)
        except (OSError, RuntimeError) as error:  # soundfile raises LibsndfileError (a RuntimeError)
            LOGGER.warning("cannot read prompt wav %s (%s): text-only prompting for it", path, error)
            continue
        readable.append(path)
        waves.append(wave)
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

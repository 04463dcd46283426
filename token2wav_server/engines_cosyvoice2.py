"""The real engines: CosyVoice2 token2wav (flow matching + HiFT) and SenseVoice ASR.

``--engines token2wav_server.engines_cosyvoice2:create_engines`` (the run.sh default).

- token2wav: ``cosyvoice.cli.cosyvoice.CosyVoice2(model_dir, load_jit, load_trt,
  load_vllm=False, fp16)`` from ``--cosyvoice2-dir``; the CosyVoice source must be
  importable (run.sh puts ``$cosyvoice_src`` and its Matcha-TTS on PYTHONPATH). Each
  speaker prompt goes through ``frontend.frontend_zero_shot`` once at start-up, which
  yields its flow prompt tokens, mel features and speaker embedding; requests reuse them.
  CosyVoice2's flow decoder takes one utterance per call (its ``inference`` is written for
  batch 1), so a dynamic batch is decoded item by item on the slot's device, under one lock
  and without any per-request set-up.
- asr: SenseVoiceSmall via FunASR from ``--sensevoice-dir`` (``engines_sensevoice``).
- asr_eval (optional): a FunASR model (Paraformer) from ``--asr-eval-dir``.
- speaker: CosyVoice2's own CAM++ speaker model (``campplus.onnx``), through the same
  frontend; used by the reward when it weights similarity, and served as ``speaker``.
- speech_tokenizer: CosyVoice2's speech tokenizer (``speech_tokenizer_v2.onnx``) through
  the same frontend, served as ``speech_tokenizer`` (zero-shot prompts in evaluation).
  Both frontend extractors take a wav path at the pinned CosyVoice commit, so each
  waveform is written to a temporary 16 kHz float wav first.

Nothing here is imported before a factory call, so the server environment needs
CosyVoice, CUDA torch and torchaudio only when these engines are used.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pathlib
import tempfile

import numpy as np

from .engines import EngineOptions, Engines, SpeakerPrompt
from .engines_sensevoice import check_model_dir, paraformer, sensevoice

LOGGER = logging.getLogger(__name__)
REQUIRED_FILES = ("cosyvoice2.yaml", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx")


def check_cosyvoice2_dir(path) -> pathlib.Path:
    """The CosyVoice2-0.5B directory, with an error naming what is missing."""
    directory = check_model_dir(path, "--cosyvoice2-dir", "the CosyVoice2 token2wav engine")
    missing = [name for name in REQUIRED_FILES if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"--cosyvoice2-dir {directory} lacks {missing}: is it iic/CosyVoice2-0.5B?")
    return directory


def _import_cosyvoice2():
    try:
        from cosyvoice.cli.cosyvoice import CosyVoice2
    except ImportError as error:
        raise ImportError(
            f"cannot import CosyVoice ({error}); put the CosyVoice source and its third_party/Matcha-TTS on "
            "PYTHONPATH (run.sh does this from $cosyvoice_src) and install requirements-cosyvoice.txt"
        ) from error
    return CosyVoice2


def _call_with_supported(function, **kwargs):
    """Call ``function`` with the keyword arguments it accepts (CosyVoice's signatures
    gained ``streaming``/``finalize`` over time)."""
    accepted = inspect.signature(function).parameters
    return function(**{k: v for k, v in kwargs.items() if k in accepted})


def _prompt_wav_path(prompt: SpeakerPrompt, scratch: pathlib.Path) -> str:
    if prompt.path:
        return prompt.path
    import soundfile

    path = scratch / f"{prompt.name}.wav"
    soundfile.write(str(path), prompt.wave, prompt.sample_rate)
    return str(path)


class CosyVoice2Token2Wav:
    """Speech tokens -> 24 kHz waveform with CosyVoice2's flow decoder and HiFT vocoder."""

    def __init__(self, model_dir: str, device: str = "cuda:0", fp16: bool = False, load_jit: bool = False,
                 load_trt: bool = False, cosyvoice=None):
        if cosyvoice is None:
            directory = check_cosyvoice2_dir(model_dir)
            import torch

            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
            CosyVoice2 = _import_cosyvoice2()
            cosyvoice = CosyVoice2(str(directory), load_jit=load_jit, load_trt=load_trt, load_vllm=False, fp16=fp16)
            # The LLM is not used here: free its memory.
            cosyvoice.model.llm = None
        self.cosyvoice = cosyvoice
        self.sample_rate = int(cosyvoice.sample_rate)
        self.fp16 = fp16
        self._scratch = pathlib.Path(tempfile.mkdtemp(prefix="cosyvoice2_prompts_"))

    def prepare_prompt(self, prompt: SpeakerPrompt) -> object:
        if not prompt.text:
            raise ValueError(f"speaker prompt {prompt.name!r} has no transcript; CosyVoice2 needs one "
                             "(give --prompt-bank, see docs/reward_server.md)")
        features = self.cosyvoice.frontend.frontend_zero_shot(
            "占位", prompt.text, _prompt_wav_path(prompt, self._scratch), self.sample_rate, ""
        )
        return {key: features[key] for key in ("flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding")}

    def synthesize(self, token_batch: list, prompts: list) -> list:
        import torch

        model = self.cosyvoice.model
        device = model.device
        waves = []
        with torch.inference_mode():
            for tokens, prompt in zip(token_batch, prompts):
                token = torch.as_tensor(np.asarray(tokens, dtype=np.int32)).reshape(1, -1).to(device)
                prompt_token = prompt["flow_prompt_speech_token"].to(device)
                prompt_feat = prompt["prompt_speech_feat"].to(device)
                embedding = prompt["flow_embedding"].to(device)
                with torch.cuda.amp.autocast(self.fp16) if device.type == "cuda" else contextlib.nullcontext():
                    mel, _ = _call_with_supported(
                        model.flow.inference,
                        token=token, token_len=torch.tensor([token.shape[1]], dtype=torch.int32, device=device),
                        prompt_token=prompt_token,
                        prompt_token_len=torch.tensor([prompt_token.shape[1]], dtype=torch.int32, device=device),
                        prompt_feat=prompt_feat,
                        prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32, device=device),
                        embedding=embedding, streaming=False, finalize=True,
                    )
                    speech, _ = model.hift.inference(speech_feat=mel.float(), cache_source=torch.zeros(1, 1, 0,
                                                                                                  device=device))
                waves.append(speech.reshape(-1).float().cpu().numpy())
        return waves


def _write_wav(wave, sample_rate: int, scratch: pathlib.Path) -> str:
    """One waveform as a float wav file in ``scratch``: CosyVoice2's frontend extractors
    (``_extract_speech_token``, ``_extract_spk_embedding``) take a wav path and load it
    themselves at 16 kHz."""
    import soundfile

    handle, path = tempfile.mkstemp(suffix=".wav", dir=scratch)
    os.close(handle)
    soundfile.write(path, np.asarray(wave, dtype=np.float32).reshape(-1), sample_rate, subtype="FLOAT")
    return path


class _FrontendWaveEngine:
    """Runs one of CosyVoice2's per-wav frontend extractors over a batch (16 kHz in)."""

    sample_rate = 16000

    def __init__(self, token2wav: CosyVoice2Token2Wav):
        self.frontend = token2wav.cosyvoice.frontend
        self._scratch = pathlib.Path(tempfile.mkdtemp(prefix="cosyvoice2_waves_"))

    def _each(self, waves: list, extract) -> list:
        results = []
        for wave in waves:
            path = _write_wav(wave, self.sample_rate, self._scratch)
            try:
                results.append(extract(path))
            finally:
                os.unlink(path)
        return results


class CampplusSpeaker(_FrontendWaveEngine):
    """Speaker embeddings from CosyVoice2's CAM++ model (``frontend._extract_spk_embedding``)."""

    def embed(self, waves: list) -> np.ndarray:
        rows = self._each(waves, self.frontend._extract_spk_embedding)
        return np.stack([row.reshape(-1).float().cpu().numpy() for row in rows])


class CosyVoice2SpeechTokenizer(_FrontendWaveEngine):
    """Speech tokens from CosyVoice2's own tokenizer (``speech_tokenizer_v2.onnx`` through
    ``frontend._extract_speech_token``, which returns (tokens [1, T], length)); the
    tokenizer reads at most 30 s of audio."""

    MAX_SECONDS = 30

    def tokenize(self, waves: list) -> list:
        for wave in waves:
            if len(wave) > self.MAX_SECONDS * self.sample_rate:
                raise ValueError(f"{len(wave) / self.sample_rate:.1f} s of audio: CosyVoice2's speech tokenizer "
                                 f"reads at most {self.MAX_SECONDS} s")
        pairs = self._each(waves, self.frontend._extract_speech_token)
        return [tokens.reshape(-1).cpu().numpy().astype(np.int64) for tokens, _ in pairs]


def create_engines(options: EngineOptions) -> Engines:
    """Factory for ``--engines token2wav_server.engines_cosyvoice2:create_engines``."""
    check_cosyvoice2_dir(options.cosyvoice2_dir)
    check_model_dir(options.sensevoice_dir, "--sensevoice-dir", "the SenseVoice ASR engine")
    if options.asr_eval_dir:
        check_model_dir(options.asr_eval_dir, "--asr-eval-dir", "the evaluation ASR engine")
    token2wav = CosyVoice2Token2Wav(options.cosyvoice2_dir, options.device, options.fp16, options.load_jit,
                                    options.load_trt)
    return Engines(
        token2wav=token2wav,
        asr=sensevoice(options.sensevoice_dir, options.device),
        speaker=CampplusSpeaker(token2wav),
        asr_eval=paraformer(options.asr_eval_dir, options.device) if options.asr_eval_dir else None,
        speech_tokenizer=CosyVoice2SpeechTokenizer(token2wav),
    )

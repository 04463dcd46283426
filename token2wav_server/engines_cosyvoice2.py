"""The real engines: CosyVoice2 token2wav (flow matching + HiFT) and SenseVoice ASR.

``--engines token2wav_server.engines_cosyvoice2:create_engines`` (the run.sh default).

- token2wav: ``cosyvoice.cli.cosyvoice.CosyVoice2(model_dir, load_jit, load_trt,
  load_vllm=False, fp16)`` from ``--cosyvoice2-dir``; the CosyVoice source must be
  importable (run.sh puts ``$cosyvoice_src`` and its Matcha-TTS on PYTHONPATH). Each
  speaker prompt is turned once into its flow prompt tokens, mel features and speaker
  embedding (what ``frontend.frontend_zero_shot`` computes, from CosyVoice's own feature
  extractor, speech tokenizer and CAM++ sessions); requests reuse them. The flow runs
  under fp16 autocast with ``--fp16`` (the default on CUDA); HiFT always runs in fp32 outside
  autocast, as upstream ``CosyVoice2Model.token2wav`` does (its STFT/ISTFT is fragile in reduced
  precision). ``--load-jit`` / ``--load-trt`` go through ``CosyVoice2(load_jit, load_trt)``:
  upstream loads ``flow.encoder.{fp16,fp32}.zip`` and builds the TensorRT plan of the flow
  estimator from ``flow.decoder.estimator.fp32.onnx`` on first use.
  A dynamic batch is decoded item by item (``flow.inference`` is written for batch 1), or,
  with ``--flow-batch`` (the default on CUDA), in one pass: the flow encoder per item (it is
  not padding-invariant), then one padded classifier-free-guidance batch through the
  flow decoder's estimator (``decode_flow_batch``).
- asr: SenseVoiceSmall via FunASR from ``--sensevoice-dir`` (``engines_sensevoice``).
- asr_eval (optional): a FunASR model (Paraformer) from ``--asr-eval-dir``.
- speaker: CosyVoice2's own CAM++ speaker model (``campplus.onnx``); used by the reward
  when it weights similarity, and served as ``speaker``.
- speech_tokenizer: CosyVoice2's speech tokenizer (``speech_tokenizer_v2.onnx``), served as
  ``speech_tokenizer`` (zero-shot prompts in evaluation).

Audio never goes through ``torchaudio.load`` (CosyVoice's ``load_wav``): torchaudio 2.9+
needs torchcodec and FFmpeg for it. Waveforms arrive as arrays (prompts are read with
soundfile by ``prompt_bank``) and are resampled with ``torchaudio.transforms.Resample``,
as CosyVoice's ``load_wav`` does.

Devices: a slot on ``cuda:N`` builds its models under ``torch.cuda.device(N)``, pins
CosyVoice's model and frontend to ``cuda:N`` (upstream uses the bare ``cuda``, which
means GPU 0 in PyTriton's callback threads), runs every call under that device, and gives
the speech tokenizer's ONNX session ``device_id`` N.

Nothing here is imported before a factory call, so the server environment needs
CosyVoice, torch and torchaudio only when these engines are used.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import pathlib

import numpy as np

from .engines import EngineOptions, Engines, SpeakerPrompt, parse_bool
from .engines_sensevoice import check_model_dir, paraformer, sensevoice
from .prompt_bank import PromptBankError, check_prompt

LOGGER = logging.getLogger(__name__)

MODEL_SOURCE = "iic/CosyVoice2-0.5B (downloaded by `bash run.sh -1 -1`)"
REQUIRED_FILES = {
    "cosyvoice2.yaml": "the model's hyperpyyaml config",
    "llm.pt": "the LLM weights (CosyVoice2() loads them strictly before the token2wav parts)",
    "flow.pt": "the flow-matching decoder weights",
    "hift.pt": "the HiFT vocoder weights",
    "campplus.onnx": "the CAM++ speaker-embedding model",
    "speech_tokenizer_v2.onnx": "the speech tokenizer",
    "CosyVoice-BlankEN/config.json": "the Qwen2 config the LLM is built from",
    "CosyVoice-BlankEN/tokenizer_config.json": "the text tokenizer CosyVoice2's frontend loads",
}
"""Files ``CosyVoice2(model_dir)`` opens, and what each one is."""
QWEN2_WEIGHTS = ("CosyVoice-BlankEN/model.safetensors", "CosyVoice-BlankEN/pytorch_model.bin")

MIN_PROMPT_SECONDS = 1.0
"""Shortest speaker prompt accepted: 25 prompt speech tokens (CosyVoice recommends 3-10 s)."""
FLOW_TIMESTEPS = 10  # what CausalMaskedDiffWithXvec.inference uses


def required_files(load_jit: bool = False, fp16: bool = False, load_trt: bool = False) -> dict:
    """File -> what it is, for a CosyVoice2 directory with these load options."""
    files = dict(REQUIRED_FILES)
    if load_jit:
        files[f"flow.encoder.{'fp16' if fp16 else 'fp32'}.zip"] = "the JIT-exported flow encoder (--load-jit)"
    if load_trt:
        files["flow.decoder.estimator.fp32.onnx"] = "the flow estimator ONNX that --load-trt builds its TensorRT plan from"
    return files


def check_cosyvoice2_dir(path, load_jit: bool = False, fp16: bool = False, load_trt: bool = False) -> pathlib.Path:
    """The CosyVoice2-0.5B directory, or an error naming each missing file, what it is and
    where it comes from."""
    directory = check_model_dir(path, "--cosyvoice2-dir", "the CosyVoice2 token2wav engine")
    missing = [f"{name} ({what})" for name, what in required_files(load_jit, fp16, load_trt).items()
               if not (directory / name).exists()]
    if not any((directory / name).exists() for name in QWEN2_WEIGHTS):
        missing.append(f"{QWEN2_WEIGHTS[0]} (the Qwen2 weights Qwen2Encoder loads)")
    if missing:
        raise FileNotFoundError(f"--cosyvoice2-dir {directory} lacks " + "; ".join(missing)
                                + f". They come with {MODEL_SOURCE}")
    return directory


def _import_cosyvoice2():
    try:
        from cosyvoice.cli.cosyvoice import CosyVoice2
    except ImportError as error:
        raise ImportError(
            f"cannot import CosyVoice ({error}); put the CosyVoice source and its third_party/Matcha-TTS on "
            "PYTHONPATH (run.sh does this from $cosyvoice_src) and install its requirements "
            "(bash scripts/setup_env.sh server)"
        ) from error
    return CosyVoice2


def parse_bool_option(options: EngineOptions, key: str, default: bool = False) -> bool:
    """An ``--engine-option KEY=true|false`` value."""
    value = options.extra.get(key)
    return default if value is None else parse_bool(value, f"--engine-option {key}")


def device_scope(device):
    """``torch.cuda.device(device)`` for a CUDA device (so the bare ``cuda`` that CosyVoice
    uses internally means this slot's GPU in every thread), else nothing."""
    import torch

    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _onnx_session_on(path: str, device) -> "object":
    """An onnxruntime session of ``path`` on ``device``: CUDA with ``device_id`` N for
    ``cuda:N`` (upstream's session always lands on GPU 0), else the CPU."""
    import onnxruntime
    import torch

    device = torch.device(device)
    option = onnxruntime.SessionOptions()
    option.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    option.intra_op_num_threads = 1
    if device.type == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return onnxruntime.InferenceSession(path, sess_options=option, providers=providers)


@functools.lru_cache(maxsize=16)
def _resampler(from_rate: int, to_rate: int):
    import torchaudio

    return torchaudio.transforms.Resample(orig_freq=from_rate, new_freq=to_rate)


def resample_tensor(wave: np.ndarray, from_rate: int, to_rate: int):
    """Mono float32 samples -> a [1, N] tensor at ``to_rate``, with the resampler
    CosyVoice's ``load_wav`` uses (``torchaudio.transforms.Resample`` with its defaults),
    so features equal what the upstream frontend computes from the same file."""
    import torch

    speech = torch.as_tensor(np.asarray(wave, dtype=np.float32).reshape(1, -1))
    if int(from_rate) != int(to_rate):
        speech = _resampler(int(from_rate), int(to_rate))(speech)
    return speech


class CosyVoice2Features:
    """CosyVoice2's frontend features of in-memory 16 kHz / 24 kHz waveforms: the same
    computations as ``CosyVoiceFrontEnd._extract_speech_feat / _extract_speech_token /
    _extract_spk_embedding``, with CosyVoice's own feature extractor and ONNX sessions,
    without ``load_wav`` (see the module doc)."""

    MAX_TOKENIZER_SECONDS = 30  # the speech tokenizer reads at most 30 s

    def __init__(self, frontend, device):
        self.frontend = frontend
        self.device = device

    def speech_feat(self, speech_24k):
        """[1, N] at 24 kHz -> mel [1, frames, 80] (50 frames per second) on the device."""
        feat = self.frontend.feat_extractor(speech_24k).squeeze(dim=0).transpose(0, 1)
        return feat.unsqueeze(dim=0).to(self.device)

    def speech_tokens(self, speech_16k):
        """[1, N] at 16 kHz -> int32 tokens [1, T] (25 per second) on the device."""
        import torch
        import whisper

        seconds = speech_16k.shape[1] / 16000
        if seconds > self.MAX_TOKENIZER_SECONDS:
            raise ValueError(f"{seconds:.1f} s of audio: CosyVoice2's speech tokenizer reads at most "
                             f"{self.MAX_TOKENIZER_SECONDS} s")
        feat = whisper.log_mel_spectrogram(speech_16k, n_mels=128)
        session = self.frontend.speech_tokenizer_session
        inputs = session.get_inputs()
        tokens = session.run(None, {inputs[0].name: feat.detach().cpu().numpy(),
                                    inputs[1].name: np.array([feat.shape[2]], dtype=np.int32)})[0]
        return torch.as_tensor(np.asarray(tokens).reshape(1, -1), dtype=torch.int32).to(self.device)

    def speaker_embedding(self, speech_16k):
        """[1, N] at 16 kHz -> CAM++ embedding [1, 192] on the device."""
        import torch
        import torchaudio.compliance.kaldi as kaldi

        feat = kaldi.fbank(speech_16k, num_mel_bins=80, dither=0, sample_frequency=16000)
        feat = feat - feat.mean(dim=0, keepdim=True)
        session = self.frontend.campplus_session
        embedding = session.run(None, {session.get_inputs()[0].name: feat.unsqueeze(dim=0).cpu().numpy()})[0]
        return torch.as_tensor(np.asarray(embedding, dtype=np.float32).reshape(1, -1)).to(self.device)

    def zero_shot_prompt(self, wave: np.ndarray, sample_rate: int) -> dict:
        """The flow's prompt inputs of one prompt waveform, like ``frontend_zero_shot``
        (CosyVoice2: mel frames cut to exactly twice the prompt tokens)."""
        speech_16k = resample_tensor(wave, sample_rate, 16000)
        feat = self.speech_feat(resample_tensor(wave, sample_rate, 24000))
        tokens = self.speech_tokens(speech_16k)
        token_len = min(feat.shape[1] // 2, tokens.shape[1])
        return {"flow_prompt_speech_token": tokens[:, :token_len],
                "prompt_speech_feat": feat[:, :2 * token_len],
                "flow_embedding": self.speaker_embedding(speech_16k)}


def _call_with_supported(function, **kwargs):
    """Call ``function`` with the keyword arguments it accepts (CosyVoice's signatures
    gained ``streaming``/``finalize`` over time)."""
    accepted = inspect.signature(function).parameters
    return function(**{k: v for k, v in kwargs.items() if k in accepted})


def fp16_autocast(device, fp16: bool):
    """Upstream's ``--fp16``: ``torch.autocast`` in float16 (mixed precision; the weights stay
    fp32) on the slot's device type. The server turns fp16 off on the CPU
    (token2wav_server.decode_settings); an engine built with fp16 on the CPU (tests of the GPU
    branch) runs the same code under the CPU's float16 autocast."""
    import torch

    if fp16:
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.float16)
    return contextlib.nullcontext()


def decode_flow_one(flow, token, prompt):
    """Mel [1, 80, 2T] of one item through CosyVoice's own ``flow.inference`` (batch 1)."""
    import torch

    device = token.device
    prompt_token, prompt_feat = prompt["flow_prompt_speech_token"], prompt["prompt_speech_feat"]
    mel, _ = _call_with_supported(
        flow.inference,
        token=token, token_len=torch.tensor([token.shape[1]], dtype=torch.int32, device=device),
        prompt_token=prompt_token,
        prompt_token_len=torch.tensor([prompt_token.shape[1]], dtype=torch.int32, device=device),
        prompt_feat=prompt_feat,
        prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32, device=device),
        embedding=prompt["flow_embedding"], streaming=False, finalize=True,
    )
    return mel


def encode_for_flow(flow, token, prompt):
    """The flow encoder's part of ``CausalMaskedDiffWithXvec.inference`` for one item:
    -> (mu [1, 80, L], cond [1, 80, L], spks [1, 80], prompt mel frames)."""
    import torch
    import torch.nn.functional as F

    prompt_token = prompt["flow_prompt_speech_token"]
    prompt_feat = prompt["prompt_speech_feat"]
    embedding = flow.spk_embed_affine_layer(F.normalize(prompt["flow_embedding"], dim=1))
    tokens = torch.concat([prompt_token, token], dim=1)
    token_len = torch.tensor([tokens.shape[1]], dtype=torch.int32, device=tokens.device)
    embedded = flow.input_embedding(torch.clamp(tokens, min=0))
    h, _ = flow.encoder(embedded, token_len, streaming=False)
    h = flow.encoder_proj(h)
    cond = torch.zeros([1, h.shape[1], flow.output_size], device=h.device, dtype=h.dtype)
    cond[:, :prompt_feat.shape[1]] = prompt_feat
    return h.transpose(1, 2), cond.transpose(1, 2), embedding, prompt_feat.shape[1]


def decode_flow_batch(flow, tokens: list, prompts: list, n_timesteps: int = FLOW_TIMESTEPS) -> list:
    """Mel [1, 80, 2 * len(tokens_i)] for each item, the decoder run once for the whole
    batch: the items' encoder outputs padded at the end to the longest, and one
    classifier-free-guidance batch (conditioned rows, then unconditioned rows) per Euler
    step through ``flow.decoder.estimator`` (CosyVoice's ``solve_euler`` fixes batch 1).
    The estimator is causal and masked, so the padding does not change the frames before
    it; each item starts from the same fixed noise prefix as in ``flow.inference``."""
    import torch

    decoder = flow.decoder
    encoded = [encode_for_flow(flow, token, prompt) for token, prompt in zip(tokens, prompts)]
    lengths = [mu.shape[2] for mu, _, _, _ in encoded]
    batch, longest = len(encoded), max(lengths)
    reference = encoded[0][2]
    device, dtype = reference.device, reference.dtype
    mu = torch.zeros([batch, 80, longest], device=device, dtype=dtype)
    cond = torch.zeros_like(mu)
    mask = torch.zeros([batch, 1, longest], device=device, dtype=dtype)
    spks = torch.cat([spk for _, _, spk, _ in encoded]).to(dtype)
    for row, (item_mu, item_cond, _, _) in enumerate(encoded):
        mu[row, :, :lengths[row]] = item_mu[0]
        cond[row, :, :lengths[row]] = item_cond[0]
        mask[row, :, :lengths[row]] = 1
    x = decoder.rand_noise[:, :, :longest].to(device=device, dtype=dtype).expand(batch, -1, -1).clone()
    t_span = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    if decoder.t_scheduler == "cosine":
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
    mask_in, zeros = torch.cat([mask, mask]), torch.zeros_like(mu)
    mu_in, cond_in = torch.cat([mu, zeros]), torch.cat([cond, zeros])
    spks_in = torch.cat([spks, torch.zeros_like(spks)])
    rate = decoder.inference_cfg_rate
    for step in range(1, len(t_span)):
        t, dt = t_span[step - 1], t_span[step] - t_span[step - 1]
        velocity = decoder.forward_estimator(torch.cat([x, x]), mask_in, mu_in, t.expand(2 * batch), spks_in,
                                             cond_in, False)
        conditioned, unconditioned = velocity[:batch], velocity[batch:]
        x = x + dt * ((1.0 + rate) * conditioned - rate * unconditioned)
    return [x[row:row + 1, :, prompt_frames:lengths[row]].float()
            for row, (_, _, _, prompt_frames) in enumerate(encoded)]


def prepare_zero_shot_prompt(features, device, prompt: SpeakerPrompt, model_name: str) -> object:
    """A speaker prompt's zero-shot features (speech tokens, mel, speaker embedding) for the flow,
    after the checks every family's token2wav makes: readable, transcribed, at least
    MIN_PROMPT_SECONDS long (``model_name`` says whose minimum in the error)."""
    where = f"speaker prompt {prompt.name!r}" + (f" ({prompt.path})" if prompt.path else "")
    check_prompt(prompt.wave, prompt.sample_rate, prompt.text, where)
    seconds = np.asarray(prompt.wave).size / int(prompt.sample_rate)
    if seconds < MIN_PROMPT_SECONDS:
        raise PromptBankError(f"{where}: {seconds:.2f} s long, under the minimum of {MIN_PROMPT_SECONDS:g} s "
                              f"{model_name} needs for a zero-shot prompt")
    import torch

    with torch.inference_mode(), device_scope(device):
        return features.zero_shot_prompt(prompt.wave, prompt.sample_rate)


class CosyVoice2Token2Wav:
    """Speech tokens -> 24 kHz waveform with CosyVoice2's flow decoder and HiFT vocoder."""

    def __init__(self, model_dir: str, device: str = "cuda:0", fp16: bool = False, load_jit: bool = False,
                 load_trt: bool = False, flow_batch: bool = False, cosyvoice=None):
        import torch

        self.device = torch.device(device)
        if flow_batch and load_trt:
            raise ValueError("flow_batch=true needs the PyTorch flow estimator; CosyVoice's TensorRT estimator "
                             "(--load-trt) takes one classifier-free-guidance pair (batch 2) only")
        if cosyvoice is None:
            directory = check_cosyvoice2_dir(model_dir, load_jit=load_jit, fp16=fp16, load_trt=load_trt)
            CosyVoice2 = _import_cosyvoice2()
            with device_scope(self.device):
                cosyvoice = CosyVoice2(str(directory), load_jit=load_jit, load_trt=load_trt, load_vllm=False,
                                       fp16=fp16)
                # The LLM is not used here: free its memory.
                cosyvoice.model.llm = None
                self._pin_to_device(cosyvoice, str(directory / "speech_tokenizer_v2.onnx"))
        self.cosyvoice = cosyvoice
        self.features = CosyVoice2Features(cosyvoice.frontend, self.device)
        self.sample_rate = int(cosyvoice.sample_rate)
        self.fp16 = fp16
        self.flow_batch = flow_batch
        LOGGER.info("CosyVoice2 token2wav on %s: flow %s%s%s, HiFT fp32 outside autocast (as upstream "
                    "CosyVoice2Model.token2wav), flow_batch %s", self.device,
                    "under fp16 autocast" if fp16 else "fp32", ", JIT flow encoder" if load_jit else "",
                    ", TensorRT estimator" if load_trt else "", "on" if flow_batch else "off")

    def _pin_to_device(self, cosyvoice, speech_tokenizer_path: str) -> None:
        model, frontend = cosyvoice.model, cosyvoice.frontend
        model.device = self.device
        frontend.device = self.device
        model.flow.to(self.device)
        model.hift.to(self.device)
        if self.device.type == "cuda":
            frontend.speech_tokenizer_session = _onnx_session_on(speech_tokenizer_path, self.device)

    def prepare_prompt(self, prompt: SpeakerPrompt) -> object:
        return prepare_zero_shot_prompt(self.features, self.device, prompt, "CosyVoice2")

    def _token_tensor(self, tokens):
        import torch

        return torch.as_tensor(np.asarray(tokens, dtype=np.int32)).reshape(1, -1).to(self.device)

    def mels(self, token_batch: list, prompts: list) -> list:
        """Flow-decoder mel [1, 80, 2T] per item (under fp16 autocast when enabled)."""
        import torch

        tokens = [self._token_tensor(t) for t in token_batch]
        with torch.inference_mode(), device_scope(self.device), fp16_autocast(self.device, self.fp16):
            if self.flow_batch and len(tokens) > 1:
                return decode_flow_batch(self.cosyvoice.model.flow, tokens, prompts)
            return [decode_flow_one(self.cosyvoice.model.flow, token, prompt) for token, prompt in zip(tokens, prompts)]

    def vocode(self, mel) -> np.ndarray:
        """HiFT in fp32, outside autocast (as upstream CosyVoice2Model.token2wav runs it)."""
        import torch

        with torch.inference_mode(), device_scope(self.device):
            speech, _ = self.cosyvoice.model.hift.inference(
                speech_feat=mel.float(), cache_source=torch.zeros(1, 1, 0, device=self.device))
        return speech.reshape(-1).float().cpu().numpy()

    def synthesize(self, token_batch: list, prompts: list) -> list:
        return [self.vocode(mel) for mel in self.mels(token_batch, prompts)]


class CampplusSpeaker:
    """Speaker embeddings from CosyVoice2's CAM++ model (16 kHz in)."""

    sample_rate = 16000

    def __init__(self, token2wav: CosyVoice2Token2Wav):
        self.features = token2wav.features

    def embed(self, waves: list) -> np.ndarray:
        rows = [self.features.speaker_embedding(resample_tensor(wave, 16000, 16000)) for wave in waves]
        return np.stack([row.reshape(-1).float().cpu().numpy() for row in rows])


class CosyVoice2SpeechTokenizer:
    """Speech tokens from CosyVoice2's own tokenizer (``speech_tokenizer_v2.onnx``, 16 kHz
    in, at most 30 s)."""

    sample_rate = 16000
    MAX_SECONDS = CosyVoice2Features.MAX_TOKENIZER_SECONDS

    def __init__(self, token2wav: CosyVoice2Token2Wav):
        self.features = token2wav.features

    def tokenize(self, waves: list) -> list:
        return [self.features.speech_tokens(resample_tensor(wave, 16000, 16000)).reshape(-1).cpu().numpy()
                .astype(np.int64) for wave in waves]


def check_asr_files(options: EngineOptions) -> None:
    """The ASR model files of ``options`` exist (checked before any model loads); the evaluation
    ASRs only where the server loads them (``options.wants``)."""
    from .engines_whisper import check_whisper_checkpoint  # imports whisper only when used

    check_model_dir(options.sensevoice_dir, "--sensevoice-dir", "the SenseVoice ASR engine")
    if options.asr_eval_dir and options.wants("asr_eval"):
        check_model_dir(options.asr_eval_dir, "--asr-eval-dir", "the evaluation ASR engine")
    if options.asr_eval_en and options.wants("asr_eval_en"):
        check_whisper_checkpoint(options.asr_eval_en)


def engines_around(token2wav, options: EngineOptions) -> Engines:
    """What every CosyVoice family serves around its token2wav: SenseVoice (reward ASR), CAM++ from
    the model dir (speaker; the token2wav's own frontend session, so it costs nothing more), the
    evaluation ASRs when given and wanted (``--models all``), and the family's speech tokenizer
    (the ONNX file its features load: v2 or v3)."""
    from .engines_whisper import whisper_asr

    def wanted(name: str, path) -> bool:
        return bool(path) and options.wants(name)

    campplus = CampplusSpeaker(token2wav)
    return Engines(
        token2wav=token2wav,
        asr=sensevoice(options.sensevoice_dir, options.device),
        # the evaluation's speaker model, or only the reward's (a training server weighting similarity)
        speaker=campplus if options.wants("speaker") else None,
        reward_speaker=campplus if options.wants("reward_speaker") and not options.wants("speaker") else None,
        asr_eval=paraformer(options.asr_eval_dir, options.device) if wanted("asr_eval", options.asr_eval_dir) else None,
        asr_eval_en=(whisper_asr(options.asr_eval_en, options.device) if wanted("asr_eval_en", options.asr_eval_en)
                     else None),
        speech_tokenizer=CosyVoice2SpeechTokenizer(token2wav),
    )


def create_engines(options: EngineOptions) -> Engines:
    """Factory for ``--engines token2wav_server.engines_cosyvoice2:create_engines``.

    ``options.flow_batch`` (``--flow-batch``; the engine option ``flow_batch=true|false`` says the
    same for callers that build EngineOptions themselves) decodes a dynamic batch through the flow
    decoder in one pass (``decode_flow_batch``); otherwise item by item, as upstream."""
    flow_batch = parse_bool_option(options, "flow_batch", default=options.flow_batch)
    check_cosyvoice2_dir(options.cosyvoice2_dir, load_jit=options.load_jit, fp16=options.fp16,
                         load_trt=options.load_trt)
    check_asr_files(options)
    token2wav = CosyVoice2Token2Wav(options.cosyvoice2_dir, options.device, options.fp16, options.load_jit,
                                    options.load_trt, flow_batch=flow_batch)
    return engines_around(token2wav, options)

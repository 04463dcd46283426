"""The real engines for Fun-CosyVoice3: CosyVoice3 token2wav (a causal DiT flow + causal HiFT)
and, as for CosyVoice2, SenseVoice ASR, CAM++ speaker and the speech tokenizer.

``--engines token2wav_server.engines_cosyvoice3:create_engines --engine-option cosyvoice3_dir=DIR``
(the server has no ``--cosyvoice3-dir`` yet; the factory reads the model directory from the
engine option).

- token2wav: the flow (``CausalMaskedDiffWithDiT``) and HiFT (``CausalHiFTGenerator``) that
  ``cosyvoice3.yaml`` builds, from the pinned CosyVoice source, with ``flow.pt`` / ``hift.pt``
  loaded as ``CosyVoice3Model.load`` loads them. Only the token2wav blocks of the yaml are
  built (``token2wav_configs``): ``CosyVoice3(model_dir)`` would also build the 0.5B LLM and
  the text frontend, which the reward server never runs. Each speaker prompt is turned once
  into its flow prompt tokens, mel and CAM++ embedding, as ``frontend_zero_shot`` does for
  ``CosyVoice3Model.tts`` (CosyVoice2's feature code: the computation is the same, with
  cosyvoice3.yaml's mel extractor and ``speech_tokenizer_v3.onnx``). With ``--fp16`` (the
  default on CUDA) the flow AND HiFT run under fp16 autocast, as upstream
  ``CosyVoice3Model.token2wav`` runs them (unlike CosyVoice2, whose HiFT upstream keeps out of
  autocast); HiFT's f0 predictor runs in float64, which autocast leaves alone.
  ``--load-trt`` replaces the DiT estimator by a TensorRT engine through upstream's own path,
  ``CosyVoice3Model.load_trt``: the plan ``flow.decoder.estimator.{fp16,fp32}.mygpu.plan`` is
  built from ``flow.decoder.estimator.fp32.onnx`` on first use (upstream's
  ``cosyvoice/bin/export_onnx.py --model_dir DIR`` writes that ONNX) and run with
  ``TrtContextWrapper``; upstream warns that the DiT's fp16 TensorRT engine can misbehave, so
  ``--no-fp16`` with it is the careful choice.
  A dynamic batch is decoded item by item (``flow.inference`` is written for batch 1), or,
  with ``--flow-batch`` (the default on CUDA), the DiT runs once per Euler step for the whole
  batch (``decode_dit_flow_batch``): the DiT is batchable with end padding, since its
  position convolution is causal and its attention masks the padded keys.
- asr, asr_eval, speaker (CAM++ ``campplus.onnx``), speech_tokenizer (``speech_tokenizer_v3.onnx``):
  the CosyVoice2 module's engines, over this token2wav's features.

``--load-jit`` is refused: CosyVoice3 has no JIT flow encoder (upstream's ``CosyVoice3`` takes
no ``load_jit``).
"""
from __future__ import annotations

import logging
import pathlib
import re

import numpy as np

from .engines import EngineOptions, Engines, SpeakerPrompt
from .engines_cosyvoice2 import (CosyVoice2Features, _onnx_session_on, check_asr_files, fp16_autocast,
                                 decode_flow_batch, decode_flow_one, device_scope, engines_around, parse_bool_option,
                                 prepare_zero_shot_prompt)
from .engines_sensevoice import check_model_dir
from .request_items import SPEECH_VOCAB_SIZE

LOGGER = logging.getLogger(__name__)
MODEL_DIR_OPTION = "cosyvoice3_dir"
"""``--engine-option cosyvoice3_dir=DIR``: the Fun-CosyVoice3-0.5B directory."""
MODEL_SOURCE = "FunAudioLLM/Fun-CosyVoice3-0.5B-2512 (or ttsrl.tiny_models.cosyvoice3_audio for tests)"
REQUIRED_FILES = {
    "cosyvoice3.yaml": "the model's hyperpyyaml config",
    "flow.pt": "the DiT flow-matching decoder weights",
    "hift.pt": "the causal HiFT vocoder weights",
    "campplus.onnx": "the CAM++ speaker-embedding model",
    "speech_tokenizer_v3.onnx": "the CosyVoice3 speech tokenizer",
}
"""Files the CosyVoice3 token2wav engines open, and what each one is."""
TRT_ONNX = "flow.decoder.estimator.fp32.onnx"
"""The DiT estimator's ONNX export that ``--load-trt`` builds its TensorRT plan from."""


def trt_plan_name(fp16: bool) -> str:
    """The TensorRT plan file upstream's ``CosyVoice3`` builds and reuses (fp16 or fp32 IO)."""
    return f"flow.decoder.estimator.{'fp16' if fp16 else 'fp32'}.mygpu.plan"
TOKEN2WAV_BLOCKS = ("flow", "hift", "feat_extractor")
"""The objects of cosyvoice3.yaml that token2wav builds; every other object block (the LLM,
the text tokenizer, the training pipeline, the GAN) is left unbuilt."""
_OBJECT_BLOCK = re.compile(r"^([A-Za-z_]\w*):[ \t]*!(?:new|name|apply):", re.MULTILINE)


def check_cosyvoice3_dir(path, load_trt: bool = False) -> pathlib.Path:
    """The Fun-CosyVoice3 directory, or an error naming each missing file, what it is and
    where it comes from."""
    option = f"--engine-option {MODEL_DIR_OPTION}"
    directory = check_model_dir(path, option, "the CosyVoice3 token2wav engine")
    missing = [f"{name} ({what})" for name, what in REQUIRED_FILES.items() if not (directory / name).is_file()]
    if load_trt and not (directory / TRT_ONNX).is_file():
        missing.append(f"{TRT_ONNX} (the DiT estimator's ONNX that --load-trt builds its TensorRT plan from: "
                       f"python CosyVoice/cosyvoice/bin/export_onnx.py --model_dir {directory})")
    if missing:
        raise FileNotFoundError(f"{option}={directory} lacks " + "; ".join(missing)
                                + f". They come with {MODEL_SOURCE}")
    return directory


def token2wav_configs(yaml_path) -> dict:
    """cosyvoice3.yaml's ``flow``, ``hift``, ``feat_extractor`` and plain values, built by
    hyperpyyaml with every other top-level object block overridden to None, so that neither
    the LLM (and its Qwen2 checkpoint) nor the training pipeline's imports are needed."""
    import pydoc

    from hyperpyyaml import load_hyperpyyaml

    text = pathlib.Path(yaml_path).read_text(encoding="utf-8")
    objects = set(_OBJECT_BLOCK.findall(text))
    missing = [name for name in TOKEN2WAV_BLOCKS if name not in objects]
    if missing:
        raise ValueError(f"{yaml_path}: no top-level {', '.join(missing)} object (a cosyvoice3.yaml builds "
                         f"{', '.join(TOKEN2WAV_BLOCKS)})")
    unused = {name: None for name in objects if name not in TOKEN2WAV_BLOCKS and not name.startswith("__")}
    try:
        return load_hyperpyyaml(text, overrides=unused)
    except (ImportError, pydoc.ErrorDuringImport) as error:  # hyperpyyaml imports classes through pydoc
        raise ImportError(f"{yaml_path}: cannot build its flow/HiFT ({error}); put the CosyVoice source and its "
                          "third_party/Matcha-TTS on PYTHONPATH and install its requirements (CosyVoice3's DiT "
                          "needs x-transformers)") from error


def load_hift_state(path) -> dict:
    """hift.pt's state dict, without the ``generator.`` prefix a HiFiGan checkpoint has (as
    ``CosyVoice2Model.load`` reads it)."""
    import torch

    return {key.replace("generator.", ""): value
            for key, value in torch.load(path, map_location="cpu", weights_only=True).items()}


class CosyVoice3Frontend:
    """What ``CosyVoice2Features`` reads of a CosyVoice frontend, for CosyVoice3: the yaml's
    mel extractor, the CAM++ session (CPU, as upstream) and the v3 speech tokenizer's
    session (``device_id`` N on ``cuda:N``). No text tokenizer: token2wav needs none."""

    def __init__(self, feat_extractor, directory: pathlib.Path, device):
        self.feat_extractor = feat_extractor
        self.campplus_session = _onnx_session_on(str(directory / "campplus.onnx"), "cpu")
        self.speech_tokenizer_session = _onnx_session_on(str(directory / "speech_tokenizer_v3.onnx"), device)


class DiTFlowFront:
    """CausalMaskedDiffWithDiT seen through the attributes ``decode_flow_batch`` reads of
    CosyVoice2's flow, so the padded classifier-free-guidance batch has one home. Where
    CosyVoice2 runs its conformer encoder and ``encoder_proj`` on the embedded tokens,
    ``CausalMaskedDiffWithDiT.inference`` runs the pre-lookahead layer and repeats each frame
    ``token_mel_ratio`` times (no projection); everything else (speaker affine layer, token
    embedding, the CFM decoder) is the same. Each item is encoded on its own, so the
    lookahead at an item's end sees zeros, as in ``flow.inference``."""

    def __init__(self, flow):
        import torch

        self.flow = flow
        self.decoder = flow.decoder
        self.spk_embed_affine_layer = flow.spk_embed_affine_layer
        self.input_embedding = flow.input_embedding
        self.output_size = flow.output_size
        self.encoder_proj = torch.nn.Identity()

    def encoder(self, embedded, token_len, streaming: bool = False):
        h = self.flow.pre_lookahead_layer(embedded)  # finalize=True: no lookahead context
        return h.repeat_interleave(self.flow.token_mel_ratio, dim=1), None


def decode_dit_flow_batch(flow, tokens: list, prompts: list) -> list:
    """Mel [1, 80, 2 * len(tokens_i)] per item, the DiT run once per Euler step for the whole
    batch (``decode_flow_batch`` over ``DiTFlowFront``). The batch is padded at the end; the
    DiT's causal position convolution and key-masked attention keep the padding out of the
    real frames."""
    return decode_flow_batch(DiTFlowFront(flow), tokens, prompts)


def load_trt_estimator(flow, hift, directory: pathlib.Path, device, fp16: bool) -> None:
    """Replace ``flow.decoder.estimator`` by a TensorRT engine through upstream's own path:
    ``CosyVoice3Model.load_trt`` (CUDA only) builds the plan from the ONNX export when it is
    not there yet (``convert_onnx_to_trt``, fp16 or fp32 IO) and wraps it in ``TrtContextWrapper``,
    whose execution ``flow.decoder.forward_estimator`` then calls."""
    from cosyvoice.cli.model import CosyVoice3Model

    model = CosyVoice3Model(None, flow, hift, fp16)
    model.device = device  # upstream's bare 'cuda' is GPU 0 in PyTriton's threads (engines_cosyvoice2)
    model.load_trt(str(directory / trt_plan_name(fp16)), str(directory / TRT_ONNX), 1, fp16)


def check_token_batch(token_batch: list) -> None:
    """Each item a non-empty 1-D run of ids in [0, 6561), or an error naming the item."""
    for index, tokens in enumerate(token_batch):
        ids = np.asarray(tokens)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"item {index}: expected a non-empty 1-D array of speech tokens, got shape {ids.shape}")
        bad = np.flatnonzero((ids < 0) | (ids >= SPEECH_VOCAB_SIZE))
        if bad.size:
            raise ValueError(f"item {index}: speech token id {int(ids[bad[0]])} at position {int(bad[0])} is outside "
                             f"[0, {SPEECH_VOCAB_SIZE})")


class CosyVoice3Token2Wav:
    """Speech tokens -> 24 kHz waveform with CosyVoice3's DiT flow and causal HiFT."""

    def __init__(self, model_dir: str, device: str = "cuda:0", fp16: bool = False, flow_batch: bool = False,
                 load_trt: bool = False):
        import torch

        self.device = torch.device(device)
        if flow_batch and load_trt:
            raise ValueError("flow_batch=true needs the PyTorch DiT estimator; the TensorRT estimator (--load-trt) "
                             "takes one classifier-free-guidance pair (batch 2) only")
        directory = check_cosyvoice3_dir(model_dir, load_trt=load_trt)
        with device_scope(self.device):
            configs = token2wav_configs(directory / "cosyvoice3.yaml")
            self.flow, self.hift = configs["flow"], configs["hift"]
            self.flow.load_state_dict(torch.load(directory / "flow.pt", map_location="cpu", weights_only=True),
                                      strict=True)
            self.hift.load_state_dict(load_hift_state(directory / "hift.pt"), strict=True)
            self.flow.to(self.device).eval()
            self.hift.to(self.device).eval()
            if load_trt:
                load_trt_estimator(self.flow, self.hift, directory, self.device, fp16)
            frontend = CosyVoice3Frontend(configs["feat_extractor"], directory, self.device)
        self.features = CosyVoice2Features(frontend, self.device)
        self.sample_rate = int(configs["sample_rate"])
        self.fp16 = fp16
        self.flow_batch = flow_batch
        LOGGER.info("CosyVoice3 token2wav on %s: flow and HiFT %s (as upstream CosyVoice3Model.token2wav)%s, "
                    "flow_batch %s", self.device, "under fp16 autocast" if fp16 else "in fp32",
                    f", TensorRT estimator {trt_plan_name(fp16)}" if load_trt else "", "on" if flow_batch else "off")

    def prepare_prompt(self, prompt: SpeakerPrompt) -> object:
        return prepare_zero_shot_prompt(self.features, self.device, prompt, "CosyVoice3")

    def mels(self, token_batch: list, prompts: list) -> list:
        """Flow mel [1, 80, 2T] per item (under fp16 autocast when enabled)."""
        import torch

        check_token_batch(token_batch)
        if len(prompts) != len(token_batch):
            raise ValueError(f"{len(token_batch)} token items but {len(prompts)} prompts")
        tokens = [torch.as_tensor(np.asarray(t, dtype=np.int32)).reshape(1, -1).to(self.device) for t in token_batch]
        with torch.inference_mode(), device_scope(self.device), fp16_autocast(self.device, self.fp16):
            if self.flow_batch and len(tokens) > 1:
                return decode_dit_flow_batch(self.flow, tokens, prompts)
            return [decode_flow_one(self.flow, token, prompt) for token, prompt in zip(tokens, prompts)]

    def vocode(self, mel) -> np.ndarray:
        """HiFT on the whole utterance at once (``finalize=True``), under fp16 autocast when fp16
        is on, as upstream ``CosyVoice3Model.token2wav`` runs it (fp32 otherwise)."""
        import torch

        with torch.inference_mode(), device_scope(self.device), fp16_autocast(self.device, self.fp16):
            speech, _ = self.hift.inference(speech_feat=mel.float(), finalize=True)
        return speech.reshape(-1).float().cpu().numpy()

    def synthesize(self, token_batch: list, prompts: list) -> list:
        return [self.vocode(mel) for mel in self.mels(token_batch, prompts)]


def create_engines(options: EngineOptions) -> Engines:
    """Factory for ``--engines token2wav_server.engines_cosyvoice3:create_engines``.

    Engine options: ``cosyvoice3_dir=DIR`` (required: the Fun-CosyVoice3-0.5B directory).
    ``options.flow_batch`` (``--flow-batch``; the engine option ``flow_batch=true|false`` says the
    same for callers that build EngineOptions themselves) decodes a dynamic batch through the DiT
    in one pass (``decode_dit_flow_batch``); otherwise item by item, as upstream."""
    flow_batch = parse_bool_option(options, "flow_batch", default=options.flow_batch)
    if options.load_jit:
        raise ValueError("--load-jit: CosyVoice3 has no JIT-exported flow encoder (upstream's CosyVoice3 takes no "
                         "load_jit); drop it (--load-trt works for CosyVoice3)")
    model_dir = options.extra.get(MODEL_DIR_OPTION)
    check_cosyvoice3_dir(model_dir, load_trt=options.load_trt)
    check_asr_files(options)
    token2wav = CosyVoice3Token2Wav(model_dir, options.device, options.fp16, flow_batch=flow_batch,
                                    load_trt=options.load_trt)
    return engines_around(token2wav, options)  # its speech tokenizer reads speech_tokenizer_v3.onnx

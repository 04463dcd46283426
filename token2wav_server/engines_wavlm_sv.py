"""Speaker similarity as Seed-TTS-eval measures it: WavLM-large + ECAPA-TDNN (a ``speaker`` engine).

Seed-TTS-eval (and the CosyVoice papers' SIM on it) embeds the generated wav and the prompt
wav with UniSpeech's speaker-verification model ``ECAPA_TDNN_SMALL(feat_dim=1024,
feat_type="wavlm_large")`` fine-tuned on VoxCeleb (the ``wavlm_large_finetune.pth``
checkpoint its README links) and reports their cosine similarity.

That class is not installable (UniSpeech is not on PyPI, and it builds WavLM through
``torch.hub`` from s3prl's GitHub at run time). This engine is the closest real thing we can
install: **transformers' ``WavLMModel``** (the same WavLM architecture, ported by its
authors) for the upstream, plus **our own ECAPA-TDNN head** written to UniSpeech's
structure, so that the published checkpoint loads into it: its ``feature_extract.model.*``
weights (fairseq WavLM names) are renamed to transformers' names (``hf_wavlm_state``), the
head's weights (``feature_weight``, ``layer1``..``layer4``, ``conv``, ``pooling``, ``bn``,
``linear``) load as they are. Forward pass as UniSpeech's: the waveform is layer-normalized
(WavLM-large's ``normalize``), every hidden state s3prl's upstream gives (the input of each
transformer layer plus the encoder's output, taken with hooks) is mixed with
softmax(``feature_weight``), instance-normalized, and fed to ECAPA-TDNN -> a 256-dim embedding.

Not verified against the real checkpoint here (it cannot be downloaded on CI machines);
tests check the renaming round trip and the whole path on a tiny random model of the same
classes saved in the published checkpoint layout (``save_checkpoint``).

Architecture facts the checkpoint does not hold are WavLM's: conv strides 5,2,2,...,
relative-position ``max_bucket_distance`` 800, and layer-norm-first (stable layer norm) when
the conv extractor uses layer norm (WavLM-large) — group norm means WavLM-base.

Use it through the factory::

    python -m token2wav_server --engines token2wav_server.engines_wavlm_sv:create_engines \\
        --engine-option base_engines=token2wav_server.engines_cosyvoice2:create_engines \\
        --engine-option sim_model=pretrained_models/wavlm_large_finetune.pth ...

which builds the ``base_engines`` and serves this engine as their ``speaker`` (the
evaluation's SIM; ``sim_model`` defaults to ``--speaker-model``), keeping the base engines'
own speaker engine (CosyVoice2's CAM++) as ``reward_speaker``: the training reward's
similarity stays CosyVoice's own, the evaluation's is Seed-TTS-eval's. A server that does not
serve the ``speaker`` model (``--models training``) gets the base engines alone: the WavLM
model is never loaded there.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from ttsrl.atomic_write import atomic_file
from ttsrl.model_family import family_from_env

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # WavLM's conv front end needs 25 ms
DEFAULT_BASE_ENGINES = family_from_env().token2wav_engines  # the exported model family's real engines
UPSTREAM_PREFIX = "feature_extract.model."
WAVLM_MAX_BUCKET_DISTANCE = 800

# fairseq WavLM (UniSpeech) name <-> transformers WavLMModel name; {n}: a number,
# {p}: weight|bias, {k}: k|v|q|out. Layer-norm conv extractor (WavLM-large) first.
_NAME_PAIRS = [
    ("feature_extractor.conv_layers.{n}.0.{p}", "feature_extractor.conv_layers.{n}.conv.{p}"),
    ("feature_extractor.conv_layers.{n}.2.1.{p}", "feature_extractor.conv_layers.{n}.layer_norm.{p}"),
    ("feature_extractor.conv_layers.{n}.2.{p}", "feature_extractor.conv_layers.{n}.layer_norm.{p}"),
    ("layer_norm.{p}", "feature_projection.layer_norm.{p}"),
    ("post_extract_proj.{p}", "feature_projection.projection.{p}"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
    ("encoder.layers.{n}.self_attn.{k}_proj.{p}", "encoder.layers.{n}.attention.{k}_proj.{p}"),
    ("encoder.layers.{n}.self_attn.grep_linear.{p}", "encoder.layers.{n}.attention.gru_rel_pos_linear.{p}"),
    ("encoder.layers.{n}.self_attn.grep_a", "encoder.layers.{n}.attention.gru_rel_pos_const"),
    ("encoder.layers.{n}.self_attn.relative_attention_bias.weight", "encoder.layers.{n}.attention.rel_attn_embed.weight"),
    ("encoder.layers.{n}.self_attn_layer_norm.{p}", "encoder.layers.{n}.layer_norm.{p}"),
    ("encoder.layers.{n}.fc1.{p}", "encoder.layers.{n}.feed_forward.intermediate_dense.{p}"),
    ("encoder.layers.{n}.fc2.{p}", "encoder.layers.{n}.feed_forward.output_dense.{p}"),
    ("encoder.layers.{n}.final_layer_norm.{p}", "encoder.layers.{n}.final_layer_norm.{p}"),
    ("mask_emb", "masked_spec_embed"),
]
_GROUPS = {"n": r"(?P<n>\d+)", "p": r"(?P<p>weight|bias)", "k": r"(?P<k>k|v|q|out)"}
# Pre-training-only fairseq weights the upstream does not use for features.
_UNUSED_UPSTREAM = re.compile(r"^(label_embs_concat|final_proj\.|project_q\.|quantizer\.)")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{(\w)\\\}", lambda m: _GROUPS[m.group(1)], re.escape(template)) + "$")


_FAIRSEQ_TO_HF = [(_pattern(fairseq), hf) for fairseq, hf in _NAME_PAIRS]
_HF_TO_FAIRSEQ = [(_pattern(hf), fairseq) for fairseq, hf in _NAME_PAIRS]


class SpeakerModelError(ValueError):
    """A checkpoint that is not a UniSpeech WavLM + ECAPA-TDNN speaker model (names the problem)."""


def _rename(name: str, table) -> str | None:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


def hf_wavlm_state(upstream: dict) -> dict:
    """fairseq WavLM weights (prefix removed) -> transformers WavLMModel weights."""
    state = {}
    for name, tensor in upstream.items():
        if _UNUSED_UPSTREAM.match(name):
            continue
        hf_name = _rename(name, _FAIRSEQ_TO_HF)
        if hf_name is None:
            raise SpeakerModelError(f"unknown WavLM weight {UPSTREAM_PREFIX}{name} in the checkpoint")
        state[hf_name] = tensor
    return state


def fairseq_wavlm_state(hf_state: dict) -> dict:
    """transformers WavLMModel weights -> fairseq WavLM names (layer-norm extractor, as WavLM-large)."""
    state = {}
    for name, tensor in hf_state.items():
        fairseq_name = _rename(name, _HF_TO_FAIRSEQ)
        if fairseq_name is None:
            raise SpeakerModelError(f"no fairseq name for WavLM weight {name}")
        state[fairseq_name] = tensor
    return state


def wavlm_config(upstream: dict):
    """transformers WavLMConfig of the fairseq WavLM weights (see the module doc for what is assumed)."""
    from transformers import WavLMConfig

    def need(name):
        if name not in upstream:
            raise SpeakerModelError(f"the checkpoint has no {UPSTREAM_PREFIX}{name}: not a WavLM speaker model")
        return upstream[name]

    convs = sorted(int(m.group(1)) for m in (re.match(r"^feature_extractor\.conv_layers\.(\d+)\.0\.weight$", k)
                                             for k in upstream) if m)
    layers = sorted(int(m.group(1)) for m in (re.match(r"^encoder\.layers\.(\d+)\.fc1\.weight$", k)
                                              for k in upstream) if m)
    if not convs or not layers:
        raise SpeakerModelError("the checkpoint has no WavLM conv or transformer layers")
    conv_weights = [need(f"feature_extractor.conv_layers.{i}.0.weight") for i in convs]
    layer_norm_extractor = "feature_extractor.conv_layers.0.2.1.weight" in upstream
    hidden = need("post_extract_proj.weight").shape[0]
    pos_conv = need("encoder.pos_conv.0.weight_v")
    return WavLMConfig(
        conv_dim=tuple(int(w.shape[0]) for w in conv_weights),
        conv_kernel=tuple(int(w.shape[2]) for w in conv_weights),
        conv_stride=(5,) + (2,) * (len(convs) - 1),
        conv_bias="feature_extractor.conv_layers.0.0.bias" in upstream,
        feat_extract_norm="layer" if layer_norm_extractor else "group",
        do_stable_layer_norm=layer_norm_extractor,
        hidden_size=int(hidden),
        num_hidden_layers=len(layers),
        num_attention_heads=int(need("encoder.layers.0.self_attn.grep_a").shape[1]),
        intermediate_size=int(need("encoder.layers.0.fc1.weight").shape[0]),
        num_conv_pos_embeddings=int(pos_conv.shape[2]),
        num_conv_pos_embedding_groups=int(hidden // pos_conv.shape[1]),
        num_buckets=int(need("encoder.layers.0.self_attn.relative_attention_bias.weight").shape[0]),
        max_bucket_distance=WAVLM_MAX_BUCKET_DISTANCE,
    )


def _head_classes():
    """ECAPA-TDNN as UniSpeech's ECAPA_TDNN_SMALL structures it (parameter names included,
    so its checkpoint loads); built lazily so importing this module needs no torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Conv1dReluBn(nn.Module):
        def __init__(self, in_channels, out_channels, kernel_size=1, padding=0, dilation=1):
            super().__init__()
            self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)
            self.bn = nn.BatchNorm1d(out_channels)

        def forward(self, x):
            return self.bn(F.relu(self.conv(x)))

    class Res2Conv1dReluBn(nn.Module):
        """Res2Net-style multi-scale conv: channel groups, each fed the previous group's output."""

        def __init__(self, channels, kernel_size, padding, dilation, scale):
            super().__init__()
            if channels % scale:
                raise ValueError(f"{channels} channels do not split into {scale} groups")
            self.width = channels // scale
            self.groups = scale - 1 if scale > 1 else 1
            self.convs = nn.ModuleList(nn.Conv1d(self.width, self.width, kernel_size, padding=padding,
                                                 dilation=dilation) for _ in range(self.groups))
            self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(self.groups))

        def forward(self, x):
            pieces = torch.split(x, self.width, dim=1)
            outputs, carried = [], None
            for index, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                carried = pieces[index] if carried is None else carried + pieces[index]
                carried = bn(F.relu(conv(carried)))
                outputs.append(carried)
            if len(pieces) > self.groups:
                outputs.append(pieces[self.groups])
            return torch.cat(outputs, dim=1)

    class SqueezeExcite(nn.Module):
        def __init__(self, channels, bottleneck):
            super().__init__()
            self.linear1 = nn.Linear(channels, bottleneck)
            self.linear2 = nn.Linear(bottleneck, channels)

        def forward(self, x):
            gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
            return x * gate.unsqueeze(2)

    class SERes2Block(nn.Module):
        def __init__(self, channels, kernel_size, padding, dilation, scale=8, bottleneck=128):
            super().__init__()
            self.Conv1dReluBn1 = Conv1dReluBn(channels, channels)
            self.Res2Conv1dReluBn = Res2Conv1dReluBn(channels, kernel_size, padding, dilation, scale)
            self.Conv1dReluBn2 = Conv1dReluBn(channels, channels)
            self.SE_Connect = SqueezeExcite(channels, bottleneck)

        def forward(self, x):
            y = self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x)))
            return self.SE_Connect(y) + x

    class AttentiveStatsPool(nn.Module):
        def __init__(self, channels, attention_channels=128):
            super().__init__()
            self.linear1 = nn.Conv1d(channels, attention_channels, kernel_size=1)
            self.linear2 = nn.Conv1d(attention_channels, channels, kernel_size=1)

        def forward(self, x):
            weights = torch.softmax(self.linear2(torch.tanh(self.linear1(x))), dim=2)
            mean = torch.sum(weights * x, dim=2)
            variance = torch.sum(weights * x * x, dim=2) - mean * mean
            return torch.cat([mean, torch.sqrt(variance.clamp(min=1e-9))], dim=1)

    class EcapaHead(nn.Module):
        """Layer-weighted WavLM features -> ECAPA-TDNN -> speaker embedding."""

        def __init__(self, feat_dim, num_features, channels=512, pooled_channels=1536, emb_dim=256):
            super().__init__()
            self.feature_weight = nn.Parameter(torch.zeros(num_features))
            self.instance_norm = nn.InstanceNorm1d(feat_dim)
            self.layer1 = Conv1dReluBn(feat_dim, channels, kernel_size=5, padding=2)
            self.layer2 = SERes2Block(channels, 3, padding=2, dilation=2)
            self.layer3 = SERes2Block(channels, 3, padding=3, dilation=3)
            self.layer4 = SERes2Block(channels, 3, padding=4, dilation=4)
            self.conv = nn.Conv1d(channels * 3, pooled_channels, kernel_size=1)
            self.pooling = AttentiveStatsPool(pooled_channels)
            self.bn = nn.BatchNorm1d(pooled_channels * 2)
            self.linear = nn.Linear(pooled_channels * 2, emb_dim)

        def forward(self, hidden_states):
            """hidden_states: (num_features, batch, frames, feat_dim) -> (batch, emb_dim)."""
            mix = torch.softmax(self.feature_weight, dim=-1).view(-1, 1, 1, 1)
            x = (mix * hidden_states).sum(dim=0).transpose(1, 2) + 1e-6
            x = self.instance_norm(x)
            out1 = self.layer1(x)
            out2 = self.layer2(out1)
            out3 = self.layer3(out2)
            out4 = self.layer4(out3)
            x = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
            return self.linear(self.bn(self.pooling(x)))

    return EcapaHead


def _head_shape(state: dict) -> dict:
    try:
        return {"feat_dim": int(state["layer1.conv.weight"].shape[1]),
                "num_features": int(state["feature_weight"].numel()),
                "channels": int(state["layer1.conv.weight"].shape[0]),
                "pooled_channels": int(state["conv.weight"].shape[0]),
                "emb_dim": int(state["linear.weight"].shape[0])}
    except KeyError as error:
        raise SpeakerModelError(f"the checkpoint has no ECAPA-TDNN weight {error}") from None


class WavLMEcapa:
    """transformers WavLMModel + our ECAPA-TDNN head, on one device, inference only."""

    def __init__(self, wavlm, head, device: str = "cpu"):
        self.wavlm = wavlm.to(device).eval()
        self.head = head.to(device).eval()
        self.device = device

    def hidden_states(self, x) -> list:
        """The features s3prl's WavLM upstream hands UniSpeech's head: the input of every
        transformer layer, then the encoder's output. Taken with hooks rather than from
        transformers' ``hidden_states``, whose last entry differs between its versions."""
        captured = []

        def keep_input(_module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        handles = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in self.wavlm.encoder.layers]
        try:
            last = self.wavlm(x).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        return captured + [last]

    def embed_one(self, wave: np.ndarray) -> np.ndarray:
        import torch
        from torch.nn import functional as F

        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size < MIN_SAMPLES:
            raise ValueError(f"{wave.size} samples is too short for WavLM (at least {MIN_SAMPLES} at 16 kHz)")
        with torch.no_grad():
            x = torch.from_numpy(wave).to(self.device)
            x = F.layer_norm(x, x.shape).unsqueeze(0)  # WavLM-large normalizes each waveform
            hidden = self.hidden_states(x)
            if len(hidden) != self.head.feature_weight.numel():
                raise SpeakerModelError(f"WavLM gives {len(hidden)} hidden states but the head weighs "
                                        f"{self.head.feature_weight.numel()}")
            return self.head(torch.stack(hidden, dim=0))[0].float().cpu().numpy()


def load_checkpoint(path: str, device: str = "cpu") -> WavLMEcapa:
    """A UniSpeech speaker-verification checkpoint ({"model": state dict}, as published) -> WavLMEcapa."""
    import torch
    from transformers import WavLMModel

    if not Path(path).is_file():
        raise FileNotFoundError(f"speaker model {path} not found: Seed-TTS-eval's wavlm_large_finetune.pth "
                                "(run.sh stage -1 downloads it on GPU machines; see README 'Stage 4')")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise SpeakerModelError(f"{path}: expected a state dict (or {{'model': state dict}})")
    upstream = {k[len(UPSTREAM_PREFIX):]: v for k, v in state.items() if k.startswith(UPSTREAM_PREFIX)}
    head_state = {k: v for k, v in state.items() if not k.startswith(UPSTREAM_PREFIX)}
    wavlm = WavLMModel(wavlm_config(upstream))
    hf_state = hf_wavlm_state(upstream)
    expected = set(wavlm.state_dict())
    if "encoder.pos_conv_embed.conv.weight_g" in expected:  # older torch weight-norm names
        for old, new in (("parametrizations.weight.original0", "weight_g"), ("parametrizations.weight.original1", "weight_v")):
            key = f"encoder.pos_conv_embed.conv.{old}"
            if key in hf_state:
                hf_state[f"encoder.pos_conv_embed.conv.{new}"] = hf_state.pop(key)
    missing = sorted(expected - set(hf_state) - {"masked_spec_embed"})
    if missing:
        raise SpeakerModelError(f"{path}: WavLM weights missing from the checkpoint: {missing[:5]}")
    wavlm.load_state_dict(hf_state, strict=False)
    head = _head_classes()(**_head_shape(head_state))
    head_missing, head_unexpected = head.load_state_dict(head_state, strict=False)
    if head_missing or head_unexpected:
        raise SpeakerModelError(f"{path}: ECAPA-TDNN weights do not match (missing {head_missing[:5]}, "
                                f"unexpected {head_unexpected[:5]})")
    return WavLMEcapa(wavlm, head, device)


def save_checkpoint(model: WavLMEcapa, path: str) -> None:
    """Write ``model`` in the published UniSpeech layout ({"model": state dict}, fairseq WavLM names)."""
    import torch

    hf_state = {k: v.detach().cpu() for k, v in model.wavlm.state_dict().items()}
    for old, new in (("weight_g", "parametrizations.weight.original0"), ("weight_v", "parametrizations.weight.original1")):
        key = f"encoder.pos_conv_embed.conv.{old}"
        if key in hf_state:
            hf_state[f"encoder.pos_conv_embed.conv.{new}"] = hf_state.pop(key)
    state = {UPSTREAM_PREFIX + k: v for k, v in fairseq_wavlm_state(hf_state).items()}
    state.update({k: v.detach().cpu() for k, v in model.head.state_dict().items()})
    with atomic_file(path) as tmp:
        torch.save({"model": state}, tmp)


def random_model(seed: int = 0, hidden: int = 32, layers: int = 2, channels: int = 16, emb_dim: int = 8) -> WavLMEcapa:
    """A tiny randomly initialized model of the same classes (tests, smoke runs)."""
    import torch
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(seed)
    config = WavLMConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=2 * hidden, conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                         conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=True, feat_extract_norm="layer",
                         do_stable_layer_norm=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                         num_buckets=32, max_bucket_distance=WAVLM_MAX_BUCKET_DISTANCE)
    wavlm = WavLMModel(config)
    head = _head_classes()(feat_dim=hidden, num_features=layers + 1, channels=channels, pooled_channels=3 * channels,
                           emb_dim=emb_dim)
    with torch.no_grad():
        head.feature_weight.normal_()
        for module in head.modules():  # non-trivial batch-norm statistics, as a trained model has
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return WavLMEcapa(wavlm, head)


class WavLMEcapaSpeaker:
    """The ``speaker`` engine: 16 kHz waveforms -> (batch, dim) float32 embeddings."""

    sample_rate = SAMPLE_RATE

    def __init__(self, checkpoint: str, device: str = "cpu"):
        self.model = load_checkpoint(checkpoint, device)

    def embed(self, waves: list) -> np.ndarray:
        return np.stack([self.model.embed_one(wave) for wave in waves]).astype(np.float32)


def create_engines(options):
    """Factory: the ``base_engines`` factory's engines with this speaker engine (see module doc)."""
    from .engines import create_engines as build

    spec = options.extra.get("base_engines", DEFAULT_BASE_ENGINES)
    if spec.split(":")[0] == __name__:
        raise ValueError("base_engines cannot be token2wav_server.engines_wavlm_sv itself")
    checkpoint = options.extra.get("sim_model") or options.speaker_model
    if not checkpoint:
        raise ValueError("engines_wavlm_sv needs the speaker model: --engine-option sim_model=PATH "
                         "(Seed-TTS-eval's wavlm_large_finetune.pth) or --speaker-model PATH")
    engines = build(options, spec)
    if not options.wants("speaker"):
        return engines  # a training server (--models training): the SIM model is evaluation's only
    return dataclasses.replace(engines, speaker=WavLMEcapaSpeaker(checkpoint, options.device),
                               reward_speaker=engines.similarity_speaker)

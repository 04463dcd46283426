"""Write a tiny, randomly initialised CosyVoice2-0.5B-shaped model directory.

Real CosyVoice2 weights cannot be downloaded on CI machines, so tests and CPU
smoke runs of the recipe use this stand-in. It has the layout the LLM side of
the recipe reads from ``$cosyvoice2_dir``:

    DIR/llm.pt                           state dict in CosyVoice2's key layout
    DIR/CosyVoice-BlankEN/config.json    Qwen2 config (tiny sizes)
    DIR/CosyVoice-BlankEN/vocab.json     byte-level BPE vocabulary ...
    DIR/CosyVoice-BlankEN/merges.txt     ... and merges, built with `tokenizers`
    DIR/CosyVoice-BlankEN/tokenizer_config.json

``llm.pt`` holds exactly the tensors of CosyVoice2's ``Qwen2LM`` with a
``Qwen2Encoder`` backbone: ``llm.model.model.*`` (the Qwen2 backbone),
``llm.model.lm_head.weight`` (tied to the token embedding, as in Qwen2-0.5B),
``speech_embedding.weight`` and ``llm_decoder.weight/bias`` (6561 + 3 rows) and
``llm_embedding.weight`` (2 rows: sos, task id). The flow/HiFT parts of a real
CosyVoice2 directory are not written.

The tokenizer encodes every CJK unified ideograph (U+4E00..U+9FFF), CJK
punctuation and full-width forms as one token each, and any other text as
UTF-8 bytes, like Qwen2's. Like the real Qwen2 embedding, the config's
``vocab_size`` is larger than the tokenizer, so some embedding rows are never
reached by any token id.

Only torch, tokenizers and the standard library are imported (no transformers),
so building takes about two seconds.

    python scripts/make_tiny_cosyvoice2.py --output-dir /tmp/tiny_cosyvoice2 --seed 0

``--full`` (server environment, CosyVoice source importable or given with
``--cosyvoice-src``) writes a complete CosyVoice2-0.5B-layout directory instead, built
from the real CosyVoice classes: what ``CosyVoice2(model_dir)`` loads and the reward
server's real engines run (``write_full_cosyvoice2``):

    DIR/cosyvoice2.yaml                  the real recipe's hyperpyyaml, flow/HiFT at reduced size
    DIR/llm.pt                           as above (CosyVoice2 loads it strictly)
    DIR/flow.pt, DIR/hift.pt             random weights of CausalMaskedDiffWithXvec, HiFTGenerator
    DIR/CosyVoice-BlankEN/               as above plus model.safetensors (Qwen2ForCausalLM)
    DIR/campplus.onnx                    ONNX stand-ins with the real input/output names and
    DIR/speech_tokenizer_v2.onnx         shapes (onnx.helper graphs, see below)

``--sensevoice-dir`` and ``--paraformer-dir`` also write tiny SenseVoiceSmall and
Paraformer directories in FunASR's layout (config.yaml, model.pt, a tokenizer trained
here, am.mvn; random weights through funasr's model registry). Nothing is downloaded.

    python scripts/make_tiny_cosyvoice2.py --full --output-dir exp/tiny/CosyVoice2-0.5B \
        --cosyvoice-src CosyVoice --sensevoice-dir exp/tiny/SenseVoiceSmall \
        --paraformer-dir exp/tiny/paraformer-zh
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import models

SPEECH_ROWS = 6561 + 3
"""Rows of ``speech_embedding`` / outputs of ``llm_decoder``: speech tokens + 3 end tokens."""

QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""The special tokens a Qwen2 base tokenizer carries right after its BPE vocabulary."""

BLANK_EN = "CosyVoice-BlankEN"

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3000, 0x303F), (0xFF00, 0xFFEF))


def _bytes_to_symbols() -> dict[int, str]:
    """Byte -> printable character map of byte-level BPE (the GPT-2 convention).

    Printable Latin-1 bytes stand for themselves; the others are shifted to
    code points from 256 up, so every byte has a visible one-character symbol.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def build_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE where each CJK character is one token."""
    symbols = _bytes_to_symbols()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[symbols[b]] = len(vocab)
    merges: list[tuple[str, str]] = []
    # Two-byte prefixes first (lower merge rank), then the full characters.
    prefixes: dict[str, tuple[str, str]] = {}
    characters: list[tuple[str, str]] = []
    for low, high in _CJK_RANGES:
        for code in range(low, high + 1):
            encoded = [symbols[b] for b in chr(code).encode("utf-8")]
            if len(encoded) != 3:
                continue
            prefix = encoded[0] + encoded[1]
            prefixes.setdefault(prefix, (encoded[0], encoded[1]))
            characters.append((prefix, encoded[2]))
    for prefix, pair in prefixes.items():
        vocab[prefix] = len(vocab)
        merges.append(pair)
    for prefix, last in characters:
        vocab[prefix + last] = len(vocab)
        merges.append((prefix, last))
    return vocab, merges


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def tiny_qwen2_config(vocab_size: int, special_ids: dict[str, int]) -> dict:
    """A Qwen2 config.json with tiny sizes (the real one: hidden 896, 24 layers)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|endoftext|>"],
        "hidden_act": "silu",
        # head_dim 32 (64 / 2 heads): the smallest head size vLLM's CPU attention supports, so the
        # tiny model also runs real GRPO rollouts on CPU
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "max_window_layers": 2,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def random_llm_state_dict(config: dict, generator: torch.Generator, logit_std: float = 4.0,
                          bias_std: float = 0.5) -> dict[str, torch.Tensor]:
    """Random tensors in CosyVoice2's ``llm.pt`` key layout for ``config``.

    Scales are chosen so the tiny model behaves like a trained one where it
    matters for the tests: every layer changes the hidden state noticeably, and
    the speech logits (``llm_decoder``) have a spread of about ``logit_std``
    nats, which gives peaked next-token distributions. ``bias_std`` sets the
    spread of ``llm_decoder.bias``.
    """
    d = config["hidden_size"]
    inner = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    head_dim = d // heads
    vocab = config["vocab_size"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    def norm_weight():
        return 0.5 + torch.rand(d, generator=generator)

    proj_std = 1.0 / math.sqrt(d)
    state: dict[str, torch.Tensor] = {}
    embed = normal(vocab, d, std=1.0)
    state["llm.model.model.embed_tokens.weight"] = embed
    for i in range(config["num_hidden_layers"]):
        p = f"llm.model.model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, d, std=proj_std)
        state[p + "self_attn.q_proj.bias"] = normal(heads * head_dim, std=0.1)
        state[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, d, std=proj_std)
        state[p + "self_attn.k_proj.bias"] = normal(kv_heads * head_dim, std=0.1)
        state[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, d, std=proj_std)
        state[p + "self_attn.v_proj.bias"] = normal(kv_heads * head_dim, std=0.1)
        state[p + "self_attn.o_proj.weight"] = normal(d, heads * head_dim, std=proj_std)
        state[p + "mlp.gate_proj.weight"] = normal(inner, d, std=proj_std)
        state[p + "mlp.up_proj.weight"] = normal(inner, d, std=proj_std)
        state[p + "mlp.down_proj.weight"] = normal(d, inner, std=1.0 / math.sqrt(inner))
        state[p + "input_layernorm.weight"] = norm_weight()
        state[p + "post_attention_layernorm.weight"] = norm_weight()
    state["llm.model.model.norm.weight"] = norm_weight()
    # Qwen2-0.5B ties lm_head to the embedding; state_dict() lists both names.
    state["llm.model.lm_head.weight"] = embed
    state["speech_embedding.weight"] = normal(SPEECH_ROWS, d, std=1.0)
    state["llm_decoder.weight"] = normal(SPEECH_ROWS, d, std=logit_std / math.sqrt(d))
    state["llm_decoder.bias"] = normal(SPEECH_ROWS, std=bias_std)
    state["llm_embedding.weight"] = normal(2, d, std=1.0)
    return state


def write_tiny_cosyvoice2(output_dir: str | Path, seed: int = 0, logit_std: float = 4.0,
                          bias_std: float = 0.5) -> Path:
    """Write the tiny CosyVoice2 directory to ``output_dir`` (replaced if present)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp", dir=output_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        blank = tmp / BLANK_EN
        blank.mkdir()
        vocab, merges = build_bpe_vocab()
        models.BPE(vocab=vocab, merges=merges).save(str(blank))  # vocab.json, merges.txt
        special_ids = {token: len(vocab) + i for i, token in enumerate(QWEN2_SPECIAL_TOKENS)}
        tokenizer_config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "added_tokens_decoder": {
                str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
                for token, index in special_ids.items()
            },
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": 32768,
            "split_special_tokens": False,
        }
        (blank / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        # Leave room for CosyVoice2's extra special text tokens plus unreachable
        # rows, as Qwen2-0.5B does (151936 rows for a 151646-token tokenizer).
        vocab_size = _round_up(len(vocab) + len(QWEN2_SPECIAL_TOKENS) + 32, 128) + 128
        config = tiny_qwen2_config(vocab_size, special_ids)
        (blank / "config.json").write_text(json.dumps(config, indent=2))
        generator = torch.Generator().manual_seed(seed)
        state = random_llm_state_dict(config, generator, logit_std=logit_std, bias_std=bias_std)
        torch.save(state, tmp / "llm.pt")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


# ---------------------------------------------------------------------------
# Complete CosyVoice2 directory from the real CosyVoice classes (server environment)
# ---------------------------------------------------------------------------

TOKEN2WAV_SIZES = {
    # Reduced: the flow encoder keeps 512 channels (UpsampleConformerEncoder hard-codes its
    # pre-lookahead and upsampling layers at 512), everything else is shrunk.
    "tiny": {"attention_heads": 2, "linear_units": 64, "num_blocks": 1, "decoder_channels": 32,
             "attention_head_dim": 16, "n_blocks": 1, "num_mid_blocks": 1, "num_heads": 2,
             "hift_channels": 32, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]]},
    # The sizes of iic/CosyVoice2-0.5B's cosyvoice2.yaml (flow 112.5M, HiFT 20.8M parameters).
    "real": {"attention_heads": 8, "linear_units": 2048, "num_blocks": 6, "decoder_channels": 256,
             "attention_head_dim": 64, "n_blocks": 4, "num_mid_blocks": 12, "num_heads": 8,
             "hift_channels": 512, "resblock_kernel_sizes": [3, 7, 11],
             "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]]},
}

CAMPPLUS_INPUT, CAMPPLUS_OUTPUT = "input", "output"  # [B, T, 80] fbank -> [B, 192]
SPEECH_TOKENIZER_INPUTS = ("feats", "feats_length")  # [1, 128, T] whisper log-mel, [1] int32
SPEECH_TOKENIZER_OUTPUT = "indices"  # [1, ceil(T / 4)] int64 in [0, 6561): 25 tokens per second


def cosyvoice2_yaml(llm_hidden_size: int, size: str = "tiny", seed: int = 0) -> str:
    """A cosyvoice2.yaml for ``CosyVoice2(model_dir)``: the classes and fixed parameters of
    the CosyVoice2-0.5B recipe, the LLM at ``llm_hidden_size`` and flow/HiFT at ``size``
    (a key of TOKEN2WAV_SIZES). Only what inference loads is listed (no training data
    pipeline, no discriminator)."""
    if size not in TOKEN2WAV_SIZES:
        raise ValueError(f"size {size!r}: expected one of {sorted(TOKEN2WAV_SIZES)}")
    z = TOKEN2WAV_SIZES[size]
    return f"""# CosyVoice2 with random weights, written by scripts/make_tiny_cosyvoice2.py (flow/HiFT size: {size}).
__set_seed1: !apply:random.seed [{seed}]
__set_seed2: !apply:numpy.random.seed [{seed}]
__set_seed3: !apply:torch.manual_seed [{seed}]

sample_rate: 24000
llm_input_size: {llm_hidden_size}
llm_output_size: {llm_hidden_size}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: {z["attention_heads"]}
        linear_units: {z["linear_units"]}
        num_blocks: {z["num_blocks"]}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{z["decoder_channels"]}]
            dropout: 0.0
            attention_head_dim: {z["attention_head_dim"]}
            n_blocks: {z["n_blocks"]}
            num_mid_blocks: {z["num_mid_blocks"]}
            num_heads: {z["num_heads"]}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {z["hift_channels"]}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: {z["resblock_kernel_sizes"]}
    resblock_dilation_sizes: {z["resblock_dilation_sizes"]}
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {z["hift_channels"]}

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


REPO_ROOT = Path(__file__).resolve().parent.parent
PINNED_SOURCE_ARCHIVE = REPO_ROOT.parent / "shared" / "third_party" / "cosyvoice-ace7c47.tar.gz"
"""The upstream source stage -1 clones (FunAudioLLM/CosyVoice at ace7c47, with Matcha-TTS),
as a tarball for machines without GitHub access (development, CI)."""
SOURCE_CACHE = REPO_ROOT / ".cache" / "third_party"  # gitignored


def unpack_pinned_source(archive: Path = PINNED_SOURCE_ARCHIVE, root: Path = SOURCE_CACHE) -> Path:
    """``root/<archive stem>/CosyVoice``, unpacked once (atomically: a half-written tree is
    never seen by a concurrent run)."""
    import tarfile

    target = root / archive.name.replace(".tar.gz", "")
    source = target / "CosyVoice"
    if (source / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
        return source
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack.", dir=root))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="tar")  # our own archive; it has an absolute symlink
        if not (staging / "CosyVoice" / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
            raise RuntimeError(f"{archive} does not unpack to CosyVoice/cosyvoice/cli/cosyvoice.py")
        try:
            os.replace(staging, target)
        except OSError:  # another run unpacked it first
            if not source.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return source


def find_cosyvoice_source() -> Path:
    """``$cosyvoice_src`` if set, else the pinned archive unpacked into ``.cache/third_party``;
    an error saying how to get one otherwise."""
    configured = os.environ.get("cosyvoice_src")
    if configured:
        source = Path(configured).resolve()
        if not (source / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
            raise FileNotFoundError(f"$cosyvoice_src={configured} is not a CosyVoice checkout "
                                    "(no cosyvoice/cli/cosyvoice.py)")
        return source
    if PINNED_SOURCE_ARCHIVE.is_file():
        return unpack_pinned_source()
    raise FileNotFoundError(
        "the CosyVoice source is needed: set $cosyvoice_src to a checkout of FunAudioLLM/CosyVoice at "
        f"ace7c47 (with submodules), or provide {PINNED_SOURCE_ARCHIVE}")


def add_cosyvoice_to_path(cosyvoice_src: str | Path | None) -> None:
    """Make ``cosyvoice`` and ``matcha`` importable from a CosyVoice checkout (as run.sh
    does with $cosyvoice_src); ``None``: they must be importable already."""
    if cosyvoice_src is not None:
        source = Path(cosyvoice_src).resolve()
        if not (source / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
            raise FileNotFoundError(f"--cosyvoice-src {source}: not a CosyVoice checkout (no cosyvoice/cli/cosyvoice.py)")
        for path in (source / "third_party" / "Matcha-TTS", source):
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))
    try:
        import cosyvoice  # noqa: F401
        import matcha  # noqa: F401
    except ImportError as error:
        raise ImportError(f"cannot import CosyVoice ({error}): pass --cosyvoice-src (a checkout of the pinned "
                          "commit, e.g. from ../shared/third_party/cosyvoice-ace7c47.tar.gz)") from error


def _save_onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_tiny_cosyvoice2")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_campplus_onnx(path: str | Path, seed: int = 0) -> Path:
    """A stand-in for CAM++'s ``campplus.onnx``: ``input`` [B, T, 80] mean-removed fbank ->
    ``output`` [B, 192], the per-bin RMS over time through a random projection (so
    different audio gets different embeddings)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).normal(0, 0.1, (80, 192)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", [CAMPPLUS_INPUT, CAMPPLUS_INPUT], ["square"]),
        helper.make_node("ReduceMean", ["square"], ["mean_square"], axes=[1], keepdims=0),
        helper.make_node("Sqrt", ["mean_square"], ["rms"]),
        helper.make_node("MatMul", ["rms", "weight"], [CAMPPLUS_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes, "campplus_standin",
        [helper.make_tensor_value_info(CAMPPLUS_INPUT, TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info(CAMPPLUS_OUTPUT, TensorProto.FLOAT, ["B", 192])],
        initializer=[numpy_helper.from_array(weight, "weight")],
    )
    _save_onnx(graph, Path(path))
    return Path(path)


def write_speech_tokenizer_onnx(path: str | Path, seed: int = 0) -> Path:
    """A stand-in for ``speech_tokenizer_v2.onnx``: ``feats`` [1, 128, T] whisper log-mel
    (100 frames/s) and ``feats_length`` [1] int32 -> ``indices`` [1, ceil(T / 4)] int64 in
    [0, 6561) (25 tokens/s): a random stride-4 convolution, quantized. ``feats_length``
    is consumed (its frames beyond the length are zeroed) like the real model's mask."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    feats, feats_length = SPEECH_TOKENIZER_INPUTS
    weight = np.random.default_rng(seed).normal(0, 1.0, (1, 128, 4)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        numpy_helper.from_array(np.array(1000.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(6561, dtype=np.int64), "codebook"),
    ]
    nodes = [
        # mask[t] = t < feats_length
        helper.make_node("Shape", [feats], ["feats_shape"]),
        helper.make_node("Gather", ["feats_shape", "axis2"], ["frames"], axis=0),
        helper.make_node("Squeeze", ["frames"], ["frames_scalar"]),
        helper.make_node("Range", ["zero", "frames_scalar", "one"], ["positions"]),
        helper.make_node("Cast", [feats_length], ["length64"], to=TensorProto.INT64),
        helper.make_node("Less", ["positions", "length64"], ["valid"]),
        helper.make_node("Cast", ["valid"], ["valid_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [feats, "valid_float"], ["masked"]),
        helper.make_node("Conv", ["masked", "weight"], ["projected"], kernel_shape=[4], strides=[4], pads=[0, 3]),
        helper.make_node("Squeeze", ["projected", "axis1"], ["projected_2d"]),
        helper.make_node("Abs", ["projected_2d"], ["magnitude"]),
        helper.make_node("Mul", ["magnitude", "scale"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["as_int"], to=TensorProto.INT64),
        helper.make_node("Mod", ["as_int", "codebook"], [SPEECH_TOKENIZER_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes, "speech_tokenizer_v2_standin",
        [helper.make_tensor_value_info(feats, TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info(feats_length, TensorProto.INT32, [1])],
        [helper.make_tensor_value_info(SPEECH_TOKENIZER_OUTPUT, TensorProto.INT64, [1, "T4"])],
        initializer=initializers,
    )
    _save_onnx(graph, Path(path))
    return Path(path)


def write_qwen2_weights(llm_state: dict, blank_dir: Path) -> None:
    """``CosyVoice-BlankEN/model.safetensors``: the Qwen2 backbone of ``llm.pt`` in Hugging
    Face names, so ``Qwen2Encoder(pretrain_path)`` (``from_pretrained``) loads it."""
    from safetensors.torch import save_file

    prefix = "llm.model."
    tensors = {key[len(prefix):]: value.clone().contiguous() for key, value in llm_state.items()
               if key.startswith(prefix) and key != prefix + "lm_head.weight"}  # lm_head is tied
    save_file(tensors, str(blank_dir / "model.safetensors"), metadata={"format": "pt"})


def write_full_cosyvoice2(output_dir: str | Path, seed: int = 0, size: str = "tiny",
                          cosyvoice_src: str | Path | None = None) -> Path:
    """Write a complete CosyVoice2-0.5B-layout directory (see the module doc) with random
    weights, built from the real CosyVoice classes through hyperpyyaml; flow/HiFT at
    ``size`` ("tiny" or "real"), the LLM always tiny. ``output_dir`` is replaced."""
    add_cosyvoice_to_path(cosyvoice_src)
    from hyperpyyaml import load_hyperpyyaml

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.full", dir=output_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        llm_dir = write_tiny_cosyvoice2(tmp / "llm_part", seed=seed)
        for item in llm_dir.iterdir():
            os.replace(item, tmp / item.name)
        llm_dir.rmdir()
        llm_state = torch.load(tmp / "llm.pt", weights_only=True)
        write_qwen2_weights(llm_state, tmp / BLANK_EN)
        hidden = json.loads((tmp / BLANK_EN / "config.json").read_text())["hidden_size"]
        yaml_text = cosyvoice2_yaml(hidden, size=size, seed=seed)
        (tmp / "cosyvoice2.yaml").write_text(yaml_text, encoding="utf-8")
        configs = load_hyperpyyaml(yaml_text, overrides={"qwen_pretrain_path": str(tmp / BLANK_EN)})
        # CosyVoice2 loads llm.pt strictly: check here that it matches the real Qwen2LM.
        configs["llm"].load_state_dict(llm_state, strict=True)
        torch.save(configs["flow"].state_dict(), tmp / "flow.pt")
        torch.save(configs["hift"].state_dict(), tmp / "hift.pt")
        write_campplus_onnx(tmp / "campplus.onnx", seed=seed)
        write_speech_tokenizer_onnx(tmp / "speech_tokenizer_v2.onnx", seed=seed)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


# ---------------------------------------------------------------------------
# Tiny FunASR models (server environment): SenseVoiceSmall and Paraformer
# ---------------------------------------------------------------------------

ASR_CORPUS = ["今天天气不错", "我们一起去公园", "你好世界", "一丁七万丈三上下", "希望你以后能够做的比我还好呦"]
SENSEVOICE_TAGS = ["<|zh|>", "<|en|>", "<|yue|>", "<|ja|>", "<|ko|>", "<|nospeech|>", "<|HAPPY|>", "<|SAD|>",
                   "<|ANGRY|>", "<|NEUTRAL|>", "<|Speech|>", "<|BGM|>", "<|Laughter|>", "<|withitn|>", "<|woitn|>"]
SENSEVOICE_BPE = "chn_jpn_yue_eng_ko_spectok.bpe.model"  # the file name iic/SenseVoiceSmall uses


def write_am_mvn(path: Path, dim: int, seed: int = 0) -> Path:
    """A Kaldi-nnet-text ``am.mvn`` (global CMVN: ``<AddShift>`` = -mean, ``<Rescale>`` =
    1/std) as FunASR's WavFrontend reads it; values near those of log-mel features."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shift = -(8.0 + rng.normal(0, 1.0, dim))
    scale = 1.0 / (2.0 + rng.uniform(0, 1.0, dim))
    fmt = lambda values: " ".join(f"{v:.6f}" for v in values)  # noqa: E731
    path.write_text(
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {fmt(shift)} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {fmt(scale)} ]\n</Nnet>\n", encoding="utf-8")
    return path


def _funasr_frontend_conf(n_mels: int, lfr: int) -> dict:
    return {"fs": 16000, "window": "hamming", "n_mels": n_mels, "frame_length": 25, "frame_shift": 10,
            "lfr_m": lfr, "lfr_n": lfr, "cmvn_file": "am.mvn"}


def _write_funasr_dir(tmp: Path, output_dir: Path, config: dict, model_args: dict, file_path_metas: dict,
                      seed: int) -> Path:
    import yaml
    from funasr.register import tables

    (tmp / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    (tmp / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "auto-speech-recognition", "model": {"type": "funasr"},
        "file_path_metas": {"init_param": "model.pt", "config": "config.yaml", **file_path_metas},
    }, indent=2), encoding="utf-8")
    torch.manual_seed(seed)
    model = tables.model_classes[config["model"]](**model_args, **config["model_conf"])
    torch.save(model.state_dict(), tmp / "model.pt")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return output_dir


def write_tiny_sensevoice(output_dir: str | Path, seed: int = 0) -> Path:
    """A SenseVoiceSmall directory in FunASR's layout (config.yaml, configuration.json,
    model.pt, a sentencepiece model with SenseVoice's ``<|...|>`` tags trained here, am.mvn);
    random weights, 2 tiny encoder blocks (0.2M parameters; the real one has 221M)."""
    import sentencepiece as spm
    import funasr.models.sense_voice.model  # noqa: F401  (registers SenseVoiceSmall)

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp", dir=output_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(ASR_CORPUS * 20), encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp / "bpe"), vocab_size=80,
                                       model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                       user_defined_symbols=SENSEVOICE_TAGS, minloglevel=2)
        corpus.unlink()
        (tmp / "bpe.vocab").unlink()
        os.replace(tmp / "bpe.model", tmp / SENSEVOICE_BPE)
        vocab = spm.SentencePieceProcessor(model_file=str(tmp / SENSEVOICE_BPE)).get_piece_size()
        n_mels, lfr = 8, 2
        write_am_mvn(tmp / "am.mvn", n_mels * lfr, seed)
        model_args = {
            "encoder": "SenseVoiceEncoderSmall",
            "encoder_conf": {"output_size": 16, "attention_heads": 2, "linear_units": 32, "num_blocks": 2,
                             "tp_blocks": 1, "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                             "attention_dropout_rate": 0.0, "input_layer": "pe",
                             "pos_enc_class": "SinusoidalPositionEncoder", "normalize_before": True,
                             "kernel_size": 3, "sanm_shfit": 0, "selfattention_layer_type": "sanm"},
            "input_size": n_mels * lfr,
            "vocab_size": vocab,
        }
        config = {
            "model": "SenseVoiceSmall",
            "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
            "frontend": "WavFrontend",
            "frontend_conf": _funasr_frontend_conf(n_mels, lfr),
            "tokenizer": "SentencepiecesTokenizer",
            "tokenizer_conf": {"bpemodel": SENSEVOICE_BPE, "unk_symbol": "<unk>", "split_with_space": True},
            **model_args,
        }
        metas = {"tokenizer_conf": {"bpemodel": SENSEVOICE_BPE}, "frontend_conf": {"cmvn_file": "am.mvn"}}
        return _write_funasr_dir(tmp, output_dir, config, model_args, metas, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tiny_paraformer(output_dir: str | Path, seed: int = 0) -> Path:
    """A Paraformer directory in FunASR's layout (config.yaml, configuration.json, model.pt,
    tokens.json with one token per character of a small corpus, am.mvn): SANM encoder, CIF
    predictor, SANM decoder, all tiny, random weights."""
    import funasr.models.paraformer.model  # noqa: F401  (registers Paraformer)

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp", dir=output_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        characters = sorted(set("".join(ASR_CORPUS)))
        tokens = ["<blank>", "<s>", "</s>", *characters, "<unk>"]
        (tmp / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
        n_mels, lfr = 8, 2
        write_am_mvn(tmp / "am.mvn", n_mels * lfr, seed)
        size = 16
        model_args = {
            "encoder": "SANMEncoder",
            "encoder_conf": {"output_size": size, "attention_heads": 2, "linear_units": 32, "num_blocks": 2,
                             "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0,
                             "input_layer": "pe", "pos_enc_class": "SinusoidalPositionEncoder",
                             "normalize_before": True, "kernel_size": 3, "sanm_shfit": 0,
                             "selfattention_layer_type": "sanm"},
            "decoder": "ParaformerSANMDecoder",
            "decoder_conf": {"attention_heads": 2, "linear_units": 32, "num_blocks": 1, "dropout_rate": 0.0,
                             "positional_dropout_rate": 0.0, "self_attention_dropout_rate": 0.0,
                             "src_attention_dropout_rate": 0.0, "att_layer_num": 1, "kernel_size": 3,
                             "sanm_shfit": 0},
            "predictor": "CifPredictorV2",
            "predictor_conf": {"idim": size, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
            "input_size": n_mels * lfr,
            "vocab_size": len(tokens),
        }
        config = {
            "model": "Paraformer",
            "model_conf": {"ctc_weight": 0.0, "lsm_weight": 0.1, "length_normalized_loss": True,
                           "predictor_weight": 1.0, "predictor_bias": 1, "sampling_ratio": 0.75},
            "frontend": "WavFrontend",
            "frontend_conf": _funasr_frontend_conf(n_mels, lfr),
            "tokenizer": "CharTokenizer",
            "tokenizer_conf": {"unk_symbol": "<unk>", "token_list": "tokens.json"},
            **model_args,
        }
        metas = {"tokenizer_conf": {"token_list": "tokens.json"}, "frontend_conf": {"cmvn_file": "am.mvn"}}
        return _write_funasr_dir(tmp, output_dir, config, model_args, metas, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="directory to write (replaced if present)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--logit-std", type=float, default=4.0, help="spread of the speech logits (nats)")
    parser.add_argument("--bias-std", type=float, default=0.5, help="spread of llm_decoder.bias")
    parser.add_argument("--full", action="store_true",
                        help="write a complete CosyVoice2-0.5B-layout directory from the real CosyVoice classes "
                             "(flow, HiFT, ONNX stand-ins; server environment)")
    parser.add_argument("--size", choices=sorted(TOKEN2WAV_SIZES), default="tiny",
                        help="with --full: flow/HiFT size (real: CosyVoice2-0.5B's, about 530 MB)")
    parser.add_argument("--cosyvoice-src", default=None,
                        help="with --full: CosyVoice checkout to import (default: already on PYTHONPATH)")
    parser.add_argument("--sensevoice-dir", default=None, help="also write a tiny SenseVoiceSmall directory here")
    parser.add_argument("--paraformer-dir", default=None, help="also write a tiny Paraformer directory here")
    args = parser.parse_args(argv)
    if args.full:
        path = write_full_cosyvoice2(args.output_dir, seed=args.seed, size=args.size, cosyvoice_src=args.cosyvoice_src)
        print(f"wrote CosyVoice2 directory ({args.size} flow/HiFT, random weights) to {path}")
    else:
        path = write_tiny_cosyvoice2(args.output_dir, seed=args.seed, logit_std=args.logit_std,
                                     bias_std=args.bias_std)
        print(f"wrote tiny CosyVoice2 model to {path}")
    if args.sensevoice_dir:
        print(f"wrote tiny SenseVoiceSmall to {write_tiny_sensevoice(args.sensevoice_dir, seed=args.seed)}")
    if args.paraformer_dir:
        print(f"wrote tiny Paraformer to {write_tiny_paraformer(args.paraformer_dir, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A complete CosyVoice2-0.5B-layout directory with random weights, built from the real
CosyVoice classes (server environment: the pinned CosyVoice source, hyperpyyaml, onnx): what
``CosyVoice2(model_dir)`` loads and the reward server's real engines run
(``write_full_cosyvoice2``; CLI: ``scripts/make_tiny_cosyvoice2.py --full``):

    DIR/cosyvoice2.yaml                  the real recipe's hyperpyyaml, flow/HiFT at reduced size
    DIR/llm.pt                           the tiny LLM of ``ttsrl.tiny_models.llm`` (loaded strictly)
    DIR/flow.pt, DIR/hift.pt             random weights of CausalMaskedDiffWithXvec, HiFTGenerator
    DIR/CosyVoice-BlankEN/               the tiny LLM's, plus model.safetensors (Qwen2ForCausalLM)
    DIR/campplus.onnx                    ONNX stand-ins with the real input/output names and
    DIR/speech_tokenizer_v2.onnx         shapes (onnx.helper graphs, see below)

Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ttsrl.atomic_write import atomic_dir
from ttsrl.cosyvoice_source import add_cosyvoice_to_path
from ttsrl.policy.hf_conversion import BLANK_EN, LLM_PT
from ttsrl.tiny_models.llm import write_tiny_llm_files


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
    ``size`` ("tiny" or "real"), the LLM always tiny. ``output_dir`` is replaced, atomically."""
    add_cosyvoice_to_path(cosyvoice_src)
    from hyperpyyaml import load_hyperpyyaml

    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
        write_tiny_llm_files(tmp, seed=seed)
        llm_state = torch.load(tmp / LLM_PT, weights_only=True)
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
    return output_dir

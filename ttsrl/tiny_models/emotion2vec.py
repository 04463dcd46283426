"""A tiny emotion2vec+ directory in FunASR's layout (the ``emotion2vec_plus`` family's
architecture: FunASR's ``Emotion2vec`` with a classification head over its label tokens), with
random weights, for tests of the emotion reward component's loading and inference code."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ttsrl.atomic_write import atomic_dir

EMOTION2VEC_PLUS_LABELS = ("生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral", "其他/other",
                           "难过/sad", "吃惊/surprised", "<unk>")
"""The label tokens of the emotion2vec_plus models (model card: angry, disgusted, fearful, happy,
neutral, other, sad, surprised, unknown)."""


def tiny_emotion2vec_conf() -> dict:
    """``model_conf`` of a 2-block, 16-dim Emotion2vec (the real large one: 24 blocks, 1024 dims)."""
    audio = {
        "feature_encoder_spec": "[(16, 10, 5), (16, 3, 2), (16, 2, 2)]",  # 20 ms frames like the real 7 layers
        "extractor_mode": "layer_norm", "conv_pos_depth": 2, "conv_pos_width": 6, "conv_pos_groups": 4,
        "conv_pos_pre_ln": False, "prenet_depth": 1, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0,
        "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "model_depth": 2, "num_extra_tokens": 0,
        "init_extra_token_zero": True, "mask_noise_std": 0.01, "mask_prob_min": None, "inverse_mask": False,
        "mask_prob": 0.0, "keep_masked_pct": 0.0, "mask_length": 5, "add_masks": False, "remove_masks": False,
        "mask_dropout": 0.0, "encoder_zero_mask": True, "mask_channel_prob": 0.0, "mask_channel_length": 64,
        "local_grad_mult": 1.0, "use_alibi_encoder": True, "alibi_scale": 1.0, "learned_alibi": False,
        "alibi_max_pos": None, "learned_alibi_scale": True, "learned_alibi_scale_per_head": True,
        "learned_alibi_scale_per_layer": False, "num_alibi_heads": 2, "model_depth": 2, "decoder": None,
        "type": "AUDIO",
    }
    return {
        "loss_beta": 0.0, "loss_scale": None, "depth": 2, "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0,
        "num_heads": 2, "norm_eps": 1e-5, "norm_affine": True, "encoder_dropout": 0.0, "post_mlp_drop": 0.0,
        "attention_dropout": 0.0, "activation_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.0,
        "embed_dim": 16, "mlp_ratio": 2.0, "layer_norm_first": False, "average_top_k_layers": 2,
        "end_of_block_targets": False, "clone_batch": 1, "layer_norm_target_layer": False,
        "batch_norm_target_layer": False, "instance_norm_target_layer": True, "instance_norm_targets": False,
        "layer_norm_targets": False, "ema_decay": 0.999, "ema_same_dtype": True, "log_norms": True,
        "ema_end_decay": 0.99999, "ema_anneal_end_step": 20000, "ema_encoder_only": True,
        "max_update": 100000, "extractor_mode": "layer_norm", "shared_decoder": None, "min_target_var": 0.1,
        "min_pred_var": 0.01, "supported_modality": "AUDIO", "mae_init": False, "seed": 1, "skip_ema": False,
        "cls_loss": 1.0, "recon_loss": 0.0, "d2v_loss": 1.0, "decoder_group": False, "adversarial_training": False,
        "adversarial_hidden_dim": 128, "adversarial_weight": 0.1, "cls_type": "chunk", "normalize": True,
        "modalities": {"audio": audio},
    }


def write_tiny_emotion2vec(output_dir: str | Path, seed: int = 0, labels=EMOTION2VEC_PLUS_LABELS) -> Path:
    """config.yaml, configuration.json, tokens.txt (one label per line) and a random model.pt."""
    import yaml
    import funasr.models.emotion2vec.model  # noqa: F401  (registers Emotion2vec)
    from funasr.register import tables

    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
        (tmp / "tokens.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        config = {
            "model": "Emotion2vec",
            "model_conf": tiny_emotion2vec_conf(),
            "tokenizer": "CharTokenizer",
            "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True, "token_list": "tokens.txt"},
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
                                         encoding="utf-8")
        (tmp / "configuration.json").write_text(json.dumps({
            "framework": "pytorch", "task": "emotion-recognition", "model": {"type": "funasr"},
            "file_path_metas": {"init_param": "model.pt", "config": "config.yaml",
                                "tokenizer_conf": {"token_list": "tokens.txt"}},
        }, indent=2), encoding="utf-8")
        torch.manual_seed(seed)
        model = tables.model_classes["Emotion2vec"](model_conf=config["model_conf"], vocab_size=len(labels))
        torch.save(model.state_dict(), tmp / "model.pt")
    return output_dir

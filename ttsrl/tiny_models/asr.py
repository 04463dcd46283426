"""Tiny SenseVoiceSmall and Paraformer directories in FunASR's layout (server environment:
funasr, sentencepiece): config.yaml, configuration.json, model.pt with random weights through
funasr's model registry, a tokenizer trained here, am.mvn; and a tiny Whisper checkpoint in the
format of openai-whisper's large-v3.pt (``write_tiny_whisper``). What the reward server's real ASR
engines load; nothing is downloaded. CLI: ``scripts/make_tiny_cosyvoice2.py --sensevoice-dir D
--paraformer-dir D --whisper-file F``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ttsrl.atomic_write import atomic_dir

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


def _write_funasr_files(tmp: Path, config: dict, model_args: dict, file_path_metas: dict, seed: int) -> None:
    """config.yaml, configuration.json and the random model.pt of ``config["model"]`` into ``tmp``."""
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


def write_tiny_sensevoice(output_dir: str | Path, seed: int = 0) -> Path:
    """A SenseVoiceSmall directory in FunASR's layout (config.yaml, configuration.json,
    model.pt, a sentencepiece model with SenseVoice's ``<|...|>`` tags trained here, am.mvn);
    random weights, 2 tiny encoder blocks (0.2M parameters; the real one has 221M)."""
    import sentencepiece as spm
    import funasr.models.sense_voice.model  # noqa: F401  (registers SenseVoiceSmall)

    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
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
        _write_funasr_files(tmp, config, model_args, metas, seed)
    return output_dir


def write_tiny_paraformer(output_dir: str | Path, seed: int = 0) -> Path:
    """A Paraformer directory in FunASR's layout (config.yaml, configuration.json, model.pt,
    tokens.json with one token per character of a small corpus, am.mvn): SANM encoder, CIF
    predictor, SANM decoder, all tiny, random weights."""
    import funasr.models.paraformer.model  # noqa: F401  (registers Paraformer)

    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as tmp:
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
        _write_funasr_files(tmp, config, model_args, metas, seed)
    return output_dir


WHISPER_LARGE_V3_N_MELS = 128
WHISPER_LARGE_V3_N_VOCAB = 51866  # the multilingual tokenizer with 100 languages (large-v3 added Cantonese)


def write_tiny_whisper(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Whisper in the format of large-v3.pt (``{"dims", "model_state_dict"}``): large-v3's
    mel bins, vocabulary and 30 s window, one small layer each side. Written atomically."""
    import dataclasses

    from whisper.model import ModelDimensions, Whisper

    from ttsrl.atomic_write import atomic_file

    # n_audio_ctx stays 1500: the encoder takes exactly one 30 s window (3000 mel frames, stride 2).
    dims = ModelDimensions(n_mels=WHISPER_LARGE_V3_N_MELS, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2,
                           n_audio_layer=1, n_vocab=WHISPER_LARGE_V3_N_VOCAB, n_text_ctx=32, n_text_state=32,
                           n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit-scale weights, so the (noise) transcript depends on the audio
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, tmp)
    return path

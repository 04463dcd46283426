"""The real engines without downloaded weights: a tiny SenseVoiceSmall built here runs the
real FunASR inference path; CosyVoice2's loader is checked up to where weights are needed."""
import pathlib

import numpy as np
import pytest
import torch
import yaml

from token2wav_server import engines_cosyvoice2, standin
from token2wav_server.engines import EngineOptions, Engines, SpeakerPrompt
from token2wav_server.engines_sensevoice import FunasrAsr, clean_transcript, sensevoice
from token2wav_server.rewarding import RewardConfig
from token2wav_server.serving import Pipeline, Slot
from ttsrl.reward import error_rate_utility
from ttsrl.scoring import error_rate


def build_tiny_sensevoice(directory: pathlib.Path) -> pathlib.Path:
    """A SenseVoiceSmall in FunASR's directory layout: config.yaml, model.pt, a
    sentencepiece model trained here; random weights, 2 tiny encoder blocks."""
    import sentencepiece as spm
    from funasr.register import tables
    import funasr.models.sense_voice.model  # noqa: F401  (registers SenseVoiceSmall)

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(["今天天气不错", "我们一起去公园", "你好世界", "一丁七万丈三上下"] * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "bpe"), vocab_size=32,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2)
    vocab = spm.SentencePieceProcessor(model_file=str(directory / "bpe.model")).get_piece_size()
    model_args = {
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": {"output_size": 16, "attention_heads": 2, "linear_units": 32, "num_blocks": 2,
                         "tp_blocks": 1, "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "attention_dropout_rate": 0.0, "input_layer": "pe",
                         "pos_enc_class": "SinusoidalPositionEncoder", "normalize_before": True, "kernel_size": 3,
                         "sanm_shfit": 0, "selfattention_layer_type": "sanm"},
        "input_size": 16,  # 8 mel bins x lfr_m 2
        "vocab_size": vocab,
    }
    config = {
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "frontend": "WavFrontend",
        "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": 8, "frame_length": 25, "frame_shift": 10,
                          "lfr_m": 2, "lfr_n": 2},
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": str(directory / "bpe.model"), "unk_symbol": "<unk>",
                           "split_with_space": True},
        **model_args,
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    torch.manual_seed(0)
    model = tables.model_classes["SenseVoiceSmall"](**model_args, **config["model_conf"])
    torch.save(model.state_dict(), directory / "model.pt")
    return directory


@pytest.fixture(scope="module")
def tiny_sensevoice(tmp_path_factory):
    return build_tiny_sensevoice(tmp_path_factory.mktemp("sensevoice"))


def _noise(seconds, seed):
    return np.random.default_rng(seed).normal(0, 0.1, int(16000 * seconds)).astype(np.float32)


def test_tiny_sensevoice_transcribes_a_batch(tiny_sensevoice):
    # Random weights give arbitrary text; what is checked is the real FunASR path end to end.
    asr = sensevoice(str(tiny_sensevoice), "cpu")
    assert asr.model.kwargs["frontend"].dither == 0.0
    waves = [_noise(1.0, 0), _noise(0.5, 1), _noise(0.3, 2)]
    results = asr.transcribe(waves)
    assert len(results) == 3
    vocabulary = set("今天气不错我们一起去公园你好世界丁七万丈三上下 ")
    assert all(isinstance(r.text, str) and set(r.text) <= vocabulary and r.nll is None for r in results)
    # No random dither: the same audio always gets the same transcript (and reward).
    tone = standin.tokens_to_wave(standin.text_to_tokens("一丁七万丈三上下" * 3))
    assert len({asr.transcribe([tone])[0].text for _ in range(3)}) == 1
    assert asr.transcribe([]) == []


def test_real_asr_behind_the_reward_pipeline(tiny_sensevoice):
    asr = FunasrAsr(str(tiny_sensevoice), "cpu")
    engines = Engines(token2wav=standin.StandinToken2Wav(), asr=asr)
    prompt = SpeakerPrompt("silence", np.zeros(16000, dtype=np.float32), 16000, "")
    pipeline = Pipeline(Slot(engines, [prompt]), RewardConfig())
    ids = standin.text_to_tokens("一丁七万丈三上下" * 3)
    request = {"TOKENS": np.array([ids], dtype=np.int32), "TOKEN_LENS": np.array([[len(ids)]], dtype=np.int32),
               "GT_TEXT": np.array([["今天天气不错".encode()]], dtype=object)}
    out = pipeline.token2wav_asr([request])[0]
    transcript = out["TRANSCRIPTS"].ravel()[0].decode()
    assert out["ERRORS"].ravel()[0] == b""
    assert out["ERROR_RATE"].ravel()[0] == pytest.approx(error_rate("今天天气不错", transcript))
    assert out["REWARDS"].ravel()[0] == pytest.approx(error_rate_utility(error_rate("今天天气不错", transcript)))


def test_clean_transcript_strips_sensevoice_tags():
    assert clean_transcript("<|zh|><|NEUTRAL|><|Speech|><|woitn|>今天天气不错 ") == "今天天气不错"


def test_missing_model_directories_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--sensevoice-dir"):
        sensevoice(None)
    with pytest.raises(FileNotFoundError, match="--cosyvoice2-dir .*not a directory"):
        engines_cosyvoice2.check_cosyvoice2_dir(str(tmp_path / "nope"))
    (tmp_path / "cv2").mkdir()
    (tmp_path / "cv2" / "flow.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks .*cosyvoice2.yaml.*hift.pt"):
        engines_cosyvoice2.check_cosyvoice2_dir(str(tmp_path / "cv2"))


def test_cosyvoice2_factory_explains_a_missing_cosyvoice_checkout(tmp_path, tiny_sensevoice):
    model_dir = tmp_path / "CosyVoice2-0.5B"
    model_dir.mkdir()
    for name in engines_cosyvoice2.REQUIRED_FILES:
        (model_dir / name).write_bytes(b"")
    options = EngineOptions(device="cpu", cosyvoice2_dir=str(model_dir), sensevoice_dir=str(tiny_sensevoice))
    with pytest.raises(ImportError, match="put the CosyVoice source .* on PYTHONPATH"):
        engines_cosyvoice2.create_engines(options)

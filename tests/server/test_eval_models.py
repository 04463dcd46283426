"""The evaluation models ``speaker`` and ``speech_tokenizer`` without a server (stand-in
engines; CosyVoice2's own: test_engines_cosyvoice2.py, test_server_cosyvoice2.py)."""
import numpy as np
import pytest

from token2wav_server import standin
from token2wav_server.engines import EngineOptions, Engines, SpeakerPrompt, resample
from token2wav_server.reward_scoring import RewardConfig
from token2wav_server.serving import Pipeline, Slot

PROMPTS = [SpeakerPrompt("p0", standin.tokens_to_wave([1, 2, 3]), standin.SAMPLE_RATE, "p0")]


def _pipeline(engines=None):
    return Pipeline(Slot(engines or standin.create_engines(EngineOptions()), PROMPTS), RewardConfig())


def _wave_request(waves, rate=standin.SAMPLE_RATE):
    width = max(len(w) for w in waves)
    wav = np.zeros((len(waves), width), dtype=np.float32)
    for row, wave in enumerate(waves):
        wav[row, : len(wave)] = wave
    return {"WAV": wav, "WAV_LENS": np.array([[len(w)] for w in waves], dtype=np.int32),
            "SAMPLE_RATE": np.full((len(waves), 1), rate, dtype=np.int32)}


def test_speech_tokenizer_reads_standin_audio_and_reports_other_audio_per_item():
    pipeline = _pipeline()
    ids_a, ids_b = standin.text_to_tokens("一丁七万"), [6560, 0]
    noise = np.random.default_rng(0).normal(0, 0.1, 1000).astype(np.float32)
    out = pipeline.speech_tokenizer([_wave_request([standin.tokens_to_wave(ids_a), noise,
                                                    standin.tokens_to_wave(ids_b)])])[0]
    lens = out["TOKEN_LENS"].ravel().tolist()
    assert lens == [4, 0, 2]
    assert out["TOKENS"][0, :4].tolist() == ids_a and out["TOKENS"][2, :2].tolist() == ids_b
    errors = [e.decode() for e in out["ERRORS"].ravel()]
    assert errors[0] == errors[2] == ""
    assert errors[1].startswith("speech_tokenizer failed on request 0 row 1 (0.06 s of audio) after 1 attempt(s): "
                                "ValueError: not stand-in audio")


def test_speech_tokenizer_bad_input_is_an_item_error():
    pipeline = _pipeline()
    request = _wave_request([standin.tokens_to_wave([5])])
    request["SAMPLE_RATE"][:] = 10
    out = pipeline.speech_tokenizer([request, _wave_request([standin.tokens_to_wave([7, 8])])])
    assert out[0]["ERRORS"].ravel()[0].decode() == "SAMPLE_RATE 10 is outside [1000, 192000]"
    assert out[1]["TOKENS"].ravel().tolist() == [7, 8] and out[1]["ERRORS"].ravel()[0] == b""


def test_speaker_embeddings_equal_the_standin_formula_and_nan_for_bad_items():
    pipeline = _pipeline()
    waves = [standin.tokens_to_wave([3, 4, 5]), standin.tokens_to_wave([100])]
    bad = np.array([0.1, np.nan], dtype=np.float32)
    out = pipeline.speaker([_wave_request(waves + [bad])])[0]
    expected = standin.StandinSpeaker().embed(waves)
    assert out["EMBEDDING"].shape == (3, 4)
    np.testing.assert_array_equal(out["EMBEDDING"][:2], expected)
    assert np.isnan(out["EMBEDDING"][2]).all()
    assert [e.decode() for e in out["ERRORS"].ravel()] == ["", "", "WAV has NaN or infinite samples"]


def test_speaker_input_is_resampled_to_the_engine_rate():
    pipeline = _pipeline()
    wave16 = np.sin(np.arange(16000) / 10.0).astype(np.float32)
    wave8 = wave16[::2].copy()
    out = pipeline.speaker([_wave_request([wave8], rate=8000)])[0]
    assert out["ERRORS"].ravel()[0] == b""
    resampled = standin.StandinSpeaker().embed([resample(wave8, 8000, 16000)])
    np.testing.assert_allclose(out["EMBEDDING"], resampled, rtol=1e-6)


# CosyVoice2's speaker and speech-tokenizer engines run on the real pinned CosyVoice code in
# test_engines_cosyvoice2.py (in process) and test_server_cosyvoice2.py (served).


def test_engines_bundle_checks_the_speech_tokenizer_interface():
    with pytest.raises(TypeError, match="'speech_tokenizer' .* does not implement SpeechTokenizerEngine"):
        Engines(token2wav=standin.StandinToken2Wav(), asr=standin.StandinAsr(), speech_tokenizer=object())


def test_evaluation_models_are_bound_only_when_every_slot_has_the_engine():
    from token2wav_server import cli
    from token2wav_server.triton_worker import bind_models

    class Recorder:  # records what bind_models asks PyTriton to serve
        def __init__(self):
            self.models = {}

        def bind(self, model_name, infer_func, inputs, outputs, config, strict):
            self.models[model_name] = ([t.name for t in inputs], [t.name for t in outputs], len(infer_func))

    args = cli.build_parser().parse_args(["--devices", "cpu"])
    full = [_pipeline(), _pipeline()]
    recorder = Recorder()
    assert bind_models(recorder, full, args) == ["token2wav", "asr", "asr_eval", "speaker", "speech_tokenizer",
                                                 "token2wav_asr"]
    assert list(recorder.models)[-1] == "token2wav_asr"  # loaded last: its readiness means all are ready
    assert recorder.models["speaker"] == (["WAV", "WAV_LENS", "SAMPLE_RATE"], ["EMBEDDING", "ERRORS"], 2)
    assert recorder.models["speech_tokenizer"] == (["WAV", "WAV_LENS", "SAMPLE_RATE"],
                                                   ["TOKENS", "TOKEN_LENS", "ERRORS"], 2)
    partial = _pipeline(Engines(token2wav=standin.StandinToken2Wav(), asr=standin.StandinAsr(),
                                speaker=standin.StandinSpeaker()))
    assert bind_models(Recorder(), [_pipeline(), partial], args) == ["token2wav", "asr", "speaker",
                                                                     "token2wav_asr"]

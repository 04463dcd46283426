"""The served computations without a server: batching, per-item isolation, components."""
import math

import numpy as np
import pytest

from token2wav_server import standin
from token2wav_server.engines import AsrResult, EngineOptions, Engines, SpeakerPrompt
from token2wav_server.rewarding import RewardConfig
from token2wav_server.serving import Limits, Pipeline, Slot, parse_tokens, parse_text, ItemError
from ttsrl.reward import error_rate_utility

PROMPTS = [SpeakerPrompt(name, standin.tokens_to_wave(ids), standin.SAMPLE_RATE, name)
           for name, ids in (("p0", [1, 2, 3]), ("p1", [9, 9]))]


def _request(items):
    width = max(1, max(len(ids) for ids, _ in items))
    tokens = np.zeros((len(items), width), dtype=np.int32)
    for row, (ids, _) in enumerate(items):
        tokens[row, : len(ids)] = ids
    return {"TOKENS": tokens, "TOKEN_LENS": np.array([[len(ids)] for ids, _ in items], dtype=np.int32),
            "GT_TEXT": np.array([[t if isinstance(t, bytes) else t.encode()] for _, t in items], dtype=object)}


def _pipeline(config=RewardConfig(), engines=None, **limits):
    engines = engines or standin.create_engines(EngineOptions())
    return Pipeline(Slot(engines, PROMPTS, need_speaker=config.uses("similarity")), config, Limits(**limits))


def test_whole_dynamic_batch_is_synthesized_in_one_engine_call():
    pipeline = _pipeline()
    calls = []
    original = pipeline.slot.engines.token2wav.synthesize
    pipeline.slot.engines.token2wav.synthesize = lambda toks, prompts: calls.append(len(toks)) or original(toks, prompts)
    requests = [_request([(standin.text_to_tokens("一丁"), "一丁"), (standin.text_to_tokens("七"), "七万")]),
                _request([(standin.text_to_tokens("三上下"), "三上下")])]
    outputs = pipeline.token2wav_asr(requests)
    assert calls == [3]
    assert outputs[0]["REWARDS"].ravel().tolist() == pytest.approx([1.0, error_rate_utility(0.5)])
    assert outputs[1]["TRANSCRIPTS"].ravel().tolist() == ["三上下".encode()]
    assert outputs[0]["REWARDS"].shape == (2, 1)
    assert pipeline.slot.engines.token2wav.prepared_prompts == 2  # at start-up only


def test_prompt_choice_is_deterministic_and_overridable():
    pipeline = _pipeline()
    request = _request([(list(range(k, k + 5)), "一") for k in range(20)])
    pipeline.token2wav_asr([request])
    first = list(pipeline.slot.engines.token2wav.last_prompts)
    pipeline.token2wav_asr([request])
    assert pipeline.slot.engines.token2wav.last_prompts == first and set(first) == {"p0", "p1"}
    pipeline.token2wav_asr([request], [{"prompt": "p1"}])
    assert set(pipeline.slot.engines.token2wav.last_prompts) == {"p1"}


class _FlakyToken2Wav(standin.StandinToken2Wav):
    """Fails on any batch containing token 13 (an engine bug triggered by one input)."""

    def synthesize(self, token_batch, prompts):
        if any(13 in tokens for tokens in token_batch):
            raise RuntimeError("kernel exploded")
        return super().synthesize(token_batch, prompts)


def test_engine_failure_on_one_item_fails_only_that_item():
    engines = Engines(token2wav=_FlakyToken2Wav(), asr=standin.StandinAsr())
    pipeline = _pipeline(engines=engines)
    items = [(standin.text_to_tokens("丁七"), "丁七"), ([13], "一"), (standin.text_to_tokens("万"), "万")]
    out = pipeline.token2wav_asr([_request(items)])[0]
    assert out["ERRORS"].ravel()[1].decode() == "token2wav failed: RuntimeError: kernel exploded"
    assert out["REWARDS"].ravel()[[0, 2]].tolist() == [1.0, 1.0]
    assert math.isnan(out["REWARDS"].ravel()[1])


def test_similarity_and_confidence_components():
    config = RewardConfig(weights={"error_rate": 1.0, "similarity": 1.0, "confidence": 1.0}, rule="harmonic")
    pipeline = _pipeline(config)
    out = pipeline.token2wav_asr([_request([([1, 2, 3], standin.tokens_to_text([1, 2, 3]))])], [{"prompt": "p0"}])[0]
    # The generated audio equals prompt p0's audio: similarity 1, nll 0, perfect transcript.
    assert out["SPEAKER_SIMILARITY"].ravel()[0] == pytest.approx(1.0, abs=1e-6)
    assert out["ASR_NLL"].ravel()[0] == 0.0
    assert out["REWARDS"].ravel()[0] == pytest.approx(1.0, abs=1e-6)


def test_similarity_needs_a_speaker_engine():
    engines = Engines(token2wav=standin.StandinToken2Wav(), asr=standin.StandinAsr())
    with pytest.raises(ValueError, match="no speaker engine"):
        Slot(engines, PROMPTS, need_speaker=True)


def test_token_and_text_parsing_errors():
    limits = Limits(max_tokens=3)
    row = np.array([1, 2, 3, 0], dtype=np.int32)
    assert parse_tokens(row, 2, limits).tolist() == [1, 2]
    assert parse_tokens(row[:3], None, limits).tolist() == [1, 2, 3]
    for length, message in ((5, "only 4 values"), (-1, "must be >= 0"), (4, "maximum of 3")):
        with pytest.raises(ItemError, match=message):
            parse_tokens(row, length, limits)
    assert parse_text(np.array([b"\xe4\xb8\x80"], dtype=object)) == "一"
    for value, message in ((b"\xff", "UTF-8"), (b" ", "empty"), (3, "must be a string")):
        with pytest.raises(ItemError, match=message):
            parse_text(value)


def test_token2wav_model_pads_and_reports_errors():
    pipeline = _pipeline()
    out = pipeline.token2wav([_request([([1, 2], ""), ([], ""), ([4], "")])])[0]
    assert out["WAV_LENS"].ravel().tolist() == [1280, 0, 640]
    assert out["WAV"].shape == (3, 1280)
    assert np.array_equal(out["WAV"][2, :640], standin.tokens_to_wave([4]))
    assert out["ERRORS"].ravel()[1] == b"no speech tokens to synthesize"


def test_asr_model_validates_each_item():
    pipeline = _pipeline(max_wave_seconds=1.0)
    good = standin.tokens_to_wave([5, 6])
    waves = np.zeros((4, 16000 * 2), dtype=np.float32)
    waves[0, : good.size] = good
    waves[2, 0] = np.nan
    request = {"WAV": waves, "WAV_LENS": np.array([[good.size], [0], [10], [32000]], dtype=np.int32),
               "SAMPLE_RATE": np.array([[16000]] * 4, dtype=np.int32)}
    out = pipeline.asr([request])[0]
    assert out["TRANSCRIPTS"].ravel()[0].decode() == standin.tokens_to_text([5, 6])
    errors = [e.decode() for e in out["ERRORS"].ravel()]
    assert errors[0] == "" and "WAV_LENS is 0" in errors[1] and "NaN" in errors[2] and "over the maximum" in errors[3]
    bad_rate = pipeline.asr([{"WAV": waves[:1], "SAMPLE_RATE": np.array([[5]], dtype=np.int32)}])[0]
    assert "SAMPLE_RATE 5" in bad_rate["ERRORS"].ravel()[0].decode()


class _NoNllAsr:
    sample_rate = 16000

    def transcribe(self, waves):
        return [AsrResult("一") for _ in waves]


def test_asr_without_nll_reports_nan_and_confidence_weight_is_an_item_error():
    engines = Engines(token2wav=standin.StandinToken2Wav(), asr=_NoNllAsr())
    pipeline = _pipeline(RewardConfig(weights={"error_rate": 1.0, "confidence": 1.0}), engines=engines)
    out = pipeline.token2wav_asr([_request([([0], "一")])])[0]
    assert "gives no nll" in out["ERRORS"].ravel()[0].decode()

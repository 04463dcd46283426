"""The served computations without a server: batching, per-item isolation, components."""
import math

import numpy as np
import pytest

from token2wav_server import standin
from token2wav_server.engines import AsrResult, EngineOptions, Engines, SpeakerPrompt
from token2wav_server.request_items import ItemError, Limits, parse_text, parse_tokens
from token2wav_server.reward_scoring import RewardConfig
from token2wav_server.serving import Pipeline, Slot
from ttsrl.reward_shaping import error_rate_utility

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
    assert pipeline.slot.engines.token2wav.last_prompts == first and {p.name for p in first} == {"p0", "p1"}
    pipeline.token2wav_asr([request], [{"prompt": "p1"}])
    assert {p.name for p in pipeline.slot.engines.token2wav.last_prompts} == {"p1"}


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
    prompt = pipeline.slot.bank.names[pipeline.slot.bank.choose(np.array([13]))]
    assert out["ERRORS"].ravel()[1].decode() == (f"token2wav failed on request 0 row 1 (1 speech tokens, prompt "
                                                 f"bank:{prompt}) after 1 attempt(s): RuntimeError: kernel exploded")
    assert out["REWARDS"].ravel()[[0, 2]].tolist() == [1.0, 1.0]
    assert math.isnan(out["REWARDS"].ravel()[1])


class _OutOfMemoryToken2Wav(standin.StandinToken2Wav):
    """Runs out of device memory on the first ``failures`` calls that include token 13, as a
    token2wav engine on a full GPU does, then works (the memory was freed meanwhile)."""

    def __init__(self, failures: int, message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
        super().__init__()
        self.failures = failures
        self.message = message
        self.calls_with_13 = 0

    def synthesize(self, token_batch, prompts):
        if any(13 in tokens for tokens in token_batch):
            self.calls_with_13 += 1
            if self.calls_with_13 <= self.failures:
                raise RuntimeError(self.message)
        return super().synthesize(token_batch, prompts)


@pytest.fixture
def quick_backoff(monkeypatch):
    from token2wav_server import serving

    monkeypatch.setattr(serving, "TRANSIENT_BACKOFF_S", 0.001)


def test_out_of_memory_on_one_item_is_retried_until_it_passes(quick_backoff):
    from token2wav_server.serving import TRANSIENT_ATTEMPTS

    # the batch fails, then the item alone fails TRANSIENT_ATTEMPTS - 1 times: the last attempt passes
    engine = _OutOfMemoryToken2Wav(failures=TRANSIENT_ATTEMPTS)
    pipeline = _pipeline(engines=Engines(token2wav=engine, asr=standin.StandinAsr()))
    items = [(standin.text_to_tokens("丁七"), "丁七"), ([13], standin.tokens_to_text([13])),
             (standin.text_to_tokens("万"), "万")]
    out = pipeline.token2wav_asr([_request(items)])[0]
    assert [e.decode() for e in out["ERRORS"].ravel()] == ["", "", ""]
    assert out["REWARDS"].ravel().tolist() == [1.0, 1.0, 1.0]
    assert engine.calls_with_13 == TRANSIENT_ATTEMPTS + 1


def test_out_of_memory_that_persists_names_the_item_and_the_attempts(quick_backoff):
    from token2wav_server.serving import TRANSIENT_ATTEMPTS

    engine = _OutOfMemoryToken2Wav(failures=100)
    pipeline = _pipeline(engines=Engines(token2wav=engine, asr=standin.StandinAsr()))
    voice = standin.tokens_to_wave([1, 2], voice=3)
    request = _prompted_request([[1, 2], [13, 13, 13]], [None, (voice, 16000, "提示")])
    request["GT_TEXT"] = np.array([[standin.tokens_to_text([1, 2]).encode()], ["丏".encode()]], dtype=object)
    out = pipeline.token2wav_asr([request])[0]
    error = out["ERRORS"].ravel()[1].decode()
    from ttsrl.triton_client import speaker_prompt_key

    key = speaker_prompt_key(voice, 16000, "提示")
    assert error == (f"token2wav failed on request 0 row 1 (3 speech tokens, prompt item-{key[:16]}) after "
                     f"{TRANSIENT_ATTEMPTS} attempt(s): RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert math.isnan(out["REWARDS"].ravel()[1]) and out["REWARDS"].ravel()[0] == 1.0  # no made-up score
    assert engine.calls_with_13 == 1 + TRANSIENT_ATTEMPTS  # the batch, then each attempt of the item


def test_a_failure_that_cannot_pass_is_not_retried(quick_backoff):
    engine = _OutOfMemoryToken2Wav(failures=1, message="index out of range")
    pipeline = _pipeline(engines=Engines(token2wav=engine, asr=standin.StandinAsr()))
    out = pipeline.token2wav_asr([_request([([13], "丏")])])[0]
    assert "after 1 attempt(s): RuntimeError: index out of range" in out["ERRORS"].ravel()[0].decode()
    assert engine.calls_with_13 == 1


def test_torch_out_of_memory_error_counts_as_transient():
    from token2wav_server.serving import is_transient

    class OutOfMemoryError(RuntimeError):  # the name torch.cuda.OutOfMemoryError has
        pass

    assert is_transient(OutOfMemoryError("allocation failed"))
    assert is_transient(RuntimeError("CUDA error: out of memory"))
    assert not is_transient(ValueError("bad tokens"))


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

    def transcribe(self, waves, languages=None):
        return [AsrResult("一") for _ in waves]


def test_asr_without_nll_reports_nan_and_confidence_weight_is_an_item_error():
    engines = Engines(token2wav=standin.StandinToken2Wav(), asr=_NoNllAsr())
    pipeline = _pipeline(RewardConfig(weights={"error_rate": 1.0, "confidence": 1.0}), engines=engines)
    out = pipeline.token2wav_asr([_request([([0], "一")])])[0]
    assert "gives no nll" in out["ERRORS"].ravel()[0].decode()


def _prompted_request(items, prompts):
    """token2wav request whose item i has speaker prompt prompts[i] ((wave, rate, text) or None)."""
    from ttsrl.triton_client import pad_rows

    request = _request([(ids, "") for ids in items])
    del request["GT_TEXT"]
    waves, lens = pad_rows([None if p is None else p[0] for p in prompts], np.float32)
    request.update(PROMPT_WAV=waves, PROMPT_WAV_LENS=lens,
                   PROMPT_SAMPLE_RATE=np.array([[0 if p is None else p[1]] for p in prompts], dtype=np.int32),
                   PROMPT_TEXT=np.array([[b"" if p is None else p[2].encode()] for p in prompts], dtype=object))
    return request


def test_each_item_is_decoded_in_its_own_prompt_voice_and_prompts_are_prepared_once():
    from ttsrl.triton_client import speaker_prompt_key

    pipeline = _pipeline()
    engine = pipeline.slot.engines.token2wav
    voice3 = (standin.tokens_to_wave([7, 8], voice=3), standin.SAMPLE_RATE, "提示三")
    voice5 = (standin.tokens_to_wave([9], voice=5), standin.SAMPLE_RATE, "提示五")
    items = [[1, 2], [3], [4, 5, 6], [7]]
    out = pipeline.token2wav([_prompted_request(items, [voice3, voice5, None, voice3])])[0]
    assert [e.decode() for e in out["ERRORS"].ravel()] == [""] * 4
    waves = [out["WAV"][row, :out["WAV_LENS"][row, 0]] for row in range(4)]
    assert [standin.wave_to_tokens(w).tolist() for w in waves] == items  # same words in every voice
    assert [standin.wave_voice(w) for w in waves] == [3, 5, 0, 3]
    ids = [i.decode() for i in out["PROMPT_ID"].ravel()]
    assert ids[0] == ids[3] == speaker_prompt_key(*voice3) and ids[1] == speaker_prompt_key(*voice5)
    assert ids[2] in ("bank:p0", "bank:p1")
    assert engine.prepared_prompts == 2 + 2  # the bank's two at start-up, then each distinct prompt once
    pipeline.token2wav([_prompted_request([[1]], [voice5])])
    assert engine.prepared_prompts == 4 and pipeline.slot.prompt_cache.hits >= 2
    # the speaker embedding of the output follows the prompt
    emb = pipeline.slot.engines.speaker.embed([standin.tokens_to_wave([1, 2], v) for v in (0, 3, 5)])
    assert len({tuple(np.round(row, 6)) for row in emb}) == 3


def test_bad_item_prompts_fail_only_their_item():
    pipeline = _pipeline()
    good = (standin.tokens_to_wave([1], voice=2), standin.SAMPLE_RATE, "好")
    long = (np.full(16000 * 31, 0.1, dtype=np.float32), 16000, "太长")
    untranscribed = (standin.tokens_to_wave([1]), standin.SAMPLE_RATE, "  ")
    low_rate = (np.full(800, 0.1, dtype=np.float32), 8000, "低")
    out = pipeline.token2wav([_prompted_request([[1], [2], [3], [4]], [good, long, untranscribed, low_rate])])[0]
    errors = [e.decode() for e in out["ERRORS"].ravel()]
    assert errors[0] == ""
    assert "31.0 s long, over the maximum of 30 s" in errors[1]
    assert "no transcript" in errors[2]
    assert "sample rate 8000 Hz" in errors[3]
    assert out["WAV_LENS"].ravel().tolist() == [640, 0, 0, 0]  # nothing decoded in another voice
    assert [p.decode() for p in out["PROMPT_ID"].ravel()[1:]] == ["", "", ""]
    missing = _prompted_request([[1]], [good])
    del missing["PROMPT_TEXT"]
    assert "PROMPT_WAV needs PROMPT_TEXT" in pipeline.token2wav([missing])[0]["ERRORS"].ravel()[0].decode()


def test_a_prompt_given_both_ways_fails_its_row_naming_both_fields():
    """A row with its own PROMPT_WAV in a request that also names a bank prompt (parameter 'prompt')
    is refused; a row of that request with PROMPT_WAV_LENS 0 takes the named bank prompt."""
    pipeline = _pipeline()
    own = (standin.tokens_to_wave([1], voice=2), standin.SAMPLE_RATE, "好")
    out = pipeline.token2wav([_prompted_request([[1], [2]], [own, None])], [{"prompt": "p1"}])[0]
    errors = [e.decode() for e in out["ERRORS"].ravel()]
    assert errors[0] == ("the speaker prompt is given both ways: request parameter 'prompt' ('p1', a prompt of the "
                         "bank) and this row's PROMPT_WAV (640 samples); send one (PROMPT_WAV_LENS 0 takes the named "
                         "bank prompt for a row)")
    assert errors[1] == "" and out["PROMPT_ID"].ravel()[1].decode() == "bank:p1"
    assert out["WAV_LENS"].ravel().tolist() == [0, 640]


def test_similarity_to_a_per_item_prompt():
    config = RewardConfig(weights={"error_rate": 1.0, "similarity": 1.0}, rule="harmonic")
    pipeline = _pipeline(config)
    prompt_wave = standin.tokens_to_wave([1, 2, 3], voice=4)
    request = _request([([1, 2, 3], standin.tokens_to_text([1, 2, 3]))])
    request.update(PROMPT_WAV=prompt_wave[None, :], PROMPT_WAV_LENS=np.array([[prompt_wave.size]], dtype=np.int32),
                   PROMPT_SAMPLE_RATE=np.array([[16000]], dtype=np.int32),
                   PROMPT_TEXT=np.array([["提示".encode()]], dtype=object))
    out = pipeline.token2wav_asr([request])[0]
    # same tokens in the prompt's voice: the output equals the prompt audio, similarity 1
    assert out["SPEAKER_SIMILARITY"].ravel()[0] == pytest.approx(1.0, abs=1e-6)
    assert out["ERRORS"].ravel()[0] == b""


def test_utilities_of_the_weighted_components_are_returned():
    from token2wav_server.serving import UTILITY_OUTPUTS

    tokens = [1, 2, 3]
    said_wrong = [1, 2, 4]
    text = standin.tokens_to_text(tokens)
    plain = _pipeline().token2wav_asr([_request([(tokens, text), (said_wrong, text), ([], text)])])[0]
    assert list(UTILITY_OUTPUTS) == ["UTILITY_ERROR_RATE", "UTILITY_SIMILARITY", "UTILITY_CONFIDENCE"]
    assert plain["UTILITY_ERROR_RATE"].ravel().tolist() == pytest.approx([1.0, error_rate_utility(1 / 3), 0.0])
    assert all(math.isnan(v) for name in ("UTILITY_SIMILARITY", "UTILITY_CONFIDENCE") for v in plain[name].ravel())

    config = RewardConfig(weights={"error_rate": 1.0, "similarity": 1.0})
    prompt = standin.tokens_to_wave([7], voice=4)  # another voice than the output's (the bank's, voice 0)
    request = _prompted_request([tokens, tokens, []], [(prompt, 16000, "提示"), None, (prompt, 16000, "提示")])
    request["GT_TEXT"] = np.array([[text.encode()]] * 3, dtype=object)
    out = _pipeline(config).token2wav_asr([request])[0]
    similarity = out["SPEAKER_SIMILARITY"].ravel()
    assert out["UTILITY_SIMILARITY"].ravel()[:2].tolist() == pytest.approx([max(0.0, similarity[0]), similarity[1]])
    assert out["UTILITY_SIMILARITY"].ravel()[2] == 0.0 and out["UTILITY_ERROR_RATE"].ravel()[2] == 0.0  # no tokens
    assert out["REWARDS"].ravel()[0] == pytest.approx((1.0 + max(0.0, similarity[0])) / 2)
    assert math.isnan(out["UTILITY_CONFIDENCE"].ravel()[0])


class _ConstantSpeaker:
    """A speaker model that hears one voice in everything (so its similarity is always 1)."""

    sample_rate = 16000

    def embed(self, waves):
        return np.ones((len(waves), 3), dtype=np.float32)


def test_the_reward_uses_reward_speaker_and_the_speaker_model_stays_the_evaluation_one():
    config = RewardConfig(weights={"error_rate": 1.0, "similarity": 1.0})
    engines = standin.create_engines(EngineOptions())
    engines.reward_speaker = _ConstantSpeaker()
    assert engines.similarity_speaker is engines.reward_speaker
    pipeline = _pipeline(config, engines=engines)
    prompt = standin.tokens_to_wave([7], voice=4)
    request = _prompted_request([[1, 2]], [(prompt, 16000, "提示")])
    request["GT_TEXT"] = np.array([[standin.tokens_to_text([1, 2]).encode()]], dtype=object)
    out = pipeline.token2wav_asr([request])[0]
    assert out["SPEAKER_SIMILARITY"].ravel()[0] == pytest.approx(1.0)  # the constant speaker's, not the stand-in's
    wave = standin.tokens_to_wave([1, 2], voice=3)
    embedding = pipeline.speaker([{"WAV": wave[None, :], "SAMPLE_RATE": np.array([[16000]], dtype=np.int32)}])[0]
    assert np.allclose(embedding["EMBEDDING"][0], standin.StandinSpeaker().embed([wave])[0])
    with pytest.raises(TypeError, match="reward_speaker"):
        Engines(token2wav=standin.StandinToken2Wav(), asr=standin.StandinAsr(), reward_speaker=object())


class _PromptRefusingToken2Wav(standin.StandinToken2Wav):
    def prepare_prompt(self, prompt):
        if prompt.name.startswith("item-"):
            raise ValueError("prompt speech tokenizer failed")
        return super().prepare_prompt(prompt)


def test_a_prompt_the_server_cannot_prepare_fails_its_item_with_the_prompt_named():
    from ttsrl.triton_client import speaker_prompt_key

    pipeline = _pipeline(engines=Engines(token2wav=_PromptRefusingToken2Wav(), asr=standin.StandinAsr()))
    prompt = (standin.tokens_to_wave([7], voice=4), 16000, "提示")
    request = _prompted_request([[1, 2], [3]], [prompt, None])
    request["GT_TEXT"] = np.array([[b"x"], [standin.tokens_to_text([3]).encode()]], dtype=object)
    out = pipeline.token2wav_asr([request])[0]
    error = out["ERRORS"].ravel()[0].decode()
    assert error.startswith(f"preparing the speaker prompt failed on request 0 row 0 (2 speech tokens, prompt "
                            f"item-{speaker_prompt_key(*prompt)[:16]}) after 1 attempt(s): ValueError")
    assert math.isnan(out["REWARDS"].ravel()[0]) and out["REWARDS"].ravel()[1] == 1.0


def test_plugin_outputs_and_target_inputs_exist_only_where_the_preset_weights_them():
    from token2wav_server.reward_scoring import load_reward_config
    from token2wav_server.serving import report_outputs, target_inputs, utility_outputs

    plain = load_reward_config("configs/reward.yaml", "intelligibility")
    assert list(utility_outputs(plain)) == ["UTILITY_ERROR_RATE", "UTILITY_SIMILARITY", "UTILITY_CONFIDENCE"]
    assert report_outputs(plain) == {} and target_inputs(plain) == {}
    assert set(_pipeline(plain).token2wav_asr([_request([([1], "一")])])[0]) == {
        "REWARDS", "TRANSCRIPTS", "ERROR_RATE", "SPEAKER_SIMILARITY", "ASR_NLL", "ERRORS", *utility_outputs(plain)}
    expressive = load_reward_config("configs/reward.yaml", "expressive")
    assert list(utility_outputs(expressive))[3:] == ["UTILITY_QUALITY", "UTILITY_EMOTION"]
    assert report_outputs(expressive) == {"QUALITY_OVRL": "quality_ovrl", "QUALITY_SIG": "quality_sig",
                                          "QUALITY_BAK": "quality_bak", "EMOTION_TARGET_PROB": "emotion_target_prob"}
    assert target_inputs(expressive) == {"TARGET_EMOTION": "emotion"}


def test_a_weighted_plugin_without_an_engine_fails_each_item_naming_it(tmp_path):
    from token2wav_server.reward_scoring import load_reward_config

    config = load_reward_config("configs/reward.yaml", "zero_shot_quality")
    config = RewardConfig(weights={"error_rate": 1.0, "quality": 1.0}, plugins=config.plugins)
    out = _pipeline(config).token2wav_asr([_request([([1, 2], "一丁")])])[0]
    assert out["ERRORS"].ravel()[0] == b"reward component 'quality' is weighted but this server has no engine for it"

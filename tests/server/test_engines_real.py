"""The real ASR engines without downloaded weights: tiny SenseVoiceSmall and Paraformer
directories (ttsrl.tiny_models.asr) run the real FunASR inference path, and
SenseVoice's confidence (NLL of its own transcript) is checked against an independent CTC
computation. (The CosyVoice2 engines on the real CosyVoice code: test_engines_cosyvoice2.py.)"""
import math
import sys

import numpy as np
import pytest

from token2wav_server import engines_cosyvoice2, standin
from token2wav_server.engines import EngineOptions, Engines, SpeakerPrompt
from token2wav_server.engines_sensevoice import FunasrAsr, clean_transcript, paraformer, sensevoice
from token2wav_server.reward_scoring import RewardConfig
from token2wav_server.serving import Pipeline, Slot
from ttsrl.tiny_models.asr import ASR_CORPUS, write_tiny_paraformer, write_tiny_sensevoice
from ttsrl.reward_shaping import error_rate_utility
from ttsrl.scoring import error_rate


@pytest.fixture(scope="module")
def tiny_sensevoice(tmp_path_factory):
    return write_tiny_sensevoice(tmp_path_factory.mktemp("models") / "SenseVoiceSmall", seed=0)


def _noise(seconds, seed):
    return np.random.default_rng(seed).normal(0, 0.1, int(16000 * seconds)).astype(np.float32)


def test_tiny_sensevoice_transcribes_a_batch(tiny_sensevoice):
    # Random weights give arbitrary text; what is checked is the real FunASR path end to end.
    asr = sensevoice(str(tiny_sensevoice), "cpu")
    assert asr.model.kwargs["frontend"].dither == 0.0
    waves = [_noise(1.0, 0), _noise(0.5, 1), _noise(0.3, 2)]
    results = asr.transcribe(waves)
    assert len(results) == 3
    vocabulary = set("".join(ASR_CORPUS) + " ")
    assert all(isinstance(r.text, str) and set(r.text) <= vocabulary for r in results)
    assert all(isinstance(r.nll, float) and math.isfinite(r.nll) and r.nll >= 0 for r in results)
    # No random dither: the same audio always gets the same transcript (and reward).
    tone = standin.tokens_to_wave(standin.text_to_tokens("一丁七万丈三上下" * 3))
    assert len({asr.transcribe([tone])[0].text for _ in range(3)}) == 1
    assert asr.transcribe([]) == []


def _language_queries(asr):
    """The language ids SenseVoice's decoder receives: its ``embed`` reads the language query
    first, then the text-norm query, then the event/emotion query, per inference call."""
    inner = asr.model.model
    seen = []
    inner.embed.register_forward_hook(lambda _m, args, _out: seen.append(args[0].flatten().tolist()))
    ids = {index: name for name, index in inner.lid_dict.items()}

    def queries():
        return [ids[s[0]] for s in seen[0::3]]
    return queries


def test_sensevoice_hears_each_waves_language(tiny_sensevoice):
    asr = FunasrAsr(str(tiny_sensevoice), "cpu")
    heard = _language_queries(asr)
    waves = [_noise(0.6, k) for k in range(5)]
    results = asr.transcribe(waves, ["en", "zh", "en", "ja", "yue"])
    assert heard() == ["en", "zh", "ja", "yue"]  # one call per language, in first-seen order
    # each transcript is the one its wave gets alone in its language: the batch is put back in order
    alone = [asr.transcribe([w], [x])[0] for w, x in zip(waves, ["en", "zh", "en", "ja", "yue"])]
    assert [(r.text, round(r.nll, 5)) for r in results] == [(r.text, round(r.nll, 5)) for r in alone]
    asr.transcribe(waves[:1])
    assert heard()[-1] == "auto"  # no language given: SenseVoice's own identification, never forced to zh
    with pytest.raises(ValueError, match="fr"):
        asr.transcribe(waves[:1], ["fr"])


def test_the_reward_and_the_asr_model_pass_each_items_language_to_sensevoice(tiny_sensevoice):
    asr = FunasrAsr(str(tiny_sensevoice), "cpu")
    heard = _language_queries(asr)
    engines = Engines(token2wav=standin.StandinToken2Wav(), asr=asr)
    prompt = SpeakerPrompt("silence", np.zeros(16000, dtype=np.float32), 16000, "")
    pipeline = Pipeline(Slot(engines, [prompt]), RewardConfig())
    ids = standin.text_to_tokens("一丁七万丈三上下")
    request = {"TOKENS": np.array([ids, ids, ids], dtype=np.int32),
               "TOKEN_LENS": np.array([[len(ids)]] * 3, dtype=np.int32),
               "GT_TEXT": np.array([["今天天气不错".encode()], [b"good weather"], ["今日は".encode()]], dtype=object),
               "LANGUAGE": np.array([[b"zh"], [b"en-US"], [b"ja"]], dtype=object)}
    out = pipeline.token2wav_asr([request])[0]
    assert list(out["ERRORS"].ravel()) == [b"", b"", b""]
    assert heard()[-3:] == ["zh", "en", "ja"]
    # the asr model (evaluation): each item's LANGUAGE, auto where it is empty; a bad one names the row
    waves = np.stack([_noise(0.5, 7), _noise(0.5, 8), _noise(0.5, 9)])
    asr_request = {"WAV": waves, "SAMPLE_RATE": np.array([[16000]] * 3, dtype=np.int32),
                   "LANGUAGE": np.array([[b"ko"], [b""], [b"klingon"]], dtype=object)}
    asr_out = pipeline.asr([asr_request])[0]
    assert heard()[-2:] == ["ko", "auto"]
    errors = [e.decode() for e in asr_out["ERRORS"].ravel()]
    assert errors[:2] == ["", ""] and "klingon" in errors[2]


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


def _ctc_forward_nll(log_probs: np.ndarray, targets: list, blank: int) -> float:
    """-log sum over CTC alignments of ``targets`` (the textbook forward recursion, numpy)."""
    extended = [blank]
    for token in targets:
        extended += [token, blank]
    alpha = np.full(len(extended), -np.inf)
    alpha[0] = log_probs[0, blank]
    if len(extended) > 1:
        alpha[1] = log_probs[0, extended[1]]
    for frame in range(1, log_probs.shape[0]):
        previous = alpha.copy()
        for s, token in enumerate(extended):
            terms = [previous[s]] + ([previous[s - 1]] if s >= 1 else [])
            if s >= 2 and token != blank and token != extended[s - 2]:
                terms.append(previous[s - 2])
            alpha[s] = np.logaddexp.reduce(terms) + log_probs[frame, token]
    return -float(np.logaddexp.reduce(alpha[-2:] if len(extended) > 1 else alpha[-1:]))


def test_sensevoice_nll_is_the_ctc_likelihood_of_its_own_transcript(tiny_sensevoice):
    """The engine's nll equals an independent computation on the log-probabilities FunASR's
    own decoding used (recorded from ``ctc.log_softmax`` during the same kind of call)."""
    asr = sensevoice(str(tiny_sensevoice), "cpu")
    inner = asr.model.model
    recorded = []
    original = inner.ctc.log_softmax
    inner.ctc.log_softmax = lambda hs: recorded.append(original(hs)) or recorded[-1]
    try:
        waves = [_noise(0.8, 5), standin.tokens_to_wave(standin.text_to_tokens("一丁七万丈三上下"))]
        results = [asr.transcribe([wave])[0] for wave in waves]
    finally:
        inner.ctc.log_softmax = original
    assert len(recorded) == 2
    token_counts = []
    for result, log_probs in zip(results, recorded):
        speech = log_probs[0, 4:].double().numpy()  # after SenseVoice's 4 query frames
        path = speech.argmax(axis=1)
        collapsed = [int(t) for i, t in enumerate(path) if i == 0 or t != path[i - 1]]
        targets = [t for t in collapsed if t != inner.blank_id]
        expected = _ctc_forward_nll(speech, targets, inner.blank_id) / max(1, len(targets))
        assert math.isfinite(result.nll)
        assert result.nll == pytest.approx(expected, rel=1e-4)
        token_counts.append(len(targets))
    assert max(token_counts) >= 2  # a transcript with repeats and blanks between tokens was checked


def test_confidence_component_works_with_sensevoice(tiny_sensevoice):
    asr = sensevoice(str(tiny_sensevoice), "cpu")
    engines = Engines(token2wav=standin.StandinToken2Wav(), asr=asr)
    prompt = SpeakerPrompt("silence", np.zeros(16000, dtype=np.float32), 16000, "")
    config = RewardConfig(weights={"error_rate": 1.0, "confidence": 1.0})
    pipeline = Pipeline(Slot(engines, [prompt]), config)
    ids = standin.text_to_tokens("一丁七万丈三上下")
    request = {"TOKENS": np.array([ids], dtype=np.int32), "TOKEN_LENS": np.array([[len(ids)]], dtype=np.int32),
               "GT_TEXT": np.array([["今天天气不错".encode()]], dtype=object)}
    out = pipeline.token2wav_asr([request])[0]
    assert out["ERRORS"].ravel()[0] == b""
    assert math.isfinite(out["ASR_NLL"].ravel()[0]) and out["ASR_NLL"].ravel()[0] >= 0
    assert 0.0 <= out["REWARDS"].ravel()[0] <= 1.0


def test_tiny_paraformer_transcribes_without_nll(tmp_path):
    asr = paraformer(str(write_tiny_paraformer(tmp_path / "paraformer-zh", seed=0)), "cpu")
    results = asr.transcribe([_noise(1.0, 3), _noise(0.4, 4)])
    assert len(results) == 2 and all(set(r.text) <= set("".join(ASR_CORPUS) + " ") for r in results)
    assert all(r.nll is None for r in results)


def test_missing_model_directories_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--sensevoice-dir"):
        sensevoice(None)
    with pytest.raises(FileNotFoundError, match="--cosyvoice2-dir .*not a directory"):
        engines_cosyvoice2.check_cosyvoice2_dir(str(tmp_path / "nope"))
    (tmp_path / "cv2").mkdir()
    (tmp_path / "cv2" / "flow.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks cosyvoice2.yaml \(the model's hyperpyyaml config\);.*hift.pt"):
        engines_cosyvoice2.check_cosyvoice2_dir(str(tmp_path / "cv2"))
    (tmp_path / "sv").mkdir()
    (tmp_path / "sv" / "config.yaml").write_text("model: SenseVoiceSmall\n")
    with pytest.raises(FileNotFoundError, match=r"--sensevoice-dir .*sv lacks model.pt \(the model weights\)"):
        sensevoice(str(tmp_path / "sv"))


def test_cosyvoice2_factory_explains_a_missing_cosyvoice_checkout(tmp_path, tiny_sensevoice, monkeypatch):
    model_dir = tmp_path / "CosyVoice2-0.5B"
    for name in [*engines_cosyvoice2.REQUIRED_FILES, engines_cosyvoice2.QWEN2_WEIGHTS[0]]:
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / name).write_bytes(b"")
    # As if no checkout were on PYTHONPATH (other tests of the session may have imported it).
    for name in ["cosyvoice", *(m for m in list(sys.modules) if m.startswith("cosyvoice."))]:
        monkeypatch.setitem(sys.modules, name, None)
    options = EngineOptions(device="cpu", cosyvoice2_dir=str(model_dir), sensevoice_dir=str(tiny_sensevoice))
    with pytest.raises(ImportError, match="put the CosyVoice source .* on PYTHONPATH"):
        engines_cosyvoice2.create_engines(options)

"""The ``emotion`` reward component (token2wav_server/engines_emotion2vec.py): FunASR's real
Emotion2vec code on a tiny random model of the emotion2vec+ architecture that the test builds,
alone and inside the serving pipeline with per-item targets."""
import math

import numpy as np
import pytest

from token2wav_server import standin
from token2wav_server.engines import EngineOptions, SpeakerPrompt
from token2wav_server.engines_emotion2vec import MODEL_OPTION, Emotion2vecEmotion, create_engine
from token2wav_server.request_items import Limits
from token2wav_server.reward_scoring import load_reward_config
from token2wav_server.serving import Pipeline, Slot
from ttsrl.tiny_models.emotion2vec import EMOTION2VEC_PLUS_LABELS, write_tiny_emotion2vec

RNG = np.random.default_rng(0)
WAVES = [0.1 * RNG.standard_normal(16000).astype(np.float32), 0.05 * RNG.standard_normal(12000).astype(np.float32)]


@pytest.fixture(scope="module")
def tiny_emotion2vec(tmp_path_factory):
    return write_tiny_emotion2vec(tmp_path_factory.mktemp("e2v") / "emotion2vec_plus_tiny", seed=0)


@pytest.fixture(scope="module")
def engine(tiny_emotion2vec):
    return create_engine(EngineOptions(extra={MODEL_OPTION: str(tiny_emotion2vec)}))


def test_target_probability_is_the_models_own_score(engine):
    results = engine.score(WAVES, ["happy", None])
    own = engine.model.generate([WAVES[0]], granularity="utterance", extract_embedding=False, disable_pbar=True)[0]
    assert own["labels"][3] == "开心/happy"
    assert results[0]["emotion_target_prob"] == pytest.approx(own["scores"][3], abs=1e-6)
    assert 0.0 < results[0]["emotion_target_prob"] < 1.0
    assert math.isnan(results[1]["emotion_target_prob"])  # no target: nothing measured
    sad = engine.score(WAVES[:1], ["SAD"])[0]["emotion_target_prob"]
    assert sad == pytest.approx(own["scores"][6], abs=1e-6)
    with pytest.raises(ValueError, match=r"item 1: emotion 'bored' is not one the emotion model knows"):
        engine.score(WAVES, ["happy", "bored"])


def test_a_model_without_the_target_labels_is_refused(tmp_path):
    directory = write_tiny_emotion2vec(tmp_path / "m", labels=EMOTION2VEC_PLUS_LABELS[:4] + ("<unk>",))
    with pytest.raises(ValueError, match=r"does not know the emotions \['neutral', 'other', 'sad', 'surprised'\]"):
        Emotion2vecEmotion(str(directory))


def test_pipeline_scores_emotion_where_items_carry_a_target(engine, tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("components: {emotion: token2wav_server.engines_emotion2vec}\n"
                    "weights: {error_rate: 1.0, emotion: 1.0}\n", encoding="utf-8")
    config = load_reward_config(str(path))
    engines = standin.create_engines(EngineOptions())
    engines.components["emotion"] = engine
    prompts = [SpeakerPrompt("p0", standin.tokens_to_wave([1, 2, 3]), standin.SAMPLE_RATE, "p0")]
    pipeline = Pipeline(Slot(engines, prompts), config, Limits())
    ids = standin.text_to_tokens("一丁七万") * 6  # 24 tokens: about 1 s of stand-in audio
    request = {"TOKENS": np.array([ids, ids, ids], dtype=np.int32),
               "TOKEN_LENS": np.array([[len(ids)]] * 3, dtype=np.int32),
               "GT_TEXT": np.array([["一丁七万".encode() * 6]] * 3, dtype=object),
               "TARGET_EMOTION": np.array([[b"happy"], [b""], [b"bored"]], dtype=object)}
    out = pipeline.token2wav_asr([request])[0]
    errors = [e.decode() for e in out["ERRORS"].reshape(-1)]
    assert errors[:2] == ["", ""]
    assert "reward component emotion failed on request 0 row 2" in errors[2] and "'bored'" in errors[2]
    utility = out["UTILITY_EMOTION"].reshape(-1)
    wave = standin.tokens_to_wave(ids)
    expected = engine.score([wave], ["happy"])[0]["emotion_target_prob"]
    assert utility[0] == pytest.approx(expected, abs=1e-5)
    assert out["EMOTION_TARGET_PROB"].reshape(-1)[0] == pytest.approx(expected, abs=1e-5)
    assert out["REWARDS"].reshape(-1)[0] == pytest.approx((1.0 + expected) / 2, abs=1e-5)
    assert math.isnan(utility[1]) and out["REWARDS"].reshape(-1)[1] == pytest.approx(1.0)  # no target: left out
    assert math.isnan(out["REWARDS"].reshape(-1)[2])

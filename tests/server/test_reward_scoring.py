"""Reward config parsing and per-item scores."""
import math

import pytest

from token2wav_server.reward_scoring import (RewardConfig, RewardConfigError, load_reward_config, minimum_score,
                                        score_item)
from ttsrl.reward_shaping import confidence_utility, error_rate_utility
from ttsrl.scoring import EmptyReferenceError


def test_repository_config_loads_its_presets():
    config = load_reward_config("configs/reward.yaml")  # the default preset: intelligibility
    assert config == load_reward_config("configs/reward.yaml", "intelligibility")
    assert config.weights == {"error_rate": 1.0, "similarity": 0.0, "confidence": 0.0}
    assert (config.beta, config.rule, config.metric) == (3.0, "arithmetic", "pinyin")
    zero_shot = load_reward_config("configs/reward.yaml", "zero_shot")
    assert zero_shot.weights == {"error_rate": 1.0, "similarity": 1.0, "confidence": 0.0}
    assert (zero_shot.beta, zero_shot.rule, zero_shot.metric) == (3.0, "arithmetic", "pinyin")


def test_unknown_preset_names_the_file_the_name_and_the_known_presets():
    with pytest.raises(RewardConfigError) as error:
        load_reward_config("configs/reward.yaml", "zeroshot")
    assert str(error.value) == ("configs/reward.yaml: unknown reward preset 'zeroshot'; known presets: "
                                "['expressive', 'intelligibility', 'zero_shot', 'zero_shot_quality']")


def test_a_flat_file_still_loads_and_refuses_a_preset(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("beta: 2.0\nweights: {error_rate: 1.0, confidence: 0.5}\n", encoding="utf-8")
    config = load_reward_config(str(path))
    assert (config.beta, config.weights) == (2.0, {"error_rate": 1.0, "confidence": 0.5})
    with pytest.raises(RewardConfigError, match="has no presets, so reward preset 'zero_shot' cannot be chosen"):
        load_reward_config(str(path), "zero_shot")


@pytest.mark.parametrize("text, message", [
    ("preset: a\npresets: {a: {beta: 2}}\nbeta: 3", r"key\(s\) \['beta'\] next to 'presets'"),
    ("preset: a\nbeta: 3", "'preset: a' but no 'presets' mapping"),
    ("presets: {a: {beta: 2}}", "no default 'preset' and none chosen"),
    ("preset: a\npresets: []", "'presets' must be a non-empty mapping"),
    ("preset: a\npresets: {a: {weights: {error_rate: 0}}}", "preset 'a': weights: at least one component"),
    ("preset: a\npresets: {a: {betta: 2}}", "preset 'a': unknown key"),
    ("preset: a\npresets: {a: 3}", "preset 'a': expected a mapping of settings"),
])
def test_bad_presets_name_the_problem(tmp_path, text, message):
    path = tmp_path / "reward.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RewardConfigError, match=message):
        load_reward_config(str(path))


@pytest.mark.parametrize("text, message", [
    ("weights: {error_rate: 1, pesq: 1}", "unknown component"),
    ("weights: {error_rate: -1}", "weights.error_rate: must be a non-negative number"),
    ("weights: {error_rate: 0}", "at least one component"),
    ("rule: geometric", "rule: 'geometric'"),
    ("metric: wer", "metric: 'wer'"),
    ("beta: 0", "beta: must be a positive number"),
    ("betta: 3", "unknown key"),
    ("weights: [1, 2]", "'weights' must be a mapping"),
    ("- a\n- b", "expected a mapping"),
    ("a: [", "not valid YAML"),
])
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "reward.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RewardConfigError, match=message):
        load_reward_config(str(path))


def test_missing_config_file():
    with pytest.raises(RewardConfigError, match="not found"):
        load_reward_config("no/such.yaml")


def test_score_item_arithmetic_and_harmonic():
    config = RewardConfig()
    assert score_item(config, "一丁七万", "一丁七万").reward == 1.0
    wrong = score_item(config, "一丁七万", "一丁七三")
    assert (wrong.error_rate, wrong.reward) == (0.25, pytest.approx(error_rate_utility(0.25)))
    assert math.isnan(wrong.similarity) and math.isnan(wrong.nll)  # weight 0: not computed

    both = {"error_rate": 1.0, "confidence": 1.0}
    arithmetic = score_item(RewardConfig(weights=both), "一丁七万", "一丁七三", nll=0.5)
    harmonic = score_item(RewardConfig(weights=both, rule="harmonic"), "一丁七万", "一丁七三", nll=0.5)
    u1, u2 = error_rate_utility(0.25), confidence_utility(0.5)
    assert arithmetic.reward == pytest.approx((u1 + u2) / 2)
    assert harmonic.reward == pytest.approx(2 / (1 / u1 + 1 / u2))
    assert arithmetic.nll == 0.5


def test_weighted_component_without_a_value_and_empty_reference():
    with pytest.raises(ValueError, match="no speaker engine"):
        score_item(RewardConfig(weights={"error_rate": 1, "similarity": 1}), "一", "一")
    with pytest.raises(ValueError, match="gives no nll"):
        score_item(RewardConfig(weights={"confidence": 1}), "一", "一")
    with pytest.raises(EmptyReferenceError):
        score_item(RewardConfig(), "。。", "一")


def test_minimum_score():
    plain = minimum_score(RewardConfig())
    assert (plain.reward, plain.error_rate) == (0.0, 1.0) and math.isnan(plain.similarity)
    assert plain.utilities == {"error_rate": 0.0} and math.isnan(plain.utility("similarity"))
    full = minimum_score(RewardConfig(weights={"error_rate": 1, "similarity": 1, "confidence": 1}))
    assert full.similarity == 0.0 and full.nll == math.inf
    assert full.utilities == {"error_rate": 0.0, "similarity": 0.0, "confidence": 0.0}


def test_utilities_are_those_of_the_weighted_components():
    config = RewardConfig(weights={"error_rate": 1.0, "similarity": 2.0})
    item = score_item(config, "一丁七万", "一丁七三", similarity=0.5)
    assert item.utilities == {"error_rate": pytest.approx(error_rate_utility(0.25)), "similarity": 0.5}
    assert item.reward == pytest.approx((error_rate_utility(0.25) + 2 * 0.5) / 3)
    assert math.isnan(item.utility("confidence"))
    negative = score_item(config, "一", "一", similarity=-0.3)
    assert negative.utilities["similarity"] == 0.0 and negative.similarity == -0.3
    only_confidence = score_item(RewardConfig(weights={"confidence": 1.0}), "一", "丁", nll=0.0)
    assert only_confidence.utilities == {"confidence": 1.0}  # the error rate is measured, not weighted
    assert only_confidence.error_rate == 1.0


def test_score_item_picks_the_metric_of_the_language():
    config = RewardConfig()  # metric pinyin
    # homophones: no pinyin error for zh (and for no language, as before), one character of four for ja
    assert score_item(config, "他一丁七", "她一丁七").error_rate == 0.0
    assert score_item(config, "他一丁七", "她一丁七", language="zh").error_rate == 0.0
    assert score_item(config, "他一丁七", "她一丁七", language="ja").error_rate == pytest.approx(0.25)
    english = score_item(config, "The cat sat down.", "the cat sat up", language="en")
    assert (english.error_rate, english.reward) == (pytest.approx(0.25), pytest.approx(error_rate_utility(0.25)))
    with pytest.raises(ValueError, match="'xx'"):
        score_item(config, "一", "一", language="xx")


def test_normalize_english_agrees_with_whisper():
    """Only the server environment has openai-whisper (pinned there): our English rules give its
    EnglishTextNormalizer's output on every case of tests/ttsrl/test_text_norm.py."""
    from whisper.normalizers import EnglishTextNormalizer

    from tests.ttsrl.test_text_norm import ENGLISH_CASES
    from ttsrl.text_norm import normalize_english

    whisper = EnglishTextNormalizer()
    for text, _ in ENGLISH_CASES:
        assert normalize_english(text) == whisper(text), text


# ---- plug-in components ----------------------------------------------------------------------
QUALITY_FILE = """components:
  quality: token2wav_server.engines_dnsmos
presets:
  q: {weights: {error_rate: 1.0, quality: 1.0}}
  plain: {weights: {error_rate: 1.0}}
"""


def test_plugin_component_is_weighted_scored_and_reported(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text(QUALITY_FILE, encoding="utf-8")
    config = load_reward_config(str(path), "q")
    assert config.components == ("error_rate", "similarity", "confidence", "quality")
    assert list(config.weighted_plugins()) == ["quality"]
    assert load_reward_config(str(path), "plain").weighted_plugins() == {}
    values = {"quality_ovrl": 3.0, "quality_sig": 3.5, "quality_bak": 4.0}
    score = score_item(config, "一丁", "一丁", component_values={"quality": values})
    assert score.utilities == {"error_rate": 1.0, "quality": 0.5}  # (3 - 1) / 4
    assert score.reward == pytest.approx(0.75)
    assert score.reports == values
    assert score_item(config, "一丁", "一丁", component_values={"quality": {**values, "quality_ovrl": 6.0}}
                      ).utility("quality") == 1.0  # clipped to [0, 1]
    with pytest.raises(ValueError, match="'quality' has a weight but its engine gave no value"):
        score_item(config, "一丁", "一丁")
    assert minimum_score(config).utilities == {"error_rate": 0.0, "quality": 0.0}


@pytest.mark.parametrize("text,message", [
    ("weights: {error_rate: 1.0, qualty: 1.0}\n",
     "unknown component(s) ['qualty']; known components: ['error_rate', 'similarity', 'confidence']"),
    ("components: {quality: token2wav_server.engines_dnsmos}\nweights: {error_rate: 1.0, qualty: 1.0}\n",
     "known components: ['error_rate', 'similarity', 'confidence', 'quality']"),
    ("components: {quality: no_such_module_here}\nweights: {error_rate: 1.0}\n",
     "components.quality: cannot import no_such_module_here"),
    ("components: {quality: token2wav_server.standin}\nweights: {error_rate: 1.0}\n",
     "components.quality: token2wav_server.standin has no COMPONENT = ComponentSpec(name='quality'"),
    ("components: {similarity: token2wav_server.engines_dnsmos}\nweights: {error_rate: 1.0}\n",
     "'similarity' is a built-in component"),
    ("components: [quality]\nweights: {error_rate: 1.0}\n", "'components' must be a mapping"),
])
def test_bad_plugin_components_name_the_problem(tmp_path, text, message):
    path = tmp_path / "reward.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RewardConfigError) as error:
        load_reward_config(str(path))
    assert message in str(error.value)

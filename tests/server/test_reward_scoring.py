"""Reward config parsing and per-item scores."""
import math

import pytest

from token2wav_server.reward_scoring import (RewardConfig, RewardConfigError, load_reward_config, minimum_score,
                                        score_item)
from ttsrl.reward_shaping import confidence_utility, error_rate_utility
from ttsrl.scoring import EmptyReferenceError


def test_repository_config_loads():
    config = load_reward_config("configs/reward.yaml")
    assert config.weights == {"error_rate": 1.0, "similarity": 0.0, "confidence": 0.0}
    assert (config.beta, config.rule, config.metric) == (3.0, "arithmetic", "pinyin")


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
    full = minimum_score(RewardConfig(weights={"error_rate": 1, "similarity": 1, "confidence": 1}))
    assert full.similarity == 0.0 and full.nll == math.inf

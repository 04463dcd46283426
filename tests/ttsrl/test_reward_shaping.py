import math

import pytest

from ttsrl.reward_shaping import combine, confidence_utility, error_rate_utility, similarity_utility


def test_error_rate_utility_matches_reference_formula():
    assert error_rate_utility(0.0) == 1.0
    assert error_rate_utility(0.1) == pytest.approx(1 - math.tanh(0.3))
    assert error_rate_utility(0.1, beta=5) == pytest.approx(1 - math.tanh(0.5))
    assert error_rate_utility(5.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        error_rate_utility(-0.1)
    with pytest.raises(ValueError):
        error_rate_utility(0.1, beta=0)


def test_other_utilities():
    assert confidence_utility(0.0) == 1.0 and confidence_utility(2.0, tau=2.0) == pytest.approx(math.exp(-1))
    assert similarity_utility(-0.3) == 0.0 and similarity_utility(0.7) == 0.7


def test_combination_rules():
    utilities = {"cer": 0.8, "sim": 0.4, "nll": 0.0}
    weights = {"cer": 3.0, "sim": 1.0, "nll": 0.0}
    assert combine(utilities, weights, "arithmetic") == pytest.approx((3 * 0.8 + 0.4) / 4)
    assert combine(utilities, weights, "harmonic") == pytest.approx(4 / (3 / 0.8 + 1 / 0.4))
    assert combine({"cer": 0.0, "sim": 1.0}, {"cer": 1, "sim": 1}, "harmonic") == 0.0
    # a weight-0 component needs no value
    assert combine({"cer": 0.5}, {"cer": 1.0, "sim": 0.0}) == 0.5


@pytest.mark.parametrize("utilities,weights,message", [
    ({"cer": 0.5}, {"cer": 0.0}, "all reward weights are 0"),
    ({"cer": 0.5}, {"cer": -1.0}, "negative"),
    ({}, {"cer": 1.0}, "no value"),
    ({"cer": 1.5}, {"cer": 1.0}, "outside"),
])
def test_combination_errors(utilities, weights, message):
    with pytest.raises(ValueError, match=message):
        combine(utilities, weights)
    with pytest.raises(ValueError, match="unknown combination rule"):
        combine({"cer": 1.0}, {"cer": 1.0}, "geometric")

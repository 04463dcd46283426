"""Reward shaping: per-component utilities in [0, 1] and their combination.

The pieces come from the recipes we build on: ``1 - tanh(beta * error_rate)``
for intelligibility (seed 000, beta = 3), ``exp(-nll / tau)`` for ASR
confidence, and a weighted harmonic mean of utilities (seed 001), which drops
sharply when any single component is bad, unlike the weighted arithmetic mean.
"""
from __future__ import annotations

import math
from typing import Mapping

COMBINATION_RULES = ("arithmetic", "harmonic")


def error_rate_utility(error_rate: float, beta: float = 3.0) -> float:
    """``1 - tanh(beta * error_rate)`` clipped to [0, 1]; 0 error -> 1."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if error_rate < 0 or math.isnan(error_rate):
        raise ValueError(f"error rate must be a non-negative number, got {error_rate}")
    return min(1.0, max(0.0, 1.0 - math.tanh(beta * error_rate)))


def confidence_utility(nll: float, tau: float = 1.0) -> float:
    """``exp(-nll / tau)``: mean per-token negative log-likelihood of the ASR -> [0, 1]."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if nll < 0 or math.isnan(nll):
        raise ValueError(f"nll must be a non-negative number, got {nll}")
    return math.exp(-nll / tau)


def similarity_utility(cosine: float) -> float:
    """Speaker cosine similarity in [-1, 1] -> [0, 1] (negative similarity is 0)."""
    if math.isnan(cosine):
        raise ValueError("speaker similarity is NaN")
    return min(1.0, max(0.0, cosine))


def combine(utilities: Mapping[str, float], weights: Mapping[str, float], rule: str = "arithmetic") -> float:
    """Combine component utilities (each in [0, 1]) with non-negative weights.

    Components with weight 0 are left out (callers need not compute them).
    ``arithmetic``: sum(w * u) / sum(w). ``harmonic``: sum(w) / sum(w / u),
    which is 0 when any weighted utility is 0.
    """
    if rule not in COMBINATION_RULES:
        raise ValueError(f"unknown combination rule {rule!r}; expected one of {COMBINATION_RULES}")
    active = {name: w for name, w in weights.items() if w != 0}
    if not active:
        raise ValueError("all reward weights are 0")
    for name, w in active.items():
        if w < 0:
            raise ValueError(f"reward weight of {name!r} is negative ({w})")
        if name not in utilities:
            raise ValueError(f"reward component {name!r} has weight {w} but no value")
        u = utilities[name]
        if not 0.0 <= u <= 1.0:
            raise ValueError(f"utility of {name!r} is {u}, outside [0, 1]")
    total = sum(active.values())
    if rule == "arithmetic":
        return sum(w * utilities[name] for name, w in active.items()) / total
    if any(utilities[name] == 0.0 for name in active):
        return 0.0
    return total / sum(w / utilities[name] for name, w in active.items())

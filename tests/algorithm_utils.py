"""The advantage estimators of the algorithm presets, written out from their definitions (numpy), so
tests can check what veRL computed in our runs against what each algorithm says it computes."""
from __future__ import annotations

import numpy as np


def group_normalized(values, groups, divide_by_std: bool = True, epsilon: float = 1e-6) -> np.ndarray:
    """(value - group mean) / (group std + epsilon), the std unbiased (GRPO); without dividing: Dr.GRPO."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    out = np.zeros_like(values)
    for group in dict.fromkeys(groups.tolist()):
        members = groups == group
        centered = values[members] - values[members].mean()
        if divide_by_std:
            std = values[members].std(ddof=1) if members.sum() > 1 else 1.0
            centered = centered / (std + epsilon)
        out[members] = centered
    return out


def gdpo(utilities: dict[str, list], weights: dict[str, float], groups, response_tokens) -> np.ndarray:
    """GDPO: each component normalized within its group, summed with its weight, then whitened over the
    batch's response tokens (mean and unbiased variance over tokens: a response counts once per token)."""
    summed = sum(weights[name] * group_normalized(values, groups) for name, values in utilities.items())
    tokens = np.asarray(response_tokens, dtype=np.float64)
    mean = (summed * tokens).sum() / tokens.sum()
    variance = ((summed - mean) ** 2 * tokens).sum() / tokens.sum() * tokens.sum() / (tokens.sum() - 1)
    return (summed - mean) / np.sqrt(variance + 1e-8)

"""The batched-flow check both families' token2wav tests make."""
from __future__ import annotations

import torch


def assert_batched_flow_matches_serial(token2wav, batch: list, prompts: list) -> None:
    """Mels of ``batch`` decoded one by one and as one padded batch (``flow_batch``) are the same.

    Tolerance 1e-4: far above float32 rounding (measured under 1e-6 on mels of magnitude ~4), far
    below what a padding leak into the real frames (wrong mask, noise or prompt offset) changes."""
    serial = token2wav.mels(batch, prompts)
    token2wav.flow_batch = True
    try:
        batched = token2wav.mels(batch, prompts)
    finally:
        token2wav.flow_batch = False
    for one, many, tokens in zip(serial, batched, batch):
        assert one.shape == many.shape == (1, 80, 2 * len(tokens))
        torch.testing.assert_close(many, one, rtol=0, atol=1e-4)
        assert one.abs().max() > 1.0  # the comparison is not between near-zero mels

"""What the Hugging Face form of CosyVoice2's LLM changes, measured on tiny models.

The conversion drops ``llm_decoder.bias`` (transformers' Qwen2 lm_head has none)
and gives every non-speech token a logit of 0. For tiny CosyVoice2-shaped
models (ttsrl.tiny_models.llm) with speech-logit spread ``logit_std``
and bias spread ``bias_std``, this converts each one and runs
``measure_conversion`` of ttsrl.policy.conversion_bias (positions CosyVoice2
itself visits: 3 sentences x 50 steps sampled top-k 25 from the biased
original), then prints one row per model.
The same measurement on the real model: ``convert_cosyvoice2_to_hf.py --measure``.

    .venv/bin/python benchmarks/bench_conversion_bias.py [--seeds 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRID = [(4.0, 0.03), (4.0, 0.1), (4.0, 0.3), (4.0, 0.5), (4.0, 1.0), (3.0, 0.0), (5.0, 0.0), (6.0, 0.0)]


def measure(logit_std: float, bias_std: float, seed: int, workdir: Path) -> dict:
    from ttsrl.policy.conversion_bias import measure_converted
    from ttsrl.policy.hf_conversion import LLM_PT, convert_cosyvoice2
    from ttsrl.tiny_models.llm import write_tiny_cosyvoice2

    source = write_tiny_cosyvoice2(workdir / f"m{logit_std}_{bias_std}_{seed}", seed=seed, logit_std=logit_std,
                                   bias_std=bias_std)
    return measure_converted(convert_cosyvoice2(source), source / LLM_PT, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="models per grid point (results averaged)")
    args = parser.parse_args(argv)
    keys = ["kl_bias_mean", "kl_bias_max", "kl_total_mean", "max_abs_logprob_diff", "bias_bound",
            "top1_agreement", "nonspeech_mass_mean", "nonspeech_mass_max"]
    print("| logit_std | bias_std | " + " | ".join(keys) + " |")
    print("|" + " --- |" * (len(keys) + 2))
    with tempfile.TemporaryDirectory() as tmp:
        for logit_std, bias_std in GRID:
            rows = [measure(logit_std, bias_std, seed, Path(tmp)) for seed in range(args.seeds)]
            means = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
            means["kl_bias_max"] = max(r["kl_bias_max"] for r in rows)
            means["nonspeech_mass_max"] = max(r["nonspeech_mass_max"] for r in rows)
            print(f"| {logit_std} | {bias_std} | " + " | ".join(f"{means[k]:.3g}" for k in keys) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

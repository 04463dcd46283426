"""The recipe's sampling of speech tokens: one home for temperature, top-p and top-k.

Training samples its rollouts (and validation) with ``actor_rollout_ref.rollout`` of
``configs/grpo.yaml``; evaluation (``infer_dist.py``) and synthesis
(``scripts/synthesize.py``) must sample the same way, or stage 4 would score a policy
decoded differently from the one GRPO optimized. So the values are written once, in
that YAML (validation refers to them with YAML aliases), and this module reads them
from there for everything else. A ``--temperature``/``--top-p``/``--top-k`` flag or a
veRL override still changes one run.

PyYAML only: both environments import it.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

GRPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "grpo.yaml"
ROLLOUT_KEYS = ("actor_rollout_ref", "rollout")
MAX_NEW_TOKENS = 1000
"""Evaluation's limit on generated speech tokens: 40 s at 25 tokens/s."""


class SamplingConfigError(ValueError):
    """configs/grpo.yaml does not say how rollouts are sampled."""


@dataclasses.dataclass(frozen=True)
class RecipeSampling:
    temperature: float
    top_p: float
    top_k: int


@functools.lru_cache(maxsize=4)
def recipe_sampling(config: str | Path = GRPO_CONFIG) -> RecipeSampling:
    """Temperature, top-p and top-k of the training rollouts in ``config``."""
    import yaml

    try:
        with open(config, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        raise SamplingConfigError(f"cannot read the sampling settings from {config}: {error}") from None
    section = document
    for key in ROLLOUT_KEYS:
        section = section.get(key) if isinstance(section, dict) else None
    values = {}
    for field in dataclasses.fields(RecipeSampling):
        value = section.get(field.name) if isinstance(section, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SamplingConfigError(f"{config}: {'.'.join(ROLLOUT_KEYS)}.{field.name} must be a number, "
                                      f"got {value!r}")
        values[field.name] = int(value) if field.type in (int, "int") else float(value)
    return RecipeSampling(**values)


def _default(name: str):
    return dataclasses.field(default_factory=lambda: getattr(recipe_sampling(), name))


@dataclasses.dataclass
class SamplingOptions:
    """How evaluation and synthesis sample: the recipe's values unless a run says otherwise."""

    temperature: float = _default("temperature")
    top_p: float = _default("top_p")
    top_k: int = _default("top_k")
    max_new_tokens: int = MAX_NEW_TOKENS
    greedy: bool = False
    seed: int = 0
    min_token_text_ratio: float = 2.0
    """Upstream CosyVoice's bounds: each LLM call generates at least this many speech tokens per
    text token ... (ttsrl.frontend)"""
    max_token_text_ratio: float = 20.0
    """... and at most this many (and never more than ``max_new_tokens``)."""


def add_sampling_arguments(parser, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
    """The sampling flags of the evaluation and synthesis CLIs, defaulting to the recipe's."""
    defaults = recipe_sampling()
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="default: configs/grpo.yaml's rollout temperature")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="default: configs/grpo.yaml's")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="default: configs/grpo.yaml's")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--min-token-text-ratio", type=float, default=2.0,
                        help="each LLM call generates at least this many speech tokens per text token (upstream "
                             "CosyVoice's min_token_text_ratio, default %(default)s)")
    parser.add_argument("--max-token-text-ratio", type=float, default=20.0,
                        help="... and at most this many (upstream's max_token_text_ratio, default %(default)s)")


def options_from_args(args) -> SamplingOptions:
    """The SamplingOptions of parsed ``add_sampling_arguments`` flags (and ``--seed``)."""
    return SamplingOptions(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.greedy,
                           getattr(args, "seed", 0), getattr(args, "min_token_text_ratio", 2.0),
                           getattr(args, "max_token_text_ratio", 20.0))

"""ttsrl.sampling: evaluation and synthesis sample as configs/grpo.yaml's rollouts do."""
import argparse

import pytest
import yaml

from ttsrl.sampling import (GRPO_CONFIG, SamplingConfigError, SamplingOptions, add_sampling_arguments,
                            options_from_args, recipe_sampling)


def test_defaults_are_the_training_rollouts_and_validation_samples_the_same():
    config = yaml.safe_load(GRPO_CONFIG.read_text(encoding="utf-8"))
    rollout = config["actor_rollout_ref"]["rollout"]
    sampling = recipe_sampling()
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (rollout["temperature"], rollout["top_p"],
                                                                     rollout["top_k"])
    assert {key: rollout["val_kwargs"][key] for key in ("temperature", "top_p", "top_k")} == {
        "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
    options = SamplingOptions()
    assert (options.temperature, options.top_p, options.top_k) == (0.8, 0.95, 25)  # the reference recipe's


def test_flags_default_to_the_recipe_and_override_one_run():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    assert options_from_args(parser.parse_args([])) == SamplingOptions()
    changed = options_from_args(parser.parse_args(["--temperature", "1.1", "--top-k", "5", "--greedy", "--seed", "3"]))
    assert (changed.temperature, changed.top_p, changed.top_k, changed.greedy, changed.seed) == (1.1, 0.95, 5, True, 3)


def test_a_config_without_rollout_sampling_is_named(tmp_path):
    bad = tmp_path / "grpo.yaml"
    bad.write_text("actor_rollout_ref:\n  rollout:\n    temperature: hot\n")
    with pytest.raises(SamplingConfigError, match=r"grpo\.yaml: actor_rollout_ref\.rollout\.temperature must be a "
                                                  r"number, got 'hot'"):
        recipe_sampling(bad)
    with pytest.raises(SamplingConfigError, match="cannot read"):
        recipe_sampling(tmp_path / "missing.yaml")

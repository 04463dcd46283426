"""Algorithm presets (configs/algorithm_presets.yaml, ttsrl/training/algorithm_presets.py): each maps to
veRL 0.9.1's own options, and each option does, through veRL's own estimator and loss functions, what
its algorithm says. The real two-step runs of each preset are in tests/test_grpo_cpu.py."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests import algorithm_utils
from ttsrl.training import algorithm_presets as ap

REPO_ROOT = Path(__file__).resolve().parents[3]
PRESETS = REPO_ROOT / "configs" / "algorithm_presets.yaml"
REWARD = REPO_ROOT / "configs" / "reward.yaml"

EXPECTED = {  # docs/training.md "Algorithm presets" lists the same
    "grpo": [],
    "dapo": ["actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_high=0.28",
             "actor_rollout_ref.actor.loss_agg_mode=token-mean", "algorithm.filter_groups.enable=true",
             "algorithm.filter_groups.metric=reward"],
    "dr_grpo": ["algorithm.norm_adv_by_std_in_grpo=false", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
                "actor_rollout_ref.actor.loss_scale_factor=${data.max_response_length}"],
    "gspo": ["actor_rollout_ref.actor.policy_loss.loss_mode=gspo",
             "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
             "actor_rollout_ref.actor.clip_ratio_low=0.0003", "actor_rollout_ref.actor.clip_ratio_high=0.0004"],
    "gdpo": ["algorithm.adv_estimator=gdpo", "algorithm.gdpo_reward_keys=[utility_error_rate,utility_similarity]",
             "algorithm.gdpo_reward_weights=[1.0,1.0]"],
}


def verl_config(overrides: list[str]):
    """veRL 0.9.1's full default config (its generated ppo_trainer.yaml) with ``overrides`` applied."""
    import verl

    base = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    return OmegaConf.merge(base, OmegaConf.from_dotlist([
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "data.max_response_length=8", *overrides]))


def actor_config(preset: str):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(verl_config(ap.load_preset(preset, reward_config=REWARD,
                                                              reward_preset="zero_shot").overrides())
                                   .actor_rollout_ref.actor)


def test_every_preset_sets_veRLs_own_keys():
    assert ap.preset_names() == sorted(EXPECTED)
    base = verl_config([])
    for name, expected in EXPECTED.items():
        preset = ap.load_preset(name, reward_config=REWARD, reward_preset="zero_shot")
        assert preset.overrides() == expected, name
        for key in preset.settings:  # keys veRL defines (configs/grpo.yaml declares the gdpo pair)
            assert OmegaConf.select(base, key, default="<missing>") != "<missing>" or key.startswith("algorithm.gdpo"), key


def test_gdpo_takes_the_reward_presets_weighted_components_and_weights(tmp_path):
    reward = tmp_path / "reward.yaml"
    reward.write_text("preset: three\npresets:\n  three:\n    weights: {similarity: 2.0, error_rate: 1.0, "
                      "confidence: 0.5}\n  one:\n    weights: {error_rate: 1.0, similarity: 0.0}\n")
    preset = ap.load_preset("gdpo", reward_config=reward)  # the file's default preset
    assert preset.settings["algorithm.gdpo_reward_keys"] == ["utility_similarity", "utility_error_rate",
                                                            "utility_confidence"]
    assert preset.settings["algorithm.gdpo_reward_weights"] == [2.0, 1.0, 0.5]
    with pytest.raises(ap.PresetError, match=r"reward preset 'one' of .* weights only error_rate: .*\("
                                             r"reward_preset=zero_shot\) or algorithm_preset=grpo"):
        ap.load_preset("gdpo", reward_config=reward, reward_preset="one")
    with pytest.raises(ap.PresetError, match="unknown reward preset 'nope'"):
        ap.load_preset("gdpo", reward_config=reward, reward_preset="nope")
    # the shipped intelligibility preset weights one component: refused the same way
    with pytest.raises(ap.PresetError, match="weights only error_rate"):
        ap.load_preset("gdpo", reward_config=REWARD, reward_preset="intelligibility")


def test_an_unknown_preset_lists_the_known_ones_everywhere(tmp_path):
    known = "known presets: dapo, dr_grpo, gdpo, grpo, gspo"
    with pytest.raises(ap.PresetError, match=f"unknown algorithm_preset .* 'dr-grpo'; {known}"):
        ap.load_preset("dr-grpo")
    cli = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "ttsrl.training.algorithm_presets",
                          "overrides", "dr-grpo"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert cli.returncode == 2 and known in cli.stderr
    # train_grpo.sh stops before composing anything (the shell reads the names: no environment needed)
    config = tmp_path / "settings.sh"
    config.write_text(f"source {REPO_ROOT / 'configs' / 'default.sh'}\nalgorithm_preset=dr-grpo\n")
    env = {k: v for k, v in os.environ.items() if k != "algorithm_preset"}
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "train_grpo.sh"), "--config", str(config),
                           "--compose-only"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"unknown algorithm_preset (configs/default.sh) 'dr-grpo'; {known}" in done.stderr
    assert done.stdout == ""
    # run.sh stops before its first stage
    done = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), "-1", "2"], cwd=REPO_ROOT,
                          env={**env, "algorithm_preset": "dr-grpo", "exp_dir": str(tmp_path / "exp")},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and known in done.stderr
    assert "stage -1" not in done.stdout + done.stderr


def test_an_explicit_override_wins_and_is_named():
    preset = ap.load_preset("dapo")
    overrides = ["trainer.total_epochs=2", "actor_rollout_ref.actor.clip_ratio_high=0.3", "algorithm.filter_groups=null"]
    assert ap.overridden(preset, overrides) == {
        "actor_rollout_ref.actor.clip_ratio_high": "actor_rollout_ref.actor.clip_ratio_high=0.3",
        "algorithm.filter_groups.enable": "algorithm.filter_groups=null",
        "algorithm.filter_groups.metric": "algorithm.filter_groups=null"}
    text = ap.describe(preset, " ".join(overrides))
    assert text.startswith("dapo sets actor_rollout_ref.actor.clip_ratio_low=0.2, ")
    assert ("actor_rollout_ref.actor.clip_ratio_high (preset: 0.28) by your "
            "'actor_rollout_ref.actor.clip_ratio_high=0.3', which wins") in text
    assert ap.overridden(preset, ["+actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"]) == {
        "actor_rollout_ref.actor.loss_agg_mode": "+actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"}
    assert ap.describe(ap.load_preset("grpo")) == "grpo: sets nothing (configs/grpo.yaml as it is)"


# ---- what each preset's options do, through veRL's own functions ------------------------------------------
def policy_loss(config, log_ratio, advantages, mask):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old = torch.zeros_like(log_ratio)
    loss, metrics = get_policy_loss_fn(config.policy_loss.loss_mode)(
        old_log_prob=old, log_prob=old + log_ratio, advantages=advantages, response_mask=mask,
        loss_agg_mode=config.loss_agg_mode, config=config)
    return loss, metrics


def test_gspo_clips_the_sequence_ratio_where_grpo_clips_tokens():
    """Response 0: token ratios e^+-0.3 (outside GRPO's 0.8-1.2) whose geometric mean is 1; response 1:
    every token's ratio 1.001 (inside GRPO's band, outside GSPO's 1 + 4e-4)."""
    log_ratio = torch.tensor([[0.3, -0.3, 0.3, -0.3], [1e-3, 1e-3, 1e-3, 1e-3]])
    advantages, mask = torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool)
    clipped = {}
    for preset in ("grpo", "gspo"):
        config = actor_config(preset)
        clipped[preset] = [policy_loss(config, log_ratio[i:i + 1], advantages[i:i + 1], mask[i:i + 1])[1]
                           ["actor/pg_clipfrac"] for i in range(2)]
    assert clipped["grpo"] == [0.5, 0.0]  # the two tokens above 1.2, token by token
    assert clipped["gspo"] == [0.0, 1.0]  # the whole response, by its sequence ratio


def test_dapo_clips_higher_above_than_below():
    config, grpo = actor_config("dapo"), actor_config("grpo")
    mask = torch.ones(1, 1, dtype=torch.bool)
    up = torch.tensor([[np.log(1.25)]])  # a positive advantage's ratio 1.25: inside DAPO's 1.28, outside 1.2
    assert policy_loss(config, up, torch.ones(1, 1), mask)[1]["actor/pg_clipfrac"] == 0.0
    assert policy_loss(grpo, up, torch.ones(1, 1), mask)[1]["actor/pg_clipfrac"] == 1.0
    down = torch.tensor([[np.log(0.75)]])  # a negative advantage's ratio 0.75: below 0.8 for both
    assert policy_loss(config, down, -torch.ones(1, 1), mask)[1]["actor/pg_clipfrac"] == 1.0
    assert config.loss_agg_mode == "token-mean"


def test_dr_grpo_neither_divides_by_the_group_std_nor_by_the_response_length():
    from verl.protocol import DataProto
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.trainer.ppo.ray_trainer import compute_advantage

    algorithm = verl_config(ap.load_preset("dr_grpo").overrides()).algorithm
    scores = [0.9, 0.5, 0.1, 0.1, 0.6, 0.6, 0.2, 0.6]
    groups = ["a"] * 4 + ["b"] * 4
    rewards = torch.zeros(8, 3)
    rewards[:, -1] = torch.tensor(scores)
    data = DataProto.from_dict({"token_level_rewards": rewards, "response_mask": torch.ones(8, 3)})
    data.non_tensor_batch["uid"] = np.array(groups, dtype=object)
    data = compute_advantage(data, adv_estimator="grpo", num_repeat=4,  # configs/grpo.yaml's estimator
                             norm_adv_by_std_in_grpo=algorithm.norm_adv_by_std_in_grpo, config=algorithm)
    got = data.batch["advantages"][:, 0].numpy()
    assert got == pytest.approx(algorithm_utils.group_normalized(scores, groups, divide_by_std=False), abs=1e-6)
    assert got != pytest.approx(algorithm_utils.group_normalized(scores, groups), abs=1e-3)  # GRPO's
    # the loss sums a response's tokens and divides by data.max_response_length (8 here), whatever its length
    config = actor_config("dr_grpo")
    assert config.loss_scale_factor == 8
    losses, mask = torch.ones(2, 6), torch.tensor([[1] * 2 + [0] * 4, [1] * 6], dtype=torch.bool)
    loss = agg_loss(losses, mask, config.loss_agg_mode, loss_scale_factor=config.loss_scale_factor)
    assert float(loss) == pytest.approx((2 + 6) / 2 / 8)

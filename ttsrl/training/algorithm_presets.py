"""Algorithm presets of stage 2: ``algorithm_preset=grpo|dapo|dr_grpo|gspo|gdpo`` (configs/default.sh)
as veRL 0.9.1's own options.

The presets live in ``configs/algorithm_presets.yaml`` (what each sets, and why); this module reads
them and turns one into veRL ``key=value`` overrides, which ``scripts/train_grpo.sh`` places before
``grpo_overrides`` and the command line's overrides, so an explicit override wins::

    python -m ttsrl.training.algorithm_presets overrides gdpo --reward-config configs/reward.yaml \\
        --reward-preset zero_shot
    algorithm.adv_estimator=gdpo
    algorithm.gdpo_reward_keys=[utility_error_rate,utility_similarity]
    algorithm.gdpo_reward_weights=[1.0,1.0]

A preset with ``reward_components: true`` (gdpo) gets ``algorithm.gdpo_reward_keys`` and
``gdpo_reward_weights`` from the reward preset the run uses: ``utility_<component>`` (the keys the
reward hook returns) for each component the preset weights, with its weight, in the file's order. A
new component of ``configs/reward.yaml`` reaches GDPO this way without a change here.

An unknown preset name, or gdpo over a reward preset with fewer than two weighted components (GDPO
would then be GRPO plus a batch whitening), is a ``PresetError`` naming the fix; the CLI prints it
and exits 2, before anything starts. ``overridden`` and ``describe`` say which of a preset's keys the
run's own overrides replace (the preflight prints it).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

PRESETS_FILE = Path(__file__).resolve().parents[2] / "configs" / "algorithm_presets.yaml"
DEFAULT_PRESET = "grpo"
KNOB = "algorithm_preset (configs/default.sh)"
GDPO_KEYS = "algorithm.gdpo_reward_keys"
GDPO_WEIGHTS = "algorithm.gdpo_reward_weights"


class PresetError(ValueError):
    """A preset that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class AlgorithmPreset:
    name: str
    settings: dict  # veRL key -> value, in the order they are passed

    def overrides(self) -> list[str]:
        """The settings as Hydra ``key=value`` overrides."""
        return [f"{key}={hydra_value(value)}" for key, value in self.settings.items()]


def hydra_value(value) -> str:
    """A YAML value as Hydra's override grammar reads it back (bools, numbers, lists, plain strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    text = str(value)
    if any(c in text for c in " ,[]{}()'\"=") and not text.startswith("${"):
        raise PresetError(f"preset value {text!r} needs quoting, which presets do not support; keep values plain")
    return text


def _read(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise PresetError(f"cannot read the algorithm presets {path}: {error}") from None
    presets = data.get("presets") if isinstance(data, dict) else None
    if not isinstance(presets, dict) or not presets:
        raise PresetError(f"{path}: expected a non-empty 'presets' mapping of name -> settings")
    return presets


def preset_names(path: Path = PRESETS_FILE) -> list[str]:
    return sorted(_read(path))


def reward_components(reward_config: str | Path, reward_preset: str | None) -> dict[str, float]:
    """{component: weight} of the components the reward preset weights (weight > 0), in file order."""
    from token2wav_server.reward_scoring import RewardConfigError, load_reward_config

    try:
        config = load_reward_config(str(reward_config), reward_preset or None)
    except RewardConfigError as error:
        raise PresetError(f"the reward preset of the run cannot be read: {error}") from None
    return {name: float(weight) for name, weight in config.weights.items() if config.uses(name)}


def load_preset(name: str, path: Path = PRESETS_FILE, reward_config: str | Path | None = None,
                reward_preset: str | None = None) -> AlgorithmPreset:
    """The preset ``name`` of ``path``, with gdpo's reward keys filled in from the reward preset."""
    presets = _read(path)
    if name not in presets:
        raise PresetError(f"unknown {KNOB} {name!r}; known presets: {', '.join(sorted(presets))} ({path})")
    entry = presets[name] or {}
    settings = entry.get("settings") or {} if isinstance(entry, dict) else None
    if not isinstance(settings, dict):
        raise PresetError(f"{path}: preset {name!r} needs a 'settings' mapping of veRL key -> value")
    settings = dict(settings)
    if entry.get("reward_components"):
        if reward_config is None:
            raise PresetError(f"algorithm preset {name!r} takes its reward keys from the reward preset: give the "
                              "reward config (reward_config in configs/default.sh)")
        components = reward_components(reward_config, reward_preset)
        if len(components) < 2:
            raise PresetError(
                f"algorithm preset {name!r} normalizes each weighted reward component on its own, but "
                f"{f'reward preset {reward_preset!r}' if reward_preset else 'the default reward preset'} of "
                f"{reward_config} weights only {', '.join(components)}: "
                f"with one component it is grpo plus a batch whitening. Use a reward preset with two or more "
                f"components (reward_preset=zero_shot) or algorithm_preset=grpo")
        settings.setdefault(GDPO_KEYS, [f"utility_{component}" for component in components])
        settings.setdefault(GDPO_WEIGHTS, list(components.values()))
    for key in settings:
        if not isinstance(key, str) or not key or key.startswith("+"):
            raise PresetError(f"{path}: preset {name!r} has key {key!r}; keys are veRL's dotted names, without '+'")
    return AlgorithmPreset(name, settings)


def _override_key(override: str) -> str | None:
    name, sep, _ = override.partition("=")
    return name.lstrip("+~") if sep or override.startswith("~") else None


def overridden(preset: AlgorithmPreset, overrides) -> dict[str, str]:
    """{preset key: the override that replaces it}: an override of the same key, or of a section
    holding it (``algorithm.filter_groups=...``); the last one wins, as in Hydra."""
    if isinstance(overrides, str):
        overrides = overrides.split()
    found = {}
    for override in overrides:
        key = _override_key(override)
        if not key:
            continue
        for setting in preset.settings:
            if setting == key or setting.startswith(key + "."):
                found[setting] = override
    return found


def describe(preset: AlgorithmPreset, overrides=()) -> str:
    """What the preset sets, and which of it the run's overrides replace (the preflight's line)."""
    if not preset.settings:
        text = f"{preset.name}: sets nothing (configs/grpo.yaml as it is)"
    else:
        text = f"{preset.name} sets " + ", ".join(preset.overrides())
    replaced = overridden(preset, overrides)
    if replaced:
        text += "; overridden: " + ", ".join(
            f"{key} (preset: {hydra_value(preset.settings[key])}) by your {override!r}, which wins"
            for key, override in replaced.items())
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="veRL overrides of an algorithm preset "
                                                 "(configs/algorithm_presets.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("overrides", help="print the preset's key=value overrides, one per line")
    show.add_argument("name")
    show.add_argument("--presets", type=Path, default=PRESETS_FILE)
    show.add_argument("--reward-config", default=None, help="the run's reward_config (for gdpo's keys)")
    show.add_argument("--reward-preset", default=None, help="the run's reward_preset (default: the file's)")
    show.add_argument("--describe", default=None, metavar="OVERRIDES",
                      help="instead: one line saying what the preset sets and which of it OVERRIDES replace")
    commands.add_parser("names", help="print the preset names").add_argument("--presets", type=Path,
                                                                             default=PRESETS_FILE)
    args = parser.parse_args(argv)
    try:
        if args.command == "names":
            print("\n".join(preset_names(args.presets)))
            return 0
        preset = load_preset(args.name, args.presets, args.reward_config, args.reward_preset)
    except PresetError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    if args.describe is not None:
        print(describe(preset, args.describe))
    else:
        for override in preset.overrides():
            print(override)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

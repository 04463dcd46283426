"""Reward configuration (configs/reward.yaml) and the per-item reward.

The maths lives in ``ttsrl.scoring`` (error rates) and ``ttsrl.reward_shaping`` (utilities and
their combination); this module only reads the configuration and applies it.

Components (YAML ``weights`` keys):

- ``error_rate``: the error rate of the transcript against the text, with the metric of the
  item's language (``ttsrl.scoring``: pinyin or char, as ``metric`` says, for zh and for an
  item with no language; WER for en; CER for ja and ko), utility ``1 - tanh(beta * e)``. The error rate itself is always computed and
  returned (it is the main metric), even with weight 0.
- ``similarity``: cosine similarity of speaker embeddings of the generated audio and
  the speaker prompt, utility ``max(0, cos)``. Needs a speaker engine.
- ``confidence``: the ASR's mean per-token negative log-likelihood of its transcript,
  utility ``exp(-nll / confidence_tau)``. Needs an ASR engine that reports ``nll``.

Components with weight 0 (other than the error rate) are not computed; their outputs are NaN.
Each weighted component's utility is returned too (``ItemScore.utilities``; the server's
``UTILITY_*`` outputs), so that a multi-reward advantage estimator (veRL's ``gdpo``) can
normalize each one on its own.

Presets: a reward file either holds the settings themselves (flat, as above), or named
presets and the default one::

    preset: intelligibility          # used unless --reward-preset names another
    presets:
      intelligibility: {weights: {error_rate: 1.0}, beta: 3.0, rule: arithmetic}
      zero_shot: {weights: {error_rate: 1.0, similarity: 1.0}, beta: 3.0, rule: arithmetic}

``load_reward_config(path, preset)`` reads either form; an unknown preset name is an error
that names the file, the name and the presets the file has.

Plug-in components: the file's top-level ``components`` mapping names, for each plug-in
component, the module that defines it (``COMPONENT``, a ``token2wav_server.engines.ComponentSpec``)::

    components:
      quality: token2wav_server.engines_dnsmos

A preset then weights it like any other (``weights: {quality: 0.5}``) and may give its utility
settings (``component_settings: {quality: {...}}``). Its engine runs only where it is weighted;
its reported values and its utility travel to the hook and the per-step metrics by the same path
as the built-in components. An unknown component name lists the known ones.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import pathlib
from typing import Mapping, Optional

import yaml

from ttsrl.reward_shaping import COMBINATION_RULES, combine, confidence_utility, error_rate_utility, similarity_utility
from ttsrl.scoring import METRICS, error_rate

from .engines import ComponentSpec

COMPONENTS = ("error_rate", "similarity", "confidence")
"""The built-in components; plug-ins come from the config's ``components`` mapping."""
DEFAULT_CONFIG_PATH = "configs/reward.yaml"
PRESET_KEYS = ("preset", "presets", "components")


class RewardConfigError(ValueError):
    """A reward configuration that cannot be used (the message names file and key)."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"error_rate": 1.0})
    beta: float = 3.0
    rule: str = "arithmetic"
    metric: str = "pinyin"
    confidence_tau: float = 1.0
    component_settings: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)
    plugins: Mapping[str, ComponentSpec] = dataclasses.field(default_factory=dict)  # from ``components``

    @property
    def components(self) -> tuple:
        """Every component this config knows: the built-in ones, then its plug-ins."""
        return COMPONENTS + tuple(self.plugins)

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(self.components))
        if unknown:
            raise RewardConfigError(f"weights: unknown component(s) {unknown}; known components: "
                                    f"{list(self.components)}")
        unknown = sorted(set(self.component_settings) - set(self.plugins))
        if unknown:
            raise RewardConfigError(f"component_settings: unknown plug-in component(s) {unknown}; known: "
                                    f"{list(self.plugins)}")
        for name, weight in self.weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0 or math.isnan(weight):
                raise RewardConfigError(f"weights.{name}: must be a non-negative number, got {weight!r}")
        if not any(self.weights.get(name, 0) > 0 for name in self.components):
            raise RewardConfigError("weights: at least one component needs a positive weight")
        if self.rule not in COMBINATION_RULES:
            raise RewardConfigError(f"rule: {self.rule!r} is not one of {list(COMBINATION_RULES)}")
        if self.metric not in METRICS:
            raise RewardConfigError(f"metric: {self.metric!r} is not one of {list(METRICS)}")
        for key in ("beta", "confidence_tau"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise RewardConfigError(f"{key}: must be a positive number, got {value!r}")

    def uses(self, component: str) -> bool:
        return self.weights.get(component, 0) > 0

    def weighted_plugins(self) -> dict:
        """{name: ComponentSpec} of the plug-ins this config weights (the ones computed)."""
        return {name: spec for name, spec in self.plugins.items() if self.uses(name)}


def load_component(name: str, module_name, where: str) -> ComponentSpec:
    """The ``COMPONENT`` of plug-in ``name``'s module; errors name ``where`` and the module."""
    if not isinstance(module_name, str) or not module_name:
        raise RewardConfigError(f"{where}: components.{name} must name a module, got {module_name!r}")
    if name in COMPONENTS:
        raise RewardConfigError(f"{where}: components.{name}: {name!r} is a built-in component")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardConfigError(f"{where}: components.{name}: cannot import {module_name} ({error})") from None
    spec = getattr(module, "COMPONENT", None)
    if not isinstance(spec, ComponentSpec) or spec.name != name:
        raise RewardConfigError(f"{where}: components.{name}: {module_name} has no COMPONENT = "
                                f"ComponentSpec(name={name!r}, ...)")
    return spec


def _plugins_from(data: dict, where: str) -> dict:
    components = data.get("components") or {}
    if not isinstance(components, dict):
        raise RewardConfigError(f"{where}: 'components' must be a mapping of name -> module")
    return {name: load_component(name, module, where) for name, module in components.items()}


def _config_from(data, where: str, plugins: Optional[dict] = None) -> RewardConfig:
    """One flat mapping of settings -> RewardConfig; errors name ``where`` (file, preset)."""
    if not isinstance(data, dict):
        raise RewardConfigError(f"{where}: expected a mapping of settings")
    data = {key: value for key, value in data.items() if key != "components"}
    known = {f.name for f in dataclasses.fields(RewardConfig)} - {"plugins"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RewardConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    if "weights" in data and not isinstance(data["weights"], dict):
        raise RewardConfigError(f"{where}: 'weights' must be a mapping of component -> weight")
    try:
        return RewardConfig(**data, plugins=plugins or {})
    except RewardConfigError as error:
        raise RewardConfigError(f"{where}: {error}") from None


def _read_yaml(file: pathlib.Path) -> dict:
    if not file.is_file():
        raise RewardConfigError(f"reward config {file} not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RewardConfigError(f"{file}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise RewardConfigError(f"{file}: expected a mapping at the top level")
    return data


def load_reward_config(path: Optional[str], preset: Optional[str] = None) -> RewardConfig:
    """Read a reward YAML (flat, or with ``presets``: see the module doc); ``preset`` picks a
    preset (default: the file's ``preset``). ``path=None`` gives the defaults (error rate
    only, beta 3, arithmetic)."""
    if path is None:
        if preset:
            raise RewardConfigError(f"reward preset {preset!r} needs a reward config file (--reward-config)")
        return RewardConfig()
    file = pathlib.Path(path)
    data = _read_yaml(file)
    if "presets" not in data:
        if "preset" in data:
            raise RewardConfigError(f"{file}: 'preset: {data['preset']}' but no 'presets' mapping")
        if preset:
            raise RewardConfigError(f"{file}: has no presets, so reward preset {preset!r} cannot be chosen; "
                                    f"leave --reward-preset out or add a 'presets' mapping")
        return _config_from(data, str(file), _plugins_from(data, str(file)))
    presets = data["presets"]
    others = sorted(set(data) - set(PRESET_KEYS))
    if others:
        raise RewardConfigError(f"{file}: key(s) {others} next to 'presets': with presets, every setting "
                                f"goes inside a preset")
    if not isinstance(presets, dict) or not presets:
        raise RewardConfigError(f"{file}: 'presets' must be a non-empty mapping of name -> settings")
    name = preset or data.get("preset")
    if not name:
        raise RewardConfigError(f"{file}: no default 'preset' and none chosen (--reward-preset); "
                                f"known presets: {sorted(presets)}")
    if name not in presets:
        raise RewardConfigError(f"{file}: unknown reward preset {name!r}; known presets: {sorted(presets)}")
    return _config_from(presets[name], f"{file}: preset {name!r}", _plugins_from(data, str(file)))


@dataclasses.dataclass(frozen=True)
class ItemScore:
    reward: float
    error_rate: float
    similarity: float = math.nan  # NaN: not computed
    nll: float = math.nan  # NaN: not computed
    utilities: Mapping[str, float] = dataclasses.field(default_factory=dict)  # weighted components only
    reports: Mapping[str, float] = dataclasses.field(default_factory=dict)  # weighted plug-ins' reported values

    def utility(self, component: str) -> float:
        """The utility of ``component`` (NaN: not weighted, so not computed)."""
        return float(self.utilities.get(component, math.nan))


def score_item(
    config: RewardConfig, ground_truth: str, transcript: str, similarity: Optional[float] = None,
    nll: Optional[float] = None, language: Optional[str] = None, component_values: Optional[Mapping] = None,
) -> ItemScore:
    """Reward of one transcript; ``language`` (zh, en, ja, ko; None: as before languages, the
    configured metric) picks the error metric. Raises ``ttsrl.scoring.EmptyReferenceError`` for
    a ground truth with nothing to score, ValueError when a weighted component has no value or
    the language is unknown. ``component_values``: {plug-in name: the dict its engine reported}."""
    rate = error_rate(ground_truth, transcript, config.metric, language)
    utilities = {"error_rate": error_rate_utility(rate, config.beta)}
    if config.uses("similarity"):
        if similarity is None:
            raise ValueError("speaker similarity has a weight but no speaker engine gave a value")
        utilities["similarity"] = similarity_utility(similarity)
    if config.uses("confidence"):
        if nll is None:
            raise ValueError("ASR confidence has a weight but the ASR engine gives no nll")
        utilities["confidence"] = confidence_utility(nll, config.confidence_tau)
    reports = {}
    for name, spec in config.weighted_plugins().items():
        values = (component_values or {}).get(name)
        if values is None:
            raise ValueError(f"reward component {name!r} has a weight but its engine gave no value")
        reports.update({key: float(values[key]) for key in spec.reports})
        utility = spec.utility(values, dict(config.component_settings.get(name, {})))
        if utility is None:  # nothing to measure for this item (no target): left out of its reward
            continue
        utility = float(utility)
        if not 0.0 <= utility <= 1.0:
            raise ValueError(f"reward component {name!r}: utility {utility} outside [0, 1]")
        utilities[name] = utility
    weights = {n: w for n, w in config.weights.items() if n in utilities or n not in config.plugins}
    reward = combine(utilities, weights, config.rule)
    return ItemScore(
        reward=reward,
        error_rate=rate,
        similarity=similarity if config.uses("similarity") else math.nan,
        nll=nll if config.uses("confidence") else math.nan,
        utilities={name: u for name, u in utilities.items() if config.uses(name)},
        reports=reports,
    )


def minimum_score(config: RewardConfig) -> ItemScore:
    """The documented score of a rollout with no speech tokens: reward 0, error rate 1,
    similarity 0 and nll infinity where those are computed, every weighted utility 0."""
    return ItemScore(
        reward=0.0,
        error_rate=1.0,
        similarity=0.0 if config.uses("similarity") else math.nan,
        nll=math.inf if config.uses("confidence") else math.nan,
        utilities={name: 0.0 for name in config.components if config.uses(name)},
    )

"""The engine plugin interface of the reward server.

A server slot (one model instance on one device) owns one ``Engines`` bundle,
made by a factory named on the command line with ``--engines MODULE_OR_FILE:FACTORY``:

    def create_engines(options: EngineOptions) -> Engines

``MODULE_OR_FILE`` is an importable module (``token2wav_server.standin``) or a
path to a ``.py`` file. The factory is called once per slot, with that slot's
``device`` in the options, so every slot gets its own models.

Engines are plain objects with these methods (``typing.Protocol``: no base class
needed). Every method takes a whole batch, so an engine can decode the batch
together where its model allows.

- ``Token2WavEngine``
    - ``sample_rate: int`` of the waveforms it returns.
    - ``prepare_prompt(prompt: SpeakerPrompt) -> object``: precompute whatever the
      engine needs of a speaker prompt (prompt speech tokens, mel, embedding).
      Called once per prompt at start-up; the result is passed back to ``synthesize``.
    - ``synthesize(token_batch: list[np.ndarray], prompts: list[object]) -> list[np.ndarray]``:
      int64 speech token ids (each 1-D, non-empty, ids in [0, 6561)) -> float32
      mono waveforms in [-1, 1] at ``sample_rate``.
- ``AsrEngine``
    - ``sample_rate: int`` it wants (the server resamples to it).
    - ``transcribe(waves: list[np.ndarray]) -> list[AsrResult]``: float32 mono
      waveforms -> text, plus the mean per-token negative log-likelihood of that
      text when the model can give it (``nll=None`` otherwise).
- ``SpeakerEngine`` (optional)
    - ``sample_rate: int``
    - ``embed(waves: list[np.ndarray]) -> np.ndarray``: (batch, dim) float32
      speaker embeddings; the server compares them by cosine similarity.
- ``SpeechTokenizerEngine`` (optional)
    - ``sample_rate: int`` it wants (the server resamples to it).
    - ``tokenize(waves: list[np.ndarray]) -> list[np.ndarray]``: float32 mono
      waveforms -> 1-D int speech token ids in [0, 6561) each (CosyVoice2's
      speech tokenizer), used for zero-shot prompts in evaluation. Raise for a
      waveform it cannot tokenize (the server retries the batch item by item
      and reports the failing item in-band).

``Engines`` bundles them; ``asr_eval`` is an optional second ASR (for example
Paraformer-zh) served as the ``asr_eval`` model for evaluation, and ``asr_eval_en`` an
optional English one (Whisper-large-v3, engines_whisper) served as ``asr_eval_en``. ``reward_speaker`` is an
optional second ``SpeakerEngine`` for the reward's speaker similarity, so the reward and the
evaluation's SIM can use different models (engines_wavlm_sv: CAM++ for the reward, WavLM for
the ``speaker`` model); without it the reward uses ``speaker``.

Which engines a server loads (``--models``, ``EngineOptions.engines``): a server for training
(``--models training``, what run.sh's stage 1 starts) needs token2wav, the reward ASR, the speech
tokenizer (stage 0's prompt tokens) and the engines of the reward components its config weights
(``COMPONENT_ENGINES``: a component with weight 0 loads nothing); evaluation models
(``EVALUATION_ENGINES``) only with ``--models all``. ``wanted_engines`` says which, factories ask
``options.wants(name)`` before they load one, and ``select_engines`` drops whatever a factory
built that is not wanted. A new reward component (a plug-in) adds its engine to
``COMPONENT_ENGINES`` and is loaded exactly when its weight is not 0.

Plug-in reward components (``ComponentSpec``): a module that defines ``COMPONENT`` (its name,
the per-item values it reports, its utility function and its engine factory), named in the
reward config's ``components`` mapping (configs/reward.yaml). Its engine is built by the server
for every slot whose reward config weights it (whatever ``--models`` says), is kept in
``Engines.components`` and implements ``ComponentEngine``; the server, the reward hook and the
trainer's per-step metrics need no change for a new one (docs/reward_server.md, "Reward
components").
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pathlib
import sys
from typing import Callable, Optional, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpeakerPrompt:
    """A speaker prompt: a waveform and its transcript (see ``prompt_bank``)."""

    name: str
    wave: np.ndarray  # float32 mono
    sample_rate: int
    text: str
    path: Optional[str] = None  # the wav file it was read from, when there is one


@dataclasses.dataclass(frozen=True)
class AsrResult:
    text: str
    nll: Optional[float] = None  # mean per-token negative log-likelihood, when the model gives it


@runtime_checkable
class Token2WavEngine(Protocol):
    sample_rate: int

    def prepare_prompt(self, prompt: SpeakerPrompt) -> object: ...

    def synthesize(self, token_batch: list, prompts: list) -> list: ...


@runtime_checkable
class AsrEngine(Protocol):
    """``transcribe(waves, languages)``: ``languages`` is each wave's language
    (``ttsrl.language.ASR_LANGUAGES``: zh, en, ja, ko, yue or auto), or None: the engine's own
    default. An engine that serves one language only (Whisper for English) ignores it."""

    sample_rate: int

    def transcribe(self, waves: list, languages: list | None = None) -> list: ...


@runtime_checkable
class SpeakerEngine(Protocol):
    sample_rate: int

    def embed(self, waves: list) -> np.ndarray: ...


@runtime_checkable
class SpeechTokenizerEngine(Protocol):
    sample_rate: int

    def tokenize(self, waves: list) -> list: ...


@runtime_checkable
class ComponentEngine(Protocol):
    """The engine of a plug-in reward component: ``score`` takes float32 mono waveforms at
    ``sample_rate`` (the server resamples) and the items' targets (stage 0's per-item field the
    component names, None where an item has none) -> one dict per waveform of the values the
    component reports (``ComponentSpec.reports``). Raise for a waveform it cannot score: the
    server retries the batch item by item and reports the failing item in-band."""

    sample_rate: int

    def score(self, waves: list, targets: list) -> list: ...


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """A plug-in reward component (module attribute ``COMPONENT``).

    - ``name``: its key in the reward config's ``weights`` (utility output ``UTILITY_<NAME>``,
      hook key ``utility_<name>``).
    - ``reports``: per-item values its engine returns, each served as output ``<REPORT>``
      (upper case) and reported by the hook as ``<report>`` (per-step metric ``reward/<report>/mean``).
    - ``utility(values, settings) -> float`` in [0, 1]: from the item's reported values and the
      preset's ``component_settings[name]`` (a dict; empty when the preset sets nothing); None
      when the item has nothing to measure (no target): the component is then left out of that
      item's reward (its UTILITY output NaN).
    - ``create_engine(options: EngineOptions) -> ComponentEngine``: one per slot.
    - ``target``: the stage 0 field (``extra_info``) that carries a per-item target, or None; it
      travels as the optional input ``TARGET_<FIELD>`` (the hook fills it from ``extra_info``).
    - ``serve_hint``: how to make a server serve it (what the preflight says when it does not).
    """

    name: str
    reports: tuple
    utility: Callable
    create_engine: Callable
    target: Optional[str] = None
    serve_hint: str = ""


@dataclasses.dataclass
class Engines:
    """What one server slot runs. ``speaker``, ``asr_eval``, ``asr_eval_en``,
    ``speech_tokenizer`` and ``reward_speaker`` are optional."""

    token2wav: Token2WavEngine
    asr: AsrEngine
    speaker: Optional[SpeakerEngine] = None
    asr_eval: Optional[AsrEngine] = None
    speech_tokenizer: Optional[SpeechTokenizerEngine] = None
    reward_speaker: Optional[SpeakerEngine] = None  # None: the reward uses ``speaker``
    asr_eval_en: Optional[AsrEngine] = None  # English evaluation ASR (Whisper)
    components: dict = dataclasses.field(default_factory=dict)  # plug-in component name -> ComponentEngine

    @property
    def similarity_speaker(self) -> Optional[SpeakerEngine]:
        """The speaker engine the reward's similarity is measured with."""
        return self.reward_speaker if self.reward_speaker is not None else self.speaker

    def __post_init__(self):
        checks = [("token2wav", self.token2wav, Token2WavEngine), ("asr", self.asr, AsrEngine)]
        if self.speaker is not None:
            checks.append(("speaker", self.speaker, SpeakerEngine))
        if self.asr_eval is not None:
            checks.append(("asr_eval", self.asr_eval, AsrEngine))
        if self.asr_eval_en is not None:
            checks.append(("asr_eval_en", self.asr_eval_en, AsrEngine))
        if self.speech_tokenizer is not None:
            checks.append(("speech_tokenizer", self.speech_tokenizer, SpeechTokenizerEngine))
        if self.reward_speaker is not None:
            checks.append(("reward_speaker", self.reward_speaker, SpeakerEngine))
        for name, engine in self.components.items():
            checks.append((f"component {name}", engine, ComponentEngine))
        for name, engine, protocol in checks:
            if not isinstance(engine, protocol):
                raise TypeError(f"engine {name!r} ({type(engine).__name__}) does not implement {protocol.__name__}")


ENGINE_FIELDS = ("token2wav", "asr", "speaker", "asr_eval", "speech_tokenizer", "reward_speaker", "asr_eval_en")
"""The fields of ``Engines``: what a factory can build."""
TRAINING_ENGINES = ("token2wav", "asr", "speech_tokenizer")
"""Loaded by every server: decoding, the reward's ASR (the error rate is always computed) and
the speech tokenizer (stage 0's prompt speech tokens; part of CosyVoice's token2wav features)."""
COMPONENT_ENGINES = {"error_rate": ("asr",), "confidence": ("asr",), "similarity": ("reward_speaker",)}
"""The engines each reward component (reward_scoring.COMPONENTS) needs: loaded when its weight
is not 0. ``reward_speaker`` is whichever speaker engine the reward measures similarity with."""
EVALUATION_ENGINES = ("asr_eval", "asr_eval_en", "speaker")
"""Served for stage 4 only (Paraformer, Whisper, the SIM model): ``--models all``."""
MODEL_SETS = ("training", "all")
"""``--models`` values."""


def wanted_engines(models: str, weighted_components) -> frozenset:
    """The ``Engines`` fields a server loads: ``models`` "all" every one; "training" the
    TRAINING_ENGINES plus the COMPONENT_ENGINES of each weighted component."""
    if models not in MODEL_SETS:
        raise ValueError(f"--models {models!r}: expected one of {', '.join(MODEL_SETS)}")
    if models == "all":
        return frozenset(ENGINE_FIELDS)
    wanted = set(TRAINING_ENGINES)
    for component in weighted_components:
        if component not in COMPONENT_ENGINES:
            raise ValueError(f"reward component {component!r} has no entry in "
                             "token2wav_server.engines.COMPONENT_ENGINES (which engines does it need?)")
        wanted.update(COMPONENT_ENGINES[component])
    return frozenset(wanted)


def select_engines(engines: "Engines", wanted) -> tuple:
    """(engines with only the ``wanted`` fields, the optional fields dropped). A reward speaker
    that is wanted comes from ``speaker`` when the factory made no separate one (a family's own
    CAM++ serves both), so dropping the evaluation's ``speaker`` keeps the reward's."""
    wanted = frozenset(wanted)
    changes = {}
    if ("reward_speaker" in wanted and "speaker" not in wanted and engines.reward_speaker is None
            and engines.speaker is not None):
        changes["reward_speaker"] = engines.speaker
    dropped = []
    for name in ENGINE_FIELDS:
        if name not in wanted and getattr(engines, name) is not None and name not in ("token2wav", "asr"):
            changes[name] = None
            dropped.append(name)
    return (dataclasses.replace(engines, **changes) if changes else engines), dropped


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """What a factory gets. ``extra`` holds ``--engine-option KEY=VALUE`` pairs (strings)."""

    device: str = "cpu"  # "cpu" or "cuda:N"
    cosyvoice2_dir: Optional[str] = None
    sensevoice_dir: Optional[str] = None
    asr_eval_dir: Optional[str] = None
    asr_eval_en: Optional[str] = None  # Whisper checkpoint file (engines_whisper)
    speaker_model: Optional[str] = None
    fp16: bool = False
    load_jit: bool = False
    load_trt: bool = False
    need_speaker: bool = False  # the reward config uses speaker similarity
    extra: dict = dataclasses.field(default_factory=dict)
    flow_batch: bool = False  # decode a dynamic batch through the flow in one pass (decode_settings)
    engines: Optional[frozenset] = None  # Engines fields to load (wanted_engines); None: every one

    def wants(self, name: str) -> bool:
        """Whether the server serves engine ``name`` (a factory loads nothing it does not want)."""
        return self.engines is None or name in self.engines


EngineFactory = Callable[[EngineOptions], Engines]


def parse_bool(value, what: str) -> bool:
    """A ``true|false`` option value (also 1/0, yes/no, on/off); ``what`` names it in the error."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{what}={value!r}: expected true or false")


def load_factory(spec: str) -> EngineFactory:
    """``MODULE_OR_FILE:FACTORY`` -> the factory callable, with errors that name the problem."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--engines {spec!r}: expected MODULE_OR_FILE:FACTORY, e.g. token2wav_server.standin:create_engines")
    if module_name.endswith(".py") or "/" in module_name:
        path = pathlib.Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"--engines {spec!r}: file {path} not found")
        unique = f"_token2wav_engines_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[unique] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise AttributeError(f"--engines {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def create_engines(options: EngineOptions, spec: str) -> Engines:
    """Load the factory named by ``spec`` and build one slot's engines."""
    engines = load_factory(spec)(options)
    if not isinstance(engines, Engines):
        raise TypeError(f"--engines {spec!r} returned {type(engines).__name__}, expected token2wav_server.engines.Engines")
    return engines


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 resampling (soxr when installed, else scipy's polyphase filter)."""
    wave = np.asarray(wave, dtype=np.float32)
    if from_rate == to_rate:
        return wave
    try:
        import soxr

        return soxr.resample(wave, from_rate, to_rate).astype(np.float32, copy=False)
    except ImportError:  # pragma: no cover - soxr is in requirements-server.txt
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(from_rate, to_rate)
        return resample_poly(wave, to_rate // g, from_rate // g).astype(np.float32)

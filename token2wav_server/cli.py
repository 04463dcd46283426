"""The command line of the reward server: ``python -m token2wav_server [options]`` (server environment).

Serves, over Triton HTTP / gRPC (and Prometheus metrics):

- ``token2wav_asr``: speech tokens + text -> reward, transcript and reward components;
- ``token2wav``: speech tokens -> waveform;
- ``asr``: waveform -> transcript (and ``asr_eval`` / ``asr_eval_en`` when the engines have
  evaluation ASRs);
- ``speaker``: waveform -> speaker embedding (when the engines have a speaker engine);
- ``speech_tokenizer``: waveform -> speech tokens (when the engines have one).

Example (stand-in engines, no weights needed)::

    python -m token2wav_server --engines token2wav_server.standin:create_engines --devices cpu

This process is the front (token2wav_server/supervisor.py): it serves the public HTTP port
through a guard (token2wav_server/http_guard.py) and the metrics port, and runs Triton in
a worker process (``--worker``, started by the front itself; token2wav_server/triton_worker.py)
that it restarts when it dies. This module reads the options, checks what the front can
check before it binds a port, and starts the front or the worker.

See docs/reward_server.md for every option.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from ttsrl.model_family import family_from_env

from .decode_settings import DecodeSettings, resolve
from .engines import (ENGINE_FIELDS, MODEL_SETS, ComponentEngine, EngineOptions, create_engines, load_factory,
                      parse_bool, select_engines, wanted_engines)
from .http_guard import DEFAULT_MAX_BODY_MB, GuardLimits
from .prompt_bank import load_prompts
from .request_items import DEFAULT_MAX_TOKENS, Limits
from .reward_scoring import COMPONENTS, DEFAULT_CONFIG_PATH, load_reward_config
from .serving import Pipeline, Slot
from .supervisor import EXIT_CONFIG_ERROR, FrontConfig, RestartPolicy, run_supervisor
from .triton_worker import CONFIG_ERRORS, run_worker

LOGGER = logging.getLogger("token2wav_server")
DEFAULT_ENGINES = family_from_env().token2wav_engines
"""The real engines of the model family run.sh exports (TTSRL_MODEL_FAMILY; unset: CosyVoice2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m token2wav_server",
        description="Triton reward server: speech tokens -> waveform -> ASR -> reward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind HTTP, gRPC and metrics to (0.0.0.0: all)")
    net.add_argument("--http-port", type=int, default=8000)
    net.add_argument("--grpc-port", type=int, default=8001)
    net.add_argument("--metrics-port", type=int, default=8002)
    net.add_argument("--http-guard", action=argparse.BooleanOptionalAction, default=True,
                     help="serve HTTP through the guard that refuses bodies Triton cannot parse safely "
                          "(--no-http-guard: Triton's HTTP on the public port, which one malformed request can crash)")
    net.add_argument("--http-max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                     help="largest HTTP request body the guard accepts, MiB (larger: 413)")
    sup = parser.add_argument_group("supervision")
    sup.add_argument("--supervise", action=argparse.BooleanOptionalAction, default=True,
                     help="restart Triton when it dies (--no-supervise: exit instead, for systemd / SLURM to restart)")
    sup.add_argument("--max-restarts", type=int, default=10,
                     help="give up after this many restarts within --restart-window-s")
    sup.add_argument("--restart-window-s", type=float, default=600.0)
    sup.add_argument("--restart-backoff-s", type=float, default=1.0,
                     help="wait before the first restart; doubles per restart within the window, at most 30 s")
    sup.add_argument("--hang-timeout-s", type=float, default=30.0,
                     help="restart Triton when it has not answered health checks for this long (0: never)")
    # Set by the front for the worker process it starts; not for users.
    for flag, kind in (("--worker", None), ("--triton-http-address", str), ("--triton-http-port", int),
                       ("--triton-metrics-port", int)):
        if kind is None:
            parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)
    eng = parser.add_argument_group("engines")
    eng.add_argument("--engines", default=DEFAULT_ENGINES, help="engine factory, MODULE_OR_FILE:FACTORY")
    eng.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                     help="extra option passed to the factory (repeatable)")
    eng.add_argument("--cosyvoice2-dir", default=None, help="CosyVoice2-0.5B model directory")
    eng.add_argument("--sensevoice-dir", default=None, help="SenseVoiceSmall model directory")
    eng.add_argument("--asr-eval-dir", default=None, help="second ASR served as asr_eval (e.g. paraformer-zh)")
    eng.add_argument("--asr-eval-en", default=None, metavar="PATH",
                     help="Whisper checkpoint served as asr_eval_en (e.g. whisper/large-v3.pt)")
    eng.add_argument("--speaker-model", default=None,
                     help="speaker-embedding model for engines that take one (CosyVoice2 engines use its campplus.onnx)")
    eng.add_argument("--models", choices=MODEL_SETS, default="all",
                     help="training: token2wav, the reward ASR, the speech tokenizer and the engines of the weighted "
                          "reward components only (run.sh stage 1); all: also the evaluation models "
                          "(--asr-eval-dir, --asr-eval-en, the speaker/SIM model)")
    eng.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                     help="the flow under fp16 autocast (CosyVoice3: HiFT too, as upstream); default: on with CUDA")
    eng.add_argument("--flow-batch", action=argparse.BooleanOptionalAction, default=None,
                     help="decode a dynamic batch through the flow in one pass; default: on with CUDA (unless "
                          "--load-trt), off on the CPU (--engine-option flow_batch=true|false says the same)")
    eng.add_argument("--load-jit", action="store_true", help="CosyVoice2's JIT-exported flow encoder (CUDA)")
    eng.add_argument("--load-trt", action="store_true",
                     help="TensorRT flow estimator built from the model dir's flow.decoder.estimator.fp32.onnx (CUDA)")
    eng.add_argument("--prompt-bank", default=None,
                     help="speaker prompts: a .wav, a .jsonl or a directory (default CosyVoice/asset/zero_shot_prompt.wav)")
    sched = parser.add_argument_group("scheduling")
    sched.add_argument("--devices", default="0", help="comma-separated GPU ids, or 'cpu'")
    sched.add_argument("--instances-per-device", type=int, default=1)
    sched.add_argument("--max-batch-size", type=int, default=64,
                       help="most items per model call (Triton dynamic batching); requests above it are refused")
    sched.add_argument("--max-queue-delay-us", type=int, default=10000,
                       help="how long Triton waits to fill a batch, microseconds")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--reward-config", default=DEFAULT_CONFIG_PATH, help="reward YAML")
    scoring.add_argument("--reward-preset", default=None,
                         help="named preset of the reward YAML (configs/reward.yaml: intelligibility, zero_shot); "
                              "default: the file's own 'preset'")
    scoring.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="longest token sequence accepted")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--triton-log-verbose", type=int, default=0)
    return parser


def parse_devices(text: str) -> list[str]:
    """``"cpu"`` -> ["cpu"]; ``"0,1"`` -> ["cuda:0", "cuda:1"]."""
    devices = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if piece == "cpu":
            devices.append("cpu")
        elif piece.isdigit():
            devices.append(f"cuda:{int(piece)}")
        elif piece.startswith("cuda:") and piece[5:].isdigit():
            devices.append(piece)
        else:
            raise ValueError(f"--devices {text!r}: {piece!r} is neither 'cpu' nor a GPU id")
    if not devices:
        raise ValueError(f"--devices {text!r}: no device")
    return devices


def parse_engine_options(pairs: list[str]) -> dict:
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-option {pair!r}: expected KEY=VALUE")
        extra[key] = value
    return extra


def decode_settings(args, device: str) -> DecodeSettings:
    """The effective decoding settings of a slot on ``device`` (decode_settings.resolve); the
    flow_batch engine option stands for --flow-batch when the flag is not given."""
    flow_batch = args.flow_batch
    extra = parse_engine_options(args.engine_option)
    if flow_batch is None and "flow_batch" in extra:
        flow_batch = parse_bool(extra["flow_batch"], "--engine-option flow_batch")
    return resolve(device, args.fp16, flow_batch, args.load_jit, args.load_trt)


def served_engines(args, config) -> frozenset:
    """The Engines fields this server loads (--models and the reward config's weights)."""
    return wanted_engines(args.models, [name for name in COMPONENTS if config.uses(name)])


def engine_options(args, device: str, need_speaker: bool, engines: frozenset | None = None) -> EngineOptions:
    settings = decode_settings(args, device)
    return EngineOptions(
        device=device,
        cosyvoice2_dir=args.cosyvoice2_dir,
        sensevoice_dir=args.sensevoice_dir,
        asr_eval_dir=args.asr_eval_dir,
        asr_eval_en=args.asr_eval_en,
        speaker_model=args.speaker_model,
        fp16=settings.fp16,
        load_jit=settings.load_jit,
        load_trt=settings.load_trt,
        flow_batch=settings.flow_batch,
        need_speaker=need_speaker,
        # flow_batch is resolved above (the engine option stands for --flow-batch)
        extra={k: v for k, v in parse_engine_options(args.engine_option).items() if k != "flow_batch"},
        engines=engines,
    )


def describe_settings(args, config) -> str:
    """The effective settings a server starts with, for its log."""
    if args.models == "training":
        lines = [f"--models training: loads {', '.join(sorted(served_engines(args, config)))} "
                 "(evaluation models not loaded: --models all serves them)"]
    else:
        lines = ["--models all: every engine the factory builds, the evaluation models given too"]
    lines += ["decoding " + decode_settings(args, device).describe() for device in parse_devices(args.devices)]
    return "; ".join(lines)


def build_pipelines(args) -> list[Pipeline]:
    """One Pipeline (engines + prompt features) per slot: devices x instances."""
    config = load_reward_config(args.reward_config, args.reward_preset)
    prompts = load_prompts(args.prompt_bank)
    limits = Limits(max_tokens=args.max_tokens)
    if args.instances_per_device < 1:
        raise ValueError("--instances-per-device must be >= 1")
    wanted = served_engines(args, config)
    pipelines = []
    for device in parse_devices(args.devices):
        for instance in range(args.instances_per_device):
            settings = decode_settings(args, device)
            LOGGER.info("loading engines %s on %s (instance %d): %s", args.engines, device, instance,
                        settings.describe())
            for note in settings.notes:
                LOGGER.warning("%s", note)
            options = engine_options(args, device, config.uses("similarity"), wanted)
            engines, dropped = select_engines(create_engines(options, args.engines), wanted)
            for name, spec in config.weighted_plugins().items():  # plug-in components: built here, when weighted
                engine = spec.create_engine(options)
                if not isinstance(engine, ComponentEngine):
                    raise TypeError(f"reward component {name!r}: its engine ({type(engine).__name__}) does not "
                                    "implement token2wav_server.engines.ComponentEngine (sample_rate, score)")
                engines.components[name] = engine
                LOGGER.info("reward component %s: engine %s", name, type(engines.components[name]).__name__)
            if dropped:
                LOGGER.warning("%s built %s though --models %s does not serve them (their memory is spent: the "
                               "factory should ask options.wants(name)); not served", args.engines,
                               ", ".join(dropped), args.models)
            LOGGER.info("%s instance %d serves engines: %s", device, instance,
                        ", ".join([name for name in ENGINE_FIELDS if getattr(engines, name) is not None]
                                  + [f"component {name}" for name in engines.components]))
            slot = Slot(engines, prompts, need_speaker=config.uses("similarity"))
            pipelines.append(Pipeline(slot, config, limits))
    LOGGER.info("%d slot(s), %d prompt(s), reward config %s%s: %s", len(pipelines), len(prompts), args.reward_config,
                f" preset {args.reward_preset}" if args.reward_preset else "", config)
    return pipelines


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(host: str) -> bool:
    """Log that the API has no authentication when ``host`` is not a loopback address."""
    if is_loopback(host):
        return False
    LOGGER.warning(
        "binding %s: the reward server's HTTP, gRPC and metrics ports have NO authentication; anyone who can reach "
        "them can run inference and read the metrics. Keep --host 127.0.0.1 and reach it through an SSH tunnel, or "
        "put an authenticating reverse proxy in front (docs/reward_server.md, 'Exposure')", host)
    return True


def front_checks(args) -> tuple:
    """Check what the front can check cheaply before it binds any port (the worker loads
    the engines): reward config and preset, devices, engine factory, limits and policy."""
    config = load_reward_config(args.reward_config, args.reward_preset)
    for device in parse_devices(args.devices):
        decode_settings(args, device)  # conflicting decoding options stop here, before any port is bound
    served_engines(args, config)
    load_factory(args.engines)
    if args.instances_per_device < 1:
        raise ValueError("--instances-per-device must be >= 1")
    limits = GuardLimits(max_body_bytes=int(args.http_max_body_mb * 1024 * 1024), max_items=args.max_batch_size)
    policy = RestartPolicy(max_restarts=args.max_restarts if args.supervise else 0,
                           window_s=args.restart_window_s, backoff_initial_s=args.restart_backoff_s,
                           backoff_max_s=max(30.0, args.restart_backoff_s), hang_timeout_s=args.hang_timeout_s)
    return limits, policy


def run_front(args, argv: list[str]) -> int:
    warn_if_exposed(args.host)
    try:
        limits, policy = front_checks(args)
    except CONFIG_ERRORS as error:
        LOGGER.error("cannot start: %s", error)
        return EXIT_CONFIG_ERROR
    LOGGER.info("effective settings: %s", describe_settings(args, load_reward_config(args.reward_config,
                                                                                       args.reward_preset)))
    worker_command = [sys.executable, "-m", "token2wav_server", *argv, "--worker"]
    front = FrontConfig(host=args.host, http_port=args.http_port, metrics_port=args.metrics_port,
                        http_guard=args.http_guard, limits=limits)
    LOGGER.info("front: HTTP %s on %s:%d, gRPC %s:%d, metrics %s:%d; %s", "guarded" if args.http_guard else
                "UNGUARDED", args.host, args.http_port, args.host, args.grpc_port, args.host, args.metrics_port,
                f"restarts: up to {policy.max_restarts} in {policy.window_s:.0f} s" if policy.max_restarts
                else "no restarts (--no-supervise)")
    try:
        return run_supervisor(worker_command, front, policy)
    except OSError as error:  # a public port taken
        LOGGER.error("cannot start: %s", error)
        return 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.worker:
        return run_front(args, argv)
    return run_worker(args, lambda: build_pipelines(args))

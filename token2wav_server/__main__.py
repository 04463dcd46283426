"""Start the reward server: ``python -m token2wav_server [options]`` (server environment).

Serves, over Triton HTTP / gRPC (and Prometheus metrics):

- ``token2wav_asr``: speech tokens + text -> reward, transcript and reward components;
- ``token2wav``: speech tokens -> waveform;
- ``asr``: waveform -> transcript (and ``asr_eval`` when the engines have a second ASR);
- ``speaker``: waveform -> speaker embedding (when the engines have a speaker engine);
- ``speech_tokenizer``: waveform -> speech tokens (when the engines have one).

Example (stand-in engines, no weights needed)::

    python -m token2wav_server --engines token2wav_server.standin:create_engines --devices cpu

This process is the front (token2wav_server/supervisor.py): it serves the public HTTP port
through a guard (token2wav_server/http_guard.py) and the metrics port, and runs Triton in
a worker process (``--worker``, started by the front itself) that it restarts when it dies.

See docs/reward_server.md for every option.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import sysconfig
import time

import numpy as np

from .engines import EngineOptions, create_engines, load_factory
from .http_guard import DEFAULT_MAX_BODY_MB, GuardLimits
from .prompt_bank import load_prompts
from .reward_scoring import DEFAULT_CONFIG_PATH, load_reward_config
from .serving import DEFAULT_MAX_TOKENS, Limits, Pipeline, Slot
from .supervisor import EXIT_CONFIG_ERROR, FrontConfig, RestartPolicy, run_supervisor

LOGGER = logging.getLogger("token2wav_server")
DEFAULT_ENGINES = "token2wav_server.engines_cosyvoice2:create_engines"
EXIT_TRITON_DIED = 3  # the worker's status when tritonserver ended without being asked to


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
    eng.add_argument("--speaker-model", default=None,
                     help="speaker-embedding model for engines that take one (CosyVoice2 engines use its campplus.onnx)")
    eng.add_argument("--fp16", action="store_true", help="half precision flow/HiFT on CUDA")
    eng.add_argument("--load-jit", action="store_true", help="CosyVoice2 JIT-exported flow encoder")
    eng.add_argument("--load-trt", action="store_true", help="CosyVoice2 TensorRT flow decoder")
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


def engine_options(args, device: str, need_speaker: bool) -> EngineOptions:
    return EngineOptions(
        device=device,
        cosyvoice2_dir=args.cosyvoice2_dir,
        sensevoice_dir=args.sensevoice_dir,
        asr_eval_dir=args.asr_eval_dir,
        speaker_model=args.speaker_model,
        fp16=args.fp16,
        load_jit=args.load_jit,
        load_trt=args.load_trt,
        need_speaker=need_speaker,
        extra=parse_engine_options(args.engine_option),
    )


def build_pipelines(args) -> list[Pipeline]:
    """One Pipeline (engines + prompt features) per slot: devices x instances."""
    config = load_reward_config(args.reward_config)
    prompts = load_prompts(args.prompt_bank)
    limits = Limits(max_tokens=args.max_tokens)
    if args.instances_per_device < 1:
        raise ValueError("--instances-per-device must be >= 1")
    pipelines = []
    for device in parse_devices(args.devices):
        for instance in range(args.instances_per_device):
            LOGGER.info("loading engines %s on %s (instance %d)", args.engines, device, instance)
            engines = create_engines(engine_options(args, device, config.uses("similarity")), args.engines)
            slot = Slot(engines, prompts, need_speaker=config.uses("similarity"))
            pipelines.append(Pipeline(slot, config, limits))
    LOGGER.info("%d slot(s), %d prompt(s), reward config %s", len(pipelines), len(prompts), config)
    return pipelines


def _allow_ragged_batching() -> None:
    """Let Triton batch requests whose token / waveform lengths differ.

    Triton only batches requests of equal shape unless an input says
    ``allow_ragged_batch``; PyTriton 0.7 has no option for it, so we add it to the
    generated model config for every variable-length input. Each request still reaches
    the model as its own array (PyTriton passes a list of requests), so nothing is padded."""
    from pytriton.model_config import generator

    if getattr(generator.ModelConfigGenerator, "_ragged_patched", False):
        return
    original = generator.ModelConfigGenerator.get_config

    def get_config(self):
        config = original(self)
        if config.get("max_batch_size", 0) > 0:
            for spec in config.get("input", []):
                if -1 in spec["dims"]:
                    spec["allow_ragged_batch"] = True
        return config

    generator.ModelConfigGenerator.get_config = get_config
    generator.ModelConfigGenerator._ragged_patched = True


def _infer_function(method):
    name = method.__name__

    def infer(requests):
        start = time.perf_counter()
        outputs = method([request.data for request in requests], [request.parameters for request in requests])
        LOGGER.debug("%s: %d request(s) in %.1f ms", name, len(requests), (time.perf_counter() - start) * 1000)
        return outputs

    return infer


def bind_models(triton, pipelines: list[Pipeline], args) -> list[str]:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    def config():
        return ModelConfig(
            max_batch_size=args.max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
        )

    text_out = lambda name: Tensor(name=name, shape=(1,), dtype=bytes)  # noqa: E731
    float_out = lambda name: Tensor(name=name, shape=(1,), dtype=np.float32)  # noqa: E731
    token_inputs = [
        Tensor(name="TOKENS", shape=(-1,), dtype=np.int32),
        Tensor(name="TOKEN_LENS", shape=(1,), dtype=np.int32, optional=True),
        # per-item speaker prompt (serving.py); without it, the prompt bank's voice
        Tensor(name="PROMPT_WAV", shape=(-1,), dtype=np.float32, optional=True),
        Tensor(name="PROMPT_WAV_LENS", shape=(1,), dtype=np.int32, optional=True),
        Tensor(name="PROMPT_SAMPLE_RATE", shape=(1,), dtype=np.int32, optional=True),
        Tensor(name="PROMPT_TEXT", shape=(1,), dtype=bytes, optional=True),
    ]
    triton.bind(
        model_name="token2wav",
        infer_func=[_infer_function(p.token2wav) for p in pipelines],
        inputs=token_inputs,
        outputs=[Tensor(name="WAV", shape=(-1,), dtype=np.float32), Tensor(name="WAV_LENS", shape=(1,), dtype=np.int32),
                 Tensor(name="SAMPLE_RATE", shape=(1,), dtype=np.int32), text_out("PROMPT_ID"), text_out("ERRORS")],
        config=config(),
        strict=False,
    )
    models = ["token2wav", "asr"]
    wave_inputs = [
        Tensor(name="WAV", shape=(-1,), dtype=np.float32),
        Tensor(name="WAV_LENS", shape=(1,), dtype=np.int32, optional=True),
        Tensor(name="SAMPLE_RATE", shape=(1,), dtype=np.int32, optional=True),
    ]
    asr_outputs = [text_out("TRANSCRIPTS"), float_out("ASR_NLL"), text_out("ERRORS")]
    asr_models = [("asr", "asr")]
    if all(p.slot.engines.asr_eval is not None for p in pipelines):
        asr_models.append(("asr_eval", "asr_eval"))
        models.append("asr_eval")
    for model_name, which in asr_models:
        triton.bind(
            model_name=model_name,
            infer_func=[_infer_function(lambda r, prm, p=p, w=which: p.asr(r, prm, w)) for p in pipelines],
            inputs=wave_inputs,
            outputs=asr_outputs,
            config=config(),
            strict=False,
        )
    # Optional evaluation models, bound when every slot has the engine.
    if all(p.slot.engines.speaker is not None for p in pipelines):
        triton.bind(
            model_name="speaker",
            infer_func=[_infer_function(p.speaker) for p in pipelines],
            inputs=wave_inputs,
            outputs=[Tensor(name="EMBEDDING", shape=(-1,), dtype=np.float32), text_out("ERRORS")],
            config=config(),
            strict=False,
        )
        models.append("speaker")
    if all(p.slot.engines.speech_tokenizer is not None for p in pipelines):
        triton.bind(
            model_name="speech_tokenizer",
            infer_func=[_infer_function(p.speech_tokenizer) for p in pipelines],
            inputs=wave_inputs,
            outputs=[Tensor(name="TOKENS", shape=(-1,), dtype=np.int32),
                     Tensor(name="TOKEN_LENS", shape=(1,), dtype=np.int32), text_out("ERRORS")],
            config=config(),
            strict=False,
        )
        models.append("speech_tokenizer")
    # Bound last: PyTriton loads models in bind order, so once token2wav_asr is ready
    # (what clients and launch.py wait for) every model is.
    # REWARDS must stay the first output: the reference client reads outputs[0].
    triton.bind(
        model_name="token2wav_asr",
        infer_func=[_infer_function(p.token2wav_asr) for p in pipelines],
        inputs=token_inputs + [Tensor(name="GT_TEXT", shape=(1,), dtype=bytes)],
        outputs=[float_out("REWARDS"), text_out("TRANSCRIPTS"), float_out("ERROR_RATE"),
                 float_out("SPEAKER_SIMILARITY"), float_out("ASR_NLL"), text_out("ERRORS")],
        config=config(),
        strict=False,
    )
    models.append("token2wav_asr")
    return models


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
    the engines): reward config, devices, engine factory, limits and policy."""
    load_reward_config(args.reward_config)
    parse_devices(args.devices)
    parse_engine_options(args.engine_option)
    load_factory(args.engines)
    if args.instances_per_device < 1:
        raise ValueError("--instances-per-device must be >= 1")
    limits = GuardLimits(max_body_bytes=int(args.http_max_body_mb * 1024 * 1024))
    policy = RestartPolicy(max_restarts=args.max_restarts if args.supervise else 0,
                           window_s=args.restart_window_s, backoff_initial_s=args.restart_backoff_s,
                           backoff_max_s=max(30.0, args.restart_backoff_s), hang_timeout_s=args.hang_timeout_s)
    return limits, policy


def run_front(args, argv: list[str]) -> int:
    warn_if_exposed(args.host)
    try:
        limits, policy = front_checks(args)
    except (ValueError, FileNotFoundError, AttributeError, TypeError, ImportError) as error:
        LOGGER.error("cannot start: %s", error)
        return EXIT_CONFIG_ERROR
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


def _exit_with_parent(parent: int) -> None:
    """Stop this worker when the front that started it is gone (killed with SIGKILL, say),
    so no Triton is left holding the ports. Runs in a daemon thread."""
    while os.getppid() == parent:
        time.sleep(1.0)
    LOGGER.error("the front process (pid %d) is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(45.0)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.worker:
        return run_front(args, argv)
    return run_worker(args)


def run_worker(args) -> int:
    """Load the engines and serve them with Triton until SIGINT / SIGTERM (status 0) or until
    Triton dies (status 3); a start-up configuration error is status 2."""
    import threading

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()
    try:
        pipelines = build_pipelines(args)
    except (ValueError, FileNotFoundError, AttributeError, TypeError, ImportError) as error:
        LOGGER.error("cannot start: %s", error)
        return EXIT_CONFIG_ERROR

    # PyTriton's Python-backend stub links libpython; point it at this interpreter's
    # own library, or model loading fails with '_thread.RLock' ... '_recursion_count'.
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)

    from pytriton.triton import Triton, TritonConfig

    _allow_ragged_batching()
    http_address = args.triton_http_address or args.host
    http_port = args.triton_http_port or args.http_port
    triton_config = TritonConfig(
        http_address=http_address,
        http_port=http_port,
        grpc_address=args.host,
        grpc_port=args.grpc_port,
        # The front serves the public metrics port (Triton's metrics plus its own).
        metrics_address="127.0.0.1" if args.triton_metrics_port else args.host,
        metrics_port=args.triton_metrics_port or args.metrics_port,
        exit_on_error=True,
        log_verbose=args.triton_log_verbose,
    )

    stop_requested = []

    def stop(signum, _frame):
        stop_requested.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with Triton(config=triton_config) as triton:
        models = bind_models(triton, pipelines, args)
        LOGGER.info("serving %s: Triton http %s:%d, grpc %s:%d", models, http_address, http_port, args.host,
                    args.grpc_port)
        try:
            triton.serve()
        except KeyboardInterrupt:
            LOGGER.info("stopping")
    if not stop_requested:
        # PyTriton's serve() also returns when tritonserver itself ended (a crash).
        LOGGER.error("Triton stopped without being asked to (crashed or killed); see its log above")
        return EXIT_TRITON_DIED
    return 0


if __name__ == "__main__":
    sys.exit(main())

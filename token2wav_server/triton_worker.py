"""The worker process of the reward server: the Pipelines bound as Triton models and served.

The front (``cli``, ``supervisor``) starts it as ``python -m token2wav_server ... --worker``
and restarts it when it dies. Each model is bound once per slot (``infer_func`` is a list,
one per Pipeline: PyTriton runs them as model instances), with Triton's dynamic batching
(``--max-batch-size``, ``--max-queue-delay-us``) over requests of ragged lengths.
"""
from __future__ import annotations

import logging
import os
import signal
import sysconfig
import threading
import time
from typing import Callable

import numpy as np

from .serving import Pipeline, report_outputs, target_inputs, utility_outputs
from .supervisor import EXIT_CONFIG_ERROR

LOGGER = logging.getLogger("token2wav_server")
EXIT_TRITON_DIED = 3  # the worker's status when tritonserver ended without being asked to
CONFIG_ERRORS = (ValueError, FileNotFoundError, AttributeError, TypeError, ImportError)
"""What a bad option raises while configs, prompts and engine factories load: reported as
``cannot start: ...`` with status EXIT_CONFIG_ERROR, not as a crash."""


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
    # each item's language, told to the ASR (SenseVoice); absent or empty: auto
    asr_inputs = wave_inputs + [Tensor(name="LANGUAGE", shape=(1,), dtype=bytes, optional=True)]
    asr_models = ["asr"]
    for which in ("asr_eval", "asr_eval_en"):  # optional evaluation ASRs, bound when every slot has one
        if all(getattr(p.slot.engines, which) is not None for p in pipelines):
            asr_models.append(which)
            models.append(which)
    for which in asr_models:  # the model is named after the Engines field it serves
        triton.bind(
            model_name=which,
            infer_func=[_infer_function(lambda r, prm, p=p, w=which: p.asr(r, prm, w)) for p in pipelines],
            inputs=asr_inputs,
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
        inputs=token_inputs + [Tensor(name="GT_TEXT", shape=(1,), dtype=bytes),
                               # per-item language of the error metric (request_items.parse_language);
                               # optional, so clients that predate it keep working
                               Tensor(name="LANGUAGE", shape=(1,), dtype=bytes, optional=True),
                               # per-item targets of weighted plug-in components (TARGET_EMOTION), optional
                               *(Tensor(name=name, shape=(1,), dtype=bytes, optional=True)
                                 for name in target_inputs(pipelines[0].config))],
        outputs=[float_out("REWARDS"), text_out("TRANSCRIPTS"), float_out("ERROR_RATE"),
                 float_out("SPEAKER_SIMILARITY"), float_out("ASR_NLL"), text_out("ERRORS"),
                 # each weighted component's utility (NaN: not weighted), for per-component advantages
                 *(float_out(name) for name in utility_outputs(pipelines[0].config)),
                 # each weighted plug-in component's reported values
                 *(float_out(name) for name in report_outputs(pipelines[0].config))],
        config=config(),
        strict=False,
    )
    models.append("token2wav_asr")
    return models


def _exit_with_parent(parent: int) -> None:
    """Stop this worker when the front that started it is gone (killed with SIGKILL, say),
    so no Triton is left holding the ports. Runs in a daemon thread."""
    while os.getppid() == parent:
        time.sleep(1.0)
    LOGGER.error("the front process (pid %d) is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(45.0)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def run_worker(args, load_pipelines: Callable[[], list[Pipeline]]) -> int:
    """Load the engines (``load_pipelines``) and serve them with Triton until SIGINT / SIGTERM
    (status 0) or until Triton dies (status 3); a start-up configuration error is status 2.

    ``load_pipelines`` is called here, after the watch on the front has started: loading
    real engines takes minutes, and a worker whose front is gone must not go on to serve."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()
    try:
        pipelines = load_pipelines()
    except CONFIG_ERRORS as error:
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

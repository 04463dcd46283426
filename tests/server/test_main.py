"""Command line, engine loading, multi-slot set-up and the generated Triton config."""
import pytest

from token2wav_server import cli, triton_worker
from token2wav_server.engines import EngineOptions, create_engines, load_factory
from token2wav_server.standin import create_engines as standin_factory


def test_parse_devices():
    assert cli.parse_devices("0,1") == ["cuda:0", "cuda:1"]
    assert cli.parse_devices("cpu") == ["cpu"]
    assert cli.parse_devices("cuda:3, cpu") == ["cuda:3", "cpu"]
    for bad in ("gpu0", "", ","):
        with pytest.raises(ValueError):
            cli.parse_devices(bad)


def test_engine_options_and_factory_loading(tmp_path):
    assert cli.parse_engine_options(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.parse_engine_options(["novalue"])
    assert load_factory("token2wav_server.standin:create_engines") is standin_factory
    plugin = tmp_path / "my_engines.py"
    plugin.write_text("from token2wav_server.standin import create_engines as make\n"
                      "def bad(options):\n    return 42\n", encoding="utf-8")
    engines = create_engines(EngineOptions(), f"{plugin}:make")
    assert engines.asr.sample_rate == 16000
    with pytest.raises(TypeError, match="returned int"):
        create_engines(EngineOptions(), f"{plugin}:bad")
    with pytest.raises(AttributeError, match="no callable 'nope'"):
        load_factory(f"{plugin}:nope")
    with pytest.raises(ValueError, match="MODULE_OR_FILE:FACTORY"):
        load_factory("token2wav_server.standin")
    with pytest.raises(FileNotFoundError):
        load_factory(str(tmp_path / "missing.py") + ":f")


def test_asr_eval_en_checkpoint_reaches_the_factory():
    args = cli.build_parser().parse_args(["--asr-eval-en", "whisper/large-v3.pt"])
    assert cli.engine_options(args, "cpu", need_speaker=False).asr_eval_en == "whisper/large-v3.pt"
    assert cli.engine_options(cli.build_parser().parse_args([]), "cpu", need_speaker=False).asr_eval_en is None


def test_engines_bundle_checks_the_interface():
    from token2wav_server.engines import Engines
    from token2wav_server.standin import StandinAsr

    with pytest.raises(TypeError, match="does not implement Token2WavEngine"):
        Engines(token2wav=object(), asr=StandinAsr())


def test_one_slot_per_device_and_instance():
    args = cli.build_parser().parse_args(["--engines", "token2wav_server.standin:create_engines", "--devices",
                                          "cpu,cpu", "--instances-per-device", "2", "--engine-option", "delay_ms=0"])
    pipelines = cli.build_pipelines(args)
    assert len(pipelines) == 4
    assert len({id(p.slot.engines.token2wav) for p in pipelines}) == 4
    assert all(p.slot.engines.token2wav.prepared_prompts == 1 for p in pipelines)


def test_bad_start_up_options_exit_with_a_message(caplog):
    assert cli.main(["--engines", "token2wav_server.standin:create_engines", "--devices", "cpu",
                     "--reward-config", "no/such.yaml"]) == 2
    assert "no/such.yaml not found" in caplog.text
    assert cli.main(["--engines", "no_such_module:create", "--devices", "cpu"]) == 2
    caplog.clear()
    assert cli.main(["--engines", "token2wav_server.standin:create_engines", "--devices", "cpu",
                     "--reward-preset", "nope"]) == 2
    assert ("cannot start: configs/reward.yaml: unknown reward preset 'nope'; known presets: "
            "['expressive', 'intelligibility', 'zero_shot', 'zero_shot_quality']") in caplog.text


def test_reward_preset_picks_the_pipelines_reward():
    base = ["--engines", "token2wav_server.standin:create_engines", "--devices", "cpu"]
    default, = cli.build_pipelines(cli.build_parser().parse_args(base))
    assert not default.config.uses("similarity") and default.slot.prompt_embeddings is None
    zero_shot, = cli.build_pipelines(cli.build_parser().parse_args(base + ["--reward-preset", "zero_shot"]))
    assert zero_shot.config.uses("similarity") and zero_shot.slot.prompt_embeddings is not None


def test_generated_triton_config_allows_ragged_batches():
    import numpy as np
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.model_config.generator import ModelConfigGenerator
    from pytriton.model_config.triton_model_config import TensorSpec, TritonModelConfig

    triton_worker._allow_ragged_batching()
    config = TritonModelConfig(model_name="m", max_batch_size=8, batching=True,
                               inputs=[TensorSpec("TOKENS", (-1,), np.int32), TensorSpec("LEN", (1,), np.int32)],
                               outputs=[TensorSpec("OUT", (1,), np.float32)])
    generated = ModelConfigGenerator(config).get_config()
    by_name = {spec["name"]: spec for spec in generated["input"]}
    assert by_name["TOKENS"].get("allow_ragged_batch") is True
    assert "allow_ragged_batch" not in by_name["LEN"]
    assert ModelConfig and Tensor


def test_front_options_become_guard_limits_and_restart_policy():
    parser = cli.build_parser()
    base = ["--engines", "token2wav_server.standin:create_engines", "--devices", "cpu"]
    limits, policy = cli.front_checks(parser.parse_args(base + ["--http-max-body-mb", "2", "--max-restarts", "4",
                                                                "--restart-backoff-s", "0.5", "--hang-timeout-s", "0"]))
    assert limits.max_body_bytes == 2 * 1024 * 1024
    assert (policy.max_restarts, policy.backoff_initial_s, policy.hang_timeout_s) == (4, 0.5, 0)
    _, unsupervised = cli.front_checks(parser.parse_args(base + ["--no-supervise"]))
    assert unsupervised.max_restarts == 0
    with pytest.raises(ValueError, match="--max-restarts"):
        cli.front_checks(parser.parse_args(base + ["--max-restarts", "-1"]))
    usage = parser.format_help()
    assert "--no-supervise" in usage and "--no-http-guard" in usage
    assert "--worker" not in usage and "--triton-http-port" not in usage  # the front's private flags


# ---- what a server loads (--models) and how it decodes (decode_settings) --------------------------------------

STANDIN = ["--engines", "token2wav_server.standin:create_engines"]


def test_a_training_server_loads_only_what_training_needs():
    """--models training: token2wav, the reward ASR and the speech tokenizer, plus the engines of the
    components the preset weights; the evaluation models (asr_eval, speaker) are not served."""
    from token2wav_server.engines import ENGINE_FIELDS

    def served(*extra):
        (pipeline,) = cli.build_pipelines(cli.build_parser().parse_args(STANDIN + ["--devices", "cpu", *extra]))
        return {name for name in ENGINE_FIELDS if getattr(pipeline.slot.engines, name) is not None}

    assert served("--models", "training") == {"token2wav", "asr", "speech_tokenizer"}
    # similarity weighted: its engine (the reward's speaker) is loaded, still no evaluation model
    zero_shot = served("--models", "training", "--reward-preset", "zero_shot")
    assert zero_shot == {"token2wav", "asr", "speech_tokenizer", "reward_speaker"}
    assert served() == {"token2wav", "asr", "speech_tokenizer", "speaker", "asr_eval"}  # --models all (default)


def test_factories_are_asked_before_they_load_and_unwanted_engines_are_dropped(tmp_path, caplog):
    from token2wav_server.engines import COMPONENT_ENGINES, select_engines, wanted_engines
    from token2wav_server.standin import create_engines as standin

    assert wanted_engines("training", ["error_rate"]) == {"token2wav", "asr", "speech_tokenizer"}
    assert wanted_engines("training", ["error_rate", "similarity"]) >= {"reward_speaker"}
    with pytest.raises(ValueError, match="reward component 'quality' has no entry in .*COMPONENT_ENGINES"):
        wanted_engines("training", ["quality"])
    assert set(COMPONENT_ENGINES) == {"error_rate", "confidence", "similarity"}
    options = EngineOptions(engines=wanted_engines("training", ["error_rate"]))
    assert options.wants("asr") and not options.wants("asr_eval") and EngineOptions().wants("asr_eval")
    engines, dropped = select_engines(standin(), wanted_engines("training", ["error_rate", "similarity"]))
    assert sorted(dropped) == ["asr_eval", "speaker"]
    assert engines.speaker is None and engines.similarity_speaker is not None  # the reward keeps its speaker
    # a factory that ignores options.wants: what it built is not served, and the log says it was wasted
    plugin = tmp_path / "greedy.py"
    plugin.write_text("from token2wav_server.engines import EngineOptions\n"
                      "from token2wav_server.standin import create_engines as standin\n"
                      "def create_engines(options):\n    return standin(EngineOptions())\n", encoding="utf-8")
    args = cli.build_parser().parse_args(["--engines", f"{plugin}:create_engines", "--devices", "cpu",
                                          "--models", "training"])
    (pipeline,) = cli.build_pipelines(args)
    assert pipeline.slot.engines.asr_eval is None and pipeline.slot.engines.speaker is None
    assert "built speaker, asr_eval though --models training does not serve them" in caplog.text


def test_decode_settings_defaults_per_device_and_what_a_cpu_forces():
    from token2wav_server.decode_settings import resolve

    gpu = resolve("cuda:0")
    assert (gpu.fp16, gpu.flow_batch, gpu.load_jit, gpu.load_trt, gpu.notes) == (True, True, False, False, ())
    cpu = resolve("cpu")
    assert (cpu.fp16, cpu.flow_batch, cpu.load_jit, cpu.load_trt) == (False, False, False, False)
    assert resolve("cuda:1", fp16=False, flow_batch=False).describe() == (
        "cuda:1: fp16 off, flow_batch off, load_jit off, load_trt off")
    trt = resolve("cuda:0", load_trt=True)
    assert trt.load_trt and trt.fp16 and not trt.flow_batch
    assert "flow_batch off: the TensorRT estimator takes batch 2 only" in trt.describe()
    for device in ("cuda:0", "cpu"):  # a GPU config's conflict is caught by its CPU rehearsal too
        with pytest.raises(ValueError, match="--load-trt and --flow-batch"):
            resolve(device, flow_batch=True, load_trt=True)
    forced = resolve("cpu", fp16=True, flow_batch=True, load_jit=True)
    assert (forced.fp16, forced.flow_batch, forced.load_jit, forced.load_trt) == (False, True, False, False)
    forced = resolve("cpu", fp16=True, load_jit=True, load_trt=True)
    assert forced.notes == ("fp16 needs CUDA: off on cpu", "load_jit needs CUDA: off on cpu",
                            "load_trt needs CUDA: off on cpu")


def test_gpu_slots_get_the_gpu_defaults_passed_to_their_factory(tmp_path, caplog):
    """What a GPU server passes each slot's factory, on a CPU machine: a factory file records the
    EngineOptions it gets and returns stand-in engines (only the device is not real)."""
    import json
    import logging

    caplog.set_level(logging.INFO, logger="token2wav_server")
    record = tmp_path / "options.jsonl"
    plugin = tmp_path / "recording.py"
    plugin.write_text(
        "import json\nfrom token2wav_server.standin import create_engines as standin\n"
        "def create_engines(options):\n"
        f"    with open({str(record)!r}, 'a') as out:\n"
        "        out.write(json.dumps({'device': options.device, 'fp16': options.fp16, 'flow_batch': "
        "options.flow_batch, 'load_jit': options.load_jit, 'load_trt': options.load_trt, 'extra': options.extra, "
        "'engines': sorted(options.engines)}) + '\\n')\n"
        "    return standin(options)\n", encoding="utf-8")

    def passed(*argv):
        record.unlink(missing_ok=True)
        caplog.clear()
        cli.build_pipelines(cli.build_parser().parse_args(["--engines", f"{plugin}:create_engines", *argv]))
        return [json.loads(line) for line in record.read_text().splitlines()]

    slots = passed("--devices", "0,1", "--models", "training")
    assert [s["device"] for s in slots] == ["cuda:0", "cuda:1"]
    assert all(s["fp16"] and s["flow_batch"] and not s["load_jit"] and not s["load_trt"] for s in slots)
    assert all(s["engines"] == ["asr", "speech_tokenizer", "token2wav"] for s in slots)
    assert "loading engines" in caplog.text and "cuda:1: fp16 on, flow_batch on" in caplog.text
    (trt,) = passed("--devices", "0", "--load-trt")
    assert trt["load_trt"] and trt["fp16"] and not trt["flow_batch"]
    (legacy,) = passed("--devices", "0", "--engine-option", "flow_batch=false", "--engine-option", "x=1")
    assert not legacy["flow_batch"] and legacy["extra"] == {"x": "1"}  # the option stands for --no-flow-batch
    (cpu,) = passed("--devices", "cpu", "--fp16", "--flow-batch")
    assert not cpu["fp16"] and cpu["flow_batch"]
    assert "fp16 needs CUDA: off on cpu" in caplog.text


def test_conflicting_decode_options_stop_the_front_before_any_port(caplog):
    assert cli.main(STANDIN + ["--devices", "0", "--load-trt", "--flow-batch"]) == 2
    assert "cannot start: --load-trt and --flow-batch" in caplog.text


def test_the_effective_settings_line():
    from token2wav_server.reward_scoring import load_reward_config

    args = cli.build_parser().parse_args(STANDIN + ["--devices", "0,cpu", "--models", "training", "--no-fp16"])
    assert cli.describe_settings(args, load_reward_config(args.reward_config, "zero_shot")) == (
        "--models training: loads asr, reward_speaker, speech_tokenizer, token2wav (evaluation models not loaded: "
        "--models all serves them); decoding cuda:0: fp16 off, flow_batch on, load_jit off, load_trt off; "
        "decoding cpu: fp16 off, flow_batch off, load_jit off, load_trt off")

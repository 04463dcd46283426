# shellcheck shell=bash
# Shell functions the recipe's scripts share; source it, do not run it:
#
#   source "$repo/scripts/lib.sh"
#
# log / die: icefall-style lines (time, file:line:function, message). They go to stdout
# unless the script sets log_fd=2 (scripts whose stdout is data: train_grpo.sh's composed
# config, ray_cluster.sh's --dry-run command). die exits 1.
# has_cuda / default_device: what the GPU-or-CPU choices of every script go by (nvidia-smi).
# cuda_gpu_problem / select_train_device: the training device of a profile (train_device=auto|cuda|cpu);
# cuda dies naming the check that failed and the fix, auto logs what it picked and why.
# cuda_driver_problem / use_cuda_compat: the NVIDIA driver against the CUDA wheels of the environments
# (cuda_wheels: cu130 needs driver >= 580, cu128 >= 525), and NVIDIA's forward-compatibility libraries
# (cuda_compat_dir) for older drivers on data-center GPUs.
# require_env / require_dir / require_gpus: checks that die with what is missing and how to get it
# (require_env reads $trainer_python and $server_python, require_gpus names $current_stage:
# run.sh sets them).
# algorithm_preset_names / check_algorithm_preset: the presets of configs/algorithm_presets.yaml; an
# unknown algorithm_preset dies listing the known ones (run.sh and train_grpo.sh, before anything starts).

log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*" >&"${log_fd:-1}"
}

die() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) ERROR: $*" >&2
  exit 1
}

has_cuda() {
  # a CUDA GPU is usable when nvidia-smi exists and lists one
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

default_device() {
  if has_cuda; then echo cuda; else echo cpu; fi
}

cuda_gpu_problem() {
  # $1: GPUs a node needs. Prints nothing and returns 0 when nvidia-smi works and at least $1 GPUs are
  # visible (all it lists, or the entries of a non-empty CUDA_VISIBLE_DEVICES that it lists); else
  # prints which check failed and returns 1.
  local needed=$1 listing listed visible=0 entry
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "check 'nvidia-smi on PATH' failed: nvidia-smi not found, so no NVIDIA driver is installed. Fix: install" \
         "the NVIDIA driver (>= 580 for the CUDA 13 torch 2.11.0 wheels)"
    return 1
  fi
  if ! listing=$(nvidia-smi -L 2>&1); then
    echo "check 'nvidia-smi -L' failed: $(echo "$listing" | head -n 1). Fix: repair or reinstall the NVIDIA driver" \
         "(>= 580 for the CUDA 13 torch 2.11.0 wheels) until 'nvidia-smi -L' lists the GPUs"
    return 1
  fi
  local driver_problem
  if driver_problem=$(cuda_driver_problem); then :; else
    echo "$driver_problem"
    return 1
  fi
  listed=$(grep -c '^GPU [0-9]' <<<"$listing" || true)
  if [ "$listed" -eq 0 ]; then
    echo "check 'nvidia-smi -L lists a GPU' failed: it lists none. Fix: check the driver and that the GPUs are" \
         "passed into this machine or container"
    return 1
  fi
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    # an index must be one nvidia-smi lists; a UUID (GPU-...) or MIG id must appear in its listing
    for entry in ${CUDA_VISIBLE_DEVICES//,/ }; do
      if [[ $entry =~ ^[0-9]+$ ]]; then
        if [ "$entry" -lt "$listed" ]; then visible=$((visible + 1)); fi
      elif grep -qF "$entry" <<<"$listing"; then
        visible=$((visible + 1))
      fi
    done
    if [ "$visible" -lt "$needed" ]; then
      echo "check 'GPUs visible >= $needed' failed: CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' names $visible" \
           "of the $listed GPU(s) nvidia-smi lists. Fix: lower n_gpus_per_node to $visible, or name more of the" \
           "listed GPUs in CUDA_VISIBLE_DEVICES"
      return 1
    fi
  elif [ "$listed" -lt "$needed" ]; then
    echo "check 'GPUs visible >= $needed' failed: nvidia-smi lists $listed GPU(s). Fix: lower n_gpus_per_node to" \
         "$listed (and CUDA_VISIBLE_DEVICES to match)"
    return 1
  fi
  return 0
}

cuda_wheels_of_env() {
  # the CUDA wheels the trainer environment was built with (its stamp, setup_env.sh); cu130 when unknown
  local stamp
  stamp="$(dirname "$(dirname "${trainer_python:-.venv/bin/python}")")/.ttsrl-requirements"
  sed -n 's/^cuda_wheels //p' "$stamp" 2>/dev/null | head -n 1 | grep . || echo cu130
}

cuda_min_driver() {
  # $1: cu130|cu128 -> the oldest NVIDIA driver (major) its wheels run on (CUDA 13: 580; CUDA 12.x
  # with minor-version compatibility: 525)
  case $1 in cu130) echo 580 ;; *) echo 525 ;; esac
}

cuda_driver_problem() {
  # Prints nothing and returns 0 when nvidia-smi's driver runs the CUDA wheels of the trainer
  # environment (or NVIDIA's forward-compatibility libraries in cuda_compat_dir bridge the gap); else
  # prints the check that failed with the fixes and returns 1.
  local driver major wheels needed
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  major=${driver%%.*}
  [[ $major =~ ^[0-9]+$ ]] || return 0  # no version to compare: the GPU checks speak for themselves
  wheels=$(cuda_wheels_of_env)
  needed=$(cuda_min_driver "$wheels")
  [ "$major" -ge "$needed" ] && return 0
  if [ -n "${cuda_compat_dir:-}" ] && [ -e "$cuda_compat_dir/libcuda.so.1" ]; then
    return 0  # forward compatibility (data-center GPUs): use_cuda_compat puts it on LD_LIBRARY_PATH
  fi
  echo "check 'NVIDIA driver >= $needed for the $wheels wheels' failed: nvidia-smi reports driver $driver." \
       "Fix, one of: (a) data-center GPUs (A100, H100, H200, L40S...): keep the wheels and install NVIDIA's" \
       "forward-compatibility package (apt/dnf install cuda-compat-13-0 from NVIDIA's CUDA repository), then set" \
       "cuda_compat_dir=/usr/local/cuda-13.0/compat; (b) any GPU with driver >= 525: CUDA 12.8 wheels," \
       "cuda_wheels=cu128 bash run.sh --force -1 -1 (rebuilds both environments); (c) a driver >= 580" \
       "(README 'Hardware')"
  return 1
}

use_cuda_compat() {
  # cuda_compat_dir set: NVIDIA's forward-compatibility libcuda goes first on LD_LIBRARY_PATH, for this
  # run and every process it starts (scripts/train_grpo.sh passes it to the Ray workers too)
  [ -n "${cuda_compat_dir:-}" ] || return 0
  [ -e "$cuda_compat_dir/libcuda.so.1" ] || die "cuda_compat_dir=$cuda_compat_dir has no libcuda.so.1: install" \
    "NVIDIA's forward-compatibility package (cuda-compat-13-0) there, or set cuda_compat_dir= (README 'Hardware')"
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$cuda_compat_dir:"*) ;;
    *) export LD_LIBRARY_PATH="$cuda_compat_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
  esac
}

select_train_device() {
  # $1: train_device (auto|cuda|cpu), $2: GPUs per node the run needs. Prints cuda or cpu on stdout
  # (logs go to stderr). cuda with a failed GPU check dies naming the check and the fixes; auto
  # says loudly which device it picked and why. TTSRL_SKIP_GPU_CHECK=1 lets cuda past the check:
  # only scripts/check_cuda_envs.sh sets it, to compose the GPU command on a machine without GPUs.
  local wanted=$1 needed=$2 problem
  case $wanted in
    cpu)
      log "training device: cpu (train_device=cpu)" >&2
      echo cpu ;;
    cuda)
      if [ "${TTSRL_SKIP_GPU_CHECK:-0}" = 1 ]; then
        log "WARNING: training device: cuda WITHOUT the GPU check (TTSRL_SKIP_GPU_CHECK=1; for" \
            "scripts/check_cuda_envs.sh, which only composes the command)" >&2
        echo cuda
        return 0
      fi
      if problem=$(cuda_gpu_problem "$needed"); then
        log "training device: cuda (train_device=cuda; $needed GPU(s) per node visible)" >&2
        echo cuda
      else
        die "train_device=cuda needs $needed CUDA GPU(s) per node (n_gpus_per_node=$needed), but the $problem." \
            "Or, to train on the CPU: set train_device=cpu (CPU training is for tiny models: bash run.sh --config" \
            "configs/smoke.sh)"
      fi ;;
    auto)
      if problem=$(cuda_gpu_problem "$needed"); then
        log "training device: cuda (train_device=auto picked cuda: $needed GPU(s) per node visible)" >&2
        echo cuda
      else
        log "WARNING: training device: cpu. train_device=auto picked the CPU because the $problem." \
            "Set train_device=cuda to stop instead, or train_device=cpu to say the CPU is meant" >&2
        echo cpu
      fi ;;
    *)
      die "train_device must be auto, cuda or cpu, got '$wanted' (set it in the config file or the environment)" ;;
  esac
}

require_env() {
  # $1: trainer|server; the interpreters are $trainer_python and $server_python
  local python=$trainer_python
  [ "$1" = server ] && python=$server_python
  [ -x "$python" ] || die "the $1 environment is missing ($python); run 'bash run.sh -1 -1' first"
}

require_gpus() {
  # $1: how many GPUs the current stage ($current_stage) needs
  has_cuda || die "stage ${current_stage:-?} needs CUDA GPUs and nvidia-smi finds none (see README: 'What runs where')"
  local driver_problem
  driver_problem=$(cuda_driver_problem) || die "stage ${current_stage:-?} needs CUDA GPUs, but the $driver_problem"
  local count
  count=$(nvidia-smi -L | wc -l)
  [ "$count" -ge "$1" ] || die "stage ${current_stage:-?} needs $1 GPUs, nvidia-smi lists $count; lower n_gpus_per_node"
}

require_dir() {
  # $1: directory, $2: what it is and how to get it
  [ -d "$1" ] || die "$1 not found: $2"
}

algorithm_preset_names() {
  # $1: configs/algorithm_presets.yaml; prints its preset names, sorted, one per line (the two-space
  # keys under `presets:`; ttsrl/training/algorithm_presets.py reads the same file with YAML). Shell
  # only, so run.sh checks the name before stage -1 has built any environment.
  awk '/^presets:/ { inside = 1; next }
       inside && /^[^ #]/ { inside = 0 }
       inside && /^  [A-Za-z0-9_-]+:/ { sub(/^  /, ""); sub(/:.*/, ""); print }' "$1" | sort
}

check_algorithm_preset() {
  # $1: the algorithm_preset setting, $2: the presets file; dies naming the known presets
  local names
  [ -f "$2" ] || die "algorithm presets file $2 not found (it ships with the recipe: restore it from git)"
  names=$(algorithm_preset_names "$2")
  grep -qxF -- "$1" <<<"$names" || die "unknown algorithm_preset (configs/default.sh) '$1'; known presets:" \
    "$(paste -sd, <<<"$names" | sed 's/,/, /g') ($2)"
}

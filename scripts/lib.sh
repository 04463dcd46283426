# shellcheck shell=bash
# Shell functions the recipe's scripts share; source it, do not run it:
#
#   source "$repo/scripts/lib.sh"
#
# log / die: icefall-style lines (time, file:line:function, message). They go to stdout
# unless the script sets log_fd=2 (scripts whose stdout is data: train_grpo.sh's composed
# config, ray_cluster.sh's --dry-run command). die exits 1.
# has_cuda / default_device: what the GPU-or-CPU choices of every script go by (nvidia-smi).
# require_env / require_dir / require_gpus: checks that die with what is missing and how to get it
# (require_env reads $trainer_python and $server_python, require_gpus names $current_stage:
# run.sh sets them).

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

require_env() {
  # $1: trainer|server; the interpreters are $trainer_python and $server_python
  local python=$trainer_python
  [ "$1" = server ] && python=$server_python
  [ -x "$python" ] || die "the $1 environment is missing ($python); run 'bash run.sh -1 -1' first"
}

require_gpus() {
  # $1: how many GPUs the current stage ($current_stage) needs
  has_cuda || die "stage ${current_stage:-?} needs CUDA GPUs and nvidia-smi finds none (see README: 'What runs where')"
  local count
  count=$(nvidia-smi -L | wc -l)
  [ "$count" -ge "$1" ] || die "stage ${current_stage:-?} needs $1 GPUs, nvidia-smi lists $count; lower n_gpus_per_node"
}

require_dir() {
  # $1: directory, $2: what it is and how to get it
  [ -d "$1" ] || die "$1 not found: $2"
}

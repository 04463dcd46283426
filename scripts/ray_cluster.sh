#!/usr/bin/env bash
# Start or stop the Ray cluster for multi-node GRPO (stage 2 with nnodes > 1).
#
#   bash scripts/ray_cluster.sh head [--block] [--dry-run]           # on the head node, first
#   bash scripts/ray_cluster.sh worker HEAD_IP [--block] [--dry-run] # on every other node
#   bash scripts/ray_cluster.sh status                               # nodes and GPUs Ray sees
#   bash scripts/ray_cluster.sh stop                                 # stops Ray on THIS node
#
# Every node needs the same checkout path, the trainer env (.venv), the model and
# the parquet files (a shared filesystem is simplest) and one reward server of its
# own (bash run.sh 1 1 with server_host=0.0.0.0). Then, on the head node:
#
#   export RAY_ADDRESS=HEAD_IP:6379
#   nnodes=2 REWARD_SERVER_URL=grpc://node1:8001,grpc://node2:8001 bash run.sh 2 2
#
# main_ppo joins the running cluster through RAY_ADDRESS; the reward hook spreads
# requests over all the listed servers.
#
# Settings (environment, or the config file $TTSRL_CONFIG / configs/default.sh):
#   n_gpus_per_node  GPUs Ray offers on this node (default from the config)
#   ray_port         head port (6379)
#   node_ip          this node's address (default: first of `hostname -I`)
#   ray_bin          the ray CLI (default .venv/bin/ray)
# --block keeps `ray start` in the foreground (for srun / containers);
# --dry-run prints the command instead of running it.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib.sh
source "$repo_root/scripts/lib.sh"
log_fd=2  # stdout is the command itself with --dry-run
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

role=${1:-}
[ -n "$role" ] || { usage; exit 1; }
shift
head_ip=
if [ "$role" = worker ]; then
  [ $# -ge 1 ] && [[ $1 != --* ]] || die "worker needs the head node's address: ray_cluster.sh worker HEAD_IP"
  head_ip=$1
  shift
fi
block=()
dry_run=0
for arg in "$@"; do
  case $arg in
    --block) block=(--block) ;;
    --dry-run) dry_run=1 ;;
    *) die "unknown option '$arg'" ;;
  esac
done

config_file=${TTSRL_CONFIG:-$repo_root/configs/default.sh}
[ -f "$config_file" ] || die "config file $config_file not found"
# shellcheck source=../configs/default.sh
source "$config_file"
: "${ray_port:=6379}"
: "${ray_bin:=$repo_root/.venv/bin/ray}"
if [ -z "${node_ip:-}" ]; then
  node_ip=$(hostname -I 2>/dev/null | awk '{print $1}')
  [ -n "$node_ip" ] || node_ip=127.0.0.1
fi
[[ $n_gpus_per_node =~ ^[0-9]+$ ]] || die "n_gpus_per_node must be an integer, got '$n_gpus_per_node'"

run() {
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@"; echo
  else
    [ -x "$ray_bin" ] || command -v "$ray_bin" >/dev/null || die "ray CLI $ray_bin not found: run 'bash scripts/setup_env.sh trainer' (or set ray_bin)"
    "$@"
  fi
}

# Ray workers inherit this environment: make the repo (ttsrl, reward_tts.py) importable.
export PYTHONPATH=$repo_root${PYTHONPATH:+:$PYTHONPATH}
cd "$repo_root"

case $role in
  head)
    run "$ray_bin" start --head --node-ip-address="$node_ip" --port="$ray_port" \
      --num-gpus="$n_gpus_per_node" "${block[@]}"
    if [ "$dry_run" = 0 ] && [ ${#block[@]} = 0 ]; then
      log "Ray head is up at $node_ip:$ray_port with $n_gpus_per_node GPU(s)."
      log "On every other node run:  bash scripts/ray_cluster.sh worker $node_ip"
      log "Then here:  export RAY_ADDRESS=$node_ip:$ray_port"
      log "            nnodes=N REWARD_SERVER_URL=grpc://NODE1:8001,grpc://NODE2:8001,... bash run.sh 2 2"
    fi
    ;;
  worker)
    run "$ray_bin" start --address="$head_ip:$ray_port" --node-ip-address="$node_ip" \
      --num-gpus="$n_gpus_per_node" "${block[@]}"
    if [ "$dry_run" = 0 ] && [ ${#block[@]} = 0 ]; then
      log "joined the Ray cluster at $head_ip:$ray_port with $n_gpus_per_node GPU(s); check with: bash scripts/ray_cluster.sh status"
    fi
    ;;
  status) run "$ray_bin" status ${RAY_ADDRESS:+--address="$RAY_ADDRESS"} ;;
  stop) run "$ray_bin" stop ;;
  *) usage; die "unknown role '$role' (head, worker, status or stop)" ;;
esac

#!/usr/bin/env bash
# Runs `python -m pivq_jax.main` on one GPU host, or on this node of a multi-node job.
# See launch/README.md; `launch/gpu.sh --help` lists the options.
set -euo pipefail

prog=${0##*/}
usage() {
  cat <<EOF
Usage: $prog --config=FILE --workdir=DIR [--mode=MODE] [--venv=DIR]
           [--num-nodes=N --node-rank=R --coordinator=HOST:PORT | --slurm [--port=PORT]]
           [--dry-run] [-- TRAINER_FLAGS...]

One host (the default): runs python -m pivq_jax.main on all of this host's GPUs; no
distributed runtime is started. Several nodes: run it once per node with the same
--num-nodes and --coordinator and that node's --node-rank (0 is the coordinator host); it
sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, from which the trainer
calls jax.distributed.initialize().

  --config=FILE            e.g. configs/celebahq.py (optionally FILE:arg).
  --workdir=DIR            Checkpoints and metrics; on several nodes a path every node
                           sees (shared filesystem or gs://).
  --mode=MODE              Trainer mode (default: train).
  --venv=DIR               Activate this virtualenv first.
  --num-nodes=N            Number of nodes, one process each (default: 1).
  --node-rank=R            This node's rank, 0 <= R < N (default: 0).
  --coordinator=HOST:PORT  Address of rank 0's coordinator; required when N > 1.
  --slurm                  Take N and R from SLURM_NNODES (or SLURM_NTASKS) and
                           SLURM_PROCID, and the coordinator host from the first host of
                           SLURM_JOB_NODELIST. Start one task per node:
                           srun --ntasks-per-node=1 launch/gpu.sh --slurm ...
  --port=PORT              Coordinator port with --slurm (default: 12345).
  --dry-run                Print the commands instead of running them.
  -h, --help               This help.
  -- TRAINER_FLAGS...      Passed verbatim to pivq_jax.main, e.g. -- --config.batch_size=32

Environment: PIVQ_LAUNCH_PYTHON is the python to run (default: python).
EOF
}
# shellcheck source=launch/options.sh
source "$(dirname "${BASH_SOURCE[0]}")/options.sh"  # die, parse_options

# Prints a command shell-quoted (copy-pastable).
print_cmd() {
  local line
  printf -v line '%q ' "$@"
  line=${line% }
  # Under --slurm --dry-run the coordinator host is a shell variable set by the printed
  # scontrol line; keep it expandable so the output still pastes.
  line=${line//'\$\{FIRST_HOST\}'/'"${FIRST_HOST}"'}
  printf '%s\n' "$line"
}

config= workdir= mode=train venv= num_nodes= node_rank= coordinator= port=12345
slurm=0 dry_run=0
set_option() {
  case $1 in
    --config) config=$2 ;;
    --workdir) workdir=$2 ;;
    --mode) mode=$2 ;;
    --venv) venv=$2 ;;
    --num-nodes) num_nodes=$2 ;;
    --node-rank) node_rank=$2 ;;
    --coordinator) coordinator=$2 ;;
    --port) port=$2 ;;
    --slurm) slurm=1 ;;
    --dry-run) dry_run=1 ;;
  esac
}
parse_options "--config --workdir --mode --venv --num-nodes --node-rank --coordinator --port" \
  "--slurm --dry-run" "$@"

[[ -n $config ]] || die "--config is required (see --help)."
[[ -n $workdir ]] || die "--workdir is required (see --help)."
[[ $port =~ ^[0-9]+$ ]] || die "--port must be a number, not '$port'."

commands=()  # extra lines --dry-run prints before the run
if ((slurm)); then
  [[ -z $num_nodes && -z $node_rank ]] || die "--slurm takes the node count and rank from SLURM; drop --num-nodes and --node-rank."
  [[ -n ${SLURM_PROCID:-} ]] || die "--slurm needs SLURM_PROCID; start this script with srun inside the allocation."
  node_rank=$SLURM_PROCID
  num_nodes=${SLURM_NNODES:-${SLURM_NTASKS:-}}
  [[ -n $num_nodes ]] || die "--slurm needs SLURM_NNODES or SLURM_NTASKS; start this script with srun inside the allocation."
  # Each process drives all GPUs of its node, so more tasks than nodes would collide.
  if [[ -n ${SLURM_NTASKS:-} && $SLURM_NTASKS != "$num_nodes" ]]; then
    die "--slurm runs one process per node, but SLURM_NTASKS=$SLURM_NTASKS with $num_nodes nodes; use srun --ntasks-per-node=1."
  fi
fi
num_nodes=${num_nodes:-1}
node_rank=${node_rank:-0}
[[ $num_nodes =~ ^[0-9]+$ ]] && ((10#$num_nodes >= 1)) || die "--num-nodes must be a positive integer, not '$num_nodes'."
[[ $node_rank =~ ^[0-9]+$ ]] || die "--node-rank must be a non-negative integer, not '$node_rank'."
num_nodes=$((10#$num_nodes)) node_rank=$((10#$node_rank))
((node_rank < num_nodes)) || die "--node-rank=$node_rank must be less than --num-nodes=$num_nodes."

if ((slurm && num_nodes > 1)) && [[ -z $coordinator ]]; then
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "--slurm needs SLURM_JOB_NODELIST (or pass --coordinator)."
  # Rank 0 runs on the first host of the allocation; scontrol expands node[01-04] lists.
  hostnames=(scontrol show hostnames "$SLURM_JOB_NODELIST")
  if ((dry_run)); then  # scontrol may be missing where one dry-runs
    commands+=("FIRST_HOST=\$($(print_cmd "${hostnames[@]}") | head -n 1)")
    coordinator="\${FIRST_HOST}:$port"
  else
    mapfile -t hosts < <("${hostnames[@]}")
    [[ -n ${hosts[0]:-} ]] || die "'${hostnames[*]}' listed no hosts."
    coordinator=${hosts[0]}:$port
  fi
fi

run_cmd=()
if ((num_nodes > 1)); then
  [[ -n $coordinator ]] || die "--coordinator=HOST:PORT is required with --num-nodes=$num_nodes."
  [[ $coordinator =~ .:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, not '$coordinator'."
  # The trainer's contract: these three make it call jax.distributed.initialize().
  run_cmd=(env JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="$num_nodes"
           JAX_PROCESS_ID="$node_rank")
elif [[ -n $coordinator ]]; then
  printf '%s: one node, so --coordinator is ignored.\n' "$prog" >&2
fi
run_cmd+=("${PIVQ_LAUNCH_PYTHON:-python}" -m pivq_jax.main --config="$config"
          --workdir="$workdir" --mode="$mode" "${extra[@]}")

if ((dry_run)); then
  [[ -z $venv ]] || print_cmd source "$venv/bin/activate"
  for line in "${commands[@]}"; do printf '%s\n' "$line"; done
  print_cmd "${run_cmd[@]}"
  exit 0
fi
if [[ -n $venv ]]; then
  [[ -f $venv/bin/activate ]] || die "--venv=$venv has no bin/activate."
  set +u  # activate scripts are not written for `set -u`
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  set -u
fi
# exec: the trainer itself receives the scheduler's SIGTERM (it saves and exits 0).
exec "${run_cmd[@]}"

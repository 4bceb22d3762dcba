#!/usr/bin/env bash
# Runs `python -m pivq_jax.main` on every worker of a Cloud TPU VM (one host or a pod slice).
# See launch/README.md; `launch/tpu_vm.sh --help` lists the options.
set -euo pipefail

prog=${0##*/}
usage() {
  cat <<EOF
Usage: $prog --name=NAME --zone=ZONE --accelerator=TYPE --workdir=DIR --config=FILE
           [--version=IMAGE] [--project=PROJECT] [--tfds-data-dir=DIR] [--mode=MODE]
           [--create] [--spot] [--detach] [--dry-run] [-- TRAINER_FLAGS...]

Ships the git HEAD of this repository to every worker of the TPU VM NAME, installs it into
a virtualenv there (~/pivq_jax/venv: the [tpu] extra under constraints.txt) and runs
  PIVQ_JAX_DISTRIBUTED=1 python -m pivq_jax.main --config=FILE --workdir=DIR --mode=MODE ...
on all workers at once. Every step is one command; --dry-run prints them instead.

  --name=NAME            TPU VM name.
  --zone=ZONE            e.g. us-central2-b.
  --accelerator=TYPE     e.g. v4-8 (one host) or v5p-64 (a pod slice of several hosts).
  --workdir=DIR          Checkpoints and metrics. Must be gs://... on a multi-host slice
                         (every worker writes the same checkpoint); an absolute path on the
                         VM is fine on one host.
  --config=FILE          Config path relative to the repository root, e.g.
                         configs/celebahq.py (optionally FILE:arg).
  --tfds-data-dir=DIR    Sets TFDS_DATA_DIR and --config.data.data_dir on the workers.
  --mode=MODE            Trainer mode (default: train).
  --version=IMAGE        TPU software version for --create (default: tpu-ubuntu2204-base).
  --project=PROJECT      gcloud project (default: gcloud's configured one).
  --python=PYTHON        Python (>= 3.11) on the workers that builds the venv
                         (default: python3.11, apt-installed if missing).
  --create               Create the TPU VM first.
  --spot                 With --create: a Spot VM (preemptible; re-run to resume).
  --detach               Start the run in the background on every worker (it survives the
                         ssh session; log in ~/pivq_jax/logs/) instead of streaming it.
  --dry-run              Print the commands instead of running them.
  -h, --help             This help.
  -- TRAINER_FLAGS...    Passed verbatim to pivq_jax.main, e.g. -- --config.batch_size=32
EOF
}
# shellcheck source=launch/options.sh
source "$(dirname "${BASH_SOURCE[0]}")/options.sh"  # die, parse_options
note() { printf '%s: %s\n' "$prog" "$*" >&2; }

# Prints a command shell-quoted (copy-pastable), or runs it.
run() {
  if ((dry_run)); then
    local line
    printf -v line '%q ' "$@"
    printf '%s\n' "${line% }"
  else
    "$@"
  fi
}
# Shell-quotes its arguments into one string (for commands run by the workers' shell).
quote() {
  local line
  printf -v line '%q ' "$@"
  printf '%s' "${line% }"
}

name= zone= accelerator= workdir= config= tfds_data_dir= project=
version=tpu-ubuntu2204-base mode=train python=python3.11
create=0 spot=0 detach=0 dry_run=0
set_option() {
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --accelerator) accelerator=$2 ;;
    --workdir) workdir=$2 ;;
    --config) config=$2 ;;
    --tfds-data-dir) tfds_data_dir=$2 ;;
    --mode) mode=$2 ;;
    --version) version=$2 ;;
    --project) project=$2 ;;
    --python) python=$2 ;;
    --create) create=1 ;;
    --spot) spot=1 ;;
    --detach) detach=1 ;;
    --dry-run) dry_run=1 ;;
  esac
}
parse_options \
  "--name --zone --accelerator --workdir --config --tfds-data-dir --mode --version --project --python" \
  "--create --spot --detach --dry-run" "$@"

for required in name zone accelerator workdir config; do
  [[ -n ${!required} ]] || die "--${required} is required (see --help)."
done
((spot == 0 || create == 1)) || die "--spot only applies with --create."

# Slice names end in TensorCores (v2-v4, v5p) or chips (v5e, v6e); either way more than 8
# means several hosts. An unrecognised name is treated as multi-host, the strict case.
multi_host=1
if [[ $accelerator =~ ^[a-z0-9]+-([0-9]+)$ ]] && ((BASH_REMATCH[1] <= 8)); then
  multi_host=0
fi
if [[ $workdir != gs://* ]]; then
  ((multi_host == 0)) || die "--workdir must be a gs:// path on the multi-host slice $accelerator, so that every worker reads and writes the same checkpoints."
  [[ $workdir == /* ]] || die "--workdir must be gs://... or an absolute path on the VM (a relative one would land in the shipped code, which is replaced on every launch)."
fi

# The workers get the committed code only; check the config is part of it.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sha=$(git -C "$repo" rev-parse --short=12 HEAD) || die "$repo is not a git checkout with a commit."
config_file=${config%%:*}
if [[ $config_file != /* ]] && ! git -C "$repo" cat-file -e "HEAD:$config_file" 2>/dev/null; then
  die "--config file '$config_file' is not in git HEAD $sha, which is what gets shipped."
fi
git -C "$repo" diff --quiet HEAD 2>/dev/null || note "uncommitted changes are not shipped; the workers run HEAD $sha."
# The [tpu] extra under constraints.txt: jax[tpu] at the tested jax, so libtpu matches.
git -C "$repo" cat-file -e HEAD:constraints.txt 2>/dev/null || die "constraints.txt is not in git HEAD $sha."

gcloud_where=(--zone="$zone")
[[ -z $project ]] || gcloud_where+=(--project="$project")
tarball=${TMPDIR:-/tmp}/pivq_jax-$name-$sha.tar.gz
remote=pivq_jax  # under each worker's home: src/ (replaced per launch), venv/, logs/

# 1. The VM.
if ((create)); then
  create_cmd=(gcloud compute tpus tpu-vm create "$name" "${gcloud_where[@]}"
              --accelerator-type="$accelerator" --version="$version")
  ((spot == 0)) || create_cmd+=(--spot)
  run "${create_cmd[@]}"
fi

# 2. The code: a tarball of HEAD on every worker (the local copy goes even if a step fails).
((dry_run)) || trap 'rm -f "$tarball"' EXIT
run git -C "$repo" archive --format=tar.gz --output="$tarball" HEAD
run gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote.tar.gz" "${gcloud_where[@]}" --worker=all
run rm -f "$tarball"

# 3. Install on every worker: fresh src/, a venv that persists across launches (re-runs only
#    re-resolve pins). TPU images may lack Python >= 3.11, hence the apt fallback.
py=$(quote "$python")
install="set -e; cd ~; rm -rf $remote/src; mkdir -p $remote/src $remote/logs"
install+="; tar -xzf $remote.tar.gz -C $remote/src; rm -f $remote.tar.gz"
install+="; command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -yq $py $(quote "$python-venv"); }"
install+="; [ -x $remote/venv/bin/python ] || $py -m venv $remote/venv"
install+="; $remote/venv/bin/pip install -q --upgrade pip"
install+="; $remote/venv/bin/pip install -q -e $(quote "$remote/src[tpu]") -c $remote/src/constraints.txt"
# The FID Inception weights --mode=eval reads, converted once per worker into its cache.
install+="; $remote/venv/bin/python $remote/src/third_party/fid_inception_weights.py"
run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_where[@]}" --worker=all --command="$install"

# 4. The run, on all workers at once: PIVQ_JAX_DISTRIBUTED=1 makes the trainer call
#    jax.distributed.initialize(), which finds the slice's workers itself.
env_vars=(PIVQ_JAX_DISTRIBUTED=1)
trainer=(../venv/bin/python -m pivq_jax.main --config="$config" --workdir="$workdir" --mode="$mode")
if [[ -n $tfds_data_dir ]]; then
  env_vars+=(TFDS_DATA_DIR="$tfds_data_dir")
  trainer+=(--config.data.data_dir="$tfds_data_dir")
fi
trainer+=("${extra[@]}")
main=$(quote env "${env_vars[@]}" "${trainer[@]}")
if ((detach)); then
  # setsid + nohup + no terminal fds: the run outlives the ssh session.
  log=logs/$name-$(date -u +%Y%m%d-%H%M%S).log
  command="cd ~/$remote/src && nohup setsid $main > ../$log 2>&1 < /dev/null & echo started, log: ~/$remote/$log"
  note "detached; follow worker 0 with: gcloud compute tpus tpu-vm ssh $name $(quote "${gcloud_where[@]}") --worker=0 --command='tail -f ~/$remote/$log'"
else
  # exec: the trainer itself receives SIGTERM on preemption (it saves and exits 0).
  command="cd ~/$remote/src && exec $main"
fi
run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_where[@]}" --worker=all --command="$command"

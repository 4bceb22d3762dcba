#!/usr/bin/env bash
# Every matching measurement a GPU is needed for, in one run (docs/benchmarks.md, "NVIDIA
# H100"): all solvers on the four paper-scale families (512x4096, B=8), the auction both
# as pure JAX (with its per-image and lock-step round counts) and as the fused Pallas
# kernel (one launch per solve), the pure-JAX auction and nearest VQ again with XLA's
# command buffers (while loops and conditionals replayed on the device, no host round trip
# per iteration), and the faces size (32x1,024).
#
#   OUT=/tmp/gpu_matching benchmarks/gpu_matching.sh          # ~5 minutes on an H100
#   QUICK=1 OUT=/tmp/gpu_matching benchmarks/gpu_matching.sh  # the faces sizes only
#
# Needs jax with its GPU plugin, scipy and ott-jax (with jaxopt); TensorFlow is not
# imported. Each step runs even if one before it failed; the script fails if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_matching_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
status=0

step() {  # step NAME [ENV=VALUE ...] -- ARGS...: benchmarks/matching.py, logged under $out
  local name=$1
  shift
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  echo "== $name: ${envs[*]} benchmarks/matching.py $*"
  env "${envs[@]}" python3 benchmarks/matching.py "$@" --out="$out/$name.json" \
      > "$out/$name.txt" 2>&1 || { echo "   failed (exit $?), see $out/$name.txt"; status=1; }
  grep -E "^(random|collapsed).*s x" "$out/$name.txt" || true
}

{ if command -v nvidia-smi > /dev/null; then nvidia-smi -L; fi; python3 -c "import jax; print(jax.__version__, jax.devices())"; } \
    > "$out/device.txt" 2>&1
cat "$out/device.txt"
if [[ -n ${QUICK:-} ]]; then
  step faces_quick -- --sizes=faces256 --families=random,collapsed1 --repeats=2 \
      --methods=nearest,auction_fused,auction_xla,hungarian,scipy
  exit $status
fi
step paper -- --sizes=paper \
    --methods=nearest,auction_fused,auction_xla,hungarian,scipy,scipy_threads,sparse,sinkhorn
step paper_command_buffers \
    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUDNN,CUSTOM_CALL,CONDITIONAL,WHILE \
    -- --sizes=paper --methods=nearest,auction_xla
step faces -- --sizes=faces --methods=nearest,auction_fused,auction_xla,hungarian,scipy,sinkhorn
exit $status

"""Matching solvers side by side, in one run, on the same batches (PI-VQ paper §3.4).

  python benchmarks/matching.py [--sizes=paper,faces,faces256] [--families=random,collapsed49,...]
      [--batch=8] [--repeats=3] [--noise=0.01] [--latents=file.npz] [--out=matching.json]
  python benchmarks/matching.py --quick      # faces size only, 2 repeats

Methods: "nearest" (distance matmul + argmin: the floor, not a valid matching),
"auction" (on device, the kernel `assign` picks here), "auction_xla" and "auction_fused"
(the pure-JAX auction and the fused Pallas kernel, one launch per solve; off GPU the
latter runs in Pallas' interpreter, so only its round counts mean anything there),
"hungarian" (`assign`'s exact host path: per-image dense, column-
union or sparse JV, threaded; small images straight to dense JV), "scipy_callback"
(scipy's dense solver one image after another through the same jitted host callback:
"hungarian"'s like for like), "scipy" (dense `linear_sum_assignment` one image after
another: the exact optimum every gap is measured against), "scipy_threads" (the same in
threads), "sparse" (sparse JV on L-nearest lists, threaded), "sinkhorn" (ott-jax +
greedy repair), "lapx" (a peer library: lapx's Jonker-Volgenant, `lap.lapjv` with the
rectangular cost extended to square, one image after another; `pip install -e
'.[bench]'`, left out with a note when missing). Host methods other than "hungarian" are
timed on host arrays.
Families: Gaussian latents vs a Gaussian codebook ("random"); latents collapsed onto m
codes, each latent = one of m codebook vectors + `noise` * N(0, 1) ("collapsedM"); and,
with --latents (an .npz with `latents` float32[N, L, D] and `codebook` [K, D]), the
first `batch` images of a trained model ("file", at the file's own size). Costs are plain
Euclidean distances, computed as the quantizer computes them.

Per family x size x method: seconds per batch (after compiling; median of `repeats` runs
for methods faster than a second, one run otherwise), ratio to scipy, validity (fraction
of rows that are one-to-one) and optimality gap (total cost / exact optimum - 1, mean and
max over rows; negative for nearest, which is not a matching). For the auction also its
rounds (forward + reverse) per image, of the accepted list level and of all levels
(abandoned ones included), and the rounds the batch ran in lock step ("lockstep": under
vmap each while loop runs as long as the batch's slowest image, and a list level runs for
the whole batch unless every image is certified): the cost proxy on accelerators. The
fused kernel's "lockstep" is its one launch's length: its slowest image's rounds over
the levels that image ran.
"""

import functools
import importlib.util
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pivq_jax.quantizers import auction
from pivq_jax.quantizers import matching
from pivq_jax.quantizers import matching_host
from pivq_jax.quantizers import vq

# L, K, D: the paper's CelebA-HQ / FFHQ size, and configs/faces.py's before and after its
# codebook grew to 1,024 codes.
SIZES = {"paper": (512, 4096, 256), "faces": (32, 1024, 64), "faces256": (32, 256, 64)}
FAMILIES = ("random", "collapsed49", "collapsed8", "collapsed1")
METHODS = ("nearest", "auction", "auction_xla", "auction_fused", "hungarian",
           "scipy_callback", "scipy", "scipy_threads", "sparse", "sinkhorn", "lapx")
KERNELS = {"auction_xla": "xla", "auction_fused": "pallas"}
HOST = {"scipy": dict(method="dense", threads=1), "scipy_threads": dict(method="dense"),
        "sparse": dict(method="sparse")}

_SIZES = flags.DEFINE_list("sizes", list(SIZES), f"Subset of {list(SIZES)}.")
_FAMILIES = flags.DEFINE_list("families", list(FAMILIES), "Instance families.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Methods to compare.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per batch (B).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs for methods under a second.")
_NOISE = flags.DEFINE_float("noise", 0.01, "Noise std of the collapsed families.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_LATENTS = flags.DEFINE_string("latents", None,
                               ".npz with `latents` [N, L, D] and `codebook` [K, D].")
_QUICK = flags.DEFINE_bool("quick", False, "Faces size only, 2 repeats.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")


def make_instance(family, size, batch, noise, rng):
  """(latents [B, L, D], codebook [K, D]) as float32."""
  l, k, d = size
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  if family == "random":
    return rng.normal(size=(batch, l, d)).astype(np.float32), codebook
  m = int(family.removeprefix("collapsed"))
  centres = rng.choice(k, m, replace=False)
  z = codebook[rng.choice(centres, (batch, l))] + noise * rng.normal(size=(batch, l, d))
  return z.astype(np.float32), codebook


def euclidean(z, codebook):
  return jnp.sqrt(jnp.maximum(vq.squared_distances(z, codebook), 0.0))


def _scipy_loop(cost):
  return matching_host.solve(np.asarray(cost), **HOST["scipy"])


def solver_fn(method):
  if method == "scipy_callback":  # "hungarian"'s like for like: the same jitted callback
    return lambda cost: jax.pure_callback(
        _scipy_loop, jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32), cost,
        vmap_method="expand_dims")
  if method == "nearest":  # from latents and codebook: the distance matmul included
    return lambda z, codebook: jnp.argmin(vq.squared_distances(z, codebook),
                                          axis=-1).astype(jnp.int32)
  if method in KERNELS:
    return lambda cost: auction.auction_solve(cost, kernel=KERNELS[method])[0]
  # check_finite=False as the train step calls it (its own finite check stops a run).
  return functools.partial(matching.assign, solver=method, check_finite=False)


def _lapx(cost):
  import lap  # pylint: disable=g-import-not-at-top
  return np.stack([lap.lapjv(np.asarray(c, np.float64), extend_cost=True)[1]
                   for c in cost]).astype(np.int32)


def time_method(method, cost, z, codebook, repeats):
  if method == "lapx":
    fn, args = _lapx, (np.asarray(cost),)
  elif method in HOST:
    host = np.asarray(cost)
    fn, args = functools.partial(matching_host.solve, **HOST[method]), (host,)
  else:
    args = (z, codebook) if method == "nearest" else (cost,)
    fn = jax.jit(solver_fn(method)).lower(*args).compile()  # the warm-up: compile ahead
  times, out = [], None
  while len(times) < (repeats if not times or times[0] < 1.0 else 1):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), np.asarray(out), len(times)


def evaluate(cost, codes, optimum):
  cost = np.asarray(cost, np.float64)
  b, l, _ = cost.shape
  valid = np.mean([len(set(row.tolist())) == l for row in codes])
  totals = np.take_along_axis(cost, codes[..., None], axis=-1)[..., 0].sum(-1)
  gaps = totals / optimum - 1.0
  return float(valid), float(np.mean(gaps)), float(np.max(gaps))


def main(_):
  sizes = ["faces"] if _QUICK.value else _SIZES.value
  repeats = 2 if _QUICK.value else _REPEATS.value
  rng = np.random.default_rng(_SEED.value)
  cases = [(fam, name, SIZES[name]) for name in sizes for fam in _FAMILIES.value]
  if _LATENTS.value:
    data = np.load(_LATENTS.value)
    cases.append(("file", "file", None))
  methods = list(_METHODS.value)
  if "lapx" in methods and importlib.util.find_spec("lap") is None:
    print("lapx is not installed (pip install -e '.[bench]'): its rows are left out.")
    methods.remove("lapx")
  if "scipy" not in methods:
    methods.append("scipy")  # the exact optimum every gap is measured against
  rows = []
  for family, size_name, size in cases:
    if family == "file":
      z = np.asarray(data["latents"][:_BATCH.value], np.float32)
      codebook = np.asarray(data["codebook"], np.float32)
    else:
      z, codebook = make_instance(family, size, _BATCH.value, _NOISE.value, rng)
    z, codebook = jnp.asarray(z), jnp.asarray(codebook)
    cost = jax.block_until_ready(euclidean(z, codebook))
    b, l, k = cost.shape
    results = {}
    for m in sorted(methods, key=lambda m: m != "scipy"):
      try:
        results[m] = time_method(m, cost, z, codebook, repeats)
      except Exception as e:  # pylint: disable=broad-except
        # One method that cannot run here (say, a kernel this GPU cannot compile) must
        # not take the other rows with it.
        print(f"{family} {size_name} {m} failed: {str(e).splitlines()[0][:300]}", flush=True)
    done = [m for m in methods if m in results]
    optimum = np.take_along_axis(np.asarray(cost, np.float64), results["scipy"][1][
        ..., None], axis=-1)[..., 0].sum(-1)
    infos = {m: jax.tree.map(np.asarray, jax.jit(functools.partial(
        auction.auction_solve, kernel=KERNELS.get(m) or matching.auction_kernel_choice(l, k)))(
            cost)[1]) for m in done if m.startswith("auction")}
    for method in done:
      seconds, codes, runs = results[method]
      valid, gap_mean, gap_max = evaluate(cost, codes, optimum)
      row = {"family": family, "size": size_name, "L": l, "K": k, "D": z.shape[-1], "B": b,
             "method": method, "seconds_per_batch": seconds, "runs": runs,
             "ratio_to_scipy": seconds / results["scipy"][0], "valid": valid,
             "gap_mean": gap_mean, "gap_max": gap_max}
      if method in infos:
        info = infos[method]
        # Rounds of the accepted list level per image (under vmap every loop runs until
        # the batch's slowest image is done, so the slowest image sets the pace).
        row.update(rounds_max=int(info["rounds"].max()),
                   rounds_per_image=info["rounds"].tolist(),
                   accepted_lengths=info["level"].tolist(),
                   all_levels_max=int(info["level_rounds"].sum(1).max()),
                   level_rounds_per_image=info["level_rounds"].tolist(),
                   lockstep_rounds=int(info["lockstep_rounds"]),
                   reverse_share=float(info["phase_rounds"][..., 1].sum()
                                       / max(info["phase_rounds"].sum(), 1)),
                   # [levels, phases, forward/reverse]: the loops' lengths in lock step.
                   lockstep_per_phase=info["phase_rounds"].max(0).tolist(),
                   gap_bound_rel=float(np.max(info["gap_bound"] / optimum)))
      rows.append(row)
      print(f"{family:11s} {size_name:6s} {method:13s} {seconds:9.4f}s "
            f"x{row['ratio_to_scipy']:7.2f}  valid {valid:5.3f}  gap {gap_mean:+.1e} / "
            f"{gap_max:+.1e}" + (
                f"  rounds slowest {row['rounds_max']} (all levels "
                f"{row['all_levels_max']}), lockstep {row['lockstep_rounds']}, accepted "
                f"C={row['accepted_lengths']}"
                if method in infos else ""), flush=True)

  print(f"\n{jax.devices()[0].device_kind}, batch {_BATCH.value}, noise {_NOISE.value}")
  print(f"{'family':11s} {'size':6s} {'method':13s} {'s/batch':>9s} {'/scipy':>7s} "
        f"{'valid':>6s} {'gap mean':>9s} {'gap max':>9s}")
  for r in rows:
    print(f"{r['family']:11s} {r['size']:6s} {r['method']:13s} {r['seconds_per_batch']:9.4f} "
          f"{r['ratio_to_scipy']:7.2f} {r['valid']:6.3f} {r['gap_mean']:9.1e} "
          f"{r['gap_max']:9.1e}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)

"""The train step's exact matching call, A/B in interleaved rounds: `assign`'s host path
("hungarian"; at this size the dense loop, and with the screen and threads forced on as
for larger images) against scipy's dense solver one image after another through the same
jitted callback ("scipy_callback").

  python benchmarks/matching_ab.py --latents=/tmp/faces_latents.npz [--rounds=40]

`benchmarks/matching.py` times each method in turn, so the order it runs them in moves
ratios near 1 by ~10-20%; here every round times each variant once, and the medians are
compared. Instances: four batches of a trained encoder's latents (from
`benchmarks/faces_latents.py`), Gaussian latents, and latents collapsed onto one code, at
the file's own size (`configs/faces.py`: 32 x 1,024), batch 8.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import matching as bench  # benchmarks/matching.py
from pivq_jax.quantizers import matching_host

_ROUNDS = flags.DEFINE_integer("rounds", 40, "Interleaved rounds.")
_BATCH = 8


def _cost(z, codebook):
  return jnp.asarray(bench.euclidean(jnp.asarray(z), jnp.asarray(codebook)))


def main(_):
  data = np.load(bench._LATENTS.value)  # pylint: disable=protected-access
  latents, codebook = data["latents"], data["codebook"]
  _, l, d = latents.shape
  rng = np.random.default_rng(0)
  cases = {f"trained {i}": _cost(latents[_BATCH * i:_BATCH * (i + 1)], codebook)
           for i in range(min(4, len(latents) // _BATCH))}
  cases["random"] = _cost(rng.normal(size=(_BATCH, l, d)).astype(np.float32),
                          rng.normal(size=codebook.shape).astype(np.float32))
  noise = 0.01 * rng.normal(size=(_BATCH, l, d)).astype(np.float32)
  cases["collapsed onto 1"] = _cost(codebook[np.zeros((_BATCH, l), int)] + noise, codebook)
  fns = {m: jax.jit(bench.solver_fn(m)) for m in ("hungarian", "scipy_callback")}
  # (label, method, matching_host settings): the host path as `assign` runs it, then
  # forced through the screen and the thread pool (what it did here before they were
  # limited to larger images and batches).
  default = {"SCREEN_MIN_ENTRIES": matching_host.SCREEN_MIN_ENTRIES,
             "MIN_PARALLEL_ENTRIES": matching_host.MIN_PARALLEL_ENTRIES}
  variants = [("host path", "hungarian", {}),
              ("screened, threads", "hungarian", {"SCREEN_MIN_ENTRIES": 0,
                                                  "MIN_PARALLEL_ENTRIES": 0}),
              ("scipy loop", "scipy_callback", {})]
  print(f"{jax.devices()[0].platform}, batch {_BATCH}, {l}x{codebook.shape[0]}, "
        f"{_ROUNDS.value} interleaved rounds, median ms (ratio to the scipy loop)")
  for name, cost in cases.items():
    times = {label: [] for label, _, _ in variants}
    for _ in range(_ROUNDS.value):
      for label, method, settings in variants:
        for k, v in dict(default, **settings).items():
          setattr(matching_host, k, v)
        fns[method](cost).block_until_ready()  # warm: the same cost every time
        start = time.perf_counter()
        fns[method](cost).block_until_ready()
        times[label].append(time.perf_counter() - start)
    for k, v in default.items():
      setattr(matching_host, k, v)
    base = np.median(times["scipy loop"])
    cells = [f"{label}: {np.median(t) * 1e3:.3f} ({np.median(t) / base:.2f}x)"
             for label, t in times.items()]
    print(f"{name:18s}" + "  ".join(cells))


if __name__ == "__main__":
  flags.mark_flag_as_required("latents")  # matching.py's flag
  app.run(main)

"""Auction rounds per image against the bidding buffers (PI-VQ paper §3.4 matching).

  python benchmarks/auction_rounds.py [--buffers=32:8,512:8,512:64] [--rounds_out=...jsonl]

On the four paper-scale families of `benchmarks/matching.py` (512 x 4096, B = 8, same
seed), runs `auction.auction_solve` with the forward buffer (latents bidding per round) and
the reverse buffer (overpriced unheld codes per round) set to each pair, candidate lists of
length L only (no cheaper ladder levels, so the rounds counted are all the rounds run).
Prints per family the rounds per image, the slowest image's rounds (the accelerator's cost
proxy: under vmap the batch runs until its slowest image is done), the CPU seconds per
batch and the largest relative gap to scipy's exact optimum.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matching as matching_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from pivq_jax.quantizers import auction  # pylint: disable=g-import-not-at-top,wrong-import-position

_BUFFERS = flags.DEFINE_list("buffers", ["32:8", "512:8", "512:64"],
                             "forward:reverse buffer pairs (the package's: 32:8).")
_OUT = flags.DEFINE_string("rounds_out", "benchmarks/results/auction_rounds_cpu.jsonl",
                           "One JSON line per family and buffer pair.")


def main(_):
  rng = np.random.default_rng(0)
  insts = {f: matching_bench.make_instance(f, matching_bench.SIZES["paper"], 8, 0.01, rng)
           for f in matching_bench.FAMILIES}
  optima = {}
  defaults = auction.BUFFER, auction.REVERSE_BUFFER, auction.LADDER
  with open(_OUT.value, "w") as out:
    for pair in _BUFFERS.value:
      auction.BUFFER, auction.REVERSE_BUFFER = map(int, pair.split(":"))
      auction.LADDER = ()
      jax.clear_caches()  # the solver reads the buffers when traced
      for family, (z, codebook) in insts.items():
        cost = jax.block_until_ready(matching_bench.euclidean(jnp.asarray(z),
                                                              jnp.asarray(codebook)))
        c = np.asarray(cost, np.float64)
        if family not in optima:
          optima[family] = [c[b][optimize.linear_sum_assignment(c[b])].sum()
                            for b in range(len(c))]
        fn = jax.jit(auction.auction_solve).lower(cost).compile()
        start = time.perf_counter()
        codes, info = jax.block_until_ready(fn(cost))
        seconds = time.perf_counter() - start
        codes = np.asarray(codes)
        assert all(len(set(row.tolist())) == c.shape[1] for row in codes)
        gaps = [c[b][np.arange(c.shape[1]), codes[b]].sum() / optima[family][b] - 1
                for b in range(len(c))]
        row = {"family": family, "buffers": pair, "seconds_per_batch": round(seconds, 3),
               "rounds": np.asarray(info["rounds"]).tolist(),
               "rounds_max": int(np.max(info["rounds"])), "gap_max": float(max(gaps))}
        out.write(json.dumps(row) + "\n")
        print(f"{family:11s} buffers {pair:7s} slowest {row['rounds_max']:5d} rounds, "
              f"{seconds:6.2f} s, gap max {row['gap_max']:.1e}", flush=True)
  auction.BUFFER, auction.REVERSE_BUFFER, auction.LADDER = defaults


if __name__ == "__main__":
  app.run(main)

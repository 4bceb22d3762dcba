"""Matching quantization: one-to-one assignment of latents to codes (paper §3.4).

For each image the L latents are assigned to L *distinct* codes minimising the total cost
sum_l ||z_l - e_pi(l)|| (a rectangular L x K linear assignment problem, L <= K).

Solvers:
  - "hungarian": exact, scipy's `linear_sum_assignment` on the host through
    `jax.pure_callback`; usable under jit and vmap. It is the ground truth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

SOLVERS = ("hungarian",)


def _hungarian_host(cost: np.ndarray) -> np.ndarray:
  cost = np.asarray(cost)
  if not np.all(np.isfinite(cost)):
    raise ValueError("Matching cost contains NaN or Inf; the encoder output or codebook "
                     "has diverged (lower the learning rate or check the inputs).")
  *lead, l, k = cost.shape
  flat = cost.reshape(-1, l, k)
  out = np.empty((flat.shape[0], l), np.int32)
  for i, c in enumerate(flat):
    rows, cols = scipy.optimize.linear_sum_assignment(c)
    out[i, rows] = cols
  return out.reshape(*lead, l)


def assign(cost, *, solver: str = "hungarian"):
  """cost: float[B, L, K] with L <= K -> int32[B, L] of distinct codes per row.

  Minimises sum_l cost[b, l, out[b, l]] subject to out[b] having no repeats.
  """
  if solver not in SOLVERS:
    raise ValueError(f"Unknown matching solver {solver!r}; use one of {SOLVERS}.")
  *lead, l, k = cost.shape
  if l > k:
    raise ValueError(f"Matching needs L <= K, got L={l} latents and K={k} codes.")
  out_shape = jax.ShapeDtypeStruct((*lead, l), jnp.int32)
  return jax.pure_callback(_hungarian_host, out_shape, jax.lax.stop_gradient(cost),
                           vmap_method="expand_dims")

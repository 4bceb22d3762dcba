"""Matching quantization: one-to-one assignment of latents to codes (PI-VQ paper §3.4).

For each image the L latents are assigned to L *distinct* codes minimising the total cost
sum_l ||z_l - e_pi(l)|| (a rectangular L x K linear assignment problem, L <= K).

Solvers (`assign(cost, solver=...)`):
  - "auction" (default): on device; an eps-scaling forward/reverse auction for the
    asymmetric problem (Bertsekas 1988; Bertsekas & Castanon 1993). Pure JAX (batched
    ops and `lax.while_loop`, so it runs under jit, vmap and batch sharding), or on a GPU
    that runs it the same rounds fused into one Pallas kernel per list level
    (`auction_kernel_choice`).
  - "hungarian": exact, on the host via `jax.pure_callback` (usable under jit and vmap):
    scipy's dense or sparse Jonker-Volgenant per image, picked by size and collapse, the
    images in parallel threads (`matching_host`). The ground truth.
  - "sinkhorn": the peer baseline, ott-jax entropic OT + greedy one-to-one repair. Valid
    (one-to-one) but not optimal.

The auction and its optimality bound: `quantizers/auction.py`; the exact host solvers:
`quantizers/matching_host.py`.

Non-finite costs
----------------
A NaN/Inf cost means the model has diverged. Every solver raises ValueError("Matching cost
contains NaN or Inf ..."): eagerly when the cost is concrete; under jit/vmap through a
`jax.debug.callback` on one boolean (the error surfaces, with that message, as a runtime
error when the result is used). Training passes `check_finite=False`: its per-step finite
check stops the run instead, naming the step and the last good checkpoint. As a second
line of defence the auction and the host solvers return -1 for every latent of an image
whose costs are not finite.
"""

import concurrent.futures
import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from pivq_jax.quantizers import auction
from pivq_jax.quantizers import auction_kernel
from pivq_jax.quantizers import matching_host
from pivq_jax.quantizers import sinkhorn

SOLVERS = ("auction", "hungarian", "sinkhorn")
AUCTION_KERNELS = ("auto",) + auction.KERNELS

_NONFINITE_MSG = ("Matching cost contains NaN or Inf; the encoder output or codebook has "
                  "diverged (lower the learning rate or check the inputs).")


# ----------------------------------------------------------------------------------------
# Exact host solver.


def _hungarian_host(cost: np.ndarray, check_finite: bool = True) -> np.ndarray:
  cost = np.asarray(cost)
  if check_finite and not np.all(np.isfinite(cost)):
    raise ValueError(_NONFINITE_MSG)
  *lead, l, k = cost.shape
  # -1 rows: images with non-finite costs.
  return matching_host.solve(cost.reshape(-1, l, k)).reshape(*lead, l)


def _hungarian(cost, check_finite: bool = True):
  out_shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  return jax.pure_callback(functools.partial(_hungarian_host, check_finite=check_finite),
                           out_shape, cost, vmap_method="expand_dims")


# ----------------------------------------------------------------------------------------
# Public entry point.


def _raise_if_nonfinite(all_finite):
  if not np.all(all_finite):
    raise ValueError(_NONFINITE_MSG)


def assign(cost, *, solver: str = "auction", check_finite: bool = True,
           auction_kernel: str = "auto"):
  """cost: float[..., L, K] with L <= K -> int32[..., L] of distinct codes per row.

  Minimises sum_l cost[..., l, out[..., l]] subject to out[...] having no repeats
  ("auction": within L * 2^-21 * S of the optimum, see auction.py; "hungarian":
  exact; "sinkhorn": one-to-one but not optimal). NaN/Inf costs raise ValueError, eagerly
  for concrete inputs, at run time under jit/vmap. `check_finite=False` (the train step,
  whose own per-step finite check reports divergence with its step and last good
  checkpoint) skips the run-time check, which also keeps host callbacks out of the auction
  (so the persistent compilation cache can hold it); images with non-finite costs get -1.
  `auction_kernel`: "auto" (`auction_kernel_choice`), "xla" or "pallas" (the fused
  kernel; off GPU in Pallas' interpreter, slowly): the same algorithm and bound.
  """
  if solver not in SOLVERS:
    raise ValueError(f"Unknown matching solver {solver!r}; use one of {SOLVERS}.")
  if auction_kernel not in AUCTION_KERNELS:
    raise ValueError(f"Unknown auction kernel {auction_kernel!r}; use one of "
                     f"{AUCTION_KERNELS}.")
  *lead, l, k = cost.shape
  if l > k:
    raise ValueError(f"Matching needs L <= K, got L={l} latents and K={k} codes.")
  cost = jax.lax.stop_gradient(jnp.asarray(cost))
  if not isinstance(cost, jax.core.Tracer):
    if not np.all(np.isfinite(np.asarray(cost))):
      raise ValueError(_NONFINITE_MSG)
  elif solver != "hungarian" and check_finite:  # the Hungarian checks on the host itself
    jax.debug.callback(_raise_if_nonfinite, jnp.all(jnp.isfinite(cost)))
  if solver == "hungarian":
    return _hungarian(cost, check_finite)
  flat = cost.reshape(-1, l, k)
  if solver == "auction":
    out = _auction_jit(flat, auction_kernel if auction_kernel != "auto"
                       else auction_kernel_choice(l, k))
  else:
    out = _sinkhorn_jit(flat)
  return out.reshape(*lead, l)


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _check_instances(l: int, k: int) -> list[np.ndarray]:
  """One image of Gaussian latents and one collapsed onto a code, [1, L, K] each: the
  ladder's cheap and final levels at the solve's own size."""
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(k, 8))
  out = []
  for z in (rng.normal(size=(l, 8)), codebook[0] + 0.01 * rng.normal(size=(l, 8))):
    out.append(np.linalg.norm(z[:, None] - codebook[None], axis=-1)[None].astype(np.float32))
  return out


@functools.cache
def fused_auction_available(l: int, k: int) -> bool:
  """A GPU where the fused auction kernel compiles at L x K and solves check instances
  one-to-one, converged and within its bound of the exact host solver's optimum (checked
  once per size and process; logged when not)."""
  if not _on_gpu():
    return False

  def check():
    solve = jax.jit(functools.partial(auction.auction_solve, kernel="pallas"))  # 1 compile
    for cost in _check_instances(l, k):
      got, info = solve(jnp.asarray(cost))
      got, want = np.asarray(got)[0], matching_host.solve(cost)[0]
      assert len(set(got.tolist())) == l and got.min() >= 0, "it repeated a code"
      assert bool(info["converged"][0]), "it did not converge"
      c64 = cost[0].astype(np.float64)
      extra = c64[np.arange(l), got].sum() - c64[np.arange(l), want].sum()
      assert extra <= 2 * float(info["gap_bound"][0]) + 1e-6, "its solution costs more"

  logging.info("Matching: checking the fused auction kernel at %d x %d (its first Triton "
               "compile can take a minute).", l, k)
  try:
    # Usually first asked while a train step is traced: JAX's tracing state is per
    # thread, so in a thread of its own the check runs now, on concrete arrays.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pool.submit(check).result()
    logging.info("Matching: the auction runs as one fused Pallas kernel per solve "
                 "(%d x %d).", l, k)
    return True
  except Exception as e:  # pylint: disable=broad-except
    why = (str(e).splitlines() or [type(e).__name__])[0][:200]
    logging.warning("Matching: the fused auction kernel is unavailable at %d x %d (%s); "
                    "using the pure-JAX auction.", l, k, why)
    return False


@functools.cache
def auction_kernel_choice(l: int, k: int) -> str:
  """The auction's kernel for L latents and K codes here: "pallas" on a GPU that runs it
  at that size (Triton needs L to be a power of two), else "xla"."""
  if not _on_gpu():
    return "xla"
  if not auction_kernel.supports(l):
    logging.info("Matching: L = %d is not a power of two, which the fused auction kernel "
                 "needs; using the pure-JAX auction.", l)
    return "xla"
  return "pallas" if fused_auction_available(l, k) else "xla"


auction_solve = auction.auction_solve
_auction_jit = jax.jit(lambda c, kernel: auction.auction_solve(c, kernel=kernel)[0],
                       static_argnums=1)
_sinkhorn_jit = jax.jit(sinkhorn.sinkhorn_solve)

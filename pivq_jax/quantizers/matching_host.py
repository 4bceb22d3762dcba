"""Exact matching on the host (PI-VQ paper §3.4): the "hungarian" solver and the ground
truth the auction is checked against.

Lemma: some optimal assignment puts every latent on one of its own L nearest codes (a
latent sitting elsewhere has one of its L nearest free, as only L-1 other latents exist,
and moving there does not raise the cost; ties included). So three exact solvers:
  - "dense": scipy's `linear_sum_assignment` on the full L x K cost;
  - "union": the same on the columns that are in some latent's L-nearest list. When the
    latents collapse onto a few codes their lists coincide and this is about L x 1.05 L;
  - "sparse": a sparse Jonker-Volgenant (`min_weight_full_bipartite_matching`) on the
    L-nearest lists only, L^2 edges.
"auto" picks per image from cheap statistics of the cost (`choose`; the thresholds are
measured, docs/benchmarks.md "Matching solvers"): dense JV is fastest when latents rarely
share a nearest code, and slows down sharply when they do.

The images of a batch are solved in parallel threads: both scipy solvers release the GIL.
"""

import concurrent.futures
import os

import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.sparse.csgraph

# "auto" (see `choose`): dense unless at least SHARED_MIN of the latents share their
# nearest code with another; then "union" when the lists' union has at most UNION_MAX_L * L
# codes, else "sparse" when K >= SPARSE_MIN_K * L and L * K >= SPARSE_MIN_ENTRIES (below
# that scipy's per-call overhead or the dense part dominates), else dense.
SHARED_MIN = 0.9  # Gaussian latents at 512x4096: 0.47-0.58 (hub codes); collapsed: 1
UNION_MAX_L = 2.0
SPARSE_MIN_K = 4
SPARSE_MIN_ENTRIES = 1 << 17
# Solver threads: None = min(images, os.cpu_count()). 1 solves in the calling thread.
THREADS = None
# Below this many cost entries per batch a thread pool costs more than it saves.
MIN_PARALLEL_ENTRIES = 1 << 18

_pool = None


def _executor(n):
  global _pool
  if _pool is None or _pool._max_workers < n:  # grown, never shrunk
    _pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="matching")
  return _pool


def dense(c: np.ndarray) -> np.ndarray:
  """Optimal codes int32[L] for one finite cost [L, K], scipy's dense solver."""
  rows, cols = scipy.optimize.linear_sum_assignment(c)
  out = np.empty(c.shape[0], np.int32)
  out[rows] = cols
  return out


def _lists(c):
  """Each latent's L nearest codes, int[L, L] (any order; ties broken arbitrarily)."""
  l = c.shape[0]
  return np.argpartition(c, l - 1, axis=1)[:, :l]


def union(c: np.ndarray, cand: np.ndarray | None = None) -> np.ndarray:
  """Optimal codes int32[L] for one finite cost [L, K]: dense JV on the lists' union."""
  l, k = c.shape
  cand = _lists(c) if cand is None else cand
  cols = np.flatnonzero(np.bincount(cand.ravel(), minlength=k))
  out = dense(c[:, cols])
  return cols[out].astype(np.int32)


def sparse(c: np.ndarray, cand: np.ndarray | None = None) -> np.ndarray:
  """Optimal codes int32[L] for one finite cost [L, K], sparse JV on L-nearest lists.

  Falls back to the dense solver when the sparse one finds no full matching (it always
  exists on L-nearest lists; this guards scipy's own failure modes).
  """
  l, k = c.shape
  if l == k:
    return dense(c)
  c = np.asarray(c, np.float64)
  cand = _lists(c) if cand is None else cand
  w = np.take_along_axis(c, cand, axis=1)
  # Explicit zeros are missing edges to scipy: shift every weight into [s, 2s] (s > 0 is
  # the spread), which moves every full assignment's total by the same L * shift and
  # keeps the relative resolution of the differences.
  lo = w.min()
  spread = w.max() - lo
  w = w - lo + (spread if spread > 0 else 1.0)
  graph = scipy.sparse.csr_matrix((w.ravel(), cand.ravel(), np.arange(0, l * l + 1, l)),
                                  shape=(l, k))
  try:
    rows, cols = scipy.sparse.csgraph.min_weight_full_bipartite_matching(graph)
  except ValueError:
    return dense(c)
  out = np.empty(l, np.int32)
  out[rows] = cols
  return out


def choose(c: np.ndarray) -> tuple[str, np.ndarray | None]:
  """The fastest exact solver for one finite cost [L, K] by measured rules, and the
  candidate lists when it computed them."""
  l, k = c.shape
  if l < 2 or l == k:
    return "dense", None
  near = np.argmin(c, axis=1)
  shared = np.mean(np.bincount(near, minlength=k)[near] > 1)
  if shared < SHARED_MIN:
    return "dense", None
  cand = _lists(c)
  if np.count_nonzero(np.bincount(cand.ravel(), minlength=k)) <= UNION_MAX_L * l:
    return "union", cand
  if k >= SPARSE_MIN_K * l and l * k >= SPARSE_MIN_ENTRIES:
    return "sparse", cand
  return "dense", None


def auto(c: np.ndarray) -> np.ndarray:
  """Optimal codes int32[L] for one finite cost [L, K], solver picked by `choose`."""
  name, cand = choose(c)
  return dense(c) if name == "dense" else SOLVERS[name](c, cand)


SOLVERS = {"dense": dense, "union": union, "sparse": sparse, "auto": auto}


def solve(cost: np.ndarray, *, method: str = "auto", threads: int | None = None
          ) -> np.ndarray:
  """Optimal codes int32[B, L] for cost [B, L, K]; -1 rows for images with NaN/Inf.

  method: one of SOLVERS ("auto": picked per image by `choose`). threads:
  worker threads (None: THREADS, else min(B, os.cpu_count()); small batches run inline).
  """
  b, l, k = cost.shape
  out = np.full((b, l), -1, np.int32)
  finite = np.all(np.isfinite(cost.reshape(b, -1)), axis=1)
  todo = np.flatnonzero(finite)
  fns = [SOLVERS[method]] * b
  if method == "auto" and 2 <= l < k and len(todo):
    # `choose`'s first test for the whole batch at once: per-image statistics cost as
    # much as a small image's solve (faces: 32 x 256).
    near = np.argmin(cost, axis=2) + k * np.arange(b)[:, None]  # (NaN rows: unused)
    shared = np.mean(np.bincount(near.ravel(), minlength=b * k)[near] > 1, axis=1)
    fns = [dense if s < SHARED_MIN else auto for s in shared]
  threads = threads or THREADS or min(b, os.cpu_count() or 1)
  threads = min(threads, len(todo))
  if threads <= 1 or cost.size < MIN_PARALLEL_ENTRIES:
    for i in todo:
      out[i] = fns[i](cost[i])
  else:
    rows = _executor(threads).map(lambda i: fns[i](cost[i]), todo)
    for i, row in zip(todo, rows):
      out[i] = row
  return out

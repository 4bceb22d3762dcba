"""Exact matching on the host (PI-VQ paper §3.4): the "hungarian" solver and the ground
truth the auction is checked against.

Lemma: some optimal assignment puts every latent on one of its own L nearest codes (a
latent sitting elsewhere has one of its L nearest free, as only L-1 other latents exist,
and moving there does not raise the cost; ties included). So three exact solvers:
  - "dense": scipy's `linear_sum_assignment` on the full L x K cost;
  - "union": the same on the columns that hold some latent's L-nearest list (a cheap
    superset, `union_columns`). When the latents collapse onto a few codes their lists
    coincide and this is about L x 1.05 L;
  - "sparse": a sparse Jonker-Volgenant (`min_weight_full_bipartite_matching`) on the
    L-nearest lists only, L^2 edges.
"auto" picks per image from cheap statistics of the cost (`choose`; the thresholds are
measured, docs/benchmarks.md "Matching solvers"): dense JV is fastest when latents rarely
share a nearest code, and slows down sharply when they do. Small images (the faces size)
skip the statistics and run dense JV.

The images of a batch are solved in parallel threads: both scipy solvers release the GIL.
"""

import concurrent.futures
import functools
import os

import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.sparse.csgraph

# "auto" (see `choose`): dense unless at least SHARED_MIN of the latents share their
# nearest code with another; then "union" when `union_columns` has at most UNION_MAX_L * L
# codes, else "sparse" when K >= SPARSE_MIN_K * L and L * K >= SPARSE_MIN_ENTRIES (below
# that scipy's per-call overhead or the dense part dominates), else dense.
SHARED_MIN = 0.9  # Gaussian latents at 512x4096: 0.47-0.58 (hub codes); collapsed: 1
UNION_MAX_L = 2.0
SPARSE_MIN_K = 4
SPARSE_MIN_ENTRIES = 1 << 17
# Below this many cost entries per image (L * K), "auto" is the dense loop without a
# screen: at the faces sizes (32 x 256, 32 x 1,024) the screen costs 5-30% of a dense solve,
# and a trained faces encoder's latents never pass it (6-56% share a nearest code);
# collapsed latents then cost what scipy costs (docs/benchmarks.md).
SCREEN_MIN_ENTRIES = 1 << 16
# Solver threads: None = min(images, os.cpu_count()). 1 solves in the calling thread.
THREADS = None
# Below this many cost entries per batch a thread pool costs more than it saves (at
# 8 x 32 x 1,024 = 2^18 on 2 cores: 1.03-1.34x the inline loop's time).
MIN_PARALLEL_ENTRIES = 1 << 19

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


def union_columns(c: np.ndarray) -> np.ndarray:
  """Sorted column ids holding every latent's L nearest codes, for one cost [L, K].

  A superset of the lists' union, found without a partition per latent: one latent's L
  nearest codes S bound every latent i's L-th nearest distance by t_i = max_{j in S}
  c[i, j] (S holds L distinct codes), so each list lies in {j : c[i, j] <= t_i}. For
  collapsed latents S is nearly everyone's list and the superset nearly the union; it
  costs one pass over the cost instead of L partitions (a faces-size batch: ~30 us
  against ~400 us).
  """
  l = c.shape[0]
  s = np.argpartition(c[0], l - 1)[:l]
  t = c[:, s].max(axis=1)
  return np.flatnonzero((c <= t[:, None]).any(axis=0))


def union(c: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
  """Optimal codes int32[L] for one finite cost [L, K]: dense JV on the columns of
  `union_columns` (exact by the lemma: they hold every latent's L nearest)."""
  cols = union_columns(c) if cols is None else cols
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


def _shared(near: np.ndarray, k: int) -> np.ndarray:
  """Per image, the fraction of latents sharing their nearest code; near int[B, L]."""
  b = near.shape[0]
  flat = near + k * np.arange(b)[:, None]
  return np.mean(np.bincount(flat.ravel(), minlength=b * k)[flat] > 1, axis=1)


def _screened(l: int, k: int) -> bool:
  """Whether `choose` reads an [L, K] image's statistics at all (else: dense)."""
  return 2 <= l < k and l * k >= SCREEN_MIN_ENTRIES


def choose(c: np.ndarray, shared: float | None = None) -> tuple[str, np.ndarray | None]:
  """The fastest exact solver for one finite cost [L, K] by measured rules, and the
  union's columns when it picked "union". `shared`: this image's `_shared`, if known."""
  l, k = c.shape
  if not _screened(l, k):
    return "dense", None
  if shared is None:
    shared = _shared(np.argmin(c, axis=1)[None], k)[0]
  if shared < SHARED_MIN:
    return "dense", None
  cols = union_columns(c)
  if len(cols) <= UNION_MAX_L * l:
    return "union", cols
  if k >= SPARSE_MIN_K * l and l * k >= SPARSE_MIN_ENTRIES:
    return "sparse", None
  return "dense", None


def auto(c: np.ndarray, shared: float | None = None) -> np.ndarray:
  """Optimal codes int32[L] for one finite cost [L, K], solver picked by `choose`."""
  name, cols = choose(c, shared)
  return union(c, cols) if name == "union" else SOLVERS[name](c)


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
  if method == "auto" and _screened(l, k) and len(todo):
    # `choose`'s first test for the whole batch at once: one argmin, one bincount.
    shared = _shared(np.argmin(cost, axis=2), k)  # (NaN rows: unused)
    fns = [dense if s < SHARED_MIN else functools.partial(auto, shared=s) for s in shared]
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

"""Sample-quality metrics on Inception pool_3 features (spec §5, paper §4, Table 3).

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium"): the Fréchet distance between Gaussians fitted to real and generated
  features, ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
- Precision, recall, density, coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity
  Metrics for Generative Models", k = 5). Precision and recall are the k-NN manifold
  estimates of Kynkäänniemi et al. 2019; density and coverage are Naeem's. Semantics follow
  the reference `prdc` package exactly: radii are distances to the k-th nearest neighbour
  within the same set, not counting the point itself, and "inside" is strict (<).

Features are float[N, D] arrays (numpy or jax). FID statistics accumulate in float64 on the
host; PRDC runs in jitted blocks on the default device, so 50k x 50k distances never exist
at once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg


# ---------------------------------------------------------------------------------------
# FID


class FeatureStatistics:
  """Streaming mean and covariance of features, in float64 on the host.

  Sums are taken about a shift (the first batch's mean), so that the covariance is not a
  small difference of large numbers: cov = (sum (x-c)(x-c)^T - n d d^T) / (n - 1) with
  d = mean - c. Feed batches of any size; memory is O(D^2) (32 MB for D = 2048).
  """

  def __init__(self):
    self.count = 0
    self._shift = self._sum = self._outer = None

  def update(self, features) -> "FeatureStatistics":
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or (self._shift is not None and x.shape[1] != self._shift.shape[0]):
      want = "[N, D]" if self._shift is None else f"[N, {self._shift.shape[0]}]"
      raise ValueError(f"Features must be {want}, got shape {x.shape}.")
    if x.shape[0] == 0:
      return self
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((x.shape[1], x.shape[1]))
    x = x - self._shift
    self.count += x.shape[0]
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x
    return self

  def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu float64[D], sigma float64[D, D]); sigma is unbiased (ddof=1) like np.cov, which
    TTUR's, pytorch-fid's and NVIDIA's FID code use."""
    if self.count < 2:
      raise ValueError(f"FID statistics need at least 2 feature vectors, got {self.count}.")
    d = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(d, d)) / (self.count - 1)
    return self._shift + d, (sigma + sigma.T) / 2


def feature_statistics(features, *, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of float[N, D] features, accumulated `chunk_size` rows at a time."""
  stats = FeatureStatistics()
  for start in range(0, max(len(features), 1), chunk_size):
    stats.update(features[start:start + chunk_size])
  return stats.mean_and_covariance()


def _nonzero_eigenvalues(w: np.ndarray) -> np.ndarray:
  """Eigenvalues of a symmetric PSD matrix with those below its numerical-rank tolerance
  (np.linalg.matrix_rank's: D * eps * max) set to 0. Rounding leaves the zero eigenvalues
  of singular covariances at about +-eps * max, and sqrt would turn each into a spurious
  sqrt(eps * max)."""
  tol = w.size * np.finfo(w.dtype).eps * max(float(w.max()), 0.0)
  return np.where(w > tol, w, 0.0)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr (S1 S2)^(1/2) for symmetric PSD S1, S2, from two symmetric eigendecompositions.

  S1 S2 = R (R S2 R) R^-1 with R = S1^(1/2), so S1 S2 is similar to the symmetric PSD
  M = R S2 R, has M's real non-negative eigenvalues, and tr (S1 S2)^(1/2) = sum sqrt(eig M).
  `eigh` on symmetric matrices is backward stable, so this is exact to float64 rounding, also
  when the covariances are singular (fewer samples than dimensions). scipy.linalg.sqrtm on
  the non-symmetric product goes through a complex Schur form instead: it returns spurious
  imaginary parts and is less accurate on singular products, which is why pytorch-fid adds
  eps * I and drops the imaginary part. Takes a few seconds on the host for D = 2048.
  """
  w, v = scipy.linalg.eigh(sigma1, driver="evd")  # divide and conquer: fastest with vectors
  root = (v * np.sqrt(_nonzero_eigenvalues(w))) @ v.T
  m = root @ sigma2 @ root
  eig = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True)
  return float(np.sqrt(_nonzero_eigenvalues(eig)).sum())


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"Mismatched FID statistics: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}.")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * _trace_sqrt_product(sigma1, sigma2))


def frechet_distance(real_features, fake_features) -> float:
  """FID between two feature sets float[N, D] and float[M, D] (e.g. Inception pool_3)."""
  return frechet_distance_from_statistics(*feature_statistics(real_features),
                                          *feature_statistics(fake_features))


# ---------------------------------------------------------------------------------------
# Precision, recall, density, coverage


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """[n, D] x [m, D] -> [n, m] squared Euclidean distances, float32."""
  # Full float32 matmul precision: on TPU the default (bfloat16 passes) would move points
  # across the k-NN balls' boundaries.
  ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * ab
  return jnp.maximum(d2, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_sq_radii(blocks: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """Squared distance of every point to its (k+1)-th nearest point of the same set (itself
  being the first), as prdc's radii. blocks [B, C, D], valid bool[B, C] -> float32[B, C].

  One [C, C] distance block at a time: a scan over column blocks keeps a running top-(k+1).
  """
  def row_block(rows):
    def step(best, col):
      cols, col_valid = col
      d2 = jnp.where(col_valid[None, :], _squared_distances(rows, cols), jnp.inf)
      best, _ = jax.lax.top_k(jnp.concatenate([best, -d2], axis=1), k + 1)
      return best, None
    init = jnp.full((rows.shape[0], k + 1), -jnp.inf, jnp.float32)
    best, _ = jax.lax.scan(step, init, (blocks, valid))
    return -best[:, k]
  return jax.lax.map(row_block, blocks)


@jax.jit
def _cross_counts(real: jax.Array, real_r2: jax.Array, fake: jax.Array, fake_r2: jax.Array,
                  fake_valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Over all real x fake blocks: for each fake point, how many real balls hold it; for each
  real point, whether some fake point lies in its ball (coverage) and whether it lies in
  some fake ball (recall). Padding has radius^2 = -inf (holds nothing) and padded fakes are
  masked out, so they count for nothing.
  """
  def real_step(counts, real_block):
    rows, r2 = real_block
    def fake_step(flags, fake_block):
      cols, f2, f_valid = fake_block
      d2 = _squared_distances(rows, cols)
      in_real_ball = (d2 < r2[:, None]) & f_valid[None, :]
      in_fake_ball = d2 < f2[None, :]
      covered, recalled = flags
      flags = covered | in_real_ball.any(axis=1), recalled | in_fake_ball.any(axis=1)
      return flags, in_real_ball.sum(axis=0, dtype=jnp.int32)
    init = (jnp.zeros(rows.shape[0], bool), jnp.zeros(rows.shape[0], bool))
    flags, block_counts = jax.lax.scan(fake_step, init, (fake, fake_r2, fake_valid))
    return counts + block_counts, flags
  counts, (covered, recalled) = jax.lax.scan(
      real_step, jnp.zeros(fake.shape[:2], jnp.int32), (real, real_r2))
  return counts, covered, recalled


def _blocks(x: np.ndarray, chunk: int) -> tuple[jax.Array, jax.Array]:
  """[N, D] -> zero-padded [ceil(N / chunk), chunk, D] and its validity mask."""
  n, d = x.shape
  nb = -(-n // chunk)
  padded = np.zeros((nb * chunk, d), np.float32)
  padded[:n] = x
  valid = np.arange(nb * chunk) < n
  return jnp.asarray(padded.reshape(nb, chunk, d)), jnp.asarray(valid.reshape(nb, chunk))


def compute_prdc(real_features, fake_features, nearest_k: int = 5, *,
                 chunk_size: int = 1024) -> dict[str, float]:
  """Precision, recall, density and coverage (Naeem et al. 2020, eqs. 1-4 and their §3).

  With B_k(x, S) the ball around x reaching its k-th nearest neighbour in S \\ {x}:
    precision = mean over fakes y of [y in some B_k(x, real)]
    recall    = mean over reals x of [x in some B_k(y, fake)]
    density   = 1 / (k M) * sum over fakes y of #{real x : y in B_k(x, real)}
    coverage  = mean over reals x of [some fake y in B_k(x, real)]

  Args:
    real_features: float[N, D]; fake_features: float[M, D] (N, M > nearest_k).
    nearest_k: k; the paper and spec §5 use 5.
    chunk_size: rows and columns per distance block: peak memory is O(chunk_size^2 + (N +
      M) D). Results do not depend on it.

  Returns:
    {"precision", "recall", "density", "coverage"} as Python floats.
  """
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"PRDC wants features [N, D] and [M, D], got {real.shape} and "
                     f"{fake.shape}.")
  n, m = len(real), len(fake)
  if min(n, m) <= nearest_k:
    raise ValueError(f"PRDC with nearest_k={nearest_k} needs more than {nearest_k} real and "
                     f"fake features, got {n} and {m}.")
  # Distances are translation-invariant; centring first shrinks |a|^2 + |b|^2 - 2 a.b's
  # float32 cancellation error, which scales with the squared norms.
  centre = real.mean(axis=0)
  chunk = min(chunk_size, max(n, m))
  real_blocks, real_valid = _blocks(real - centre, chunk)
  fake_blocks, fake_valid = _blocks(fake - centre, chunk)
  real_r2 = _kth_neighbour_sq_radii(real_blocks, real_valid, nearest_k)
  fake_r2 = _kth_neighbour_sq_radii(fake_blocks, fake_valid, nearest_k)
  # Padded points get an empty ball.
  real_r2 = jnp.where(real_valid, real_r2, -jnp.inf)
  fake_r2 = jnp.where(fake_valid, fake_r2, -jnp.inf)
  counts, covered, recalled = _cross_counts(real_blocks, real_r2, fake_blocks, fake_r2,
                                            fake_valid)
  counts = np.asarray(counts).reshape(-1)[:m]
  return {
      "precision": float(np.mean(counts > 0)),
      "recall": float(np.mean(np.asarray(recalled).reshape(-1)[:n])),
      "density": float(counts.sum() / (nearest_k * m)),
      "coverage": float(np.mean(np.asarray(covered).reshape(-1)[:n])),
  }

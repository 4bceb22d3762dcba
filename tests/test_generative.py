"""FID and PRDC (pivq_jax/evaluation/generative.py) against scipy's sqrtm, an exact
low-rank oracle and the reference `prdc` package."""

import jax.numpy as jnp
import numpy as np
import prdc
import pytest
import scipy.linalg

from pivq_jax.evaluation import generative

SHIFTS = (0.0, 0.5, 1.0)


def _gaussian(n, d, *, shift=0.0, scale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  mix = np.eye(d) + 0.3 * rng.standard_normal((d, d))  # correlated dimensions
  return (scale * rng.standard_normal((n, d)) @ mix + shift).astype(np.float32)


def _fid_with_sqrtm(x, y):
  """The textbook formula with scipy.linalg.sqrtm, as TTUR and pytorch-fid compute it."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  diff = x.mean(0) - y.mean(0)
  return diff @ diff + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)


def _fid_low_rank_oracle(x, y):
  """Exact FID of two equal-size sets: the nonzero eigenvalues of S1 S2 are the squared
  singular values of Xc Yc^T / (n - 1), so tr (S1 S2)^(1/2) is that matrix's nuclear norm."""
  n = len(x)
  xc, yc = x - x.mean(0), y - y.mean(0)
  nuclear = np.linalg.svd(xc @ yc.T / (n - 1), compute_uv=False).sum()
  diff = x.mean(0) - y.mean(0)
  return diff @ diff + ((xc ** 2).sum() + (yc ** 2).sum()) / (n - 1) - 2 * nuclear


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (0.3, 1.2), (2.0, 0.5)])
def test_fid_matches_scipy_sqrtm(shift, scale):
  real, fake = _gaussian(400, 32), _gaussian(350, 32, shift=shift, scale=scale, seed=1)
  np.testing.assert_allclose(generative.frechet_distance(real, fake),
                             _fid_with_sqrtm(real, fake), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n, d", [(40, 64), (300, 16)])
def test_fid_is_exact_also_for_singular_covariances(n, d):
  # n < d: rank-deficient covariances, where sqrtm is off by ~1e-8 relative.
  x = 3 * np.random.default_rng(2).standard_normal((n, d)) + 1
  y = 3 * np.random.default_rng(3).standard_normal((n, d))
  np.testing.assert_allclose(generative.frechet_distance(x, y), _fid_low_rank_oracle(x, y),
                             rtol=1e-12)
  assert abs(generative.frechet_distance(x, x)) < 1e-9


def test_fid_of_a_translated_set_is_the_squared_shift():
  x = _gaussian(300, 24)
  assert abs(generative.frechet_distance(x, x)) < 1e-9
  for delta in (0.1, 1.0):  # same covariance: FID = ||delta||^2 = D delta^2
    moved = x.astype(np.float64) + delta
    np.testing.assert_allclose(generative.frechet_distance(x, moved), 24 * delta ** 2,
                               rtol=1e-9)


def test_streamed_statistics_match_numpy_even_far_from_the_origin():
  x = _gaussian(1000, 8).astype(np.float64) + 1e4  # naive sums would lose ~8 digits
  stats = generative.FeatureStatistics()
  for lo, hi in ((0, 1), (1, 300), (300, 300), (300, 1000)):  # uneven, one empty batch
    stats.update(x[lo:hi])
  mu, sigma = stats.mean_and_covariance()
  assert stats.count == 1000
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-11)
  mu2, sigma2 = generative.feature_statistics(x, chunk_size=64)
  np.testing.assert_allclose(mu2, mu, rtol=1e-14)
  np.testing.assert_allclose(sigma2, sigma, rtol=1e-9, atol=1e-11)


def test_fid_rejects_bad_shapes():
  with pytest.raises(ValueError, match="at least 2"):
    generative.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    generative.FeatureStatistics().update(np.zeros((3, 4))).update(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="Mismatched FID statistics"):
    generative.frechet_distance(np.ones((5, 4)), np.ones((5, 3)))


@pytest.fixture(scope="module")
def prdc_cases():
  """(shift, real, fake, prdc's result) for fakes moved further and further away."""
  real = _gaussian(400, 32)
  cases = []
  for shift in SHIFTS:
    fake = _gaussian(350, 32, shift=shift, scale=1.1, seed=1)
    cases.append((shift, real, fake, prdc.compute_prdc(real, fake, nearest_k=5)))
  return cases


@pytest.mark.parametrize("chunk_size", [64, 1024])  # 64: 7 x 6 padded blocks; 1024: one
def test_prdc_matches_the_prdc_package(prdc_cases, chunk_size):
  for _, real, fake, ref in prdc_cases:
    ours = generative.compute_prdc(real, fake, nearest_k=5, chunk_size=chunk_size)
    assert set(ours) == {"precision", "recall", "density", "coverage"}
    for name, value in ours.items():
      assert isinstance(value, float)
      np.testing.assert_allclose(value, ref[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_prdc_falls_as_fakes_move_away(prdc_cases):
  scores = [generative.compute_prdc(real, fake, chunk_size=128)
            for _, real, fake, _ in prdc_cases]
  for name in ("precision", "recall", "density", "coverage"):
    values = [s[name] for s in scores]
    assert all(a > b for a, b in zip(values, values[1:])), (name, values)


def test_prdc_of_identical_sets_is_one(prdc_cases):
  real = prdc_cases[0][1]
  for chunk_size in (50, 1024):
    ours = generative.compute_prdc(real, real.copy(), chunk_size=chunk_size)
    assert ours == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
  # Device arrays work too, with any k.
  ours = generative.compute_prdc(jnp.asarray(real), jnp.asarray(real), nearest_k=3)
  assert ours["density"] == 1.0


def test_prdc_rejects_bad_inputs():
  with pytest.raises(ValueError, match="more than 5"):
    generative.compute_prdc(np.zeros((5, 3)), np.zeros((10, 3)))
  with pytest.raises(ValueError, match=r"\[N, D\] and \[M, D\]"):
    generative.compute_prdc(np.zeros((10, 3)), np.zeros((10, 4)))


def test_real_feature_cache_key_follows_the_data(tmp_path):
  """The real-feature cache is keyed on a fingerprint of the split: a file added, removed
  or a probed one replaced in place gives another cache file; the same data the same."""
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from pivq_jax.evaluators import generative as generative_evaluator
  # pylint: enable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = [{"image": rng.integers(0, 256, (8, 8, 3), np.uint8)} for _ in range(40)]
  config = ml_collections.ConfigDict(dict(
      data=dict(name="faces", resolution=8),
      eval=dict(real_split="test", cache_dir=str(tmp_path))))
  key = lambda source: generative_evaluator.real_features_path(config, source, 32)
  assert key(images) == key([dict(x) for x in images])
  assert key(images) != key(images[:-1])
  changed = [dict(x) for x in images]
  changed[-1] = {"image": 255 - images[-1]["image"]}  # the last image is always read
  assert key(images) != key(changed)

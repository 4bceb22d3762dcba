"""DCI and InfoMEC (FactorQVAE paper §3.3) on constructed latents with known answers.

Factors are a full grid of combinations repeated, so they are exactly independent in the
sample: the plug-in mutual information between two different factors is exactly 0, which
makes the InfoMEC answers exact rather than approximate.
"""

import itertools

import numpy as np
import pytest
from scipy import sparse
from sklearn import metrics

from pivq_jax.evaluation import disentanglement

_SIZES = (4, 3, 5)


def _grid(repeats, seed=0):
  """int[60 * repeats, 3]: every combination of _SIZES `repeats` times, shuffled."""
  grid = np.array(list(itertools.product(*[range(k) for k in _SIZES])))
  factors = np.tile(grid, (repeats, 1))
  return factors[np.random.default_rng(seed).permutation(len(factors))]


@pytest.fixture(scope="module")
def split():
  """Train and test grids (900 and 300 points), each balanced over all combinations."""
  return _grid(15, seed=0), _grid(5, seed=1)


def _scalars(result):
  return {k: v for k, v in result.items() if np.isscalar(v)}


def test_disentangled_latents_score_one(split):
  train, test = split
  # Each latent is one factor (relabelled: order and values must not matter).
  relabel = lambda s: np.stack([s[:, 2] * 3 + 1, 7 - s[:, 0], s[:, 1]], 1)
  result = disentanglement.dci(relabel(train), train, relabel(test), test)
  # Boosted trees put all importance of factor j on its latent: after a few stages the
  # residuals are fit exactly and no split of another latent reduces impurity, so M is a
  # permutation matrix up to ~1e-3 and D, C come out ~1 (the 1e-11 epsilon costs ~1e-9).
  assert result["disentanglement"] > 0.99 and result["completeness"] > 0.99
  assert result["informativeness_train"] == 1.0 and result["informativeness_test"] == 1.0
  np.testing.assert_array_equal(result["importance"].argmax(0), [1, 2, 0])

  info = disentanglement.infomec(relabel(train), train)
  # Exactly independent factors: NMI is a permutation matrix, InfoM = InfoC = 1 exactly.
  np.testing.assert_allclose(info["nmi"], np.eye(3)[[2, 0, 1]], atol=1e-12)
  assert info["infom"] == pytest.approx(1.0, abs=1e-12)
  assert info["infoc"] == pytest.approx(1.0, abs=1e-12)
  # The unpenalised regression separates the classes, so H_V(s|z) -> 0 and InfoE -> 1.
  assert info["infoe"] > 0.99 and info["num_active"] == 3


def test_noise_latents_are_at_chance(split):
  train, test = split
  rng = np.random.default_rng(2)
  noise_train, noise_test = rng.integers(0, 8, (len(train), 4)), rng.integers(0, 8, (len(test), 4))
  result = disentanglement.dci(noise_train, train, noise_test, test, n_estimators=30)
  majority = np.mean([np.mean(test[:, j] == np.bincount(train[:, j]).argmax())
                      for j in range(3)])
  # Test accuracy of trees on noise is the majority-class accuracy (here 1/classes, ~0.26)
  # up to sampling noise (std ~0.015 for the mean of 3 factors over 300 points).
  assert abs(result["informativeness_test"] - majority) < 0.07
  assert result["informativeness_train"] > result["informativeness_test"]  # overfit only

  info = disentanglement.infomec(noise_train, train)
  # Only the plug-in / in-sample biases remain: ~(V-1)(C-1)/2N nats per pair.
  assert info["nmi"].max() < 0.05 and info["infoe"] < 0.1


def test_duplicated_latent_lowers_completeness_not_disentanglement(split):
  train, test = split
  base = disentanglement.dci(train, train, test, test)
  dup = lambda s: s[:, [0, 0, 1, 2]]
  result = disentanglement.dci(dup(train), train, dup(test), test)
  # Identical copies tie at every split; the seeded feature order gives each about half of
  # factor 0's importance: C_0 = 1 - H_4(~½, ~½) ~ 0.5 with weight ρ_0 = ⅓, so C ~ 0.83.
  importance = result["importance"]
  assert 0.2 < importance[0, 0] / importance[:2, 0].sum() < 0.8
  assert result["completeness"] < base["completeness"] - 0.1
  assert result["disentanglement"] > 0.99  # each copy still explains only one factor

  info = disentanglement.infomec(dup(train), train)
  # Factor 0's NMI column is (1, 1, 0, 0): max/sum ½; the others 1; L = 4 active latents:
  # InfoC = ((½ + 1 + 1)/3 - ¼) / (1 - ¼) = 7/9. Each latent is still modular: InfoM = 1.
  assert info["infoc"] == pytest.approx(7 / 9, abs=1e-12)
  assert info["infom"] == pytest.approx(1.0, abs=1e-12)


def test_same_seed_same_numbers_and_subsampling(split):
  train, test = split
  rng = np.random.default_rng(3)
  latents = np.concatenate([train[:, :2], rng.integers(0, 4, (len(train), 2))], 1)
  latents_test = np.concatenate([test[:, :2], rng.integers(0, 4, (len(test), 2))], 1)
  kwargs = dict(seed=5, max_samples=400, n_estimators=30)
  first = disentanglement.dci(latents, train, latents_test, test, **kwargs)
  second = disentanglement.dci(latents, train, latents_test, test, **kwargs)
  assert _scalars(first) == _scalars(second) and first["num_train"] == 400
  np.testing.assert_array_equal(first["importance"], second["importance"])
  continuous = latents + 0.3 * rng.standard_normal(latents.shape)
  first = disentanglement.infomec(continuous, train, discrete=False, seed=5)
  second = disentanglement.infomec(continuous, train, discrete=False, seed=5)
  assert _scalars(first) == _scalars(second)
  np.testing.assert_array_equal(first["nmi"], second["nmi"])


def test_continuous_path_and_active_latents(split):
  train, _ = split
  rng = np.random.default_rng(4)
  latents = train + 0.1 * rng.standard_normal(train.shape)
  # A fourth latent with a tiny range (< max range / 20) is inactive and pruned.
  latents = np.concatenate([latents, 0.01 * rng.standard_normal((len(train), 1))], 1)
  info = disentanglement.infomec(latents, train, discrete=False)
  np.testing.assert_array_equal(info["active"], [True, True, True, False])
  # The k-NN estimate is not exact (~±0.02 off the diagonal), hence the tolerance.
  assert info["infom"] > 0.9 and info["infoc"] > 0.9 and info["infoe"] > 0.9
  np.testing.assert_array_equal(info["nmi"][:3].argmax(1), [0, 1, 2])
  # The same latents read as discrete: every float value is its own symbol, so each latent
  # identifies every sample and carries all information about every factor.
  assert disentanglement.infomec(latents, train, discrete=True)["infom"] < 0.05


def test_presence_features_sparse_equals_dense(split):
  train, test = split
  # K = 40 presence bits: codes 0-3, 4-6 and 7-11 mark the values of factors 0, 1 and 2;
  # codes 12-29 are rare noise; codes 30-39 are never used (constant, pruned).
  def bits(s, seed):
    x = np.zeros((len(s), 40), bool)
    x[np.arange(len(s)), s[:, 0]] = True
    x[np.arange(len(s)), 4 + s[:, 1]] = True
    x[np.arange(len(s)), 7 + s[:, 2]] = True
    x[:, 12:30] = np.random.default_rng(seed).random((len(s), 18)) < 0.05
    return x
  x_train, x_test = bits(train, 0), bits(test, 1)
  dense = disentanglement.dci(x_train, train, x_test, test, n_estimators=20)
  as_sparse = disentanglement.dci(sparse.csr_matrix(x_train), train, sparse.csr_matrix(x_test),
                                  test, n_estimators=20)
  assert _scalars(dense) == _scalars(as_sparse) and dense["num_active"] == 30
  assert dense["informativeness_test"] == 1.0 and dense["disentanglement"] > 0.9
  info = disentanglement.infomec(x_train, train)
  assert info["num_active"] == 30
  # A value bit informs only its own factor (the others are exactly independent of it).
  owner = np.repeat([0, 1, 2], _SIZES)
  np.testing.assert_array_equal(info["nmi"][:12].argmax(1), owner)
  np.testing.assert_array_equal(np.count_nonzero(info["nmi"][:12], 1), np.ones(12))
  # InfoM averages every active latent equally: the 18 noise bits (max/sum ~ 1/3) pull it
  # well below 1 although every informative bit is perfectly modular.
  assert 0.4 < info["infom"] < 0.9
  assert _scalars(info) == _scalars(disentanglement.infomec(sparse.csc_matrix(x_train), train))
  # One-hot (ordinal=False) of binary latents is the latents themselves.
  assert _scalars(disentanglement.dci(x_train, train, x_test, test, n_estimators=20,
                                      ordinal=False)) == _scalars(dense)


def test_mutual_information_matches_sklearn(split):
  train, _ = split
  rng = np.random.default_rng(6)
  latents = np.concatenate([train[:, :1] * 2 + rng.integers(0, 2, (len(train), 1)),
                            rng.integers(0, 6, (len(train), 2)),
                            rng.random((len(train), 2)) < 0.1], 1)
  expected = np.array([[metrics.mutual_info_score(train[:, j], latents[:, i])
                        / metrics.mutual_info_score(train[:, j], train[:, j])
                        for j in range(3)] for i in range(latents.shape[1])])
  for x in (latents, sparse.csr_matrix(latents)):
    np.testing.assert_allclose(disentanglement.infomec(x, train)["nmi"], expected, atol=1e-12)


def test_one_hot_dci_sums_importance_per_latent(split):
  train, test = split
  # Values scrambled so that their order means nothing: one-hot needs no thresholds.
  scramble = np.array([3, 0, 4, 1, 2])
  latents = lambda s: np.stack([s[:, 0], s[:, 1], scramble[s[:, 2]]], 1)
  result = disentanglement.dci(latents(train), train, latents(test), test, ordinal=False,
                               n_estimators=30)
  assert result["importance"].shape == (3, 3) and result["completeness"] > 0.99
  assert result["informativeness_test"] == 1.0


def test_bad_inputs_raise():
  factors = _grid(2)
  latents = factors.copy()
  with pytest.raises(ValueError, match="must be"):
    disentanglement.infomec(latents[:, 0], factors)
  with pytest.raises(ValueError, match="rows"):
    disentanglement.infomec(latents[:-1], factors)
  with pytest.raises(ValueError, match="must be"):
    disentanglement.dci(latents, factors[:, 0], latents, factors)
  with pytest.raises(ValueError, match="latents_test has 2"):
    disentanglement.dci(latents, factors, latents[:, :2], factors)
  with pytest.raises(ValueError, match="factors_test has 2"):
    disentanglement.dci(latents, factors, latents, factors[:, :2])
  with pytest.raises(ValueError, match="constant"):
    disentanglement.infomec(latents, np.concatenate([factors, np.zeros_like(factors)], 1))
  with pytest.raises(ValueError, match="at least 2 factors"):
    disentanglement.infomec(latents, factors[:, :1])

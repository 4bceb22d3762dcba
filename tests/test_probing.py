"""Probes of code presence (paper §3.8) on synthetic code sets with known structure."""

import math

import numpy as np
import pytest

from pivq_jax.evaluation import probing

_K, _L = 64, 8


def _synthetic(n=600, seed=0):
  """Random code sets over codes 8..63, plus codes 0..4 that encode two labels exactly:
  a binary one (code 0 when 1, else code 1) and a 3-class one (code 2 + class).
  The third label is independent of the codes."""
  rng = np.random.default_rng(seed)
  binary = (rng.random(n) < 0.7).astype(int)
  three = rng.integers(0, 3, n)
  noise = (rng.random(n) < 0.75).astype(int)
  codes = rng.integers(8, _K, (n, _L))
  codes[:, 0] = 1 - binary
  codes[:, 1] = 2 + three
  rng.permuted(codes, axis=1, out=codes)  # positions carry nothing
  return codes, np.stack([binary, three, noise], 1)


def test_presence_features():
  codes = np.array([[0, 2, 2], [1, 1, 1], [3, 0, 1]])
  expected = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]], bool)
  dense = probing.presence_features(codes, 4)
  assert dense.dtype == bool and dense.shape == (3, 4)
  np.testing.assert_array_equal(dense, expected)
  as_sparse = probing.presence_features(codes, 4, as_sparse=True)
  np.testing.assert_array_equal(as_sparse.toarray(), expected.astype(np.float32))
  with pytest.raises(ValueError):
    probing.presence_features(codes, 3)


def test_probe_finds_encoded_labels_and_not_random_ones():
  codes, labels = _synthetic()
  results = probing.probe(probing.presence_features(codes, _K), labels,
                          ["binary", "three", "noise"])
  binary, three, noise = results["binary"], results["three"], results["noise"]
  assert (binary["num_classes"], three["num_classes"]) == (2, 3)
  assert binary["accuracy"] > 0.97 and binary["majority"] < 0.75
  assert three["accuracy"] > 0.97 and three["majority"] < 0.4
  assert all(r["stratified"] and r["converged"] for r in results.values())
  # Independent of the codes: no better than always answering the majority class.
  assert abs(noise["accuracy"] - noise["majority"]) < 0.08
  # Dense and sparse inputs give the same fits.
  from_sparse = probing.probe(probing.presence_features(codes, _K, as_sparse=True),
                              labels, ["binary", "three", "noise"])
  for name, r in results.items():
    assert from_sparse[name]["accuracy"] == pytest.approx(r["accuracy"])


def test_majority_is_the_class_frequency():
  # 500 = 5 equal stratified folds: each test fold is exactly 70% class 1.
  rng = np.random.default_rng(1)
  labels = np.array([1] * 350 + [0] * 150)
  rng.shuffle(labels)
  features = rng.random((500, 16)) < 0.3
  result = probing.probe(features, labels, ["a"])["a"]
  assert result["majority"] == pytest.approx(0.7, abs=1e-12)
  assert result["majority_std"] == pytest.approx(0.0, abs=1e-12)


def test_constant_and_rare_labels():
  codes, labels = _synthetic(n=200)
  constant = np.full(200, 3)
  rare = np.zeros(200, int)
  rare[:2] = 1  # fewer members than folds: unstratified fallback
  results = probing.probe(probing.presence_features(codes, _K),
                          np.stack([labels[:, 0], constant, rare], 1),
                          ["binary", "constant", "rare"])
  assert list(results) == ["binary", "constant", "rare"]
  assert math.isnan(results["constant"]["accuracy"]) and "skipped" in results["constant"]
  assert results["constant"]["num_classes"] == 1
  assert not results["rare"]["stratified"] and "skipped" not in results["rare"]
  assert results["rare"]["majority"] == pytest.approx(0.99)
  assert results["binary"]["accuracy"] > 0.9


def test_plot_probing(tmp_path):
  codes, labels = _synthetic(n=200)
  results = probing.probe(probing.presence_features(codes, _K),
                          np.concatenate([labels, np.zeros((200, 1), int)], 1),
                          ["binary", "three", "noise", "constant"])
  path = tmp_path / "plots" / "probing.png"
  image = probing.plot_probing(path, results, top=2)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[0] > 100
  assert path.stat().st_size > 1000
  assert [p.name for p in path.parent.iterdir()] == ["probing.png"]  # no temp file left


def test_parallel_matches_sequential():
  codes, labels = _synthetic(n=300)
  features = probing.presence_features(codes, _K)
  names = ["binary", "three", "noise"]
  assert (probing.probe(features, labels, names, n_jobs=2)
          == probing.probe(features, labels, names, n_jobs=1))

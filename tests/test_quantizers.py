"""Nearest and matching vector quantization: assignments, losses, straight-through."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from pivq_jax.quantizers import matching
from pivq_jax.quantizers import nearest
from pivq_jax.quantizers import vq


def _setup(assignment="nearest", beta_on_codebook=True, b=3, l=6, k=10, d=4):
  q = vq.VectorQuantizer(num_codes=k, dim=d, assignment=assignment,
                         beta_on_codebook=beta_on_codebook)
  z = jax.random.normal(jax.random.key(0), (b, l, d))
  params = q.init(jax.random.key(1), z)
  params = {"params": {"codebook": jax.random.normal(jax.random.key(2), (k, d))}}
  return q, z, params


def test_nearest_is_brute_force_argmin():
  q, z, params = _setup()
  _, aux = q.apply(params, z)
  cb = np.asarray(params["params"]["codebook"])
  brute = np.argmin(((np.asarray(z)[..., None, :] - cb) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(aux["indices"], brute)
  presence = np.zeros((3, 10), bool)
  for i, row in enumerate(brute):
    presence[i, row] = True
  np.testing.assert_array_equal(aux["presence"], presence)
  np.testing.assert_array_equal(aux["distinct_codes"], presence.sum(1))


def test_straight_through_forward_and_gradient():
  q, z, params = _setup()
  w = jax.random.normal(jax.random.key(3), z.shape)
  z_st, aux = q.apply(params, z)
  np.testing.assert_allclose(z_st, q.apply(params, aux["indices"], method="lookup"),
                             atol=1e-6)
  grad = jax.grad(lambda z: jnp.sum(q.apply(params, z)[0] * w))(z)
  np.testing.assert_allclose(grad, w, atol=1e-6)  # identity backward to the encoder


@pytest.mark.parametrize("beta_on_codebook", [True, False])
def test_loss_conventions(beta_on_codebook):
  q, z, params = _setup(beta_on_codebook=beta_on_codebook)
  _, aux = q.apply(params, z)
  cb = params["params"]["codebook"]
  z_q = cb[aux["indices"]]
  mse = float(jnp.mean((z - z_q) ** 2))
  np.testing.assert_allclose(aux["loss"], 1.25 * mse, rtol=1e-5)

  def loss(p, z):
    return q.apply(p, z)[1]["loss"]

  g_cb, g_z = jax.grad(loss, argnums=(0, 1))(params, z)
  g_cb = g_cb["params"]["codebook"]
  # d/dz of mean||z - sg(q)||^2 = 2 (z - q) / N; the codebook gets the other term.
  n = z.size
  commit_grad = 2 * (z - z_q) / n
  cb_weight, z_weight = (0.25, 1.0) if beta_on_codebook else (1.0, 0.25)
  np.testing.assert_allclose(g_z, z_weight * commit_grad, atol=1e-6)
  expected_cb = np.zeros_like(np.asarray(cb))
  np.add.at(expected_cb, np.asarray(aux["indices"]).ravel(),
            -cb_weight * np.asarray(commit_grad).reshape(-1, cb.shape[1]))
  np.testing.assert_allclose(g_cb, expected_cb, atol=1e-6)


def _brute_force_optimum(cost):
  l, k = cost.shape
  return min(sum(cost[i, p[i]] for i in range(l)) for p in itertools.permutations(range(k), l))


def test_matching_hungarian_is_one_to_one_and_optimal():
  cost = jax.random.uniform(jax.random.key(0), (5, 4, 6))
  out = np.asarray(jax.jit(matching.assign)(cost))
  for b in range(5):
    assert len(set(out[b])) == 4
    total = float(np.asarray(cost[b])[np.arange(4), out[b]].sum())
    np.testing.assert_allclose(total, _brute_force_optimum(np.asarray(cost[b])), rtol=1e-6)


def test_matching_under_vmap_and_with_identical_latents():
  # Identical latents all want the same code; matching must still use L distinct codes.
  cost = jnp.tile(jnp.arange(8.0)[None, None], (2, 3, 5, 1))  # [2, 3, 5, 8]
  out = jax.vmap(matching.assign)(cost)
  assert out.shape == (2, 3, 5)
  for row in np.asarray(out).reshape(-1, 5):
    assert sorted(row) == [0, 1, 2, 3, 4]


def test_matching_quantizer_uses_distinct_codes_where_nearest_repeats():
  k, d = 16, 4
  z = jnp.zeros((2, 8, d)) + 0.01 * jax.random.normal(jax.random.key(0), (2, 8, d))
  cb = {"params": {"codebook": jax.random.normal(jax.random.key(1), (k, d))}}
  _, near = vq.VectorQuantizer(k, d, assignment="nearest").apply(cb, z)
  _, match = vq.VectorQuantizer(k, d, assignment="matching").apply(cb, z)
  assert int(near["distinct_codes"].max()) < 8
  np.testing.assert_array_equal(match["distinct_codes"], [8, 8])
  # Optimal for the plain Euclidean cost (spec §2).
  c = np.asarray(jnp.linalg.norm(z[0, :, None] - cb["params"]["codebook"], axis=-1))
  rows, cols = scipy.optimize.linear_sum_assignment(c)
  np.testing.assert_allclose(c[np.arange(8), np.asarray(match["indices"][0])].sum(),
                             c[rows, cols].sum(), rtol=1e-6)


def test_matching_rejects_non_finite_costs_and_l_greater_than_k():
  with pytest.raises(ValueError, match="L <= K"):
    matching.assign(jnp.zeros((1, 5, 4)))
  with pytest.raises(Exception, match="NaN or Inf"):
    jax.block_until_ready(matching.assign(jnp.full((1, 2, 3), jnp.nan)))


def test_nearest_module_function():
  d = jnp.asarray([[[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]]])
  np.testing.assert_array_equal(nearest.assign(d), [[1, 2]])

"""Interpolation samples and smooth paths between code sets (paper §3.5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pivq_jax import sampling

K, L = 64, 12


def _pairs(n, overlap, seed=0):
  """n pairs of L-code sets sharing `overlap` codes."""
  rng = np.random.default_rng(seed)
  a, b = [], []
  for _ in range(n):
    codes = rng.permutation(K)[:2 * L - overlap]
    a.append(np.sort(codes[:L]))
    b.append(np.sort(codes[L - overlap:]))
  return jnp.asarray(np.stack(a)), jnp.asarray(np.stack(b))


def test_interpolation_sample_is_c_plus_a_draw_from_e():
  a, b = _pairs(200, overlap=4)
  keys = jax.random.split(jax.random.key(0), 200)
  f = jax.jit(jax.vmap(functools.partial(sampling.interpolation_sample, num_codes=K)))
  z = np.asarray(f(a, b, keys))
  counts = np.zeros(K)
  for zi, ai, bi in zip(z, np.asarray(a), np.asarray(b)):
    assert len(set(zi.tolist())) == L  # exactly L distinct codes
    assert set(ai) & set(bi) <= set(zi) <= set(ai) | set(bi)
  # Draws from E are uniform: each of A's 8 own codes is kept about half the time.
  a0, b0 = np.asarray(a[0]), np.asarray(b[0])
  own = sorted(set(a0) - set(b0))
  z0 = np.asarray(f(jnp.repeat(a[:1], 2000, 0), jnp.repeat(b[:1], 2000, 0),
                    jax.random.split(jax.random.key(1), 2000)))
  for code in own:
    counts[code] = np.mean(np.any(z0 == code, axis=1))
  assert np.all(np.abs(counts[own] - 0.5) < 0.06)


def test_smooth_path_goes_from_a_to_b_one_code_at_a_time():
  a, b = _pairs(16, overlap=5, seed=2)
  f = jax.jit(jax.vmap(functools.partial(sampling.smooth_path, num_codes=K)))
  frames, n = f(a, b, jax.random.split(jax.random.key(3), 16))
  frames, n = np.asarray(frames), np.asarray(n)
  assert frames.shape == (16, L + 1, L) and np.all(n == L - 5)
  for fr, ai, bi, ni in zip(frames, np.asarray(a), np.asarray(b), n):
    np.testing.assert_array_equal(fr[0], ai)
    np.testing.assert_array_equal(fr[ni], bi)
    np.testing.assert_array_equal(fr[-1], bi)  # frames after n repeat B
    for t in range(ni):
      assert len(set(fr[t].tolist())) == L
      lost, gained = set(fr[t]) - set(fr[t + 1]), set(fr[t + 1]) - set(fr[t])
      assert len(lost) == len(gained) == 1
      assert lost <= set(ai) - set(bi) and gained <= set(bi) - set(ai)


def test_paths_differ_by_key_and_identical_sets_give_a_still_path():
  a, b = _pairs(1, overlap=2, seed=4)
  p1, _ = sampling.smooth_path(a[0], b[0], jax.random.key(0), num_codes=K)
  p2, _ = sampling.smooth_path(a[0], b[0], jax.random.key(1), num_codes=K)
  assert not np.array_equal(p1, p2)
  still, n = sampling.smooth_path(a[0], a[0], jax.random.key(0), num_codes=K)
  assert int(n) == 0 and np.all(np.asarray(still) == np.asarray(a[0]))

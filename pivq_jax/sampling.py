"""Sampling from code sets with no learned prior (paper §3.5; spec §4).

Under matching every image is a set of L distinct codes. For two images with code sets A
and B, with C = A ∩ B and E = A △ B:
  - interpolation sample: Z = C plus |E|/2 codes drawn from E without replacement, so
    |Z| = L. Decoding Z is one decoder pass and gives a novel image.
  - smooth path: E_A = A \\ B and E_B = B \\ A have the same size n. With random orders of
    each, Z(t) = C ∪ (first n - t of E_A) ∪ (last t of E_B) for t = 0..n, so Z(0) = A,
    Z(n) = B, and each step swaps one code of A for one of B.

Everything works on [K] membership masks, so shapes are static and batches of pairs run
under jit and vmap on device. Inputs are int[..., L] code sets with L distinct codes (what
the matching quantizer returns); outputs are int32 code sets of the same size, sorted.
"""

import jax
import jax.numpy as jnp


def membership(codes, num_codes: int):
  """int[L] distinct codes -> bool[K] mask."""
  return jnp.zeros((num_codes,), bool).at[codes].set(True)


def _mask_to_codes(mask, length: int):
  """bool[K] mask with exactly `length` members -> int32[length], ascending."""
  _, idx = jax.lax.top_k(mask.astype(jnp.int32), length)  # the members, in some order
  return jnp.sort(idx).astype(jnp.int32)


def interpolation_sample(codes_a, codes_b, key, *, num_codes: int):
  """One novel code set from two: int[L], int[L] -> int32[L] (C plus a draw from E)."""
  length = codes_a.shape[-1]
  a, b = membership(codes_a, num_codes), membership(codes_b, num_codes)
  common, either = a & b, a ^ b
  # Random priorities within E, above everything outside A ∪ B and below C: the top L are
  # C plus a uniformly random (L - |C|)-subset of E.
  u = jax.random.uniform(key, (num_codes,))
  priority = jnp.where(common, 2.0, jnp.where(either, u, -1.0))
  _, idx = jax.lax.top_k(priority, length)
  return jnp.sort(idx).astype(jnp.int32)


def smooth_path(codes_a, codes_b, key, *, num_codes: int):
  """A path of code sets from A to B: -> (int32[L + 1, L] frames, int32 n).

  Frame t is Z(min(t, n)), so frames n..L repeat B; n = |A \\ B| is the path's length.
  """
  length = codes_a.shape[-1]
  a, b = membership(codes_a, num_codes), membership(codes_b, num_codes)
  only_a, only_b = a & ~b, b & ~a
  n = jnp.sum(only_a)
  ka, kb = jax.random.split(key)

  def ranks(mask, k):
    """Rank 0..n-1 of each member in a uniformly random order (others: a large value)."""
    score = jnp.where(mask, jax.random.uniform(k, (num_codes,)), 2.0)
    return jnp.argsort(jnp.argsort(score))

  rank_a, rank_b = ranks(only_a, ka), ranks(only_b, kb)

  def frame(t):
    t = jnp.minimum(t, n)
    keep_a = only_a & (rank_a < n - t)  # the first n - t of perm(E_A)
    take_b = only_b & (rank_b >= n - t)  # the last t of perm(E_B)
    return _mask_to_codes((a & b) | keep_a | take_b, length)

  return jax.vmap(frame)(jnp.arange(length + 1)), n.astype(jnp.int32)

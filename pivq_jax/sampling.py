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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pivq_jax import sharding as sharding_lib
from pivq_jax.data import pipeline


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


# ----------------------------------------------------------------------------------------
# The jitted steps on a model: images -> code sets -> samples, paths and decoded images.
# ----------------------------------------------------------------------------------------
def encode_step(params, batch, *, model):
  """Images -> each image's code set, ascending (the export's `codes`)."""
  codes = model.apply({"params": params}, pipeline.images(batch), method="encode_to_indices")
  return jnp.sort(codes, axis=-1)


def sample_step(params, batch_a, batch_b, key, *, model):
  """Two batches of images -> (their code sets, the samples' code sets, decoded samples)."""
  encode = lambda b: model.apply({"params": params}, pipeline.images(b),
                                 method="encode_to_indices")
  codes_a, codes_b = encode(batch_a), encode(batch_b)
  keys = jax.random.split(key, codes_a.shape[0])
  draw = functools.partial(interpolation_sample, num_codes=model.quantizer.num_codes)
  codes = jax.vmap(draw)(codes_a, codes_b, keys)
  return codes_a, codes_b, codes, model.apply({"params": params}, codes,
                                              method="decode_indices")


def path_step(params, images_a, images_b, keys, *, model, frames: int):
  """Smooth paths A -> B: codes, path lengths n, `frames` evenly spaced steps, decoded."""
  encode = lambda x: model.apply({"params": params}, pipeline.images({"image": x}),
                                 method="encode_to_indices")
  codes_a, codes_b = encode(images_a), encode(images_b)
  walk = functools.partial(smooth_path, num_codes=model.quantizer.num_codes)
  paths, n = jax.vmap(walk)(codes_a, codes_b, keys)  # [P, L + 1, L], [P]
  t = jnp.round(jnp.linspace(0.0, 1.0, frames)[None] * n[:, None]).astype(jnp.int32)
  codes = jnp.take_along_axis(paths, t[..., None], axis=1)  # [P, frames, L]
  decoded = model.apply({"params": params}, codes.reshape(-1, codes.shape[-1]),
                        method="decode_indices")
  return codes_a, codes_b, n, codes, decoded.reshape(codes.shape[:2] + decoded.shape[1:])


def pair_batches(source, num: int, batch_size: int, seed: int, sharding):
  """`num` random pairs of `source`, batched: yields (real rows, batch A, batch B, key).

  Pairs and keys depend only on `seed`, so every checkpoint is scored on the same ones;
  the last batch is padded to `batch_size` (static shapes).
  """
  pairs = np.random.default_rng(seed).integers(0, len(source), (num, 2))
  for start in range(0, num, batch_size):
    chunk = pairs[start:start + batch_size]
    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
    local = chunk.reshape(jax.process_count(), -1, 2)[jax.process_index()]  # this host's
    a, b = (sharding_lib.global_batch(
        {"image": np.stack([source[int(i)]["image"] for i in local[:, c]])}, sharding)
            for c in (0, 1))
    yield min(batch_size, num - start), a, b, jax.random.fold_in(jax.random.key(seed), start)

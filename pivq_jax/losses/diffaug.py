"""Differentiable augmentation (Zhao et al. 2020, DiffAug), UT's "color,translation" policy.

Per sample, in this order (ut-reference.md):
  brightness: x + U(-0.5, 0.5)
  saturation: per-pixel channel mean + (x - mean) * U(0, 2)
  contrast:   per-image mean + (x - mean) * U(0.5, 1.5)
  translation: an integer shift per axis in [-round(ratio * size), +round(ratio * size)],
    with zeros shifted in.
Every op is differentiable in x, so the generator's adversarial gradient flows through it.
"""

import jax
import jax.numpy as jnp

POLICIES = ("color", "translation")


def color(x, key):
  """x: float[B, H, W, C] -> same shape; brightness, saturation, contrast."""
  kb, ks, kc = jax.random.split(key, 3)
  shape = (x.shape[0], 1, 1, 1)
  x = x + jax.random.uniform(kb, shape, x.dtype, -0.5, 0.5)
  mean = jnp.mean(x, axis=3, keepdims=True)
  x = (x - mean) * jax.random.uniform(ks, shape, x.dtype, 0.0, 2.0) + mean
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * jax.random.uniform(kc, shape, x.dtype, 0.5, 1.5) + mean


def max_shift(size: int, ratio: float) -> int:
  return int(size * ratio + 0.5)  # DiffAug rounds ratio * size to the nearest integer


def translation(x, key, ratio: float = 0.125):
  """x: float[B, H, W, C] -> same shape, each image shifted by its own integer offset."""
  b, h, w, c = x.shape
  sh, sw = max_shift(h, ratio), max_shift(w, ratio)
  ky, kx = jax.random.split(key)
  dy = jax.random.randint(ky, (b,), -sh, sh + 1)
  dx = jax.random.randint(kx, (b,), -sw, sw + 1)
  padded = jnp.pad(x, ((0, 0), (sh, sh), (sw, sw), (0, 0)))  # the zeros shifted in

  def shift(img, oy, ox):
    return jax.lax.dynamic_slice(img, (sh + oy, sw + ox, 0), (h, w, c))

  return jax.vmap(shift)(padded, dy, dx)


def diff_augment(x, key, *, policy: str = "color,translation", ratio: float = 0.125):
  """Applies the comma-separated `policy` ("" = identity) with independent draws per sample."""
  names = [p for p in policy.split(",") if p]
  unknown = sorted(set(names) - set(POLICIES))
  if unknown:
    raise ValueError(f"Unknown DiffAug policy {unknown}; use a subset of "
                     f"{','.join(POLICIES)} (cutout is not part of UT's setting).")
  kc, kt = jax.random.split(key)
  if "color" in names:
    x = color(x, kc)
  if "translation" in names:
    x = translation(x, kt, ratio)
  return x

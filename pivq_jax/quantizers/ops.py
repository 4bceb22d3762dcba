"""Small array operations the matching solvers share."""

import jax
import jax.numpy as jnp


def max_first(x, axis=-1):
  """(max, first index of the max) along `axis`; much cheaper than argmax on CPU."""
  v = jnp.max(x, axis=axis, keepdims=True)
  n = x.shape[axis]
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  return jnp.squeeze(v, axis), jnp.min(jnp.where(x == v, iota, n), axis=axis)

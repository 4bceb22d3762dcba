"""Vector quantization with a learned codebook (paper §3.3-3.4).

One module serves both of the paper's quantizers; they differ only in how latents are
assigned to codes:
  - "nearest": each latent independently takes its nearest code (VQ-VAE; paper §3.3).
    Codes may repeat within an image.
  - "matching": each image's L latents take L *distinct* codes by an optimal one-to-one
    assignment under plain Euclidean cost (paper §3.4, supplemental §1.2).
Losses and straight-through gradients are shared (spec §2).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pivq_jax import sharding
from pivq_jax.quantizers import matching
from pivq_jax.quantizers import nearest

ASSIGNMENTS = ("nearest", "matching")


def squared_distances(z, codebook):
  """z: [B, L, D], codebook: [K, D] -> [B, L, K] squared L2, in float32."""
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  return (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(codebook * codebook, -1)
          - 2.0 * jnp.einsum("bld,kd->blk", z, codebook))


def code_presence(indices, num_codes):
  """indices: int[B, L] -> bool[B, K]: whether code k occurs in image b's code set.

  This is also the K binary features the paper probes (§3.8).
  """
  b = jnp.arange(indices.shape[0])[:, None]
  return jnp.zeros((indices.shape[0], num_codes), bool).at[b, indices].set(True)


def stats_or_zeros(aux, batch_size: int, num_codes: int) -> dict:
  """The quantizer's aux outputs, or zeros of the same structure while it is off (before
  T_q, §3.7), so steps and metrics keep one shape in every phase."""
  if aux is not None:
    return aux
  zero = jnp.zeros((), jnp.float32)
  return {"loss": zero, "commit_loss": zero,
          "distinct_codes": jnp.zeros((batch_size,), jnp.int32),
          "presence": jnp.zeros((batch_size, num_codes), bool)}


class VectorQuantizer(nn.Module):
  """z_e: [B, L, D] -> (straight-through z_q [B, L, D], aux dict).

  Attributes:
    num_codes: K, the codebook size.
    dim: D, the code dimension.
    assignment: "nearest" or "matching".
    solver: matching solver (see `matching.assign`); ignored for nearest.
    auction_kernel: the auction's kernel: "auto" (the fused Pallas kernel on a GPU that
      runs it, else pure JAX), "xla" or "pallas" (see `matching.assign`); both optimal
      within the same bound.
    beta: weight of one of the two VQ loss terms (0.25 in UT and the paper).
    beta_on_codebook: UT's convention (default) puts beta on the codebook term,
      ||sg(z_e) - z_q||^2; VQ-VAE puts it on the commitment term ||z_e - sg(z_q)||^2.
  """
  num_codes: int
  dim: int
  assignment: str = "nearest"
  solver: str = "hungarian"
  auction_kernel: str = "auto"
  beta: float = 0.25
  beta_on_codebook: bool = True

  def setup(self):
    if self.assignment not in ASSIGNMENTS:
      raise ValueError(f"Unknown quantizer assignment {self.assignment!r}; use one of "
                       f"{ASSIGNMENTS}.")
    # UT's codebook init: U(-1/K, 1/K). Delayed k-means++ init (paper §3.7) replaces it.
    k = self.num_codes
    self.codebook = self.param(
        "codebook", lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1 / k, 1 / k),
        (self.num_codes, self.dim))

  def assign(self, z_e):
    """int32[B, L] code indices for latents z_e [B, L, D]."""
    d2 = squared_distances(jax.lax.stop_gradient(z_e), self.codebook)
    if self.assignment == "nearest":
      return nearest.assign(d2)
    # Matching minimises the sum of plain (not squared) Euclidean distances (spec §2).
    # Each device solves its own images (the solver's loop length varies per image).
    # Divergence is the train step's finite check to report (with the step and the last
    # good checkpoint), not a callback's: images with non-finite costs get code -1.
    solve = functools.partial(matching.assign, solver=self.solver, check_finite=False,
                              auction_kernel=self.auction_kernel)
    return sharding.per_example(solve, jnp.sqrt(jnp.maximum(d2, 0.0)))

  def lookup(self, indices):
    return jnp.take(self.codebook, indices, axis=0)

  def __call__(self, z_e) -> tuple[jax.Array, dict[str, Any]]:
    indices = self.assign(z_e)
    z_q = self.lookup(indices).astype(z_e.dtype)
    z32, q32 = z_e.astype(jnp.float32), z_q.astype(jnp.float32)
    commit = jnp.mean(jnp.square(jax.lax.stop_gradient(q32) - z32))
    codebook = jnp.mean(jnp.square(q32 - jax.lax.stop_gradient(z32)))
    if self.beta_on_codebook:
      loss = commit + self.beta * codebook
    else:
      loss = codebook + self.beta * commit
    # Straight-through estimator: forward uses z_q, backward copies gradients to z_e.
    z_st = z_e + jax.lax.stop_gradient(z_q - z_e)
    presence = code_presence(indices, self.num_codes)
    aux = {
        "loss": loss,
        "commit_loss": commit,
        "codebook_loss": codebook,
        "indices": indices,
        "presence": presence,
        "distinct_codes": jnp.sum(presence, axis=-1),  # K_img per image
    }
    return z_st, aux

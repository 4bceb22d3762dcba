"""The total-correlation discriminator C_psi and the permute-dims trick (FactorVAE, Kim &
Mnih 2018; FactorQVAE paper §4, Eqs. 5-8, Fig. 1 second stage; spec "Total-correlation term").

  z [B, d, K] (soft Gumbel one-hots) or [B, d] (Gaussian samples), flattened
    -> Linear(1000) + LeakyReLU(0.2) -> 4 x [Linear(1000) + LeakyReLU(0.2)] -> Linear(2)

Logit 0 scores "a joint sample from q(z)", logit 1 "a sample from the factorial q̄(z)", so
log C/(1 - C) = D_0 - D_1 estimates the log density ratio of Eq. 7.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class TCDiscriminator(nn.Module):
  """z float[B, ...] -> logits float32[B, 2].

  Attributes:
    hidden: width of every hidden layer (1000).
    num_hidden_layers: Linear(hidden) layers after the first (4).
    negative_slope: LeakyReLU slope (0.2).
    dtype: compute dtype; parameters stay float32. Init N(0, 0.02), zero bias (reference).
  """
  hidden: int = 1000
  num_hidden_layers: int = 4
  negative_slope: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name,
                                     kernel_init=nn.initializers.normal(0.02),
                                     bias_init=nn.initializers.zeros)
    x = z.reshape(z.shape[0], -1).astype(self.dtype)
    x = nn.leaky_relu(dense(self.hidden, "dense_in")(x), self.negative_slope)
    for i in range(self.num_hidden_layers):
      x = nn.leaky_relu(dense(self.hidden, f"dense_{i}")(x), self.negative_slope)
    return dense(2, "dense_out")(x).astype(jnp.float32)


def permute_dims(z, key):
  """Samples of q̄(z) = prod_j q(z_j): permute the batch independently per latent (§4).

  z: [B, d, ...] -> same shape; column j of the output is z[perm_j, j] for an independent
  uniform permutation perm_j of the batch. For FactorQVAE a latent's whole K-dim (soft)
  one-hot moves together. Callers stop the gradient (spec: the D step sees constants).
  """
  b, d = z.shape[:2]
  perms = jax.vmap(lambda k: jax.random.permutation(k, b))(jax.random.split(key, d))  # [d, B]
  idx = perms.T.reshape((b, d) + (1,) * (z.ndim - 2))
  return jnp.take_along_axis(z, idx, axis=0)

"""The 4-layer transformer encoder PI-VQ puts after the down-sampling trunk and before the
up-sampling trunk (paper §3.2, §4 "Architecture").

No positional information is added here: callers add it where the paper does (encoder input
positions, decoder output embeddings) and leave the codes position-free, which is what makes
the decoder permutation-invariant in its codes. Pre-norm is a choice (spec §1).
"""

import flax.linen as nn
import jax.numpy as jnp


class TransformerLayer(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y))
    return x + y


class Transformer(nn.Module):
  """[B, N, D] -> [B, N, D]; permutation-equivariant in its tokens."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = TransformerLayer(self.num_heads, self.mlp_dim, self.dtype, name=f"layer_{i}")(x)
    return nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)

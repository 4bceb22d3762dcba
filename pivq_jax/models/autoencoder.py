"""The PI-VQ autoencoder (paper §3.2, Fig. 2; spec §1).

  x --conv trunk--> [h*w, D] + input positions --(+ L latent queries)--> transformer
    --last L outputs--> z_e [L, D] --quantizer--> z_q [L, D] (a *set*: no positions)
    --(+ h*w output embeddings)--> transformer --outputs after the first L-->
    [h, w, D] --up-sampling trunk--> x_hat

The codes enter the decoder without positional information and self-attention is
permutation-equivariant, so x_hat is invariant to the order of the codes.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from pivq_jax.models import transformer
from pivq_jax.models import trunk
from pivq_jax.quantizers import vq



class PIVQAutoencoder(nn.Module):
  """Methods for `apply(method=...)`: encode, quantize, decode, decode_indices,
  encode_to_indices, and __call__ (the full reconstruction).

  Attributes:
    resolution: square input size; must be divisible by 2**(len(ch_mult)-1).
    nf, ch_mult, res_blocks, attn_resolutions: UT's conv trunk.
    emb_dim: D, the token / code dimension.
    num_latents: L, codes per image.
    tfm_layers, tfm_heads, tfm_mlp_dim: the two transformers.
    quantizer: the `vq.VectorQuantizer` (nearest or matching).
    ut_unused_skip: build UT's unused 1x1 skip convs (parameter-count parity only).
    norm_groups: GroupNorm groups in the trunk (UT: 32).
    trunk_init: the conv trunk's initialisation, "flax" or "torch" (PyTorch's Conv2d
      default, which UT's code gets); see `trunk` (choice).
    embed_std: init scale of the positional, query and output embeddings (choice).
    input_pos_std: init scale of the encoder's input positions alone; 0 = embed_std.
      They are added to conv features of unit scale, so at 0.02 the encoder starts
      nearly blind to where a feature is (choice; see docs/faces_study.md).
    output_pos_std: init scale of the decoder's output embeddings alone; 0 = embed_std.
      They are the output tokens' only input besides the codes (choice; faces_study.md).
    dtype: compute dtype; parameters stay float32.
  """
  resolution: int
  nf: int
  ch_mult: Sequence[int]
  res_blocks: int
  attn_resolutions: Sequence[int]
  emb_dim: int
  num_latents: int
  tfm_layers: int
  tfm_heads: int
  tfm_mlp_dim: int
  quantizer: vq.VectorQuantizer
  ut_unused_skip: bool = False
  embed_std: float = 0.02
  input_pos_std: float = 0.0
  output_pos_std: float = 0.0
  norm_groups: int = 32
  trunk_init: str = "flax"
  dtype: Any = jnp.float32

  @property
  def grid(self) -> int:
    return self.resolution // trunk.downsampling_factor(self.ch_mult)

  def setup(self):
    trunk_kw = dict(nf=self.nf, ch_mult=tuple(self.ch_mult), res_blocks=self.res_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), dtype=self.dtype,
                    ut_unused_skip=self.ut_unused_skip, norm_groups=self.norm_groups,
                    init_scheme=self.trunk_init)
    tfm_kw = dict(num_layers=self.tfm_layers, num_heads=self.tfm_heads,
                  mlp_dim=self.tfm_mlp_dim, dtype=self.dtype)
    n_tokens = self.grid * self.grid
    _embed_init = nn.initializers.normal(stddev=self.embed_std)
    self.encoder_trunk = trunk.Encoder(out_ch=self.emb_dim, **trunk_kw)
    pos_std = self.input_pos_std or self.embed_std
    self.input_positions = self.param("input_positions",
                                      nn.initializers.normal(stddev=pos_std),
                                      (n_tokens, self.emb_dim))
    self.latent_queries = self.param("latent_queries", _embed_init,
                                     (self.num_latents, self.emb_dim))
    self.encoder_transformer = transformer.Transformer(**tfm_kw)
    out_std = self.output_pos_std or self.embed_std
    self.output_embeddings = self.param("output_embeddings",
                                        nn.initializers.normal(stddev=out_std),
                                        (n_tokens, self.emb_dim))
    self.decoder_transformer = transformer.Transformer(**tfm_kw)
    self.decoder_trunk = trunk.Decoder(**trunk_kw)

  def encode(self, x):
    """x: float[B, R, R, 3] in [0, 1] -> continuous latents z_e: float32[B, L, D]."""
    feats = self.encoder_trunk(x)
    b = feats.shape[0]
    tokens = feats.reshape(b, -1, self.emb_dim) + self.input_positions.astype(feats.dtype)
    queries = jnp.broadcast_to(self.latent_queries.astype(feats.dtype),
                               (b, self.num_latents, self.emb_dim))
    out = self.encoder_transformer(jnp.concatenate([tokens, queries], axis=1))
    return out[:, -self.num_latents:].astype(jnp.float32)  # the last L outputs

  def quantize(self, z_e):
    """z_e [B, L, D] -> (straight-through z_q [B, L, D], aux dict of losses and codes)."""
    return self.quantizer(z_e)

  def decode(self, codes):
    """codes: float[B, L, D] code vectors, in any order -> x_hat: float32[B, R, R, 3]."""
    b = codes.shape[0]
    codes = codes.astype(self.dtype)
    outputs = jnp.broadcast_to(self.output_embeddings.astype(self.dtype),
                               (b, self.grid * self.grid, self.emb_dim))
    # Codes get no positional embedding: this is what makes decoding order-free.
    h = self.decoder_transformer(jnp.concatenate([codes, outputs], axis=1))
    h = h[:, self.num_latents:].reshape(b, self.grid, self.grid, self.emb_dim)
    return self.decoder_trunk(h)

  def decode_indices(self, indices):
    """indices: int[B, L] codebook indices -> x_hat."""
    return self.decode(self.quantizer.lookup(indices))

  def encode_to_indices(self, x):
    """x -> int32[B, L] code indices (the image's code set)."""
    return self.quantizer.assign(self.encode(x))

  def __call__(self, x, *, quantize: bool = True):
    """Reconstruct x -> (x_hat, quantizer aux dict, or None when not quantizing).

    `quantize` is a Python bool (static under jit). Before the delayed codebook
    initialisation (paper §3.7) the latents go to the decoder unquantized and the quantizer
    is skipped entirely: its assignment (under matching, a Hungarian solve) would be wasted.
    """
    z_e = self.encode(x)
    self.sow("intermediates", "z_e", z_e)  # feeds the k-means history (§3.7)
    if not quantize:
      return self.decode(z_e), None
    z_q, aux = self.quantize(z_e)
    return self.decode(z_q), aux

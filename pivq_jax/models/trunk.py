"""UT's convolutional trunk: the down-sampling encoder and up-sampling generator.

PI-VQ (paper §4 "Architecture") reuses the conv trunk of Unleashing Transformers (UT,
Bond-Taylor et al. 2022) unchanged; see `spec/ut-reference.md`. With nf=128,
ch_mult=(1, 1, 2, 2, 4), res_blocks=2, attention at 16 and D=256 these modules have exactly
UT's parameter counts (encoder 30,349,568, decoder 35,020,291; see tests/test_models.py).

Layout is NHWC (TPU/GPU-native) instead of UT's NCHW. Initialisation is Flax's default
(lecun normal), not PyTorch's: the spec marks it a choice.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _group_norm(groups: int):
  # UT: GroupNorm(32 groups, eps=1e-6, affine).
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6)


class ResBlock(nn.Module):
  """GN-swish-conv3-GN-swish-conv3; 1x1 skip only when the width changes.

  `ut_unused_skip`: UT's ResBlock always builds its 1x1 skip conv, even when the widths
  match and it is never applied. Those parameters change nothing the network computes, only
  the parameter count (and optimizer memory); the switch exists so the count can match UT.
  """
  out_ch: int
  dtype: jnp.dtype = jnp.float32
  ut_unused_skip: bool = False
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    h = nn.swish(_group_norm(self.norm_groups)(x))
    h = nn.Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype)(h)
    h = nn.swish(_group_norm(self.norm_groups)(h))
    h = nn.Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype)(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="conv_out")(x)
    elif self.ut_unused_skip:
      nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="conv_out")(x)  # result unused
    return x + h


class AttnBlock(nn.Module):
  """UT's single-head spatial self-attention with 1x1 q/k/v/proj and scale C^-1/2."""
  dtype: jnp.dtype = jnp.float32
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _group_norm(self.norm_groups)(x)
    q, k, v = (nn.Conv(c, (1, 1), dtype=self.dtype, name=n)(y) for n in "qkv")
    q, k, v = (t.reshape(b, h * w, c) for t in (q, k, v))
    attn = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum("bqk,bkc->bqc", attn, v).reshape(b, h, w, c)
    return x + nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(y)


class Downsample(nn.Module):
  """Pad right/bottom by one, then a stride-2 3x3 conv with no other padding (UT)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(x.shape[-1], (3, 3), strides=2, padding="VALID", dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(x.shape[-1], (3, 3), padding=1, dtype=self.dtype)(x)


class Encoder(nn.Module):
  """x: [B, H, W, 3] in [0, 1] -> [B, H/f, W/f, out_ch] with f = 2**(len(ch_mult)-1)."""
  nf: int
  ch_mult: Sequence[int]
  res_blocks: int
  attn_resolutions: Sequence[int]
  out_ch: int
  dtype: jnp.dtype = jnp.float32
  ut_unused_skip: bool = False
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    res = x.shape[1]
    x = nn.Conv(self.nf, (3, 3), padding=1, dtype=self.dtype)(x.astype(self.dtype))
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.res_blocks):
        x = ResBlock(self.nf * mult, self.dtype, self.ut_unused_skip, self.norm_groups)(x)
        if res in self.attn_resolutions:
          x = AttnBlock(self.dtype, self.norm_groups)(x)
      if level != len(self.ch_mult) - 1:
        x = Downsample(self.dtype)(x)
        res //= 2
    ch = x.shape[-1]
    x = ResBlock(ch, self.dtype, self.ut_unused_skip, self.norm_groups)(x)
    x = AttnBlock(self.dtype, self.norm_groups)(x)
    x = ResBlock(ch, self.dtype, self.ut_unused_skip, self.norm_groups)(x)
    x = _group_norm(self.norm_groups)(x)
    # UT applies no swish before this final conv.
    return nn.Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype)(x)


class Decoder(nn.Module):
  """[B, h, w, D] -> [B, h*f, w*f, 3], linear output (UT has no tanh; clamp only to save)."""
  nf: int
  ch_mult: Sequence[int]
  res_blocks: int
  attn_resolutions: Sequence[int]
  out_ch: int = 3
  dtype: jnp.dtype = jnp.float32
  ut_unused_skip: bool = False
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    res = x.shape[1]
    ch = self.nf * self.ch_mult[-1]
    x = nn.Conv(ch, (3, 3), padding=1, dtype=self.dtype)(x.astype(self.dtype))
    x = ResBlock(ch, self.dtype, self.ut_unused_skip, self.norm_groups)(x)
    x = AttnBlock(self.dtype, self.norm_groups)(x)
    x = ResBlock(ch, self.dtype, self.ut_unused_skip, self.norm_groups)(x)
    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.res_blocks):
        x = ResBlock(self.nf * self.ch_mult[level], self.dtype, self.ut_unused_skip,
                     self.norm_groups)(x)
        if res in self.attn_resolutions:
          x = AttnBlock(self.dtype, self.norm_groups)(x)
      if level != 0:
        x = Upsample(self.dtype)(x)
        res *= 2
    x = _group_norm(self.norm_groups)(x)
    # The adaptive GAN weight differentiates w.r.t. this conv's kernel (UT's "last layer"),
    # which needs only its input: see `adversarial.last_layer_grads`.
    self.sow("intermediates", "final_conv_input", x)
    x = nn.Conv(self.out_ch, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)
    return x.astype(jnp.float32)


def downsampling_factor(ch_mult: Sequence[int]) -> int:
  return 2 ** (len(ch_mult) - 1)

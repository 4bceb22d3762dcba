"""UT's convolutional trunk: the down-sampling encoder and up-sampling generator.

PI-VQ (paper §4 "Architecture") reuses the conv trunk of Unleashing Transformers (UT,
Bond-Taylor et al. 2022) unchanged; see `spec/ut-reference.md`. With nf=128,
ch_mult=(1, 1, 2, 2, 4), res_blocks=2, attention at 16 and D=256 these modules have exactly
UT's parameter counts (encoder 30,349,568, decoder 35,020,291; see tests/test_models.py).

Layout is NHWC (TPU/GPU-native) instead of UT's NCHW. Initialisation (`init_scheme`, a
choice the spec leaves open): "flax", Flax's default (lecun-normal kernels, zero biases),
or "torch", PyTorch's Conv2d default that UT's code gets (kernels and biases uniform in
+-1/sqrt(fan_in): kernels at 1/sqrt(3) of lecun-normal's std).
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


INITS = ("flax", "torch")


def _group_norm(groups: int):
  # UT: GroupNorm(32 groups, eps=1e-6, affine).
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6)


def _conv(in_ch: int, features: int, kernel: int, init: str, dtype, **kw) -> nn.Conv:
  """nn.Conv with the trunk's initialisation (module docstring)."""
  if init == "torch":
    bound = (kernel * kernel * in_ch) ** -0.5
    kw.update(kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
              bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                  key, shape, dtype, -bound, bound))
  elif init != "flax":
    raise ValueError(f"Unknown trunk init {init!r}; use one of {', '.join(INITS)}.")
  return nn.Conv(features, (kernel, kernel), dtype=dtype, **kw)


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
  init_scheme: str = "flax"

  @nn.compact
  def __call__(self, x):
    c, scheme = x.shape[-1], self.init_scheme
    h = nn.swish(_group_norm(self.norm_groups)(x))
    h = _conv(c, self.out_ch, 3, scheme, self.dtype, padding=1)(h)
    h = nn.swish(_group_norm(self.norm_groups)(h))
    h = _conv(self.out_ch, self.out_ch, 3, scheme, self.dtype, padding=1)(h)
    if c != self.out_ch:
      x = _conv(c, self.out_ch, 1, scheme, self.dtype, name="conv_out")(x)
    elif self.ut_unused_skip:
      _conv(c, self.out_ch, 1, scheme, self.dtype, name="conv_out")(x)  # result unused
    return x + h


class AttnBlock(nn.Module):
  """UT's single-head spatial self-attention with 1x1 q/k/v/proj and scale C^-1/2."""
  dtype: jnp.dtype = jnp.float32
  norm_groups: int = 32
  init_scheme: str = "flax"

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _group_norm(self.norm_groups)(x)
    q, k, v = (_conv(c, c, 1, self.init_scheme, self.dtype, name=n)(y) for n in "qkv")
    q, k, v = (t.reshape(b, h * w, c) for t in (q, k, v))
    attn = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum("bqk,bkc->bqc", attn, v).reshape(b, h, w, c)
    return x + _conv(c, c, 1, self.init_scheme, self.dtype, name="proj_out")(y)


class Downsample(nn.Module):
  """Pad right/bottom by one, then a stride-2 3x3 conv with no other padding (UT)."""
  dtype: jnp.dtype = jnp.float32
  init_scheme: str = "flax"

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    c = x.shape[-1]
    return _conv(c, c, 3, self.init_scheme, self.dtype, strides=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: jnp.dtype = jnp.float32
  init_scheme: str = "flax"

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    c = x.shape[-1]
    return _conv(c, c, 3, self.init_scheme, self.dtype, padding=1)(x)


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
  init_scheme: str = "flax"

  @nn.compact
  def __call__(self, x):
    res, scheme = x.shape[1], self.init_scheme
    block = functools.partial(ResBlock, dtype=self.dtype, ut_unused_skip=self.ut_unused_skip,
                              norm_groups=self.norm_groups, init_scheme=scheme)
    attn = functools.partial(AttnBlock, dtype=self.dtype, norm_groups=self.norm_groups,
                             init_scheme=scheme)
    x = _conv(x.shape[-1], self.nf, 3, scheme, self.dtype, padding=1)(x.astype(self.dtype))
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.res_blocks):
        x = block(self.nf * mult)(x)
        if res in self.attn_resolutions:
          x = attn()(x)
      if level != len(self.ch_mult) - 1:
        x = Downsample(self.dtype, scheme)(x)
        res //= 2
    ch = x.shape[-1]
    x = block(ch)(x)
    x = attn()(x)
    x = block(ch)(x)
    x = _group_norm(self.norm_groups)(x)
    # UT applies no swish before this final conv.
    return _conv(ch, self.out_ch, 3, scheme, self.dtype, padding=1)(x)


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
  init_scheme: str = "flax"

  @nn.compact
  def __call__(self, x):
    res, scheme = x.shape[1], self.init_scheme
    block = functools.partial(ResBlock, dtype=self.dtype, ut_unused_skip=self.ut_unused_skip,
                              norm_groups=self.norm_groups, init_scheme=scheme)
    attn = functools.partial(AttnBlock, dtype=self.dtype, norm_groups=self.norm_groups,
                             init_scheme=scheme)
    ch = self.nf * self.ch_mult[-1]
    x = _conv(x.shape[-1], ch, 3, scheme, self.dtype, padding=1)(x.astype(self.dtype))
    x = block(ch)(x)
    x = attn()(x)
    x = block(ch)(x)
    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.res_blocks):
        x = block(self.nf * self.ch_mult[level])(x)
        if res in self.attn_resolutions:
          x = attn()(x)
      if level != 0:
        x = Upsample(self.dtype, scheme)(x)
        res *= 2
    x = _group_norm(self.norm_groups)(x)
    # The adaptive GAN weight differentiates w.r.t. this conv's kernel (UT's "last layer"),
    # which needs only its input: see `adversarial.last_layer_grads`.
    self.sow("intermediates", "final_conv_input", x)
    x = _conv(x.shape[-1], self.out_ch, 3, scheme, self.dtype, padding=1, name="conv_out")(x)
    return x.astype(jnp.float32)


def downsampling_factor(ch_mult: Sequence[int]) -> int:
  return 2 ** (len(ch_mult) - 1)

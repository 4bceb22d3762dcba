"""UT's PatchGAN discriminator (pix2pix / taming "NLayerDiscriminator"; ut-reference.md).

  conv4 s2 3->ndf, LeakyReLU(0.2)
  (n_layers - 1) x [conv4 s2 -> ndf*min(2^n, 8), no bias, BatchNorm, LeakyReLU(0.2)]
  conv4 s1 -> ndf*min(2^n_layers, 8), no bias, BatchNorm, LeakyReLU(0.2)
  conv4 s1 -> 1 logit per patch
All convs pad by 1. At 64px with n_layers=3 the logit map is 6x6; at 256px it is 30x30.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# pix2pix/taming initialise D with N(0, 0.02) convs and N(1, 0.02) BatchNorm scales.
_conv_init = nn.initializers.normal(0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * nn.initializers.normal(1.0)(key, shape, dtype)


class PatchDiscriminator(nn.Module):
  """images float[B, R, R, 3] in [0, 1] -> patch logits float32[B, h, w, 1].

  BatchNorm always normalises with the statistics of the batch it is given (UT calls D in
  training mode for every forward, including G's); the running averages it keeps in the
  "batch_stats" collection are updated on each call but never read, as in UT.

  Attributes:
    ndf: width of the first layer.
    n_layers: number of stride-2 layers.
    dtype: compute dtype; parameters stay float32.
  """
  ndf: int = 64
  n_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda ch, stride, bias: nn.Conv(
        ch, (4, 4), strides=stride, padding=1, use_bias=bias, dtype=self.dtype,
        kernel_init=_conv_init)
    # PyTorch's BatchNorm momentum 0.1 is flax's 0.9; eps 1e-5 as in PyTorch.
    norm = lambda: nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                                dtype=self.dtype, scale_init=_bn_scale_init)
    x = nn.leaky_relu(conv(self.ndf, 2, True)(x.astype(self.dtype)), 0.2)
    for n in range(1, self.n_layers):
      x = conv(self.ndf * min(2 ** n, 8), 2, False)(x)
      x = nn.leaky_relu(norm()(x), 0.2)
    x = conv(self.ndf * min(2 ** self.n_layers, 8), 1, False)(x)
    x = nn.leaky_relu(norm()(x), 0.2)
    return conv(1, 1, True)(x).astype(jnp.float32)

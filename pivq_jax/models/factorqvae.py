"""FactorQVAE and the baselines it is compared with (Baykal et al.; spec/factorqvae.md).

  x --Encoder (conv trunk + dense head)--> h --posterior--> z [B, d] --Decoder--> x_hat

One module, one architecture (paper §5.1, App. A.3); `variant` picks the posterior:
  variant       posterior   head output h       decoder input z            TC term
  "factorqvae"  quantized   z_e [B, d]          Σ_k w_ik c_k, global c     yes
  "qvae"        quantized   z_e [B, d]          Σ_k w_ik c_k, global c     no
  "factordvae"  logits      logits [B, d, K]    Σ_k w_ik c_k, global c     yes
  "dvae"        logits      logits [B, d, K]    Σ_k w_ik c_k, global c     no
  "factorvae"   gaussian    (mu, logvar) [B,2d] mu + sigma * eps           yes
  "betavae"     gaussian    (mu, logvar) [B,2d] mu + sigma * eps           no
  "qlae"        qlae        z_e [B, d]          nearest of d own codebooks no (Hsu et al.)
"quantized" is the paper's stochastic scalar quantizer (§4, Eqs. 3-4): logits −R_ik with
R_ik = (z_i − c_k)² against one global codebook of K scalars, a Gumbel-softmax sample w
(soft, hard=False) during training and the hard argmin at evaluation. The TC term itself
(discriminator and losses) lives in `tc_discriminator.py` and `losses/factorqvae.py`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  posterior: str  # "quantized" | "logits" | "gaussian" | "qlae"
  total_correlation: bool  # trained with the FactorVAE discriminator (two optimizers)


VARIANTS = {
    "factorqvae": VariantSpec("quantized", True),
    "qvae": VariantSpec("quantized", False),
    "factordvae": VariantSpec("logits", True),
    "dvae": VariantSpec("logits", False),
    "factorvae": VariantSpec("gaussian", True),
    "betavae": VariantSpec("gaussian", False),
    "qlae": VariantSpec("qlae", False),
}


def variant_spec(variant: str) -> VariantSpec:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown FactorQVAE variant {variant!r}; use one of {tuple(VARIANTS)}.")
  return VARIANTS[variant]


# The reference initialises every conv / linear with N(0, 0.02) and zero bias (spec "Init").
_kernel_init = nn.initializers.normal(0.02)
_bias_init = nn.initializers.zeros


def gumbel_softmax(key, logits, tau, *, hard: bool = False):
  """Relaxed one-hot sample softmax((logits + g) / tau), g ~ Gumbel(0, 1) (paper §4, [32, 33]).

  logits: float[..., K]; tau: scalar (may be traced). With `hard`, the forward value is the
  one-hot argmax and gradients are the soft sample's (straight-through). float32 out.
  """
  logits = logits.astype(jnp.float32)
  g = jax.random.gumbel(key, logits.shape, jnp.float32)
  soft = jax.nn.softmax((logits + g) / tau, axis=-1)
  if not hard:
    return soft
  one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return soft + jax.lax.stop_gradient(one_hot - soft)


def scalar_distances(z, codebook, *, kind: str = "squared"):
  """z: [B, d], codebook: [K] -> R: float32[B, d, K] (paper Eq. 3).

  "squared" (z_i − c_k)² is the reference code's and the spec's; "absolute" |z_i − c_k| is
  how Eq. 3 is printed. Both give the same argmin; they differ in the Gumbel logits −R.
  """
  diff = z.astype(jnp.float32)[..., None] - codebook.astype(jnp.float32)
  if kind == "squared":
    return jnp.square(diff)
  if kind == "absolute":
    return jnp.abs(diff)
  raise ValueError(f"Unknown distance {kind!r}; use 'squared' or 'absolute'.")


def categorical_posterior(logits, codebook, key=None, *, tau=1.0, train: bool = True,
                          hard: bool = False):
  """A categorical posterior over a global scalar codebook -> (z float32[B, d], aux).

  logits: [B, d, K] (-R for FactorQVAE, Eq. 4; the encoder's own for dVAE); codebook: [K].
  Training draws Gumbel-softmax weights w at temperature tau (`gumbel_softmax`); evaluation
  takes the one-hot argmax. Either way z_i = sum_k w_ik c_k (z_q = z * M, paper §4), so the
  codebook and, through the soft w, the logits get gradients from every downstream loss.
  aux: "logits", "weights" [B, d, K], "codes" int32[B, d] (argmax logits, noise-free),
  "tc_latents" (= weights, what the TC discriminator sees).
  """
  codes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if train:
    weights = gumbel_softmax(key, logits, tau, hard=hard)
  else:
    weights = jax.nn.one_hot(codes, logits.shape[-1], dtype=jnp.float32)
  z = weights @ codebook.astype(jnp.float32)
  aux = {"logits": logits.astype(jnp.float32), "weights": weights, "codes": codes,
         "tc_latents": weights}
  return z, aux


class _ResidualBlock(nn.Module):
  """id + gain * res, res = four ReLU-conv layers (widths out/4, out/4, out/4, out) with
  `kernels` sizes; id is a 1x1 conv only when the width changes."""
  out_ch: int
  gain: float
  kernels: tuple[int, int, int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda ch, k, name: nn.Conv(ch, (k, k), padding=k // 2, dtype=self.dtype,
                                       kernel_init=_kernel_init, bias_init=_bias_init,
                                       name=name)
    h = x
    for j, k in enumerate(self.kernels):
      h = conv(self.out_ch if j == 3 else self.out_ch // 4, k, f"conv_{j + 1}")(nn.relu(h))
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, 1, "id_path")(x)
    return x + self.gain * h


class EncoderBlock(_ResidualBlock):
  """dVAE (DALL-E) encoder block (spec "Model"; App. Table A.4): 3x3, 3x3, 3x3, 1x1."""
  kernels: tuple[int, int, int, int] = (3, 3, 3, 1)


class DecoderBlock(_ResidualBlock):
  """Decoder block: 1x1, 3x3, 3x3, 3x3."""
  kernels: tuple[int, int, int, int] = (1, 3, 3, 3)


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, kernel_init=_kernel_init, bias_init=_bias_init,
                  name=name)


class Encoder(nn.Module):
  """x float[B, R, R, 3] -> float32[B, out_dim] (App. A.3 "Encoding", n = m = 128).

  conv3x3 3->C; groups g = 0..G-1 of `blocks_per_group` blocks at width C * 2**g, 2x2
  max-pool after every group but the last; flatten (16x16x512 at 64px);
  ReLU-Linear(hidden)-ReLU-Linear(hidden)-ReLU-Linear(out_dim).
  """
  out_dim: int
  channels: int = 128
  num_groups: int = 3
  blocks_per_group: int = 2
  hidden_dim: int = 128
  gain: float = 1 / 36
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, kernel_init=_kernel_init,
                bias_init=_bias_init, name="conv_in")(x.astype(self.dtype))
    for g in range(self.num_groups):
      for i in range(self.blocks_per_group):
        x = EncoderBlock(self.channels * 2 ** g, self.gain, dtype=self.dtype,
                         name=f"group_{g}_block_{i}")(x)
      if g != self.num_groups - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = _dense(self.hidden_dim, self.dtype, "dense_1")(nn.relu(x))
    x = _dense(self.hidden_dim, self.dtype, "dense_2")(nn.relu(x))
    return _dense(self.out_dim, self.dtype, "proj")(nn.relu(x)).astype(jnp.float32)


class Decoder(nn.Module):
  """z float[B, d] -> x_hat float32[B, R, R, 3] (App. A.3 "Decoding"; no output activation).

  Linear(d -> g*g*input_channels) reshaped to [g, g, input_channels] with g = R / 2**(G-1);
  groups at widths C * 2**(G-1-j) (512, 256, 128), nearest x2 up-sampling after all but the
  last; ReLU; 1x1 conv -> 3.
  """
  resolution: int
  channels: int = 128
  num_groups: int = 3
  blocks_per_group: int = 2
  input_channels: int = 64
  gain: float = 1 / 36
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    grid = self.resolution // 2 ** (self.num_groups - 1)
    x = _dense(grid * grid * self.input_channels, self.dtype, "dense")(z.astype(self.dtype))
    x = x.reshape(z.shape[0], grid, grid, self.input_channels)
    for j in range(self.num_groups):
      for i in range(self.blocks_per_group):
        x = DecoderBlock(self.channels * 2 ** (self.num_groups - 1 - j), self.gain,
                         dtype=self.dtype, name=f"group_{j}_block_{i}")(x)
      if j != self.num_groups - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
    x = nn.Conv(3, (1, 1), dtype=self.dtype, kernel_init=_kernel_init, bias_init=_bias_init,
                name="conv_out")(nn.relu(x))
    return x.astype(jnp.float32)


class FactorQVAE(nn.Module):
  """`apply(vars, x, key, tau=...) -> (x_hat, aux)`; other methods for `apply(method=...)`:
  encode, sample_latents, decode, encode_codes, decode_codes, codebook_values.

  Attributes:
    latent_dim: d, scalar latents per image (paper: 2 x number of factors).
    num_values: K, size of the global codebook (paper 64); for "qlae" the values *per
      latent* (spec 10).
    variant: see `VARIANTS` and the module docstring.
    resolution: square input size, divisible by 2**(num_groups-1).
    channels, num_groups, blocks_per_group: conv trunk (paper n = 128, 3 groups of 2).
    hidden_dim: width of the dense head (paper m = 128).
    decoder_input_channels: channels of the decoder's first feature map (reference 64).
    residual_gain: res-path gain; None -> 1 / (num_groups * blocks_per_group)**2 (= 1/36),
      the DALL-E block's post-gain the reference keeps.
    distance: "squared" (reference, spec) or "absolute" (paper Eq. 3 as printed).
    straight_through: hard Gumbel-softmax (one-hot forward, soft gradient); the reference
      and spec use the soft sample (False).
    qlae_codebook_init: "linspace" (Hsu et al.: linspace(-0.5, 0.5)) or "normal" (N(0, 1),
      FactorQVAE's PyTorch QLAE).
    image_offset: subtracted from the [0, 1] input before the encoder and added back to the
      decoder's output, so the network works in [-0.5, 0.5] as the reference does (0.5)
      while x_hat, the MSE and PSNR stay in [0, 1]. With 0 and the N(0, 0.02) init the
      decoder starts 0.5 below every pixel and, on faces, stalls at the mean image.
    dtype: compute dtype; parameters, quantizer and outputs stay float32.
  """
  latent_dim: int
  num_values: int = 64
  variant: str = "factorqvae"
  resolution: int = 64
  channels: int = 128
  num_groups: int = 3
  blocks_per_group: int = 2
  hidden_dim: int = 128
  decoder_input_channels: int = 64
  residual_gain: float | None = None
  distance: str = "squared"
  straight_through: bool = False
  qlae_codebook_init: str = "linspace"
  image_offset: float = 0.5
  dtype: Any = jnp.float32

  @property
  def posterior(self) -> str:
    return variant_spec(self.variant).posterior

  def setup(self):
    d, k = self.latent_dim, self.num_values
    out_dim = {"quantized": d, "qlae": d, "logits": d * k, "gaussian": 2 * d}[self.posterior]
    gain = self.residual_gain
    if gain is None:
      gain = 1.0 / (self.num_groups * self.blocks_per_group) ** 2
    trunk = dict(channels=self.channels, num_groups=self.num_groups,
                 blocks_per_group=self.blocks_per_group, gain=gain, dtype=self.dtype)
    self.encoder = Encoder(out_dim=out_dim, hidden_dim=self.hidden_dim, **trunk)
    self.decoder = Decoder(resolution=self.resolution,
                           input_channels=self.decoder_input_channels, **trunk)
    if self.posterior in ("quantized", "logits"):
      # One global codebook of K scalars, N(0, 1) like torch's nn.Embedding (spec "Init").
      self.codebook = self.param("codebook", nn.initializers.normal(1.0), (k,))
    elif self.posterior == "qlae":
      if self.qlae_codebook_init == "linspace":
        init = lambda key, shape: jnp.broadcast_to(jnp.linspace(-0.5, 0.5, shape[1]), shape)
      elif self.qlae_codebook_init == "normal":
        init = nn.initializers.normal(1.0)
      else:
        raise ValueError(f"Unknown qlae_codebook_init {self.qlae_codebook_init!r}.")
      self.codebook = self.param("codebook", init, (d, k))  # one codebook per latent

  def encode(self, x):
    """x float[B, R, R, 3] -> the head output h, float32: [B, d] for quantized / qlae,
    logits [B, d, K] for logits, [B, 2d] (mu, then logvar) for gaussian."""
    h = self.encoder(x.astype(jnp.float32) - self.image_offset)
    if self.posterior == "logits":
      h = h.reshape(h.shape[0], self.latent_dim, self.num_values)
    return h

  def _logits(self, h):
    if self.posterior == "logits":
      return h
    return -scalar_distances(h, self.codebook, kind=self.distance)  # Eq. 4: Cat(-R)

  def sample_latents(self, x, key=None, *, tau=1.0, train: bool = True):
    """Encoder + posterior, no decoder: -> (z float32[B, d] for the decoder, aux dict).

    aux (float32 unless noted):
      "codes": int32[B, d] noise-free hard codes (argmin distance / argmax logits) of the
        discrete posteriors, or the means (gaussian): what DCI / InfoMEC read.
      "tc_latents": the sample the TC discriminator sees: the Gumbel weights [B, d, K]
        (quantized / logits; one-hot at evaluation) or z [B, d] (gaussian).
      quantized / logits: "logits" [B, d, K] (the posterior's, no temperature; the KL
        reads them), "weights" [B, d, K]; quantized / qlae also "z_e" [B, d].
      gaussian: "mean", "logvar" [B, d].
      qlae: "z_q" [B, d] (nearest values, no straight-through; for its two losses).
    `key` is needed when `train` (Gumbel / Gaussian noise); `tau` is the Gumbel temperature
    (a traced scalar is fine). At evaluation (`train=False`) discrete posteriors take the
    hard argmin and gaussian ones decode the mean.
    """
    h = self.encode(x)
    post = self.posterior
    if train and key is None and post != "qlae":
      raise ValueError("sample_latents(train=True) needs a PRNG key.")
    if post == "gaussian":
      mean, logvar = jnp.split(h, 2, axis=-1)
      z = mean
      if train:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
      return z, {"mean": mean, "logvar": logvar, "codes": mean, "tc_latents": z}
    if post == "qlae":
      # Hsu et al.: nearest value of each latent's own codebook, straight-through.
      values = self.codebook.astype(jnp.float32)
      codes = jnp.argmin(jnp.abs(h[..., None] - values), axis=-1).astype(jnp.int32)
      z_q = jnp.take_along_axis(values[None], codes[..., None], axis=-1)[..., 0]
      z = h + jax.lax.stop_gradient(z_q - h)
      return z, {"z_e": h, "z_q": z_q, "codes": codes}
    z, aux = categorical_posterior(self._logits(h), self.codebook, key, tau=tau, train=train,
                                   hard=self.straight_through)
    if post == "quantized":
      aux["z_e"] = h
    return z, aux

  def decode(self, z):
    """z float[B, d] -> x_hat float32[B, R, R, 3], in the input's [0, 1] range."""
    return self.decoder(z) + self.image_offset

  def codebook_values(self, codes):
    """codes int[B, d] -> the scalars they select, float32[B, d] (discrete posteriors)."""
    if self.posterior == "gaussian":
      raise ValueError("Gaussian variants have no codebook.")
    values = self.codebook.astype(jnp.float32)
    if self.posterior == "qlae":
      return jnp.take_along_axis(values[None], codes[..., None], axis=-1)[..., 0]
    return jnp.take(values, codes, axis=0)

  def decode_codes(self, codes):
    """codes int[B, d] -> x_hat (latent traversals / swaps, paper §5.2)."""
    return self.decode(self.codebook_values(codes))

  def traverse(self, x, num_steps: int = 8):
    """Latent traversal (paper Figs. 2-4): x float[N, R, R, 3] (the first image is used) ->
    float32[d, num_steps, R, R, 3], row i decoding the image's latents with z_i swept
    linearly over the global codebook's min..max (quantized / logits), over its own
    codebook's (qlae), or over mean ± 3 (gaussian), the others held at their eval values.
    """
    _, aux = self.sample_latents(x[:1], train=False)
    d = self.latent_dim
    if self.posterior == "gaussian":
      z = aux["mean"][0]
      lo, hi = z - 3.0, z + 3.0
    else:
      z = self.codebook_values(aux["codes"])[0]
      values = self.codebook.astype(jnp.float32)
      axis = -1 if self.posterior == "qlae" else None
      lo = jnp.broadcast_to(values.min(axis=axis), (d,))
      hi = jnp.broadcast_to(values.max(axis=axis), (d,))
    sweep = lo[:, None] + (hi - lo)[:, None] * jnp.linspace(0.0, 1.0, num_steps)  # [d, S]
    # Row i, column t: z with entry i replaced by sweep[i, t].
    grid = jnp.where(jnp.eye(d, dtype=bool)[:, None, :], sweep[:, :, None], z)
    images = self.decode(grid.reshape(d * num_steps, d))
    return images.reshape(d, num_steps, *images.shape[1:])

  def encode_codes(self, x, *, as_values: bool = False):
    """x -> the d per-image codes read by DCI / InfoMEC, [B, d].

    Discrete posteriors: int32 hard code indices (the reference feeds these raw ordinal
    indices to DCI), or, with `as_values`, the selected codebook scalars (float32).
    Gaussian posteriors: the posterior means (float32).
    """
    _, aux = self.sample_latents(x, train=False)
    if as_values and self.posterior != "gaussian":
      return self.codebook_values(aux["codes"])
    return aux["codes"]

  def __call__(self, x, key=None, *, tau=1.0, train: bool = True):
    """x float[B, R, R, 3] -> (x_hat float32[B, R, R, 3], aux of `sample_latents`)."""
    z, aux = self.sample_latents(x, key, tau=tau, train=train)
    return self.decode(z), aux

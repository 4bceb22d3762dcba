"""Procedurally rendered, aligned cartoon faces with known discrete factors.

This is the embedded default dataset described in ``shared/spec/faces-dataset.md``. It
exists because aligned faces carry many discrete attributes at fixed positions (the
premise of PI-VQ), yet no real face dataset can be downloaded on a fresh machine. Here
every attribute is a ground-truth factor, so learnt codes can be scored with DCI, InfoMEC
or probing exactly as on Shapes3D.

Each item ``i`` is a pure function of ``i``: a mixed-radix decode of the global index into
one value per factor (first factor most significant, as in Shapes3D), then a vectorised
numpy render of soft-edged signed-distance shapes. There are no files and no randomness;
only IEEE-exact float32 ops (``+ - * /``, ``sqrt``, ``clip``, ``floor``) are used, so the
bytes are identical on every machine.

Factors (``FACTOR_NAMES`` / ``FACTOR_SIZES``, 248,832 combinations):

=================  ====  ==========================================================
factor             size  values
=================  ====  ==========================================================
skin_tone          6     light to dark
hair_colour        6     black, brown, ginger, blonde, grey, blue
hair_style         4     bald, short, long, fringe
eye_colour         4     brown, blue, green, amber
mouth              3     neutral, smile, open
glasses            2     none, frames
face_width         3     narrow, medium, wide
background_hue     8     hues 45 degrees apart
lighting           3     from the left, frontal, from the right
=================  ====  ==========================================================

Global factors (skin, lighting, background, face width) and local ones (eyes, mouth,
glasses) are both present. Faces are centred and aligned: eyes, brows and mouth sit at
the same place in every image, as in aligned CelebA/FFHQ. Hair colour is only visible in
the brows when the style is bald.

Geometry lives on a pixel-centre grid normalised to [-1, 1] and edges are anti-aliased by
a one-pixel coverage ramp, so 32, 64, 128 and 256 pixel renders show the same face.
``FacesSource`` exposes a deterministic ~90/10 train/test split by a hash of the index.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from grain.sources import RandomAccessDataSource as _GrainSource

FACTOR_NAMES: tuple[str, ...] = (
    "skin_tone",
    "hair_colour",
    "hair_style",
    "eye_colour",
    "mouth",
    "glasses",
    "face_width",
    "background_hue",
    "lighting",
)
FACTOR_SIZES: tuple[int, ...] = (6, 6, 4, 4, 3, 2, 3, 8, 3)
NUM_COMBINATIONS: int = int(np.prod(FACTOR_SIZES))
RESOLUTIONS: tuple[int, ...] = (32, 64, 128, 256)
SPLITS: tuple[str, ...] = ("train", "test", "all")
TEST_FRACTION_DENOMINATOR = 10  # an index is held out when its hash is 0 mod 10

# Place values of the mixed radix: index = sum(factor[k] * _STRIDES[k]).
_STRIDES = tuple(int(np.prod(FACTOR_SIZES[k + 1 :])) for k in range(len(FACTOR_SIZES)))

# Named positions of the factors, for readability inside the renderer.
_SKIN, _HAIR_COL, _STYLE, _EYE, _MOUTH, _GLASSES, _WIDTH, _BG, _LIGHT = range(9)
_BALD, _SHORT, _LONG, _FRINGE = range(4)
_NEUTRAL, _SMILE, _OPEN = range(3)

# ---------------------------------------------------------------------------------------
# Palettes (RGB in 0..255).

_SKIN_TONES = np.array(
    [
        [255, 226, 200],
        [238, 196, 160],
        [218, 164, 120],
        [184, 126, 84],
        [138, 88, 56],
        [92, 60, 40],
    ],
    np.float32,
)
_HAIR_COLOURS = np.array(
    [
        [30, 26, 28],  # black
        [104, 62, 30],  # brown
        [196, 84, 30],  # ginger
        [240, 206, 110],  # blonde
        [196, 196, 204],  # grey
        [46, 96, 210],  # blue (dyed); keeps the six colours well apart
    ],
    np.float32,
)
_EYE_COLOURS = np.array(
    [
        [96, 52, 20],  # brown
        [40, 120, 235],  # blue
        [40, 160, 60],  # green
        [215, 150, 20],  # amber
    ],
    np.float32,
)


def _hsv_to_rgb(hue_deg: float, sat: float, val: float) -> list[float]:
  # Piecewise-linear HSV in plain float arithmetic: exact, no libm calls.
  h = (hue_deg % 360.0) / 60.0
  i = int(h)
  f = h - i
  p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
  rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
  return [255.0 * c for c in rgb]


_BACKGROUNDS = np.array(
    [_hsv_to_rgb(45.0 * k, 0.5, 0.88) for k in range(FACTOR_SIZES[_BG])], np.float32
)

_WHITE = np.array([246, 246, 242], np.float32)
_PUPIL = np.array([16, 14, 18], np.float32)
_SHIRT = np.array([62, 72, 92], np.float32)
_FRAME = np.array([26, 24, 32], np.float32)
_LENS = np.array([225, 240, 255], np.float32)
_LIP_RED = np.array([176, 52, 64], np.float32)
_MOUTH_LINE = np.array([52, 14, 22], np.float32)  # dark enough to read on every skin tone
_MOUTH_INSIDE = np.array([60, 12, 22], np.float32)
_BLUSH = np.array([255, 96, 96], np.float32)
_LASH = np.array([36, 26, 26], np.float32)

# ---------------------------------------------------------------------------------------
# Face layout in normalised coordinates (x right, y down, both in [-1, 1]). Everything
# that is not a factor is fixed, so eyes and mouth land on the same pixels for all faces.

_FACE_WIDTHS = (0.39, 0.465, 0.54)  # half-width of the head ellipse per face_width value
_HEAD_CY, _HEAD_RY = 0.0, 0.62
_EYE_X, _EYE_Y = 0.19, -0.05
_BROW_Y = -0.205
_MOUTH_Y = 0.33
_GLASS_R = 0.145


# ---------------------------------------------------------------------------------------
# Index helpers.


def _check_index(index: Any) -> int:
  if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
    raise TypeError(f"Index must be an integer, got {type(index).__name__}.")
  index = int(index)
  if not 0 <= index < NUM_COMBINATIONS:
    raise ValueError(
        f"Index {index} is out of range; use a value in [0, {NUM_COMBINATIONS})."
    )
  return index


def decode_index(index: int) -> np.ndarray:
  """Returns the factor values of a global index as int32[F] (mixed radix)."""
  rest = _check_index(index)
  out = np.empty(len(FACTOR_SIZES), np.int32)
  for k, stride in enumerate(_STRIDES):
    out[k], rest = divmod(rest, stride)
  return out


def _check_factors(factors: Any) -> tuple[int, ...]:
  values = np.asarray(factors)
  if values.shape != (len(FACTOR_SIZES),) or not np.issubdtype(values.dtype, np.integer):
    raise ValueError(
        f"Factors must be {len(FACTOR_SIZES)} integers ordered as FACTOR_NAMES, "
        f"got an array of shape {values.shape} and dtype {values.dtype}."
    )
  out = tuple(int(v) for v in values)
  for name, size, v in zip(FACTOR_NAMES, FACTOR_SIZES, out):
    if not 0 <= v < size:
      raise ValueError(f"Factor {name} is {v}; use a value in [0, {size}).")
  return out


def encode_factors(factors: Sequence[int] | np.ndarray) -> int:
  """Returns the global index of a factor vector; the inverse of ``decode_index``."""
  return sum(v * s for v, s in zip(_check_factors(factors), _STRIDES))


def _splitmix64(values: np.ndarray) -> np.ndarray:
  # Fixed 64-bit integer mixer (splitmix64 finaliser); uint64 arithmetic wraps modulo
  # 2**64 identically everywhere, unlike Python's salted hash().
  z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _test_mask(indices: np.ndarray) -> np.ndarray:
  return _splitmix64(indices) % np.uint64(TEST_FRACTION_DENOMINATOR) == 0


def is_test_index(index: int) -> bool:
  """Whether a global index belongs to the ~10% held-out test split."""
  return bool(_test_mask(np.array([_check_index(index)], np.uint64))[0])


def split_indices(split: str) -> np.ndarray:
  """Sorted int64 global indices of a split ("train", "test" or "all")."""
  _check_split(split)
  every = np.arange(NUM_COMBINATIONS, dtype=np.int64)
  if split == "all":
    return every
  mask = _test_mask(every)
  return every[mask] if split == "test" else every[~mask]


def _check_split(split: Any) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")


def _check_resolution(resolution: Any) -> int:
  is_int = isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool)
  if not is_int or resolution not in RESOLUTIONS:
    raise ValueError(
        f"Resolution {resolution!r} is not supported; use one of "
        f"{', '.join(map(str, RESOLUTIONS))}."
    )
  return int(resolution)


# ---------------------------------------------------------------------------------------
# Signed distances (negative inside). x has shape (1, R) and y (R, 1) so that separable
# terms stay one-dimensional until they meet.


@functools.lru_cache(maxsize=None)
def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
  # Pixel centres (2j + 1) / R - 1: exact in float32 for power-of-two R.
  c = ((np.arange(res, dtype=np.float32) * 2 + 1) / np.float32(res) - 1).astype(np.float32)
  return c[None, :], c[:, None]


def _f(v: float) -> np.float32:
  return np.float32(v)


def _sd_circle(x, y, cx, cy, r):
  dx, dy = x - _f(cx), y - _f(cy)
  return np.sqrt(dx * dx + dy * dy) - _f(r)


def _sd_ellipse(x, y, cx, cy, rx, ry):
  # First-order distance to an ellipse, (k0 - 1) * k0 / k1; accurate near the edge,
  # which is all the anti-aliasing needs. rx may be an array (tapered shapes).
  px, py = (x - _f(cx)) / rx, (y - _f(cy)) / _f(ry)
  k0 = np.sqrt(px * px + py * py)
  qx, qy = px / rx, py / _f(ry)
  k1 = np.sqrt(qx * qx + qy * qy)
  r_lo, r_hi = float(np.min(np.minimum(rx, ry))), float(np.max(np.maximum(rx, ry)))
  # k0 / k1 is the local radius; clipping it also fixes the 0/0 at the centre.
  scale = np.clip(k0 / np.maximum(k1, _f(1e-12)), _f(r_lo), _f(r_hi))
  return (k0 - 1) * scale


def _sd_hcapsule(x, y, cx, cy, half_len, r):
  # Horizontal segment of half-length half_len thickened by r.
  dx = np.maximum(np.abs(x - _f(cx)) - _f(half_len), 0)
  dy = y - _f(cy)
  return np.sqrt(dx * dx + dy * dy) - _f(r)


def _sd_box(x, y, cx, cy, hx, hy, round_r):
  qx = np.abs(x - _f(cx)) - _f(hx - round_r)
  qy = np.abs(y - _f(cy)) - _f(hy - round_r)
  ox, oy = np.maximum(qx, 0), np.maximum(qy, 0)
  return np.sqrt(ox * ox + oy * oy) + np.minimum(np.maximum(qx, qy), 0) - _f(round_r)


def _sd_arc(x, y, cx, cy, r, half_chord, thickness, downward=True):
  # A circular arc symmetric about the vertical through (cx, cy), bulging down
  # (a smile) or up (a brow), ending where |x - cx| = half_chord.
  qx = np.abs(x - _f(cx))
  qy = (y - _f(cy)) if downward else (_f(cy) - y)
  ex, ey = _f(half_chord), _f(math.sqrt(r * r - half_chord * half_chord))
  ring = np.abs(np.sqrt(qx * qx + qy * qy) - _f(r))
  ux, uy = qx - ex, qy - ey
  cap = np.sqrt(ux * ux + uy * uy)
  return np.where(qx * ey <= qy * ex, ring, cap) - _f(thickness)


def _union(*ds):
  return functools.reduce(np.minimum, ds)


def _intersect(*ds):
  return functools.reduce(np.maximum, ds)


# ---------------------------------------------------------------------------------------
# Coverage layers. A layer is (rows, cols, alpha[h, w, 1]) cropped to where alpha > 0, so
# compositing small features (eyes, mouth) touches only their bounding box.

_Layer = tuple[slice, slice, np.ndarray]


def _layer(d: np.ndarray, res: int, soft: float = 0.0) -> _Layer:
  d = np.broadcast_to(d, (res, res))
  # One-pixel ramp (pixel size is 2 / res) gives box-filter-like anti-aliasing; `soft`
  # widens it in normalised units for resolution-independent blurry shapes (blush).
  width = max(2.0 / res, soft)
  alpha = np.clip(_f(0.5) - d / _f(width), 0, 1).astype(np.float32)
  rows, cols = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
  if rows.size == 0:
    rows = cols = np.array([0])
  rs, cs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
  crop = np.ascontiguousarray(alpha[rs, cs, None])
  crop.setflags(write=False)
  return rs, cs, crop


def _face_taper(y, width: float):
  # Narrow the head towards the chin so it reads as a face rather than an egg on end.
  t = np.clip((y - _f(_HEAD_CY)) / _f(_HEAD_RY), 0, 1)
  return _f(width) * (1 - _f(0.2) * t * t)


@functools.lru_cache(maxsize=None)
def _fixed_layers(res: int) -> dict[str, _Layer]:
  """Layers whose shape no factor changes."""
  x, y = _grid(res)
  ex = np.abs(x)  # eyes, brows and cheeks are mirror images about x = 0
  sclera = _sd_ellipse(ex, y, _EYE_X, _EYE_Y, 0.115, 0.08)
  iris = _intersect(_sd_circle(ex, y, _EYE_X, _EYE_Y, 0.072), sclera)
  lid = _intersect(np.abs(sclera) - _f(0.014), y - _f(_EYE_Y - 0.015))
  lens = _sd_circle(ex, y, _EYE_X, _EYE_Y, _GLASS_R)
  layers = {
      "shirt": _sd_ellipse(x, y, 0.0, 1.32, 0.82, 0.54),
      "neck": _sd_box(x, y, 0.0, 0.75, 0.16, 0.4, 0.02),
      "blush": _sd_ellipse(ex, y, 0.28, 0.16, 0.075, 0.045),
      "nose": _sd_ellipse(x, y, 0.0, 0.15, 0.04, 0.028),
      "sclera": sclera,
      "iris": iris,
      "pupil": _sd_circle(ex, y, _EYE_X, _EYE_Y, 0.026),
      "lid": lid,
      "brows": _sd_arc(ex, y, _EYE_X, _BROW_Y + 0.2, 0.2, 0.1, 0.026, downward=False),
      "lens": lens,
      "rims": _union(
          np.abs(lens) - _f(0.018), _sd_hcapsule(x, y, 0.0, _EYE_Y - 0.02, 0.06, 0.016)
      ),
      # Glints sit up and to the right of each pupil, so they are not mirrored.
      "glint": _union(
          _sd_circle(x, y, -_EYE_X + 0.024, _EYE_Y - 0.024, 0.016),
          _sd_circle(x, y, _EYE_X + 0.024, _EYE_Y - 0.024, 0.016),
      ),
      # Mouths: a straight line, an upturned arc, and an open oval with teeth.
      "mouth_neutral": _sd_hcapsule(x, y, 0.0, _MOUTH_Y, 0.11, 0.024),
      "mouth_smile": _sd_arc(x, y, 0.0, _MOUTH_Y - 0.15, 0.18, 0.15, 0.026),
      "mouth_lips": _sd_ellipse(x, y, 0.0, _MOUTH_Y, 0.125, 0.1),
      "mouth_inside": _sd_ellipse(x, y, 0.0, _MOUTH_Y, 0.095, 0.072),
      "mouth_teeth": _intersect(
          _sd_ellipse(x, y, 0.0, _MOUTH_Y, 0.095, 0.072), y - _f(_MOUTH_Y - 0.035)
      ),
  }
  # Blush gets a wide fixed-width ramp so it stays a soft glow at every resolution.
  return {n: _layer(d, res, soft=0.09 if n == "blush" else 0.0) for n, d in layers.items()}


@functools.lru_cache(maxsize=None)
def _width_layers(res: int, width_idx: int) -> dict[str, _Layer]:
  """Head, ears and glasses arms, which follow the face width."""
  x, y = _grid(res)
  w = _FACE_WIDTHS[width_idx]
  head = _sd_ellipse(x, y, 0.0, _HEAD_CY, _face_taper(y, w), _HEAD_RY)
  ears = _sd_ellipse(np.abs(x), y, w - 0.01, 0.0, 0.07, 0.11)
  arm_half = (w - (_EYE_X + _GLASS_R)) / 2
  arm_x = _EYE_X + _GLASS_R + arm_half
  arms = _sd_hcapsule(np.abs(x), y, arm_x, _EYE_Y - 0.02, arm_half, 0.016)
  return {"head": _layer(head, res), "ears": _layer(ears, res), "arms": _layer(arms, res)}


@functools.lru_cache(maxsize=None)
def _hair_layers(res: int, style: int, width_idx: int) -> dict[str, _Layer]:
  """Hair in front of the head ("cap") and behind it ("back", long hair only)."""
  if style == _BALD:
    return {}
  x, y = _grid(res)
  w = _FACE_WIDTHS[width_idx]
  outer = _sd_ellipse(x, y, 0.0, -0.03, w + 0.055, 0.7)
  # The cap is the outer shell minus a lower ellipse where the face shows through,
  # stopped at ear level so it does not run down the cheeks.
  face_window = _sd_ellipse(x, y, 0.0, 0.24, w - 0.01, 0.68)
  cap = _intersect(outer, -face_window, y - _f(0.02))
  if style == _FRINGE:
    # Straight-cut bangs with a zigzag edge, ending just above the brows.
    u = x * _f(7.0)
    tri = np.abs(u - np.floor(u) - _f(0.5)) * 2
    bangs = _intersect(outer, y - (_f(-0.3) + _f(0.05) * tri))
    cap = _union(cap, bangs)
  # A darker band just inside the edge keeps hair readable on skin of a similar colour.
  out = {"cap": _layer(cap, res), "cap_edge": _layer(np.abs(cap + _f(0.02)) - _f(0.02), res)}
  if style == _LONG:
    back = _union(
        _sd_ellipse(x, y, 0.0, -0.03, w + 0.15, 0.72),
        _sd_box(x, y, 0.0, 0.42, w + 0.15, 0.46, 0.12),
    )
    out["back"] = _layer(back, res)
  return out


@functools.lru_cache(maxsize=None)
def _person_alpha(res: int, style: int, width_idx: int) -> np.ndarray:
  """Opacity of the whole figure, used to put it over the background."""
  alpha = np.zeros((res, res, 1), np.float32)
  fixed = _fixed_layers(res)
  wl, hl = _width_layers(res, width_idx), _hair_layers(res, style, width_idx)
  ears = None if style == _LONG else wl["ears"]  # as in render(): long hair hides them
  silhouette = [hl.get("back"), fixed["shirt"], fixed["neck"], ears, wl["head"], hl.get("cap")]
  for layer in silhouette:
    if layer is not None:
      rs, cs, a = layer
      alpha[rs, cs] += (1 - alpha[rs, cs]) * a
  alpha.setflags(write=False)
  return alpha


@functools.lru_cache(maxsize=None)
def _background(res: int) -> np.ndarray:
  # A gentle top-to-bottom darkening, identical for every hue.
  _, y = _grid(res)
  shade = (_f(1.04) - _f(0.1) * (y + 1) * _f(0.5))[..., None]
  shade.setflags(write=False)
  return shade


@functools.lru_cache(maxsize=None)
def _lighting(res: int, direction: int) -> np.ndarray:
  """Multiplicative shading of the figure: lit from the left, the front or the right."""
  x, y = _grid(res)
  if direction == 1:  # frontal: bright centre, darker rim
    shade = _f(1.06) - _f(0.6) * (x * x) - _f(0.1) * (y * y)
  else:
    # Light from the left brightens negative x; capped so light skin does not clip.
    side = x if direction == 0 else -x
    shade = _f(0.91) - _f(0.42) * np.clip(side, _f(-0.55), _f(0.55))
  shade = np.broadcast_to(shade, (res, res)).astype(np.float32)[..., None]
  shade.setflags(write=False)
  return shade


def _over(canvas: np.ndarray, layer: _Layer | None, colour: np.ndarray, opacity=None) -> None:
  # Premultiplied "over": C <- C * (1 - a) + colour * a, restricted to the layer's box.
  if layer is None:
    return
  rs, cs, a = layer
  if opacity is not None:
    a = a * _f(opacity)
  region = canvas[rs, cs]
  region += (colour - region) * a


def render(factors: Sequence[int] | np.ndarray, resolution: int = 64) -> np.ndarray:
  """Renders one face as uint8[resolution, resolution, 3]; a pure function of its inputs.

  Args:
    factors: one integer per factor, ordered as ``FACTOR_NAMES``.
    resolution: image side, one of ``RESOLUTIONS``.
  """
  f = _check_factors(factors)
  res = _check_resolution(resolution)
  skin = _SKIN_TONES[f[_SKIN]]
  hair = _HAIR_COLOURS[f[_HAIR_COL]]
  style, width_idx = f[_STYLE], f[_WIDTH]
  fixed = _fixed_layers(res)
  wl = _width_layers(res, width_idx)
  hl = _hair_layers(res, style, width_idx)

  # The figure is composited premultiplied from zero, lit, then put over the background.
  fig = np.zeros((res, res, 3), np.float32)
  _over(fig, hl.get("back"), hair * _f(0.8))
  _over(fig, fixed["shirt"], _SHIRT)
  _over(fig, fixed["neck"], skin * _f(0.82))
  if style != _LONG:  # long hair covers the ears
    _over(fig, wl["ears"], skin * _f(0.9))
  _over(fig, wl["head"], skin)
  _over(fig, fixed["blush"], skin * _f(0.7) + _BLUSH * _f(0.3), opacity=0.5)
  _over(fig, fixed["nose"], skin * _f(0.8))
  _over(fig, hl.get("cap"), hair)
  _over(fig, hl.get("cap_edge"), hair * _f(0.6))
  _over(fig, fixed["brows"], hair * _f(0.72))
  _over(fig, fixed["sclera"], _WHITE)
  _over(fig, fixed["iris"], _EYE_COLOURS[f[_EYE]])
  _over(fig, fixed["pupil"], _PUPIL)
  _over(fig, fixed["glint"], _WHITE, opacity=0.9)
  _over(fig, fixed["lid"], _LASH)
  lip = skin * _f(0.45) + _LIP_RED * _f(0.55)
  mouth = f[_MOUTH]
  if mouth == _NEUTRAL:
    _over(fig, fixed["mouth_neutral"], _MOUTH_LINE)
  elif mouth == _SMILE:
    _over(fig, fixed["mouth_smile"], _MOUTH_LINE)
  else:
    _over(fig, fixed["mouth_lips"], lip)
    _over(fig, fixed["mouth_inside"], _MOUTH_INSIDE)
    _over(fig, fixed["mouth_teeth"], _WHITE)
  if f[_GLASSES]:
    _over(fig, fixed["lens"], _LENS, opacity=0.2)
    _over(fig, fixed["rims"], _FRAME)
    _over(fig, wl["arms"], _FRAME)

  alpha = _person_alpha(res, style, width_idx)
  image = _BACKGROUNDS[f[_BG]] * _background(res) * (1 - alpha) + fig * _lighting(res, f[_LIGHT])
  # Round half up explicitly: floor is exact, so the bytes are the same everywhere.
  return np.floor(np.clip(image, 0, 255) + _f(0.5)).astype(np.uint8)


# ---------------------------------------------------------------------------------------


class FacesSource(_GrainSource):
  """Grain random-access source over one split of the faces dataset.

  Item ``i`` is the ``i``-th global index of the split (ascending), rendered on the fly:
  ``{"image": uint8[H, W, 3], "factors": int32[F], "index": int64}``.
  """

  def __init__(self, *, resolution: int = 64, split: str = "train"):
    self._resolution = _check_resolution(resolution)
    _check_split(split)
    self._split = split
    self._indices = split_indices(split)

  # The index table is rebuilt after unpickling (milliseconds) instead of shipping
  # megabytes to every grain worker.
  def __getstate__(self) -> dict[str, Any]:
    return {"resolution": self._resolution, "split": self._split}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(resolution=state["resolution"], split=state["split"])

  @property
  def resolution(self) -> int:
    return self._resolution

  @property
  def split(self) -> str:
    return self._split

  @property
  def factor_names(self) -> tuple[str, ...]:
    """Names of the ``factors`` entries (the labels probing and DCI read)."""
    return FACTOR_NAMES

  @property
  def global_indices(self) -> np.ndarray:
    """Sorted global indices of this split (read-only view)."""
    view = self._indices.view()
    view.setflags(write=False)
    return view

  def __len__(self) -> int:
    return int(self._indices.shape[0])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"FacesSource index must be an integer, got {type(index).__name__}.")
    n = len(self)
    i = int(index)
    if not -n <= i < n:
      raise IndexError(f"Index {i} is out of range for a split of size {n}.")
    global_index = self._indices[i]
    factors = decode_index(int(global_index))
    return {
        "image": render(factors, self._resolution),
        "factors": factors,
        "index": np.int64(global_index),
    }

  def __repr__(self) -> str:
    return f"FacesSource(resolution={self._resolution}, split={self._split!r}, len={len(self)})"

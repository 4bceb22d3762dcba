"""A grain random-access source over a folder of images (FFHQ-style).

`ImageFolderSource(root, resolution=R, split=...)` lists every file under `root`
(recursively, following the sorted order of relative paths, so the listing is the
same on every machine) whose extension is `.png`, `.jpg`, `.jpeg` or `.webp` (any
case); hidden files and folders are skipped, symlinked folders followed. Item `i` is

    {"image": uint8[R, R, 3], "index": int64, "valid": bool}

Preprocessing (shared with the TFDS sources through `center_crop_resize`):
- decode with PIL, accepting only the JPEG, PNG and WEBP decoders (a file that
  PIL could only read as some other format counts as corrupt); EXIF orientation
  is ignored, as torchvision's ImageFolder and TFDS do;
- convert to RGB: greyscale is replicated to three channels, 16-bit greyscale is
  scaled to 8 bits (`v >> 8`, PIL's own conversion would clip), palette images are
  expanded, and alpha (RGBA, LA, palette transparency) is composited over black;
- centre crop to the largest square, then resize to R×R with PIL's bilinear
  filter, which antialiases when downscaling (torchvision's default `Resize` on
  PIL images, as used by Unleashing Transformers). No resampling happens when the
  crop is already R×R.

Split: a file is held out (`split="test"`) when the SHA-1 of its relative POSIX
path, read as a number in [0, 1), is below `test_fraction`; otherwise it is in
`split="train"`. Membership therefore depends on nothing but the file's own path:
adding or removing other files never moves a file between splits. `split="all"`
returns every file. `"index"` is the file's position in the sorted listing of the
whole folder (all splits), so it is stable for a fixed folder and the train and
test indices are disjoint.

Corrupt-file policy: skip and count. The folder is only listed at construction
(decoding 70k images up front would take minutes), so a bad file is found when it
is read. `__getitem__` never raises for a bad file: zero-byte files, truncated
JPEG/PNG/WEBP data, files that are not images, and anything else PIL fails on are
logged once per file with absl `logging.warning` (path, error and the running
count) and returned as `{"image": zeros, "index": i, "valid": False}`. Good items
carry `"valid": True`; the input pipeline drops or replaces the rest (e.g.
`grain.MapDataset.filter(lambda x: x["valid"])`).
`num_skipped` counts the distinct bad files seen *by this process*: grain workers
each hold a copy, so their counts appear only in their own log lines. PIL's
`ImageFile.LOAD_TRUNCATED_IMAGES` is left off (never set it elsewhere), so a
truncated file fails in `.load()` rather than being grey-padded. A PNG whose pixel
data is complete but whose trailing IEND chunk is missing loads fine (its pixels are
all there).
"""

from __future__ import annotations

import hashlib
import io
import operator
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from grain.sources import RandomAccessDataSource as _GrainSource

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
# Decoders PIL may use. Restricting them stops a mislabelled non-image (text, say)
# from being "recognised" by a permissive decoder such as TGA.
_PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
SPLITS: tuple[str, ...] = ("train", "test", "all")


def center_crop_resize(image: np.ndarray | Image.Image, resolution: int) -> np.ndarray:
  """Centre-crops to the largest square, then resizes to R×R (bilinear, antialiased).

  Args:
    image: uint8[H, W, 3] array or an RGB PIL image.
    resolution: side R of the output.

  Returns:
    uint8[R, R, 3].
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"center_crop_resize expects a uint8[H, W, 3] image but got "
                       f"{image.dtype}{list(image.shape)}; convert it to RGB uint8 first.")
    height, width = image.shape[:2]
  else:
    width, height = image.size
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  if side == resolution:
    if isinstance(image, np.ndarray):
      return np.ascontiguousarray(image[top : top + side, left : left + side])
    return np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.uint8)
  if isinstance(image, np.ndarray):
    square = Image.fromarray(image[top : top + side, left : left + side])
  else:
    square = image.crop((left, top, left + side, top + side))
  # Crop first: PIL's `resize(box=...)` would let the filter read pixels outside the box.
  resized = square.resize((resolution, resolution), resample=Image.Resampling.BILINEAR)
  return np.asarray(resized, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    # 16-bit greyscale (PNG opens as I;16 or I): keep the top 8 bits.
    values = np.asarray(image).astype(np.int64)
    grey = np.clip(values >> 8, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
  if mode == "F":
    values = np.asarray(image, dtype=np.float64)
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
  has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      mode == "P" and "transparency" in image.info
  )
  if has_alpha:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def _is_remote(path: str) -> bool:
  return "://" in path


def _decode(path: str, resolution: int) -> np.ndarray:
  # Read through etils.epath, so a gs:// folder (a TPU pod's bucket) reads like a local one.
  data = io.BytesIO(epath.Path(path).read_bytes())
  with Image.open(data, formats=_PIL_FORMATS) as image:
    image.load()  # Decodes now, so truncated data raises here.
    return center_crop_resize(to_rgb(image), resolution)


def load_image(path: str, resolution: int) -> np.ndarray:
  """One image file -> uint8[R, R, 3], as the folder source prepares it; clear errors."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"Image file {path} does not exist; give an existing PNG/JPEG "
                            "path or a dataset index.")
  try:
    return _decode(path, resolution)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Image file {path} could not be decoded as PNG, JPEG or WebP "
                     f"({type(e).__name__}); give a readable image.") from e


def _held_out_score(relative_path: str) -> float:
  digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def list_images(root: str) -> list[str]:
  """Relative POSIX paths of the image files under `root`, sorted.

  Symlinked folders are followed (each real folder once, so link cycles end); hidden
  files and folders (names starting with ".", e.g. macOS "._x.png" forks) are skipped.
  """
  found = []
  seen = set()
  if _is_remote(root):  # object stores (gs://...) have no links: epath lists them
    root = root.rstrip("/")
    walk = ((str(d), dirs, files) for d, dirs, files in epath.Path(root).walk())
  else:
    walk = os.walk(root, followlinks=True)
  for dirpath, dirnames, filenames in walk:
    real = dirpath if _is_remote(root) else os.path.realpath(dirpath)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in filenames:
      if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
        if _is_remote(root):
          rel = f"{dirpath[len(root):].strip('/')}/{name}".lstrip("/")
        else:
          rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
        found.append(rel)
  return sorted(found)


class ImageFolderSource(_GrainSource):
  """Random-access source over the images in a folder tree; see the module docstring."""

  def __init__(
      self,
      root: str,
      *,
      resolution: int,
      split: str = "train",
      test_fraction: float = 0.1,
  ):
    if (not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool)
        or resolution < 1):
      raise ValueError(f"resolution must be a positive integer but got {resolution!r}; "
                       "set --config.data.resolution to e.g. 256.")
    if split not in SPLITS:
      raise ValueError(f"Unknown split {split!r} for an image folder; use one of "
                       f"{', '.join(SPLITS)}.")
    if not 0.0 <= test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in [0, 1) but got {test_fraction!r}; use e.g. "
                       "0.1 to hold out 10% of the images.")
    root = os.fspath(root)
    root = root if _is_remote(root) else os.path.expanduser(root)
    if not epath.Path(root).exists():
      raise FileNotFoundError(f"Image folder {root} does not exist; point "
                              "--config.data.data_dir at a folder of PNG/JPEG images.")
    if not epath.Path(root).is_dir():
      raise FileNotFoundError(f"Image folder {root} is a file, not a folder; point "
                              "--config.data.data_dir at a folder of PNG/JPEG images.")
    all_paths = list_images(root)
    if not all_paths:
      raise ValueError(f"Image folder {root} contains no files ending in "
                       f"{', '.join(IMAGE_EXTENSIONS)}; put the images there (subfolders are "
                       "searched) or fix --config.data.data_dir.")
    if split == "all":
      keep = list(range(len(all_paths)))
    else:
      want_test = split == "test"
      keep = [i for i, p in enumerate(all_paths)
              if (_held_out_score(p) < test_fraction) == want_test]
    if not keep:
      raise ValueError(f"The {split!r} split of image folder {root} is empty "
                       f"({len(all_paths)} images, test_fraction={test_fraction}); add "
                       "images or change --config.data.test_fraction.")
    self.root = root
    self.resolution = int(resolution)
    self.split = split
    self.test_fraction = float(test_fraction)
    self._paths: list[str] = [all_paths[i] for i in keep]
    self._indices = np.asarray(keep, dtype=np.int64)
    self._bad: set[int] = set()

  @property
  def paths(self) -> Sequence[str]:
    """Relative paths of this split's files, in item order."""
    return tuple(self._paths)

  @property
  def num_skipped(self) -> int:
    """Distinct corrupt files this process has met so far."""
    return len(self._bad)

  def __len__(self) -> int:
    return len(self._paths)

  def __repr__(self) -> str:
    return (
        f"ImageFolderSource(root={self.root!r}, resolution={self.resolution}, "
        f"split={self.split!r}, test_fraction={self.test_fraction}, len={len(self)})"
    )

  def _load(self, path: str) -> np.ndarray:
    return _decode(path, self.resolution)

  def __getitem__(self, record_key) -> dict[str, np.ndarray]:
    i = operator.index(record_key)
    if i < 0:
      i += len(self._paths)
    if not 0 <= i < len(self._paths):
      raise IndexError(f"Index {record_key} is out of range for an image folder split of "
                       f"{len(self._paths)} files.")
    path = os.path.join(self.root, self._paths[i])
    index = self._indices[i]
    try:
      image = self._load(path)
      valid = True
    except Exception as e:  # pylint: disable=broad-except
      # Policy: a bad file must never crash an input worker; flag and count it.
      if i not in self._bad:
        self._bad.add(i)
        logging.warning(
            "Skipping unreadable image %s (%s: %s); %d bad file(s) met so far in this "
            "process.",
            path,
            type(e).__name__,
            e,
            len(self._bad),
        )
      image = np.zeros((self.resolution, self.resolution, 3), np.uint8)
      valid = False
    return {"image": image, "index": np.int64(index), "valid": np.bool_(valid)}

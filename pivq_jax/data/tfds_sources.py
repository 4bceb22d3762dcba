"""CelebA and CelebA-HQ from TensorFlow Datasets as grain random-access sources.

`celeba_source(split=..., data_dir=..., resolution=64)` and
`celebahq_source(split=..., data_dir=..., resolution=256)` return a `TfdsImageSource`:
a thin, picklable wrapper around TFDS's random-access data source
(`builder.as_data_source(split)`, which reads ArrayRecord files) whose item `i` is

    {"image": uint8[R, R, 3], "index": int64}                      # CelebA-HQ
    {"image": uint8[R, R, 3], "index": int64, "attributes": int32[40]}   # CelebA

Preprocessing (as Unleashing Transformers / PI-VQ): centre crop to the largest square
(CelebA's 218×178 → the central 178×178), resize to R×R with PIL's bilinear filter,
which antialiases when downscaling (torchvision's default `Resize` on PIL images);
uint8 is kept. No resampling happens when the crop is already R×R.

Random access needs the dataset prepared as ArrayRecord:

    tfds build celeb_a --data_dir=DIR --file_format=array_record
    tfds build celeb_a_hq/256 --data_dir=DIR --manual_dir=MANUAL --file_format=array_record

TFDS's default file format is tfrecord, which has no random access: for such a dataset
`as_data_source` raises `NotImplementedError`, which we turn into a one-sentence
`ValueError` naming the fix (re-prepare with `--file_format=array_record --overwrite`;
the cached downloads are reused). We deliberately have no tfrecord fallback: reading a
tfrecord dataset sequentially into memory (CelebA-HQ 256 is ~3 GB of PNGs) or
re-indexing it would silently change the input pipeline's cost and determinism.
CelebA-HQ needs `data{R}x{R}.tar` files (from progressive_growing_of_gans'
`dataset_tool.py`) placed by hand in the manual dir even on machines with internet.

Splits:
- CelebA: our "train" / "validation" / "test" are TFDS's splits of the same name
  (162,770 / 19,867 / 19,962 images: the official CelebA partition). `"index"` is the
  position in that TFDS split.
- CelebA-HQ: TFDS has only "train" (30,000 images). Our "test" is its last
  `round(test_fraction * n)` examples (3,000 by default, the size of the usual held-out
  set) and "train" the rest. TFDS stores examples in an order fixed by a hash of each
  file name, the same on every machine and every preparation, so this is a fixed,
  pseudo-random subset of the faces. `"index"` is the position in TFDS's "train"
  split, so train and test indices are disjoint.
- CelebA-HQ config: the smallest *prepared* `celeb_a_hq/<r>` with r >= R (then
  downscaled to R when r > R); e.g. R=256 uses celeb_a_hq/256 if present, else /512,
  else /1024.

`data_dir=None` means TFDS's default (`$TFDS_DATA_DIR`, else ~/tensorflow_datasets).
Every user error is raised at construction, before anything heavy: a missing data_dir
or dataset (FileNotFoundError), a tfrecord-only dataset, an unknown split or an
out-of-range resolution (ValueError). TensorFlow Datasets is imported lazily; reading
ArrayRecord data does not import TensorFlow.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import numpy as np
from absl import logging

from pivq_jax.data.image_folder import center_crop_resize

try:  # Subclass grain's protocol when it exists; the structural methods suffice anyway.
  from grain.sources import RandomAccessDataSource as _GrainSource
except ImportError:  # pragma: no cover - depends on the installed grain
  _GrainSource = object

# TFDS `celeb_a` attribute order (alphabetical, which is also the order of the
# columns of CelebA's list_attr_celeba.txt).
CELEBA_ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald",
    "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)
CELEBA_IMAGE_SHAPE = (218, 178, 3)
CELEBA_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
CELEBAHQ_RESOLUTIONS: tuple[int, ...] = tuple(2**k for k in range(11))  # 1 ... 1024
CELEBAHQ_SPLITS = ("train", "test")
_CELEBAHQ_TAR_HELP = ("made by dataset_tool.py of github.com/tkarras/"
                      "progressive_growing_of_gans")


class TfdsImageSource(_GrainSource):
  """Picklable grain source: a TFDS data source plus centre crop, resize and labels.

  Item `i` reads record `start + i` of the wrapped TFDS source and returns
  {"image": uint8[R, R, 3], "index": int64(start + i)} plus, when `attribute_names`
  is given, {"attributes": int32[len(attribute_names)]} (0/1) in that order.
  """

  def __init__(self, tfds_source: Any, *, name: str, split: str, resolution: int,
               start: int = 0, stop: int | None = None,
               attribute_names: tuple[str, ...] = ()):
    self._source = tfds_source
    self.name = name
    self.split = split
    self.resolution = int(resolution)
    self.start = int(start)
    self.stop = len(tfds_source) if stop is None else int(stop)
    self.attribute_names = tuple(attribute_names)

  def __len__(self) -> int:
    return self.stop - self.start

  def __repr__(self) -> str:
    return (f"TfdsImageSource(name={self.name!r}, split={self.split!r}, "
            f"resolution={self.resolution}, records=[{self.start}, {self.stop}))")

  def __getitem__(self, record_key) -> dict[str, np.ndarray]:
    i = operator.index(record_key)
    n = len(self)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"Index {record_key} is out of range for {self!r} of length {n}.")
    position = self.start + i
    example = self._source[position]
    item = {
        "image": center_crop_resize(np.asarray(example["image"]), self.resolution),
        "index": np.int64(position),
    }
    if self.attribute_names:
      attributes = example["attributes"]
      item["attributes"] = np.array([attributes[k] for k in self.attribute_names],
                                    dtype=np.int32)
    return item


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _resolve_data_dir(data_dir: str | None) -> tuple[str | None, str]:
  """Returns (data_dir for TFDS, how to name it in messages); checks local paths exist."""
  if data_dir is None:
    from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
    return None, os.fspath(constants.get_default_data_dir())
  data_dir = os.fspath(data_dir)
  if "://" not in data_dir:
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(
          f"TFDS data_dir {data_dir} does not exist; create it and prepare the dataset "
          "there with `tfds build ... --file_format=array_record` (see "
          "pivq_jax/data/tfds_sources.py), or fix --config.data.data_dir.")
  return data_dir, data_dir


def _as_random_access(builder, tfds_split: str, *, name: str, shown_dir: str):
  """`builder.as_data_source(tfds_split)`, with TFDS's format error made actionable."""
  try:
    return builder.as_data_source(split=tfds_split)
  except NotImplementedError as e:  # Raised by TFDS for formats without random access.
    file_format = getattr(builder.info.file_format, "value", "tfrecord")
    raise ValueError(
        f"TFDS dataset {name!r} under {builder.data_dir} is stored as {file_format}, "
        "which has no random access; re-prepare it "
        f"with `tfds build {name} --data_dir={shown_dir} --file_format=array_record "
        "--overwrite` (downloads are reused).") from e


def celeba_source(*, split: str, data_dir: str | None,
                  resolution: int = 64) -> TfdsImageSource:
  """CelebA (TFDS `celeb_a`): centre 178×178 crop resized to `resolution`, 40 attributes.

  Args:
    split: "train", "validation" or "test" (TFDS's splits of the same name).
    data_dir: TFDS data dir holding `celeb_a` prepared as ArrayRecord; None for TFDS's
      default.
    resolution: output side R, 1 <= R <= 178.

  Returns:
    A source of {"image": uint8[R, R, 3], "index": int64, "attributes": int32[40]};
    attribute k is `CELEBA_ATTRIBUTE_NAMES[k]`.
  """
  if split not in CELEBA_SPLITS:
    raise ValueError(f"Unknown CelebA split {split!r}; use one of "
                     f"{', '.join(CELEBA_SPLITS)}.")
  side = min(CELEBA_IMAGE_SHAPE[:2])
  if not _is_int(resolution) or not 1 <= resolution <= side:
    raise ValueError(f"CelebA resolution must be between 1 and {side} (its centre crop) "
                     f"but got {resolution!r}; use celebahq for larger images or fix "
                     "--config.data.resolution.")
  data_dir, shown_dir = _resolve_data_dir(data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = "celeb_a"
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} was not found under {shown_dir}; download it with "
        f"`tfds build {name} --data_dir={shown_dir} --file_format=array_record` or set "
        "--config.data.data_dir.")
  names = tuple(builder.info.features["attributes"].keys())
  if names != CELEBA_ATTRIBUTE_NAMES:
    raise ValueError(f"TFDS {name!r} has attributes {names}, not the 40 CelebA attributes "
                     "this module expects; use tensorflow-datasets 4.9.10.")
  tfds_source = _as_random_access(builder, CELEBA_SPLITS[split], name=name,
                                  shown_dir=shown_dir)
  return TfdsImageSource(tfds_source, name=name, split=split, resolution=resolution,
                         attribute_names=CELEBA_ATTRIBUTE_NAMES)


def celebahq_source(*, split: str, data_dir: str | None, resolution: int = 256,
                    test_fraction: float = 0.1) -> TfdsImageSource:
  """CelebA-HQ (TFDS `celeb_a_hq/<r>`, smallest prepared r >= resolution), resized.

  Args:
    split: "train" or "test"; "test" is the last `round(test_fraction * n)` records of
      TFDS's only split (see the module docstring).
    data_dir: TFDS data dir holding `celeb_a_hq/<r>` prepared as ArrayRecord; None for
      TFDS's default.
    resolution: output side R, 1 <= R <= 1024.
    test_fraction: held-out share, in (0, 1).

  Returns:
    A source of {"image": uint8[R, R, 3], "index": int64}.
  """
  if split not in CELEBAHQ_SPLITS:
    raise ValueError(f"Unknown CelebA-HQ split {split!r}; use one of "
                     f"{', '.join(CELEBAHQ_SPLITS)}.")
  if not _is_int(resolution) or not 1 <= resolution <= CELEBAHQ_RESOLUTIONS[-1]:
    raise ValueError(f"CelebA-HQ resolution must be between 1 and "
                     f"{CELEBAHQ_RESOLUTIONS[-1]} but got {resolution!r}; fix "
                     "--config.data.resolution.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1) but got {test_fraction!r}; use e.g. "
                     "0.1 to hold out 3,000 of the 30,000 CelebA-HQ images.")
  data_dir, shown_dir = _resolve_data_dir(data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  candidates = [r for r in CELEBAHQ_RESOLUTIONS if r >= resolution]
  builder = None
  for r in candidates:
    b = tfds.builder(f"celeb_a_hq/{r}", data_dir=data_dir)
    if b.is_prepared():
      builder = b
      break
  if builder is None:
    r = candidates[0]
    raise FileNotFoundError(
        f"TFDS dataset 'celeb_a_hq/{r}' (or a larger celeb_a_hq config) was not found "
        f"under {shown_dir} and needs a manual download: put data{r}x{r}.tar "
        f"({_CELEBAHQ_TAR_HELP}) in a folder MANUAL and run `tfds build celeb_a_hq/{r} "
        f"--manual_dir=MANUAL --data_dir={shown_dir} --file_format=array_record`, or set "
        "--config.data.data_dir.")
  name = f"celeb_a_hq/{builder.builder_config.name}"
  if int(builder.builder_config.name) != resolution:
    logging.info("Using %s, resized to %d.", name, resolution)
  tfds_source = _as_random_access(builder, "train", name=name, shown_dir=shown_dir)
  n = len(tfds_source)
  if n < 2:
    raise ValueError(f"TFDS dataset {name!r} has {n} example(s), too few for a train/test "
                     f"split; re-prepare it from the full data{builder.builder_config.name}x"
                     f"{builder.builder_config.name}.tar.")
  n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
  start, stop = (0, n - n_test) if split == "train" else (n - n_test, n)
  return TfdsImageSource(tfds_source, name=name, split=split, resolution=resolution,
                         start=start, stop=stop)

"""CelebA, CelebA-HQ and Shapes3D from TensorFlow Datasets as grain random-access sources.

`celeba_source(split=..., data_dir=..., resolution=64)` and
`celebahq_source(split=..., data_dir=..., resolution=256)` return a `TfdsImageSource`,
`shapes3d_source(split=..., data_dir=..., resolution=64)` a `TfdsFactorSource`: thin,
picklable wrappers around TFDS's random-access data source
(`builder.as_data_source(split)`, which reads ArrayRecord files) whose item `i` is

    {"image": uint8[R, R, 3], "index": int64}                      # CelebA-HQ
    {"image": uint8[R, R, 3], "index": int64, "attributes": int32[40]}   # CelebA
    {"image": uint8[R, R, 3], "index": int64, "factors": int32[6]}       # Shapes3D

Preprocessing (as Unleashing Transformers / PI-VQ): centre crop to the largest square
(CelebA's 218×178 → the central 178×178), resize to R×R with PIL's bilinear filter,
which antialiases when downscaling (torchvision's default `Resize` on PIL images);
uint8 is kept. No resampling happens when the crop is already R×R.

Random access needs the dataset prepared as ArrayRecord:

    tfds build celeb_a --data_dir=DIR --file_format=array_record
    tfds build celeb_a_hq/256 --data_dir=DIR --manual_dir=MANUAL --file_format=array_record
    tfds build shapes3d --data_dir=DIR --file_format=array_record

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
- Shapes3D (the FactorQVAE paper's dataset, 480,000 64×64 renders, each of the
  10·10·10·8·4·15 factor combinations exactly once): TFDS has only "train", and the
  paper (shared/spec/factorqvae.md) names no held-out image split (its DCI protocol only
  draws 10,000 train and 5,000 test points uniformly over factor combinations). Our
  "all" is TFDS's whole split; "test" holds out record `p` of it when
  splitmix64(p) / 2**64 < `test_fraction` (0.1 by default: ~48,000 images, a fixed
  pseudo-random subset, since TFDS orders records by a hash of each example's key, its
  3dshapes.h5 index) and "train" is the rest. The rule is a pure function of the record
  position: the same on every machine, no pass over the data, and train/test `"index"`
  values (positions in TFDS's "train") are disjoint. `"factors"` are the six TFDS
  `label_*` ClassLabels (class indices 0..n-1, ordered as `SHAPES3D_FACTOR_NAMES`, sizes
  `SHAPES3D_FACTOR_SIZES`); the `value_*` floats are not read.

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

from grain.sources import RandomAccessDataSource as _GrainSource

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
# TFDS `shapes3d` factors (the order of 3dshapes.h5's label columns, most significant
# first in its image order) and their numbers of values.
SHAPES3D_FACTOR_NAMES: tuple[str, ...] = (
    "floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
SHAPES3D_FACTOR_SIZES: tuple[int, ...] = (10, 10, 10, 8, 4, 15)
SHAPES3D_IMAGE_SHAPE = (64, 64, 3)
SHAPES3D_SPLITS = ("train", "test", "all")
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
    i = _item_index(record_key, self)
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


def _splitmix64(values: np.ndarray) -> np.ndarray:
  # Fixed 64-bit integer mixer (splitmix64 finaliser, as in pivq_jax.data.faces); uint64
  # arithmetic wraps modulo 2**64 identically everywhere, unlike Python's salted hash().
  z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def held_out_mask(num_records: int, test_fraction: float) -> np.ndarray:
  """bool[num_records]: record p is held out when splitmix64(p) / 2**64 < test_fraction."""
  unit = (_splitmix64(np.arange(num_records, dtype=np.uint64)) >> np.uint64(11)).astype(
      np.float64) * 2.0**-53  # top 53 bits -> exactly representable in [0, 1)
  return unit < test_fraction


def split_positions(num_records: int, split: str, test_fraction: float) -> np.ndarray:
  """Sorted int64 record positions of "train", "test" or "all" under `held_out_mask`."""
  if split == "all":
    return np.arange(num_records, dtype=np.int64)
  mask = held_out_mask(num_records, test_fraction)
  return np.flatnonzero(mask if split == "test" else ~mask).astype(np.int64)


class TfdsFactorSource(_GrainSource):
  """Picklable grain source: a TFDS data source, a hashed split, resize and factors.

  Item `i` reads record `p = positions[i]` of the wrapped TFDS source (positions from
  `split_positions`) and returns {"image": uint8[R, R, 3], "index": int64(p),
  "factors": int32[F]}, factor k being the ClassLabel `label_<factor_names[k]>`.
  """

  def __init__(self, tfds_source: Any, *, name: str, split: str, resolution: int,
               test_fraction: float, factor_names: tuple[str, ...],
               factor_sizes: tuple[int, ...]):
    self._source = tfds_source
    self.name = name
    self.split = split
    self.resolution = int(resolution)
    self.test_fraction = float(test_fraction)
    self.factor_names = tuple(factor_names)
    self.factor_sizes = tuple(int(n) for n in factor_sizes)
    self._keys = tuple(f"label_{k}" for k in self.factor_names)
    self._positions = split_positions(len(tfds_source), split, self.test_fraction)

  # The position table is rebuilt after unpickling (milliseconds) instead of shipping
  # megabytes to every grain worker.
  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_positions"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._positions = split_positions(len(self._source), self.split, self.test_fraction)

  @property
  def positions(self) -> np.ndarray:
    """Sorted record positions in TFDS's split that make up this split (read-only)."""
    view = self._positions.view()
    view.setflags(write=False)
    return view

  def __len__(self) -> int:
    return int(self._positions.shape[0])

  def __repr__(self) -> str:
    return (f"TfdsFactorSource(name={self.name!r}, split={self.split!r}, "
            f"resolution={self.resolution}, test_fraction={self.test_fraction}, "
            f"len={len(self)})")

  def __getitem__(self, record_key) -> dict[str, np.ndarray]:
    i = _item_index(record_key, self)
    position = int(self._positions[i])
    example = self._source[position]
    return {
        "image": center_crop_resize(np.asarray(example["image"]), self.resolution),
        "index": np.int64(position),
        "factors": np.array([example[k] for k in self._keys], dtype=np.int32),
    }


def _item_index(record_key, source) -> int:
  """A grain record key (negative counts from the end) -> 0 <= i < len(source)."""
  i, n = operator.index(record_key), len(source)
  if i < 0:
    i += n
  if not 0 <= i < n:
    raise IndexError(f"Index {record_key} is out of range for {source!r} of length {n}.")
  return i


def _prepared_builder(tfds, name: str, data_dir, shown_dir: str):
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} was not found under {shown_dir}; download it with "
        f"`tfds build {name} --data_dir={shown_dir} --file_format=array_record` or set "
        "--config.data.data_dir.")
  return builder


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
  builder = _prepared_builder(tfds, name, data_dir, shown_dir)
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


def shapes3d_source(*, split: str, data_dir: str | None, resolution: int = 64,
                    test_fraction: float = 0.1) -> TfdsFactorSource:
  """Shapes3D (TFDS `shapes3d`): 64×64 renders with their six ground-truth factors.

  Args:
    split: "train", "test" or "all"; "test" holds out the records of TFDS's only split
      whose position hashes below `test_fraction` (see the module docstring), "all" is
      every record (e.g. to train on every image, with no held-out set).
    data_dir: TFDS data dir holding `shapes3d` prepared as ArrayRecord; None for TFDS's
      default.
    resolution: output side R, 1 <= R <= 64 (resized with PIL bilinear when R < 64).
    test_fraction: expected held-out share, in (0, 1).

  Returns:
    A `TfdsFactorSource` of {"image": uint8[R, R, 3], "index": int64,
    "factors": int32[6]}; factor k is `SHAPES3D_FACTOR_NAMES[k]`, in
    0..`SHAPES3D_FACTOR_SIZES[k]` - 1 (also the source's `factor_names` / `factor_sizes`).
  """
  if split not in SHAPES3D_SPLITS:
    raise ValueError(f"Unknown Shapes3D split {split!r}; use one of "
                     f"{', '.join(SHAPES3D_SPLITS)}.")
  side = SHAPES3D_IMAGE_SHAPE[0]
  if not _is_int(resolution) or not 1 <= resolution <= side:
    raise ValueError(f"Shapes3D resolution must be between 1 and {side} (its image size) "
                     f"but got {resolution!r}; fix --config.data.resolution.")
  if not (isinstance(test_fraction, (int, float, np.floating))
          and 0.0 < test_fraction < 1.0):
    raise ValueError(f"test_fraction must be in (0, 1) but got {test_fraction!r}; use e.g. "
                     "0.1 to hold out ~48,000 of the 480,000 Shapes3D images.")
  data_dir, shown_dir = _resolve_data_dir(data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = "shapes3d"
  builder = _prepared_builder(tfds, name, data_dir, shown_dir)
  features = dict(builder.info.features.items())
  sizes = tuple(getattr(features.get(f"label_{k}"), "num_classes", None)
                for k in SHAPES3D_FACTOR_NAMES)
  if sizes != SHAPES3D_FACTOR_SIZES:
    raise ValueError(f"TFDS {name!r} has label_* class counts {sizes} for "
                     f"{SHAPES3D_FACTOR_NAMES}, not the expected {SHAPES3D_FACTOR_SIZES}; "
                     "use tensorflow-datasets 4.9.10.")
  tfds_source = _as_random_access(builder, "train", name=name, shown_dir=shown_dir)
  source = TfdsFactorSource(tfds_source, name=name, split=split, resolution=resolution,
                            test_fraction=test_fraction,
                            factor_names=SHAPES3D_FACTOR_NAMES,
                            factor_sizes=SHAPES3D_FACTOR_SIZES)
  if len(source) == 0:
    raise ValueError(f"Shapes3D split {split!r} is empty: TFDS {name!r} under {shown_dir} "
                     f"has {len(tfds_source)} example(s) and test_fraction is "
                     f"{test_fraction}; re-prepare it from the full 3dshapes.h5.")
  return source

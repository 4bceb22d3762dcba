"""Input pipelines: dataset name -> grain random-access source -> per-process batches.

Training batches are a pure function of the step: the shuffled, repeated dataset is indexed
by `step`, so resuming at step s reads exactly the batches an uninterrupted run would have
read (no iterator state to checkpoint). Each process reads only its own rows: global batch s
is the stream's examples [s*G, (s+1)*G), and process p reads the consecutive block
[s*G + p*G/P, s*G + (p+1)*G/P) of it. So the global batch, in order, is the same for any
number of processes, and a 2-host run trains on exactly what a 1-host run does.
"""

import os
from typing import Iterator

import grain
import numpy as np

DATASETS = ("faces", "celeba", "celebahq", "shapes3d", "image_folder")
# Datasets read from disk and the name of their data location in error messages.
_NEEDS_DATA_DIR = {"celeba": "TFDS data dir", "celebahq": "TFDS data dir",
                   "shapes3d": "TFDS data dir", "image_folder": "image folder"}


def _data_dir_and_origin(data) -> tuple[str | None, str]:
  if data.data_dir or _NEEDS_DATA_DIR.get(data.name) != "TFDS data dir":
    return data.data_dir or None, "--config.data.data_dir"
  return os.environ.get("TFDS_DATA_DIR") or None, "$TFDS_DATA_DIR"


def data_dir(data) -> str | None:
  """data.data_dir, or for TFDS datasets $TFDS_DATA_DIR when it is unset."""
  return _data_dir_and_origin(data)[0]


def check_data_config(data) -> None:
  """Cheap checks that fail before anything compiles (unknown name, missing directory)."""
  if data.name not in DATASETS:
    raise ValueError(f"Unknown dataset name {data.name!r}; set --config.data.name to one "
                     f"of {', '.join(DATASETS)}.")
  if data.name in _NEEDS_DATA_DIR:
    what, (where, origin) = _NEEDS_DATA_DIR[data.name], _data_dir_and_origin(data)
    if not where:
      tfds_env = " (or $TFDS_DATA_DIR)" if what == "TFDS data dir" else ""
      raise ValueError(f"Dataset {data.name!r} reads from a {what}; set "
                       f"--config.data.data_dir=/path/to/it{tfds_env}.")
    if "://" not in where and not os.path.isdir(os.path.expanduser(where)):
      raise FileNotFoundError(f"The {what} {where!r} for dataset {data.name!r} "
                              f"does not exist; fix {origin}.")


def make_source(data, split: str):
  """Returns the grain random-access source for `data.name` and split "train"/"test"."""
  check_data_config(data)
  if data.name == "faces":
    from pivq_jax.data import faces
    return faces.FacesSource(resolution=data.resolution, split=split)
  if data.name == "celeba":
    from pivq_jax.data import tfds_sources
    return tfds_sources.celeba_source(split=split, data_dir=data_dir(data),
                                      resolution=data.resolution)
  if data.name == "celebahq":
    from pivq_jax.data import tfds_sources
    return tfds_sources.celebahq_source(split=split, data_dir=data_dir(data),
                                        resolution=data.resolution,
                                        test_fraction=data.test_fraction)
  if data.name == "shapes3d":
    from pivq_jax.data import tfds_sources
    return tfds_sources.shapes3d_source(split=split, data_dir=data_dir(data),
                                        resolution=data.resolution,
                                        test_fraction=data.test_fraction)
  from pivq_jax.data import image_folder
  return SkipInvalid(image_folder.ImageFolderSource(
      data.data_dir, resolution=data.resolution, split=split,
      test_fraction=data.test_fraction), data.get("max_unreadable_fraction", 0.1))


class SkipInvalid(grain.sources.RandomAccessDataSource):
  """Replaces an unreadable example (`valid == False`) by the next readable one.

  Policy for corrupt, truncated or non-image files: skip and count, however they cluster
  (a whole bad subfolder included). Substituting a deterministic neighbour instead of
  dropping keeps batches a pure function of the step, so resume stays exact. At the first
  bad file a fixed random sample of `sample_size` files estimates the unreadable share (a
  cluster met first says nothing about the rest); the run stops, in one sentence with the
  counts and the first paths, only when that share passes `max_unreadable_fraction`, or
  when nothing at all is readable.
  """

  def __init__(self, source, max_unreadable_fraction: float = 0.1, sample_size: int = 256):
    self._source = source
    self._max_fraction = max_unreadable_fraction
    self._sample_size = sample_size
    self._share_checked = False

  @property
  def unfiltered(self):
    """The wrapped source, bad examples included (the export leaves them out instead)."""
    return self._source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    n = len(self._source)
    for k in range(n):
      item = self._source[(int(index) + k) % n]
      if item.get("valid", True):
        item.pop("valid", None)
        return item
      if not self._share_checked:
        self._check_share(n)
    raise ValueError(f"None of the {n} files of {self._source!r} could be decoded; point "
                     "--config.data.data_dir at a folder of PNG, JPEG or WebP images.")

  def _check_share(self, n: int) -> None:
    self._share_checked = True
    sample = np.random.default_rng(0).permutation(n)[:self._sample_size]
    bad = sorted(int(i) for i in sample if not self._source[int(i)].get("valid", True))
    if len(bad) > self._max_fraction * len(sample):
      paths = getattr(self._source, "paths", None)
      first = ", ".join(str(paths[i]) if paths else str(i) for i in bad[:3])
      raise ValueError(
          f"{len(bad)} of a random {len(sample)} of the {n} images could not be decoded "
          f"({len(bad) / len(sample):.0%}, above data.max_unreadable_fraction="
          f"{self._max_fraction}), e.g. {first} in {self._source!r}; fix or remove them, or "
          "raise --config.data.max_unreadable_fraction.")

  def __repr__(self):
    return f"SkipInvalid({self._source!r})"


def train_batches(source, *, local_batch: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  num_threads: int = 2, prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of this process's batches for steps start_step, start_step+1, ..."""
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  # Blocks of local_batch consecutive examples; process p takes every P-th block from p.
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  ds = ds[start_step:]
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=prefetch)))


def eval_batches(source, *, num_examples: int, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """A fixed random subset of `num_examples` examples of a (held-out) source, batched.

  The subset is a fixed shuffle (seed 0, whatever the run's seed) so that every run and
  every eval sees the same examples, spread over the whole split rather than its first
  indices (which, for the faces, would all share their leading factors).

  The count is rounded down to a whole number of global batches so every device gets the
  same shapes (no recompiles, no padding logic).
  """
  return list(subset_batches(source, num_examples=num_examples, batch_size=batch_size,
                             process_index=process_index, process_count=process_count))


def subset_batches(source, *, num_examples: int, batch_size: int, process_index: int = 0,
                   process_count: int = 1,
                   num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """`eval_batches`, streamed: for subsets too big to hold (e.g. 50k images for FID)."""
  n = min(num_examples, len(source))
  n -= n % (batch_size * process_count)
  if n == 0:
    raise ValueError(f"A subset of {num_examples} examples from a split of {len(source)} "
                     f"is fewer than one global eval batch of {batch_size * process_count}; "
                     "ask for more or lower --config.eval.batch_size (or "
                     "eval.feature_batch_size).")
  ds = grain.MapDataset.source(source).shuffle(seed=0)[:n]
  ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]  # as above
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=4)))


def images(batch):
  """The models' input convention: uint8 NHWC in [0, 255] -> float32 NHWC in [0, 1]."""
  return batch["image"].astype(np.float32) / 255.0


def label_names(source) -> dict[str, tuple[str, ...]]:
  """The integer labels a source's items carry, and the names of their entries."""
  if getattr(source, "factor_names", ()):  # faces, and Shapes3D through TFDS
    return {"factors": tuple(source.factor_names)}
  if getattr(source, "attribute_names", ()):  # CelebA through TFDS
    return {"attributes": tuple(source.attribute_names)}
  return {}

"""Grain pipelines: batches are a pure function of the step, split per process, and
unreadable images are skipped."""

import ml_collections
import numpy as np
from PIL import Image
import pytest

from pivq_jax.data import pipeline


class _Range:
  """A tiny random-access source whose items name their index."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"index": np.int64(i), "image": np.full((2, 2, 3), i % 256, np.uint8)}


def _take(it, n):
  return [next(it)["index"].tolist() for _ in range(n)]


def test_resume_reads_the_same_batches():
  full = _take(pipeline.train_batches(_Range(37), local_batch=4, seed=3), 20)
  resumed = _take(pipeline.train_batches(_Range(37), local_batch=4, seed=3, start_step=12), 8)
  assert resumed == full[12:]
  other_seed = _take(pipeline.train_batches(_Range(37), local_batch=4, seed=4), 20)
  assert other_seed != full


def test_epochs_cover_the_data_and_reshuffle():
  batches = _take(pipeline.train_batches(_Range(12), local_batch=4, seed=0), 6)
  first, second = sum(batches[:3], []), sum(batches[3:], [])
  assert sorted(first) == sorted(second) == list(range(12))
  assert first != second


def test_processes_split_the_global_batch():
  one = _take(pipeline.train_batches(_Range(50), local_batch=8, seed=1), 5)
  per_proc = [_take(pipeline.train_batches(_Range(50), local_batch=4, seed=1,
                                           process_index=p, process_count=2), 5)
              for p in range(2)]
  for step in range(5):
    a, b = per_proc[0][step], per_proc[1][step]
    assert not set(a) & set(b)
    assert a + b == one[step]  # the same global batch, in the same order


def test_eval_batches_round_to_whole_global_batches():
  batches = pipeline.eval_batches(_Range(30), num_examples=27, batch_size=4)
  indices = [b["index"].tolist() for b in batches]
  assert [len(b) for b in indices] == [4] * 6
  flat = sum(indices, [])
  assert len(set(flat)) == 24 and flat != sorted(flat)  # a spread-out subset
  again = pipeline.eval_batches(_Range(30), num_examples=27, batch_size=4)
  assert [b["index"].tolist() for b in again] == indices  # the same every time
  with pytest.raises(ValueError, match="fewer than one global eval batch"):
    pipeline.eval_batches(_Range(3), num_examples=3, batch_size=4)


def test_image_folder_skips_corrupt_files(tmp_path):
  for i in range(6):
    Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
  (tmp_path / "bad.png").write_bytes(b"")
  (tmp_path / "text.jpg").write_text("not an image")
  data = ml_collections.ConfigDict(dict(name="image_folder", data_dir=str(tmp_path),
                                        resolution=16, test_fraction=0.0))
  source = pipeline.make_source(data, "train")
  assert len(source) == 8
  items = [source[i] for i in range(len(source))]
  assert all(it["image"].shape == (16, 16, 3) and "valid" not in it for it in items)
  # The two unreadable files were replaced by readable neighbours.
  assert len({int(it["index"]) for it in items}) == 6
  batches = pipeline.train_batches(source, local_batch=4, seed=0)
  assert next(batches)["image"].shape == (4, 16, 16, 3)


def test_unknown_dataset_and_missing_dir():
  with pytest.raises(ValueError, match="Unknown dataset name 'mnist'"):
    pipeline.check_data_config(ml_collections.ConfigDict(dict(name="mnist", data_dir=None)))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.check_data_config(ml_collections.ConfigDict(dict(name="celebahq",
                                                              data_dir="/nope")))

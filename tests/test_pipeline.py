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
                                        resolution=16, test_fraction=0.0,
                                        max_unreadable_fraction=0.3))
  source = pipeline.make_source(data, "train")
  assert len(source) == 8
  items = [source[i] for i in range(len(source))]
  assert all(it["image"].shape == (16, 16, 3) and "valid" not in it for it in items)
  # The two unreadable files were replaced by readable neighbours.
  assert len({int(it["index"]) for it in items}) == 6
  batches = pipeline.train_batches(source, local_batch=4, seed=0)
  assert next(batches)["image"].shape == (4, 16, 16, 3)


def _folder(root, good: int, bad_dirs: int, per_bad_dir: int = 40):
  for i in range(good):
    Image.fromarray(np.full((20, 20, 3), i % 250, np.uint8)).save(root / f"good_{i:03d}.png")
  for d in range(bad_dirs):  # a whole unreadable subfolder, sorted in the middle
    (root / f"g{d}").mkdir()
    for i in range(per_bad_dir):
      (root / f"g{d}" / f"{i:03d}.png").write_bytes(b"\x89PNG truncated")
  return ml_collections.ConfigDict(dict(name="image_folder", data_dir=str(root),
                                        resolution=16, test_fraction=0.0,
                                        max_unreadable_fraction=0.1))


def test_clustered_unreadable_files_are_skipped_under_the_share(tmp_path):
  # 80 bad files in a row (two subfolders), 8% of the folder: skipped, however clustered.
  source = pipeline.make_source(_folder(tmp_path, good=920, bad_dirs=2), "train")
  items = [source[i] for i in range(len(source))]
  assert len({int(it["index"]) for it in items}) == 920
  assert source.unfiltered.num_skipped == 80


def test_unreadable_share_above_the_limit_stops_in_one_sentence(tmp_path):
  source = pipeline.make_source(_folder(tmp_path, good=300, bad_dirs=2), "train")
  with pytest.raises(ValueError, match=r"\d+ of a random 256 of the 380 images could not be "
                     r"decoded \(\d+%, above data.max_unreadable_fraction=0.1\), e.g. g0/"):
    for i in range(len(source)):
      source[i]


def test_nothing_readable(tmp_path):
  data = _folder(tmp_path, good=0, bad_dirs=1, per_bad_dir=5)
  data.max_unreadable_fraction = 1.0
  with pytest.raises(ValueError, match="None of the 5 files"):
    pipeline.make_source(data, "train")[0]


def test_unknown_dataset_and_missing_dir():
  with pytest.raises(ValueError, match="Unknown dataset name 'mnist'"):
    pipeline.check_data_config(ml_collections.ConfigDict(dict(name="mnist", data_dir=None)))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.check_data_config(ml_collections.ConfigDict(dict(name="celebahq",
                                                              data_dir="/nope")))

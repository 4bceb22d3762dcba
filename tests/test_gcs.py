"""gs:// paths through etils.epath: image folders, exports, the FID weights, workdir checks.

The `fake_gcs` fixture (conftest.py) serves gs://... from a local folder for epath and for
TensorFlow's TFRecord I/O, so these run without a network or credentials. They fail when
a code path takes a gs:// path through os.path / pathlib (which turn "gs://b" into "gs:/b").
"""

import os

import numpy as np
import pytest
from PIL import Image

from pivq_jax import checkpoints
from pivq_jax import export
from pivq_jax.data import image_folder
from pivq_jax.evaluation import inception


def _images(root, n=6):
  rng = np.random.default_rng(0)
  for k in range(n):
    sub = os.path.join(root, "a" if k % 2 else "b")
    os.makedirs(sub, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20 + k, 24, 3), np.uint8)).save(
        os.path.join(sub, f"img_{k}.png"))
  with open(os.path.join(root, "a", "broken.png"), "wb") as f:
    f.write(b"not a png")


def test_image_folder_on_gs_reads_like_the_local_folder(fake_gcs):
  local = os.path.join(fake_gcs, "bucket", "faces")
  _images(local)
  here = image_folder.ImageFolderSource(local, resolution=16, split="all")
  there = image_folder.ImageFolderSource("gs://bucket/faces/", resolution=16, split="all")
  assert there.paths == here.paths and len(there.paths) == 7
  for i in range(len(here)):
    a, b = here[i], there[i]
    assert bool(a["valid"]) == bool(b["valid"]) and a["index"] == b["index"]
    np.testing.assert_array_equal(a["image"], b["image"])
  assert sum(not here[i]["valid"] for i in range(len(here))) == 1  # broken.png, both ways
  np.testing.assert_array_equal(
      image_folder.load_image("gs://bucket/faces/b/img_0.png", 16),
      image_folder.load_image(os.path.join(local, "b", "img_0.png"), 16))
  with pytest.raises(FileNotFoundError, match=r"Image folder gs://bucket/none does not exist"):
    image_folder.ImageFolderSource("gs://bucket/none", resolution=16)
  with pytest.raises(FileNotFoundError, match=r"Image file gs://bucket/faces/x.png does not"):
    image_folder.load_image("gs://bucket/faces/x.png", 16)


class _Source:
  """Six items with labels, as a dataset source hands them to the exporter."""

  def __len__(self):
    return 6

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 3), i, np.uint8), "index": np.int64(100 + i),
            "factors": np.array([i, i % 2], np.int64)}


def _encode(images):  # a stand-in encoder: 3 codes per image, from its pixel value
  v = np.asarray(images)[:, 0, 0, 0].astype(np.int64)
  return np.stack([v, v + 10, v + 20], axis=1)


def test_export_writes_resumes_and_reads_back_on_gs(fake_gcs):
  out = "gs://bucket/run/export/test"
  kwargs = dict(split="test", shard_size=4, batch_size=2, spec={"checkpoint_step": 7},
                label_names={"factors": ["f0", "f1"]},
                extra_manifest={"num_latents": 3})
  checkpoints.check_writable(out, "The export directory")
  with checkpoints.lock(out, "The export directory"):
    manifest = export.write(_encode, _Source(), out, **kwargs)
  local = os.path.join(fake_gcs, "bucket", "run", "export", "test")
  assert sorted(f for f in os.listdir(local) if f.endswith(".tfrecord") or "manifest" in f) \
      == sorted([s["file"] for s in manifest["shards"]] + [export.MANIFEST])
  assert not os.path.exists(os.path.join(local, ".pivq_jax.lock"))  # released
  codes, index = export.load_codes(out)
  np.testing.assert_array_equal(index, 100 + np.arange(6))
  np.testing.assert_array_equal(codes, _encode(np.arange(6)[:, None, None, None]
                                                * np.ones((1, 4, 4, 3), np.uint8)))
  # A rerun finds every shard whole and writes nothing again; a damaged one is rewritten.
  first = os.path.join(local, manifest["shards"][0]["file"])
  before = os.path.getmtime(first)
  assert export.write(_encode, _Source(), out, **kwargs)["sha256"] == manifest["sha256"]
  assert os.path.getmtime(first) == before
  with open(first, "r+b") as f:
    f.seek(20)
    f.write(b"\xff")
  assert export.write(_encode, _Source(), out, **kwargs)["sha256"] == manifest["sha256"]


def test_fid_weights_and_cache_on_gs(fake_gcs, monkeypatch):
  monkeypatch.setenv(inception.CACHE_ENV, "gs://bucket/cache")
  assert str(inception.default_weights_path()).startswith("gs://bucket/cache/fid_inception/")
  with pytest.raises(FileNotFoundError, match=r"'gs://bucket/cache/fid_inception/"):
    inception.load_inception_params()
  os.makedirs(os.path.join(fake_gcs, "bucket", "w"))
  np.savez(os.path.join(fake_gcs, "bucket", "w", "bad.npz"), foo=np.zeros(3))
  # Read through gs://: the expected names plus the file's one stray name differ.
  with pytest.raises(ValueError, match=r"^gs://bucket/w/bad.npz does not match the FID "
                     r"Inception-v3: 377 names"):
    inception.load_inception_params("gs://bucket/w/bad.npz")

"""Tests for pivq_jax.data.image_folder: decoding, centre crop, split, corrupt files."""

import io
import logging
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from pivq_jax.data import image_folder
from pivq_jax.data.image_folder import ImageFolderSource

R = 32


def _save(path, image, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, **kwargs)


def _wide_marker() -> np.ndarray:
  """60×100 RGB: blue outside the central 60×60 square, a column ramp inside it."""
  arr = np.zeros((60, 100, 3), np.uint8)
  arr[..., 2] = 255
  inner = arr[:, 20:80]
  inner[..., 2] = 0
  inner[..., 0] = 255
  inner[..., 1] = np.arange(60, dtype=np.uint8)[None, :] * 4
  return arr


def _encoded(image, fmt) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("faces"))
  rng = np.random.default_rng(0)
  noise = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
  _save(f"{root}/a_wide.png", Image.fromarray(_wide_marker()))
  grey = np.tile(np.arange(60, dtype=np.uint8)[:, None] * 3, (1, 40))  # 60×40, tall
  _save(f"{root}/b_grey.png", Image.fromarray(grey, mode="L"))
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, 20:, 3] = 255  # Left half fully transparent.
  _save(f"{root}/c_rgba.png", Image.fromarray(rgba, mode="RGBA"))
  _save(f"{root}/d_palette.png", Image.fromarray(noise(50, 50)).convert("P"))
  deep = np.full((40, 48), 0xAB12, np.uint16)
  _save(f"{root}/e_deep16.png", Image.fromarray(deep))
  _save(f"{root}/sub/dir/f_photo.JPG", Image.fromarray(np.full((70, 50, 3), 90, np.uint8)),
        quality=95)
  _save(f"{root}/sub/g_pic.jpeg", Image.fromarray(noise(R, R)))
  _save(f"{root}/sub/h_pic.WebP", Image.fromarray(noise(45, 45)))
  for k in range(6):
    _save(f"{root}/more/img_{k:02d}.png", Image.fromarray(noise(40 + k, 36)))
  # Corrupt files (4): zero bytes, truncated JPEG, truncated PNG, text named .jpg.
  open(f"{root}/bad_empty.png", "wb").close()
  jpeg = _encoded(Image.fromarray(noise(64, 64)), "JPEG")
  with open(f"{root}/bad_truncated.jpg", "wb") as f:
    f.write(jpeg[: len(jpeg) // 2])
  png = _encoded(Image.fromarray(noise(64, 64)), "PNG")
  with open(f"{root}/more/bad_truncated.png", "wb") as f:
    f.write(png[: len(png) // 2])
  with open(f"{root}/sub/bad_text.jpg", "w") as f:
    f.write("this is not an image\n" * 20)
  with open(f"{root}/notes.txt", "w") as f:  # Not an image extension: not listed.
    f.write("ignore me")
  open(f"{root}/sub/._g_pic.jpeg", "wb").close()  # Hidden (macOS fork): not listed.
  os.symlink(f"{root}/sub", f"{root}/sub/dir/loop")  # A link cycle must not hang.
  return root


def _by_name(source):
  return {os.path.basename(p): source[i] for i, p in enumerate(source.paths)}


def test_listing_is_recursive_sorted_and_case_insensitive(folder):
  src = ImageFolderSource(folder, resolution=R, split="all")
  assert len(src) == 18
  assert list(src.paths) == sorted(src.paths)
  assert "sub/dir/f_photo.JPG" in src.paths and "sub/h_pic.WebP" in src.paths
  assert not any(p.endswith(".txt") or "/." in p or "loop" in p for p in src.paths)
  np.testing.assert_array_equal([int(src[i]["index"]) for i in range(len(src))],
                                np.arange(18))


def test_valid_items_shape_dtype_and_conversions(folder):
  items = _by_name(ImageFolderSource(folder, resolution=R, split="all"))
  for name, item in items.items():
    assert item["image"].shape == (R, R, 3) and item["image"].dtype == np.uint8, name
    assert item["index"].dtype == np.int64 and item["valid"].dtype == np.bool_
    assert bool(item["valid"]) == (not name.startswith("bad_")), name
  grey = items["b_grey.png"]["image"]
  assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
  rgba = items["c_rgba.png"]["image"]
  assert (rgba[:, :R // 2 - 1] == 0).all()  # Transparent -> black.
  assert (rgba[:, R // 2 + 1:] == [200, 0, 0]).all()
  np.testing.assert_array_equal(items["e_deep16.png"]["image"], 0xAB)  # 16-bit: top byte.
  np.testing.assert_allclose(items["f_photo.JPG"]["image"].astype(int), 90, atol=3)


def test_centre_crop_is_exact_at_native_size_and_centred_when_resized(folder):
  marker = _wide_marker()
  exact = ImageFolderSource(folder, resolution=60, split="all")
  got = _by_name(exact)["a_wide.png"]["image"]
  np.testing.assert_array_equal(got, marker[:, 20:80])  # No resampling at crop size.
  small = _by_name(ImageFolderSource(folder, resolution=R, split="all"))["a_wide.png"]["image"]
  assert (small[..., 2] == 0).all(), "blue border leaked into the centre crop"
  assert (small[..., 0] == 255).all()
  ramp = small[..., 1].astype(int).mean(axis=0)
  assert np.all(np.diff(ramp) > 0) and ramp[0] < 10 and ramp[-1] > 225
  # Same as cropping first then resizing with PIL bilinear.
  ref = np.asarray(Image.fromarray(marker[:, 20:80]).resize((R, R), Image.Resampling.BILINEAR))
  np.testing.assert_allclose(small.astype(int), ref.astype(int), atol=1)


def test_corrupt_files_are_flagged_counted_and_logged_once(folder, caplog):
  src = ImageFolderSource(folder, resolution=R, split="all")
  with caplog.at_level(logging.WARNING):
    first = [src[i] for i in range(len(src))]
    again = [src[i] for i in range(len(src))]
  bad = [p for p, item in zip(src.paths, first) if not item["valid"]]
  assert sorted(os.path.basename(p) for p in bad) == [
      "bad_empty.png", "bad_text.jpg", "bad_truncated.jpg", "bad_truncated.png"]
  assert src.num_skipped == 4
  for item in first:
    if not item["valid"]:
      assert item["image"].shape == (R, R, 3) and not item["image"].any()
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
  assert len(warnings) == 4
  assert all(any(os.path.basename(p) in w for w in warnings) for p in bad)
  assert "4 bad file(s)" in warnings[-1]


def test_split_is_deterministic_disjoint_and_path_local(folder, tmp_path):
  kw = dict(resolution=R, test_fraction=0.5)
  train = ImageFolderSource(folder, split="train", **kw)
  test = ImageFolderSource(folder, split="test", **kw)
  everything = ImageFolderSource(folder, split="all", **kw)
  assert len(train) > 0 and len(test) > 0
  assert set(train.paths).isdisjoint(test.paths)
  assert sorted(train.paths + test.paths) == list(everything.paths)
  assert ImageFolderSource(folder, split="test", **kw).paths == test.paths
  train_idx = {int(train[i]["index"]) for i in range(len(train))}
  test_idx = {int(test[i]["index"]) for i in range(len(test))}
  assert train_idx.isdisjoint(test_idx) and train_idx | test_idx == set(range(len(everything)))
  # A file's split depends only on its own path.
  names = [f"x{k:03d}.png" for k in range(40)]
  for name in names:
    _save(str(tmp_path / name), Image.new("RGB", (8, 8)))
  before = set(ImageFolderSource(str(tmp_path), split="test", **kw).paths)
  _save(str(tmp_path / "zzz_new.png"), Image.new("RGB", (8, 8)))
  after = set(ImageFolderSource(str(tmp_path), split="test", **kw).paths)
  assert after - {"zzz_new.png"} == before
  assert 5 < len(before) < 35  # Roughly half held out.


def test_numpy_indices_pickle_and_grain_filter(folder):
  import grain

  src = ImageFolderSource(folder, resolution=R, split="all")
  np.testing.assert_array_equal(src[np.int64(3)]["image"], src[3]["image"])
  np.testing.assert_array_equal(src[-1]["image"], src[len(src) - 1]["image"])
  with pytest.raises(IndexError):
    src[len(src)]
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[5]["image"], src[5]["image"])
  ds = grain.MapDataset.source(src).filter(lambda x: bool(x["valid"]))
  kept = [x for x in ds.to_iter_dataset()]
  assert len(kept) == 14 and all(x["valid"] for x in kept)


def test_errors_are_one_sentence_and_raised_at_construction(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ImageFolderSource(str(tmp_path / "missing"), resolution=R)
  (tmp_path / "readme.txt").write_text("no images")
  with pytest.raises(ValueError, match="contains no files ending in"):
    ImageFolderSource(str(tmp_path), resolution=R)
  _save(str(tmp_path / "one.png"), Image.new("RGB", (8, 8)))
  with pytest.raises(ValueError, match="Unknown split"):
    ImageFolderSource(str(tmp_path), resolution=R, split="val")
  with pytest.raises(ValueError, match="positive integer"):
    ImageFolderSource(str(tmp_path), resolution=0)
  with pytest.raises(ValueError, match="test_fraction"):
    ImageFolderSource(str(tmp_path), resolution=R, test_fraction=1.0)
  with pytest.raises(ValueError, match="split of image folder") as info:
    ImageFolderSource(str(tmp_path), resolution=R, split="test", test_fraction=0.0)
  assert "\n" not in str(info.value)


def test_center_crop_resize_accepts_arrays_only_as_rgb_uint8():
  out = image_folder.center_crop_resize(np.zeros((10, 20, 3), np.uint8), 5)
  assert out.shape == (5, 5, 3) and out.dtype == np.uint8
  with pytest.raises(ValueError, match="uint8"):
    image_folder.center_crop_resize(np.zeros((10, 20), np.float32), 5)

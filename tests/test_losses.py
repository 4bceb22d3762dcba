"""DiffAug, hinge losses, the adaptive GAN weight and the PatchGAN discriminator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_fast
from pivq_jax.losses import adversarial
from pivq_jax.losses import diffaug
from pivq_jax.models import discriminator
from pivq_jax.models import trunk


def _images(n=16, size=32, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3))


def test_diffaug_keeps_shapes_and_dtypes():
  x = _images()
  for policy in ("", "color", "translation", "color,translation"):
    y = diffaug.diff_augment(x, jax.random.key(1), policy=policy)
    assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_array_equal(diffaug.diff_augment(x, jax.random.key(1), policy=""), x)
  with pytest.raises(ValueError, match="cutout"):
    diffaug.diff_augment(x, jax.random.key(1), policy="color,cutout")


def test_color_on_grey_images_is_a_per_image_brightness_shift_within_half():
  # Grey pixels equal their channel mean and a constant image equals its mean, so
  # saturation and contrast do nothing and only the brightness offset remains.
  grey = jnp.broadcast_to(jnp.linspace(0.2, 0.8, 256)[:, None, None, None], (256, 8, 8, 3))
  out = diffaug.color(grey, jax.random.key(0))
  offset = out - grey
  np.testing.assert_allclose(offset, offset[:, :1, :1, :1] * jnp.ones_like(offset), atol=1e-6)
  offsets = np.asarray(offset[:, 0, 0, 0])
  assert offsets.min() >= -0.5 and offsets.max() <= 0.5
  assert offsets.min() < -0.4 and offsets.max() > 0.4  # the whole U(-0.5, 0.5) range is used
  assert len(np.unique(np.round(offsets, 6))) > 250  # independent draw per sample


def test_color_keeps_each_image_mean_up_to_the_brightness_offset():
  x = _images(64)
  out = diffaug.color(x, jax.random.key(3))
  shift = np.asarray(jnp.mean(out, axis=(1, 2, 3)) - jnp.mean(x, axis=(1, 2, 3)))
  assert np.all(np.abs(shift) <= 0.5 + 1e-6)
  # Saturation in U(0, 2) and contrast in U(0.5, 1.5) do change the images otherwise.
  resid = out - x - shift[:, None, None, None]
  assert float(jnp.max(jnp.abs(resid))) > 0.05


def test_translation_is_an_integer_shift_with_zeros_in_range():
  size, ratio = 32, 0.125
  x = _images(128, size) + 1.0  # strictly positive, so the shifted-in zeros are visible
  out = np.asarray(diffaug.translation(x, jax.random.key(5), ratio))
  limit = diffaug.max_shift(size, ratio)
  assert limit == 4
  seen = set()
  for img, o in zip(np.asarray(x), out):
    matches = []
    for dy in range(-limit, limit + 1):
      for dx in range(-limit, limit + 1):
        padded = np.pad(img, ((limit, limit), (limit, limit), (0, 0)))
        if np.array_equal(padded[limit + dy:limit + dy + size, limit + dx:limit + dx + size],
                          o):
          matches.append((dy, dx))
    assert len(matches) == 1
    seen.add(matches[0])
  dys, dxs = {d[0] for d in seen}, {d[1] for d in seen}
  assert dys == dxs == set(range(-limit, limit + 1))  # every allowed offset occurs


def test_diffaug_is_differentiable():
  x = _images(4)
  g = jax.grad(lambda x: jnp.sum(diffaug.diff_augment(x, jax.random.key(0)) ** 2))(x)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


def test_hinge_losses():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = (0, .5, 2), relu(1 + fake) = (0, 1, 2)
  assert float(adversarial.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 1.0))
  assert float(adversarial.hinge_g_loss(fake)) == pytest.approx(1 / 3)


def test_adaptive_weight_is_clamped_and_stops_gradients():
  a, b = jnp.full((3, 3), 2.0), jnp.full((3, 3), 1.0)
  assert float(adversarial.adaptive_weight(a, b)) == 1.0  # 2 / 1 clamped to 1
  assert float(adversarial.adaptive_weight(b, a)) == pytest.approx(0.5, rel=1e-3)
  assert float(jax.grad(lambda s: adversarial.adaptive_weight(s * b, a))(1.0)) == 0.0


@pytest.mark.slow
def test_adaptive_weight_from_last_layer_grads_equals_direct_autodiff():
  """The cheap kernel gradients (conv input + dL/dx_hat) equal autodiff through a decoder."""
  dec = trunk.Decoder(nf=16, ch_mult=(1, 2), res_blocks=1, attn_resolutions=(), norm_groups=8)
  disc = discriminator.PatchDiscriminator(ndf=8, n_layers=2)

  @jit_fast  # one compile, not one per op; cheap code for a single run
  def both_ways():
    h = jax.random.normal(jax.random.key(0), (3, 8, 8, 16))
    x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3))
    params = dec.init(jax.random.key(2), h)["params"]
    d_vars = disc.init(jax.random.key(3), x)
    nll = lambda x_hat: jnp.mean(jnp.abs(x - x_hat)) + jnp.mean((x - x_hat) ** 2)
    g = lambda x_hat: adversarial.hinge_g_loss(disc.apply(d_vars, x_hat, mutable=True)[0])

    def with_kernel(loss, kernel):
      p = dict(params, conv_out=dict(params["conv_out"], kernel=kernel))
      return loss(dec.apply({"params": p}, h))

    kernel = params["conv_out"]["kernel"]
    direct = [jax.grad(functools.partial(with_kernel, loss))(kernel) for loss in (nll, g)]
    x_hat, inter = dec.apply({"params": params}, h, mutable=["intermediates"])
    feats = inter["intermediates"]["final_conv_input"][0]
    cheap = adversarial.last_layer_grads(feats, kernel, params["conv_out"]["bias"],
                                         [jax.grad(nll)(x_hat), jax.grad(g)(x_hat)])
    return direct, cheap

  direct, cheap = both_ways()
  for a, b in zip(direct, cheap):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  w_direct = adversarial.adaptive_weight(*direct)
  w_cheap = adversarial.adaptive_weight(*cheap)
  assert float(w_cheap) == pytest.approx(float(w_direct), rel=1e-4)
  assert 0.0 < float(w_cheap) <= 1.0


def test_patch_discriminator_shapes_and_ut_parameter_count():
  disc = discriminator.PatchDiscriminator(ndf=64, n_layers=3)
  for size, grid in ((64, 6), (256, 30)):
    out = jax.eval_shape(lambda x: disc.init_with_output(jax.random.key(0), x)[0],
                         jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    assert out.shape == (2, grid, grid, 1)
  variables = jax.eval_shape(disc.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  count = sum(np.prod(v.shape) for v in jax.tree.leaves(variables["params"]))
  # 3*64*16+64 | 64*128*16 + BN 2*128 | 128*256*16 + 2*256 | 256*512*16 + 2*512 | 512*16+1
  assert count == 3136 + 131_328 + 524_800 + 2_098_176 + 8193 == 2_765_633
  assert set(variables["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1", "BatchNorm_2"}


def test_discriminator_batchnorm_uses_batch_statistics_and_updates_running_ones():
  disc = discriminator.PatchDiscriminator(ndf=8, n_layers=2)
  x = _images(4, 32)

  @jit_fast  # one compile for init and both applies, not one per op
  def run(x):
    variables = disc.init(jax.random.key(0), x)
    out1, new = disc.apply(variables, x, mutable=["batch_stats"])
    # Training-mode BN: a sample's logits depend on the rest of its batch.
    out2, _ = disc.apply(variables, jnp.concatenate([x[:2], x[2:] * 0.0]), mutable=True)
    return variables, out1, new, out2

  variables, out1, new, out2 = run(x)
  assert not np.allclose(out1[:2], out2[:2])
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(new["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))

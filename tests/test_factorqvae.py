"""FactorQVAE, its variants, the TC discriminator, losses and schedules (spec/factorqvae.md)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pivq_jax import config_lib
from pivq_jax import train_state
from pivq_jax.evaluators import disentanglement as disentanglement_evaluator
from pivq_jax.modes import train_factorqvae
from pivq_jax.losses import factorqvae as losses
from pivq_jax.models import factorqvae
from pivq_jax.models import tc_discriminator as tcd

D, K, R = 4, 16, 32  # latents, codebook size, resolution of the tiny models


def _key(seed):
  # XLA's RngBitGenerator keys compile several times faster on CPU than threefry ones; the
  # model code is agnostic to the key implementation.
  return jax.random.key(seed, impl="rbg")


def _tiny(variant, **kw):
  return factorqvae.FactorQVAE(
      latent_dim=D, num_values=K, variant=variant, resolution=R, channels=8, num_groups=2,
      blocks_per_group=1, hidden_dim=32, decoder_input_channels=8, **kw)


@functools.cache
def _init(variant):
  """(model, params) of the tiny model, cached across tests.

  A real `init` costs a compile per parameter shape (seconds on CPU), so the parameters are
  drawn here like the reference's init (N(0, 0.02) kernels, zero biases, N(0, 1) codebook);
  `test_reference_init` checks that init itself on the parts that define it.
  """
  model = _tiny(variant)
  shapes = jax.eval_shape(model.init, _key(0), _images(1), _key(1))["params"]
  rng = np.random.default_rng(0)

  def draw(path, s):
    name = path[-1].key
    if name == "bias":
      return jnp.zeros(s.shape, s.dtype)
    if name == "codebook" and variant == "qlae":
      return jnp.broadcast_to(jnp.linspace(-0.5, 0.5, s.shape[-1]), s.shape)
    return jnp.asarray(rng.normal(0.0, 1.0 if name == "codebook" else 0.02, s.shape), s.dtype)
  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def _images(n=8, seed=0):
  """Flat-coloured images with one bright square: a few factors, values in [0, 1]."""
  rng = np.random.default_rng(seed)
  x = np.ones((n, R, R, 3), np.float32) * rng.uniform(0, 0.6, (n, 1, 1, 3))
  for img, (i, j) in zip(x, rng.integers(0, R - 8, (n, 2))):
    img[i:i + 8, j:j + 8] = 1.0
  return jnp.asarray(x)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------
# Architecture.
# ----------------------------------------------------------------------------------------
def test_paper_size_parameter_counts():
  # d = 12 (Shapes3D), K = 64, 64px. Counts derived by hand from the spec's layer list.
  def enc_block(i, o):
    h = o // 4
    return i * h * 9 + h + 2 * (h * h * 9 + h) + h * o + o + (i * o + o if i != o else 0)

  def dec_block(i, o):
    h = o // 4
    return i * h + h + 2 * (h * h * 9 + h) + h * o * 9 + o + (i * o + o if i != o else 0)

  d, k = 12, 64
  trunk = (3 * 128 * 9 + 128 + enc_block(128, 128) + enc_block(128, 128)
           + enc_block(128, 256) + enc_block(256, 256) + enc_block(256, 512)
           + enc_block(512, 512)
           + 16 * 16 * 512 * 128 + 128 + 128 * 128 + 128  # flatten 16x16x512 -> dense head
           + dec_block(64, 512) + dec_block(512, 512) + dec_block(512, 256)
           + dec_block(256, 256) + dec_block(256, 128) + dec_block(128, 128) + 128 * 3 + 3)
  expected = {
      "factorqvae": trunk + (128 * d + d) + (d * 16 * 16 * 64 + 16 * 16 * 64) + k,
      "dvae": trunk + (128 * d * k + d * k) + (d * 16 * 16 * 64 + 16 * 16 * 64) + k,
      "betavae": trunk + (128 * 2 * d + 2 * d) + (d * 16 * 16 * 64 + 16 * 16 * 64),
      "qlae": trunk + (128 * d + d) + (d * 16 * 16 * 64 + 16 * 16 * 64) + d * 10,
  }
  x = jnp.zeros((1, 64, 64, 3))
  for variant, n in expected.items():
    model = factorqvae.FactorQVAE(latent_dim=d, num_values=10 if variant == "qlae" else k,
                                  variant=variant)
    params = jax.eval_shape(model.init, _key(0), x, _key(1))["params"]
    assert _count(params) == n, variant
  assert expected["factorqvae"] == 21_964_239
  assert params["encoder"]["dense_1"]["kernel"].shape == (16 * 16 * 512, 128)
  disc = jax.eval_shape(tcd.TCDiscriminator().init, _key(0), jnp.zeros((2, d, k)))
  assert _count(disc) == (d * k * 1000 + 1000) + 4 * (1000 * 1000 + 1000) + 1000 * 2 + 2


def test_reference_init():
  block = factorqvae.EncoderBlock(out_ch=64, gain=1 / 36)
  params = block.init(_key(0), jnp.zeros((1, 4, 4, 32)))["params"]
  assert set(params) == {"conv_1", "conv_2", "conv_3", "conv_4", "id_path"}  # 32 -> 64
  assert params["conv_1"]["kernel"].shape == (3, 3, 32, 16)  # res path at out / 4
  assert params["conv_4"]["kernel"].shape == (1, 1, 16, 64)
  kernels = jnp.concatenate([p["kernel"].ravel() for p in params.values()])
  assert abs(float(jnp.std(kernels)) - 0.02) < 0.001  # N(0, 0.02) like the reference
  assert not any(np.any(p["bias"]) for p in params.values())  # zero biases
  model = factorqvae.FactorQVAE(latent_dim=D, num_values=4096)
  codes = jnp.zeros((1, D), jnp.int32)
  codebook = model.init(_key(1), codes, method="codebook_values")["params"]["codebook"]
  assert codebook.shape == (4096,) and abs(float(jnp.std(codebook)) - 1.0) < 0.05  # N(0, 1)
  qlae = factorqvae.FactorQVAE(latent_dim=D, num_values=10, variant="qlae")
  values = qlae.init(_key(1), codes, method="codebook_values")["params"]["codebook"]
  np.testing.assert_allclose(values, jnp.tile(jnp.linspace(-0.5, 0.5, 10), (D, 1)))


def test_bf16_compute_keeps_float32_params_and_outputs():
  model = _tiny("factorqvae", dtype=jnp.bfloat16)
  x = _images(2)
  params = jax.eval_shape(model.init, _key(0), x, _key(1))["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  x_hat, aux = jax.eval_shape(lambda p: model.apply({"params": p}, x, _key(2), tau=0.5), params)
  assert x_hat.dtype == jnp.float32 and aux["weights"].dtype == jnp.float32


def test_image_offset_centres_the_network():
  # The network works on x - 0.5 (the reference's [-0.5, 0.5]) and hands back [0, 1]:
  # the same parameters with offset 0 on shifted images give the shifted output.
  _, params = _init("qvae")
  x = _images(3)
  centred, plain = _tiny("qvae"), _tiny("qvae", image_offset=0.0)
  assert centred.image_offset == 0.5
  out = centred.apply({"params": params}, x, train=False)[0]
  ref = plain.apply({"params": params}, x - 0.5, train=False)[0] + 0.5
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # At init the decoder's output is ~0, so reconstructions start at mid-grey, not black.
  assert abs(float(jnp.mean(out)) - 0.5) < 0.05


@pytest.mark.parametrize("variant", list(factorqvae.VARIANTS))
def test_variant_shapes_and_codes(variant):
  model, params = _init(variant)
  params = {"params": params}
  b, x = 5, _images(5)
  x_hat, aux = model.apply(params, x, _key(2), tau=0.7)
  assert x_hat.shape == x.shape and x_hat.dtype == jnp.float32
  codes = model.apply(params, x, method="encode_codes")
  assert codes.shape == (b, D)
  spec = factorqvae.variant_spec(variant)
  if spec.posterior == "gaussian":
    assert codes.dtype == jnp.float32
    np.testing.assert_array_equal(codes, aux["mean"])
    assert aux["tc_latents"].shape == (b, D)
    assert not np.allclose(aux["tc_latents"], aux["mean"])  # a sample during training
    return
  assert codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < K  # in the codebook's range
  np.testing.assert_array_equal(codes, aux["codes"])
  values = model.apply(params, x, as_values=True, method="encode_codes")
  assert values.shape == (b, D) and values.dtype == jnp.float32
  assert model.apply(params, codes, method="decode_codes").shape == x.shape
  if spec.posterior == "qlae":
    np.testing.assert_array_equal(aux["z_q"], values)
    return
  w = aux["weights"]
  assert w.shape == aux["tc_latents"].shape == aux["logits"].shape == (b, D, K)
  np.testing.assert_allclose(jnp.sum(w, -1), 1.0, atol=1e-5)
  assert float(jnp.max(w)) < 1.0  # soft Gumbel-softmax mixture while training
  # Evaluation: the hard argmin one-hot, decoding exactly the selected codebook scalars.
  x_eval, aux_eval = model.apply(params, x, train=False)
  np.testing.assert_array_equal(aux_eval["weights"], jax.nn.one_hot(codes, K))
  np.testing.assert_allclose(x_eval, model.apply(params, codes, method="decode_codes"),
                             atol=1e-6)
  if spec.posterior == "quantized":
    # Eq. 3-4: logits are minus the squared distances to the global codebook.
    cb = params["params"]["codebook"]
    np.testing.assert_allclose(aux["logits"], -jnp.square(aux["z_e"][..., None] - cb),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(codes, jnp.argmin(jnp.abs(aux["z_e"][..., None] - cb), -1))


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="variant"):
    jax.eval_shape(_tiny("vqvae").init, _key(0), _images(1), _key(1))


# ----------------------------------------------------------------------------------------
# Gumbel-softmax.
# ----------------------------------------------------------------------------------------
def test_gumbel_softmax_at_low_temperature_is_one_hot_and_straight_through_has_gradients():
  logits = jax.random.normal(_key(0), (64, 10))
  key = _key(1)
  noisy_argmax = jnp.argmax(logits + jax.random.gumbel(key, logits.shape), -1)
  soft = factorqvae.gumbel_softmax(key, logits, 1e-4)
  np.testing.assert_allclose(soft, jax.nn.one_hot(noisy_argmax, 10), atol=1e-5)
  hard = factorqvae.gumbel_softmax(key, logits, 1.0, hard=True)
  np.testing.assert_array_equal(hard, jax.nn.one_hot(noisy_argmax, 10))  # exactly one-hot
  # Straight-through: the hard sample's gradient is the soft sample's, and it is non-zero.
  probe = jax.random.normal(_key(2), (64, 10))
  f = lambda hard: lambda l: jnp.sum(probe * factorqvae.gumbel_softmax(key, l, 1.0, hard=hard))
  g_hard, g_soft = jax.grad(f(True))(logits), jax.grad(f(False))(logits)
  np.testing.assert_allclose(g_hard, g_soft, atol=1e-6)
  assert float(jnp.max(jnp.abs(g_hard))) > 1e-3


def test_gumbel_max_frequencies_match_the_posterior():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  w = factorqvae.gumbel_softmax(_key(3), jnp.broadcast_to(logits, (20000, 4)), 0.5)
  freq = jnp.mean(jax.nn.one_hot(jnp.argmax(w, -1), 4), 0)
  np.testing.assert_allclose(freq, jax.nn.softmax(logits), atol=0.015)


# ----------------------------------------------------------------------------------------
# TC discriminator and permute-dims.
# ----------------------------------------------------------------------------------------
def test_permute_dims_permutes_each_latent_independently_across_the_batch():
  b, d, k = 32, 6, 3
  z = jnp.arange(b * d * k, dtype=jnp.float32).reshape(b, d, k)
  out = np.asarray(tcd.permute_dims(z, _key(0)))
  src = np.asarray(z)
  perms = []
  for j in range(d):
    # Each column is a permutation of the input column; a latent's K entries move together.
    rows = (out[:, j, 0] - src[0, j, 0]) / (d * k)
    np.testing.assert_array_equal(np.sort(rows), np.arange(b))
    np.testing.assert_array_equal(out[:, j], src[rows.astype(int), j])
    perms.append(tuple(rows))
  assert len(set(perms)) == d  # independent permutations per latent
  assert not np.array_equal(out, src)
  flat = tcd.permute_dims(jnp.arange(b * d).reshape(b, d), _key(1))  # [B, d] too
  np.testing.assert_array_equal(np.sort(flat, 0), np.arange(b * d).reshape(b, d))


def test_discriminator_shapes():
  disc = tcd.TCDiscriminator(hidden=16)
  z = jnp.ones((3, D, K))
  params = disc.init(_key(0), z)["params"]
  assert params["dense_in"]["kernel"].shape == (D * K, 16)
  assert [params[f"dense_{i}"]["kernel"].shape for i in range(4)] == [(16, 16)] * 4
  assert params["dense_out"]["kernel"].shape == (16, 2)
  assert disc.apply({"params": params}, z).shape == (3, 2)


def test_tc_losses_on_hand_computed_logits():
  joint = jnp.array([[2.0, 0.0], [0.0, 0.0]])
  perm = jnp.array([[0.0, 1.0], [3.0, 1.0]])
  ce0 = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2  # CE(D(z), class 0)
  ce1 = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2  # CE(D(perm), class 1)
  np.testing.assert_allclose(losses.tc_discriminator_loss(joint, perm), 0.5 * (ce0 + ce1),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.tc_estimate(joint), 1.0)  # mean(D_0 - D_1)


# ----------------------------------------------------------------------------------------
# VAE losses.
# ----------------------------------------------------------------------------------------
def test_kl_terms_and_vae_loss_assembly():
  np.testing.assert_allclose(losses.categorical_kl_uniform(jnp.zeros((2, 3, K))), 0.0,
                             atol=1e-7)
  peaked = jnp.where(jnp.arange(K) == 3, 0.0, -1e4) * jnp.ones((2, 3, K))
  np.testing.assert_allclose(losses.categorical_kl_uniform(peaked), math.log(K), rtol=1e-6)
  mean, logvar = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, math.log(2.0)]])
  np.testing.assert_allclose(losses.gaussian_kl(mean, logvar),
                             0.5 + 0.5 * (2.0 - 1.0 - math.log(2.0)), rtol=1e-6)

  x, x_hat = jnp.zeros((2, 4, 4, 3)), jnp.full((2, 4, 4, 3), 0.5)
  aux = {"logits": peaked}
  disc_logits = jnp.array([[1.0, 0.0], [3.0, 0.0]])
  loss, terms = losses.vae_loss(x=x, x_hat=x_hat, aux=aux, variant="factorqvae", beta=1e-3,
                                gamma=1e-4, disc_logits=disc_logits)
  np.testing.assert_allclose(loss, 0.25 + 1e-3 * math.log(K) + 1e-4 * 2.0, rtol=1e-6)
  assert set(terms) == {"loss", "mse", "kl", "tc"}
  with pytest.raises(ValueError, match="discriminator"):
    losses.vae_loss(x=x, x_hat=x_hat, aux=aux, variant="factorqvae", beta=1e-3, gamma=1e-4)
  loss, _ = losses.vae_loss(x=x, x_hat=x_hat, aux={"mean": mean, "logvar": logvar},
                            variant="betavae", beta=2.0)
  np.testing.assert_allclose(loss, 0.25 + 2.0 * losses.gaussian_kl(mean, logvar), rtol=1e-6)
  z_e, z_q = jnp.array([[0.1, 0.4]]), jnp.array([[0.0, 0.5]])
  loss, terms = losses.vae_loss(x=x, x_hat=x_hat, aux={"z_e": z_e, "z_q": z_q},
                                variant="qlae", beta=0.0)
  np.testing.assert_allclose(terms["quantize_loss"], 0.01, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.25 + 0.01 * 0.01 + 0.01 * 0.01, rtol=1e-5)


def test_tc_gradient_reaches_latents_and_codebook_through_the_soft_sample():
  disc = tcd.TCDiscriminator(hidden=16)
  d_params = disc.init(_key(0), jnp.zeros((1, D, K)))["params"]
  z_e, codebook = jax.random.normal(_key(1), (8, D)), jax.random.normal(_key(2), (K,))

  @jax.jit
  def grads(z_e, codebook):
    def tc(z_e, codebook):
      logits = -factorqvae.scalar_distances(z_e, codebook)
      _, aux = factorqvae.categorical_posterior(logits, codebook, _key(3), tau=1.0)
      return losses.tc_estimate(disc.apply({"params": d_params}, aux["tc_latents"]))
    return jax.grad(tc, argnums=(0, 1))(z_e, codebook)

  g_z, g_c = grads(z_e, codebook)
  assert float(jnp.min(jnp.abs(g_z))) > 0 and float(jnp.max(jnp.abs(g_c))) > 0


# ----------------------------------------------------------------------------------------
# Schedules and optimizers.
# ----------------------------------------------------------------------------------------
def test_tau_schedule_endpoints():
  np.testing.assert_allclose(losses.tau_schedule(0), 1.0)
  # TC variants: exp(-1e-5 * global step), the global step advancing 2 per iteration.
  assert losses.reference_tau_rate("factorqvae") == 2e-5
  assert losses.reference_tau_rate("qvae") == 1e-5
  np.testing.assert_allclose(losses.tau_schedule(50_000, rate=2e-5), math.exp(-1.0),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.tau_schedule(100_000, rate=1e-5), math.exp(-1.0),
                             rtol=1e-6)
  steps = jnp.arange(0, 50_001, 1000)
  assert bool(jnp.all(jnp.diff(losses.tau_schedule(steps)) < 0))


def test_cosine_schedules_match_the_spec():
  lr = losses.cosine_schedule()  # 1e-3 -> 1.25e-6 over 50k steps, then held
  np.testing.assert_allclose(lr(0), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(lr(25_000), (1e-3 + 1.25e-6) / 2, rtol=1e-5)
  np.testing.assert_allclose(lr(50_000), 1.25e-6, rtol=1e-4)
  np.testing.assert_allclose(lr(100_000), 1.25e-6, rtol=1e-4)
  periodic = losses.cosine_schedule(periodic=True)  # torch CosineAnnealingLR past T_max
  for t in (0, 12_345, 50_000):
    np.testing.assert_allclose(periodic(t), lr(t), rtol=1e-4)
  np.testing.assert_allclose(periodic(75_000), (1e-3 + 1.25e-6) / 2, rtol=1e-5)
  np.testing.assert_allclose(periodic(100_000), 1e-3, rtol=1e-5)
  # Adam's first update is -lr * sign(g): both optimizers start at 1e-3.
  vae_tx, disc_tx = losses.build_optimizers()
  for tx in (vae_tx, disc_tx):
    p = {"w": jnp.ones(3)}
    upd, _ = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, tx.init(p), p)
    np.testing.assert_allclose(upd["w"], [-1e-3, 1e-3, -1e-3], rtol=1e-4)
  assert losses.reference_setup("factorqvae") == losses.ReferenceSetup(
      512, 50_000, 50_000, 2e-5, 0.0)
  assert losses.reference_setup("qlae").weight_decay == 0.1


# ----------------------------------------------------------------------------------------
# End to end: the trainer's FactorQVAE step (half-batch split, two optimizers).
# ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["factorqvae"])
def test_two_optimizer_train_steps_reduce_reconstruction_loss(variant):
  model, params = _init(variant)
  disc = tcd.TCDiscriminator(hidden=32)
  batch = _images(16, seed=1)  # two halves of 8
  z_shape = (1, D, K) if variant == "factorqvae" else (1, D)
  disc_params = disc.init(_key(2), jnp.zeros(z_shape))["params"]
  # 3x the paper's rate, so that a few steps on a tiny model show the trend.
  vae_tx, disc_tx = losses.build_optimizers(learning_rate=3e-3, disc_learning_rate=3e-3,
                                            decay_steps=100, disc_decay_steps=100)
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
      opt_state=vae_tx.init(params), disc_params=disc_params, disc_stats={},
      disc_opt_state=disc_tx.init(disc_params), history=jnp.zeros((1, 1)))
  config = config_lib.factorqvae_config(config_lib.base_config())
  config.factorqvae.update(variant=variant, beta=1e-3, gamma=1e-2,
                           tau_rate=losses.reference_tau_rate(variant))
  batch = {"image": batch * 255.0}  # the trainer's input convention, [0, 255]
  step = jax.jit(functools.partial(train_factorqvae.train_step, model=model, disc=disc,
                                   tx=vae_tx, disc_tx=disc_tx, config=config))
  # LLVM optimisation level 0 halves the CPU compile time; the step runs fast regardless.
  step = step.lower(state, batch).compile({"xla_backend_optimization_level": 0})

  first, mse, d_losses = state, [], []
  for _ in range(25):
    state, metrics = step(state, batch)
    mse.append(float(metrics["mse"]))
    d_losses.append(float(metrics["disc_loss"]))
    assert np.isfinite(float(metrics["tc"]))
  assert np.mean(mse[-3:]) < 0.75 * np.mean(mse[:3]), mse
  assert np.all(np.isfinite(d_losses)) and abs(d_losses[0] - math.log(2)) < 0.05
  # Both optimizers moved their own parameters.
  changed = lambda a, b: any(bool(jnp.any(u != v)) for u, v in
                             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(first.params, state.params)
  assert changed(first.disc_params, state.disc_params)
  np.testing.assert_allclose(metrics["tau"], math.exp(-24 * 2e-5), rtol=1e-6)


def test_dci_latents_are_codes_or_their_codebook_values():
  # eval.dci_code_values: the trees read the raw indices (reference) or the scalars.
  model, params = _init("factorqvae")
  batch = {"image": _images(4) * 255.0}
  codes = disentanglement_evaluator.latents_step(params, batch, model=model, family="factorqvae")
  values = disentanglement_evaluator.latents_step(params, batch, model=model, family="factorqvae",
                                code_values=True)
  assert codes.dtype == jnp.int32 and values.dtype == jnp.float32
  np.testing.assert_array_equal(values, params["codebook"][codes])


@pytest.mark.parametrize("variant", ["factorqvae", "betavae", "qlae"])
def test_traversal_sweeps_one_latent_per_row(variant):
  model, params = _init(variant)
  x = _images(2)
  rows = model.apply({"params": params}, x, num_steps=5, method="traverse")
  assert rows.shape == (D, 5, R, R, 3)
  # Each row's ends decode the latent at its range's ends, the others as encoded.
  if variant == "betavae":
    z = model.apply({"params": params}, x[:1], method="encode_codes")[0]
    lo = z - 3.0
  else:
    codes = model.apply({"params": params}, x[:1], method="encode_codes")
    z = model.apply({"params": params}, codes, method="codebook_values")[0]
    lo = params["codebook"].min(axis=-1 if variant == "qlae" else None) * jnp.ones(D)
  for i in (0, D - 1):
    np.testing.assert_allclose(
        rows[i, 0], model.apply({"params": params}, z.at[i].set(lo[i])[None],
                                method="decode")[0], atol=1e-5)

"""The full training objective inside the train step: adaptive GAN weight, GAN phases, EMA,
the k-means codebook init from the rolling history, bf16, and the train-state round trip."""

import functools

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import SHARES_TINY_STEPS
from conftest import FAST_COMPILE
from conftest import jit_fast
from pivq_jax import checkpoints
from pivq_jax import config_checks
from pivq_jax import config_lib
from pivq_jax import experiment
from pivq_jax import runner
from pivq_jax import sharding as sharding_lib
from pivq_jax import train_state
from pivq_jax.modes import train_pivq
from pivq_jax.quantizers import codebook_init
from pivq_jax.data import pipeline
from pivq_jax.losses import adversarial
from pivq_jax.losses import diffaug
from pivq_jax.losses import lpips


def _setup(config):
  config_checks.check_config(config, num_devices=jax.device_count())  # as runner.run does
  mesh = experiment.make_mesh(config)
  modules = train_state.build_modules(config)
  model, disc, tx = modules.model, modules.disc, modules.tx
  with jax.set_mesh(mesh):  # as in runner.run, so the tiny run's compiled init is reused
    state, shardings = train_state.create_train_state(config, modules, mesh)
  source = pipeline.make_source(config.data, "train")
  # Images only, as the loop feeds them (modes/loop.py): any other batch structure would
  # trace and compile the step again.
  batch = {"image": next(pipeline.train_batches(source, local_batch=config.batch_size,
                                                seed=0))["image"]}
  lp = lpips.load_lpips_params(config.loss.lpips_net)

  def step(q, a, fast=False):
    """The loop's own compiled step (the tiny run on this worker compiled it already); it
    donates the state and the tests reuse theirs, so each call gets a copy. fast: a config
    no other test runs, compiled for this test alone with conftest.FAST_COMPILE."""
    f = train_pivq.jit_train_step(config, modules, shardings, mesh, quantize=q,
                                  adversarial_on=a)

    def call(s, b, l):  # the arguments placed and traced as in runner.run
      with jax.set_mesh(mesh):
        args = (jax.tree.map(jnp.copy, s),
                sharding_lib.global_batch(b, sharding_lib.batch_sharding(mesh)),
                jax.device_put(l, sharding_lib.replicated(mesh)))
        if fast:
          return f.lower(*args).compile(FAST_COMPILE)(*args)
        out = f(*args)
      # One compiled signature: the tiny run's, or this call's when the test runs alone.
      assert f._cache_size() == 1  # pylint: disable=protected-access
      return out
    return call

  return model, disc, state, shardings, batch, lp, step


def _trees_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@SHARES_TINY_STEPS
def test_step_adaptive_weight_equals_direct_autodiff_through_the_model(tiny):
  model, disc, state, _, batch, lp, step = _setup(tiny)
  # A steeper D output makes ||dL_G/dW|| large, so the ratio is below the clamp at 1 and
  # the comparison is sensitive to it.
  disc_params = jax.tree.map(lambda v: v, state.disc_params)
  disc_params["Conv_4"]["kernel"] = disc_params["Conv_4"]["kernel"] * 30.0
  state = state.replace(disc_params=disc_params)
  _, metrics = step(True, True)(state, batch, lp)
  # Recompute UT's weight the slow way: autograd of nll and G loss w.r.t. the kernel.
  x = batch["image"].astype(jnp.float32) / 255.0
  k_fake = jax.random.split(jax.random.fold_in(jax.random.key(tiny.seed), 0), 3)[0]

  def x_hat_with(kernel):
    params = jax.tree.map(lambda v: v, state.params)
    params["decoder_trunk"]["conv_out"]["kernel"] = kernel
    return model.apply({"params": params}, x, quantize=True)[0]

  def nll(kernel):
    x_hat = x_hat_with(kernel)
    return jnp.mean(jnp.abs(x - x_hat)) + jnp.mean(lpips.lpips_distance(
        lp, x_hat, x, net=tiny.loss.lpips_net, ut_unscaled_input=True))

  def g(kernel):
    fake = diffaug.diff_augment(x_hat_with(kernel), k_fake)
    logits, _ = disc.apply({"params": state.disc_params, "batch_stats": state.disc_stats},
                           fake, mutable=["batch_stats"])
    return adversarial.hinge_g_loss(logits)

  kernel = state.params["decoder_trunk"]["conv_out"]["kernel"]
  # One jit for the reference (op-by-op autodiff through LPIPS compiles every op apart).
  nll_value, w = jit_fast(lambda k: (nll(k), adversarial.adaptive_weight(
      jax.grad(nll)(k), jax.grad(g)(k))))(kernel)
  assert 0.01 < float(w) < 0.99
  assert float(metrics["adaptive_weight"]) == pytest.approx(
      tiny.loss.adversarial_weight * float(w), rel=1e-3)
  assert float(metrics["nll"]) == pytest.approx(float(nll_value), rel=1e-5)


@pytest.mark.slow
def test_l2_weight_adds_a_squared_error_term_to_the_nll(tiny):
  tiny.loss.update(l1_weight=0.0, lpips_weight=0.0, l2_weight=2.0)
  model, _, state, _, batch, lp, step = _setup(tiny)
  _, metrics = step(False, False, fast=True)(state, batch, lp)
  x = batch["image"].astype(jnp.float32) / 255.0
  x_hat = jit_fast(lambda p: model.apply({"params": p}, x, quantize=False)[0])(state.params)
  assert float(metrics["nll"]) == pytest.approx(2.0 * float(jnp.mean((x - x_hat) ** 2)),
                                                rel=1e-5)
  assert float(metrics["l1"]) > 0  # still reported, at weight 0


@pytest.mark.slow
@SHARES_TINY_STEPS
def test_gan_terms_switch_on_only_from_the_start_step(tiny):
  _, _, state, _, batch, lp, step = _setup(tiny)
  off_state, off = step(True, False)(state, batch, lp)
  on_state, on = step(True, True)(state, batch, lp)
  assert "g_loss" not in off and "d_loss" in on
  assert _trees_equal(off_state.disc_params, state.disc_params)  # D not trained before
  assert _trees_equal(off_state.disc_opt_state, state.disc_opt_state)
  assert not _trees_equal(on_state.disc_params, state.disc_params)
  assert not _trees_equal(on_state.disc_stats, state.disc_stats)
  # Same nll; the G update differs only by the adversarial term.
  assert float(on["nll"]) == pytest.approx(float(off["nll"]), rel=1e-6)
  assert float(on["loss"]) != pytest.approx(float(off["loss"]), rel=1e-6)
  assert not _trees_equal(on_state.params, off_state.params)


@pytest.mark.slow
@SHARES_TINY_STEPS
def test_run_switches_phases_by_step(tiny, tmp_path):
  tiny.num_train_steps = 5
  tiny.loss.disc_start_step = 4
  tiny.checkpoint_every = 2
  runner.run(tiny, str(tmp_path / "a"))

  with ocp.CheckpointManager(epath.Path(tmp_path / "a") / "checkpoints") as mngr:
    at2, at4, at5 = (mngr.restore(s) for s in (2, 4, 5))
  assert _trees_equal(at2["disc_params"], at4["disc_params"])  # no D update before step 4
  assert not _trees_equal(at4["disc_params"], at5["disc_params"])


@pytest.mark.slow
@SHARES_TINY_STEPS
def test_ema_is_a_decayed_average_every_n_steps(tiny):
  decay, every = tiny.ema.decay, tiny.ema.every  # the tiny run's own step: 0.99 every 2
  assert every == 2
  _, _, state, _, batch, lp, step = _setup(tiny)
  f = step(False, False)
  init = jax.tree.map(np.asarray, state.params)
  s1, _ = f(state, batch, lp)
  assert _trees_equal(s1.ema_params, init)  # step 1 of every 2: no update
  s2, _ = f(s1, batch, lp)
  ema = lambda d: jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), init, s2.params)
  close = lambda a, b: all(np.allclose(x, y, rtol=1e-6, atol=1e-7)
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert close(s2.ema_params, ema(decay))
  # The bound tells the decay apart: neither no update nor another decay passes it.
  assert not close(s2.ema_params, init) and not close(s2.ema_params, ema(0.9))


def test_history_is_a_ring_of_the_last_w_steps():
  hist = jnp.zeros((3 * 4, 2))
  for step in range(5):
    z = jnp.full((1, 4, 2), float(step + 1))
    hist = codebook_init.push_history(hist, z, step, jax.random.key(0), per_step=4)
  # W = 3 slots of 4 rows: steps 3, 4 overwrote slots 0, 1; slot 2 holds step 2.
  np.testing.assert_array_equal(hist[:, 0], [4] * 4 + [5] * 4 + [3] * 4)
  sampled = codebook_init.push_history(jnp.zeros((2, 2)), jnp.arange(16.0).reshape(1, 8, 2), 0,
                                  jax.random.key(1), per_step=2)
  rows = {tuple(r) for r in np.asarray(sampled)}
  assert len(rows) == 2 and rows <= {(2 * i, 2 * i + 1) for i in range(8)}


def test_kmeans_centroids_lie_on_the_data_and_beat_random_init():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(16, 8)) * 5
  data = (centres[rng.integers(0, 16, 4000)] + 0.05 * rng.normal(size=(4000, 8)))
  data = jnp.asarray(data, jnp.float32)
  centroids, error, _ = jax.jit(functools.partial(codebook_init.fit_codebook, num_codes=16,
                                                  iters=10))(data, jax.random.key(0))
  # Every centroid sits on a cluster of the data, and every cluster gets one.
  d = np.linalg.norm(np.asarray(centroids)[:, None] - centres[None], axis=-1)
  assert d.min(axis=1).max() < 0.1
  assert sorted(d.argmin(axis=1).tolist()) == list(range(16))

  def distortion(codebook):
    return float(jnp.mean(jnp.min(jnp.sum((data[:, None] - codebook[None]) ** 2, -1), -1)))

  uniform = jax.random.uniform(jax.random.key(1), (16, 8), minval=-1 / 16, maxval=1 / 16)
  picked = data[jax.random.choice(jax.random.key(2), data.shape[0], (16,), replace=False)]
  assert distortion(centroids) < 0.01 * distortion(uniform)
  assert distortion(centroids) < distortion(picked)


@pytest.mark.slow
@SHARES_TINY_STEPS
def test_codebook_init_fits_the_history_and_logs_usage(tiny):
  _, _, state, _, batch, lp, step = _setup(tiny)
  f = step(False, False)
  for _ in range(3):
    state, _ = f(state, batch, lp)
  hist = np.asarray(state.history)

  def distortion(codebook):
    return float(np.min(((hist[:, None] - np.asarray(codebook)[None]) ** 2).sum(-1), -1).mean())

  new_state, metrics = codebook_init.init_codebook(
      state, num_codes=tiny.quantizer.num_codes, history_steps=tiny.codebook_init.history_steps,
      per_step=config_lib.history_latents_per_step(tiny),
      kmeans_iters=tiny.codebook_init.kmeans_iters, seed=tiny.seed)
  assert distortion(new_state.params["quantizer"]["codebook"]) < 0.5 * distortion(
      state.params["quantizer"]["codebook"])
  assert metrics["codebook/kmeans_distortion"] == pytest.approx(
      distortion(new_state.params["quantizer"]["codebook"]), rel=0.05)
  # Everything but the codebook is untouched.
  enc = lambda s: s.params["encoder_trunk"]
  assert _trees_equal(enc(state), enc(new_state))
  rows = 2 * tiny.batch_size * tiny.model.num_latents  # W=2 steps, all B*L latents
  assert metrics["codebook/history_latents"] == rows
  assert metrics["codebook/usage_before"] < metrics["codebook/usage_after"]
  assert metrics["codebook/usage_after"] <= tiny.quantizer.num_codes
  codebook = np.asarray(new_state.params["quantizer"]["codebook"])
  np.testing.assert_array_equal(codebook, new_state.ema_params["quantizer"]["codebook"])
  lo, hi = hist.min(axis=0), hist.max(axis=0)
  assert np.all(codebook >= lo - 1e-5) and np.all(codebook <= hi + 1e-5)  # on the data


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(tiny):
  tiny.model.dtype = "bfloat16"
  _, _, state, _, batch, lp, step = _setup(tiny)
  new, metrics = step(True, True, fast=True)(state, batch, lp)
  assert np.isfinite(float(metrics["loss"]))
  for tree in (new.params, new.ema_params, new.disc_params):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype("float32")}


@pytest.mark.slow
@SHARES_TINY_STEPS
def test_whole_train_state_round_trips_through_a_checkpoint(tiny, tmp_path):
  model, disc, state, shardings, batch, lp, step = _setup(tiny)
  state, _ = step(True, True)(state, batch, lp)  # every part of the state is non-trivial
  mngr = checkpoints.manager(str(tmp_path), keep=tiny.keep_checkpoints)

  mngr.save(1, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()
  mesh = experiment.make_mesh(tiny)
  with jax.set_mesh(mesh):  # the init compiled by _setup
    fresh, _ = train_state.create_train_state(tiny, train_state.build_modules(tiny), mesh)
  restored = checkpoints.restore_or_keep(mngr, fresh, shardings)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for name in ("step", "params", "ema_params", "opt_state", "disc_params", "disc_stats",
               "disc_opt_state", "history"):
    assert _trees_equal(getattr(restored, name), getattr(state, name)), name
  assert not _trees_equal(fresh.disc_params, state.disc_params)


@pytest.mark.slow
@SHARES_TINY_STEPS
def test_init_compiled_at_o1_on_cpu_gives_the_default_compiles_bits(tiny):
  """create_train_state compiles the init with LLVM -O1 on a CPU to save compile time; the
  params, EMA, optimizer and D states must be bit for bit those of a default compile."""
  _, _, state, shardings, _, _, _ = _setup(tiny)
  init, _, _ = train_state.abstract_train_state(tiny, train_state.build_modules(tiny),
                                                experiment.make_mesh(tiny))
  reference = jax.jit(init, out_shardings=shardings)(jax.random.key(tiny.seed))
  assert jax.tree.structure(reference) == jax.tree.structure(state)
  assert _trees_equal(reference, state)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_a_non_finite_value_in_any_leaf(bad, grouped):
  """The divergence check (the step's leaf by leaf; a restore's small leaves in
  concatenated groups of 64, big ones alone): a bad value in any leaf or group, of any
  float dtype or a scalar, is found, and integer leaves are not checked."""
  all_finite = train_state.all_finite_grouped if grouped else train_state.all_finite
  rng = np.random.default_rng(0)
  tree = {f"w{i:03d}": rng.normal(size=(i % 5 + 1, 3)).astype(np.float32)
          for i in range(150)}
  tree.update(half=np.ones((4,), jnp.bfloat16), scalar=np.float32(2.0),
              count=np.int32(-(2 ** 31)), big=np.zeros((300_000,), np.float32))  # > 1 MiB
  more = {"more": np.zeros((2,), np.float32)}
  check = jax.jit(all_finite)
  assert bool(check(tree, more))
  for name in ("w000", "w077", "w149", "half", "scalar", "big"):
    broken = dict(tree)
    leaf = np.array(tree[name])
    leaf.reshape(-1)[-1] = bad
    broken[name] = leaf.reshape(np.shape(tree[name]))
    assert not bool(check(broken, more)), name

"""Configs carry the paper's numbers, and bad configs fail in one sentence before compiling."""

import os
import time

import jax
import pytest

from conftest import load_config
from pivq_jax import config_checks
from pivq_jax import config_lib
from pivq_jax import runner
from pivq_jax import train_state

CONFIGS = ("faces", "celeba64", "celebahq", "ffhq")


def _one_sentence(message: str) -> None:
  assert "\n" not in message and message.endswith("."), message


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_configs_load_validate_and_build(name, arg):
  c = load_config(name, arg)
  config_checks.check_config(c, num_devices=1)
  model = train_state.build_model(c)
  r = c.data.resolution
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, r, r, 3),
                                                                           "float32"))
  assert shapes["params"]["quantizer"]["codebook"].shape == (c.quantizer.num_codes,
                                                             c.model.emb_dim)


def test_paper_hyperparameters():
  hq, ffhq, c64 = (load_config(n) for n in ("celebahq", "ffhq", "celeba64"))
  for c in (hq, ffhq, c64):  # the paper's batch per device; on one device, the paper's
    config_checks.check_config(c, num_devices=1)
  for c in (hq, ffhq):
    assert (c.data.resolution, c.model.num_latents, c.quantizer.num_codes) == (256, 512, 4096)
    assert (c.model.emb_dim, c.model.tfm_mlp_dim, c.model.tfm_layers) == (256, 1024, 4)
    assert (c.batch_size, c.num_train_steps) == (4, 1_400_000)
    assert (c.loss.disc_start_step, c.codebook_init.start_step) == (500_000, 60_000)
    assert config_lib.learning_rate(c) == pytest.approx(4.5e-6 * 4)
    assert (c.ema.decay, c.ema.every) == (0.995, 10)
  assert (c64.data.resolution, c64.model.emb_dim, c64.model.tfm_mlp_dim) == (64, 128, 512)
  assert (c64.batch_size, c64.num_train_steps) == (16, 400_000)
  assert (c64.loss.disc_start_step, c64.codebook_init.start_step) == (100_000, 25_000)
  for c in (hq, ffhq, c64):
    # The full objective (spec §3): L1 + LPIPS-VGG (weight 1) + PatchGAN with UT's
    # adaptive weight, DiffAug colour + translation at 0.125, Adam (0.9, 0.999).
    assert (c.loss.l1_weight, c.loss.lpips_weight, c.loss.lpips_net) == (1.0, 1.0, "vgg16")
    assert c.loss.lpips_ut_input and c.loss.adversarial_weight == 1.0
    assert (c.disc.ndf, c.disc.n_layers, c.disc.diffaug) == (64, 3, "color,translation")
    assert c.disc.translation_ratio == 0.125
    assert (c.optim.b1, c.optim.b2, c.optim.warmup_steps) == (0.9, 0.999, 0)
    assert (c.ema.decay, c.ema.every) == (0.995, 10)
    assert len(c.codebook_init.reinit_steps) >= 2  # "more than once" (§3.7)
    assert min(c.codebook_init.reinit_steps) > c.codebook_init.start_step
  assert config_lib.learning_rate(c64) == pytest.approx(4.5e-6 * 16)
  assert hq.data.name == "celebahq" and ffhq.data.name == "image_folder"
  assert c64.data.name == "celeba"


@pytest.mark.parametrize("arg", [None, "long"])
def test_faces_passes_through_every_training_phase(arg):
  c = load_config("faces", arg)
  ci, steps = c.codebook_init, c.num_train_steps
  assert 0 < ci.start_step < min(ci.reinit_steps) < c.loss.disc_start_step < steps
  assert c.loss.lpips_weight > 0 and c.loss.adversarial_weight > 0
  config_checks.check_config(c, num_devices=1)


def test_faces_long_is_the_default_trained_longer():
  base, long = load_config("faces"), load_config("faces", "long")
  assert long.num_train_steps >= 4 * base.num_train_steps
  for section in ("model", "quantizer", "optim", "data"):  # same model, data and recipe
    assert long[section].to_dict() == base[section].to_dict(), section


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="runlocal"):
    load_config("faces", "huge")


def _check(c, devices=1):
  with pytest.raises(config_lib.ConfigError) as e:
    config_checks.check_config(c, num_devices=devices)
  _one_sentence(str(e.value))
  return str(e.value)


def test_l_greater_than_k_with_matching(tiny):
  tiny.quantizer.assignment = "matching"
  tiny.model.num_latents, tiny.quantizer.num_codes = 32, 16
  assert "L <= K" in _check(tiny)
  tiny.quantizer.assignment = "nearest"  # nearest may repeat codes: L > K is fine
  config_checks.check_config(tiny, num_devices=1)


def test_resolution_not_divisible_by_downsampling(tiny):
  tiny.data.resolution = 50  # factor 4 for ch_mult (1, 2, 2)
  assert "down-sampling factor 4" in _check(tiny)


def test_batch_not_divisible_by_devices(tiny):
  tiny.batch_size = 6
  assert "does not split over the mesh's 4 data x fsdp devices" in _check(tiny, devices=4)
  # The model axis holds copies of the same rows: 6 splits over data=2 x model=3.
  tiny.mesh.update(data=-1, model=3)
  config_checks.check_config(tiny, num_devices=6)  # no error


@pytest.mark.parametrize("mesh, expected", [
    (dict(data=3), "has 3 devices but there are 4"),
    (dict(fsdp=3), "do not split into mesh.fsdp=3"),
    (dict(model=0), "sizes must be positive"),
])
def test_mesh_that_does_not_fit_the_devices(tiny, mesh, expected):
  tiny.mesh.update(mesh)
  assert expected in _check(tiny, devices=4)


@pytest.mark.parametrize("data, expected", [
    (dict(name="imagenet"), "Unknown dataset name"),
    (dict(name="image_folder", data_dir="/no/such/dir"), "does not exist"),
    (dict(name="celeba", data_dir=None), "data_dir"),
])
def test_data_errors_come_before_compiling(tiny, tmp_path, monkeypatch, data, expected):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  tiny.data.update(data)
  start = time.time()
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    runner.run(tiny, str(tmp_path / "w"))
  assert expected in str(e.value)
  _one_sentence(str(e.value))
  assert time.time() - start < 5  # nothing compiled
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_config_errors_come_before_compiling_in_run(tiny, tmp_path):
  tiny.data.resolution = 50
  with pytest.raises(config_lib.ConfigError):
    runner.run(tiny, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_too_few_latents_for_the_codebook_kmeans(tiny):
  tiny.codebook_init.history_steps = 1
  tiny.quantizer.num_codes = 64  # 1 step x 4 images x 8 latents = 32 < 64
  assert "fewer than the K=64 codes" in _check(tiny)


@pytest.mark.parametrize("field, value, expected", [
    ("loss.lpips_net", "vgg19", "loss.lpips_net is 'vgg19'"),
    ("eval.lpips_net", "squeeze", "eval.lpips_net is 'squeeze'"),
    ("disc.diffaug", "color,cutout", "disc.diffaug is 'color,cutout'"),
    ("model.trunk_init", "kaiming", "model.trunk_init is 'kaiming'"),
])
def test_objective_fields_are_checked(tiny, field, value, expected):
  section, name = field.split(".")
  tiny[section][name] = value
  assert expected in _check(tiny)


# ----------------------------------------------------------------------------------------
# Config -> module wiring (train_state.module_fields): every field a user may set reaches
# the module under its own name.
# ----------------------------------------------------------------------------------------
def _fields(cls):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def test_every_module_field_has_a_config_field():
  # pylint: disable=g-import-not-at-top
  from pivq_jax.models import autoencoder, discriminator, factorqvae
  from pivq_jax.quantizers import vq
  # pylint: enable=g-import-not-at-top
  c = config_lib.factorqvae_config(config_lib.base_config())
  # Fields set from elsewhere: the data's resolution, the compute dtype, the sub-module.
  derived = {"resolution", "dtype", "quantizer", "dim"}
  for cls, section in ((autoencoder.PIVQAutoencoder, c.model),
                       (vq.VectorQuantizer, c.quantizer),
                       (discriminator.PatchDiscriminator, c.disc),
                       (factorqvae.FactorQVAE, c.factorqvae)):
    missing = _fields(cls) - derived - set(section.keys())
    assert not missing, (cls.__name__, missing)


@pytest.mark.parametrize("field, value", [
    ("residual_gain", 0.5), ("distance", "absolute"), ("straight_through", True),
    ("qlae_codebook_init", "normal"), ("image_offset", 0.0), ("hidden_dim", 64)])
def test_factorqvae_fields_reach_the_model(field, value):
  c = config_lib.factorqvae_config(config_lib.base_config())
  assert getattr(train_state.build_model(c), field) != value  # not already the default
  c.factorqvae[field] = value
  assert getattr(train_state.build_model(c), field) == value


@pytest.mark.parametrize("section, field, value", [
    ("model", "embed_std", 0.5), ("model", "output_pos_std", 1.0),
    ("model", "norm_groups", 8), ("model", "ch_mult", (1, 2)),
    ("model", "trunk_init", "torch"),
    ("quantizer", "beta", 0.5), ("quantizer", "solver", "sinkhorn"),
    ("quantizer", "auction_kernel", "xla"),
    ("disc", "n_layers", 2)])
def test_pivq_fields_reach_the_modules(section, field, value):
  c = config_lib.base_config()
  c[section][field] = value
  model = train_state.build_model(c)
  module = {"model": model, "quantizer": model.quantizer,
            "disc": train_state.build_discriminator(c)}[section]
  assert getattr(module, field) == value


@pytest.mark.parametrize("field", ["num_examples", "probe_examples", "dci_train_examples",
                                   "dci_test_examples", "num_real"])
def test_an_eval_subset_smaller_than_a_batch_is_refused_before_compiling(tiny, field):
  # On 4 devices the eval batches round up to 4; the tiny config's subsets hold them.
  # Before, such a subset stopped the first eval, after training had compiled.
  config_checks.check_config(tiny, num_devices=4)
  tiny.eval.feature_batch_size = 8
  tiny.eval[field] = 6  # above PRDC's nearest_k (3), below the batches (8)
  tiny.eval.batch_size = 8
  with pytest.raises(config_lib.ConfigError, match=f"eval.{field}=6 is fewer than one "
                     "global eval batch") as e:
    config_checks.check_config(tiny, num_devices=4)
  _one_sentence(str(e.value))
  if field != "num_examples":  # only the evaluators that read a subset check it
    tiny.eval.evaluators = ("reconstruction",)
    config_checks.check_config(tiny, num_devices=4)


def test_unknown_evaluator_is_a_config_error(tiny):
  tiny.eval.evaluators = ("reconstruction", "fidd")
  with pytest.raises(config_lib.ConfigError, match="fidd") as e:
    config_checks.check_config(tiny, num_devices=1)
  _one_sentence(str(e.value))


@pytest.mark.parametrize("devices, backend, expected", [
    ({"/dev/nvidia0"}, "cpu", "an NVIDIA GPU"), ({"/dev/accel0"}, "cpu", "a TPU"),
    ({"/dev/nvidia0"}, "gpu", None), (set(), "cpu", None)])
def test_an_unused_accelerator_is_named(devices, backend, expected):
  from pivq_jax import main  # pylint: disable=g-import-not-at-top
  assert main.unused_accelerator(backend, exists=devices.__contains__) == expected


# ----------------------------------------------------------------------------------------
# compile_cache: a config's key names exactly what its compiled steps read.
# ----------------------------------------------------------------------------------------
def _lowered_step(c) -> str:
  """The quantized + GAN step's program text, jitted here: through compile_cache, a config
  with the same key would get back the first config's function, and the test would prove
  nothing."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pivq_jax import sharding  # pylint: disable=g-import-not-at-top
  from pivq_jax.modes import train_pivq  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  modules = train_state.build_modules(c)
  _, abstract, _ = train_state.abstract_train_state(c, modules, mesh)
  r = c.data.resolution
  batch = {"image": jax.ShapeDtypeStruct((c.batch_size, r, r, 3), jnp.uint8)}
  step = functools.partial(train_pivq.train_step, model=modules.model, disc=modules.disc,
                           tx=modules.tx, disc_tx=modules.disc_tx, config=c, quantize=True,
                           adversarial_on=True)
  return jax.jit(step).lower(abstract, batch, None).as_text()


def test_phase_boundaries_share_the_compiled_step(tiny):
  """A sweep over T_q, the re-inits, k-means' iterations or the GAN's start reuses the
  compiled steps (compile_cache.key_of leaves them out): the steps must not read them."""
  from pivq_jax import compile_cache  # pylint: disable=g-import-not-at-top
  # Nearest (no host callback in the program text) and no LPIPS: the step stays small.
  tiny.quantizer.assignment = "nearest"
  tiny.loss.lpips_weight = 0.0
  moved = tiny.copy_and_resolve_references()
  moved.codebook_init.update(start_step=1, reinit_steps=(2, 4), kmeans_iters=7)
  moved.loss.disc_start_step = 1
  assert compile_cache.key_of(moved) == compile_cache.key_of(tiny)
  reference = _lowered_step(tiny)
  assert _lowered_step(moved) == reference
  # The comparison can fail: a field the step reads changes the key and the program.
  other = tiny.copy_and_resolve_references()
  other.loss.adversarial_weight = 0.5
  assert compile_cache.key_of(other) != compile_cache.key_of(tiny)
  assert _lowered_step(other) != reference

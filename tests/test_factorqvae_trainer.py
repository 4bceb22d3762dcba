"""FactorQVAE through the project's one trainer: training, resume, eval with DCI / InfoMEC,
and the configs (spec factorqvae.md)."""

import collections
import json
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from conftest import load_config
from pivq_jax import compile_cache
from pivq_jax import config_checks
from pivq_jax import config_lib
from pivq_jax import checkpoints
from pivq_jax import runner
from pivq_jax.evaluators import disentanglement as disentanglement_evaluator


def _tiny(variant="factorqvae"):
  c = load_config("factorqvae_faces", "runlocal")
  c.factorqvae.variant = variant
  c.eval.update(dci_train_examples=96, dci_test_examples=48)
  return c


@pytest.mark.slow
def test_train_resume_and_reproducible_eval(tmp_path):
  c = _tiny()
  workdir = str(tmp_path / "fq")
  c.num_train_steps = 2
  runner.run(c, workdir)
  c.num_train_steps = 4  # resumes from step 2
  results = runner.run(c, workdir)
  assert np.isfinite(results["train/loss"]) and "train/disc_loss" in results
  assert 0 < results["train/tau"] < 1
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    assert mngr.latest_step() == 4
    state = mngr.restore(4)
  assert state["disc_params"], "the TC discriminator is part of the checkpoint"

  evals = [runner.run(c, workdir, mode="eval") for _ in range(2)]
  for k in ("eval/l1", "eval/psnr", "eval/mse"):
    assert np.isfinite(evals[0][k])
  assert evals[0] == evals[1]  # the same seed gives the same numbers
  # The latent traversal: one row per latent, 8 steps each (2 px padding).
  r, d = c.data.resolution, c.factorqvae.latent_dim
  with Image.open(os.path.join(workdir, "images", "traversal_00000004.png")) as im:
    assert im.size == (8 * (r + 2) + 2, d * (r + 2) + 2)
  with pytest.raises(config_lib.ConfigError, match="FactorQVAE runs take"):
    runner.run(c, workdir, mode="export")


@pytest.mark.slow
def test_disentanglement_of_codes_that_track_the_factors(monkeypatch, tmp_path):
  c = _tiny("qvae")  # one optimizer, whole batch
  workdir = str(tmp_path / "q")
  runner.run(c, workdir)

  def fake_latents(params, batch, *, model, family, code_values):
    del params, model, family, code_values
    # A 4-step model's codes are constant; the corner pixel's colour is a stand-in code
    # that the background-hue factor (and lighting) sets.
    return batch["image"][:, 0, 0, :].astype(jnp.int32)

  monkeypatch.setattr(disentanglement_evaluator, "latents_step", fake_latents)
  # A fresh compile cache for this test: steps jitted before the swap are not reused.
  monkeypatch.setattr(compile_cache, "_cache", collections.OrderedDict())
  results = runner.run(c, workdir, mode="eval")
  for k in ("disentanglement", "completeness", "informativeness_train",
            "informativeness_test"):
    assert 0 <= results[f"eval/dci/{k}"] <= 1
  for k in ("infom", "infoe"):
    assert np.isfinite(results[f"eval/infomec/{k}"])
  # The importance / NMI picture (PNG and TensorBoard).
  assert os.path.getsize(os.path.join(workdir, "images", "disentanglement_00000004.png")) > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["betavae"])
def test_variants_train(variant, tmp_path):
  c = _tiny(variant)
  c.num_train_steps = 2
  c.eval_every = 1000
  results = runner.run(c, str(tmp_path / variant))
  assert np.isfinite(results["train/loss"])


def test_factorqvae_config_errors():
  c = _tiny()
  c.factorqvae.variant = "vqvae"
  with pytest.raises(config_lib.ConfigError, match="factorqvae.variant"):
    config_checks.check_config(c, num_devices=1)
  c = _tiny()
  c.data.resolution = 30
  with pytest.raises(config_lib.ConfigError, match="not divisible"):
    config_checks.check_config(c, num_devices=1)
  c = _tiny()
  c.batch_size = 6  # halves of 3 over 2 devices
  with pytest.raises(config_lib.ConfigError, match="does not split"):
    config_checks.check_config(c, num_devices=2)


def test_shapes3d_config_has_the_papers_hyperparameters():
  c = load_config("factorqvae_shapes3d")
  f = c.factorqvae
  assert (c.data.name, c.data.resolution, c.batch_size, c.num_train_steps) == (
      "shapes3d", 64, 512, 50_000)
  assert (f.latent_dim, f.num_values, f.beta, f.gamma, f.tau_rate) == (12, 64, 1e-3, 1e-4,
                                                                        2e-5)
  assert (f.learning_rate, f.end_learning_rate, f.decay_steps) == (1e-3, 1.25e-6, 50_000)
  assert (c.eval.dci_train_examples, c.eval.dci_test_examples) == (10_000, 5_000)
  config_checks.check_config(c, num_devices=8)


@pytest.mark.slow
def test_shapes3d_config_trains_on_mock_tfds(tmp_path):
  """factorqvae_shapes3d.py:runlocal through the real TFDS loader, offline (mock data)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top

  c = load_config("factorqvae_shapes3d", "runlocal")
  c.data.data_dir = str(tmp_path)
  with tfds.testing.mock_data(num_examples=80), mock.patch.object(
      tfds.core.DatasetBuilder, "is_prepared", lambda self: True):
    results = runner.run(c, str(tmp_path / "run"))
  assert np.isfinite(results["train/loss"]) and np.isfinite(results["eval/psnr"])


def test_workdirs_from_before_image_offset_resume_with_offset_zero(tmp_path):
  # Such workdirs were trained on [0, 1] inputs: they resume with image_offset=0 and
  # refuse the new default rather than silently change what the network sees.
  c = _tiny()
  checkpoints.check_workdir_config(tmp_path, c)
  path = tmp_path / "config.json"
  saved = json.loads(path.read_text())
  del saved["factorqvae"]["image_offset"]
  path.write_text(json.dumps(saved))
  with pytest.raises(config_lib.ConfigError, match="factorqvae.image_offset"):
    checkpoints.check_workdir_config(tmp_path, c, write=False)
  c.factorqvae.image_offset = 0.0
  checkpoints.check_workdir_config(tmp_path, c, write=False)

"""End-to-end training: outputs, exact resume, SIGKILL recovery, workdir identity."""

import json
import os
import signal
import subprocess
import sys
import time

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO
from conftest import SHARES_TINY_STEPS
from conftest import fid_weights
from conftest import subprocess_env
from pivq_jax import config_lib
from pivq_jax import runner
from pivq_jax import train_state
from pivq_jax.evaluators import generative as generative_evaluator
from pivq_jax.quantizers import matching_check
from pivq_jax.data import faces
from pivq_jax.evaluation import inception


def _restore_params(workdir):
  with ocp.CheckpointManager(epath.Path(workdir) / "checkpoints") as mngr:
    step = mngr.latest_step()
    return step, mngr.restore(step)["params"]


def test_train_writes_checkpoints_events_and_grids(tiny, trained_tiny_run):
  _, results, files = trained_tiny_run
  assert any(f.startswith("events.out.tfevents") for f in files[""])
  assert files["checkpoints"] == ["3", "6"]
  assert files["images"] == ["capacity_00000003.png", "capacity_00000006.png",
                             "recon_00000003.png", "recon_00000006.png"]
  for name in ("ema", "raw"):
    assert np.isfinite(results[f"eval/{name}/psnr"])
    assert 1 <= results[f"eval/{name}/distinct_codes_max"] <= tiny.model.num_latents
    assert 1 <= results[f"eval/{name}/codebook_usage"] <= tiny.quantizer.num_codes
    assert results[f"eval/{name}/capacity_bits_nearest"] > 0
  assert results["train/quantize"] == 1.0  # past T_q = 3


def test_resume_equals_uninterrupted_run(tiny, tmp_path, trained_tiny_run):
  straight_dir, straight, _ = trained_tiny_run  # the same config, uninterrupted
  # Same seed, stopped at step 3 (the codebook-init step), then resumed to 6.
  first = tiny.copy_and_resolve_references()
  first.num_train_steps = 3
  runner.run(first, str(tmp_path / "b"))
  resumed = runner.run(tiny, str(tmp_path / "b"))
  for k in ("train/loss", "train/l1", "train/vq_loss", "eval/ema/psnr", "eval/raw/l1"):
    assert resumed[k] == pytest.approx(straight[k], rel=1e-5, abs=1e-7), k
  step_a, params_a = _restore_params(straight_dir)
  step_b, params_b = _restore_params(tmp_path / "b")
  assert step_a == step_b == 6
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               params_a, params_b)


def test_rerun_of_a_finished_run_does_not_retrain(tiny, trained_copy, monkeypatch):
  _, before = _restore_params(trained_copy)
  # A resumed run restores into the abstract state: the init is never compiled nor run.
  monkeypatch.setattr(train_state, "create_train_state",
                      lambda *a, **k: pytest.fail("a resumed run initialised a state"))
  # The shared run traced this config's abstract state in this process already.
  monkeypatch.setattr(train_state, "abstract_train_state",
                      lambda *a, **k: pytest.fail("the abstract state was traced again"))
  results = runner.run(tiny, trained_copy)
  _, after = _restore_params(trained_copy)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert "eval/ema/psnr" in results


def test_workdir_with_another_config_is_refused(tiny, trained_copy):
  tiny.model.emb_dim = 64
  with pytest.raises(config_lib.ConfigError, match="different config") as e:
    runner.run(tiny, trained_copy)
  assert "\n" not in str(e.value)


def test_checkpoint_of_another_train_state_layout_is_refused(tiny, trained_copy,
                                                             monkeypatch):
  # Not a model field, so the workdir's identity holds, but the history buffer in the
  # train state has another shape: refused before any restore, and before compiling.
  tiny.codebook_init.history_steps = 3
  monkeypatch.setattr(train_state, "create_train_state",
                      lambda *a, **k: pytest.fail("the init compiled before the refusal"))
  with pytest.raises(config_lib.ConfigError, match="does not fit this config") as e:
    runner.run(tiny, trained_copy)
  assert "\n" not in str(e.value)


def test_sample_mode_writes_interpolation_samples(tiny, tmp_path, trained_tiny):
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    runner.run(tiny, str(tmp_path / "empty"), mode="sample")
  workdir = trained_tiny
  tiny.sample.update(num_images=10, batch_size=4, grid_images=3)  # a partial last batch
  results = runner.run(tiny, workdir, mode="sample")
  images = np.load(os.path.join(workdir, "samples", "00000006", "samples.npy"))
  codes = np.load(os.path.join(workdir, "samples", "00000006", "codes.npy"))
  assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
  assert codes.shape == (10, tiny.model.num_latents)
  assert all(len(set(c.tolist())) == tiny.model.num_latents for c in codes)
  assert results["sample/distinct_codes_min"] == tiny.model.num_latents
  assert os.path.exists(os.path.join(workdir, "images", "samples_00000006.png"))
  assert not any(f.endswith(".tmp") for f in os.listdir(os.path.join(workdir, "samples",
                                                                        "00000006")))
  tiny.quantizer.assignment = "nearest"
  with pytest.raises(config_lib.ConfigError, match="matching"):
    runner.run(tiny, str(tmp_path / "b"), mode="sample")


def test_cache_dir_matches_the_fid_weights_converter(tiny, monkeypatch):
  monkeypatch.delenv("PIVQ_JAX_CACHE", raising=False)
  weights = generative_evaluator.cache_dir(tiny) / "fid_inception" / inception.WEIGHTS_FILE
  assert str(weights) == str(inception.default_weights_path())
  monkeypatch.setenv("PIVQ_JAX_CACHE", "/somewhere")
  assert str(generative_evaluator.cache_dir(tiny)) == "/somewhere"
  tiny.eval.cache_dir = "/elsewhere"
  assert str(generative_evaluator.cache_dir(tiny)) == "/elsewhere"


def test_eval_mode_reports_generative_metrics_and_probes(tiny, tmp_path, trained_tiny):
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    runner.run(tiny, str(tmp_path / "empty"), mode="eval")
  tiny.eval.cache_dir = str(tmp_path / "cache")  # no weights there: a clear error
  with pytest.raises(FileNotFoundError, match="fid_inception_weights.py") as e:
    runner.run(tiny, trained_tiny, mode="eval")
  assert "\n" not in str(e.value)
  weights = fid_weights()  # shared cache; this run's real features go to its own
  os.makedirs(tmp_path / "cache" / "fid_inception")
  os.symlink(weights, tmp_path / "cache" / "fid_inception" / os.path.basename(weights))
  results = runner.run(tiny, trained_tiny, mode="eval")
  saved = json.loads((epath.Path(trained_tiny) / "eval_00000006.json").read_text())
  assert saved == pytest.approx(results)
  assert results["eval/generative/num_samples"] == 8
  assert results["eval/generative/fid"] > 0
  for k in ("precision", "recall", "density", "coverage"):
    assert results[f"eval/generative/{k}"] >= 0
  for name in faces.FACTOR_NAMES:
    assert 0 <= results[f"eval/probe/{name}/accuracy"] <= 1
    assert 0 < results[f"eval/probe/{name}/majority"] <= 1
  assert os.path.exists(os.path.join(trained_tiny, "images", "probing_00000006.png"))
  # DCI / InfoMEC on PI-VQ's code-presence bits (or skipped if a tiny run's codes are all
  # the same on every image, which the log says).
  if "eval/dci/disentanglement" in results:
    assert 0 <= results["eval/dci/disentanglement"] <= 1
  cached = os.listdir(tmp_path / "cache" / "real_features")
  assert any(f.startswith("faces_32px_train_8_") for f in cached)
  tiny.eval.evaluators = ("generative",)  # the one that reads the cache
  again = runner.run(tiny, trained_tiny, mode="eval")  # real features from cache
  assert again["eval/generative/fid"] == pytest.approx(results["eval/generative/fid"],
                                                       rel=1e-4)


def _main_cmd(workdir, *overrides):
  return [sys.executable, "-m", "pivq_jax.main", "--config=configs/faces.py",
          f"--workdir={workdir}", "--config.data.resolution=32",
          "--config.model.ch_mult=(1,2,2)", "--config.model.nf=32",
          "--config.model.res_blocks=1", "--config.model.emb_dim=32",
          "--config.model.num_latents=8", "--config.model.tfm_layers=1",
          "--config.model.tfm_heads=2", "--config.model.tfm_mlp_dim=64",
          "--config.quantizer.num_codes=16", "--config.batch_size=4",
          "--config.codebook_init.start_step=5", "--config.codebook_init.history_steps=2",
          "--config.codebook_init.latents_per_step=0", "--config.loss.lpips_net=alexnet",
          "--config.disc.ndf=8", "--config.eval_every=1000",
          # The test compares checkpoints: no eval at the end of a run.
          "--config.eval.evaluators=()",
          # Checkpoint mechanics, not matching: nearest has no host callback, so every
          # process after the first loads its steps from the persistent compilation cache.
          "--config.quantizer.assignment=nearest", *overrides]


def _events_files(workdir):
  return [f for f in os.listdir(workdir) if f.startswith("events.")] if workdir.exists() else []


@pytest.mark.slow
@pytest.mark.subprocesses
def test_sigkill_then_sigterm_resume_exactly(tmp_path):
  """Real signals to real training processes, one after the other: after a SIGKILL the
  same command resumes from the last complete checkpoint; on SIGTERM it saves the step it
  reached and exits 0; the same command again ends exactly where a run that was never
  interrupted ends."""
  workdir, straight = tmp_path / "run", tmp_path / "straight"
  ckpts = workdir / "checkpoints"
  # Nearest VQ has no host callback: the children after the first load every step from the
  # persistent compilation cache, so they take XLA's default (faster-running) code.
  env = subprocess_env(fast_compile=False)
  forever = "--config.num_train_steps=100000"

  # SIGKILL once two periodic checkpoints are complete.
  proc = subprocess.Popen(_main_cmd(workdir, forever, "--config.checkpoint_every=4"),
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline:
    done = [d for d in (os.listdir(ckpts) if ckpts.exists() else []) if d.isdigit()]
    if len(done) >= 2:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with ocp.CheckpointManager(ckpts) as mngr:
    last = mngr.latest_step()
  assert last is not None and last >= 8

  # The same command resumes from there; SIGTERM once the resumed process logs (its own
  # events file), with no periodic checkpoint due, so the save is the preemption's.
  proc = subprocess.Popen(
      _main_cmd(workdir, forever, "--config.checkpoint_every=1000", "--config.log_every=1"),
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and len(_events_files(workdir)) < 2:
    time.sleep(0.5)
  time.sleep(3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert f"Resuming from checkpoint step {last}" in err
  assert "Preempted: saved step" in err
  with ocp.CheckpointManager(ckpts) as mngr:
    stopped = mngr.latest_step()
  assert stopped is not None and stopped >= last

  # Resume a few steps past the stop, and compare with a run never interrupted.
  end = ["--config.checkpoint_every=1000", f"--config.num_train_steps={stopped + 3}"]
  for w in (workdir, straight):
    out = subprocess.run(_main_cmd(w, *end), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (f"Resuming from checkpoint step {stopped}" in out.stderr) == (w == workdir)
  step_a, params_a = _restore_params(workdir)
  step_b, params_b = _restore_params(straight)
  assert step_a == step_b == stopped + 3
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               params_a, params_b)


@pytest.mark.slow
@SHARES_TINY_STEPS
def test_relative_workdir(tiny, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tiny.num_train_steps = 3
  runner.run(tiny, "relative/run")
  assert (tmp_path / "relative" / "run" / "checkpoints" / "3").is_dir()


@pytest.mark.slow
# The exact solver's run is the unchanged tiny config's.
@pytest.mark.parametrize("solver", [
    pytest.param("hungarian", marks=SHARES_TINY_STEPS), "auction"])
def test_matching_run_validates_against_exact_hungarian(tiny, tmp_path, solver):
  tiny.quantizer.assignment = "matching"
  tiny.quantizer.solver = solver
  tiny.quantizer.validate_every = 2
  tiny.eval.evaluators = ("reconstruction",)  # the distinct-code counts come from it
  if solver == "auction":
    # The auction's step compiles slowly on a CPU: one quantized variant (no GAN phase)
    # is enough to validate it; the exact solver runs the whole tiny schedule.
    tiny.loss.adversarial_weight = 0.0
  results = runner.run(tiny, str(tmp_path / "m"))
  # Every image uses exactly L distinct codes once quantization is on.
  assert results["eval/ema/distinct_codes_max"] == tiny.model.num_latents
  assert results["eval/ema/distinct_codes_mean"] == tiny.model.num_latents


def test_invalid_assignment_stops_with_a_clear_message():
  def fake_check(params, batch):
    del params, batch
    return (np.array([[0, 1, 2], [3, 3, 4]]), np.array([1.0, 2.0]), np.array([1.0, 2.0]))

  with pytest.raises(RuntimeError, match="repeated or out-of-range codes for 50.0%") as e:
    matching_check.validate_matching(fake_check, None, None, num_codes=8)
  assert "\n" not in str(e.value)

  def good_check(params, batch):
    del params, batch
    return (np.array([[0, 1, 2]]), np.array([1.1]), np.array([1.0]))

  out = matching_check.validate_matching(good_check, None, None, num_codes=8)
  assert out["matching/valid_fraction"] == 1.0
  assert out["matching/optimality_gap"] == pytest.approx(0.1)


def test_readme_evaluator_example_is_one_file_and_one_config_entry(tiny, tmp_path,
                                                                    trained_tiny):
  """The README's "Extending" example, verbatim, as a new evaluator."""
  import pivq_jax.evaluators  # pylint: disable=g-import-not-at-top
  readme = open(os.path.join(REPO, "README.md")).read()
  code = readme.split("## Extending")[1].split("```python\n")[1].split("```")[0]
  (tmp_path / "code_entropy.py").write_text(code)
  pivq_jax.evaluators.__path__.append(str(tmp_path))
  try:
    tiny.eval.evaluators = ("reconstruction", "code_entropy")
    results = runner.run(tiny, trained_tiny, mode="eval")
  finally:
    pivq_jax.evaluators.__path__.remove(str(tmp_path))
    sys.modules.pop("pivq_jax.evaluators.code_entropy", None)
  # 8 codes per image out of 16: between log2(8) and log2(16) bits when codes vary.
  assert 0 < results["eval/code_entropy_bits"] <= 4
  assert "eval/ema/psnr" in results and not any("generative" in k for k in results)

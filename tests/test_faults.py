"""Fault injection: divergence, corrupt checkpoints, concurrent runs, bad workdirs and
settings. Each case must give its one sentence or recover, and lose no good checkpoint."""

import json
import os

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pivq_jax import checkpoints
from pivq_jax import config_checks
from pivq_jax import config_lib
from pivq_jax import runner
from pivq_jax.modes import export_codes
from pivq_jax.modes import loop

pytestmark = pytest.mark.faults


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))
                if p.isdigit())


def _all_finite(workdir, step):
  with ocp.CheckpointManager(epath.Path(workdir) / "checkpoints") as mngr:
    state = mngr.restore(step)
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


# -- divergence ----------------------------------------------------------------------------
def test_divergence_never_checkpoints_a_bad_state(tiny, trained_copy):
  # The case: good checkpoints, then a huge lr with checkpoint_every smaller than
  # log_every. Nothing non-finite may be saved, and the sentence names the last good one.
  tiny.num_train_steps = 14
  tiny.optim.learning_rate = 1e30
  tiny.loss.disc_start_step = 10_000  # no D: the cheaper step to compile; G diverges alone
  tiny.update(checkpoint_every=1, log_every=50, eval_every=50)
  with pytest.raises(loop.Diverged, match=r"Training diverged at step (\d+) .*the last "
                     r"good checkpoint is step (\d+) in .*lower --config.optim.learning_rate"
                     ) as e:
    runner.run(tiny, trained_copy)
  assert "\n" not in str(e.value)
  bad = int(str(e.value).split("step ")[1].split(" ")[0])
  steps = _steps(trained_copy)
  assert steps and max(steps) < bad
  assert f"checkpoint is step {max(steps)} " in str(e.value)
  assert all(_all_finite(trained_copy, s) for s in steps)
  assert not [p for p in os.listdir(os.path.join(trained_copy, "checkpoints"))
              if "tmp" in p]
  assert not os.path.exists(os.path.join(trained_copy, checkpoints.LOCK))  # released

  # The opt-in recovery: back to the last good checkpoint past the bad batches, a bounded
  # number of times (this lr diverges every time, so the retries run out).
  tiny.divergence.retries = 2
  with pytest.raises(loop.Diverged):
    runner.run(tiny, trained_copy)
  rollbacks = json.loads((epath.Path(trained_copy) / loop.ROLLBACKS).read_text())
  assert rollbacks["retries"] == 2 and rollbacks["data_offset"] >= 2
  assert all(_all_finite(trained_copy, s) for s in _steps(trained_copy))


# -- corrupt checkpoints -------------------------------------------------------------------
def _corrupt(workdir, step):
  """Truncates every array file of a checkpoint (a torn copy, a full disk)."""
  root = os.path.join(workdir, "checkpoints", str(step))
  for dirpath, _, files in os.walk(root):
    for f in files:
      if "metadata" not in f.lower():
        with open(os.path.join(dirpath, f), "r+b") as fh:
          fh.truncate(3)


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tiny, trained_copy, caplog):
  _corrupt(trained_copy, 6)
  results = runner.run(tiny, trained_copy)  # resumes from 3, trains to 6 again
  assert "eval/ema/psnr" in results
  assert "The checkpoint at step 6" in caplog.text and "falling back" in caplog.text
  assert os.path.isdir(os.path.join(trained_copy, "checkpoints", "6.unreadable"))  # kept
  assert _steps(trained_copy) == [3, 6] and _all_finite(trained_copy, 6)


def test_non_finite_latest_checkpoint_is_passed_over(tmp_path, caplog):
  # Restores check finiteness on device (in concatenated groups on one device).
  good = {f"w{i}": np.full((i + 1, 2), float(i), np.float32) for i in range(100)}
  good["count"] = np.int32(7)
  bad = dict(good, w42=np.array(good["w42"]))
  bad["w42"][-1, -1] = np.nan
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), good)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as mngr:
    checkpoints.save(mngr, 1, good)
    checkpoints.save(mngr, 2, bad)
    mngr.wait_until_finished()
    restored = checkpoints.restore_latest(mngr, abstract)
  assert "step 2" in caplog.text and "holds NaN or Inf" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, restored, good)


def test_no_readable_checkpoint_is_one_sentence(tiny, trained_copy):
  _corrupt(trained_copy, 3)
  _corrupt(trained_copy, 6)
  with pytest.raises(checkpoints.CheckpointError, match=r"None of the checkpoints in .* "
                     r"\(steps \[6, 3\]\) could be restored") as e:
    runner.run(tiny, trained_copy, mode="sample")
  assert "\n" not in str(e.value)
  assert os.path.isdir(os.path.join(trained_copy, "checkpoints", "6"))  # nothing deleted


# -- one writer per directory --------------------------------------------------------------
def test_second_run_is_refused_and_a_stale_lock_taken_over(tiny, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir / checkpoints.LOCK
  import socket  # pylint: disable=g-import-not-at-top
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
  with pytest.raises(checkpoints.WorkdirError, match=r"is in use by another run \(pid "
                     rf"{os.getppid()} on .*delete .*{checkpoints.LOCK} if that run is gone"):
    runner.run(tiny, str(workdir))
  assert not (workdir / "config.json").exists()
  # A lock whose process is dead is taken over, and released on exit.
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345}))
  with checkpoints.lock(workdir, "--workdir"):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert not lock.exists()
  # Another host's lock cannot be checked, so it is honoured.
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(checkpoints.WorkdirError, match="pid 1 on elsewhere"):
    with checkpoints.lock(workdir, "The export directory"):
      pass


# -- workdirs and failed starts --------------------------------------------------------------
def test_workdir_of_the_wrong_shape_is_one_sentence(tiny, tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "checkpoints").write_text("")
  with pytest.raises(checkpoints.WorkdirError, match="checkpoints exists but is not a "
                     "directory; move it away"):
    runner.run(tiny, str(tmp_path / "a"))
  (tmp_path / "b" / "config.json").mkdir(parents=True)
  with pytest.raises(checkpoints.WorkdirError, match="config.json exists but is not a "
                     "file"):
    runner.run(tiny, str(tmp_path / "b"), mode="eval")
  (tmp_path / "file").write_text("")
  with pytest.raises(checkpoints.WorkdirError, match=r"--workdir .*file/run is not "
                     r"writable \(.*\); fix its permissions"):
    checkpoints.check_writable(tmp_path / "file" / "run", "--workdir")


def test_failed_start_does_not_claim_the_workdir(tiny, tmp_path):
  tiny.quantizer.solver = "bogus"
  with pytest.raises(config_lib.ConfigError, match="quantizer.solver is 'bogus'; use one "
                     "of auction, hungarian, sinkhorn"):
    runner.run(tiny, str(tmp_path))
  assert not (tmp_path / "config.json").exists()
  tiny.quantizer.solver = "auction"
  tiny.quantizer.auction_kernel = "cuda"
  with pytest.raises(config_lib.ConfigError, match="quantizer.auction_kernel is 'cuda'; "
                     "use one of auto, xla, pallas"):
    runner.run(tiny, str(tmp_path))
  assert not (tmp_path / "config.json").exists()


def test_the_auction_kernel_is_not_part_of_a_workdirs_identity(tiny):
  """The fused and the pure-JAX auction give the same codes: switching between them (or
  a workdir written before the field existed) resumes; another solver does not."""
  saved = json.loads(tiny.to_json_best_effort())
  for changed, same in (({"auction_kernel": "pallas"}, True), ({"solver": "sinkhorn"}, False)):
    now = json.loads(tiny.to_json_best_effort())
    now["quantizer"].update(changed)
    assert (checkpoints.identity(saved) == checkpoints.identity(now)) == same
  del saved["quantizer"]["auction_kernel"]  # a workdir from before the field
  assert checkpoints.identity(saved) == checkpoints.identity(
      json.loads(tiny.to_json_best_effort()))


def test_export_and_eval_into_writable_directories_from_a_read_only_run(
    tiny, trained_copy, tmp_path, monkeypatch):
  real_access = os.access
  # Root ignores permission bits, so the read-only workdir is simulated.
  monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == trained_copy and (
      mode & os.W_OK) else real_access(p, mode))
  tiny.export.update(dir=str(tmp_path / "codes"), num_examples=8, batch_size=4,
                     shard_size=8)
  out = runner.run(tiny, trained_copy, mode="export")
  assert out["export/num_records"] == 8
  assert not any(f.startswith("events") for f in os.listdir(trained_copy))
  # Eval of the read-only run into a writable output_dir.
  tiny.output_dir = str(tmp_path / "out")
  tiny.eval.evaluators = ("reconstruction",)
  results = runner.run(tiny, trained_copy, mode="eval")
  saved = json.loads((tmp_path / "out" / "eval_00000006.json").read_text())
  assert saved["eval/ema/psnr"] == results["eval/ema/psnr"]
  assert (tmp_path / "out" / "images" / "recon_00000006.png").exists()
  assert sorted(os.listdir(trained_copy)) == ["checkpoints", "config.json"]


@pytest.mark.parametrize("mode", ["eval", "sample", "interpolate"])
def test_reading_modes_refuse_a_read_only_workdir_before_computing(
    tiny, trained_copy, monkeypatch, mode):
  # Root ignores permission bits: writes under the workdir are made to fail instead.
  real_write = epath.Path.write_text
  def write_text(self, *args, **kwargs):
    if str(self).startswith(trained_copy):
      raise PermissionError(13, "Permission denied")
    return real_write(self, *args, **kwargs)
  monkeypatch.setattr(epath.Path, "write_text", write_text)
  monkeypatch.setattr(checkpoints, "restore_latest", lambda *a, **k: pytest.fail("restored"))
  with pytest.raises(checkpoints.WorkdirError, match="not writable.*output_dir"):
    runner.run(tiny, trained_copy, mode=mode)


def test_params_fingerprint_tells_weights_apart():
  a = {"w": np.ones((2, 3), np.float32)}
  b = {"w": np.ones((2, 3), np.float32) * (1 + 1e-7)}
  assert export_codes.params_fingerprint(a) == export_codes.params_fingerprint(dict(a))
  assert export_codes.params_fingerprint(a) != export_codes.params_fingerprint(b)


# -- config ranges -------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, allowed", [
    ("optim.learning_rate", 0.0, "> 0"),
    ("optim.learning_rate", -1e-4, "> 0"),
    ("ema.decay", 1.0, ">= 0 and < 1"),
    ("ema.decay", -0.1, ">= 0 and < 1"),
    ("batch_size", -2, ">= 0"),
    ("checkpoint_every", 0, ">= 1"),
    ("keep_checkpoints", 0, ">= 1"),
    ("log_every", 0, ">= 1"),
    ("num_train_steps", 0, ">= 1"),
    ("optim.b1", 1.0, ">= 0 and < 1"),
    ("optim.b2", 1.5, ">= 0 and < 1"),
    ("disc.translation_ratio", 1.0, ">= 0 and < 1"),
    ("data.test_fraction", 0.0, "> 0 and < 1"),
    ("data.max_unreadable_fraction", 1.5, ">= 0 and <= 1"),
    ("quantizer.beta", -0.25, ">= 0"),
    ("loss.lpips_weight", -1.0, ">= 0"),
    ("model.embed_std", 0.0, "> 0"),
    ("eval.probe_folds", 1, ">= 2"),
    ("plan.utilization", 1.5, "> 0 and <= 1"),
])
def test_each_out_of_range_value_gets_its_sentence(tiny, field, value, allowed):
  section, _, leaf = field.rpartition(".")
  (tiny[section] if section else tiny)[leaf] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_checks.check_config(tiny, num_devices=1)
  assert str(e.value) == f"{field} is {value}; it must be {allowed}."


def test_quantizer_never_reached_but_codes_asked_for(tiny):
  tiny.codebook_init.start_step = tiny.num_train_steps + 1
  tiny.codebook_init.reinit_steps = ()
  with pytest.raises(config_lib.ConfigError, match="never quantizes, yet eval.evaluators "
                     "asks for code sets"):
    config_checks.check_config(tiny, num_devices=1)
  tiny.eval.evaluators = ("reconstruction",)
  config_checks.check_config(tiny, num_devices=1)  # an autoencoder-only study is fine

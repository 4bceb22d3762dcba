"""--mode=plan: an ahead-of-time compile from abstract inputs, and its estimates."""

import json

import jax
import pytest

from conftest import SHARES_TINY_STEPS
from pivq_jax import config_checks
from pivq_jax import config_lib
from pivq_jax.modes import plan
from pivq_jax import runner


@pytest.mark.slow
@SHARES_TINY_STEPS  # the plan's small batch is the tiny run's compiled last-phase step
def test_plan_compiles_without_allocating_and_scales_with_the_batch(tiny, tmp_path):
  tiny.num_train_steps = 1000
  before = len(jax.live_arrays())
  small = runner.run(tiny, str(tmp_path), mode="plan")
  # Abstract inputs only: no train state (hundreds of arrays) was put on the device.
  assert len(jax.live_arrays()) - before < 10
  assert json.loads((tmp_path / "plan.json").read_text())["global_batch"] == tiny.batch_size
  assert small["per_device_batch"] == tiny.batch_size
  assert small["memory_gib"]["total"] > small["memory_gib"]["arguments"] > 0
  assert set(small["estimates"]) == set(plan.ACCELERATORS)
  tiny.batch_size *= 4
  big = runner.run(tiny, str(tmp_path), mode="plan")
  # The autoencoder, LPIPS and D scale with the batch; the optimizer update does not.
  ratio = big["gflops_per_device_step"] / small["gflops_per_device_step"]
  assert 2.5 < ratio < 4.1
  assert big["memory_gib"]["temporaries"] > small["memory_gib"]["temporaries"]
  h100 = big["estimates"]["H100 SXM"]
  assert h100["days"] == pytest.approx(h100["step_ms"] / 1e3 * 1000 / 86400)


def test_roofline_picks_the_slower_bound():
  fast_math = plan.estimate(flops=1e12, bytes_accessed=1e3, steps=1, dtype="bfloat16",
                            utilization=0.5)["H100 SXM"]
  assert fast_math["step_ms"] == pytest.approx(1e3 * 1e12 / (989e12 * 0.5))
  memory_bound = plan.estimate(flops=1.0, bytes_accessed=3.35e12, steps=1, dtype="float32",
                               utilization=0.5)["H100 SXM"]
  assert memory_bound["step_ms"] == pytest.approx(1e3)


def test_unknown_tpu_slice_is_refused(tiny, tmp_path):
  tiny.plan.topology = "v9-8"
  with pytest.raises(config_lib.ConfigError, match="not a known TPU slice"):
    runner.run(tiny, str(tmp_path), mode="plan")


PAPER_CONFIGS = ("celeba64", "celebahq", "ffhq")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
@pytest.mark.parametrize("devices", [1, 4, 8, 32])
def test_paper_configs_fit_common_device_counts(name, devices):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  c = load_config(name)
  config_checks.check_config(c, num_devices=devices)
  per_device = 16 if name == "celeba64" else 4  # the paper's batch, on every device
  assert c.batch_size == per_device * devices
  assert config_lib.learning_rate(c) == pytest.approx(4.5e-6 * per_device * devices)
  c = load_config(name)
  c.batch_size = 256  # a global batch given directly wins, and the rate follows it
  config_checks.check_config(c, num_devices=devices)
  assert config_lib.learning_rate(c) == pytest.approx(1.152e-3)


_PLAN_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import load_config
from pivq_jax import runner
out = {{}}
for name, n in {plans!r}:
  c = load_config(name, "runlocal")
  c.plan.num_devices = n
  p = runner.run(c, sys.argv[1] + f"/{{name}}_{{n}}", mode="plan")
  out[f"{{name}}_{{n}}"] = [p["global_batch"], p["per_device_batch"], p["mesh"]["data"]]
print("PLANS " + json.dumps(out))
"""
# Each paper model compiles once, on one of the common device counts (an 8- and a 32-device
# mesh differ in the collectives' groups, not in the per-device program); the batch and rate
# arithmetic at 1, 4, 8 and 32 devices is test_paper_configs_fit_common_device_counts.
_PLANS = (("celeba64", 8), ("ffhq", 32))  # ffhq's model and step are celebahq's


@pytest.mark.slow
@pytest.mark.subprocesses
def test_paper_configs_plan_on_8_and_32_fake_devices(tmp_path):
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  env = subprocess_env(devices=32)
  script = _PLAN_SCRIPT.format(tests=os.path.join(REPO, "tests"), plans=_PLANS)
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  plans = json.loads(proc.stdout.split("PLANS ")[1])
  for name, n in _PLANS:
    assert plans[f"{name}_{n}"] == [2 * n, 2, n], (name, n)

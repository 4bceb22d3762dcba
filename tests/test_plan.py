"""--mode=plan: an ahead-of-time compile from abstract inputs, and its estimates."""

import json

import jax
import pytest

from pivq_jax import config_lib
from pivq_jax.modes import plan
from pivq_jax import runner


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

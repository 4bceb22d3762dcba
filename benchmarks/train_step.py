"""Train-step time and FLOP rate, side by side in one run, on the same batch.

  python benchmarks/train_step.py [--config=configs/faces.py] [--steps=20] [--out=step.json]

Variants of the given config: nearest vs matching (exact host Hungarian) quantization, each
before and after T_q. Prints ms/step, steps/s, XLA's FLOP count per step and the achieved
GFLOP/s, and the ratio of each variant to the first.
"""

import functools
import importlib.util
import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

from pivq_jax import trainer

_CONFIG = flags.DEFINE_string("config", "configs/faces.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")


def _load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def time_variant(config, batch, steps, *, quantized: bool):
  mesh = trainer.make_mesh(config)
  model, tx = trainer.build_model(config), trainer.build_optimizer(config)
  state, _ = trainer.create_train_state(model, tx, config, mesh)
  step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, config=config,
                                   quantize=quantized), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
  state, m = step(state, batch)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - start) / steps
  return {"ms_per_step": 1e3 * dt, "steps_per_s": 1 / dt, "gflops_per_step": flops / 1e9,
          "gflops_per_s": flops / 1e9 / dt}


def main(_):
  base = _load(_CONFIG.value)
  r = base.data.resolution
  rng = np.random.default_rng(0)
  batch = {"image": jax.numpy.asarray(rng.integers(0, 256, (base.batch_size, r, r, 3),
                                                   dtype=np.uint8))}
  rows = {}
  for assignment in ("nearest", "matching"):
    for quantized in (False, True):
      c = base.copy_and_resolve_references()
      c.quantizer.assignment = assignment
      c.quantizer.solver = "hungarian"
      rows[f"{assignment}/{'quantized' if quantized else 'pre-T_q'}"] = time_variant(
          c, batch, _STEPS.value, quantized=quantized)
  first = next(iter(rows.values()))["ms_per_step"]
  print(f"{jax.devices()[0].device_kind}, {_CONFIG.value}, batch {base.batch_size}")
  print(f"{'variant':28s} {'ms/step':>9s} {'steps/s':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
        f"{'ratio':>6s}")
  for name, row in rows.items():
    print(f"{name:28s} {row['ms_per_step']:9.1f} {row['steps_per_s']:8.2f} "
          f"{row['gflops_per_step']:8.2f} {row['gflops_per_s']:8.1f} "
          f"{row['ms_per_step'] / first:6.2f}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)

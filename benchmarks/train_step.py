"""Where a train step's time goes: autoencoder forward/backward, quantizer, LPIPS, GAN.

  python benchmarks/train_step.py [--configs=configs/faces.py,configs/celeba64.py]
      [--steps=10] [--out=step.json]

For each config, four cumulative variants of the real `train_pivq.train_step` run side by side
on the same random batch at the config's sizes:
  1. autoencoder forward/backward with the L1 loss only (quantizer off, as before T_q);
  2. + the quantizer (assignment, VQ losses, straight-through);
  3. + LPIPS (the config's net; forward on both images, backward through the fake);
  4. + the GAN terms: D on the augmented fake for G, the adaptive weight, and the D step.
Variants are timed in interleaved rounds and each keeps its best round. Each row prints
ms/step, XLA's FLOPs, and its increment over the row above, which is that
component's cost inside the fused step. For configs training with LPIPS-AlexNet (faces.py)
a fifth row swaps in the paper's VGG16.
"""

import functools
import importlib.util
import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

from pivq_jax import experiment
from pivq_jax import train_state
from pivq_jax.modes import train_pivq
from pivq_jax.losses import lpips

_CONFIGS = flags.DEFINE_list("configs", ["configs/faces.py", "configs/celeba64.py"],
                             "Config files.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds; the best counts.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")


def _load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def compile_variant(config, batch, *, quantize: bool, adversarial_on: bool):
  """-> (a function running n steps and returning seconds per step, XLA FLOPs per step)."""
  mesh = experiment.make_mesh(config)
  modules = train_state.build_modules(config)
  model, disc, tx = modules.model, modules.disc, modules.tx
  state, _ = train_state.create_train_state(config, modules, mesh)
  lp = lpips.load_lpips_params(config.loss.lpips_net) if config.loss.lpips_weight else None
  step = jax.jit(functools.partial(train_pivq.train_step, model=model, disc=disc, tx=tx,
                                   disc_tx=modules.disc_tx, config=config, quantize=quantize,
                                   adversarial_on=adversarial_on), donate_argnums=0)
  compiled = step.lower(state, batch, lp).compile()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
  holder = [state]

  def run(n):
    state, m = step(holder[0], batch, lp)  # not timed: waits for earlier work
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(n):
      state, m = step(state, batch, lp)
    jax.block_until_ready(m)
    holder[0] = state
    return (time.perf_counter() - start) / n

  return run, flops


def breakdown(path, steps):
  base = _load(path)
  r = base.data.resolution
  rng = np.random.default_rng(0)
  batch = {"image": jax.numpy.asarray(rng.integers(0, 256, (base.batch_size, r, r, 3),
                                                   dtype=np.uint8))}

  def variant(lpips_weight, lpips_net=None):
    c = base.copy_and_resolve_references()
    c.loss.lpips_weight = lpips_weight
    c.loss.lpips_net = lpips_net or base.loss.lpips_net
    c.loss.adversarial_weight = 1.0
    return c

  rows = {
      "1 AE fwd/bwd (L1)": (variant(0.0), False, False),
      "2 + quantizer": (variant(0.0), True, False),
      f"3 + LPIPS ({base.loss.lpips_net})": (variant(1.0), True, False),
      "4 + GAN (G term, D step)": (variant(1.0), True, True),
  }
  if base.loss.lpips_net != "vgg16":
    rows["5 = 4 with LPIPS vgg16"] = (variant(1.0, "vgg16"), True, True)
  compiled = {name: compile_variant(c, batch, quantize=q, adversarial_on=a)
              for name, (c, q, a) in rows.items()}
  # Interleaved rounds, best of each: a slow patch of the machine hits every variant alike.
  best = {name: float("inf") for name in rows}
  for _ in range(_ROUNDS.value):
    for name, (run, _) in compiled.items():
      best[name] = min(best[name], run(steps))
  out = {name: {"ms_per_step": 1e3 * best[name], "gflops_per_step": flops / 1e9}
         for name, (_, flops) in compiled.items()}
  print(f"\n{jax.devices()[0].device_kind}, {path}: batch {base.batch_size} at {r}px, "
        f"{base.quantizer.assignment} ({base.quantizer.solver}), L={base.model.num_latents}, "
        f"K={base.quantizer.num_codes}, D ndf={base.disc.ndf}")
  print(f"{'variant':28s} {'ms/step':>9s} {'GFLOP':>9s} {'+ms':>8s} {'share':>6s}")
  prev, total = 0.0, out["4 + GAN (G term, D step)"]["ms_per_step"]
  for name, row in out.items():
    inc = row["ms_per_step"] - (prev if not name.startswith("5") else 0.0)
    if name.startswith("5"):
      print(f"{name:28s} {row['ms_per_step']:9.1f} {row['gflops_per_step']:9.2f}")
    else:
      print(f"{name:28s} {row['ms_per_step']:9.1f} {row['gflops_per_step']:9.2f} "
            f"{inc:8.1f} {inc / total:6.0%}")
      prev = row["ms_per_step"]
  return out


def main(_):
  results = {path: breakdown(path, _STEPS.value) for path in _CONFIGS.value}
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)

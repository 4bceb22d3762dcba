"""The README's plan table: `--mode=plan` for the paper configs on a TPU v4-8 (compiled by
libtpu on this host, no TPU needed) at several per-device batches, with the roofline
estimates for 8 x H100 from the same per-device program.

  pip install 'jax[tpu]==0.10.2'   # the TPU compiler only
  python benchmarks/plan_table.py [--configs=celebahq,ffhq,celeba64] [--topology=v4-8]
      [--per_device=1,4,16] [--out=plan.json]

Data-parallel, the per-device program (and so its memory and FLOPs) depends on the
per-device batch, not on the number of devices: 8 x H100 at per-device batch b runs the
v4-8 program at b, with a global batch of 8b. Memory comes from the TPU compile; a GPU
compile of the same step differs by XLA's backend (buffer assignment, fusion).
"""

import importlib.util
import json

from absl import app
from absl import flags
import numpy as np

from pivq_jax.modes import plan

_CONFIGS = flags.DEFINE_list("configs", ["celebahq", "ffhq", "celeba64"], "configs/*.py")
_TOPOLOGY = flags.DEFINE_string("topology", "v4-8", "TPU slice to compile for.")
_PER_DEVICE = flags.DEFINE_list("per_device", ["1", "4", "16"], "Per-device batches.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")
# Sections that decide the train step; configs equal on these compile to one program.
_STEP_SECTIONS = ("model", "quantizer", "codebook_init", "loss", "disc", "optim", "ema",
                  "num_train_steps")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(_):
  rows, done = [], {}
  for name in _CONFIGS.value:
    c = _load(name)
    c.plan.topology = _TOPOLOGY.value
    images = c.num_train_steps * c.batch_size  # what the paper's schedule shows the model
    key = json.dumps({s: c[s].to_dict() if hasattr(c[s], "to_dict") else c[s]
                      for s in _STEP_SECTIONS} | {"r": c.data.resolution}, sort_keys=True)
    if key not in done:  # e.g. ffhq.py and celebahq.py: the same model and schedule
      done[key] = plan.per_device_batch_sweep(c, f"/tmp/plan_{name}", _PER_DEVICE.value)
    for p in done[key]:
      rows.append(dict(p, config=name, paper_images=images))
  # Days to show the model as many images as the paper's schedule does.
  print("\n| config | per-device batch | memory per device (fits v4 32 GiB / H100 80 GiB) | "
        "GFLOP per device-step | v4-8: global batch, ms/step, days | 8×H100: global batch, "
        "ms/step, days |")
  print("|---|---|---|---|---|---|")
  for p in rows:
    b, mem = p["per_device_batch"], p["memory_gib"]["total"]
    cells = []
    n_tpu = int(np.prod(list(p["mesh"].values())))  # the compiled slice's devices
    for acc, devices, hbm in (("TPU v4", n_tpu, 32), ("H100 SXM", 8, 80)):
      e = p["estimates"][acc]
      days = e["step_ms"] / 1e3 * p["paper_images"] / (devices * b) / 86400
      cells.append(f"{devices * b}, {e['step_ms']:.0f}, {days:.2f}")
    fits = " / ".join("yes" if mem <= hbm else "no" for hbm in (32, 80))
    print(f"| `{p['config']}.py` | {b} | {mem:.1f} GiB ({fits}) | "
          f"{p['gflops_per_device_step']:,.0f} | {cells[0]} | {cells[1]} |")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)

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

from pivq_jax import plan

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
    key = json.dumps({s: c[s].to_dict() if hasattr(c[s], "to_dict") else c[s]
                      for s in _STEP_SECTIONS} | {"r": c.data.resolution}, sort_keys=True)
    if key not in done:  # e.g. ffhq.py and celebahq.py: the same model and schedule
      done[key] = plan.per_device_batch_sweep(c, f"/tmp/plan_{name}", _PER_DEVICE.value)
    for p in done[key]:
      rows.append(dict(p, config=name))
  print(f"\n| config | per-device batch | global batch v4-8 / 8xH100 | memory per device "
        f"(GiB) | GFLOP per device-step | v4-8: ms/step, days | 8xH100: ms/step, days |")
  print("|---|---|---|---|---|---|---|")
  for p in rows:
    v4, h100 = p["estimates"]["TPU v4"], p["estimates"]["H100 SXM"]
    b = p["per_device_batch"]
    print(f"| {p['config']} | {b} | {p['global_batch']} / {8 * b} | "
          f"{p['memory_gib']['total']:.1f} | {p['gflops_per_device_step']:,.0f} | "
          f"{v4['step_ms']:.0f}, {v4['days']:.1f} | {h100['step_ms']:.0f}, "
          f"{h100['days']:.1f} |")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)

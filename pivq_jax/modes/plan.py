"""`--mode=plan`: compile the train step ahead of time for a config and mesh, with abstract
inputs only (no data, no parameters allocated), and report what a run would cost.

  python -m pivq_jax.main --config=configs/celebahq.py --workdir=/tmp/plan --mode=plan \
      --config.plan.topology=v4-8

- Target: a TPU slice compiled by libtpu on this host (`pip install 'jax[tpu]'`; no TPU
  needed), or "" for this host's devices (a GPU host; or a CPU with
  XLA_FLAGS=--xla_force_host_platform_device_count=N standing in for N devices).
- Memory per device from XLA's memory analysis of the compiled step; FLOPs and bytes per
  device from its cost analysis.
- Time: a roofline, max(FLOPs / (peak x plan.utilization), bytes / HBM bandwidth), for each
  accelerator in ACCELERATORS, and the days for config.num_train_steps. XLA counts a while
  loop's body once, so the matching auction's rounds are not in the FLOPs: time them with
  benchmarks/matching.py on the device.
"""

import dataclasses
import json

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp

from pivq_jax import config_checks
from pivq_jax import config_lib
from pivq_jax import experiment
from pivq_jax import sharding as sharding_lib
from pivq_jax import train_state
from pivq_jax.losses import lpips
from pivq_jax.modes import train_factorqvae
from pivq_jax.modes import train_pivq

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """Per-device peak numbers, from the vendors' data sheets (dense, no sparsity)."""
  bf16_flops: float
  # float32 matmuls at JAX's default precision: one bf16 pass on TPUs, TF32 on GPUs.
  f32_flops: float
  hbm_bytes: float
  hbm_bytes_per_s: float


ACCELERATORS = {
    "TPU v4": Accelerator(275e12, 275e12, 32 * GiB, 1.2e12),
    "TPU v5e": Accelerator(197e12, 197e12, 16 * GiB, 0.82e12),
    "TPU v5p": Accelerator(459e12, 459e12, 95 * GiB, 2.76e12),
    "A100 80GB": Accelerator(312e12, 156e12, 80 * GiB, 2.04e12),
    "H100 SXM": Accelerator(989e12, 495e12, 80 * GiB, 3.35e12),
}

# TPU slices libtpu can compile for from any host: name -> (topology, chip config, chips
# per host). v4 and v5p names count TensorCores (two per chip, one JAX device in megacore
# mode); v5e names count chips.
TPU_SLICES = {
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1)),
    "v4-16": ("v4:2x2x2", "megacore", (2, 2, 1)),
    "v4-32": ("v4:2x2x4", "megacore", (2, 2, 1)),
    "v5e-4": ("v5e:2x2", "default", (2, 2, 1)),
    "v5e-8": ("v5e:2x4", "default", (2, 4, 1)),
    "v5e-16": ("v5e:4x4", "default", (2, 2, 1)),
    "v5p-8": ("v5p:2x2x1", "megacore", (2, 2, 1)),
    "v5p-16": ("v5p:2x2x2", "megacore", (2, 2, 1)),
    "v5p-32": ("v5p:2x2x4", "megacore", (2, 2, 1)),
}


def target_devices(topology: str, num_devices: int = 0):
  """The devices to compile for: a TPU slice's (no TPU needed) or this host's."""
  if not topology:
    return jax.devices()[:num_devices or None]
  if topology not in TPU_SLICES:
    raise config_lib.ConfigError(f"plan.topology={topology!r} is not a known TPU slice; use "
                                 f"one of {', '.join(TPU_SLICES)} or '' for this host's "
                                 "devices.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name, chip_config, per_host = TPU_SLICES[topology]
  try:
    return topologies.get_topology_desc(
        topology_name=name, platform="tpu", chip_config_name=chip_config,
        chips_per_host_bounds=per_host, num_slices=1).devices
  except Exception as e:  # pylint: disable=broad-except
    raise config_lib.ConfigError(
        f"Could not load the TPU compiler for plan.topology={topology!r} ({e}); install it "
        f"with pip install 'jax[tpu]=={jax.__version__}' (no TPU needed).") from None


def compile_train_step(config, mesh, lpips_params=None):
  """The train step of the config's last phase, compiled for `mesh` from abstract inputs
  (`lpips_params`: the frozen LPIPS weights or their shapes, when the loss uses LPIPS)."""
  modules = train_state.build_modules(config)
  _, abstract, shardings = train_state.abstract_train_state(config, modules, mesh)
  r = config.data.resolution
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, r, r, 3), jnp.uint8,
                                         sharding=sharding_lib.batch_sharding(mesh))}
  if config.family == "factorqvae":
    step = train_factorqvae.jit_train_step(config, modules, shardings, mesh)
    return step.lower(abstract, batch).compile()
  step = train_pivq.jit_train_step(config, modules, shardings, mesh, quantize=True,
                                   adversarial_on=bool(config.loss.adversarial_weight))
  lp = None
  if config.loss.lpips_weight:  # frozen weights: their shapes only
    replicated = sharding_lib.replicated(mesh)
    lp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      lpips_params)
  return step.lower(abstract, batch, lp).compile()


def estimate(flops: float, bytes_accessed: float, steps: int, dtype: str,
             utilization: float) -> dict[str, dict[str, float]]:
  """Roofline step time and total days on each accelerator, from per-device counts."""
  out = {}
  for name, acc in ACCELERATORS.items():
    peak = acc.bf16_flops if dtype == "bfloat16" else acc.f32_flops
    seconds = max(flops / (peak * utilization), bytes_accessed / acc.hbm_bytes_per_s)
    out[name] = {"step_ms": 1e3 * seconds, "days": seconds * steps / 86400,
                 "hbm_gib": acc.hbm_bytes / GiB}
  return out


def run(config, workdir: str) -> dict:
  devices = target_devices(config.plan.topology, config.plan.num_devices)
  config_checks.check_config(config, num_devices=len(devices))
  mesh = experiment.make_mesh(config, devices=devices)
  # Read on this host, outside the target mesh (whose devices may not be attached here).
  lp = (lpips.load_lpips_params(config.loss.lpips_net)
        if config.family == "pivq" and config.loss.lpips_weight else None)
  with jax.set_mesh(mesh):
    compiled = compile_train_step(config, mesh, lp)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Donated state aliases its outputs: count it once.
  peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                + mem.generated_code_size_in_bytes)
  flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  per_device_batch = config.batch_size // sharding_lib.batch_size_per(mesh)
  plan = {
      "target": config.plan.topology or f"{len(devices)} x {devices[0].device_kind}",
      "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape),
      "global_batch": config.batch_size,
      "per_device_batch": per_device_batch,
      "memory_gib": {"total": peak_bytes / GiB,
                     "arguments": mem.argument_size_in_bytes / GiB,
                     "temporaries": mem.temp_size_in_bytes / GiB},
      "gflops_per_device_step": flops / 1e9,
      "gbytes_accessed_per_device_step": bytes_accessed / 1e9,
      "num_train_steps": config.num_train_steps,
      "utilization": config.plan.utilization,
      "estimates": estimate(flops, bytes_accessed, config.num_train_steps, config.model.dtype,
                            config.plan.utilization),
  }
  print(format_plan(plan), flush=True)
  if jax.process_index() == 0:
    path = epath.Path(workdir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2))
    logging.info("Plan written to %s", path)
  return plan


def format_plan(plan: dict) -> str:
  mem = plan["memory_gib"]
  lines = [
      f"Plan for {plan['target']} ({plan['device_kind']}), mesh {plan['mesh']}: global batch "
      f"{plan['global_batch']} ({plan['per_device_batch']} per device)",
      f"  memory per device: {mem['total']:.2f} GiB (arguments {mem['arguments']:.2f}, "
      f"temporaries {mem['temporaries']:.2f})",
      f"  per device and step: {plan['gflops_per_device_step']:.1f} GFLOP, "
      f"{plan['gbytes_accessed_per_device_step']:.1f} GB accessed",
      f"  {'accelerator':12s} {'fits':>5s} {'step ms':>9s} "
      f"{plan['num_train_steps']:>9,d}-step days  (at {plan['utilization']:.0%} of peak)",
  ]
  for name, e in plan["estimates"].items():
    fits = "yes" if mem["total"] <= e["hbm_gib"] else "NO"
    lines.append(f"  {name:12s} {fits:>5s} {e['step_ms']:9.1f} {e['days']:14.2f}")
  return "\n".join(lines)


def per_device_batch_sweep(config, workdir, per_device_batches) -> list[dict]:
  """The plan at several per-device batch sizes (README: what a larger batch would cost)."""
  out = []
  devices = target_devices(config.plan.topology, config.plan.num_devices)
  m = config.mesh
  data, fsdp, _ = sharding_lib.mesh_shape(m.data, m.fsdp, m.model, len(devices))
  for b in per_device_batches:
    c = config.copy_and_resolve_references()
    c.batch_size = int(b) * data * fsdp
    out.append(run(c, workdir))
  return out

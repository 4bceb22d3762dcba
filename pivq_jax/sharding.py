"""Devices, hosts and shardings: the mesh from config, parameter sharding rules, global
batches, per-example work on its own shard, and the multi-host runtime.

The mesh has three axes (big_vision / MaxText naming):
  data:  pure data parallelism; parameters are replicated along it.
  fsdp:  data parallelism whose parameters and optimizer state are split along it (each
         leaf on its largest divisible dimension) and gathered by XLA when used.
  model: parameters split on their last (output) dimension; XLA's SPMD partitioner inserts
         the collectives. A simple weight-stationary layout, not a tuned tensor parallelism.
Batches are split over data x fsdp. Sizes are config fields (mesh.data/fsdp/model);
-1 on data takes the devices left over.
"""

import os

from absl import logging
import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
import numpy as np

P = jax.sharding.PartitionSpec
AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
  """A mesh that does not fit the devices; one sentence, raised before compiling."""


def mesh_shape(data: int, fsdp: int, model: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves data=-1 and checks that data x fsdp x model uses exactly the devices."""
  if fsdp < 1 or model < 1 or data == 0 or data < -1:
    raise MeshError(f"mesh.data={data}, mesh.fsdp={fsdp}, mesh.model={model}: sizes must "
                    "be positive (data may be -1 for the devices left over).")
  if data == -1:
    if num_devices % (fsdp * model):
      raise MeshError(f"{num_devices} devices do not split into mesh.fsdp={fsdp} x "
                      f"mesh.model={model} groups; pick sizes whose product divides "
                      f"{num_devices}.")
    data = num_devices // (fsdp * model)
  if data > 1 and fsdp > 1 and model > 1:
    raise MeshError(f"The mesh data={data} x fsdp={fsdp} x model={model} splits all three "
                    "axes, which XLA (jax 0.10.2) partitions into wrong gradients; keep one "
                    "of them at 1 (e.g. fold data into fsdp).")
  if data * fsdp * model != num_devices:
    raise MeshError(f"The mesh data={data} x fsdp={fsdp} x model={model} has "
                    f"{data * fsdp * model} devices but there are {num_devices}; set "
                    "--config.mesh.data=-1 or sizes whose product is the device count.")
  return data, fsdp, model


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "model") mesh over `devices` (default: every device of every host).

  `mesh_utils` orders devices so that the inner axes (model, then fsdp) sit on the fastest
  links (TPU ICI neighbours; NVLink before the network across GPU hosts).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, model, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):  # CPU and unusual topologies
    grid = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(grid, AXES)


def batch_size_per(mesh: jax.sharding.Mesh) -> int:
  """How many ways a batch is split: data x fsdp."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], mesh, min_size: int = 2 ** 12) -> P:
  """The sharding rule for one parameter (or optimizer-state) leaf.

  model: the last dimension, when it divides. fsdp: the largest remaining dimension that
  divides. Leaves under `min_size` elements (biases, norms, scalars) stay replicated: the
  gathers would cost more than the memory saved.
  """
  spec = [None] * len(shape)
  if not shape or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P(*spec)
  n_model, n_fsdp = mesh.shape["model"], mesh.shape["fsdp"]
  if n_model > 1 and shape[-1] % n_model == 0:
    spec[-1] = "model"
  if n_fsdp > 1:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % n_fsdp == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*spec)


def tree_shardings(abstract_tree, mesh, min_size: int = 2 ** 12):
  """NamedShardings for every leaf of an abstract (or concrete) tree, by `param_spec`."""
  return jax.tree.map(
      lambda x: jax.sharding.NamedSharding(mesh, param_spec(tuple(x.shape), mesh, min_size)),
      abstract_tree)


def global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This host's rows -> one global array split over the mesh's batch axes.

  Hosts hold consecutive blocks of the global batch (see pipeline.train_batches), so the
  global batch is the same whatever the number of hosts.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def to_host(tree):
  """Device arrays -> numpy, whole: each host gets every row, also of arrays split across
  hosts (which `jax.device_get` cannot fetch)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def per_example(fn, x: jax.Array) -> jax.Array:
  """Runs `fn` on each device's own rows of `x` [B, ...] when a mesh is set.

  For work whose cost varies per example, like the matching solver's while loops: under
  plain SPMD partitioning every device would iterate until the slowest example in the
  whole global batch converged; here each device stops when its own examples do, and host
  callbacks (the exact Hungarian) receive each device's rows directly.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return fn(x)
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if ways == 1 or x.shape[0] % ways:
    return fn(x)
  return jax.shard_map(fn, in_specs=P(BATCH_AXES), out_specs=P(BATCH_AXES),
                       check_vma=False)(x)


# ----------------------------------------------------------------------------------------
# Multi-host runtime.
# ----------------------------------------------------------------------------------------
DISTRIBUTED_ENV = "PIVQ_JAX_DISTRIBUTED"  # launch/tpu_vm.sh sets it on pod slices
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed(environ=os.environ) -> bool:
  """Starts JAX's multi-host runtime when the environment says so; True if it did.

  - JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (launch/gpu.sh across
    nodes, or any scheduler): an explicit coordinator.
  - PIVQ_JAX_DISTRIBUTED=1 (launch/tpu_vm.sh on a pod slice): JAX finds the TPU workers
    itself.
  - A SLURM step of several tasks (`srun python -m pivq_jax.main ...`, with
    SLURM_STEP_NUM_TASKS > 1): JAX reads rank, count and coordinator from SLURM.
  None of these: one process, nothing to do (a single host with any number of devices).
  """
  given = [k for k in COORDINATOR_ENV if environ.get(k)]
  if given:
    if len(given) != len(COORDINATOR_ENV):
      missing = sorted(set(COORDINATOR_ENV) - set(given))
      raise MeshError(f"Multi-host runs need all of {', '.join(COORDINATOR_ENV)}, but "
                      f"{', '.join(missing)} is not set; set it (launch/gpu.sh does).")
    jax.distributed.initialize(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(environ["JAX_NUM_PROCESSES"]),
                               process_id=int(environ["JAX_PROCESS_ID"]))
  elif (environ.get(DISTRIBUTED_ENV, "") not in ("", "0")
        or int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1):
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local of %d devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True

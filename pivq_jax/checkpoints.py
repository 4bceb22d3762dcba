"""Checkpoints (orbax), the workdir's identity, and preemption.

A workdir belongs to one model: `check_workdir_config` refuses to resume or read it with
another architecture. Orbax writes each step to a temporary directory and renames it when
complete, so a killed run never leaves a checkpoint that looks whole but is not.
"""

import json
import signal

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from pivq_jax import config_lib


def manager(workdir, *, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def restore_or_keep(mngr: ocp.CheckpointManager, state, shardings):
  """The latest checkpoint restored into `state`'s layout, or `state` when there is none."""
  step = mngr.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  logging.info("Resuming from checkpoint step %d in %s", step, mngr.directory)
  mismatch = config_lib.ConfigError(
      f"The checkpoint at step {step} in {mngr.directory} does not fit this config's train "
      "state (its arrays differ); use a new --workdir or the config it was trained with.")
  saved = mngr.item_metadata(step)
  saved = saved.tree if hasattr(saved, "tree") else saved
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))
  # Compare leaf shapes first: a failed orbax restore leaves its reads dangling.
  if saved is not None and shapes(saved) != shapes(abstract):
    raise mismatch
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:  # another layout with the same shapes
    raise mismatch from e


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))


# ----------------------------------------------------------------------------------------
# Workdir identity: the config sections that define the model.
# ----------------------------------------------------------------------------------------
IDENTITY_SECTIONS = ("family", "data", "model", "quantizer", "disc", "factorqvae")
# Where the data lives and how it is read may change between machines; the model may not.
_NOT_IDENTITY = {"data": ("data_dir", "num_threads")}

# Fields added after workdirs were written, with the value those workdirs were trained with.
_LEGACY_VALUES = {"factorqvae": {"image_offset": 0.0, "residual_gain": None,
                                 "distance": "squared", "straight_through": False,
                                 "qlae_codebook_init": "linspace"}}


def identity(config_json: dict) -> dict:
  """The model-defining part of a config (as JSON), comparable across versions."""
  out = {}
  for s in IDENTITY_SECTIONS:
    v = config_json.get(s, "pivq" if s == "family" else {})  # older workdirs: PI-VQ
    if isinstance(v, dict) and s in _LEGACY_VALUES and config_json.get("family") == s:
      v = {**_LEGACY_VALUES[s], **v}
    out[s] = ({k: x for k, x in v.items() if k not in _NOT_IDENTITY.get(s, ())}
              if isinstance(v, dict) else {"": v})
  return out


def check_workdir_config(workdir, config, write: bool = True) -> None:
  """A workdir belongs to one model: refuse to resume or read it with another architecture."""
  path = epath.Path(workdir) / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved, now = identity(json.loads(path.read_text())), identity(current)
    for section in IDENTITY_SECTIONS:
      if saved[section] != now[section]:
        diff = sorted(f"{section}.{k}".rstrip(".") for k in set(saved[section])
                      | set(now[section]) if saved[section].get(k) != now[section].get(k))
        raise config_lib.ConfigError(
            f"Workdir {workdir} was trained with a different config ({', '.join(diff)} "
            "differ); use a new --workdir or the original config.")
  if not write or jax.process_index() > 0:  # one writer for a workdir shared by hosts
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(current, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------------------
class Preemption:
  """SIGTERM (how TPU VMs, spot VMs and schedulers preempt) asks the loop to save and exit.

  One process: our own handler sets a flag. Several: JAX's preemption service (started by
  jax.distributed) catches the signal and agrees on one step at which every host saves,
  which orbax's `reached_preemption` reports; a per-host flag would save at different steps.
  """

  def __init__(self):
    self.requested = False
    self._multihost = jax.process_count() > 1
    if self._multihost:
      return
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners)
      pass

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def reached(self, mngr: ocp.CheckpointManager, step: int) -> bool:
    # Only several hosts have a preemption service to ask (each step, so cheap when alone).
    return self.requested or (self._multihost and mngr.reached_preemption(step))

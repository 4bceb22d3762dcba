"""Checkpoints (orbax), the workdir's identity, and preemption.

A workdir belongs to one model: `check_workdir_config` refuses to resume or read it with
another architecture. Orbax writes each step to a temporary directory and renames it when
complete, so a killed run never leaves a checkpoint that looks whole but is not.
"""

import contextlib
import json
import os
import signal
import socket
import time

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from pivq_jax import config_lib
from pivq_jax import train_state


class WorkdirError(ValueError):
  """A workdir or output directory that cannot be used, in one sentence."""


def check_workdir(workdir, *, write: bool) -> None:
  """The workdir's shape and permissions, before anything compiles.

  `write`: the mode writes here (train). Reading modes only need what is there.
  """
  root = epath.Path(workdir)
  for path, want_dir in ((root, True), (root / "checkpoints", True),
                         (root / "config.json", False)):
    if path.exists() and path.is_dir() != want_dir:
      kind = "a directory" if want_dir else "a file"
      raise WorkdirError(f"{path} exists but is not {kind}; move it away or use another "
                         "--workdir.")
  if write:
    check_writable(root, "--workdir")


def check_writable(directory, what: str,
                   fix: str = "fix its permissions or choose a writable directory") -> None:
  """Creates `directory` if needed and proves a file can be written there; the error
  names `what` and ends with `fix`."""
  directory = epath.Path(directory)
  probe = directory / f".write_test_{socket.gethostname()}_{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"{what} {directory} is not writable ({type(e).__name__}: "
                       f"{getattr(e, 'strerror', None) or e}); {fix}.") from None


LOCK = ".pivq_jax.lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  try:  # a killed process its parent has not reaped yet is a zombie: dead for us
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
  except OSError:
    return True


@contextlib.contextmanager
def lock(directory, what: str):
  """One writer per workdir or export directory: a lock file holding host and pid.

  A second run is refused in one sentence; a lock left by a dead process on this host is
  taken over. Multi-host runs take it on process 0 only (the others share its work).
  """
  if jax.process_index() > 0:
    yield
    return
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / LOCK
  me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
  for _ in range(2):
    try:
      if "://" in str(path):  # object stores have no exclusive create: best effort
        if path.exists():
          raise FileExistsError(str(path))
        path.write_text(json.dumps(me))
      else:
        with open(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
          f.write(json.dumps(me))
      break
    except FileExistsError:
      try:
        other = json.loads(path.read_text())
      except (OSError, ValueError):
        other = {}
      if other.get("host") == me["host"] and not _pid_alive(int(other.get("pid", -1))):
        logging.warning("Taking over the stale lock %s of dead process %s.", path,
                        other.get("pid"))
        path.unlink(missing_ok=True)
        continue
      raise WorkdirError(
          f"{what} {directory} is in use by another run (pid {other.get('pid', '?')} on "
          f"{other.get('host', '?')}); wait for it, or delete {path} if that run is gone.")
  try:
    yield
  finally:
    try:
      if json.loads(path.read_text()).get("pid") == me["pid"]:
        path.unlink(missing_ok=True)
    except (OSError, ValueError):
      pass


def manager(workdir, *, keep: int) -> ocp.CheckpointManager:
  # Saves are asynchronous; a wait on a stuck filesystem is bounded (choice: 10 minutes).
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         async_options=ocp.AsyncOptions(timeout_secs=600))
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def restore_or_keep(mngr: ocp.CheckpointManager, state, shardings, *,
                    set_aside: bool = False):
  """The latest readable checkpoint restored into `state`'s layout, or `state` when there is
  none (see `restore_latest`)."""
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  restored = restore_latest(mngr, abstract, set_aside=set_aside)
  return state if restored is None else restored


def restore_latest(mngr: ocp.CheckpointManager, abstract, *, set_aside: bool = False):
  """The latest readable checkpoint restored into `abstract` (ShapeDtypeStructs with
  shardings), or None when there is none; nothing is compiled or initialised for it.

  An unreadable or non-finite checkpoint is reported in one sentence and the previous one
  tried; none is ever deleted. `set_aside` (training) renames a bad one to
  `<step>.unreadable`, so that the resumed run can save that step again.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))
  problems = []
  for step in steps:
    try:
      saved = mngr.item_metadata(step)
      saved = saved.tree if hasattr(saved, "tree") else saved
    except Exception:  # pylint: disable=broad-except
      saved = None  # unreadable metadata: the restore below says what is wrong
    # Compare leaf shapes first: a whole checkpoint of another model means a wrong config,
    # not a corrupt file (and a failed orbax restore leaves its reads dangling).
    if saved is not None and jax.tree.leaves(saved) and shapes(saved) != shapes(abstract):
      raise config_lib.ConfigError(
          f"The checkpoint at step {step} in {mngr.directory} does not fit this config's "
          "train state (its arrays differ); use a new --workdir or the config it was "
          "trained with.")
    try:
      restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
      problem = None if _finite(restored) else "it holds NaN or Inf"
    except Exception as e:  # pylint: disable=broad-except
      problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
    if problem is None:
      logging.info("Resuming from checkpoint step %d in %s", step, mngr.directory)
      return restored
    problems.append(step)
    logging.warning("The checkpoint at step %d (%s/%d) is unreadable (%s); falling back to "
                    "the previous one.", step, mngr.directory, step, problem)
    if set_aside and jax.process_index() == 0:
      src = epath.Path(mngr.directory) / str(step)
      src.rename(src.with_name(f"{step}.unreadable"))
      mngr.reload()
  raise CheckpointError(
      f"None of the checkpoints in {mngr.directory} (steps {problems}) could be restored, "
      f"the latest failing with {problem}; if they were trained with another config use "
      "that config, else start again in a new --workdir.")


class CheckpointError(ValueError):
  """No checkpoint of a workdir can be restored."""


def _finite(tree) -> bool:
  """On device (arrays sharded over hosts too): leaf by leaf, as the train step checks, or
  in concatenated groups when the whole tree is on one device (compiles ~3x faster)."""
  one_device = all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(tree)
                   if isinstance(x, jax.Array))
  check = train_state.all_finite_grouped if one_device else train_state.all_finite
  return bool(jax.jit(check)(tree))


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))


# ----------------------------------------------------------------------------------------
# Workdir identity: the config sections that define the model.
# ----------------------------------------------------------------------------------------
IDENTITY_SECTIONS = ("family", "data", "model", "quantizer", "disc", "factorqvae")
# Where the data lives and how it is read may change between machines; the model may not.
# The auction's kernel: the same algorithm, optimal within the same bound either way (a
# batch's ties may settle differently), and not the model's architecture.
_NOT_IDENTITY = {"data": ("data_dir", "num_threads", "max_unreadable_fraction"),
                 "quantizer": ("auction_kernel",)}

# Fields added after workdirs were written, with the value those workdirs were trained with.
_LEGACY_VALUES = {"factorqvae": {"image_offset": 0.0, "residual_gain": None,
                                 "distance": "squared", "straight_through": False,
                                 "qlae_codebook_init": "linspace"},
                  "model": {"input_pos_std": 0.0, "output_pos_std": 0.0,
                            "trunk_init": "flax"}}


def identity(config_json: dict) -> dict:
  """The model-defining part of a config (as JSON), comparable across versions."""
  out = {}
  for s in IDENTITY_SECTIONS:
    v = config_json.get(s, "pivq" if s == "family" else {})  # older workdirs: PI-VQ
    # FactorQVAE's legacy values only apply to FactorQVAE workdirs.
    if isinstance(v, dict) and s in _LEGACY_VALUES and (
        s != "factorqvae" or config_json.get("family") == s):
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

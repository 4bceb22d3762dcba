"""The mode table: the one place that names modes. `run(config, workdir, mode)` checks the
config, builds the mesh and hands over to the mode's module in pivq_jax/modes/."""

import contextlib

import jax
import ml_collections

from pivq_jax import checkpoints
from pivq_jax import config_checks
from pivq_jax import config_lib
from pivq_jax import experiment
from pivq_jax.modes import evaluate
from pivq_jax.modes import export_codes
from pivq_jax.modes import interpolate
from pivq_jax.modes import plan
from pivq_jax.modes import sample
from pivq_jax.modes import train_factorqvae
from pivq_jax.modes import train_pivq

# mode -> {family: run(config, workdir, mesh)}. Sampling, paths and export work on PI-VQ's
# code sets; FactorQVAE has train and eval.
MODES = {
    "train": {"pivq": train_pivq.run, "factorqvae": train_factorqvae.run},
    "eval": {"pivq": evaluate.run, "factorqvae": evaluate.run},
    "sample": {"pivq": sample.run},
    "interpolate": {"pivq": interpolate.run},
    "export": {"pivq": export_codes.run},
    "plan": {},  # compiles for a target topology: neither data nor this host's mesh
}
# Modes that need code sets of L distinct codes, which only matching guarantees.
_NEEDS_MATCHING = ("sample", "interpolate")


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train") -> dict:
  """Runs `mode` and returns its final metrics."""
  if mode == "plan":
    return plan.run(config, workdir)
  # Everything a user can get wrong is checked before any compilation; the mesh first.
  config_checks.check_config(config, num_devices=jax.device_count())
  mesh = experiment.make_mesh(config)
  if mode not in MODES:
    raise ValueError(f"Unknown --mode {mode!r}; use one of {', '.join(MODES)}.")
  if config.family not in MODES[mode]:
    raise config_lib.ConfigError(
        f"--mode={mode} works on PI-VQ's code sets; FactorQVAE runs take --mode=train or "
        "--mode=eval.")
  if mode in _NEEDS_MATCHING and config.quantizer.assignment != "matching":
    raise config_lib.ConfigError(
        f"--mode={mode} needs code sets of L distinct codes, which only "
        "quantizer.assignment='matching' guarantees; use a matching run.")
  experiment.log_start(config, mesh)
  with contextlib.ExitStack() as stack:
    if mode == "train":  # one training per workdir (export locks its own directory)
      checkpoints.check_workdir(workdir, write=True)
      stack.enter_context(checkpoints.lock(workdir, "--workdir"))
    stack.enter_context(jax.set_mesh(mesh))  # where sharding.per_example finds it
    return MODES[mode][config.family](config, workdir, mesh)

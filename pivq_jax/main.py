"""Command line: `python -m pivq_jax.main --config=configs/faces.py --workdir=/tmp/run`.

Modes (`--mode=`): train (default), eval, sample, interpolate, export, and plan (compile
the train step ahead of time for a target topology: memory, FLOPs, estimated time).
Several hosts: see launch/ (PIVQ_JAX_DISTRIBUTED=1 on TPU pods; JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID across GPU nodes).

Any config field can be overridden, e.g. `--config.num_train_steps=100`, and configs take
an argument string, e.g. `--config=configs/celebahq.py:runlocal`.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pivq_jax import sharding
from pivq_jax import runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/faces.py (optionally `:arg`).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and images go.")
_MODE = flags.DEFINE_enum("mode", "train", list(runner.MODES), "What to run.")
_ALLOW_CPU = flags.DEFINE_bool(
    "allow_cpu", False, "Run on the CPU even when this machine has a GPU or TPU that JAX "
    "does not use (a CPU-only jax install).")
flags.mark_flags_as_required(["config", "workdir"])


def unused_accelerator(backend: str, exists=os.path.exists) -> str | None:
  """The accelerator this machine has but JAX's `backend` does not use, if any."""
  if backend != "cpu":
    return None
  if exists("/dev/nvidia0") or exists("/dev/nvidiactl"):
    return "an NVIDIA GPU"
  if exists("/dev/accel0") or exists("/dev/vfio/0"):
    return "a TPU"
  return None


class _QuietLibraries(logging.logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the training log (warnings still show)."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before anything touches the devices: several hosts become one runtime here.
  sharding.maybe_initialize_distributed()
  unused = unused_accelerator(jax.default_backend())
  if unused and _MODE.value != "plan" and not _ALLOW_CPU.value:
    extra = "cuda" if "GPU" in unused else "tpu"
    raise app.UsageError(
        f"This machine has {unused} but JAX runs on the CPU (a CPU-only jax install); "
        f"install pip install -e '.[{extra}]' -c constraints.txt, or pass --allow_cpu to "
        "train on the CPU anyway.")
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  runner.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
  app.run(main)

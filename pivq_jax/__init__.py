"""pivq_jax: PI-VQ and FactorQVAE in JAX/Flax. `pivq_jax.load(workdir)` opens a trained run
(see pivq_jax/api.py); `python -m pivq_jax.main` trains and evaluates."""


def load(workdir, step: int | None = None, batch_size: int = 64):
  """A trained PI-VQ run's EMA params and config: see `pivq_jax.api.TrainedModel`."""
  from pivq_jax import api  # pylint: disable=g-import-not-at-top  (keeps imports light)
  return api.load(workdir, step=step, batch_size=batch_size)

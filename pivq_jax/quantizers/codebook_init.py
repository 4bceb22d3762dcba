"""Delayed codebook initialisation (paper §3.7): no quantization before T_q; then the
codebook becomes k-means++ (+ Lloyd) centroids of a rolling history of encoder outputs from
the last W steps, fitted on device with ott-jax, and re-fitted the same way at re-init steps.
"""

from absl import logging
import flax
import jax
import jax.numpy as jnp
from ott.tools import k_means

from pivq_jax.quantizers import vq


def push_history(history, z_e, step, key, per_step: int):
  """Writes `per_step` of this step's B*L latents into slot step % W of the history."""
  z = jax.lax.stop_gradient(z_e).reshape(-1, z_e.shape[-1]).astype(jnp.float32)
  if per_step < z.shape[0]:
    z = z[jax.random.choice(key, z.shape[0], (per_step,), replace=False)]
  slots = history.shape[0] // per_step
  return jax.lax.dynamic_update_slice(history, z, ((step % slots) * per_step, 0))


def nearest_usage(latents, codebook) -> jax.Array:
  """How many codes are the nearest code of at least one latent: float32[N, D] x [K, D]."""
  d2 = vq.squared_distances(latents[None], codebook)[0]
  hit = jnp.zeros((codebook.shape[0],), bool).at[jnp.argmin(d2, axis=-1)].set(True)
  return jnp.sum(hit)


def fit_codebook(latents, key, *, num_codes: int, iters: int):
  """k-means++ seeding plus `iters` Lloyd steps on device (ott-jax), -> (centroids, error)."""
  out = k_means.k_means(latents, k=num_codes, n_init=1, init="k-means++",
                        max_iterations=iters, rng=key)
  return out.centroids.astype(jnp.float32), out.error, out.iteration


_fit_jit = jax.jit(fit_codebook, static_argnames=("num_codes", "iters"))
_usage_jit = jax.jit(nearest_usage)


def init_codebook(state, *, num_codes: int, history_steps: int, per_step: int,
                  kmeans_iters: int, seed: int):
  """Replaces the codebook of `state` (params and EMA) with k-means centroids of its
  history -> (new state, metrics).

  Called once `state.step` updates are done, at T_q and at each re-init step. The history
  holds `per_step` encoder outputs from each of the last W = `history_steps` steps (fewer
  steps when fewer have run); usage is logged before and after, as nearest-code usage of
  those latents.
  """
  step = int(state.step)
  rows = min(step, history_steps) * per_step
  latents = state.history[:rows]
  key = jax.random.fold_in(jax.random.key(seed + 1), step)
  codebook, error, iters = _fit_jit(latents, key, num_codes=num_codes, iters=kmeans_iters)
  usage = _usage_jit
  metrics = {"codebook/usage_before": int(usage(latents,
                                                state.params["quantizer"]["codebook"])),
             "codebook/usage_after": int(usage(latents, codebook)),
             # ott reports the summed squared distance; per latent reads across configs.
             "codebook/kmeans_distortion": float(error) / rows,
             "codebook/history_latents": rows}
  logging.info("Codebook init at step %d: k-means++ and %d Lloyd iterations on %d latents "
               "of the last %d steps; distortion %.4g per latent; usage %d -> %d of %d codes.",
               step, int(iters), rows, rows // per_step, float(error) / rows,
               metrics["codebook/usage_before"], metrics["codebook/usage_after"], num_codes)

  def set_codebook(params):
    params = flax.core.unfreeze(params)
    old = params["quantizer"]["codebook"]
    # Its own buffer (the step donates), laid out as the train state's sharding says.
    params["quantizer"]["codebook"] = jax.device_put(jnp.copy(codebook), old.sharding)
    return params

  return state.replace(params=set_codebook(state.params),
                       ema_params=set_codebook(state.ema_params)), metrics

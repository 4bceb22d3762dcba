"""FactorQVAE on the held-out split (second paper): L1, PSNR, MSE, values in use, a
reconstruction grid and latent traversals (paper Figs. 2-4)."""

import functools

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from pivq_jax import compile_cache
from pivq_jax import sharding as sharding_lib
from pivq_jax import visualize
from pivq_jax.data import pipeline
from pivq_jax.evaluators import common


def eval_step(params, batch, *, model):
  x = pipeline.images(batch)
  x_hat, aux = model.apply({"params": params}, x, train=False)
  return {"l1": jnp.mean(jnp.abs(x - x_hat), axis=(1, 2, 3)), "psnr": common.psnr(x, x_hat),
          "mse": jnp.mean(jnp.square(x - x_hat), axis=(1, 2, 3)), "codes": aux["codes"]}, x_hat


def evaluate(eval_fn, params, eval_data, sharding):
  """-> (metrics, the first batch's reconstructions)."""
  per_image, first_recon = {}, None
  for batch in eval_data:
    out, x_hat = sharding_lib.to_host(eval_fn(params, sharding_lib.global_batch(batch,
                                                                                sharding)))
    if first_recon is None:
      first_recon = np.asarray(x_hat)
    for k, v in out.items():
      per_image.setdefault(k, []).append(np.asarray(v))
  per_image = {k: np.concatenate(v) for k, v in per_image.items()}
  metrics = {k: float(per_image[k].mean()) for k in ("l1", "psnr", "mse")}
  codes = per_image["codes"]
  if np.issubdtype(codes.dtype, np.integer):  # discrete posteriors: values in use per latent
    metrics["values_used_mean"] = float(np.mean([len(np.unique(c)) for c in codes.T]))
    metrics["codebook_usage"] = int(len(np.unique(codes)))
  return metrics, first_recon


class Evaluator:
  """eval/...: the trained weights (the paper keeps no EMA)."""
  modes = ("train", "eval")

  @classmethod
  def enabled(cls, config, step) -> bool:
    del step
    return config.family == "factorqvae"

  def __init__(self, exp):
    self.exp = exp
    # Read now: a split too small for one eval batch fails before anything compiles.
    self.num_batches = len(exp.eval_batches)
    self.fn = compile_cache.jit("eval_factorqvae", exp.config, exp.mesh, lambda: jax.jit(
        functools.partial(eval_step, model=exp.model)))
    self.traverse = compile_cache.jit("traverse", exp.config, exp.mesh, lambda: jax.jit(
        lambda p, x: exp.model.apply({"params": p}, x, method="traverse")))

  def run(self, state, step: int) -> dict:
    exp = self.exp
    metrics, recon = evaluate(self.fn, state.params, exp.eval_batches, exp.data_sharding)
    first = exp.eval_batches[0]
    exp.write_image(step, "recon", "eval/recon",
                    common.recon_grid(first, recon, exp.config.eval.grid_images))
    # Paper Figs. 2-4: what each latent does to the first eval image.
    # Process 0's first image: a multi-host jit needs the same input on every host.
    image = first["image"][:1]
    if jax.process_count() > 1:
      image = np.asarray(multihost_utils.broadcast_one_to_all(image))
    rows = np.asarray(self.traverse(state.params, pipeline.images({"image": image})))
    exp.write_image(step, "traversal", "eval/traversal",
                    visualize.grid([visualize.to_uint8(r) for r in rows]))
    return {f"eval/{k}": v for k, v in metrics.items()}

"""PI-VQ on the held-out split: L1, PSNR, LPIPS, distinct codes per image, codebook usage
and the capacity they imply (supplemental eqs. 5 and 8), for the EMA and the raw params."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pivq_jax import compile_cache
from pivq_jax import sharding as sharding_lib
from pivq_jax.data import pipeline
from pivq_jax.evaluation import capacity
from pivq_jax.evaluators import common
from pivq_jax.losses import lpips
from pivq_jax.quantizers import vq


def eval_step(params, batch, lpips_params, *, model, quantize: bool, lpips_net: str):
  x = pipeline.images(batch)
  x_hat, aux = model.apply({"params": params}, x, quantize=quantize)
  aux = vq.stats_or_zeros(aux, x.shape[0], model.quantizer.num_codes)
  out = {
      "l1": jnp.mean(jnp.abs(x - x_hat), axis=(1, 2, 3)),
      "psnr": common.psnr(x, x_hat),
      "distinct_codes": aux["distinct_codes"],
      "usage": jnp.any(aux["presence"], axis=0),
  }
  if lpips_net:  # the metric uses the official [-1, 1] input convention, not UT's quirk
    out["lpips"] = lpips.lpips_distance(lpips_params, jnp.clip(x_hat, 0, 1), x,
                                        net=lpips_net, ut_unscaled_input=False)
  return out, x_hat


def evaluate(eval_fn, params, eval_data, sharding, num_latents, **kwargs):
  """-> (metrics, the first batch's reconstructions, distinct codes per image)."""
  per_image, usage, first_recon = {}, None, None
  for batch in eval_data:
    out, x_hat = eval_fn(params, sharding_lib.global_batch(batch, sharding), **kwargs)
    out = sharding_lib.to_host(out)
    if first_recon is None:
      first_recon = np.asarray(sharding_lib.to_host(x_hat))
    usage = out.pop("usage") if usage is None else usage | out.pop("usage")
    for k, v in out.items():
      per_image.setdefault(k, []).append(np.asarray(v))
  per_image = {k: np.concatenate(v) for k, v in per_image.items()}
  k_img = per_image["distinct_codes"]
  k_data, length = int(usage.sum()), num_latents
  quantize = kwargs["quantize"]
  metrics = {
      "l1": float(per_image["l1"].mean()),
      "psnr": float(per_image["psnr"].mean()),
      "distinct_codes_mean": float(k_img.mean()),
      "distinct_codes_max": int(k_img.max()),  # K_img in the paper's capacity formulas
      "codebook_usage": k_data,  # K_data over the eval set
      # Supplemental eqs. 5 and 8 with the measured K_img and K_data (0: quantizer off).
      "capacity_bits_nearest": float(capacity.nearest_capacity_bits(
          k_data, int(k_img.max()), length)) if quantize else 0.0,
      "capacity_bits_matching": float(capacity.matching_capacity_bits(k_data, length))
                                if quantize and k_data >= length else 0.0,
  }
  if "lpips" in per_image:
    metrics["lpips"] = float(per_image["lpips"].mean())
  return metrics, first_recon, k_img


class Evaluator:
  """eval/{ema,raw}/...: the paper reports the EMA weights; LPIPS for those only."""
  modes = ("train", "eval")

  @classmethod
  def enabled(cls, config, step) -> bool:
    del step
    return config.family == "pivq"

  def __init__(self, exp):
    self.exp = exp
    # Read now: a split too small for one eval batch fails before anything compiles.
    self.num_batches = len(exp.eval_batches)
    self.fn = compile_cache.jit("eval_pivq", exp.config, exp.mesh, lambda: jax.jit(
        functools.partial(eval_step, model=exp.model),
        static_argnames=("quantize", "lpips_net")))

  def run(self, state, step: int) -> dict:
    exp, c = self.exp, self.exp.config
    quantize = step >= c.codebook_init.start_step
    results = {}
    for name, params in (("ema", state.ema_params), ("raw", state.params)):
      # LPIPS for the EMA weights only (the ones the paper reports); it costs the most.
      net = c.eval.lpips_net if name == "ema" else ""
      metrics, recon, k_img = evaluate(
          self.fn, params, exp.eval_batches, exp.data_sharding, c.model.num_latents,
          lpips_params=exp.lpips_params.get(net), quantize=quantize, lpips_net=net)
      results.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
      exp.writer.write_histograms(step, {f"eval/{name}/distinct_codes": k_img})
      if name != "ema":
        continue
      exp.write_image(step, "recon", "eval/recon",
                      common.recon_grid(exp.eval_batches[0], recon, c.eval.grid_images))
      if quantize:
        # Fig. 4 of the paper, with this run's measured (K_data, bits) marked.
        bits = metrics[f"capacity_bits_{c.quantizer.assignment}"]
        plot = capacity.plot_capacity(
            exp.image_path(step, "capacity"), length=c.model.num_latents,
            # The nearest curve needs a nearest run's measured K_img.
            k_img=(metrics["distinct_codes_max"]
                   if c.quantizer.assignment == "nearest" else None),
            k_max=max(4 * c.quantizer.num_codes, 2 * c.model.num_latents),
            k_data_used={f"this run ({c.quantizer.assignment})":
                         (max(metrics["codebook_usage"], 1), bits)})
        exp.writer.write_images(step, {"eval/capacity": plot[None]})
    return results

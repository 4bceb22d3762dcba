"""DCI and InfoMEC (FactorQVAE paper) on datasets with ground-truth factors, both families:
FactorQVAE's d codes, PI-VQ's K code-presence bits (what neither paper did)."""

import functools

from absl import logging
import jax
import numpy as np

from pivq_jax import compile_cache
from pivq_jax.data import pipeline
from pivq_jax.evaluation import disentanglement
from pivq_jax.evaluation import probing
from pivq_jax.evaluators import common
from pivq_jax.models import factorqvae


def latents_step(params, batch, *, model, family: str, code_values: bool = False):
  x = pipeline.images(batch)
  if family == "factorqvae":
    return model.apply({"params": params}, x, as_values=code_values, method="encode_codes")
  return model.apply({"params": params}, x, method="encode_to_indices")


class Evaluator:
  """eval/dci/... and eval/infomec/..., with the importance and NMI heatmaps."""
  modes = ("eval",)

  @classmethod
  def enabled(cls, config, step) -> bool:
    e = config.eval
    quantized = (config.family == "factorqvae" or step is None
                 or step >= config.codebook_init.start_step)
    return quantized and bool(e.dci_train_examples and e.dci_test_examples)

  def __init__(self, exp):
    self.exp = exp
    c = exp.config
    self.fn = compile_cache.jit("latents", c, exp.mesh, lambda: jax.jit(functools.partial(
        latents_step, model=exp.model, family=c.family,
        code_values=c.eval.dci_code_values)), c.eval.dci_code_values)

  def latents(self, state, split: str, n: int):
    exp, c = self.exp, self.exp.config
    codes, kept = common.map_subset(lambda x: self.fn(state.ema_params, {"image": x}),
                                    exp.sources[split], n, c.eval.batch_size,
                                    exp.data_sharding, keep=("factors",))
    if not exp.fq:  # PI-VQ: the K binary "code k is in the image's set" features
      codes = probing.presence_features(codes, c.quantizer.num_codes)
    return codes, kept["factors"]

  def run(self, state, step: int) -> dict:
    exp, c = self.exp, self.exp.config
    e, fq = c.eval, exp.fq
    names = pipeline.label_names(exp.sources["test"])
    if "factors" not in names:
      logging.info("Dataset %s has no ground-truth factors: no DCI / InfoMEC.", c.data.name)
      return {}
    z_train, f_train = self.latents(state, "train", e.dci_train_examples)
    z_test, f_test = self.latents(state, "test", e.dci_test_examples)
    z = np.asarray(z_train)
    if not np.any(z.max(axis=0) != z.min(axis=0)):
      logging.warning("Every latent is constant on the DCI images (collapsed or untrained); "
                      "DCI and InfoMEC are undefined and skipped.")
      return {}
    discrete = not fq or factorqvae.VARIANTS[c.factorqvae.variant].posterior != "gaussian"
    dci = disentanglement.dci(z_train, f_train, z_test, f_test, seed=c.seed)
    info = disentanglement.infomec(z_train, f_train, discrete=discrete, seed=c.seed)
    out = {f"eval/dci/{k}": float(dci[k]) for k in (
        "disentanglement", "completeness", "informativeness_train", "informativeness_test")}
    out.update({f"eval/infomec/{k}": float(info[k]) for k in ("infom", "infoe", "infoc")})
    logging.info("DCI / InfoMEC on %d train and %d test images: %s", len(z_train),
                 len(z_test), {k: round(v, 4) for k, v in out.items()})
    image = disentanglement.plot_scores(
        exp.image_path(step, "disentanglement"), dci["importance"], info["nmi"],
        names["factors"],
        latent_labels=[f"z{i}" if fq else f"code {i}" for i in range(z.shape[1])],
        title=f"{c.data.name}, step {step}: D {dci['disentanglement']:.2f} "
              f"C {dci['completeness']:.2f} InfoM {info['infom']:.2f} "
              f"InfoC {info['infoc']:.2f}")
    exp.writer.write_images(step, {"eval/disentanglement": image[None]})
    return out

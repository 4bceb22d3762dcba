"""Probing (paper §3.8): per label, 5-fold logistic regression on code presence against the
majority class, with the paper's Fig. 5 chart."""

import functools

from absl import logging
import jax

from pivq_jax import compile_cache
from pivq_jax import sampling
from pivq_jax.data import pipeline
from pivq_jax.evaluation import probing
from pivq_jax.evaluators import common


class Evaluator:
  """eval/probe/<label>/{accuracy,majority} on eval.probe_examples held-out images."""
  modes = ("eval",)

  @classmethod
  def enabled(cls, config, step) -> bool:
    return (config.family == "pivq" and bool(config.eval.probe_examples)
            and (step is None or step >= config.codebook_init.start_step))

  def __init__(self, exp):
    self.exp = exp
    self.fn = compile_cache.jit("encode", exp.config, exp.mesh, lambda: jax.jit(
        functools.partial(sampling.encode_step, model=exp.model)))

  def run(self, state, step: int) -> dict:
    exp, c = self.exp, self.exp.config
    e, source = c.eval, exp.sources["test"]
    names = pipeline.label_names(source)
    if not names:
      logging.info("Dataset %s has no labels to probe.", c.data.name)
      return {}
    (label_key, label_names), = names.items()
    codes, kept = common.map_subset(lambda x: self.fn(state.ema_params, {"image": x}), source,
                                    e.probe_examples, e.batch_size, exp.data_sharding,
                                    keep=(label_key,))
    features = probing.presence_features(codes, c.quantizer.num_codes)
    probes = probing.probe(features, kept[label_key], label_names, folds=e.probe_folds,
                           seed=c.seed)
    image = probing.plot_probing(
        exp.image_path(step, "probing"), probes,
        title=f"{c.data.name}: code-presence probe, step {step}")
    exp.writer.write_images(step, {"eval/probing": image[None]})
    out = {}
    for name, r in probes.items():
      if "skipped" in r:  # a constant label in this subset
        continue
      out[f"eval/probe/{name}/accuracy"] = r["accuracy"]
      out[f"eval/probe/{name}/majority"] = r["majority"]
    return out

"""Sample quality (paper §4): FID and precision / recall / density / coverage of
interpolation samples (§3.5) against real images, on FID Inception-v3 features."""

import functools
import hashlib
import json
import os

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from pivq_jax import compile_cache
from pivq_jax import sampling
from pivq_jax import sharding as sharding_lib
from pivq_jax import visualize
from pivq_jax.evaluation import generative
from pivq_jax.evaluation import inception
from pivq_jax.evaluators import common


def cache_dir(config) -> epath.Path:
  """eval.cache_dir, else $PIVQ_JAX_CACHE, else ~/.cache/pivq_jax (as the FID converter)."""
  return epath.Path(config.eval.cache_dir or os.environ.get(inception.CACHE_ENV)
                    or os.path.expanduser("~/.cache/pivq_jax"))


def _uint8(x):
  """[0, 1] floats -> uint8 on device, rounded as `visualize.to_uint8` (as if saved as PNG)."""
  return (jnp.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(jnp.uint8)


def fake_features_step(params, inception_params, batch_a, batch_b, key, *, model):
  """Interpolation samples of two batches -> their FID Inception features."""
  _, _, _, images = sampling.sample_step(params, batch_a, batch_b, key, model=model)
  return inception.features(inception_params, _uint8(images))


_inception_features = jax.jit(inception.features)


def real_features_path(config, source, n: int):
  """Where `real_features` caches n images' features: keyed on the data config (name,
  location, resolution, split), the count and `data_fingerprint`, so that a folder
  changed in place is not served stale features."""
  data = {k: v for k, v in config.data.items() if k != "num_threads"}
  key = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode())
  key.update(data_fingerprint(source).encode())
  return cache_dir(config) / "real_features" / (
      f"{config.data.name}_{config.data.resolution}px_{config.eval.real_split}_{n}_"
      f"{key.hexdigest()[:12]}.npy")


def data_fingerprint(source, probes: int = 8) -> str:
  """The split's size and a hash of `probes` images spread over it: cheap (a few reads),
  and it changes when the split's size or one of the probed images changes."""
  h = hashlib.sha256(str(len(source)).encode())
  for i in np.linspace(0, len(source) - 1, min(probes, len(source))).astype(int):
    h.update(np.ascontiguousarray(source[int(i)]["image"]).tobytes())
  return h.hexdigest()


def real_features(config, source, inception_params, sharding) -> np.ndarray:
  """Inception features of eval.num_real images of eval.real_split, cached on disk.

  Computed once per dataset and shared by every run and checkpoint (`real_features_path`).
  """
  e = config.eval
  n = min(e.num_real, len(source))
  n -= n % e.feature_batch_size
  path = real_features_path(config, source, n)
  if path.exists():
    logging.info("Real Inception features from the cache %s.", path)
    with path.open("rb") as f:
      return np.load(f)
  logging.info("Computing Inception features of %d real images for the cache %s.", n, path)
  fn = _inception_features
  feats, _ = common.map_subset(functools.partial(fn, inception_params), source, n,
                               e.feature_batch_size, sharding)
  visualize.save_array(path, feats)
  return feats


class Evaluator:
  """eval/generative/...: eval.num_samples samples from random training pairs."""
  modes = ("eval",)

  @classmethod
  def enabled(cls, config, step) -> bool:
    # Samples need code sets of L distinct codes: matching, past T_q.
    return (config.family == "pivq" and bool(config.eval.num_samples)
            and config.quantizer.assignment == "matching"
            and (step is None or step >= config.codebook_init.start_step))

  def __init__(self, exp):
    self.exp = exp
    # FID Inception weights: converted once by third_party/fid_inception_weights.py.
    self.inception_params = inception.load_inception_params(
        cache_dir(exp.config) / "fid_inception" / inception.WEIGHTS_FILE)
    self.fn = compile_cache.jit("fake_features", exp.config, exp.mesh, lambda: jax.jit(
        functools.partial(fake_features_step, model=exp.model)))

  def run(self, state, step: int) -> dict:
    del step
    exp, e = self.exp, self.exp.config.eval
    params = jax.device_put(self.inception_params, exp.replicated)
    real = real_features(exp.config, exp.sources[e.real_split], params, exp.data_sharding)
    fake = []  # seed + 1: other pairs than sample mode's
    for n, batch_a, batch_b, key in sampling.pair_batches(
        exp.sources["train"], e.num_samples, e.feature_batch_size, exp.config.seed + 1,
        exp.data_sharding):
      fake.append(sharding_lib.to_host(self.fn(state.ema_params, params, batch_a, batch_b,
                                               key))[:n])
      if len(fake) % 50 == 0:  # 50k samples take a while
        logging.info("Inception features of %d / %d samples.", sum(map(len, fake)),
                     e.num_samples)
    fake = np.concatenate(fake)
    results = {"fid": generative.frechet_distance(real, fake)}
    results.update(generative.compute_prdc(real, fake, nearest_k=e.nearest_k))
    logging.info("Generative metrics, %d samples vs %d real: %s", len(fake), len(real),
                 {k: round(v, 4) for k, v in results.items()})
    return {f"eval/generative/{k}": v for k, v in results.items()} | {
        "eval/generative/num_samples": len(fake), "eval/generative/num_real": len(real)}

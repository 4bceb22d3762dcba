"""--mode=sample: sample.num_images interpolation samples (paper §3.5) from random training
pairs: C = A ∩ B plus a uniform draw from A △ B, one decoder pass each, no learned prior."""

import functools

from absl import logging
from etils import epath
import jax
import numpy as np

from pivq_jax import compile_cache
from pivq_jax import experiment
from pivq_jax import sampling
from pivq_jax import sharding as sharding_lib
from pivq_jax import visualize


def run(config, workdir: str, mesh) -> dict:
  """Writes samples/<step>/{samples,codes}.npy (uint8 [N, R, R, 3], for FID) and a grid."""
  exp, state = experiment.build(config, workdir, "sample", mesh)
  step, sc = int(state.step), config.sample
  fn = compile_cache.jit("sample", config, mesh, lambda: jax.jit(
      functools.partial(sampling.sample_step, model=exp.model)))
  images, codes, first = [], [], None
  for n, batch_a, batch_b, key in sampling.pair_batches(
      exp.sources["train"], sc.num_images, sc.batch_size, config.seed, exp.data_sharding):
    out = sharding_lib.to_host(fn(state.ema_params, batch_a, batch_b, key))
    images.append(visualize.to_uint8(out[3][:n]))
    codes.append(np.asarray(out[2][:n]))
    if first is None:
      # Global batches span every host's devices: gather before reading rows.
      first = [sharding_lib.to_host(b["image"])[:sc.grid_images] for b in (batch_a, batch_b)]
      first.append(images[0][:sc.grid_images])
  images, codes = np.concatenate(images), np.concatenate(codes)
  out_dir = epath.Path(exp.output_dir) / "samples" / f"{step:08d}"
  if jax.process_index() == 0:
    visualize.save_array(out_dir / "samples.npy", images)
    visualize.save_array(out_dir / "codes.npy", codes)
  exp.write_image(step, "samples", "sample/interpolation", visualize.grid(first))
  exp.writer.flush()
  distinct = np.array([len(set(c.tolist())) for c in codes])
  logging.info("Wrote %d interpolation samples of step %d to %s.", len(images), step, out_dir)
  return {"sample/num_images": len(images), "sample/distinct_codes_min": int(distinct.min()),
          "sample/distinct_codes_max": int(distinct.max())}

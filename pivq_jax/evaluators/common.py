"""Helpers shared by evaluators: fixed subsets mapped on device, and image grids."""

import jax
import jax.numpy as jnp
import numpy as np

from pivq_jax import sharding as sharding_lib
from pivq_jax import visualize
from pivq_jax.data import pipeline


def map_subset(fn, source, num: int, batch_size: int, sharding, keep: tuple[str, ...] = ()):
  """fn(global uint8 image batch) over the fixed subset `pipeline.subset_batches` picks
  -> (fn's outputs on the host, concatenated; {k: the items' field k} for k in keep)."""
  outs, kept = [], {k: [] for k in keep}
  # On several hosts the kept fields take the images' placement, so that they come back
  # row for row with the outputs, in the mesh's order of the global batch.
  placed = keep if jax.process_count() > 1 else ()
  for b in pipeline.subset_batches(
      source, num_examples=num, batch_size=batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count()):
    batch = sharding_lib.global_batch({k: b[k] for k in ("image", *placed)}, sharding)
    outs.append(np.asarray(sharding_lib.to_host(fn(batch["image"]))))
    for k in keep:
      kept[k].append(np.asarray(sharding_lib.to_host(batch[k])) if placed else b[k])
  return np.concatenate(outs), {k: np.concatenate(v) for k, v in kept.items()}


def recon_grid(batch, recon, n) -> np.ndarray:
  """Originals above their reconstructions, n of each."""
  originals = np.asarray(batch["image"][:n], np.uint8)
  return visualize.grid([originals, visualize.to_uint8(recon[:n])])


def psnr(x, x_hat):
  """Per-image PSNR in dB of [0, 1] images; x_hat is clipped to the range first."""
  mse = jnp.mean(jnp.square(jnp.clip(x_hat, 0, 1) - x), axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))

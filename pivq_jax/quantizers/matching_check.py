"""Matching validation: the configured solver against the exact host Hungarian (§3.4), on
the same latents, every quantizer.validate_every steps of a matching run."""

import jax.numpy as jnp
import numpy as np

from pivq_jax import sharding as sharding_lib
from pivq_jax.data import pipeline


def matching_check(params, batch, *, model, exact_model):
  """Assignments of the configured solver and of exact Hungarian on the same latents."""
  x = pipeline.images(batch)
  z_e = model.apply({"params": params}, x, method="encode")
  fast = model.apply({"params": params}, z_e, method=lambda m, z: m.quantizer.assign(z))
  exact = exact_model.apply({"params": params}, z_e,
                            method=lambda m, z: m.quantizer.assign(z))
  codebook = params["quantizer"]["codebook"]
  cost = lambda idx: jnp.sum(jnp.linalg.norm(z_e - codebook[idx], axis=-1), axis=-1)
  return fast, cost(fast), cost(exact)


def validate_matching(check_fn, params, batch, num_codes) -> dict[str, float]:
  """Runs the jitted `matching_check`; stops the run on an invalid code set."""
  fast, fast_cost, exact_cost = sharding_lib.to_host(check_fn(params, batch))
  valid = np.mean([len(set(row.tolist())) == len(row) and row.min() >= 0
                   and row.max() < num_codes for row in np.asarray(fast)])
  gap = float(np.max((fast_cost - exact_cost) / np.maximum(np.abs(exact_cost), 1e-30)))
  if valid < 1.0:
    raise RuntimeError(f"The matching solver returned a code set with repeated or "
                       f"out-of-range codes for {100 * (1 - valid):.1f}% of a batch; this "
                       "is a solver bug, so the run was stopped (use "
                       "--config.quantizer.solver=hungarian meanwhile).")
  return {"matching/valid_fraction": float(valid), "matching/optimality_gap": gap}

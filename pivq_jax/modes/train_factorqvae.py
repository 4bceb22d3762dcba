"""FactorQVAE training (second paper; spec factorqvae.md): the update step and the loop.

TC variants split each batch in two halves: the autoencoder step (MSE + beta KL + gamma TC)
on half 1, then the discriminator step on half 2 encoded by the updated autoencoder and
permuted per latent (Algorithm 1). The state, checkpoints and writers are PI-VQ's.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import optax

from pivq_jax import compile_cache
from pivq_jax import experiment
from pivq_jax import sharding as sharding_lib
from pivq_jax import train_state
from pivq_jax.data import pipeline
from pivq_jax.evaluators import common
from pivq_jax.losses import factorqvae as fq_losses
from pivq_jax.models import factorqvae
from pivq_jax.models import tc_discriminator
from pivq_jax.modes import loop


def train_step(state: train_state.TrainState, batch, *, model, disc, tx, disc_tx, config):
  f = config.factorqvae
  tc = factorqvae.VARIANTS[f.variant].total_correlation
  x = pipeline.images(batch)
  tau = fq_losses.tau_schedule(state.step, rate=f.tau_rate)
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  k1, k2, k_perm = jax.random.split(key, 3)
  x1, x2 = jnp.split(x, 2) if tc else (x, None)

  def vae_fn(params):
    x_hat, aux = model.apply({"params": params}, x1, k1, tau=tau)
    # D's current params, not stopped: the TC gradient reaches the encoder and codebook.
    d_logits = disc.apply({"params": state.disc_params}, aux["tc_latents"]) if tc else None
    loss, terms = fq_losses.vae_loss(x=x1, x_hat=x_hat, aux=aux, variant=f.variant,
                                     beta=f.beta, gamma=f.gamma, disc_logits=d_logits)
    return loss, (terms, aux.get("tc_latents"), x_hat)

  (_, (terms, z1, x_hat)), grads = jax.value_and_grad(vae_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(terms, tau=tau, psnr=jnp.mean(common.psnr(x1, x_hat)))
  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  if tc:
    _, aux2 = model.apply({"params": params}, x2, k2, tau=tau, method="sample_latents")
    z1 = jax.lax.stop_gradient(z1)
    z_perm = tc_discriminator.permute_dims(jax.lax.stop_gradient(aux2["tc_latents"]), k_perm)

    def disc_fn(d_params):
      apply = lambda z: disc.apply({"params": d_params}, z)
      return fq_losses.tc_discriminator_loss(apply(z1), apply(z_perm))

    metrics["disc_loss"], d_grads = jax.value_and_grad(disc_fn)(disc_params)
    d_updates, disc_opt_state = disc_tx.update(d_grads, disc_opt_state, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)
  metrics["finite"] = train_state.all_finite(terms, grads, params, disc_params)
  # No EMA in the paper: eval and codes read the trained weights.
  return state.replace(step=state.step + 1, params=params, ema_params=params,
                       opt_state=opt_state, disc_params=disc_params,
                       disc_opt_state=disc_opt_state), metrics


def jit_train_step(config, modules, shardings, mesh):
  """The jitted update, state donated: (state, batch) -> (state, metrics)."""
  fn = functools.partial(train_step, model=modules.model, disc=modules.disc, tx=modules.tx,
                         disc_tx=modules.disc_tx, config=config)
  return compile_cache.jit(
      "train_factorqvae", config, mesh,
      lambda: jax.jit(fn, in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                      out_shardings=(shardings, None), donate_argnums=0))


def run(config, workdir: str, mesh) -> dict:
  exp, state = experiment.build(config, workdir, "train", mesh)
  start_step = int(state.step)
  if start_step >= config.num_train_steps:
    logging.info("Run in %s is already complete at step %d.", exp.workdir, start_step)
    return exp.evaluate(state, start_step)

  step_fn = jit_train_step(config, exp.modules, exp.shardings, mesh)

  logging.info("Training from step %d to %d.", start_step, config.num_train_steps)
  step = start_step
  with loop.Loop(exp, start_step) as train_loop:
    batches = loop.train_batches(exp, start_step + train_loop.data_offset)
    while step < config.num_train_steps:
      state, metrics = step_fn(state, exp.global_batch(next(batches)))
      step += 1
      try:
        if train_loop.after_step(step, state, metrics):
          break
      except loop.Diverged as e:  # re-raised unless config.divergence.retries allows
        state, step = train_loop.recover(e, state)
        batches = loop.train_batches(exp, step + train_loop.data_offset)
    return train_loop.finish()

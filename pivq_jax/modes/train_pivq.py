"""PI-VQ training (paper §3.6 and §3.7; ut-reference.md): the update step and the loop.

One forward pass of the autoencoder feeds both updates: G's loss l1 + LPIPS + w * hinge-G +
quantizer, then D's hinge loss on the same (detached) augmented fake and an independently
augmented real batch. The loop passes through the paper's phases: unquantized warm-up,
k-means codebook at T_q (and re-inits), quantized, then adversarial.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import optax

from pivq_jax import compile_cache
from pivq_jax import config_lib
from pivq_jax import experiment
from pivq_jax import sharding as sharding_lib
from pivq_jax import train_state
from pivq_jax.data import pipeline
from pivq_jax.evaluators import common
from pivq_jax.losses import adversarial
from pivq_jax.losses import diffaug
from pivq_jax.losses import lpips
from pivq_jax.modes import loop
from pivq_jax.quantizers import codebook_init
from pivq_jax.quantizers import matching_check
from pivq_jax.quantizers import vq


def train_step(state: train_state.TrainState, batch, lpips_params, *, model, disc, tx,
               disc_tx, config, quantize: bool, adversarial_on: bool):
  """One G update (and one D update when `adversarial_on`).

  Both flags are static: `quantize` is False before T_q (delayed quantization, §3.7) and
  `adversarial_on` is False before loss.disc_start_step, when UT multiplies the G term by 0
  and does not update D; skipping them outright saves their compute.
  """
  x = pipeline.images(batch)
  lc, dtype = config.loss, jnp.dtype(config.model.dtype)
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  k_fake, k_real, k_hist = jax.random.split(key, 3)
  augment = functools.partial(diffaug.diff_augment, policy=config.disc.diffaug,
                              ratio=config.disc.translation_ratio)

  def forward(params):
    (x_hat, aux), inter = model.apply({"params": params}, x, quantize=quantize,
                                      mutable=["intermediates"])
    aux = vq.stats_or_zeros(aux, x.shape[0], config.quantizer.num_codes)
    return (x_hat, aux["loss"]), (aux, inter["intermediates"])

  # vjp rather than grad: the cotangent of x_hat needs the adaptive weight, which needs the
  # nll and G-loss gradients at x_hat first (magvit's habit).
  (x_hat, q_loss), ae_vjp, (aux, inter) = jax.vjp(forward, state.params, has_aux=True)

  def nll_fn(x_hat):
    l1 = jnp.mean(jnp.abs(x - x_hat))
    p = jnp.zeros((), jnp.float32)
    if lc.lpips_weight:
      p = jnp.mean(lpips.lpips_distance(lpips_params, x_hat, x, net=lc.lpips_net,
                                        ut_unscaled_input=lc.lpips_ut_input, dtype=dtype))
    nll = lc.l1_weight * l1 + lc.lpips_weight * p
    if lc.l2_weight:  # off by default: the paper's nll is L1 + LPIPS
      nll += lc.l2_weight * jnp.mean(jnp.square(x - x_hat))
    return nll, (l1, p)

  (nll, (l1, p_loss)), d_nll = jax.value_and_grad(nll_fn, has_aux=True)(x_hat)
  metrics, d_x_hat = {}, d_nll
  disc_params, disc_stats, disc_opt_state = (state.disc_params, state.disc_stats,
                                             state.disc_opt_state)
  g_term = jnp.zeros((), jnp.float32)
  if adversarial_on:
    def d_apply(params, stats, images):
      logits, new = disc.apply({"params": params, "batch_stats": stats}, images,
                               mutable=["batch_stats"])
      return logits, new["batch_stats"]

    def g_fn(x_hat):
      fake = augment(x_hat, k_fake)  # the same augmented fake feeds D, detached, below
      logits, stats = d_apply(disc_params, disc_stats, fake)
      return adversarial.hinge_g_loss(logits), (fake, stats)

    (g_loss, (fake, disc_stats)), d_g = jax.value_and_grad(g_fn, has_aux=True)(x_hat)
    conv_out = state.params["decoder_trunk"]["conv_out"]
    w_nll, w_g = adversarial.last_layer_grads(
        inter["decoder_trunk"]["final_conv_input"][0], conv_out["kernel"], conv_out["bias"],
        [d_nll, d_g], dtype=dtype)
    weight = lc.adversarial_weight * adversarial.adaptive_weight(w_nll, w_g)
    d_x_hat = d_nll + weight * d_g
    g_term = weight * g_loss

    real = augment(x, k_real)  # an independent draw for the real images

    def d_loss_fn(params, stats):
      logits_real, stats = d_apply(params, stats, real)
      logits_fake, stats = d_apply(params, stats, jax.lax.stop_gradient(fake))
      loss = adversarial.hinge_d_loss(logits_real, logits_fake)
      return loss, (stats, jnp.mean(logits_real), jnp.mean(logits_fake))

    (d_loss, (disc_stats, lreal, lfake)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(disc_params, disc_stats)
    d_updates, disc_opt_state = disc_tx.update(d_grads, disc_opt_state, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)
    metrics.update({"g_loss": g_loss, "d_loss": d_loss, "adaptive_weight": weight,
                    "logits_real": lreal, "logits_fake": lfake,
                    "d_grad_norm": optax.tree.norm(d_grads)})

  (grads,) = ae_vjp((d_x_hat, jnp.ones_like(q_loss)))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # EMA of params, no bias correction, every `every` steps (UT: beta 0.995 every 10).
  do_ema = (state.step + 1) % config.ema.every == 0
  decay = jnp.where(do_ema, config.ema.decay, 1.0)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  history = codebook_init.push_history(state.history, inter["z_e"][0], state.step, k_hist,
                                       config_lib.history_latents_per_step(config))
  metrics.update({
      "loss": nll + g_term + q_loss, "nll": nll, "l1": l1, "lpips": p_loss,
      "vq_loss": q_loss, "commit_loss": aux["commit_loss"],
      "psnr": jnp.mean(common.psnr(x, x_hat)),
      "distinct_codes_mean": jnp.mean(aux["distinct_codes"].astype(jnp.float32)),
      "distinct_codes_max": jnp.max(aux["distinct_codes"]),
      "batch_codebook_usage": jnp.sum(jnp.any(aux["presence"], axis=0)),
      "grad_norm": optax.tree.norm(grads), "quantize": jnp.float32(quantize),
      "adversarial": jnp.float32(adversarial_on),
      # Loss, gradients and every updated weight (divergence check, loop.Loop).
      "finite": train_state.all_finite(nll + g_term + q_loss, grads, params, disc_params,
                                       ema),
  })
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state, disc_params=disc_params,
                            disc_stats=disc_stats, disc_opt_state=disc_opt_state,
                            history=history)
  return new_state, metrics


def jit_train_step(config, modules, shardings, mesh, *, quantize: bool = True,
                   adversarial_on: bool = True):
  """The jitted update, state donated: (state, batch, lpips_params) -> (state, metrics).
  The loop and --mode=plan share it."""
  fn = functools.partial(train_step, model=modules.model, disc=modules.disc, tx=modules.tx,
                         disc_tx=modules.disc_tx, config=config, quantize=quantize,
                         adversarial_on=adversarial_on)
  in_shardings = (shardings, sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh))
  return compile_cache.jit(
      "train_pivq", config, mesh,
      lambda: jax.jit(fn, in_shardings=in_shardings, out_shardings=(shardings, None),
                      donate_argnums=0), quantize, adversarial_on)


def run(config, workdir: str, mesh) -> dict:
  exp, state = experiment.build(config, workdir, "train", mesh)
  start_step = int(state.step)
  if start_step >= config.num_train_steps:
    logging.info("Run in %s is already complete at step %d.", exp.workdir, start_step)
    return exp.evaluate(state, start_step)

  # Up to three compiled variants, by phase: before T_q without the quantizer, then with
  # it, and from loss.disc_start_step with the GAN terms too.
  step_fns = {(q, a): jit_train_step(config, exp.modules, exp.shardings, mesh, quantize=q,
                                     adversarial_on=a)
              for q in (False, True) for a in (False, True)}
  adversarial_on = lambda step: bool(config.loss.adversarial_weight) and (
      step >= config.loss.disc_start_step)
  train_lpips = exp.lpips_params.get(config.loss.lpips_net) if config.loss.lpips_weight else None
  ci = config.codebook_init
  init_steps = {ci.start_step, *ci.reinit_steps}
  validate = config.quantizer.assignment == "matching" and config.quantizer.validate_every
  if validate:
    exact = config.copy_and_resolve_references()
    exact.quantizer.solver = "hungarian"
    check_fn = compile_cache.jit("matching_check", config, mesh, lambda: jax.jit(
        functools.partial(matching_check.matching_check, model=exp.model,
                          exact_model=train_state.build_model(exact))))

  logging.info("Training from step %d to %d.", start_step, config.num_train_steps)
  step = start_step
  with loop.Loop(exp, start_step) as train_loop:
    batches = loop.train_batches(exp, start_step + train_loop.data_offset)
    while step < config.num_train_steps:
      batch = exp.global_batch(next(batches))
      if validate and step >= ci.start_step and step % config.quantizer.validate_every == 0:
        # Same params and batch the step is about to use.
        exp.writer.write_scalars(step, matching_check.validate_matching(
            check_fn, state.params, batch, config.quantizer.num_codes))
      variant = (step >= ci.start_step, adversarial_on(step))
      state, metrics = step_fns[variant](state, batch, train_lpips)
      step += 1
      # Once `step` updates are done, so the state saved and evaluated at T_q already has
      # the new codebook and quantizes from then on. T_q = 0 has no history to fit: the
      # codebook keeps UT's uniform initialisation.
      if step in init_steps and step > 0:
        state, init_metrics = codebook_init.init_codebook(
            state, num_codes=config.quantizer.num_codes, history_steps=ci.history_steps,
            per_step=config_lib.history_latents_per_step(config),
            kmeans_iters=ci.kmeans_iters, seed=config.seed)
        exp.writer.write_scalars(step, init_metrics)
      try:
        if train_loop.after_step(step, state, metrics):
          break
      except loop.Diverged as e:  # re-raised unless config.divergence.retries allows
        state, step = train_loop.recover(e, state)
        batches = loop.train_batches(exp, step + train_loop.data_offset)
    return train_loop.finish()

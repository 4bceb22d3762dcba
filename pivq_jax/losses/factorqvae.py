"""FactorQVAE objectives and schedules (paper Eq. 5, Algorithm 1; spec/factorqvae.md).

VAE step, on the first half of the batch (L_1 of Algorithm 1):
  MSE(x, x_hat) + beta * KL(q(z|x) || p(z)) + gamma * mean(D_0(z) - D_1(z))
with the KL to Uniform(K) for the discrete posteriors and to N(0, I) for the Gaussian ones;
QLAE replaces the KL by its quantize and commit losses.
Discriminator step, on the second half (L_2, Eq. 8 as a cross-entropy):
  0.5 * [CE(D(sg z), 0) + CE(D(sg permute_dims(z')), 1)]
`models/tc_discriminator.py` holds D and `permute_dims`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from pivq_jax.models import factorqvae

# Paper Table A.3 (beta, gamma) of the best runs; the spec repeats FactorQVAE's. QLAE's
# quantize / commit weights are 1e-2 everywhere (`vae_loss` defaults).
PAPER_COEFFICIENTS = {
    "shapes3d": {
        "factorqvae": {"beta": 1e-3, "gamma": 1e-4},
        "qvae": {"beta": 1e-3, "gamma": 0.0},
        "factordvae": {"beta": 5e-3, "gamma": 5e-4},
        "dvae": {"beta": 5e-3, "gamma": 0.0},
        "factorvae": {"beta": 1e-4, "gamma": 1e-4},
        "betavae": {"beta": 1e-4, "gamma": 0.0},
    },
    "isaac3d": {
        "factorqvae": {"beta": 5e-5, "gamma": 5e-5},
        "qvae": {"beta": 5e-5, "gamma": 0.0},
        "factordvae": {"beta": 1e-5, "gamma": 1e-5},
        "dvae": {"beta": 1e-5, "gamma": 0.0},
        "factorvae": {"beta": 5e-5, "gamma": 5e-5},
        "betavae": {"beta": 5e-5, "gamma": 0.0},
    },
    "mpi3d": {
        "factorqvae": {"beta": 5e-5, "gamma": 1e-6},
        "qvae": {"beta": 5e-5, "gamma": 0.0},
        "factordvae": {"beta": 5e-5, "gamma": 5e-6},
        "dvae": {"beta": 5e-5, "gamma": 0.0},
        "factorvae": {"beta": 1e-5, "gamma": 1e-5},
        "betavae": {"beta": 1e-5, "gamma": 0.0},
    },
}


# ----------------------------------------------------------------------------------------
# Loss terms.
# ----------------------------------------------------------------------------------------
def reconstruction_loss(x, x_hat):
  """Mean squared error over every element (the reference's F.mse_loss), float32."""
  return jnp.mean(jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


def categorical_kl_uniform(logits):
  """KL(softmax(logits) || Uniform(K)), summed over K, averaged over all leading axes.

  logits: [B, d, K]. For FactorQVAE they are -R (Eq. 4) with no temperature (spec).
  """
  logits = logits.astype(jnp.float32)
  log_q = jax.nn.log_softmax(logits, axis=-1)
  k = logits.shape[-1]
  return jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q + math.log(k)), axis=-1))


def gaussian_kl(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over latents, averaged over the batch."""
  kl = -0.5 * (1.0 + logvar - jnp.square(mean) - jnp.exp(logvar))
  return jnp.mean(jnp.sum(kl, axis=-1))


def tc_estimate(disc_logits):
  """Density-ratio estimate of TC = KL(q(z) || q̄(z)) (Eq. 7): mean(D_0 - D_1), [B, 2]."""
  return jnp.mean(disc_logits[:, 0] - disc_logits[:, 1])


def qlae_losses(z_e, z_q):
  """QLAE (Hsu et al. 2023): (quantize ||z_q - sg z_e||², commit ||sg z_q - z_e||²), means."""
  quantize = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z_e)))
  commit = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z_e))
  return quantize, commit


def vae_loss(*, x, x_hat, aux, variant: str, beta: float, gamma: float = 0.0,
             disc_logits=None, quantize_weight: float = 1e-2, commit_weight: float = 1e-2):
  """The VAE-step objective L_1 (Algorithm 1; Eq. 5 negated) -> (loss, dict of terms).

  Args:
    x, x_hat: float[B, R, R, 3] images and reconstructions.
    aux: the model's aux dict (`FactorQVAE.sample_latents`).
    variant: a `factorqvae.VARIANTS` key; picks the KL (or QLAE's losses).
    beta: KL weight (Table A.3 / `PAPER_COEFFICIENTS`).
    gamma: TC weight; applied to `disc_logits`, which the TC variants must pass:
      D(aux["tc_latents"]) with the discriminator's current parameters, *not* stopped, so
      the TC gradient reaches the encoder (and codebook) through the soft sample.
    quantize_weight, commit_weight: QLAE's two losses (0.01 each).
  """
  spec = factorqvae.variant_spec(variant)
  if spec.total_correlation and disc_logits is None:
    raise ValueError(f"Variant {variant!r} needs the discriminator's logits.")
  mse = reconstruction_loss(x, x_hat)
  terms = {"mse": mse}
  if spec.posterior in ("quantized", "logits"):
    terms["kl"] = categorical_kl_uniform(aux["logits"])
    reg = beta * terms["kl"]
  elif spec.posterior == "gaussian":
    terms["kl"] = gaussian_kl(aux["mean"], aux["logvar"])
    reg = beta * terms["kl"]
  else:
    terms["quantize_loss"], terms["commit_loss"] = qlae_losses(aux["z_e"], aux["z_q"])
    reg = quantize_weight * terms["quantize_loss"] + commit_weight * terms["commit_loss"]
  loss = mse + reg
  if disc_logits is not None:
    terms["tc"] = tc_estimate(disc_logits)
    loss = loss + gamma * terms["tc"]
  terms["loss"] = loss
  return loss, terms


def tc_discriminator_loss(logits_joint, logits_permuted):
  """Discriminator step L_2 (Eq. 8): 0.5 * [CE(D(z), 0) + CE(D(z_perm), 1)].

  logits_joint: [B, 2] for the first half's latents (stop-gradiented by the caller);
  logits_permuted: [B', 2] for the permuted second half. Mean over each batch.
  """
  ce_joint = -jnp.mean(jax.nn.log_softmax(logits_joint, axis=-1)[:, 0])
  ce_perm = -jnp.mean(jax.nn.log_softmax(logits_permuted, axis=-1)[:, 1])
  return 0.5 * (ce_joint + ce_perm)


def code_perplexity(codes, num_values: int):
  """exp(entropy) of the code usage over batch and latents (the reference's perplexity)."""
  p = jnp.mean(jax.nn.one_hot(codes.reshape(-1), num_values, dtype=jnp.float32), axis=0)
  return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))


# ----------------------------------------------------------------------------------------
# Schedules and optimizers.
# ----------------------------------------------------------------------------------------
# The reference sets tau = exp(-1e-5 * global_step) before every batch; Lightning's global
# step counts optimizer steps, so it advances 2 per iteration for the TC variants (two
# optimizers) and 1 for the others.
TAU_RATE_PER_OPTIMIZER_STEP = 1e-5


def reference_tau_rate(variant: str) -> float:
  """Per-iteration tau rate that reproduces the reference: 2e-5 (TC variants) or 1e-5."""
  steps = 2 if factorqvae.variant_spec(variant).total_correlation else 1
  return steps * TAU_RATE_PER_OPTIMIZER_STEP


def tau_schedule(step, *, rate: float = 2e-5):
  """Gumbel-softmax temperature exp(-rate * step), step = training iteration (App. A)."""
  return jnp.exp(-rate * jnp.asarray(step, jnp.float32))


def cosine_schedule(*, init_value: float = 1e-3, end_value: float = 1.25e-6,
                    decay_steps: int = 50_000, periodic: bool = False) -> optax.Schedule:
  """Cosine from init_value to end_value over decay_steps (App. A), then held at end_value.

  `periodic` reproduces torch's CosineAnnealingLR(T_max=decay_steps, eta_min=end_value),
  which the reference uses: past T_max the cosine keeps going and the rate climbs back to
  init_value at 2 * T_max. That matters for the single-optimizer variants, trained 100k
  iterations with T_max = 50k; the TC variants stop at T_max.
  """
  if not periodic:
    return optax.cosine_decay_schedule(init_value, decay_steps, alpha=end_value / init_value)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    return end_value + 0.5 * (init_value - end_value) * (1.0 + jnp.cos(jnp.pi * t / decay_steps))
  return schedule


def build_optimizers(*, learning_rate: float = 1e-3, disc_learning_rate: float = 1e-3,
                     end_learning_rate: float = 1.25e-6, decay_steps: int = 50_000,
                     disc_decay_steps: int = 50_000, weight_decay: float = 0.0,
                     periodic_cosine: bool = False,
                     ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(VAE optimizer, discriminator optimizer): Adam, default betas, cosine schedules.

  The VAE optimizer updates encoder, decoder and codebook; the discriminator's updates only
  D. `weight_decay` > 0 makes the VAE optimizer AdamW (QLAE: 0.1, on all its parameters).
  Each schedule counts its own optimizer's updates, i.e. iterations.
  """
  vae_lr = cosine_schedule(init_value=learning_rate, end_value=end_learning_rate,
                           decay_steps=decay_steps, periodic=periodic_cosine)
  disc_lr = cosine_schedule(init_value=disc_learning_rate, end_value=end_learning_rate,
                            decay_steps=disc_decay_steps, periodic=periodic_cosine)
  if weight_decay:
    vae_tx = optax.adamw(vae_lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  else:
    vae_tx = optax.adam(vae_lr, b1=0.9, b2=0.999, eps=1e-8)
  return vae_tx, optax.adam(disc_lr, b1=0.9, b2=0.999, eps=1e-8)


@dataclasses.dataclass(frozen=True)
class ReferenceSetup:
  """What the reference trains each variant with (App. A; the authors' configs)."""
  batch_size: int  # per iteration; the TC variants split it in two halves
  num_iterations: int
  lr_decay_steps: int
  tau_rate: float
  weight_decay: float


def reference_setup(variant: str) -> ReferenceSetup:
  spec = factorqvae.variant_spec(variant)
  if spec.total_correlation:  # 512 split in halves, 50k iterations (100k optimizer steps)
    return ReferenceSetup(512, 50_000, 50_000, reference_tau_rate(variant), 0.0)
  return ReferenceSetup(256, 100_000, 50_000, reference_tau_rate(variant),
                        0.1 if variant == "qlae" else 0.0)

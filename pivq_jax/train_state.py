"""The train state, and the one place where config fields become module fields.

Modules take typed fields; `module_fields` copies every config field whose name is a field
of the module, so a new model field is reachable from a config by adding it to the schema
(config_lib.py) under the same name, with nothing to wire by hand.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from pivq_jax import compile_cache
from pivq_jax import config_lib
from pivq_jax import sharding as sharding_lib
from pivq_jax.losses import factorqvae as fq_losses
from pivq_jax.models import autoencoder
from pivq_jax.models import discriminator
from pivq_jax.models import factorqvae
from pivq_jax.models import tc_discriminator
from pivq_jax.quantizers import vq


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; all of it is checkpointed together."""
  step: jax.Array  # number of completed updates
  params: Any  # the autoencoder (G)
  ema_params: Any  # the weights used for eval, codes and samples (UT/paper)
  opt_state: Any
  disc_params: Any  # PatchGAN D (PI-VQ) or the TC discriminator (FactorQVAE)
  disc_stats: Any  # D's BatchNorm running statistics
  disc_opt_state: Any
  history: jax.Array  # float32[W * n, D]: encoder outputs of the last W steps (§3.7)


def _float_leaves(trees) -> list:
  return [x for t in trees for x in jax.tree.leaves(t)
          if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]


def all_finite(*trees) -> jax.Array:
  """Whether every floating leaf of `trees` is finite: the per-step divergence check, a few
  reductions on device that the loop reads only when it logs, evaluates or saves."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in _float_leaves(trees)]))


# Leaves per concatenation in `all_finite_grouped`, and the largest leaf grouped (bytes):
# big leaves are checked one by one, so a group never copies more than 64 MiB.
_FINITE_GROUP = 64
_FINITE_GROUP_MAX_BYTES = 2 ** 20


def all_finite_grouped(*trees) -> jax.Array:
  """`all_finite` for trees on one device, its small leaves in concatenated groups: XLA
  emits a kernel per reduction, so a restored state's check compiles about 3x faster (the
  faces default's 929 leaves: 1.3 s instead of 4.2 on a CPU). Not in the train step, where
  it changes XLA's fusions of the rest of the step and so the trained figures' rounding;
  not on several devices, where a concatenation would gather the shards."""
  leaves = _float_leaves(trees)
  big = lambda x: jnp.size(x) * jnp.asarray(x).dtype.itemsize > _FINITE_GROUP_MAX_BYTES
  small = [jnp.ravel(x) for x in leaves if not big(x)]
  checks = [jnp.all(jnp.isfinite(x)) for x in leaves if big(x)]
  checks += [jnp.all(jnp.isfinite(jnp.concatenate(small[i:i + _FINITE_GROUP])))
             for i in range(0, len(small), _FINITE_GROUP)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def module_fields(cls, section, **explicit) -> dict[str, Any]:
  """The fields of flax module `cls` found by name in config `section`, plus `explicit`."""
  names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  out = {}
  for k in names & set(section.keys()):
    v = section[k]
    out[k] = tuple(v) if isinstance(v, list) else v  # JSON and flags give lists
  out.update(explicit)
  return out


def build_model(config):
  """The autoencoder of config.family: PI-VQ's, or FactorQVAE (or one of its variants)."""
  dtype = jnp.dtype(config.model.dtype)
  if config.family == "factorqvae":
    return factorqvae.FactorQVAE(**module_fields(
        factorqvae.FactorQVAE, config.factorqvae, resolution=config.data.resolution,
        dtype=dtype))
  quantizer = vq.VectorQuantizer(**module_fields(vq.VectorQuantizer, config.quantizer,
                                                 dim=config.model.emb_dim))
  return autoencoder.PIVQAutoencoder(**module_fields(
      autoencoder.PIVQAutoencoder, config.model, resolution=config.data.resolution,
      quantizer=quantizer, dtype=dtype))


def build_discriminator(config):
  """PI-VQ: UT's PatchGAN. FactorQVAE: the total-correlation discriminator."""
  dtype = jnp.dtype(config.model.dtype)
  if config.family == "factorqvae":
    f = config.factorqvae
    return tc_discriminator.TCDiscriminator(hidden=f.disc_hidden,
                                            num_hidden_layers=f.disc_layers, dtype=dtype)
  return discriminator.PatchDiscriminator(
      **module_fields(discriminator.PatchDiscriminator, config.disc, dtype=dtype))


def build_optimizer(config) -> optax.GradientTransformation:
  """The autoencoder's optimizer."""
  if config.family == "factorqvae":
    return build_optimizers(config)[0]
  # UT/paper: Adam(0.9, 0.999), no weight decay, schedule or clipping; the same for D.
  o = config.optim
  lr = peak = config_lib.learning_rate(config)
  # Warm-up, decay and clipping are not in the paper (choices, default off): they help
  # short CPU runs. With all of them off the optimizer state keeps the paper's layout.
  decay = o.get("decay", "constant")
  if decay == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, peak, max(o.warmup_steps, 1), max(config.num_train_steps, o.warmup_steps + 1),
        end_value=peak * o.end_lr_factor)
  elif o.warmup_steps:
    lr = optax.linear_schedule(0.0, peak, o.warmup_steps)
  tx = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  if o.get("grad_clip_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


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


@dataclasses.dataclass(frozen=True)
class Modules:
  """The networks and optimizers of a config: what the steps close over."""
  model: Any
  disc: Any
  tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation


def build_modules(config) -> Modules:
  tx, disc_tx = build_optimizers(config)
  return Modules(build_model(config), build_discriminator(config), tx, disc_tx)


def abstract_train_state(config, modules: Modules, mesh):
  """-> (init(key) -> TrainState, abstract TrainState with shardings, shardings).

  Shapes come from `jax.eval_shape` and shardings from the rules in sharding.py, so
  nothing is allocated: `--mode=plan` compiles against this alone.
  """
  model, disc, tx, disc_tx = modules.model, modules.disc, modules.tx, modules.disc_tx
  r = config.data.resolution
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


def create_train_state(config, modules: Modules, mesh, built=None):
  """-> (a fresh TrainState, created already sharded, and its shardings); `built`: what
  `abstract_train_state` returned for these arguments, if the caller has it."""
  init, _, shardings = built or abstract_train_state(config, modules, mesh)
  # Never materialise unsharded: jit the init with output shardings (big_vision habit).
  # The init runs once, so on a CPU it is compiled with LLVM's -O1: 40-55% less compile
  # time (threefry for every leaf is most of it), bit-identical params on every config
  # (measured; tests/test_objective.py checks the tiny one).
  cpu = mesh.devices.flat[0].platform == "cpu"
  options = {"xla_backend_optimization_level": 1} if cpu else None
  init = compile_cache.jit("init", config, mesh, lambda: jax.jit(
      init, out_shardings=shardings, compiler_options=options))
  state = init(jax.random.key(config.seed))
  return state, shardings

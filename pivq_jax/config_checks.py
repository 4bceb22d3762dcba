"""The checks every config passes before anything compiles: each numeric field's range
(RANGES) and the fields' consistency with each other and with the device mesh. A failure is
a `config_lib.ConfigError` whose message is one sentence saying what to change."""

import pkgutil

from absl import logging

from pivq_jax import config_lib
from pivq_jax import sharding
from pivq_jax.losses import diffaug
from pivq_jax.losses import lpips
from pivq_jax.models import trunk
from pivq_jax.quantizers import matching

ConfigError = config_lib.ConfigError  # the same class: callers may catch it by either name


# Every numeric field a user sets: (field, low, high, low inclusive, high inclusive). None is
# unbounded. Fields that may be None (e.g. optim.learning_rate) are checked when set.
RANGES = (
    ("seed", 0, None, True, True),
    ("num_train_steps", 1, None, True, True),
    ("batch_size", 0, None, True, True),  # 0: per_device_batch_size decides
    ("per_device_batch_size", 0, None, True, True),
    ("log_every", 1, None, True, True),
    ("eval_every", 1, None, True, True),
    ("checkpoint_every", 1, None, True, True),
    ("keep_checkpoints", 1, None, True, True),
    ("divergence.retries", 0, None, True, True),
    ("data.resolution", 8, None, True, True),
    ("data.num_threads", 1, None, True, True),
    ("data.test_fraction", 0, 1, False, False),
    ("data.max_unreadable_fraction", 0, 1, True, True),
    ("model.nf", 1, None, True, True),
    ("model.res_blocks", 1, None, True, True),
    ("model.emb_dim", 1, None, True, True),
    ("model.num_latents", 1, None, True, True),
    ("model.tfm_layers", 0, None, True, True),
    ("model.tfm_heads", 1, None, True, True),
    ("model.tfm_mlp_dim", 1, None, True, True),
    ("model.norm_groups", 1, None, True, True),
    ("model.embed_std", 0, None, False, True),
    ("model.input_pos_std", 0, None, True, True),
    ("model.output_pos_std", 0, None, True, True),
    ("quantizer.num_codes", 1, None, True, True),
    ("quantizer.beta", 0, None, True, True),
    ("quantizer.validate_every", 0, None, True, True),
    ("codebook_init.start_step", 0, None, True, True),
    ("codebook_init.history_steps", 1, None, True, True),
    ("codebook_init.latents_per_step", 0, None, True, True),
    ("codebook_init.kmeans_iters", 1, None, True, True),
    ("loss.l1_weight", 0, None, True, True),
    ("loss.l2_weight", 0, None, True, True),
    ("loss.lpips_weight", 0, None, True, True),
    ("loss.adversarial_weight", 0, None, True, True),
    ("loss.disc_start_step", 0, None, True, True),
    ("disc.ndf", 1, None, True, True),
    ("disc.n_layers", 1, None, True, True),
    ("disc.translation_ratio", 0, 1, True, False),
    ("optim.learning_rate", 0, None, False, True),
    ("optim.lr_per_example", 0, None, False, True),
    ("optim.b1", 0, 1, True, False),
    ("optim.b2", 0, 1, True, False),
    ("optim.eps", 0, None, False, True),
    ("optim.warmup_steps", 0, None, True, True),
    ("optim.end_lr_factor", 0, 1, True, True),
    ("optim.grad_clip_norm", 0, None, True, True),
    ("ema.decay", 0, 1, True, False),
    ("ema.every", 1, None, True, True),
    ("plan.num_devices", 0, None, True, True),
    ("plan.utilization", 0, 1, False, True),
    ("eval.num_examples", 1, None, True, True),
    ("eval.batch_size", 1, None, True, True),
    ("eval.grid_images", 1, None, True, True),
    ("eval.num_samples", 0, None, True, True),
    ("eval.num_real", 1, None, True, True),
    ("eval.nearest_k", 1, None, True, True),
    ("eval.feature_batch_size", 1, None, True, True),
    ("eval.probe_examples", 0, None, True, True),
    ("eval.probe_folds", 2, None, True, True),
    ("eval.dci_train_examples", 0, None, True, True),
    ("eval.dci_test_examples", 0, None, True, True),
    ("sample.num_images", 1, None, True, True),
    ("sample.batch_size", 1, None, True, True),
    ("sample.grid_images", 1, None, True, True),
    ("interpolate.frames", 2, None, True, True),
    ("interpolate.paths_per_pair", 1, None, True, True),
    ("interpolate.num_random_pairs", 0, None, True, True),
    ("export.shard_size", 1, None, True, True),
    ("export.batch_size", 1, None, True, True),
    ("export.num_examples", 0, None, True, True),
    ("factorqvae.latent_dim", 1, None, True, True),
    ("factorqvae.num_values", 2, None, True, True),
    ("factorqvae.learning_rate", 0, None, False, True),
    ("factorqvae.disc_learning_rate", 0, None, False, True),
    ("factorqvae.end_learning_rate", 0, None, True, True),
    ("factorqvae.decay_steps", 1, None, True, True),
    ("factorqvae.beta", 0, None, True, True),
    ("factorqvae.gamma", 0, None, True, True),
    ("factorqvae.tau_rate", 0, None, True, True),
    ("factorqvae.weight_decay", 0, None, True, True),
)


def first_violation(config) -> str | None:
  """The sentence for the first numeric field outside its range (RANGES), or None."""
  for field, lo, hi, lo_in, hi_in in RANGES:
    node, *path = config, *field.split(".")
    for key in path:
      if key not in node:
        node = None
        break
      node = node[key]
    if node is None or isinstance(node, bool) or not isinstance(node, (int, float)):
      continue
    low_ok = lo is None or (node >= lo if lo_in else node > lo)
    high_ok = hi is None or (node <= hi if hi_in else node < hi)
    if not (low_ok and high_ok) or node != node:  # NaN fails both
      allowed = " and ".join(filter(None, (
          None if lo is None else f"{'>=' if lo_in else '>'} {lo}",
          None if hi is None else f"{'<=' if hi_in else '<'} {hi}")))
      return f"{field} is {node}; it must be {allowed}."
  return None


def resolve_batch(config, batch_ways: int) -> None:
  """Fills in config.batch_size (global) from per_device_batch_size when it is 0."""
  if config.batch_size < 0 or (config.batch_size == 0 and config.per_device_batch_size < 1):
    raise ConfigError(f"batch_size is {config.batch_size} and per_device_batch_size is "
                      f"{config.per_device_batch_size}; set batch_size (global) >= 1, or "
                      "batch_size=0 and per_device_batch_size >= 1.")
  if config.batch_size == 0:
    config.batch_size = config.per_device_batch_size * batch_ways
  # Batches that only evaluate, sample or export are rounded up to whole device multiples:
  # they change no result (subsets are counted in whole global batches either way).
  for section, field in (("eval", "batch_size"), ("sample", "batch_size"),
                         ("export", "batch_size"), ("eval", "feature_batch_size")):
    value = config[section][field]
    if value >= 1 and value % batch_ways:
      config[section][field] = -(-value // batch_ways) * batch_ways
      logging.info("%s.%s rounded up from %d to %d, a multiple of the %d data x fsdp "
                   "devices.", section, field, value, config[section][field], batch_ways)


def check_config(config, *, num_devices: int) -> None:
  """Raises ConfigError for configs that cannot train; cheap, runs before compiling."""
  if config.family not in ("pivq", "factorqvae"):
    raise ConfigError(f"family is {config.family!r}; use 'pivq' or 'factorqvae'.")
  problem = first_violation(config)
  if problem:
    raise ConfigError(problem)
  import pivq_jax.evaluators  # pylint: disable=g-import-not-at-top
  known = sorted(m.name for m in pkgutil.iter_modules(pivq_jax.evaluators.__path__)
                 if m.name != "common")
  for name in config.eval.evaluators:
    if name not in known:
      raise ConfigError(f"eval.evaluators names {name!r}, which is not a file in "
                        f"pivq_jax/evaluators/; use some of {', '.join(known)}.")
  try:
    data, fsdp, _ = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.model,
                                        num_devices)
  except sharding.MeshError as e:
    raise ConfigError(str(e)) from None
  batch_ways = data * fsdp  # the model axis holds copies of the same rows
  resolve_batch(config, batch_ways)
  if config.family == "factorqvae":
    _check_factorqvae(config, batch_ways=batch_ways)
    return
  m, q, d = config.model, config.quantizer, config.data
  if q.assignment not in ("nearest", "matching"):
    raise ConfigError(f"quantizer.assignment is {q.assignment!r}; use 'nearest' or "
                      "'matching'.")
  if q.assignment == "matching" and q.solver not in matching.SOLVERS:
    raise ConfigError(f"quantizer.solver is {q.solver!r}; use one of "
                      f"{', '.join(matching.SOLVERS)}.")
  if q.get("auction_kernel", "auto") not in matching.AUCTION_KERNELS:
    raise ConfigError(f"quantizer.auction_kernel is {q.auction_kernel!r}; use one of "
                      f"{', '.join(matching.AUCTION_KERNELS)}.")
  ci = config.codebook_init
  wants_codes = {"generative", "probing", "disentanglement"} & set(config.eval.evaluators)
  if ci.start_step > config.num_train_steps and wants_codes:
    raise ConfigError(f"codebook_init.start_step (T_q) is {ci.start_step}, after the last "
                      f"of num_train_steps={config.num_train_steps}, so the run never "
                      f"quantizes, yet eval.evaluators asks for code sets "
                      f"({', '.join(sorted(wants_codes))}); lower T_q or drop those.")
  if q.assignment == "matching" and m.num_latents > q.num_codes:
    raise ConfigError(f"Matching quantization needs L <= K, but model.num_latents="
                      f"{m.num_latents} exceeds quantizer.num_codes={q.num_codes}; lower L "
                      "or raise K.")
  factor = trunk.downsampling_factor(m.ch_mult)
  if d.resolution % factor:
    raise ConfigError(f"Image size {d.resolution} is not divisible by the trunk's "
                      f"down-sampling factor {factor} (ch_mult={tuple(m.ch_mult)}); pick a "
                      f"resolution that is a multiple of {factor}.")
  for name, batch in (("batch_size", config.batch_size),
                      ("eval.batch_size", config.eval.batch_size),
                      ("sample.batch_size", config.sample.batch_size),
                      ("export.batch_size", config.export.batch_size),
                      ("eval.feature_batch_size", config.eval.feature_batch_size)):
    if batch % batch_ways:
      raise ConfigError(f"Global {name}={batch} does not split over the mesh's "
                        f"{batch_ways} data x fsdp devices; use a multiple of {batch_ways}.")
  if m.emb_dim % m.tfm_heads:
    raise ConfigError(f"model.emb_dim={m.emb_dim} is not divisible by model.tfm_heads="
                      f"{m.tfm_heads}; pick a head count that divides it.")
  for name, ch in (("nf", m.nf),) + tuple((f"nf*ch_mult[{i}]", m.nf * c)
                                          for i, c in enumerate(m.ch_mult)):
    if ch % m.norm_groups:
      raise ConfigError(f"Trunk width {name}={ch} is not a multiple of model.norm_groups="
                        f"{m.norm_groups}, which GroupNorm needs; change model.nf.")
  ci = config.codebook_init
  if ci.history_steps < 1:
    raise ConfigError(f"codebook_init.history_steps is {ci.history_steps}; the k-means "
                      "history needs at least 1 step.")
  per_step = config_lib.history_latents_per_step(config)
  first = min(s for s in (ci.start_step, *ci.reinit_steps) if s > 0) if (
      ci.start_step or ci.reinit_steps) else None
  if first is not None and min(first, ci.history_steps) * per_step < q.num_codes:
    raise ConfigError(f"The codebook k-means at step {first} sees only "
                      f"{min(first, ci.history_steps) * per_step} latents (history of "
                      f"min(step, codebook_init.history_steps) steps x {per_step} per step), "
                      f"fewer than the K={q.num_codes} codes; raise "
                      "codebook_init.history_steps or latents_per_step.")
  if config.family == "pivq" and config.model.get("trunk_init", "flax") not in trunk.INITS:
    raise ConfigError(f"model.trunk_init is {config.model.trunk_init!r}; use one of "
                      f"{', '.join(trunk.INITS)}.")
  if config.optim.decay not in ("constant", "cosine"):
    raise ConfigError(f"optim.decay is {config.optim.decay!r}; use 'constant' or 'cosine'.")
  if config.loss.lpips_net not in lpips.NETS:
    raise ConfigError(f"loss.lpips_net is {config.loss.lpips_net!r}; use one of "
                      f"{', '.join(lpips.NETS)}.")
  if config.eval.lpips_net not in ("",) + lpips.NETS:
    raise ConfigError(f"eval.lpips_net is {config.eval.lpips_net!r}; use one of "
                      f"{', '.join(lpips.NETS)} or '' to turn it off.")
  if set(p for p in config.disc.diffaug.split(",") if p) - set(diffaug.POLICIES):
    raise ConfigError(f"disc.diffaug is {config.disc.diffaug!r}; UT's policy is "
                      "'color,translation' (or a subset, or '' for none).")
  if m.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"model.dtype is {m.dtype!r}; use 'float32' or 'bfloat16'.")
  for name, split in (("interpolate.split", config.interpolate.split),
                      ("export.split", config.export.split),
                      ("eval.real_split", config.eval.real_split)):
    if split not in ("train", "test"):
      raise ConfigError(f"{name} is {split!r}; use 'train' or 'test'.")
  ev = config.eval
  if ev.num_samples and min(ev.num_samples, ev.num_real) <= ev.nearest_k:
    raise ConfigError(f"PRDC with eval.nearest_k={ev.nearest_k} needs more than that many "
                      f"samples and real images (eval.num_samples={ev.num_samples}, "
                      f"eval.num_real={ev.num_real}); raise them or set num_samples=0.")
  # Evaluators encode fixed subsets in whole global batches (pipeline.subset_batches): a
  # subset smaller than one batch would stop the first eval, after training has compiled.
  for evaluator, count, name, batch, batch_name in (
      (None, ev.num_examples, "eval.num_examples", ev.batch_size, "eval.batch_size"),
      ("probing", ev.probe_examples, "eval.probe_examples", ev.batch_size,
       "eval.batch_size"),
      ("disentanglement", ev.dci_train_examples, "eval.dci_train_examples", ev.batch_size,
       "eval.batch_size"),
      ("disentanglement", ev.dci_test_examples, "eval.dci_test_examples", ev.batch_size,
       "eval.batch_size"),
      ("generative", ev.num_real if ev.num_samples else 0, "eval.num_real",
       ev.feature_batch_size, "eval.feature_batch_size")):
    if 0 < count < batch and evaluator in (None,) + tuple(ev.evaluators):
      raise ConfigError(f"{name}={count} is fewer than one global eval batch ({batch_name}="
                        f"{batch}); raise it or lower {batch_name}.")
  ip = config.interpolate
  if ip.frames < 2 or ip.paths_per_pair < 1 or (not ip.pairs and ip.num_random_pairs < 1):
    raise ConfigError(f"interpolate needs frames >= 2, paths_per_pair >= 1 and pairs to "
                      f"draw (got {ip.frames}, {ip.paths_per_pair}, "
                      f"{ip.num_random_pairs}); raise them.")
  if config.export.shard_size < 1:
    raise ConfigError(f"export.shard_size is {config.export.shard_size}; use a positive "
                      "number of records per shard.")


def _check_factorqvae(config, *, batch_ways: int) -> None:
  from pivq_jax.models import factorqvae  # pylint: disable=g-import-not-at-top
  f = config.factorqvae
  if f.variant not in factorqvae.VARIANTS:
    raise ConfigError(f"factorqvae.variant is {f.variant!r}; use one of "
                      f"{', '.join(factorqvae.VARIANTS)}.")
  factor = 2 ** (f.num_groups - 1)
  if config.data.resolution % factor:
    raise ConfigError(f"Image size {config.data.resolution} is not divisible by the "
                      f"encoder's down-sampling factor {factor} (num_groups={f.num_groups}); "
                      f"pick a multiple of {factor}.")
  halves = 2 if factorqvae.VARIANTS[f.variant].total_correlation else 1
  for name, batch in (("batch_size", config.batch_size // halves),
                      ("eval.batch_size", config.eval.batch_size)):
    if batch % batch_ways or (name == "batch_size" and config.batch_size % halves):
      raise ConfigError(f"Global {name}={batch} (per optimizer for the TC variants, which "
                        f"split each batch in two) does not split over the mesh's "
                        f"{batch_ways} data x fsdp devices; use a multiple of "
                        f"{halves * batch_ways}.")

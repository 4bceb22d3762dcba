"""The allowed range of every numeric config field a user sets, checked before compiling
(config_lib.check_config raises the sentence as a ConfigError)."""

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

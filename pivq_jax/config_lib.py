"""The config schema shared by every config file, and the checks run before compiling.

Config files in configs/ start from `base_config()` and override what differs, so every
field exists in every config (later features read them without special cases). Values the
paper does not fix are marked "choice".
"""

import pkgutil

from absl import logging
import ml_collections
from ml_collections import config_dict

from pivq_jax import config_ranges
from pivq_jax import sharding
from pivq_jax.losses import diffaug
from pivq_jax.losses import lpips
from pivq_jax.models import trunk
from pivq_jax.quantizers import matching


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # "pivq" (first paper) or "factorqvae" (second paper; its fields in c.factorqvae).
  c.family = "pivq"
  c.seed = 0
  c.num_train_steps = 1000
  # The global batch, across all devices and hosts. 0: per_device_batch_size times the
  # mesh's data x fsdp devices instead. check_config resolves it; the run logs both.
  c.batch_size = 16
  c.per_device_batch_size = 0
  # Where the reading modes (eval, sample, interpolate, export) write their results,
  # summaries and pictures; "" = the workdir. Lets a read-only run be evaluated elsewhere.
  c.output_dir = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = "faces"  # faces | celeba | celebahq | shapes3d | image_folder
  c.data.data_dir = config_dict.placeholder(str)  # TFDS data dir, or the image folder
  c.data.resolution = 64
  c.data.test_fraction = 0.1  # image_folder, celebahq, shapes3d: held-out share (choice)
  c.data.num_threads = 2  # grain reader threads per process
  # image_folder: unreadable files are skipped and counted; the run stops only when their
  # share of the files read passes this (choice).
  c.data.max_unreadable_fraction = 0.1

  c.model = ml_collections.ConfigDict()
  c.model.nf = 128
  c.model.ch_mult = (1, 2, 2, 4)
  c.model.res_blocks = 2
  c.model.attn_resolutions = (8,)
  c.model.emb_dim = 128  # D
  c.model.num_latents = 256  # L
  c.model.tfm_layers = 4
  c.model.tfm_heads = 8  # choice
  c.model.tfm_mlp_dim = 512  # 4 * D
  c.model.ut_unused_skip = False  # UT quirk: unused 1x1 skip params (count parity only)
  c.model.norm_groups = 32  # UT's GroupNorm(32); narrow CPU trunks may want fewer
  c.model.trunk_init = "flax"  # conv trunk init: flax (lecun normal) | torch (UT's) (choice)
  c.model.embed_std = 0.02  # init std of positional/query/output embeddings (choice)
  c.model.input_pos_std = 0.0  # encoder input positions' init std; 0: embed_std (choice)
  c.model.output_pos_std = 0.0  # decoder output embeddings' init std; 0: embed_std (choice)
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16; params stay float32

  c.quantizer = ml_collections.ConfigDict()
  c.quantizer.assignment = "nearest"  # nearest | matching
  c.quantizer.num_codes = 2048  # K
  c.quantizer.solver = "auction"  # matching: auction (on device) | hungarian | sinkhorn
  c.quantizer.beta = 0.25
  c.quantizer.beta_on_codebook = True  # UT's convention; False = VQ-VAE's
  c.quantizer.validate_every = 1000  # matching: exact host Hungarian check every N steps

  # Delayed codebook initialisation (paper §3.7): no quantization before start_step (T_q),
  # then a k-means++ (+ Lloyd) codebook fitted on device to a rolling history of the encoder
  # outputs of the last `history_steps` (W) steps, re-fitted the same way at reinit_steps.
  c.codebook_init = ml_collections.ConfigDict()
  c.codebook_init.start_step = 25_000  # T_q; 0 keeps UT's uniform init and no k-means
  c.codebook_init.history_steps = 1000  # W (choice)
  c.codebook_init.latents_per_step = 64  # sampled from each step's B*L latents; 0 = all (choice)
  c.codebook_init.kmeans_iters = 20  # Lloyd iterations after k-means++ (choice)
  c.codebook_init.reinit_steps = ()  # later re-initialisations (choice)

  # G loss = l1 + lpips (the "nll") + w * hinge G + quantizer loss, w = adversarial_weight x
  # UT's adaptive weight; D trains from disc_start_step on (ut-reference.md).
  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 1.0
  c.loss.lpips_weight = 1.0
  c.loss.lpips_net = "vgg16"  # paper/UT: vgg16; alexnet is ~20x cheaper (choice, CPU)
  c.loss.lpips_ut_input = True  # UT quirk: [0,1] images fed without the [-1,1] rescale
  c.loss.adversarial_weight = 1.0
  c.loss.disc_start_step = 100_000

  c.disc = ml_collections.ConfigDict()
  c.disc.ndf = 64
  c.disc.n_layers = 3
  c.disc.diffaug = "color,translation"  # "" turns DiffAug off
  c.disc.translation_ratio = 0.125

  c.optim = ml_collections.ConfigDict()
  # UT/paper: 4.5e-6 x the global batch, applied to whatever batch the run resolves to.
  # learning_rate, when set, is an absolute rate instead (choice).
  c.optim.lr_per_example = 4.5e-6
  c.optim.learning_rate = config_dict.placeholder(float)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.warmup_steps = 0  # linear warm-up (choice; the paper uses none)
  # After warm-up: "constant" (the paper) or "cosine" down to end_lr_factor x peak at
  # num_train_steps (choice, for short runs).
  c.optim.decay = "constant"
  c.optim.end_lr_factor = 0.1
  c.optim.grad_clip_norm = 0.0  # global-norm clipping before Adam; 0 = off (the paper)

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.995
  c.ema.every = 10

  # Device mesh (pivq_jax/sharding.py): batches split over data x fsdp; parameters and
  # optimizer state replicated on data, split on fsdp (largest dim) and model (last dim).
  # data=-1 takes the devices left over. The paper trains data-parallel (choice).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.model = 1

  # --mode=plan: compile the train step ahead of time for a target and report memory,
  # FLOPs and estimated time (pivq_jax/modes/plan.py).
  c.plan = ml_collections.ConfigDict()
  # A TPU slice ("v4-8", "v5e-16", "v5p-64", ...; compiled by libtpu on this host, no TPU
  # needed) or "" for this host's own devices (e.g. a GPU host, or CPU fake devices).
  c.plan.topology = ""
  # With topology "": plan for the first N of this host's devices (0: all of them).
  c.plan.num_devices = 0
  # Sustained share of peak FLOP/s assumed for the time estimate (choice; dense conv nets
  # typically reach 30-50%).
  c.plan.utilization = 0.4

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 512
  c.eval.batch_size = 16  # global
  c.eval.grid_images = 8  # originals + reconstructions shown in the PNG grid
  # Held-out LPIPS with the official input convention ([-1,1]), EMA params only; "" = off.
  c.eval.lpips_net = "vgg16"
  # --mode=eval only (spec §5): FID and PRDC of interpolation samples against real images
  # on FID Inception-v3 features (paper: 50k samples, 30k for CelebA-HQ), and probing.
  c.eval.num_samples = 50_000  # 0 = no generative metrics
  c.eval.num_real = 50_000  # real images (of eval.real_split, at most all of it)
  c.eval.real_split = "train"
  c.eval.nearest_k = 5  # PRDC's k (Naeem et al. 2020)
  c.eval.feature_batch_size = 64  # global, Inception at 299 px
  c.eval.probe_examples = 10_000  # test images encoded for probing; 0 = no probing
  c.eval.probe_folds = 5
  c.eval.cache_dir = ""  # real features and FID weights; "" = $PIVQ_JAX_CACHE or ~/.cache
  # DCI and InfoMEC on datasets with ground-truth factors (FactorQVAE spec: 10k train and
  # 5k test points); PI-VQ's latents are its K code-presence bits. 0 = off.
  c.eval.dci_train_examples = 10_000
  c.eval.dci_test_examples = 5_000
  # FactorQVAE's DCI trees read the raw code indices as numbers (the reference's quirk,
  # though the codebook's order is arbitrary); True gives them the selected codebook scalars,
  # whose order means something. InfoMEC is the same either way (a bijection per latent).
  c.eval.dci_code_values = False
  # What evaluates a run: files in pivq_jax/evaluators/, each deciding for itself whether it
  # applies (family, mode, step, the fields above). A new evaluator is a file + its name here.
  c.eval.evaluators = ("reconstruction", "factorqvae", "generative", "probing",
                       "disentanglement")

  # --mode=sample: interpolation samples (paper §3.5) from random training pairs.
  c.sample = ml_collections.ConfigDict()
  c.sample.num_images = 64  # FID in the paper uses 50k (30k for CelebA-HQ)
  c.sample.batch_size = 16  # global
  c.sample.grid_images = 8  # pairs shown in the PNG grid (A, B, sample)

  # --mode=interpolate: smooth paths (paper §3.5) between chosen images.
  c.interpolate = ml_collections.ConfigDict()
  # "a,b;c,d": endpoints as indices into interpolate.split or image file paths; "" picks
  # num_random_pairs random pairs.
  c.interpolate.pairs = ""
  c.interpolate.split = "test"
  c.interpolate.num_random_pairs = 4
  c.interpolate.paths_per_pair = 2  # each is another random order of the swaps
  c.interpolate.frames = 10  # decoded steps per path, evenly spaced from A (t=0) to B (t=n)

  # --mode=export: every image's code set to sharded TFRecords (schema in pivq_jax/export.py).
  c.export = ml_collections.ConfigDict()
  c.export.split = "train"
  c.export.dir = ""  # "" = <workdir>/export/<split>
  c.export.shard_size = 8192  # records per shard (choice)
  c.export.batch_size = 64  # global
  c.export.num_examples = 0  # 0 = the whole split

  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3

  # On divergence (NaN or Inf in the loss, gradients or weights) the run stops, naming the
  # last good checkpoint; nothing non-finite is ever saved. retries > 0 instead rolls back
  # to that checkpoint and goes on past the batches that led there, at most `retries` times
  # per run (choice, off by default: skipping data changes the run).
  c.divergence = ml_collections.ConfigDict()
  c.divergence.retries = 0
  return c


def factorqvae_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """FactorQVAE (second paper) on top of base_config: spec factorqvae.md, Shapes3D values.

  The PI-VQ sections stay (every field exists everywhere) but are unused; the trainer reads
  c.factorqvae, the data, batch, steps, eval and checkpoint fields.
  """
  c.family = "factorqvae"
  c.factorqvae = ml_collections.ConfigDict()
  f = c.factorqvae
  # qvae | factordvae | dvae | factorvae | betavae | qlae: same architecture (paper §5.1).
  f.variant = "factorqvae"
  f.latent_dim = 12  # d = 2 x number of factors (Shapes3D: 6)
  f.num_values = 64  # K, the one global codebook (QLAE: values per latent, 10)
  f.channels = 128
  f.num_groups = 3
  f.blocks_per_group = 2
  f.hidden_dim = 128
  f.decoder_input_channels = 64
  f.image_offset = 0.5  # the network sees x - 0.5, i.e. [-0.5, 0.5] like the reference
  # Residual-path gain; None: the reference's 1 / (num_groups * blocks_per_group)^2.
  f.residual_gain = config_dict.placeholder(float)
  f.distance = "squared"  # to the codebook: squared (reference) | absolute (Eq. 3 as printed)
  f.straight_through = False  # hard Gumbel-softmax: one-hot forward, soft gradient
  f.qlae_codebook_init = "linspace"  # QLAE's codebooks: linspace(-0.5, 0.5) | normal
  f.beta = 1e-3  # KL weight, Shapes3D (Table A.3)
  f.gamma = 1e-4  # TC weight, Shapes3D
  f.tau_rate = 2e-5  # tau = exp(-rate * iteration); the reference's global step counts 2
  f.disc_hidden = 1000
  f.disc_layers = 4
  f.learning_rate = 1e-3
  f.disc_learning_rate = 1e-3
  f.end_learning_rate = 1.25e-6
  f.decay_steps = 50_000  # cosine, both optimizers
  f.periodic_cosine = False  # the reference's CosineAnnealingLR climbs back after T_max
  f.weight_decay = 0.0  # QLAE: 0.1 (AdamW)
  c.batch_size = 512  # TC variants: two halves of 256, one per optimizer
  c.num_train_steps = 50_000
  c.codebook_init.update(start_step=0, reinit_steps=())  # PI-VQ's delayed init: unused
  c.loss.update(lpips_weight=0.0, adversarial_weight=0.0)
  c.eval.update(lpips_net="", num_samples=0, probe_examples=0, batch_size=256)
  c.ema.decay = 0.0  # the paper keeps no EMA: eval reads the trained weights
  return c


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


def learning_rate(config) -> float:
  """PI-VQ's peak learning rate: optim.learning_rate if set, else the paper's rule."""
  o = config.optim
  return o.learning_rate if o.learning_rate is not None else o.lr_per_example * config.batch_size


def history_latents_per_step(config) -> int:
  """Latents each step adds to the k-means history: a sample of its B*L, or all of them."""
  all_latents = config.batch_size * config.model.num_latents
  n = config.codebook_init.latents_per_step
  return all_latents if n <= 0 else min(n, all_latents)


class ConfigError(ValueError):
  """An invalid config, reported in one sentence before anything compiles."""


def check_config(config, *, num_devices: int) -> None:
  """Raises ConfigError for configs that cannot train; cheap, runs before compiling."""
  if config.family not in ("pivq", "factorqvae"):
    raise ConfigError(f"family is {config.family!r}; use 'pivq' or 'factorqvae'.")
  problem = config_ranges.first_violation(config)
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
  per_step = history_latents_per_step(config)
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


def paper_256px(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's 256px setting (CelebA-HQ, FFHQ): spec §1 and §6, supplemental §2."""
  c.data.resolution = 256
  c.model.update(nf=128, ch_mult=(1, 1, 2, 2, 4), res_blocks=2, attn_resolutions=(16,),
                 emb_dim=256, num_latents=512, tfm_layers=4, tfm_heads=8, tfm_mlp_dim=1024)
  c.quantizer.update(assignment="matching", num_codes=4096)
  # The paper's batch of 4 per device: 4 on one GPU as in the paper, and on N devices a
  # global batch of 4N whose learning rate follows the paper's 4.5e-6 x batch rule. Give
  # --config.batch_size for a global batch instead.
  c.batch_size = 0
  c.per_device_batch_size = 4
  c.num_train_steps = 1_400_000
  # T_q from the paper; W, the per-step sample and two re-inits are choices (§3.7 says the
  # codebook is re-initialised "more than once" over successive windows of W iterations).
  # The history is 2000 x 32 latents x D=256 floats = 65 MB, replicated.
  c.codebook_init.update(start_step=60_000, history_steps=2000, latents_per_step=32,
                         reinit_steps=(62_000, 64_000))
  c.loss.update(lpips_weight=1.0, lpips_net="vgg16", adversarial_weight=1.0,
                disc_start_step=500_000)
  c.ema.update(decay=0.995, every=10)
  c.eval.num_examples = 3000
  c.eval.batch_size = 8
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5000
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a CPU smoke test of a few steps; the data stays the same."""
  c.model.update(nf=32, ch_mult=tuple(c.model.ch_mult[:3]), res_blocks=1,
                 attn_resolutions=(), emb_dim=32, num_latents=16, tfm_layers=1, tfm_heads=2,
                 tfm_mlp_dim=64)
  c.data.resolution = min(c.data.resolution, 64)
  c.quantizer.num_codes = 64
  c.batch_size = 0  # 2 per device, so the smoke test runs on any device count
  c.per_device_batch_size = 2
  c.num_train_steps = 6
  c.optim.learning_rate = 1e-3
  c.codebook_init.update(start_step=3, history_steps=2, latents_per_step=0,
                         kmeans_iters=3, reinit_steps=(5,))
  c.loss.disc_start_step = 3
  # Eval subsets of at least one global eval batch (2 per device) on up to 32 devices.
  c.eval.update(num_examples=32, batch_size=2, grid_images=2, num_samples=32, num_real=32,
                feature_batch_size=2, probe_examples=32, dci_train_examples=64,
                dci_test_examples=32)
  c.log_every = c.eval_every = c.checkpoint_every = 3
  return c

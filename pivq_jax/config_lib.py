"""The config schema shared by every config file (its checks: `config_checks`).

Config files in configs/ start from `base_config()` and override what differs, so every
field exists in every config (later features read them without special cases). Values the
paper does not fix are marked "choice".
"""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # "pivq" (first paper) or "factorqvae" (second paper; its fields in c.factorqvae).
  c.family = "pivq"
  c.seed = 0
  c.num_train_steps = 1000
  # The global batch, across all devices and hosts. 0: per_device_batch_size times the
  # mesh's data x fsdp devices instead. config_checks resolves it; the run logs both.
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
  # The auction as one fused Pallas kernel (a GPU that compiles it) or pure JAX: the same
  # algorithm and bound, so not part of a workdir's identity. auto | xla | pallas (off
  # GPU: interpreted, slowly).
  c.quantizer.auction_kernel = "auto"
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
  # A squared-error term in the nll beside L1 (choice; the paper and UT have none): PSNR
  # is a squared-error measure (docs/faces_study.md, round 11).
  c.loss.l2_weight = 0.0
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

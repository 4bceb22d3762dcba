"""PI-VQ on the procedural aligned faces: the embedded default, CPU-sized.

  python -m pivq_jax.main --config=configs/faces.py --workdir=/tmp/pivq_faces

Trains 2600 steps in under 10 minutes on 2 CPU cores with no downloads. Everything here
is scaled down from celeba64.py (a choice; the paper has no such setting). The schedule still has the
paper's phases: unquantized warm-up, then k-means++ codebook initialisation at T_q, then
quantized training.
`:runlocal` shrinks it to a smoke test of a few steps.
"""

from pivq_jax import config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.data.name = "faces"
  c.data.resolution = 64

  # A CPU-sized trunk (2 CPU cores are compute-bound at ~85 GFLOP/s): 1 res block per
  # level, widths 16-64, no trunk attention, GroupNorm(8) (UT's 32 groups would be
  # per-channel norms at these widths, which learned ~1.4 dB slower). 64px -> 8x8 grid.
  c.model.nf = 16
  c.model.ch_mult = (1, 2, 4, 4)
  c.model.res_blocks = 1
  c.model.attn_resolutions = ()
  c.model.norm_groups = 8
  c.model.emb_dim = 64
  c.model.num_latents = 32
  c.model.tfm_layers = 2
  c.model.tfm_heads = 4
  c.model.tfm_mlp_dim = 256

  # Matching (the paper's method): every image uses L=32 distinct codes. Measured here,
  # nearest collapsed to 1 distinct code per image and 6 codes overall (16.3 dB held-out
  # PSNR) where matching kept 32 per image and ~200 overall (~20 dB). The exact host
  # Hungarian costs ~1 ms per batch at 32x256.
  c.quantizer.assignment = "matching"
  c.quantizer.solver = "hungarian"  # exact; the auction is 3-7x slower at this size on CPU
  c.quantizer.validate_every = 0  # nothing to validate: the solver is the exact one
  c.quantizer.num_codes = 256

  # ~5.5 steps/s on 2 cores: 2600 steps + start-up + evals fit in 10 minutes.
  c.batch_size = 8
  c.num_train_steps = 2600
  c.optim.learning_rate = 3e-4  # above the paper's 4.5e-6 x batch: minutes, not days
  c.codebook_init.start_step = 1000  # T_q
  c.codebook_init.history_steps = 32  # W
  c.codebook_init.latents_per_step = 0  # all 8 x 32 latents of each step
  c.codebook_init.reinit_steps = (1300,)
  c.loss.lpips_net = "alexnet"
  c.loss.disc_start_step = 1800
  c.disc.ndf = 16
  c.ema.decay = 0.99  # the paper's 0.995 every 10 steps would lag a 2k-step run by ~2k
  c.ema.every = 1

  c.eval.num_examples = 512
  c.eval.batch_size = 64
  c.log_every = 50
  c.eval_every = 1300
  c.checkpoint_every = 500

  if arg == "runlocal":
    c.num_train_steps = 6
    c.codebook_init.update(start_step=3, history_steps=2, reinit_steps=(5,))
    c.loss.disc_start_step = 4
    c.eval.num_examples = 64
    c.log_every = c.eval_every = c.checkpoint_every = 3
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'runlocal' or nothing.")
  return c

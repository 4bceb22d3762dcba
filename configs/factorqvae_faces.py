"""FactorQVAE on the procedural faces, CPU-sized (second paper; spec factorqvae.md).

  python -m pivq_jax.main --config=configs/factorqvae_faces.py --workdir=/tmp/fq_faces
  python -m pivq_jax.main --config=configs/factorqvae_faces.py --workdir=/tmp/fq_faces \
      --mode=eval

The faces' nine ground-truth factors stand in for Shapes3D's six, so d = 18 (the paper's
2 x factors). The trunk is narrowed and the schedule shortened to run in minutes on 2 CPU
cores (a choice; β, γ and the τ rate are the Shapes3D values). `--config.factorqvae.variant`
switches to qvae, factordvae, dvae, factorvae, betavae or qlae on the same architecture.
`:runlocal` shrinks it to a smoke test of a few steps.
"""

from pivq_jax import config_lib


def get_config(arg: str | None = None):
  c = config_lib.factorqvae_config(config_lib.base_config())
  c.data.name = "faces"
  c.data.resolution = 64
  c.factorqvae.update(latent_dim=18, channels=32, hidden_dim=64, decoder_input_channels=16,
                      disc_hidden=256)
  c.batch_size = 64  # two halves of 32
  c.num_train_steps = 1500
  c.factorqvae.decay_steps = c.num_train_steps
  # tau = exp(-rate * step) reaches ~0.05 by the end, as the paper's schedule does by 50k.
  c.factorqvae.tau_rate = 2e-3
  c.eval.update(num_examples=512, batch_size=64, dci_train_examples=4000,
                dci_test_examples=2000)
  c.log_every = 50
  c.eval_every = 750
  c.checkpoint_every = 500
  if arg == "runlocal":
    c.factorqvae.update(channels=8, hidden_dim=16, decoder_input_channels=8, disc_hidden=16)
    c.data.resolution = 32
    c.batch_size = 8
    c.num_train_steps = 4
    c.eval.update(num_examples=16, batch_size=8, grid_images=4, dci_train_examples=64,
                  dci_test_examples=32)
    c.log_every = c.eval_every = c.checkpoint_every = 2
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'runlocal' or nothing.")
  return c

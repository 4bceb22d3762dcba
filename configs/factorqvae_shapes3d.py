"""FactorQVAE on Shapes3D with the paper's hyperparameters (spec factorqvae.md, App. A).

  python -m pivq_jax.main --config=configs/factorqvae_shapes3d.py \
      --workdir=gs://BUCKET/fq_shapes3d --config.data.data_dir=$TFDS_DATA_DIR

Needs TFDS `shapes3d` prepared in ArrayRecord format (`tfds build shapes3d
--file_format=array_record`). 64 px, d = 12, K = 64, β = 1e-3, γ = 1e-4, batch 512 in two
halves, 50k iterations, lr 1e-3 cosine to 1.25e-6. Paper (Table 1): D .86, I .97, C .65,
InfoM .84, InfoE .89, InfoC .52. `--config.factorqvae.variant=qvae` (or dvae, factordvae,
betavae, factorvae, qlae) gives the baselines; `:runlocal` is a CPU smoke test on the same
data.
"""

from pivq_jax import config_lib


def get_config(arg: str | None = None):
  c = config_lib.factorqvae_config(config_lib.base_config())
  c.data.name = "shapes3d"
  c.data.resolution = 64
  c.eval.update(num_examples=5000, batch_size=256)
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5000
  if arg == "runlocal":
    c.factorqvae.update(channels=8, hidden_dim=16, decoder_input_channels=8, disc_hidden=16)
    c.batch_size = 8
    c.num_train_steps = 4
    c.eval.update(num_examples=8, batch_size=4, grid_images=4, dci_train_examples=8,
                  dci_test_examples=8)
    c.log_every = c.eval_every = c.checkpoint_every = 2
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'runlocal' or nothing.")
  return c

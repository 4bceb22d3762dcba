"""PI-VQ on FFHQ 256x256 with the paper's hyperparameters (spec §6).

  python -m pivq_jax.main --config=configs/ffhq.py --workdir=gs://BUCKET/pivq_ffhq \
      --config.data.data_dir=/data/ffhq256

Reads a folder of FFHQ PNG/JPEG images (any size; centre-cropped and resized to 256).
Pre-resized 256px files read ~15x faster than the 1024px originals. Unreadable files are
skipped and counted in the log. Paper result (Table 3): FID 23.4, P .69, R .19, D 1.02,
C .55. `:runlocal` shrinks the model and schedule to a CPU smoke test on the same folder.
"""

from pivq_jax import config_lib


def get_config(arg: str | None = None):
  c = config_lib.paper_256px(config_lib.base_config())
  c.data.name = "image_folder"
  c.data.test_fraction = 0.1  # held-out share by a hash of each file's path (choice)
  if arg == "runlocal":
    config_lib.runlocal(c)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'runlocal' or nothing.")
  return c

"""PI-VQ on CelebA-HQ 256x256 with the paper's hyperparameters (spec §6).

  python -m pivq_jax.main --config=configs/celebahq.py --workdir=gs://BUCKET/pivq_celebahq \
      --config.data.data_dir=$TFDS_DATA_DIR
  launch/tpu_vm.sh --name=pivq --zone=us-central2-b --accelerator=v4-8 --create \
      --workdir=gs://BUCKET/pivq_celebahq --tfds-data-dir=gs://BUCKET/tfds \
      --config=configs/celebahq.py
  python -m pivq_jax.main --config=configs/celebahq.py --workdir=/tmp/plan --mode=plan \
      --config.plan.topology=v4-8   # memory, FLOPs and days, compiled without a TPU

Needs TFDS `celeb_a_hq` prepared in ArrayRecord format (it requires a manual download into
TFDS's manual_dir). Paper result (Table 3): FID 22.8, P .85, R .10, D 1.88, C .69.
`:runlocal` shrinks the model and schedule to a CPU smoke test on the same data.
"""

from pivq_jax import config_lib


def get_config(arg: str | None = None):
  c = config_lib.paper_256px(config_lib.base_config())
  c.data.name = "celebahq"
  c.eval.update(num_samples=30_000, num_real=30_000)  # Table 3 uses 30k for CelebA-HQ
  if arg == "runlocal":
    config_lib.runlocal(c)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'runlocal' or nothing.")
  return c

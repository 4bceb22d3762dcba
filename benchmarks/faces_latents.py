"""Dumps a trained run's encoder latents and codebook for `benchmarks/matching.py`.

  python benchmarks/faces_latents.py --workdir=workdir/faces --out=/tmp/faces_latents.npz

Writes `latents` float32[N, L, D] (EMA encoder on N held-out images) and `codebook`
float32[K, D]: realistic matching instances, collapsed the way trained encoders are.
"""

import json

from absl import app
from absl import flags
from etils import epath
import jax
import numpy as np

from pivq_jax import config_lib
from pivq_jax import checkpoints
from pivq_jax import experiment
from pivq_jax import train_state
from pivq_jax.data import pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.", required=True)
_OUT = flags.DEFINE_string("out", "/tmp/faces_latents.npz", "Output .npz path.")
_NUM = flags.DEFINE_integer("num_images", 64, "Held-out images to encode.")


def main(_):
  # The schema's defaults first: workdirs from older versions lack newer fields.
  config = config_lib.base_config()
  config.update(json.loads((epath.Path(_WORKDIR.value) / "config.json").read_text()))
  mesh = experiment.make_mesh(config)
  modules = train_state.build_modules(config)
  model = modules.model
  state, shardings = train_state.create_train_state(config, modules, mesh)
  mngr = checkpoints.manager(_WORKDIR.value, keep=config.keep_checkpoints)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint in {_WORKDIR.value}/checkpoints; train first.")
  state = checkpoints.restore_or_keep(mngr, state, shardings)
  batches = pipeline.eval_batches(pipeline.make_source(config.data, "test"),
                                  num_examples=_NUM.value, batch_size=8)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x / 255.0, method="encode"))
  latents = np.concatenate([np.asarray(encode(state.ema_params, b["image"]))
                            for b in batches])
  codebook = np.asarray(state.ema_params["quantizer"]["codebook"])
  np.savez(_OUT.value, latents=latents.astype(np.float32),
           codebook=codebook.astype(np.float32))
  print(f"step {int(state.step)}: latents {latents.shape}, codebook {codebook.shape} -> "
        f"{_OUT.value}")


if __name__ == "__main__":
  app.run(main)

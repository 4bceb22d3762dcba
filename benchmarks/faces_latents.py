"""Dumps a trained run's encoder latents and codebook for `benchmarks/matching.py`.

  python benchmarks/faces_latents.py --workdir=workdir/faces --out=/tmp/faces_latents.npz

Writes `latents` float32[N, L, D] (EMA encoder on N held-out images) and `codebook`
float32[K, D]: realistic matching instances, collapsed the way trained encoders are.
"""

from absl import app
from absl import flags
import jax
import numpy as np

import pivq_jax
from pivq_jax.data import pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.", required=True)
_OUT = flags.DEFINE_string("out", "/tmp/faces_latents.npz", "Output .npz path.")
_NUM = flags.DEFINE_integer("num_images", 64, "Held-out images to encode.")


def main(_):
  run = pivq_jax.load(_WORKDIR.value)  # the EMA params and config only
  batches = pipeline.eval_batches(pipeline.make_source(run.config.data, "test"),
                                  num_examples=_NUM.value, batch_size=8)
  encode = jax.jit(lambda p, x: run.model.apply({"params": p}, pipeline.images({"image": x}),
                                                method="encode"))
  latents = np.concatenate([np.asarray(encode(run.params, b["image"])) for b in batches])
  codebook = np.asarray(run.params["quantizer"]["codebook"])
  np.savez(_OUT.value, latents=latents.astype(np.float32),
           codebook=codebook.astype(np.float32))
  print(f"step {run.step}: latents {latents.shape}, codebook {codebook.shape} -> "
        f"{_OUT.value}")


if __name__ == "__main__":
  app.run(main)

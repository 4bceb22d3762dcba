"""Export throughput: encode + write TFRecords against encode alone, in images per second.

  python benchmarks/export.py [--config=configs/faces.py] [--num_images=2048]
      [--batch_size=64] [--rounds=2] [--out=export.json]

Both arms read the same images of the config's test split through the same grain loader
and run the same jitted encoder (EMA-shaped params at init: the cost does not depend on
training). "encode" fetches every batch's codes to the host and drops them; "encode+write"
is the real `export.write` (tf.train.Example serialisation, temp-name shards, rename,
manifest with hashes). Arms alternate for `rounds` rounds and each keeps its best; the
ratio is the price of writing.
"""

import functools
import importlib.util
import json
import tempfile
import time

from absl import app
from absl import flags
import grain
import jax
import numpy as np

from pivq_jax import export
from pivq_jax import experiment
from pivq_jax import sampling
from pivq_jax import sharding as sharding_lib
from pivq_jax import train_state
from pivq_jax.data import pipeline

_CONFIG = flags.DEFINE_string("config", "configs/faces.py", "Config file.")
_NUM = flags.DEFINE_integer("num_images", 2048, "Images per arm and round.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global encode batch.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Interleaved rounds; the best counts.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")


def _load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv):
  del argv
  config = _load(_CONFIG.value)
  mesh = experiment.make_mesh(config)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  modules = train_state.build_modules(config)
  model = modules.model
  state, _ = train_state.create_train_state(config, modules, mesh)
  fn = jax.jit(functools.partial(sampling.encode_step, model=model), out_shardings=replicated)
  encode = lambda images: fn(state.ema_params, sharding_lib.global_batch({"image": images},
                                                                    sharding))
  source = pipeline.make_source(config.data, "test")
  n, b = min(_NUM.value, len(source)), _BATCH.value
  encode(np.stack([source[0]["image"]] * b)).block_until_ready()  # compile

  def encode_only():
    ds = grain.MapDataset.source(source)[:n].batch(b)
    pending = None
    for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads,
                                                      prefetch_buffer_size=4)):
      images = batch["image"]
      if len(images) < b:
        images = np.concatenate([images, np.repeat(images[-1:], b - len(images), 0)])
      codes = encode(images)
      if pending is not None:
        np.asarray(pending)
      pending = codes
    np.asarray(pending)

  def encode_write():
    with tempfile.TemporaryDirectory() as d:
      export.write(encode, source, d, split="test", shard_size=max(n // 4, 1), batch_size=b,
                   spec={"benchmark": True}, num_examples=n,
                   num_threads=config.data.num_threads)

  best = {"encode": np.inf, "encode+write": np.inf}
  for _ in range(_ROUNDS.value):
    for name, arm in (("encode", encode_only), ("encode+write", encode_write)):
      t = time.perf_counter()
      arm()
      best[name] = min(best[name], time.perf_counter() - t)
  rates = {k: n / v for k, v in best.items()}
  print(f"{_CONFIG.value}: {n} images, batch {b}, {jax.devices()[0].platform}")
  for k, v in rates.items():
    print(f"  {k:13s} {v:9.1f} images/s")
  print(f"  encode+write / encode: {rates['encode+write'] / rates['encode']:.2f}x throughput")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"config": _CONFIG.value, "num_images": n, "batch_size": b,
                 "images_per_second": rates}, f, indent=2)


if __name__ == "__main__":
  app.run(main)

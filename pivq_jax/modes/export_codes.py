"""--mode=export: every image's code set (EMA params) to sharded TFRecords (schema in
pivq_jax/export.py), resumable, with a manifest tying it to the config and checkpoint."""

import functools
import hashlib
import json
import os

from etils import epath
import jax
import numpy as np

from pivq_jax import checkpoints
from pivq_jax import compile_cache
from pivq_jax import experiment
from pivq_jax import export
from pivq_jax import sampling
from pivq_jax import sharding as sharding_lib
from pivq_jax.data import pipeline


def params_fingerprint(params) -> str:
  """SHA-256 of the weights actually encoded (names, shapes, dtypes and bytes): ties an
  export to them, not only to a config and a step number."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(sharding_lib.to_host(params))[0]:
    x = np.ascontiguousarray(x)
    h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype};".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def run(config, workdir: str, mesh) -> dict:
  e = config.export
  root = config.output_dir or workdir
  root = root if "://" in root else os.path.abspath(root)
  out_dir = e.dir or str(epath.Path(root) / "export" / e.split)
  checkpoints.check_writable(out_dir, "The export directory")  # before anything compiles
  with checkpoints.lock(out_dir, "The export directory"):
    return _export(config, workdir, mesh, out_dir)


def _export(config, workdir: str, mesh, out_dir: str) -> dict:
  exp, state = experiment.build(config, workdir, "export", mesh)
  e, step = config.export, int(state.step)
  fn = compile_cache.jit("export", config, mesh, lambda: jax.jit(
      functools.partial(sampling.encode_step, model=exp.model),
      out_shardings=sharding_lib.replicated(mesh)))
  encode = lambda images: fn(state.ema_params, exp.global_batch({"image": images}))
  source = exp.sources[e.split]
  raw = source.unfiltered if isinstance(source, pipeline.SkipInvalid) else source
  config_json = json.loads(config.to_json_best_effort())
  identity = checkpoints.identity(config_json)
  model_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
  spec = {"checkpoint_step": step, "model_sha256": model_sha256,
          "params_sha256": params_fingerprint(state.ema_params)}
  manifest = export.write(
      encode, raw, out_dir, split=e.split, shard_size=e.shard_size, batch_size=e.batch_size,
      spec=spec, num_examples=e.num_examples, label_names=pipeline.label_names(raw),
      ids=getattr(raw, "paths", None), process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=config.data.num_threads,
      extra_manifest={"workdir": exp.workdir, "num_latents": config.model.num_latents,
                      "num_codes": config.quantizer.num_codes,
                      "assignment": config.quantizer.assignment, "config": config_json})
  return {"export/num_records": manifest.get("num_records", 0),
          "export/num_shards": len(manifest.get("shards", ()))}

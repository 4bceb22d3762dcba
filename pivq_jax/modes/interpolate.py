"""--mode=interpolate: smooth paths (paper §3.5) from A to B, each step swapping one code
of A for one of B. Endpoints are dataset indices of interpolate.split or image files."""

import functools
import json

from absl import logging
from etils import epath
import jax
import numpy as np

from pivq_jax import compile_cache
from pivq_jax import config_lib
from pivq_jax import experiment
from pivq_jax import sampling
from pivq_jax import sharding as sharding_lib
from pivq_jax import visualize
from pivq_jax.data import image_folder


def parse_pairs(pairs: str, source, resolution: int) -> list[tuple[tuple[str, str], list]]:
  """"a,b;c,d" -> [((a, b), [image_a, image_b]), ...]; each end a dataset index or a file."""
  out = []
  for pair in pairs.split(";"):
    ends = [e.strip() for e in pair.split(",")]
    if len(ends) != 2 or not all(ends):
      raise config_lib.ConfigError(
          f"interpolate.pairs has {pair!r}, which is not two endpoints; write pairs as "
          "'a,b;c,d' with dataset indices or image file paths.")
    images = []
    for end in ends:
      if end.lstrip("-").isdigit():
        if not 0 <= int(end) < len(source):
          raise config_lib.ConfigError(
              f"interpolate.pairs index {end} is outside the {len(source)} images of the "
              "split; use an index below that or an image file path.")
        images.append(source[int(end)]["image"])
      else:
        images.append(image_folder.load_image(end, resolution))
    out.append((tuple(ends), images))
  return out


def run(config, workdir: str, mesh) -> dict:
  """Writes interpolations/<step>/{frames,codes,lengths}.npy, pairs.json and a PNG grid."""
  exp = experiment.Experiment(config, workdir, "interpolate", mesh)
  ip = config.interpolate
  source = exp.sources[ip.split]
  pairs = ip.pairs or ";".join(  # random pairs of the split, the same for every step
      f"{a},{b}" for a, b in np.random.default_rng(config.seed).integers(
          0, len(source), (ip.num_random_pairs, 2)))
  pairs = parse_pairs(pairs, source, config.data.resolution)  # bad pairs: before compiling
  state = exp.create_state()

  step, per = int(state.step), ip.paths_per_pair
  images_a = np.stack([images[0] for _, images in pairs for _ in range(per)])
  images_b = np.stack([images[1] for _, images in pairs for _ in range(per)])
  keys = jax.random.split(jax.random.key(config.seed), len(images_a))
  fn = compile_cache.jit("interpolate", config, mesh, lambda: jax.jit(
      functools.partial(sampling.path_step, model=exp.model, frames=ip.frames)), ip.frames)
  codes_a, codes_b, n, codes, decoded = sharding_lib.to_host(
      fn(state.ema_params, images_a, images_b, keys))
  frames = visualize.to_uint8(decoded)
  out_dir = epath.Path(exp.output_dir) / "interpolations" / f"{step:08d}"
  if jax.process_index() == 0:
    visualize.save_array(out_dir / "frames.npy", frames)
    visualize.save_array(out_dir / "codes.npy", np.asarray(codes))
    visualize.save_array(out_dir / "lengths.npy", np.asarray(n))
    visualize.write_atomic(out_dir / "pairs.json", json.dumps(
        [ends for ends, _ in pairs for _ in range(per)]).encode())
  # One row per path: A, the decoded steps (A's and B's reconstructions at the ends), B.
  rows = [np.concatenate([images_a[i:i + 1], frames[i], images_b[i:i + 1]])
          for i in range(len(frames))]
  exp.write_image(step, "interpolate", "interpolate/paths", visualize.grid(rows))
  exp.writer.flush()
  # Endpoints must be A's and B's own code sets (sorted, as the path frames are).
  ends_ok = np.all(codes[:, 0] == np.sort(codes_a, -1)) and np.all(
      codes[:, -1] == np.sort(codes_b, -1))
  logging.info("Wrote %d interpolation paths of step %d to %s.", len(frames), step, out_dir)
  return {"interpolate/num_paths": len(frames), "interpolate/mean_length": float(n.mean()),
          "interpolate/endpoints_exact": bool(ends_ok)}

"""A trained PI-VQ run in Python: `pivq_jax.load(workdir)`.

  import pivq_jax
  run = pivq_jax.load("workdir/faces")
  codes = run.encode(images)          # images: [N, R, R, 3], uint8 or float in [0, 1]
  images = run.decode(codes)          # codes: int [N, L] -> float32 [N, R, R, 3] in [0, 1]
  mixed = run.sample(images_a, images_b)

Only the EMA params (the weights the paper evaluates) and the config are read, with an
orbax partial restore: no optimizer, discriminator or k-means history.
"""

import functools
import json

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pivq_jax import config_lib
from pivq_jax import sampling
from pivq_jax import train_state


class ApiError(ValueError):
  """A bad argument to the API, reported in one sentence."""


def _config(workdir: epath.Path) -> ml_collections.ConfigDict:
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; point load() at the --workdir of a "
                            "training run.")
  saved = json.loads(path.read_text())
  config = config_lib.base_config()
  if saved.get("family") == "factorqvae":
    config = config_lib.factorqvae_config(config)
  config.update(saved)  # the schema's defaults first: older workdirs lack newer fields
  return config


def load(workdir, step: int | None = None, batch_size: int = 64) -> "TrainedModel":
  """The EMA params of `workdir`'s latest checkpoint (or `step`) with its config."""
  workdir = epath.Path(workdir)
  config = _config(workdir)
  if config.family != "pivq":
    raise ApiError(f"{workdir} is a {config.family} run; load() serves PI-VQ runs (code "
                   "sets); use --mode=eval for FactorQVAE.")
  model = train_state.build_model(config)
  r = config.data.resolution
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, r, r, 3)))["params"])
  with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {workdir / 'checkpoints'}; train first.")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ApiError(f"No checkpoint at step {step} in {workdir}; there are {sorted(steps)}.")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          shapes)
  restored = ocp.PyTreeCheckpointer().restore(
      workdir / "checkpoints" / str(step) / "default",
      args=ocp.args.PyTreeRestore(
          item={"ema_params": abstract}, partial_restore=True,
          restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=sharding),
                                    {"ema_params": abstract})))
  return TrainedModel(config, model, restored["ema_params"], step, batch_size)


class TrainedModel:
  """Encode, decode and mix images with a trained run's EMA params. Every method takes
  and returns numpy arrays, runs jitted in batches of `batch_size` (padded, so one compile
  per method), and checks its arguments before running."""

  def __init__(self, config, model, params, step: int, batch_size: int = 64):
    self.config, self.model, self.params, self.step = config, model, params, step
    self.batch_size = batch_size
    self.resolution = config.data.resolution
    self.num_latents = config.model.num_latents
    self.num_codes = config.quantizer.num_codes
    self.matching = config.quantizer.assignment == "matching"
    self._encode = jax.jit(functools.partial(sampling.encode_step, model=model))
    self._decode = jax.jit(lambda p, c: model.apply({"params": p}, c,
                                                    method="decode_indices"))
    self._sample = jax.jit(functools.partial(sampling.sample_step, model=model))

  # -- argument checks ---------------------------------------------------------------------
  def _images(self, images, name: str = "images") -> np.ndarray:
    """[N, R, R, 3] uint8, or float in [0, 1] -> uint8 (the models' input convention)."""
    x = np.asarray(images)
    r = self.resolution
    if x.ndim == 3:
      x = x[None]
    if x.ndim != 4 or x.shape[1:] != (r, r, 3):
      raise ApiError(f"{name} has shape {x.shape}, but this model takes [N, {r}, {r}, 3] "
                     f"images; resize them to {r}x{r} RGB first.")
    if x.dtype == np.uint8:
      return x
    if not np.issubdtype(x.dtype, np.floating):
      raise ApiError(f"{name} has dtype {x.dtype}; pass uint8 in [0, 255] or floats in "
                     "[0, 1].")
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
      raise ApiError(f"{name} has values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}], "
                     "outside [0, 1]; pass floats in [0, 1] (divide uint8 by 255).")
    return np.floor(x * 255.0 + 0.5).astype(np.uint8)

  def _codes(self, codes) -> np.ndarray:
    c = np.asarray(codes)
    if c.ndim == 1:
      c = c[None]
    if c.ndim != 2 or c.shape[1] != self.num_latents or not np.issubdtype(c.dtype,
                                                                           np.integer):
      raise ApiError(f"codes have shape {c.shape} and dtype {c.dtype}; pass integers of "
                     f"shape [N, {self.num_latents}] (L = model.num_latents).")
    if c.size and (c.min() < 0 or c.max() >= self.num_codes):
      raise ApiError(f"codes range over [{c.min()}, {c.max()}], outside the codebook's "
                     f"[0, {self.num_codes - 1}]; pass indices of this run's codebook.")
    if self.matching and any(len(np.unique(row)) != len(row) for row in c):
      raise ApiError("Some code sets repeat a code, but this matching run's decoder was "
                     f"trained on sets of {self.num_latents} distinct codes; pass distinct "
                     "codes per row.")
    return c.astype(np.int32)

  def _batched(self, fn, *arrays):
    """fn over `arrays` in padded batches of batch_size; outputs concatenated, unpadded."""
    n, b = len(arrays[0]), self.batch_size
    outs = []
    for start in range(0, n, b):
      chunk = [a[start:start + b] for a in arrays]
      pad = b - len(chunk[0])
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) if pad else c for c in chunk]
      out = jax.device_get(fn(*chunk))
      outs.append(jax.tree.map(lambda o: np.asarray(o)[:b - pad], out))
    return jax.tree.map(lambda *o: np.concatenate(o), *outs)

  # -- the API ---------------------------------------------------------------------------------
  def encode(self, images) -> np.ndarray:
    """Images [N, R, R, 3] (uint8, or float in [0, 1]) -> code sets int32 [N, L], each row
    ascending (the order carries nothing: the decoder is permutation invariant)."""
    x = self._images(images)
    return self._batched(lambda b: self._encode(self.params, {"image": b}), x)

  def decode(self, codes) -> np.ndarray:
    """Code sets int [N, L] (distinct per row under matching) -> float32 [N, R, R, 3],
    clipped to [0, 1]."""
    c = self._codes(codes)
    out = self._batched(lambda b: self._decode(self.params, b), c)
    return np.clip(out, 0.0, 1.0)

  def reconstruct(self, images) -> np.ndarray:
    """decode(encode(images)): float32 [N, R, R, 3] in [0, 1]."""
    return self.decode(self.encode(images))

  def sample(self, images_a, images_b, seed: int = 0) -> np.ndarray:
    """Interpolation samples (paper §3.5): for each pair, C = A ∩ B plus a uniform draw
    from A △ B, decoded -> float32 [N, R, R, 3] in [0, 1]. Needs a matching run."""
    self._needs_matching("sample")
    a, b = self._images(images_a, "images_a"), self._images(images_b, "images_b")
    if len(a) != len(b):
      raise ApiError(f"images_a has {len(a)} images and images_b {len(b)}; pass pairs.")
    keys = np.arange(len(a), dtype=np.uint32) + np.uint32(seed)
    fn = lambda x, y, k: self._sample(self.params, {"image": x}, {"image": y},
                                      jax.random.key(k[0]))
    return np.clip(self._batched(fn, a, b, keys)[3], 0.0, 1.0)

  def interpolate(self, image_a, image_b, frames: int = 8, seed: int = 0) -> np.ndarray:
    """A smooth path (paper §3.5) from one image to another, swapping one code at a time:
    -> float32 [frames, R, R, 3] in [0, 1], A's reconstruction first and B's last."""
    self._needs_matching("interpolate")
    if frames < 2:
      raise ApiError(f"frames is {frames}; a path needs at least 2 (its two ends).")
    a, b = self._images(image_a, "image_a"), self._images(image_b, "image_b")
    if len(a) != 1 or len(b) != 1:
      raise ApiError("interpolate() takes one image at each end; call it once per pair.")
    codes_a, codes_b = self.encode(a)[0], self.encode(b)[0]
    path, n = jax.jit(functools.partial(sampling.smooth_path, num_codes=self.num_codes))(
        codes_a, codes_b, jax.random.key(seed))
    t = np.round(np.linspace(0.0, 1.0, frames) * int(n)).astype(int)
    return self.decode(np.asarray(path)[t])

  def _needs_matching(self, what: str) -> None:
    if not self.matching:
      raise ApiError(f"{what}() needs code sets of L distinct codes, which only matching "
                     "runs have; this run uses nearest assignment.")

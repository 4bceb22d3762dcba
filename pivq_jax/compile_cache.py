"""One jitted function per (purpose, config, mesh) in a process.

A process that runs the same config more than once (a notebook, a sweep, resume after an
error, the test suite) traces and compiles each step once. It matters most for steps with
host callbacks (the exact Hungarian), which JAX's persistent compilation cache cannot hold.
The jitted functions close over modules built from the same config, so they are
interchangeable between runs of it.
"""

import collections
import json
import threading

_MAX_ENTRIES = 64
_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


# Config fields no jitted function reads: the schedule, I/O, and the sections of the modes
# that pass what they use as arguments or as `extra` key parts. The phase boundaries (T_q,
# the re-inits, the GAN's start) pick a step variant in Python, and k-means' iterations are
# an argument of its own jit: a sweep over them reuses every compiled step.
_SCHEDULE = ("num_train_steps", "log_every", "eval_every", "checkpoint_every",
             "keep_checkpoints", "per_device_batch_size", "output_dir")
_SECTIONS = ("eval", "sample", "interpolate", "export", "plan", "mesh", "divergence")
_FIELDS = {"data": ("data_dir", "num_threads", "test_fraction", "max_unreadable_fraction"),
           "quantizer": ("validate_every",),
           "codebook_init": ("start_step", "reinit_steps", "kmeans_iters"),
           "loss": ("disc_start_step",)}


def key_of(config) -> str:
  """The part of a config that defines the models and steps, as canonical JSON."""
  c = json.loads(config.to_json_best_effort())
  # A cosine decay ends at num_train_steps: then the step's lr schedule reads it.
  keep = ("num_train_steps",) if c.get("optim", {}).get("decay") == "cosine" else ()
  for k in _SCHEDULE + _SECTIONS:
    if k not in keep:
      c.pop(k, None)
  for section, fields in _FIELDS.items():
    for k in fields:
      c.get(section, {}).pop(k, None)
  return json.dumps(c, sort_keys=True)


def jit(name: str, config, mesh, build, *extra):
  """`build()` (a jitted function, or what such functions are built from, e.g. the
  abstract train state) once per (name, the config's model and step fields, mesh,
  *extra); least recently used entries beyond 64 are dropped."""
  key = (name, key_of(config), mesh, *extra)
  with _lock:
    if key in _cache:
      _cache.move_to_end(key)
      return _cache[key]
  fn = build()
  with _lock:
    _cache[key] = fn
    while len(_cache) > _MAX_ENTRIES:
      _cache.popitem(last=False)
  return fn


def clear() -> None:
  with _lock:
    _cache.clear()

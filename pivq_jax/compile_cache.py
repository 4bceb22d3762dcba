"""One jitted function per (purpose, config, mesh) in a process.

A process that runs the same config more than once (a notebook, a sweep, resume after an
error, the test suite) traces and compiles each step once. It matters most for steps with
host callbacks (the exact Hungarian), which JAX's persistent compilation cache cannot hold.
The jitted functions close over modules built from the same config, so they are
interchangeable between runs of it.
"""

import collections
import threading

_MAX_ENTRIES = 64
_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def jit(name: str, config, mesh, build, *extra):
  """`build()` (a jitted function) once per (name, config, mesh, *extra); least recently
  used entries beyond 64 are dropped."""
  key = (name, config.to_json_best_effort(sort_keys=True), mesh, *extra)
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

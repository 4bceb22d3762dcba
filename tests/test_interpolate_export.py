"""--mode=interpolate and --mode=export on one tiny trained faces run (spec §4)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from conftest import REPO
from conftest import subprocess_env
from conftest import tiny_config
from pivq_jax import config_lib
from pivq_jax import export
from pivq_jax import runner
from pivq_jax import train_state
from pivq_jax.data import pipeline


@pytest.fixture
def trained(trained_tiny):
  return trained_tiny


def _ema_params(workdir):
  """The EMA weights, which every mode but training uses."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    return mngr.restore(mngr.latest_step())["ema_params"]


def _symmetric_difference(a, b):
  return len(set(a.tolist()) ^ set(b.tolist()))


def test_interpolate_paths_by_index_and_by_file(trained, tmp_path):
  c = tiny_config()
  length = c.model.num_latents
  source = pipeline.make_source(c.data, "test")
  png = str(tmp_path / "face.png")
  Image.fromarray(source[3]["image"]).save(png)
  # L + 1 frames: every step of every path is shown (t = 0..n at most one apart).
  c.interpolate.update(pairs=f"3,7;{png},11", paths_per_pair=2, frames=length + 1)
  results = runner.run(c, trained, mode="interpolate")
  out = os.path.join(trained, "interpolations", "00000006")
  frames = np.load(os.path.join(out, "frames.npy"))
  codes = np.load(os.path.join(out, "codes.npy"))
  lengths = np.load(os.path.join(out, "lengths.npy"))
  assert frames.shape == (4, length + 1, 32, 32, 3) and frames.dtype == np.uint8
  assert codes.shape == (4, length + 1, length)
  assert results["interpolate/endpoints_exact"]
  assert os.path.exists(os.path.join(trained, "images", "interpolate_00000006.png"))

  # Endpoints are exactly A's and B's code sets; each step swaps one code; L distinct always.
  params = _ema_params(trained)
  encode = lambda i: np.sort(np.asarray(train_state.build_model(c).apply(
      {"params": params}, jnp.asarray(source[i]["image"][None], jnp.float32) / 255.0,
      method="encode_to_indices"))[0])
  for row, (a, b) in enumerate([(3, 7), (3, 7), (3, 11), (3, 11)]):  # the PNG is image 3
    np.testing.assert_array_equal(codes[row, 0], encode(a))
    np.testing.assert_array_equal(codes[row, -1], encode(b))
    assert all(len(set(f.tolist())) == length for f in codes[row])
    steps = [_symmetric_difference(codes[row, t], codes[row, t + 1]) for t in range(length)]
    assert set(steps) <= {0, 2} and sum(steps) == 2 * lengths[row]


@pytest.mark.parametrize("pairs, error, match", [
    ("3", config_lib.ConfigError, "not two endpoints"),
    ("3,999999", config_lib.ConfigError, "outside the"),
    ("3,/no/such/face.png", FileNotFoundError, "does not exist"),
])
def test_interpolate_bad_pairs_are_clear_errors(trained, pairs, error, match):
  c = tiny_config()
  c.interpolate.pairs = pairs
  with pytest.raises(error, match=match) as e:
    runner.run(c, trained, mode="interpolate")
  assert "\n" not in str(e.value)


def _export_config(out_dir, **kw):
  c = tiny_config()
  c.export.update(split="test", dir=str(out_dir), **kw)
  return c


def test_export_reads_back_and_decodes_to_the_reconstructions(trained, tmp_path):
  c = _export_config(tmp_path / "codes", shard_size=20, batch_size=8, num_examples=50)
  results = runner.run(c, trained, mode="export")
  assert results == {"export/num_records": 50, "export/num_shards": 3}
  manifest = export.load_manifest(tmp_path / "codes")
  assert [s["num_records"] for s in manifest["shards"]] == [20, 20, 10]
  assert manifest["spec"]["checkpoint_step"] == 6 and manifest["num_latents"] == 8
  assert not [f for f in os.listdir(tmp_path / "codes") if f.endswith(".tmp")]

  records = list(export.tf_dataset(tmp_path / "codes").as_numpy_iterator())
  plain = list(export.iterate(tmp_path / "codes"))
  assert len(records) == len(plain) == 50
  source = pipeline.make_source(c.data, "test")
  for i, (r, p) in enumerate(zip(records, plain)):
    np.testing.assert_array_equal(r["codes"], p["codes"])
    assert r["index"] == p["index"] == source[i]["index"]
    np.testing.assert_array_equal(r["factors"], source[i]["factors"])
    np.testing.assert_array_equal(p["factors"], source[i]["factors"])
    assert np.all(np.diff(r["codes"]) > 0)  # sorted, L distinct

  # Round trip: decoding the exported codes gives the model's own reconstructions.
  model, params = train_state.build_model(c), _ema_params(trained)
  images = jnp.asarray(np.stack([source[i]["image"] for i in range(8)]), jnp.float32) / 255
  recon, _ = model.apply({"params": params}, images)
  codes = jnp.asarray(np.stack([r["codes"] for r in records[:8]]))
  decoded = model.apply({"params": params}, codes, method="decode_indices")
  np.testing.assert_allclose(decoded, recon, atol=1e-5)


def _command_line(c):
  """--config.x=y flags that rebuild `c`'s model and train-state layout from faces.py."""
  flags = [f"--config.batch_size={c.batch_size}"]
  for section in ("data", "model", "quantizer", "disc", "codebook_init"):
    for k, v in c[section].items():
      if v == "":
        continue  # the default already; absl would read an empty value as None
      flags.append(f"--config.{section}.{k}={v if isinstance(v, str) else repr(v)}")
  return flags


@pytest.mark.slow
def test_export_survives_sigkill_and_completes_identically(trained, tmp_path):
  overrides = ["--config.export.split=test", "--config.export.shard_size=80",
               "--config.export.batch_size=8", "--config.export.num_examples=1600"]
  killed = tmp_path / "killed"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "pivq_jax.main", "--config=configs/faces.py",
         f"--workdir={trained}", "--mode=export", f"--config.export.dir={killed}",
         *overrides, *_command_line(tiny_config())]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    done = [f for f in os.listdir(killed) if f.endswith(".tfrecord")] if killed.exists() else []
    if len(done) >= 3:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read()[-3000:]  # still running: kill it mid-way
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / export.MANIFEST).exists()
  with pytest.raises(export.ExportError, match="unfinished"):
    export.load_manifest(killed)
  finished = sorted(f for f in os.listdir(killed) if f.endswith(".tfrecord"))
  assert 3 <= len(finished) < 20

  c = _export_config(killed, shard_size=80, batch_size=8, num_examples=1600)
  resumed = runner.run(c, trained, mode="export")
  c.export.dir = str(tmp_path / "whole")
  whole = runner.run(c, trained, mode="export")
  assert resumed == whole == {"export/num_records": 1600, "export/num_shards": 20}
  a, b = export.load_manifest(killed), export.load_manifest(tmp_path / "whole")
  assert a["sha256"] == b["sha256"]  # byte-identical shards
  assert sorted(f for f in os.listdir(killed) if f.endswith(".tmp")) == []
  indices = [int(r["index"]) for r in export.iterate(killed)]
  assert len(indices) == len(set(indices)) == 1600


def test_export_errors_are_one_sentence(trained, tmp_path):
  c = _export_config(tmp_path / "codes", shard_size=20, batch_size=8, num_examples=20)
  with pytest.raises(FileNotFoundError, match="No checkpoint") as e:
    runner.run(c, str(tmp_path / "untrained"), mode="export")
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "untrained" / "config.json")
  other = tiny_config()
  other.model.emb_dim = 16
  other.export.update(split="test", dir=str(tmp_path / "codes"))
  with pytest.raises(config_lib.ConfigError, match="different config") as e:
    runner.run(other, trained, mode="export")
  assert "\n" not in str(e.value)

  runner.run(c, trained, mode="export")
  spec_path = tmp_path / "codes" / export.SPEC
  spec = json.loads(spec_path.read_text())
  spec_path.write_text(json.dumps(dict(spec, checkpoint_step=3)))  # another checkpoint
  with pytest.raises(export.ExportError, match="another config, checkpoint or weights "
                     r"\(checkpoint_step differ\)") as e:
    runner.run(c, trained, mode="export")
  assert "\n" not in str(e.value)
  # Another model's weights at the same config and step.
  spec_path.write_text(json.dumps(dict(spec, params_sha256="0" * 64)))
  with pytest.raises(export.ExportError, match=r"\(params_sha256 differ\)"):
    runner.run(c, trained, mode="export")
  spec_path.write_text(json.dumps(spec))

  shard = tmp_path / "codes" / export.load_manifest(tmp_path / "codes")["shards"][0]["file"]
  data = bytearray(shard.read_bytes())
  data[30] ^= 0xFF  # flip bits inside the first record
  shard.write_bytes(bytes(data))
  with pytest.raises(export.ExportError, match="checksum|corrupt"):
    list(export.iterate(tmp_path / "codes"))
  # A rerun checks every finished shard, rewrites the damaged one and names it.
  whole = export.load_manifest(tmp_path / "codes")["sha256"]
  shard.write_bytes(bytes(data[:40]))  # truncated as well
  runner.run(c, trained, mode="export")
  assert export.load_manifest(tmp_path / "codes")["sha256"] == whole
  assert len(list(export.iterate(tmp_path / "codes"))) == 20


def test_load_codes_is_the_export_as_one_array(trained, tmp_path):
  c = _export_config(tmp_path / "codes", shard_size=16, batch_size=8, num_examples=40)
  runner.run(c, trained, mode="export")
  codes, indices = export.load_codes(tmp_path / "codes")
  records = list(export.tf_dataset(tmp_path / "codes").as_numpy_iterator())
  assert codes.shape == (40, c.model.num_latents) and indices.shape == (40,)
  np.testing.assert_array_equal(codes, np.stack([r["codes"] for r in records]))
  np.testing.assert_array_equal(indices, [r["index"] for r in records])


def test_api_matches_the_export_and_the_example_runs(trained, tmp_path):
  """pivq_jax.load reads only the EMA params; its codes are the export's, and
  examples/faces_api.py runs end to end on the run and its export."""
  import pivq_jax  # pylint: disable=g-import-not-at-top
  c = _export_config(tmp_path / "codes", shard_size=64, batch_size=8, num_examples=16)
  runner.run(c, trained, mode="export")
  run = pivq_jax.load(trained, batch_size=8)
  assert run.step == 6
  source = pipeline.make_source(c.data, "test")
  images = np.stack([source[i]["image"] for i in range(16)])
  exported, indices = export.load_codes(tmp_path / "codes")
  np.testing.assert_array_equal(run.encode(images), exported)
  np.testing.assert_array_equal(run.encode(images.astype(np.float32) / 255.0), exported)
  np.testing.assert_array_equal(indices, [source[i]["index"] for i in range(16)])
  model, params = train_state.build_model(c), _ema_params(trained)
  recon, _ = model.apply({"params": params}, images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(run.decode(exported), np.clip(recon, 0, 1), atol=1e-5)
  mixed = run.sample(images[:8], images[8:])
  assert mixed.shape == images[:8].shape and 0 <= mixed.min() and mixed.max() <= 1
  assert run.interpolate(images[0], images[1], frames=4).shape == (4,) + images.shape[1:]
  for bad, match in ((lambda: run.encode(images[:, :16]), "shape"),
                     (lambda: run.encode(images * 2.0), r"outside \[0, 1\]"),
                     (lambda: run.decode(exported + 100), "outside the codebook"),
                     (lambda: run.decode(np.zeros_like(exported)), "repeat a code"),
                     (lambda: run.sample(images[:2], images[:3]), "pairs")):
    with pytest.raises(pivq_jax.api.ApiError, match=match) as e:
      bad()
    assert "\n" not in str(e.value) and str(e.value).endswith(".")
  with pytest.raises(FileNotFoundError, match="config.json"):
    pivq_jax.load(tmp_path / "nothing")

  out = tmp_path / "example.png"
  proc = subprocess.run(
      [sys.executable, "examples/faces_api.py", f"--workdir={trained}",
       f"--export_dir={tmp_path / 'codes'}", f"--out={out}", "--num=4"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = c.data.resolution
  assert Image.open(out).size == (4 * (r + 2) + 2, 5 * (r + 2) + 2)

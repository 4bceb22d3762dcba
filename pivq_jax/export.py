"""Every image's code set as TFRecords (paper §3.5's code sets, exported), and readers.

Schema: one `tf.train.Example` per image, in dataset order.

  feature      type          present        meaning
  codes        int64[L]      always         the image's code set, ascending; under matching
                                            L distinct indices in [0, K)
  index        int64[1]      always         the example's index in its dataset (the source's
                                            "index": faces global index, TFDS record, ...)
  id           bytes[1]      image folders  the file's path relative to the folder
  factors      int64[9]      faces          ground-truth factors; names in the manifest
  attributes   int64[40]     CelebA         0/1 attributes; names in the manifest

An export directory holds `<split>-SSSSS-of-NNNNN.tfrecord` shards, `export_spec.json` (what
is being exported, written first) and `manifest.json` (written last, so its presence means
the export is complete). Shard s holds dataset positions [s * shard_size, (s + 1) *
shard_size), minus unreadable images (counted per shard in the manifest).

Never a half-written file that looks complete: each shard is written under `<name>.tmp` and
renamed when closed. Re-running an interrupted export keeps the finished shards and rewrites
the rest; the encoder is deterministic, so the result is byte-identical to an uninterrupted
run (the manifest's `sha256` shows it).

Readers: `tf_dataset(dir)` (tf.data), `iterate(dir)` (numpy records) and `load_codes(dir)`
(the codes as one [N, L] array).
"""

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterator, Sequence

from absl import logging
from etils import epath
import grain
import numpy as np

FORMAT = "pivq_jax.codes/v1"
LABEL_KEYS = ("factors", "attributes")  # integer label arrays a source may carry
MANIFEST = "manifest.json"
SPEC = "export_spec.json"
CHECK = ".sha256"  # beside each finished shard: {"bytes", "sha256"} as written


class ExportError(ValueError):
  """An export directory that cannot be used as asked, in one sentence."""


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which dataset positions go to which shard: a pure function of (count, shard size)."""
  num_examples: int
  shard_size: int

  @property
  def num_shards(self) -> int:
    return max(1, -(-self.num_examples // self.shard_size))

  def positions(self, shard: int) -> range:
    return range(shard * self.shard_size, min((shard + 1) * self.shard_size,
                                              self.num_examples))


# ----------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------
def example_bytes(codes: np.ndarray, item: dict[str, Any], image_id: str | None) -> bytes:
  """One record of the schema above, serialised."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ints = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(
      value=np.asarray(v, np.int64).reshape(-1).tolist()))
  feature = {"codes": ints(np.sort(np.asarray(codes, np.int64))),
             "index": ints(item["index"])}
  if image_id is not None:
    feature["id"] = tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[image_id.encode("utf-8")]))
  for key in LABEL_KEYS:
    if key in item:
      feature[key] = ints(item[key])
  # deterministic=True sorts the map keys: the same bytes in every process (resume).
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString(deterministic=True)


class _Positions:
  """A random-access view of `source` at the given positions (for grain's loaders)."""

  def __init__(self, source, positions: Sequence[int]):
    self._source, self._positions = source, list(positions)

  def __len__(self):
    return len(self._positions)

  def __getitem__(self, i):
    item = dict(self._source[self._positions[i]])
    item.setdefault("valid", np.bool_(True))
    return item


def _check_spec(out_dir: epath.Path, spec: dict) -> None:
  """An export directory belongs to one (config, checkpoint, split): refuse to mix them."""
  path = out_dir / SPEC
  if path.exists():
    saved = json.loads(path.read_text())
    if saved != spec:
      diff = sorted(k for k in set(saved) | set(spec) if saved.get(k) != spec.get(k))
      raise ExportError(
          f"{out_dir} holds an export of another config, checkpoint or weights "
          f"({', '.join(diff)} differ); delete it or set --config.export.dir to a new "
          "directory.")
  else:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(SPEC + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True))
    tmp.replace(path)


def write(encode: Callable[[np.ndarray], Any], source, out_dir, *, split: str,
          shard_size: int, batch_size: int, spec: dict[str, Any],
          num_examples: int | None = None, ids: Sequence[str] | None = None,
          label_names: dict[str, Sequence[str]] | None = None,
          process_index: int = 0, process_count: int = 1, num_threads: int = 2,
          extra_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
  """Encodes `source` and writes the shards that are not finished yet; returns the manifest.

  Args:
    encode: this process's uint8[batch_size / process_count, R, R, 3] images -> the global
      batch's codes, int[batch_size, L] (replicated: every process gets all of them). It may
      return a device array still being computed: the next batch is dispatched before this
      one is fetched, so encoding and writing overlap.
    source: random-access items {"image", "index", optional "valid" and LABEL_KEYS}; an item
      with valid == False (an unreadable image) is left out and listed in the manifest.
    out_dir: the export directory (local or gs://).
    spec: what is being exported (config, checkpoint step, ...); see `_check_spec`.
    ids: optional per-position string ids (image folder paths).
    label_names: names of each label array's entries, for the manifest.
  All processes run the same batches (the encoder is collective); process 0 writes.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out_dir = epath.Path(out_dir)
  n = len(source) if not num_examples else min(num_examples, len(source))
  plan = Plan(n, shard_size)
  spec = dict(spec, format=FORMAT, split=split, num_examples=n, shard_size=shard_size)
  if process_index == 0:
    _check_spec(out_dir, spec)
    # Removed first, written last: a manifest is present only beside a complete export.
    (out_dir / MANIFEST).unlink(missing_ok=True)
  names = [shard_name(split, s, plan.num_shards) for s in range(plan.num_shards)]
  todo = [s for s in range(plan.num_shards)
          if not _shard_ok(out_dir, names[s], remove=process_index == 0)]
  if todo and len(todo) < plan.num_shards:
    logging.info("Resuming the export in %s: %d of %d shards to write.", out_dir, len(todo),
                 plan.num_shards)
  local = batch_size // process_count

  def batches():
    """(shard, number of real rows, this process's items) for every global batch to do."""
    for s in todo:
      pos = list(plan.positions(s))
      for start in range(0, len(pos), batch_size):
        chunk = pos[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # static shapes
        mine = padded[process_index * local:(process_index + 1) * local]
        yield s, chunk, mine

  plan_items = list(batches())
  positions = [p for _, _, mine in plan_items for p in mine]
  loader = iter(grain.MapDataset.source(_Positions(source, positions)).batch(local)
                .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=4))) if positions else None
  writer, current, pending = None, None, None

  def finish(shard):
    writer.close()
    tmp = out_dir / (names[shard] + ".tmp")
    data = tmp.read_bytes()
    # Size and hash recorded before the rename: a rerun re-checks every finished shard.
    (out_dir / (names[shard] + CHECK)).write_text(json.dumps(
        {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    tf.io.gfile.rename(str(tmp), str(out_dir / names[shard]), overwrite=True)

  def flush(shard, chunk, items, codes):
    nonlocal writer, current
    if process_index:
      return
    if shard != current:
      if writer is not None:
        finish(current)
      writer = tf.io.TFRecordWriter(str(out_dir / (names[shard] + ".tmp")))
      current = shard
    codes = np.asarray(codes)
    for row, position in enumerate(chunk):
      if not items["valid"][row]:  # unreadable: left out, counted in the manifest
        continue
      item = {k: items[k][row] for k in ("index",) + LABEL_KEYS if k in items}
      writer.write(example_bytes(codes[row], item, ids[position] if ids else None))

  for shard, chunk, _ in plan_items:
    items = next(loader)
    if process_count > 1:  # process 0 writes every row: gather the labels it lacks
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      meta = {k: v for k, v in items.items() if k != "image"}
      meta = multihost_utils.process_allgather(meta, tiled=True)
    else:
      meta = items
    codes = encode(items["image"])  # dispatched; fetched after the next batch starts
    if pending is not None:
      flush(*pending)
    pending = (shard, chunk, meta, codes)
  if pending is not None:
    flush(*pending)
  if writer is not None:
    finish(current)
  if process_index:
    return {}
  extra = dict(extra_manifest or {}, has_id=ids is not None)
  return _write_manifest(out_dir, plan, names, spec, label_names or {}, extra)


def _shard_ok(out_dir: epath.Path, name: str, *, remove: bool) -> bool:
  """Whether a finished shard is whole: its size and hash match the record written with it.
  A failing one is named, removed (by `remove`, process 0) and written again."""
  path, check = out_dir / name, out_dir / (name + CHECK)
  if not path.exists():
    return False
  try:
    want = json.loads(check.read_text())
    data = path.read_bytes()
    problem = (None if (len(data), hashlib.sha256(data).hexdigest()) == (want["bytes"],
                                                                          want["sha256"])
               else f"{len(data)} bytes where {want['bytes']} were written, or another hash")
  except (OSError, ValueError, KeyError) as e:
    problem = f"no readable size and hash record ({type(e).__name__})"
  if problem is None:
    return True
  logging.warning("Export shard %s fails its check (%s); writing it again.", path, problem)
  if remove:
    path.unlink(missing_ok=True)
  return False


def _write_manifest(out_dir, plan, names, spec, label_names, extra) -> dict[str, Any]:
  """Counts and hashes every shard (finished now or earlier), then writes manifest.json."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shards = []
  for s, name in enumerate(names):
    path = out_dir / name
    count = sum(1 for _ in tf.data.TFRecordDataset(str(path)))  # C++ reads; checks CRCs
    shards.append({"file": name, "num_records": count,
                   "num_skipped": len(plan.positions(s)) - count,  # unreadable images
                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
  total = sum(s["num_records"] for s in shards)
  manifest = dict(extra, spec=spec, num_records=total, shards=shards,
                  label_names={k: list(v) for k, v in label_names.items()},
                  # One hash of the whole content: the shards' hashes, in order.
                  sha256=hashlib.sha256("".join(s["sha256"] for s in shards).encode())
                  .hexdigest())
  tmp = out_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
  tmp.replace(out_dir / MANIFEST)
  logging.info("Exported %d records in %d shards to %s (sha256 %s).", total,
               len(shards), out_dir, manifest["sha256"][:16])
  return manifest


# ----------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------
def load_manifest(export_dir) -> dict[str, Any]:
  path = epath.Path(export_dir) / MANIFEST
  if not path.exists():
    raise ExportError(f"{export_dir} has no {MANIFEST}, so the export is missing or "
                      "unfinished; run --mode=export again to complete it.")
  return json.loads(path.read_text())


def shard_paths(export_dir) -> list[str]:
  return [str(epath.Path(export_dir) / s["file"])
          for s in load_manifest(export_dir)["shards"]]


def _parser(manifest):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  features = {"codes": tf.io.FixedLenFeature([manifest["num_latents"]], tf.int64),
              "index": tf.io.FixedLenFeature([], tf.int64)}
  if manifest.get("has_id"):
    features["id"] = tf.io.FixedLenFeature([], tf.string)
  for key, names in manifest["label_names"].items():
    features[key] = tf.io.FixedLenFeature([len(names)], tf.int64)
  return lambda r: tf.io.parse_single_example(r, features)


def tf_dataset(export_dir, *, num_parallel_reads: int | None = None):
  """tf.data.Dataset of {"codes": int64[L], "index": int64, ...labels, "id"} in order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = tf.data.TFRecordDataset(shard_paths(export_dir), num_parallel_reads=num_parallel_reads)
  return ds.map(_parser(load_manifest(export_dir)), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)


def iterate(export_dir) -> Iterator[dict[str, Any]]:
  """Numpy records in export order, shard by shard, naming a corrupt shard:
  {"codes": int64[L], "index": np.int64, "id": str (image folders), "factors" /
  "attributes": int64[...]}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  parse = _parser(load_manifest(export_dir))
  for path in shard_paths(export_dir):
    try:
      for example in tf.data.TFRecordDataset(path).map(parse).as_numpy_iterator():
        if "id" in example:
          example["id"] = example["id"].decode("utf-8")
        yield example
    except tf.errors.DataLossError as e:
      raise ExportError(f"{path} is corrupt or truncated ({e.message.splitlines()[0]}); "
                        "run --mode=export again to rewrite it.") from None


def load_codes(export_dir) -> tuple[np.ndarray, np.ndarray]:
  """The whole export as arrays: (codes int64[N, L], dataset indices int64[N])."""
  records = list(iterate(export_dir))
  if not records:
    return (np.zeros((0, load_manifest(export_dir)["num_latents"]), np.int64),
            np.zeros((0,), np.int64))
  return (np.stack([r["codes"] for r in records]),
          np.array([r["index"] for r in records], np.int64))

"""Every image's code set as TFRecords (spec §4), and two readers for them.

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

Readers: `tf_dataset(dir)` (tf.data) and `iterate(dir)` (plain Python + numpy, no
TensorFlow: it parses the TFRecord framing and the Example protobuf itself).
"""

import dataclasses
import hashlib
import json
import struct
from typing import Any, Callable, Iterator, Sequence

from absl import logging
from etils import epath
import grain
import numpy as np

FORMAT = "pivq_jax.codes/v1"
LABEL_KEYS = ("factors", "attributes")  # integer label arrays a source may carry
MANIFEST = "manifest.json"
SPEC = "export_spec.json"


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
          f"{out_dir} holds an export of another config or checkpoint ({', '.join(diff)} "
          "differ); delete it or set --config.export.dir to a new directory.")
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
  names = [shard_name(split, s, plan.num_shards) for s in range(plan.num_shards)]
  todo = [s for s in range(plan.num_shards) if not (out_dir / names[s]).exists()]
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
    tf.io.gfile.rename(str(out_dir / (names[shard] + ".tmp")), str(out_dir / names[shard]),
                       overwrite=True)

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


def tf_dataset(export_dir, *, num_parallel_reads: int | None = None):
  """tf.data.Dataset of {"codes": int64[L], "index": int64, ...labels, "id"} in order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  manifest = load_manifest(export_dir)
  length = manifest["num_latents"]
  features = {"codes": tf.io.FixedLenFeature([length], tf.int64),
              "index": tf.io.FixedLenFeature([], tf.int64)}
  if manifest.get("has_id"):
    features["id"] = tf.io.FixedLenFeature([], tf.string)
  for key, names in manifest["label_names"].items():
    features[key] = tf.io.FixedLenFeature([len(names)], tf.int64)
  ds = tf.data.TFRecordDataset(shard_paths(export_dir), num_parallel_reads=num_parallel_reads)
  return ds.map(lambda r: tf.io.parse_single_example(r, features),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def iterate(export_dir) -> Iterator[dict[str, Any]]:
  """Plain Python, no TensorFlow: yields what `tf_dataset` does, as numpy values.

  {"codes": int64[L], "index": np.int64, "id": str (image folders), "factors" /
  "attributes": int64[...]} in export order.
  """
  for path in shard_paths(export_dir):
    data = epath.Path(path).read_bytes()
    for record in _records(data, path):
      example = _parse_example(record)
      example["index"] = example["index"][0]
      if "id" in example:
        example["id"] = example["id"][0].decode("utf-8")
      yield example


# TFRecord framing: uint64 length, uint32 masked CRC32C(length), data, uint32 masked
# CRC32C(data), all little-endian.
def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(data: bytes, name: str) -> Iterator[bytes]:
  pos = 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise ExportError(f"{name} ends inside a record header; the file is truncated.")
    length_bytes = data[pos:pos + 8]
    (length,), (length_crc,) = struct.unpack("<Q", length_bytes), struct.unpack(
        "<I", data[pos + 8:pos + 12])
    record = data[pos + 12:pos + 12 + length]
    end = pos + 16 + length
    if end > len(data) or _masked(crc32c(length_bytes)) != length_crc:
      raise ExportError(f"{name} is corrupt or truncated at byte {pos}; export again.")
    (data_crc,) = struct.unpack("<I", data[end - 4:end])
    if _masked(crc32c(record)) != data_crc:
      raise ExportError(f"{name} has a record with a bad checksum at byte {pos}; export "
                        "again.")
    yield record
    pos = end


# A tf.train.Example is a protobuf: Example{1: Features{1: map<string, Feature>}} with
# Feature{1: BytesList{1: bytes*}, 2: FloatList{1: float*}, 3: Int64List{1: int64*}}.
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if not b & 0x80:
      return value, pos
    shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of one message; LEN values as bytes."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      size, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    else:
      raise ExportError(f"Unsupported protobuf wire type {wire} in a record.")
    yield field, wire, value


def _int64s(buf: bytes) -> np.ndarray:
  out = []
  for _, wire, value in _fields(buf):
    if wire == 2:  # packed
      pos = 0
      while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    else:
      out.append(value)
  return np.array([v - (1 << 64) if v >= 1 << 63 else v for v in out], np.int64)


def _feature(buf: bytes):
  for field, _, value in _fields(buf):
    if field == 1:
      return np.array([v for _, _, v in _fields(value)], object)
    if field == 2:
      floats = b"".join(v for _, _, v in _fields(value))  # packed or not: raw float32s
      return np.frombuffer(floats, "<f4").copy()
    if field == 3:
      return _int64s(value)
  return np.zeros((0,), np.int64)


def _parse_example(record: bytes) -> dict[str, np.ndarray]:
  out = {}
  for _, _, features in _fields(record):
    for _, _, entry in _fields(features):
      key, value = None, b""
      for field, _, v in _fields(entry):
        if field == 1:
          key = v.decode("utf-8")
        elif field == 2:
          value = v
      out[key] = _feature(value)
  return out

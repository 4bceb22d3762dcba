"""Tests for the procedural faces dataset (pivq_jax/data/faces.py)."""

import hashlib
import itertools
import pickle

import grain.sources
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pivq_jax.data import faces
from pivq_jax.data.faces import (
    FACTOR_NAMES,
    FACTOR_SIZES,
    NUM_COMBINATIONS,
    FacesSource,
    decode_index,
    encode_factors,
    is_test_index,
    render,
)


@pytest.fixture(scope="module")
def train():
  return FacesSource(resolution=64, split="train")


@pytest.fixture(scope="module")
def test_split():
  return FacesSource(resolution=64, split="test")


def _factors(**overrides):
  values = dict(zip(FACTOR_NAMES, [1, 1, 1, 1, 1, 1, 1, 2, 1]))
  values.update(overrides)
  return np.array([values[n] for n in FACTOR_NAMES], np.int32)


def _max_block_diff(a, b, block=4):
  """Mean abs difference (0..255 levels) over the most-changed block x block patch."""
  d = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(-1)
  h = d.shape[0] // block
  return float(d.reshape(h, block, h, block).mean((1, 3)).max())


# --- factors and indexing ------------------------------------------------------------


def test_factor_table_matches_spec():
  assert FACTOR_SIZES == (6, 6, 4, 4, 3, 2, 3, 8, 3)
  assert len(FACTOR_NAMES) == len(FACTOR_SIZES) == len(set(FACTOR_NAMES))
  assert NUM_COMBINATIONS == 248_832 == int(np.prod(FACTOR_SIZES))


def test_decode_is_mixed_radix_with_last_factor_fastest():
  np.testing.assert_array_equal(decode_index(0), np.zeros(len(FACTOR_SIZES)))
  np.testing.assert_array_equal(decode_index(NUM_COMBINATIONS - 1), np.array(FACTOR_SIZES) - 1)
  np.testing.assert_array_equal(decode_index(1), [0, 0, 0, 0, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(decode_index(FACTOR_SIZES[-1]), [0, 0, 0, 0, 0, 0, 0, 1, 0])
  assert decode_index(5).dtype == np.int32


@settings(max_examples=300, deadline=None)
@given(st.integers(0, NUM_COMBINATIONS - 1))
def test_decode_encode_round_trip(index):
  factors = decode_index(index)
  assert factors.shape == (len(FACTOR_SIZES),)
  assert np.all((factors >= 0) & (factors < np.array(FACTOR_SIZES)))
  assert encode_factors(factors) == index
  assert encode_factors(factors.tolist()) == index
  assert np.array_equal(decode_index(np.int64(index)), factors)


def test_every_factor_vector_has_a_unique_index():
  rng = np.random.default_rng(0)
  seen = {encode_factors(rng.integers(0, FACTOR_SIZES)) for _ in range(2000)}
  # All encodings land inside the range; duplicates only when the vectors repeat.
  assert all(0 <= i < NUM_COMBINATIONS for i in seen)
  assert {encode_factors(decode_index(i)) for i in seen} == seen


@pytest.mark.parametrize("index", [-1, NUM_COMBINATIONS, 10**9])
def test_decode_rejects_out_of_range(index):
  with pytest.raises(ValueError, match="out of range"):
    decode_index(index)


@pytest.mark.parametrize(
    "factors",
    [[0] * 8, [0] * 10, [6, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, -1], [0.5] * 9],
)
def test_encode_rejects_bad_factors(factors):
  with pytest.raises(ValueError):
    encode_factors(factors)


# --- split ---------------------------------------------------------------------------


def test_split_partitions_all_indices(train, test_split):
  assert len(train) + len(test_split) == NUM_COMBINATIONS
  tr, te = train.global_indices, test_split.global_indices
  assert np.intersect1d(tr, te).size == 0
  assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
  assert 0.09 <= len(test_split) / NUM_COMBINATIONS <= 0.11
  assert len(FacesSource(split="all")) == NUM_COMBINATIONS


def test_is_test_index_agrees_with_split(test_split):
  rng = np.random.default_rng(1)
  test_set = set(test_split.global_indices.tolist())
  for index in rng.integers(0, NUM_COMBINATIONS, 500):
    assert is_test_index(index) == (int(index) in test_set)


def test_split_is_spread_over_factor_values(test_split):
  # A hash split, not a block: every value of every factor appears in the test set.
  factors = np.stack([decode_index(i) for i in test_split.global_indices[::50]])
  for k, size in enumerate(FACTOR_SIZES):
    assert set(factors[:, k].tolist()) == set(range(size))


# --- items ---------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_item_types_and_shapes(resolution):
  source = FacesSource(resolution=resolution, split="test")
  item = source[7]
  assert set(item) == {"image", "factors", "index"}
  assert item["image"].shape == (resolution, resolution, 3)
  assert item["image"].dtype == np.uint8
  assert item["factors"].dtype == np.int32 and item["factors"].shape == (len(FACTOR_SIZES),)
  assert isinstance(item["index"], np.int64)
  assert item["index"] == source.global_indices[7]
  np.testing.assert_array_equal(item["factors"], decode_index(int(item["index"])))


def test_numpy_and_negative_indices(train):
  last = train[len(train) - 1]
  assert train[np.int32(3)]["index"] == train[3]["index"] == train.global_indices[3]
  assert train[np.uint64(3)]["index"] == train[3]["index"]
  assert train[-1]["index"] == last["index"]
  with pytest.raises(IndexError):
    train[len(train)]
  with pytest.raises(TypeError):
    train[1.0]


def test_is_grain_source_and_pickles(test_split):
  assert isinstance(test_split, grain.sources.RandomAccessDataSource)
  clone = pickle.loads(pickle.dumps(test_split))
  assert repr(clone) == repr(test_split) == (
      f"FacesSource(resolution=64, split='test', len={len(test_split)})"
  )
  np.testing.assert_array_equal(clone[11]["image"], test_split[11]["image"])
  # The index table is rebuilt on unpickling, so the payload stays tiny.
  assert len(pickle.dumps(test_split)) < 1000


def test_grain_map_dataset_batches(train):
  batch = grain.MapDataset.source(train).shuffle(seed=0).batch(4)[0]
  assert batch["image"].shape == (4, 64, 64, 3)
  assert batch["factors"].shape == (4, len(FACTOR_SIZES))


# --- bad arguments -------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [48, 512, 0, "64", 64.0, True])
def test_bad_resolution(resolution):
  with pytest.raises(ValueError, match="use one of 32, 64, 128, 256"):
    FacesSource(resolution=resolution)
  with pytest.raises(ValueError, match="use one of 32, 64, 128, 256"):
    render(decode_index(0), resolution)


@pytest.mark.parametrize("split", ["val", "Train", "", None])
def test_bad_split(split):
  with pytest.raises(ValueError, match="use one of train, test, all"):
    FacesSource(split=split)


def test_arguments_are_keyword_only():
  with pytest.raises(TypeError):
    FacesSource(64)


# --- rendering -----------------------------------------------------------------------


def test_determinism_across_instances_and_calls():
  a = FacesSource(resolution=64, split="all")
  b = FacesSource(resolution=64, split="all")
  for i in [0, 999, 123_456, NUM_COMBINATIONS - 1]:
    first = a[i]["image"].tobytes()
    b[(i * 7919) % NUM_COMBINATIONS]  # render something else in between
    assert b[i]["image"].tobytes() == first
    assert render(decode_index(i), 64).tobytes() == first


def test_render_is_pinned():
  # Pins the dataset's bytes: these digests must match on every machine. If the look is
  # changed on purpose, update them and treat it as a new dataset version.
  expected = {
      (0, 32): "a81b421456a4ed55e91ad0636cb4e5180a9b756fd519b2cba8de146eb685a82e",
      (0, 64): "6113dd7e5b38b89483645b5da62a4b9f88d5b34511c303805d67db05ad88e104",
      (123457, 64): "f7e4a46318c882413d9dea2f0411fb51f522ea811a5ad8df5686bb78f50e5eba",
      (248831, 64): "a55b7b71d26c1f9f28ad268baed81dd29f72261ef77469ba25677b1346d6b28d",
  }
  for (index, resolution), digest in expected.items():
    image = render(decode_index(index), resolution)
    assert hashlib.sha256(image.tobytes()).hexdigest() == digest, (index, resolution)


def _bases():
  rng = np.random.default_rng(2)
  fixed = [_factors(), _factors(skin_tone=5, lighting=0, hair_colour=1), _factors(skin_tone=0)]
  return fixed + [rng.integers(0, FACTOR_SIZES).astype(np.int32) for _ in range(12)]


@pytest.mark.parametrize("k", range(len(FACTOR_SIZES)), ids=FACTOR_NAMES)
def test_every_factor_value_is_visible(k):
  # Any two values of a factor must differ clearly somewhere in the 64px image, on
  # every base face (including dark skin with a dark mouth line and side lighting).
  for base in _bases():
    if FACTOR_NAMES[k] == "hair_colour" and base[2] == 0:
      base = base.copy()
      base[2] = 1  # bald: hair colour only shows in the brows, checked below
    for v, w in itertools.combinations(range(FACTOR_SIZES[k]), 2):
      a, b = base.copy(), base.copy()
      a[k], b[k] = v, w
      diff = _max_block_diff(render(a, 64), render(b, 64))
      assert diff >= 5.0, (FACTOR_NAMES[k], base.tolist(), v, w, diff)


def test_bald_hair_colour_still_shows_in_brows():
  a, b = _factors(hair_style=0, hair_colour=0), _factors(hair_style=0, hair_colour=3)
  assert _max_block_diff(render(a, 64), render(b, 64)) >= 5.0


def test_global_factors_change_the_whole_image():
  base = _factors()
  for name, v in [("background_hue", 5), ("lighting", 0), ("skin_tone", 4)]:
    other = base.copy()
    other[FACTOR_NAMES.index(name)] = v
    d = np.abs(render(base, 64).astype(np.int16) - render(other, 64).astype(np.int16))
    assert d.mean() > 1.0, name


def test_lighting_direction_brightens_the_lit_side():
  def side_means(light):
    img = render(_factors(lighting=light, background_hue=0), 64).astype(np.float32)
    cheeks = img[34:44]  # rows through the cheeks, inside the face for every width
    return cheeks[:, 22:28].mean(), cheeks[:, 36:42].mean()

  left_l, left_r = side_means(0)
  front_l, front_r = side_means(1)
  right_l, right_r = side_means(2)
  assert left_l > left_r + 20 and right_r > right_l + 20
  assert abs(front_l - front_r) < 3


@pytest.mark.parametrize("hi,lo", [(128, 64), (256, 128), (64, 32)])
def test_resolutions_render_the_same_face(hi, lo):
  rng = np.random.default_rng(3)
  for index in rng.integers(0, NUM_COMBINATIONS, 10):
    f = decode_index(index)
    big = render(f, hi).astype(np.float32)
    down = big.reshape(lo, 2, lo, 2, 3).mean((1, 3))
    diff = np.abs(down - render(f, lo).astype(np.float32))
    assert diff.mean() < 2.0, (index, diff.mean())


def test_faces_are_aligned():
  # Pupils land on the same pixels for every face, as in aligned CelebA/FFHQ.
  rng = np.random.default_rng(4)
  for index in rng.integers(0, NUM_COMBINATIONS, 100):
    img = render(decode_index(index), 128)
    assert img[60, 51].max() < 90 and img[60, 76].max() < 90, index


def test_caches_are_not_mutated_by_rendering():
  f = _factors()
  first = render(f, 64).copy()
  for index in range(0, NUM_COMBINATIONS, NUM_COMBINATIONS // 50):
    render(decode_index(index), 64)
  np.testing.assert_array_equal(render(f, 64), first)
  rs, cs, alpha = faces._fixed_layers(64)["iris"]
  assert not alpha.flags.writeable

"""Matching solvers (PI-VQ paper §3.4): one-to-one and optimal against scipy."""

import functools
from unittest import mock

import hypothesis
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from pivq_jax.quantizers import auction
from pivq_jax.quantizers import auction_kernel
from pivq_jax.quantizers import matching
from pivq_jax.quantizers import matching_host


def _optimum(cost):
  rows, cols = scipy.optimize.linear_sum_assignment(cost.astype(np.float64))
  return cost.astype(np.float64)[rows, cols].sum()


def _check(cost, codes, *, optimal=True, num_codes=None, exact=False):
  """Every row one-to-one; with `optimal`, its total equals scipy's optimum (within the
  auction's guaranteed bound; with `exact`, within float64 rounding)."""
  cost, codes = np.asarray(cost), np.asarray(codes)
  b, l, k = cost.shape
  k = num_codes or k
  assert codes.shape == (b, l) and codes.dtype == np.int32
  for c, row in zip(cost, codes):
    assert row.min() >= 0 and row.max() < k
    assert len(set(row.tolist())) == l, row
    if optimal:
      total = c.astype(np.float64)[np.arange(l), row].sum()
      # Guaranteed bound: L * 2^-22 * spread <= L * 2^-22 * max cost (module docstring).
      bound = (l * 1e-12 if exact else l * 2.0 ** -21) * float(np.abs(c).max())
      assert total - _optimum(c) <= bound + 1e-30, (total, _optimum(c))


def _euclidean(z, codebook):
  return np.linalg.norm(z[:, :, None] - codebook[None, None], axis=-1).astype(np.float32)


@st.composite
def _instances(draw, ls=tuple(range(1, 9))):
  """Small instances: floats, or tiny-range integers (ties), optionally duplicated rows.

  B is padded to 3 and K to 12 (extra codes cost more than any real one, so they never
  belong to an optimum) to keep the number of compiled shapes small; L is one of `ls`.
  """
  b = draw(st.integers(1, 3))
  l = draw(st.sampled_from(ls))
  k = draw(st.integers(l, 12))
  if draw(st.booleans()):
    cost = draw(hnp.arrays(np.float32, (b, l, k), elements=st.integers(0, 2).map(float)))
  else:
    cost = draw(hnp.arrays(np.float32, (b, l, k), elements=st.floats(
        0, 1, width=32, allow_subnormal=False)))
  if l > 1 and draw(st.booleans()):  # duplicated latents
    src = draw(hnp.arrays(np.int64, (l,), elements=st.integers(0, l - 1)))
    cost = cost[:, src]
  return cost


@pytest.mark.slow
@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(_instances())
def test_auction_matches_scipy(cost):
  b, l, k = cost.shape
  padded = np.full((3, l, 12), float(cost.max()) + 1.0, np.float32)
  padded[:b, :, :k] = cost
  padded[b:] = padded[:1]
  codes = np.asarray(matching.assign(jnp.asarray(padded)))[:b]
  _check(cost, codes)


@pytest.mark.parametrize("l", [1, 5, 16])
def test_square_l_equals_k(l):
  rng = np.random.default_rng(l)
  cost = np.concatenate([rng.random((2, l, l)), rng.integers(0, 3, (1, l, l))]).astype(
      np.float32)
  _check(cost, matching.assign(jnp.asarray(cost)))


@pytest.mark.parametrize("k", [10, 40])
def test_all_latents_identical(k):
  rng = np.random.default_rng(k)
  row = rng.random(k).astype(np.float32)
  cost = np.stack([np.tile(row, (10, 1)), np.ones((10, k), np.float32)])  # 2nd: all tied
  _check(cost, matching.assign(jnp.asarray(cost)))


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_cost_scale(scale):
  rng = np.random.default_rng(0)
  cb = rng.normal(size=(40, 4)).astype(np.float32)
  z = cb[rng.integers(0, 3, (2, 12))] + 0.01 * rng.normal(size=(2, 12, 4))
  base = np.concatenate([_euclidean(z, cb), rng.random((1, 12, 40)).astype(np.float32)])
  cost = (base * scale).astype(np.float32)
  codes = matching.assign(jnp.asarray(cost))
  _check(cost, codes)
  _check(base, codes)  # the same assignment is optimal for the unscaled problem


@pytest.mark.slow
def test_collapsed_latents_64x512():
  # A collapsed encoder: latents = a few code vectors + tiny noise (spec §2's hard case).
  rng = np.random.default_rng(1)
  cb = rng.normal(size=(512, 16)).astype(np.float32)
  z = cb[rng.integers(0, 3, (2, 64))] + 1e-3 * rng.normal(size=(2, 64, 16))
  cost = _euclidean(z, cb)
  codes, info = jax.jit(auction.auction_solve)(jnp.asarray(cost))
  _check(cost, codes)
  assert bool(np.all(info["converged"]))
  _check_round_counts(info)
  # All 64 latents on one code: 32-code lists cannot hold them, so C = L must be used.
  one = _euclidean(cb[np.zeros((1, 64), int)] + 1e-3 * rng.normal(size=(1, 64, 16)), cb)
  codes, info = jax.jit(auction.auction_solve)(jnp.asarray(one))
  _check(one, codes)
  assert int(info["level"][0]) == 64  # short lists were rejected, fell back to C = L
  _check_round_counts(info)
  # The precheck skipped C = 32 (64 latents share one nearest code): no rounds there.
  assert np.asarray(info["level_rounds"]).tolist()[0][0] == 0
  # One image: the loops ran exactly its rounds.
  assert int(info["lockstep_rounds"]) == int(np.sum(info["level_rounds"])) > 0


def _check_round_counts(info):
  """The auction's round counts agree: the accepted level's rounds are that level's entry,
  each image's rounds over all levels include them, and the loops ran at least as long as
  the slowest image (the batch moves in lock step)."""
  per_level = np.asarray(info["level_rounds"])
  levels = auction.list_lengths(64, 512)
  accepted = [levels.index(c) for c in np.asarray(info["level"])]
  np.testing.assert_array_equal(per_level[np.arange(len(accepted)), accepted],
                                info["rounds"])
  assert np.all(per_level.sum(1) >= np.asarray(info["rounds"]))
  assert int(info["lockstep_rounds"]) >= per_level.sum(1).max()


def test_short_lists_are_used_when_certified():
  rng = np.random.default_rng(2)
  cost = _euclidean(rng.normal(size=(2, 64, 8)), rng.normal(size=(512, 8)))
  codes, info = jax.jit(auction.auction_solve)(jnp.asarray(cost))
  _check(cost, codes)
  assert int(info["level"][0]) == 32
  assert np.all(np.asarray(info["gap_bound"]) > 0)


def test_under_jit_and_vmap():
  rng = np.random.default_rng(3)
  cost = rng.integers(0, 4, (2, 3, 6, 9)).astype(np.float32)
  out_vmap = jax.vmap(matching.assign)(jnp.asarray(cost))
  out_jit = jax.jit(lambda c: matching.assign(c, solver="auction"))(jnp.asarray(cost))
  for out in (out_vmap, out_jit):
    assert out.shape == (2, 3, 6)
    _check(cost.reshape(6, 6, 9), np.asarray(out).reshape(6, 6))


@pytest.mark.parametrize("solver", matching.SOLVERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_cost_raises(solver, bad):
  cost = np.random.default_rng(0).random((2, 3, 5)).astype(np.float32)
  cost[1, 2, 4] = bad
  with pytest.raises(ValueError, match="NaN or Inf"):
    jax.block_until_ready(matching.assign(jnp.asarray(cost), solver=solver))
  if solver == "auction":  # traced: the check runs on device and raises at run time
    with pytest.raises(Exception, match="NaN or Inf"):
      jax.block_until_ready(jax.jit(matching.assign)(jnp.asarray(cost)))
    with pytest.raises(Exception, match="NaN or Inf"):
      jax.block_until_ready(jax.vmap(matching.assign)(jnp.asarray(cost)[:, None]))


def test_auction_marks_non_finite_images():
  cost = np.random.default_rng(0).random((2, 3, 5)).astype(np.float32)
  cost[1, 0, 0] = np.nan
  codes, info = jax.jit(auction.auction_solve)(jnp.asarray(cost))
  assert np.all(np.asarray(codes)[1] == -1)
  assert list(np.asarray(info["converged"])) == [True, False]
  _check(cost[:1], np.asarray(codes)[:1])


def test_sinkhorn_is_one_to_one():
  rng = np.random.default_rng(4)
  cb = rng.normal(size=(64, 4)).astype(np.float32)
  collapsed = _euclidean(cb[np.zeros((1, 16), int)] + 1e-3 * rng.normal(size=(1, 16, 4)), cb)
  cost = np.concatenate([collapsed, rng.random((1, 16, 64)).astype(np.float32),
                         rng.integers(0, 2, (1, 16, 64)).astype(np.float32)])
  _check(cost, matching.assign(jnp.asarray(cost), solver="sinkhorn"), optimal=False)


_HOST = ("dense", "union", "sparse", "auto")


def _check_host(cost, method, **kw):
  # "auto" screens every size here (by default small images skip the screen: dense).
  with mock.patch.object(matching_host, "SCREEN_MIN_ENTRIES", 0):
    codes = matching_host.solve(cost, method=method, **kw)
  _check(cost, codes, exact=True)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(_instances(), st.sampled_from(_HOST))
def test_host_solvers_are_exact(cost, method):
  _check_host(cost, method)


@pytest.mark.parametrize("method", _HOST)
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_host_solvers_scales_ties_collapse(method, scale):
  rng = np.random.default_rng(5)
  cb = rng.normal(size=(200, 4)).astype(np.float32)
  collapsed = _euclidean(cb[np.zeros((2, 40), int)] + 1e-3 * rng.normal(size=(2, 40, 4)), cb)
  few = _euclidean(cb[rng.integers(0, 3, (2, 40))] + 1e-3 * rng.normal(size=(2, 40, 4)), cb)
  tied = rng.integers(0, 3, (2, 40, 200)).astype(np.float32)
  square = rng.random((2, 40, 40)).astype(np.float32)
  for cost in (collapsed, few, tied, square, np.ones((1, 40, 200), np.float32)):
    _check_host((cost * scale).astype(np.float32), method)


@pytest.mark.parametrize("threads", [1, 3])
def test_host_threads_and_non_finite_rows(threads, monkeypatch):
  monkeypatch.setattr(matching_host, "MIN_PARALLEL_ENTRIES", 0)
  rng = np.random.default_rng(6)
  cost = rng.random((5, 16, 80)).astype(np.float32)
  cost[2, 3, 4] = np.nan
  codes = matching_host.solve(cost, threads=threads)
  assert np.all(codes[2] == -1)
  keep = [0, 1, 3, 4]
  _check(cost[keep], codes[keep], exact=True)
  # The jitted "hungarian" path with check_finite=False gives the same -1 row.
  out = jax.jit(lambda c: matching.assign(c, solver="hungarian", check_finite=False))(
      jnp.asarray(cost))
  assert np.all(np.asarray(out)[2] == -1)


def test_host_choice_follows_collapse():
  rng = np.random.default_rng(7)
  cb = rng.normal(size=(2048, 16)).astype(np.float32)
  spread = _euclidean(rng.normal(size=(1, 256, 16)), cb)[0]
  one = _euclidean(cb[np.zeros((1, 256), int)] + 1e-3 * rng.normal(size=(1, 256, 16)), cb)[0]
  eight = _euclidean(cb[rng.integers(0, 8, (1, 256))] + 1e-2 * rng.normal(size=(1, 256, 16)),
                     cb)[0]
  assert matching_host.choose(spread)[0] == "dense"
  assert matching_host.choose(one)[0] == "union"
  assert matching_host.choose(eight)[0] == "sparse"


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="L <= K"):
    matching.assign(jnp.zeros((1, 5, 4)))
  with pytest.raises(ValueError, match="Unknown matching solver"):
    matching.assign(jnp.zeros((1, 2, 4)), solver="greedy")


def test_union_columns_hold_every_latents_nearest_list():
  """The cheap superset `union` solves on holds each latent's L nearest codes (what makes
  it exact) and, for collapsed latents, is about the lists' union."""
  rng = np.random.default_rng(8)
  cb = rng.normal(size=(300, 8)).astype(np.float32)
  spread = _euclidean(rng.normal(size=(2, 24, 8)), cb)
  one = _euclidean(cb[np.zeros((2, 24), int)] + 1e-3 * rng.normal(size=(2, 24, 8)), cb)
  tied = rng.integers(0, 3, (1, 24, 300)).astype(np.float32)
  for c in np.concatenate([spread, one, tied]):
    cols = matching_host.union_columns(c)
    lists = np.argsort(c, axis=1, kind="stable")[:, :24]
    assert np.isin(lists, cols).all()
    # Every code tied with a latent's L-th nearest is in too (any tie-break is covered).
    assert np.isin(np.flatnonzero((c <= np.sort(c, axis=1)[:, 23:24]).any(0)), cols).all()
  assert len(matching_host.union_columns(one[0])) < 2 * 24 < len(
      matching_host.union_columns(spread[0]))


def test_small_images_skip_the_screen(monkeypatch):
  """Below SCREEN_MIN_ENTRIES "auto" is the dense loop (faces.py's 32 x 1,024); above, the
  screen routes collapsed images to the union solver."""
  rng = np.random.default_rng(9)
  cb = rng.normal(size=(1024, 8)).astype(np.float32)
  cost = _euclidean(cb[np.zeros((2, 32), int)] + 1e-3 * rng.normal(size=(2, 32, 8)), cb)
  calls = []
  monkeypatch.setattr(matching_host, "union",
                      lambda c, cols=None: calls.append(1) or matching_host.dense(c))
  _check(cost, matching_host.solve(cost), exact=True)
  assert not calls
  monkeypatch.setattr(matching_host, "SCREEN_MIN_ENTRIES", 0)
  _check(cost, matching_host.solve(cost), exact=True)
  assert len(calls) == 2


# ----------------------------------------------------------------------------------------
# The fused auction kernel (Pallas), run here by Pallas' interpreter.


def _solve(cost, kernel):
  return jax.jit(functools.partial(auction.auction_solve, kernel=kernel))(jnp.asarray(cost))


def test_kernel_equals_the_xla_auction_round_for_round():
  """The same bids, ties and phases: the same codes and rounds per image, and optimal;
  floats, integer ties, duplicated latents, scales 1e-6 and 1e6 side by side (each image
  is normalised on its own), a non-finite image; L = K; one latent."""
  rng = np.random.default_rng(10)
  mixed = np.stack([rng.random((8, 16)), rng.integers(0, 3, (8, 16)),
                    np.tile(rng.random((1, 16)), (8, 1)), rng.random((8, 16)) * 1e-6,
                    rng.random((8, 16)) * 1e6, rng.random((8, 16))]).astype(np.float32)
  mixed[2, :4] = mixed[0, :4]
  mixed[5, 3, 7] = np.inf
  square = rng.integers(0, 4, (2, 8, 8)).astype(np.float32)
  single = rng.random((2, 1, 5)).astype(np.float32)
  for cost in (mixed, square, single):
    want, want_info = _solve(cost, "xla")
    got, info = _solve(cost, "pallas")
    np.testing.assert_array_equal(got, want)
    for key in ("level_rounds", "phase_rounds", "converged"):
      np.testing.assert_array_equal(info[key], want_info[key])
    finite = np.isfinite(cost).all(axis=(1, 2))
    _check(cost[finite], np.asarray(got)[finite])
    assert np.all(np.asarray(got)[~finite] == -1)
  assert int(np.asarray(info["level_rounds"]).sum()) > 0


@pytest.mark.slow
def test_kernel_ladder_equals_the_xla_auction():
  """One image each (so the pure-JAX batch-wide cascade is the kernel's per-image one):
  a cheap level abandoned at the price cap, then a cold start at C = L; and a cheap level
  that converges but is not certified, then a warm start. The same rounds at every level
  and phase, and the same codes."""
  rng = np.random.default_rng(12)
  cb = rng.normal(size=(128, 4)).astype(np.float32)
  near = np.argsort(np.linalg.norm(cb - cb[0], axis=1))[1]  # 32 latents each on 2 close codes
  abandoned = _euclidean(cb[np.repeat([0, near], 32)][None]
                         + 1e-3 * rng.normal(size=(1, 64, 4)), cb)
  rng = np.random.default_rng(1)
  small = rng.normal(size=(128, 4)).astype(np.float32)
  warm = _euclidean(0.3 * rng.normal(size=(1, 64, 4)).astype(np.float32), small)
  for cost in (abandoned, warm):
    want, want_info = _solve(cost, "xla")
    got, info = _solve(cost, "pallas")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(info["phase_rounds"], want_info["phase_rounds"])
    assert np.all(np.asarray(info["level_rounds"]) > 0)  # both levels ran
    assert int(info["level"][0]) == 64
    _check(cost, got)


@pytest.mark.slow
@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(_instances(ls=(1, 5, 8)))  # three kernels to compile (interpreted)
def test_kernel_matches_scipy(cost):
  b, l, k = cost.shape
  padded = np.full((3, l, 12), float(cost.max()) + 1.0, np.float32)
  padded[:b, :, :k] = cost
  padded[b:] = padded[:1]
  _check(cost, np.asarray(_solve(padded, "pallas")[0])[:b])


def test_kernel_cascades_per_image():
  """Each image climbs the list ladder on its own: spread latents stop at C = 32, latents
  collapsed onto one code skip it (per image, not the batch), and the one launch lasts
  as long as its slowest image's rounds."""
  rng = np.random.default_rng(1)
  cb = rng.normal(size=(512, 16)).astype(np.float32)
  z = np.concatenate([rng.normal(size=(1, 64, 16)),
                      cb[np.zeros((1, 64), int)] + 1e-3 * rng.normal(size=(1, 64, 16))])
  cost = _euclidean(z, cb)
  codes, info = _solve(cost, "pallas")
  _check(cost, codes)
  assert np.asarray(info["level"]).tolist() == [32, 64]
  per_level = np.asarray(info["level_rounds"])
  assert per_level[0, 0] > 0 and per_level[0, 1] == 0  # certified at 32, not rerun
  assert per_level[1, 0] == 0 and per_level[1, 1] > 0  # skipped 32 by its own precheck
  assert int(info["lockstep_rounds"]) == per_level.sum(axis=1).max()
  _check_round_counts(info)
  # The pure-JAX auction skips C = 32 for the whole batch: both images run C = 64.
  assert np.asarray(_solve(cost, "xla")[1]["level"]).tolist() == [64, 64]


@pytest.mark.parametrize("l,k", [(512, 4096), (32, 1024)])
def test_kernel_lowers_to_triton(l, k):
  """The compiled path (what a GPU runs) lowers to Triton, one kernel per solve (every
  list level and certificate inside). This checks that each operation has a Triton
  lowering; it does not compile or run the kernel."""
  compiled = functools.partial(auction_kernel.solve, interpret=False)
  with mock.patch.object(auction_kernel, "solve", compiled):
    text = jax.jit(functools.partial(auction.auction_solve, kernel="pallas")).trace(
        jax.ShapeDtypeStruct((8, l, k), jnp.float32)).lower(
            lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1
  with pytest.raises(ValueError, match="needs L to be a power of two on a GPU, got L=48"):
    auction_kernel.solve(jnp.zeros((1, 48, 64)), jnp.zeros((1, 48)),
                         jnp.zeros((1, 48, 48), jnp.int32), jnp.zeros((1, 48, 48)),
                         fits=jnp.ones((1, 1), bool), scale=jnp.ones((1, 1)), levels=[48],
                         max_rounds=[10], price_caps=[np.inf], phases=[0.5],
                         direct_limit=4, buffer=32, reverse_buffer=8, eps_final=0.5,
                         interpret=False)


def test_kernel_choice():
  assert matching.auction_kernel_choice(512, 4096) == "xla"  # no GPU here
  assert not matching.fused_auction_available(512, 4096)
  with pytest.raises(ValueError, match="Unknown auction kernel"):
    auction.auction_solve(jnp.zeros((1, 2, 4)), kernel="cuda")
  with pytest.raises(ValueError, match="Unknown auction kernel 'cuda'"):
    matching.assign(jnp.zeros((1, 2, 4)), auction_kernel="cuda")
  cost = jnp.asarray(np.random.default_rng(11).random((2, 4, 8)), jnp.float32)
  np.testing.assert_array_equal(matching.assign(cost, auction_kernel="pallas"),
                                matching.assign(cost, auction_kernel="xla"))


def test_kernel_check_runs_inside_a_traced_step(monkeypatch, caplog):
  """On a GPU the first matching usually comes from a train step being traced: the check
  solves must still run (on concrete arrays, at the solve's size, through the list
  ladder's cheap and final levels) and pick the kernel, not fail on tracers and fall
  back. Here "GPU" is simulated and the kernel is interpreted."""
  monkeypatch.setattr(matching, "_on_gpu", lambda: True)
  traced = []  # the kernel's traces: the check's two instances share one compile
  solve = auction_kernel.solve
  monkeypatch.setattr(auction_kernel, "solve", lambda *a, **kw: traced.append(1) or solve(
      *a, **kw))
  for fn in (matching.fused_auction_available, matching.auction_kernel_choice):
    fn.cache_clear()
  try:
    seen = []
    jax.jit(lambda c: seen.append(matching.auction_kernel_choice(*c.shape[1:])) or c)(
        jnp.zeros((2, 64, 256)))
    assert seen == ["pallas"] and matching.auction_kernel_choice(6, 24) == "xla"  # L = 6
    assert len(auction.list_lengths(64, 256)) == 2  # the check ran a cheap level too
    assert "unavailable" not in caplog.text
    assert len(traced) == 1
  finally:
    for fn in (matching.fused_auction_available, matching.auction_kernel_choice):
      fn.cache_clear()
  assert [auction_kernel.supports(n) for n in (1, 2, 48, 512)] == [False, True, False, True]

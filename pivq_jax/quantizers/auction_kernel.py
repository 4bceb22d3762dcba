"""The matching auction fused into one kernel per solve (Pallas; PI-VQ paper §3.4).

`auction.py`'s algorithm, round for round (the same bids, ties, eps phases, reverse
iterations, eviction rule, candidate-list ladder and duality-gap certificate), but each
image runs its whole solve in one program of one launch. Per image it is the pure-JAX
solver on a batch of one; on a larger batch the pure-JAX ladder is batch-wide (a level
is skipped or rerun for every image), so the two can settle ties differently, each within
the same optimality bound. The certificate here is summed in S-scaled form and row blocks,
so a gap exactly at its threshold may be judged differently too. The pure-JAX solver is a
`lax.while_loop` per phase under vmap: on a GPU every round is ~70-95 small kernels and
a host round trip (~110 us per round on an H100, `docs/benchmarks.md`), and the batch
moves in lock step, each loop as long as its slowest image and each list level run for
the whole batch unless every image is certified. Here a round is a few vector operations
and barriers in one program, and each image climbs the ladder and stops on its own.

State lives in the outputs (prices and owners per code, each latent's list position), so
every gather and scatter is a pointer load or store; one-to-one holds by construction (a
round's winners hold distinct codes, resolved by comparing the bids of the round's <= 32
bidders, no atomics). Barriers separate each round's reads from its writes. The CPU runs
the kernel in Pallas' interpreter (the tests); `matching.auction_kernel_choice` picks it
on a GPU that compiles it. Triton needs power-of-two tensor sizes: L must be one (the
lists then are too) and K is padded with codes no latent lists.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Per image: [12 n + 2 q + d] list level n's direct attempt (q = 0) or eps phase q - 1,
# forward (d = 0) / reverse rounds; then the accepted level's rounds, converged, and the
# accepted level's index.
STATS = 64
_ROUNDS, _CONVERGED, _LEVEL = 60, 61, 62


def _any(x, axis=None):  # Triton's lowering has no boolean reductions
  return jnp.max(x.astype(jnp.int32), axis=axis) > 0


def _all(x, axis=None):
  return jnp.min(x.astype(jnp.int32), axis=axis) > 0


def _pow2(n):
  return 1 << max(0, int(n - 1).bit_length())


def supports(l: int) -> bool:
  """Triton's tensors have power-of-two sizes: the compiled kernel needs L to be one."""
  return l >= 2 and l & (l - 1) == 0


def _kernel(cand_ref, a_ref, rel_ref, inv_ref, minpos_ref, scale_ref, ratio_ref, fits_ref,
            slot_ref, price_ref, owner_ref, stats_ref, *, levels, num_codes, max_rounds,
            price_caps, phases, direct_limit, buffer, reverse_buffer, eps_final,
            interpret):
  """One image's auction over the list ladder (`auction.auction_solve`'s levels, each
  `auction._auction_one`'s rounds). Refs: cand [L, Cf] the final level's lists, nearest
  first (level n's lists are their first levels[n] columns); a [NL, L, Cf] level n's
  benefits; rel [L, Kp] (read only with NL > 1) min cost - cost, -inf on padding;
  inv [L, Kp] a code's position in a latent's list (-1: absent); minpos [Kp] its smallest
  position in any list; scale [NLp] each level's S; ratio [NLp] S of level n - 1 / S of
  level n (computed outside: Triton's division is approximate); fits [NLp] 1 where the
  precheck lets level n run. Outputs: slot [L] (list positions), price [Kp] (the accepted level's
  units), owner [Kp], stats [STATS]."""
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  l, cf = cand_ref.shape
  kp = price_ref.shape[0]
  k = num_codes
  nb = min(l, buffer)
  nv = min(kp, reverse_buffer)
  person = jnp.arange(l, dtype=jnp.int32)
  codes_k = jnp.arange(kp, dtype=jnp.int32)
  stat_idx = jnp.arange(STATS, dtype=jnp.int32)
  n_levels = len(levels)

  def barrier():
    if not interpret:
      plgpu.debug_barrier()

  def put(ref, idx, val, mask):
    """ref[idx] = val where mask (the masked-in indices are distinct)."""
    n = ref.shape[0]
    val = jnp.broadcast_to(val, idx.shape).astype(ref.dtype)
    if interpret:
      # The interpreter writes masked-out entries back with their old values, in any
      # order: a dense select keeps a clipped duplicate from undoing a real write.
      hit = (idx[:, None] == jnp.arange(n, dtype=idx.dtype)[None, :]) & mask[:, None]
      new = jnp.sum(jnp.where(hit, val[:, None], jnp.zeros((), ref.dtype)), axis=0)
      ref[...] = jnp.where(_any(hit, axis=0), new, ref[...])
    else:
      plgpu.store(ref.at[jnp.clip(idx, 0, n - 1)], val, mask=mask)

  def pick(vec_ref, n):  # vec_ref[n] for a static n, as a vector op
    v = vec_ref[...]
    return jnp.sum(jnp.where(jnp.arange(v.shape[0]) == n, v, jnp.zeros((), v.dtype)))

  def held(slot):  # the code each latent holds, kp for none
    return jnp.where(slot >= 0, cand_ref[person, jnp.maximum(slot, 0)], kp)

  def beaten(x, key, valid):
    """Does another valid entry with the same key beat each entry (larger x, ties: the
    earlier position)? `_auction_one`'s conflict rule, pairwise."""
    r = jnp.arange(x.shape[0], dtype=jnp.int32)
    beats = (x[None, :] > x[:, None]) | ((x[None, :] == x[:, None]) & (r[None, :] < r[:, None]))
    return _any((key[:, None] == key[None, :]) & beats & valid[None, :], axis=1)

  def first_true(mask, idx, n, none):
    """idx at the first n True entries of mask (`none` where fewer)."""
    rank = jnp.cumsum(mask.astype(jnp.int32)) - 1
    r = jnp.arange(n, dtype=jnp.int32)
    hit = mask[None, :] & (rank[None, :] == r[:, None])
    return jnp.min(jnp.where(hit, idx[None, :], none), axis=1)

  def row_blocks(size, body, init):
    """body(rows, real, carry) over [size]-row blocks of the L latents."""
    def step(i, carry):
      rows = i * size + jnp.arange(size, dtype=jnp.int32)
      return body(jnp.minimum(rows, l - 1), rows < l, carry)
    return jax.lax.fori_loop(0, -(-l // size), step, init)

  def run_level(n, c, carry):
    """List level n (lists of c codes): warm start, eps phases, certificate."""
    ok, warm, stats = carry
    final = n == n_levels - 1
    cap = price_caps[n]
    cols = jnp.arange(c, dtype=jnp.int32)
    inl = minpos_ref[...] < c  # codes in some level-n list

    def running(top, rounds):
      return (rounds < max_rounds[n]) & (top <= cap)

    def forward_round(eps):
      slot = slot_ref[...]
      who = first_true(slot < 0, person, nb, l)
      valid = who < l
      w = jnp.minimum(who, l - 1)
      prof = (a_ref[n, w[:, None], cols[None, :]]
              - plgpu.load(price_ref.at[cand_ref[w[:, None], cols[None, :]]]))
      v = jnp.max(prof, axis=1)
      best = jnp.min(jnp.where(prof == v[:, None], cols[None, :], c), axis=1)
      second = jnp.max(jnp.where(cols[None, :] == best[:, None], -jnp.inf, prof), axis=1)
      # The winning code and its price gathered again as [nb] vectors, so no [nb, C]
      # block of ids or prices stays live past `prof` (register pressure at C = 512).
      j = cand_ref[w, best]
      p_old = plgpu.load(price_ref.at[j])
      # nextafter(p_old, inf) for p_old >= 0 (prices never go negative), as bits + 1.
      up = jax.lax.bitcast_convert_type(
          jax.lax.bitcast_convert_type(jnp.maximum(p_old, 0.0), jnp.int32) + 1, jnp.float32)
      bid = jnp.maximum(p_old + jnp.minimum(v - second, 4.0) + eps, up)
      won = valid & ~beaten(bid, j, valid)
      prev = plgpu.load(owner_ref.at[jnp.clip(j, 0, kp - 1)])
      barrier()
      put(slot_ref, prev, -1, won & (prev >= 0))
      put(slot_ref, who, best, won)
      put(owner_ref, j, who, won)
      put(price_ref, j, bid, won)
      barrier()
      return jnp.max(jnp.where(won, bid, -jnp.inf))

    def violators(lam):
      return inl & (owner_ref[...] < 0) & (price_ref[...] > lam)

    def reverse_round(eps, lam):
      codes = first_true(violators(lam), codes_k, nv, kp)
      valid = codes < k
      cc = jnp.minimum(codes, kp - 1)
      col = inv_ref[person[:, None], cc[None, :]]  # [L, nv]
      col = jnp.where(col < c, col, -1)
      slot = slot_ref[...]
      hc = held(slot)
      profit = (a_ref[n, person, jnp.maximum(slot, 0)]
                - plgpu.load(price_ref.at[jnp.minimum(hc, kp - 1)]))
      val = jnp.where(col >= 0, a_ref[n, person[:, None], jnp.maximum(col, 0)]
                      - profit[:, None], -jnp.inf)
      beta = jnp.max(val, axis=0)
      bp = jnp.min(jnp.where(val == beta[None, :], person[:, None], l), axis=0)
      omega = jnp.max(jnp.where(person[:, None] == bp[None, :], -jnp.inf, val), axis=0)
      take = valid & (beta - eps > lam)
      lower = valid & ~take
      q = jnp.maximum(lam, omega - eps)
      gain = jnp.where(take, beta - q, -jnp.inf)
      accepted = take & ~beaten(gain, bp, take)
      bpc = jnp.minimum(bp, l - 1)
      old = jnp.max(jnp.where(person[:, None] == bpc[None, :], hc[:, None], -1), axis=0)
      new_slot = inv_ref[bpc, cc]
      barrier()
      put(owner_ref, old, -1, accepted)
      put(owner_ref, codes, bpc, accepted)
      put(price_ref, codes, jnp.where(accepted, q, lam), accepted | lower)
      put(slot_ref, bpc, new_slot, accepted)
      barrier()

    def evict(rows, real, carry, eps):
      # Latents violating the new (smaller) eps-CS give their codes up.
      best = jnp.max(a_ref[n, rows[:, None], cols[None, :]]
                     - plgpu.load(price_ref.at[cand_ref[rows[:, None], cols[None, :]]]),
                     axis=1)
      s = slot_ref[rows]
      code = cand_ref[rows, jnp.maximum(s, 0)]  # [rows] gathers, as in forward_round
      own = a_ref[n, rows, jnp.maximum(s, 0)] - plgpu.load(price_ref.at[code])
      ev = real & (s >= 0) & (own < best - eps)
      barrier()
      put(owner_ref, code, -1, ev)
      put(slot_ref, rows, -1, ev)
      barrier()
      return carry + 1  # (a loop-carried value: Triton's loops cannot yield constants)

    def phase(q, eps, pc, limit=None):
      """One eps phase (`_auction_one`'s); its rounds go to stats entry q."""
      rounds, top, stats = pc
      row_blocks(nb, functools.partial(evict, eps=eps), jnp.int32(0))
      start = rounds
      unassigned = lambda: jnp.sum((slot_ref[...] < 0).astype(jnp.int32))

      def fwd_body(s):
        t = forward_round(eps)
        return s[0] + 1, jnp.maximum(s[1], t), unassigned()

      def fwd_cond(s):
        go = (s[2] > 0) & running(s[1], s[0])
        return go if limit is None else go & (s[0] - start < limit)

      rounds, top, left = jax.lax.while_loop(fwd_cond, fwd_body,
                                             (rounds, top, unassigned()))
      forward = rounds - start
      lam = jnp.min(jnp.where(owner_ref[...] >= 0, price_ref[...], jnp.inf))
      go = (left == 0) & running(top, rounds)

      def rev_body(s):
        reverse_round(eps, lam)
        return s[0] + 1, _any(violators(lam))

      rounds, _ = jax.lax.while_loop(lambda s: s[1] & go & running(top, s[0]), rev_body,
                                     (rounds, _any(violators(lam))))
      # Prices shifted so lambda = 0; unheld codes up to lambda (never breaks eps-CS).
      price = jnp.maximum(price_ref[...] - jnp.where(lam < jnp.inf, lam, 0.0), 0.0)
      barrier()
      price_ref[...] = price
      barrier()
      at = 12 * n + 2 * q
      stats = jnp.where(stat_idx == at, forward,
                        jnp.where(stat_idx == at + 1, rounds - start - forward, stats))
      return rounds, jnp.max(price), stats

    # Warm start from the previous level where it converged (its lists are a prefix of
    # these, so list positions carry over; prices rescaled to this level's S), else cold.
    scale = pick(scale_ref, n)
    ratio = pick(ratio_ref, n)
    slot = jnp.where(warm, slot_ref[...], -1)
    price = jnp.where(warm, price_ref[...] * ratio, 0.0)
    barrier()
    slot_ref[...] = slot
    price_ref[...] = price
    owner_ref[...] = jnp.full((kp,), -1, jnp.int32)
    barrier()
    put(owner_ref, held(slot), person, slot >= 0)
    barrier()
    # The direct attempt (`_auction_one`'s): EPS_FINAL at once, a bounded forward; where
    # it does not finish, the eps-scaling phases start over from the warm or cold start.
    rounds, top, stats = phase(0, jnp.float32(eps_final),
                               (jnp.int32(0), jnp.max(price), stats), limit=direct_limit)
    done = _all(slot_ref[...] >= 0) & running(top, rounds)
    barrier()
    slot_ref[...] = jnp.where(done, slot_ref[...], slot)
    price_ref[...] = jnp.where(done, price_ref[...], price)
    top = jnp.where(done, top, jnp.max(price))
    barrier()
    owner_ref[...] = jnp.full((kp,), -1, jnp.int32)
    barrier()
    now = slot_ref[...]
    put(owner_ref, held(now), person, now >= 0)
    barrier()

    def scaled_phase(p, pc):
      eps = jnp.float32(phases[0])
      for i, e in enumerate(phases[1:], 1):  # phase p's eps (no float table in a kernel)
        eps = jnp.where(p >= i, jnp.float32(e), eps)
      return phase(p + 1, eps, pc)

    rounds, top, stats = jax.lax.fori_loop(0, len(phases), scaled_phase, (rounds, top, stats))
    converged = _all(slot_ref[...] >= 0) & running(top, rounds)
    cert = converged
    if not final:
      # Duality gap over all K codes (`auction._level`'s certificate), times S so no
      # division runs here: sum_i (max_j (rel_ij - S p_j) - S own_i) + S sum(unheld p).
      price = price_ref[...]
      tile = min(_pow2(l), max(1, 2 ** 13 // kp))  # [tile, Kp] <= 8k values live

      def gap_rows(rows, real, acc):
        best = jnp.max(rel_ref[rows[:, None], codes_k[None, :]] - scale * price[None, :],
                       axis=1)
        s = slot_ref[rows]
        own = (a_ref[n, rows, jnp.maximum(s, 0)]
               - plgpu.load(price_ref.at[cand_ref[rows, jnp.maximum(s, 0)]]))
        return acc + jnp.sum(jnp.where(real, best - scale * own, 0.0))

      gap = row_blocks(tile, gap_rows, jnp.float32(0.0))
      unheld = jnp.sum(jnp.where((owner_ref[...] < 0) & (codes_k < k), price, 0.0))
      cert = converged & (gap + scale * unheld <= 2 * l * eps_final * scale)
    stats = jnp.where(stat_idx == _ROUNDS, rounds, stats)
    stats = jnp.where(stat_idx == _CONVERGED, converged.astype(jnp.int32), stats)
    stats = jnp.where(stat_idx == _LEVEL, n, stats)
    return cert, converged, stats

  false = pick(fits_ref, 0) < 0  # (traced: Triton's lowering cannot negate a constant)
  carry = (false, false, jnp.zeros((STATS,), jnp.int32))
  for n, c in enumerate(levels):
    # A level runs only while the image is uncertified, and a cheap level only when its
    # precheck passed; a level not run leaves no warm start.
    active = ~carry[0] & (pick(fits_ref, n) > 0)
    carry = (carry[0], carry[1] & active, carry[2])
    carry = jax.lax.fori_loop(0, active.astype(jnp.int32),
                              lambda _, cy, n=n, c=c: run_level(n, c, cy), carry)
  stats_ref[...] = carry[2]


def solve(cost, nearest, cand, spread, *, fits, scale, levels, max_rounds, price_caps,
          phases, direct_limit, buffer, reverse_buffer, eps_final, interpret=None,
          num_warps=8):
  """The auction on cost float32[B, L, K] (finite), one program per image, from
  `auction._lists` at the final level: nearest [B, L] minus the nearest code's cost, cand
  and spread [B, L, Cf]. levels: the list lengths (`auction.list_lengths`), with each
  level's round budget and price cap, fits [B, levels] (the precheck) and S, scale
  [B, levels].
  Returns `auction.auction_solve`'s per-image results: codes (-1: unassigned), ok,
  rounds, scale and level (of the accepted level), history [B, levels, 1 + phases,
  2].
  interpret=None: compiled on a GPU, Pallas' interpreter elsewhere."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  b, l, k = cost.shape
  if not interpret and not supports(l):
    raise ValueError(f"The fused auction kernel needs L to be a power of two on a GPU, got "
                     f"L={l}; use the pure-JAX auction (kernel='xla').")
  levels = tuple(int(c) for c in levels)
  n_levels, n_phases = len(levels), len(phases)
  assert n_levels <= 5 and n_phases <= 5, "the stats layout holds 5 levels of 1 + 5 phases"
  cf, kp, nlp = levels[-1], _pow2(k), _pow2(n_levels)
  # Each level's lists are the first columns of the final level's.
  ratio = jnp.concatenate([jnp.ones_like(scale[:, :1]), scale[:, :-1] / scale[:, 1:]], 1)
  a = jnp.stack([jnp.pad(-spread[..., :c] / scale[:, n, None, None],
                         ((0, 0), (0, 0), (0, cf - c))) for n, c in enumerate(levels)], 1)
  a = jnp.pad(a, ((0, 0), (0, nlp - n_levels), (0, 0), (0, 0)))  # Triton: power-of-two blocks
  pad_levels = lambda x: jnp.pad(x, ((0, 0), (0, nlp - n_levels)))
  person = jnp.arange(l, dtype=jnp.int32)
  inv = jnp.full((b, l, kp), -1, jnp.int32).at[
      jnp.arange(b)[:, None, None], person[None, :, None], cand].set(
          jnp.arange(cf, dtype=jnp.int32)[None, None, :])
  minpos = jnp.min(jnp.where(inv >= 0, inv, cf), axis=1)
  if n_levels > 1:
    rel = jnp.pad(-(nearest[..., None] + cost), ((0, 0), (0, 0), (0, kp - k)),
                  constant_values=-np.inf)
  else:
    rel = jnp.zeros((b, 1, 1), jnp.float32)  # no certificate: never read
  spec = lambda *shape: pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))
  kernel = functools.partial(
      _kernel, levels=levels, num_codes=k, max_rounds=tuple(max_rounds),
      price_caps=tuple(float(x) for x in price_caps), phases=tuple(float(e) for e in phases),
      direct_limit=int(direct_limit), buffer=buffer, reverse_buffer=reverse_buffer,
      eps_final=float(eps_final), interpret=interpret)
  slot, _, _, stats = pl.pallas_call(
      kernel, grid=(b,),
      in_specs=[spec(l, cf), spec(nlp, l, cf), spec(*rel.shape[1:]), spec(l, kp),
                spec(kp), spec(nlp), spec(nlp), spec(nlp)],
      out_specs=[spec(l), spec(kp), spec(kp), spec(STATS)],
      out_shape=[jax.ShapeDtypeStruct((b, l), jnp.int32),
                 jax.ShapeDtypeStruct((b, kp), jnp.float32),
                 jax.ShapeDtypeStruct((b, kp), jnp.int32),
                 jax.ShapeDtypeStruct((b, STATS), jnp.int32)],
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps),
      interpret=interpret, name="pivq_auction")(
          cand.astype(jnp.int32), a, rel, inv, minpos, pad_levels(scale), pad_levels(ratio),
          pad_levels(fits.astype(jnp.int32)))
  level = stats[:, _LEVEL]
  codes = jnp.take_along_axis(cand, jnp.maximum(slot, 0)[..., None], axis=-1)[..., 0]
  history = stats[:, :12 * n_levels].reshape(b, n_levels, 6, 2)[:, :, :1 + n_phases]
  return {"codes": jnp.where(slot >= 0, codes, -1).astype(jnp.int32),
          "ok": stats[:, _CONVERGED] > 0, "rounds": stats[:, _ROUNDS],
          "scale": jnp.take_along_axis(scale, level[:, None], axis=1)[:, 0],
          "level": jnp.asarray(levels, jnp.int32)[level], "history": history}

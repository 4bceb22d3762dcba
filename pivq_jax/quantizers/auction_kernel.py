"""The matching auction as one fused kernel per list level (Pallas; PI-VQ paper §3.4).

`auction.py`'s algorithm, round for round (the same bids, ties, eps phases, reverse
iterations and eviction rule), but each image runs its whole eps-scaling solve inside one
program of one launch. The pure-JAX solver is a `lax.while_loop` per phase under vmap:
on a GPU every round is ~70-95 small kernels and a host round trip (~110 us per round on
an H100, `docs/benchmarks.md`), and the batch moves in lock step, each loop as long as
its slowest image. Here a round is a few vector operations and barriers in one program,
and an image stops when it is done.

State lives in the outputs (prices and owners per code, each latent's list position), so
every gather and scatter is a pointer load or store; one-to-one holds by construction (a
round's winners hold distinct codes, resolved by comparing the bids of the round's <= 32
bidders, no atomics). Barriers separate each round's reads from its writes; the CPU runs
the kernel in Pallas' interpreter, where they are not needed.

`solver(...)` is a drop-in for the per-level solver of `auction.auction_solve(kernel=
"pallas")`, which keeps the list ladder, the certificate and the result's info, and runs
a level only for the images the previous one left uncertified. Triton needs power-of-two
tensor sizes: L must be one (the lists then are too) and K is padded with codes no latent
lists. `matching.auction_kernel_choice` picks it where a GPU runs it.
"""

import functools

import jax
import jax.numpy as jnp

NUM_STATS = 16  # per image: [2p, 2p + 1] phase p's forward / reverse rounds; [14] all rounds; [15] ok


def _any(x, axis=None):  # Triton's lowering has no boolean reductions
  return jnp.max(x.astype(jnp.int32), axis=axis) > 0


def _all(x, axis=None):
  return jnp.min(x.astype(jnp.int32), axis=axis) > 0


def _pow2(n):
  return 1 << max(0, int(n - 1).bit_length())


def _kernel(cand_ref, a_ref, inv_ref, inl_ref, slot0_ref, price0_ref, run_ref,
            slot_ref, price_ref, owner_ref, stats_ref, *, num_codes, max_rounds, price_cap,
            phases, buffer, reverse_buffer, interpret):
  """One image's auction (`auction._auction_one`, same rounds). Refs: cand, a [L, C];
  inv [L, Kp] (position of a code in a latent's list, -1: absent); inl [Kp] (1: in some
  list); slot0 [L], price0 [Kp] the warm start; run [1] (0: leave this image alone).
  Outputs: slot [L], price [Kp], owner [Kp], stats [NUM_STATS]."""
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  l, c = cand_ref.shape
  kp = price_ref.shape[0]
  k = num_codes
  nb = min(l, buffer)
  nv = min(kp, reverse_buffer)
  person = jnp.arange(l, dtype=jnp.int32)
  cols = jnp.arange(c, dtype=jnp.int32)
  codes_k = jnp.arange(kp, dtype=jnp.int32)

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

  def held(slot):  # code held by each latent, kp for none
    return jnp.where(slot >= 0, cand_ref[person, jnp.maximum(slot, 0)], kp)

  def running(top, rounds):
    return (rounds < max_rounds) & (top <= price_cap)

  def beaten(x, key, valid):
    """For each of n entries: does another valid entry with the same key beat it (larger
    x, ties: earlier position)? `_auction_one`'s conflict rule, pairwise."""
    r = jnp.arange(x.shape[0], dtype=jnp.int32)
    beats = (x[None, :] > x[:, None]) | ((x[None, :] == x[:, None]) & (r[None, :] < r[:, None]))
    return _any((key[:, None] == key[None, :]) & beats & valid[None, :], axis=1)

  def first_true(mask, idx, n, none):
    """Indices of the first n True entries of mask (`none` where fewer)."""
    rank = jnp.cumsum(mask.astype(jnp.int32)) - 1
    r = jnp.arange(n, dtype=jnp.int32)
    hit = mask[None, :] & (rank[None, :] == r[:, None])
    return jnp.min(jnp.where(hit, idx[None, :], none), axis=1)

  def forward_round(eps):
    slot = slot_ref[...]
    who = first_true(slot < 0, person, nb, l)
    valid = who < l
    w = jnp.minimum(who, l - 1)
    cb = cand_ref[w[:, None], cols[None, :]]
    pb = plgpu.load(price_ref.at[cb])
    prof = a_ref[w[:, None], cols[None, :]] - pb
    v = jnp.max(prof, axis=1)
    best = jnp.min(jnp.where(prof == v[:, None], cols[None, :], c), axis=1)
    is_best = cols[None, :] == best[:, None]
    second = jnp.max(jnp.where(is_best, -jnp.inf, prof), axis=1)
    j = jnp.max(jnp.where(is_best, cb, -1), axis=1)
    p_old = jnp.max(jnp.where(is_best, pb, -jnp.inf), axis=1)
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
    viol = (inl_ref[...] > 0) & (owner_ref[...] < 0) & (price_ref[...] > lam)
    return viol

  def reverse_round(eps, lam):
    codes = first_true(violators(lam), codes_k, nv, kp)
    valid = codes < k
    cc = jnp.minimum(codes, kp - 1)
    col = inv_ref[person[:, None], cc[None, :]]  # [L, nv]
    slot = slot_ref[...]
    hc = held(slot)
    profit = a_ref[person, slot] - plgpu.load(price_ref.at[jnp.minimum(hc, kp - 1)])
    val = jnp.where(col >= 0,
                    a_ref[person[:, None], jnp.maximum(col, 0)] - profit[:, None], -jnp.inf)
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

  def lam_now():
    return jnp.min(jnp.where(owner_ref[...] >= 0, price_ref[...], jnp.inf))

  def evict_block(i, carry, eps):
    # Latents violating the new (smaller) eps-CS give their codes up (a block of rows at
    # a time keeps the [rows, C] profits small at C = L = 512).
    rows = i * nb + jnp.arange(nb, dtype=jnp.int32)
    real = rows < l
    rows = jnp.minimum(rows, l - 1)
    cb = cand_ref[rows[:, None], cols[None, :]]
    prof = a_ref[rows[:, None], cols[None, :]] - plgpu.load(price_ref.at[cb])
    s = slot_ref[rows]
    mine = cols[None, :] == s[:, None]
    own = jnp.max(jnp.where(mine, prof, -jnp.inf), axis=1)
    ev = real & (s >= 0) & (own < jnp.max(prof, axis=1) - eps)
    code = jnp.max(jnp.where(mine, cb, -1), axis=1)
    barrier()
    put(owner_ref, code, -1, ev)
    put(slot_ref, rows, -1, ev)
    barrier()
    return carry + 1  # (a loop-carried value: Triton's loops cannot yield constants)

  def phase(p, carry):
    rounds, top, stats = carry
    eps = jnp.float32(phases[0])
    for i, e in enumerate(phases[1:], 1):  # phase p's eps (no float table in a kernel)
      eps = jnp.where(p >= i, jnp.float32(e), eps)
    jax.lax.fori_loop(0, -(-l // nb), functools.partial(evict_block, eps=eps),
                      jnp.int32(0))
    start = rounds

    def fwd_cond(s):
      return (s[2] > 0) & running(s[1], s[0])

    def fwd_body(s):
      t = forward_round(eps)
      return s[0] + 1, jnp.maximum(s[1], t), jnp.sum((slot_ref[...] < 0).astype(jnp.int32))

    rounds, top, left = jax.lax.while_loop(
        fwd_cond, fwd_body, (rounds, top, jnp.sum((slot_ref[...] < 0).astype(jnp.int32))))
    forward = rounds - start
    lam = lam_now()
    go = (left == 0) & running(top, rounds)

    def rev_cond(s):
      return s[1] & go & running(top, s[0])

    def rev_body(s):
      reverse_round(eps, lam)
      return s[0] + 1, _any(violators(lam))

    rounds, _ = jax.lax.while_loop(rev_cond, rev_body, (rounds, _any(violators(lam))))
    # Prices shifted so lambda = 0; unheld codes up to lambda (never breaks eps-CS).
    price = jnp.maximum(price_ref[...] - jnp.where(lam < jnp.inf, lam, 0.0), 0.0)
    barrier()
    price_ref[...] = price
    barrier()
    idx = jnp.arange(NUM_STATS, dtype=jnp.int32)
    stats = jnp.where(idx == 2 * p, forward, jnp.where(idx == 2 * p + 1, rounds - start - forward,
                                                       stats))
    return rounds, jnp.max(price), stats

  # Warm start: prices and the latents' list positions; owners follow.
  price_ref[...] = price0_ref[...]
  slot_ref[...] = slot0_ref[...]
  owner_ref[...] = jnp.full((kp,), -1, jnp.int32)
  barrier()
  slot = slot_ref[...]
  put(owner_ref, held(slot), person, slot >= 0)
  barrier()
  zeros = jnp.zeros((NUM_STATS,), jnp.int32)
  run = jnp.max(run_ref[...]) > 0
  rounds, top, stats = jax.lax.fori_loop(
      0, len(phases) * run.astype(jnp.int32), phase,
      (jnp.int32(0), jnp.max(price_ref[...]), zeros))
  ok = _all(slot_ref[...] >= 0) & running(top, rounds)
  idx = jnp.arange(NUM_STATS, dtype=jnp.int32)
  stats_ref[...] = jnp.where(idx == NUM_STATS - 2, rounds,
                             jnp.where(idx == NUM_STATS - 1, ok.astype(jnp.int32), stats))


def solver(*, num_codes, max_rounds, price_cap, phases, buffer, reverse_buffer,
           interpret=None, num_warps=8):
  """A batched drop-in for vmap(auction._auction_one) (the same constants passed in):
  (cand, a, init_codes, init_price, run) -> (slot, ok, rounds, price, phase_rounds).
  `run` [B] bool: images to solve (the others come back as started, ok False).
  interpret=None: compiled on a GPU, Pallas' interpreter elsewhere."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  phases = tuple(float(e) for e in phases)
  n_phases = len(phases)
  assert 2 * n_phases <= NUM_STATS - 2

  def solve(cand, a, init_codes, init_price, run):
    b, l, c = cand.shape
    k = num_codes
    kp = _pow2(k)
    person = jnp.arange(l, dtype=jnp.int32)
    bi = jnp.arange(b)[:, None, None]
    inv = jnp.full((b, l, kp), -1, jnp.int32).at[bi, person[None, :, None], cand].set(
        jnp.arange(c, dtype=jnp.int32)[None, None, :])
    inl = jnp.zeros((b, kp), jnp.int32).at[jnp.arange(b)[:, None], cand.reshape(b, -1)].set(1)
    slot0 = jnp.where(init_codes >= 0,
                      jnp.take_along_axis(inv, jnp.clip(init_codes, 0, kp - 1)[..., None],
                                          axis=2)[..., 0], -1)
    price0 = jnp.zeros((b, kp), jnp.float32).at[:, :k].set(init_price.astype(jnp.float32))
    run = run.astype(jnp.int32)[:, None]
    spec = lambda *shape: pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))
    kernel = functools.partial(_kernel, num_codes=k, max_rounds=max_rounds,
                               price_cap=price_cap, phases=phases, buffer=buffer,
                               reverse_buffer=reverse_buffer, interpret=interpret)
    slot, price, _, stats = pl.pallas_call(
        kernel, grid=(b,),
        in_specs=[spec(l, c), spec(l, c), spec(l, kp), spec(kp), spec(l), spec(kp), spec(1)],
        out_specs=[spec(l), spec(kp), spec(kp), spec(NUM_STATS)],
        out_shape=[jax.ShapeDtypeStruct((b, l), jnp.int32),
                   jax.ShapeDtypeStruct((b, kp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kp), jnp.int32),
                   jax.ShapeDtypeStruct((b, NUM_STATS), jnp.int32)],
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret, name="pivq_auction")(
            cand.astype(jnp.int32), a.astype(jnp.float32), inv, inl, slot0.astype(jnp.int32),
            price0, run)
    phase_rounds = stats[:, :2 * n_phases].reshape(b, n_phases, 2)
    return slot, stats[:, -1] > 0, stats[:, -2], price[:, :k], phase_rounds

  return solve


def supports(l: int) -> bool:
  """Triton's tensors have power-of-two sizes: the kernel needs L to be one."""
  return l >= 2 and l & (l - 1) == 0

"""The on-device matching solver (PI-VQ paper §3.4): an eps-scaling forward/reverse
auction for the asymmetric assignment problem (Bertsekas 1988; Bertsekas & Castanon 1993),
pure JAX (batched ops and `lax.while_loop`), so it runs under jit, vmap and batch sharding;
`auction_kernel` fuses the same rounds into one GPU launch per solve, each image on its
own. `matching.assign(cost, solver="auction")` is the entry point.

Auction (per image; the images of a batch run in lock step)
------------------------------------------------------------
Persons are the L latents, objects the K codes, benefits a_ij = -cost_ij.
1. Pruning. Some optimal assignment puts every latent on one of its own L nearest codes: a
   latent sitting elsewhere has one of its L nearest free (only L-1 other latents exist)
   and moving there does not raise the cost. So latent i only bids among its C nearest
   codes, C = L being always safe. Cheaper lists are tried first (C in LADDER, e.g. 32):
   their result is accepted only with a certificate over all K codes: the duality gap of
   the final prices (weak LP duality: any prices p >= 0 bound the optimum by
   sum_i max_j (a_ij - p_j) + sum_j p_j) is at most 2 * L * EPS_FINAL, the bound the full
   lists guarantee; otherwise (or when a cheap precheck or a price blow-up shows the
   short lists cannot hold a one-to-one matching) the next size is tried, ending at C = L,
   warm-started from the previous level's prices and assignment (images already certified
   then need no rounds; any prices and eps-CS partial assignment are a valid auction
   start).
   Each list is shifted so its best benefit is 0 (every assignment's total moves by the
   same amount) and the image's benefits are divided by S, the largest spread of a list,
   so benefits lie in [-1, 0] whatever the cost scale (1e-6 and 1e6 behave the same).
2. Forward auction, Jacobi form: unassigned latents (up to BUFFER per round; any subset
   may bid, and a round then costs O(BUFFER * C), not O(L * K)) bid for their best code
   at current prices, raising it by (best - second best profit) + eps; each code goes to
   its highest bidder and its previous holder becomes unassigned. Invariant (eps-CS):
   every holder's profit is within eps of its best. One-to-one holds by construction: a
   code has at most one holder.
3. The asymmetric trap. With L < K, eps-CS is not enough: optimality also needs every
   *unheld* code priced no higher than every held one (the lambda condition). eps-scaling
   carries prices across phases, so a code can end unheld with a stale high price and the
   result is then suboptimal. So after every forward pass, with lambda = min held price,
   reverse iterations run on the unheld codes priced above lambda (up to REVERSE_BUFFER
   per round): such a code either drops to lambda (no latent would gain
   more than eps from it) or takes its best latent at price max(lambda, second best -
   eps), freeing that latent's old code. Each take raises a latent's profit by >= eps, so
   this ends; eps-CS is kept and every latent stays assigned. Afterwards prices are
   shifted so lambda = 0 and unheld codes sit at 0 (raising an unheld price never breaks
   eps-CS), so the lambda condition holds exactly.
4. eps-scaling: eps = EPS_START, /EPS_FACTOR per phase, down to EPS_FINAL. Assignments
   are kept between phases and only latents violating the new eps-CS give their codes up.
   This keeps identical latents (collapsed encoders) from refighting their price war from
   scratch in every phase. Before it, a direct attempt runs one phase at EPS_FINAL with a
   few forward rounds (`direct_rounds`): latents that rarely want the same code
   (Gaussian ones, most trained ones) finish there, and the scaled phases then find
   nothing to do; near-identical ones would start a long price war, so where the attempt
   does not finish the scaled phases start over from the level's start.

Optimality bound
----------------
eps-CS plus the lambda condition make the assignment optimal within L * eps (Bertsekas'
asymmetric assignment theorem; benefits here are in units of S). Float32 rounding of the
profits (a few ulps of 1, below EPS_FINAL = 2^-22) at most doubles the slack, and the
certificate for short lists accepts a duality gap up to 2 * L * EPS_FINAL, so in cost
units:
    total_cost(auction) - optimum <= 2 * L * EPS_FINAL * S = L * 2^-21 * S,
S = the largest spread (C-th nearest minus nearest distance) of a latent's candidates,
returned per image as info["gap_bound"] by `auction_solve`. That is 2^-21 * S per latent:
a relative gap of at most ~5e-7 * S / (mean matched cost), the float32 resolution of
the costs themselves (measured gaps are 0 to ~1e-8). "Optimal" means exactly this;
costs on an integer grid of step delta are solved exactly whenever L * 2^-21 * S < delta.
EPS_FINAL cannot go much lower: prices live in float32 on a [0, ~1] scale where one ulp
is 2^-24..2^-23; every bid moves a price by at least one ulp (nextafter), so every round
makes progress.

Non-finite costs: the auction runs on sanitised costs (so it always terminates) and
returns -1 for every latent of an image whose costs are not finite.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pivq_jax.quantizers import auction_kernel
from pivq_jax.quantizers.ops import max_first as _max_first

# eps schedule, in units of the image's candidate spread S (benefits lie in [-1, 0]).
EPS_START = 2.0 ** -6
EPS_FACTOR = 16.0
EPS_FINAL = 2.0 ** -22
# Candidate-list sizes tried before the always-safe C = L (see `auction_solve`).
LADDER = (32, 128)
BUFFER = 32  # unassigned latents bidding per forward round (at most)
REVERSE_BUFFER = 8  # overpriced unheld codes handled per reverse round (at most)
PRICE_CAP = 8.0  # a cheap level gives up when a price passes this (likely infeasible)
KERNELS = ("xla", "pallas")


def direct_rounds(l: int) -> int:
  """The direct attempt's forward rounds before eps-scaling starts over: twice what seating
  L latents BUFFER at a time takes, plus 16 (a choice, measured in docs/benchmarks.md)."""
  return 2 * -(-l // BUFFER) + 16


# ----------------------------------------------------------------------------------------
# Auction, one image (vmapped over the batch).


def _phases():
  n = int(np.ceil(np.log(EPS_START / EPS_FINAL) / np.log(EPS_FACTOR))) + 1
  return np.maximum(EPS_START / EPS_FACTOR ** np.arange(n), EPS_FINAL).astype(np.float32)


def _first_true(mask, n):
  """Indices of the first n True entries of a 1-D mask (len(mask) where fewer); a prefix
  sum and a binary search, several times cheaper than jnp.nonzero(size=n) on CPU."""
  count = jax.lax.associative_scan(jnp.add, mask.astype(jnp.int32))
  return jnp.searchsorted(count, jnp.arange(1, n + 1, dtype=jnp.int32), side="left",
                          method="scan_unrolled").astype(jnp.int32)


def _at(x, idx):
  """x[i, idx[i]] for x [N, M], idx [N] (clipped into range)."""
  return jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1)[:, None], axis=1)[:, 0]


def _auction_one(cand, a, init_codes, init_price, *, num_codes, max_rounds, price_cap):
  """Forward/reverse eps-scaling auction on candidate lists (one image).

  cand: int32[L, C] code ids, a: float32[L, C] benefits in [-1, 0]. init_codes int32[L]
  (-1: none) and init_price float32[K] warm-start it (any prices and any one-to-one
  partial assignment are a valid start: latents violating eps-CS are evicted first).
  Returns (slot int32[L] positions in the candidate lists, ok bool, rounds int32, price,
  phase_rounds int32[1 + phases, 2]: the direct attempt's and each eps phase's forward
  and reverse rounds).
  ok is False when max_rounds ran out or a price passed price_cap (then slot may hold
  -1s; the caller retries with longer lists).
  """
  l, c = a.shape
  k = num_codes
  nb = min(l, BUFFER)
  nv = min(k, REVERSE_BUFFER)
  person = jnp.arange(l, dtype=jnp.int32)
  # inv[i, code] = position of `code` in latent i's list, or -1: the column view the
  # reverse iterations need.
  inv = jnp.full((l, k), -1, jnp.int16 if c < 2 ** 15 else jnp.int32)
  inv = inv.at[person[:, None], cand].set(jnp.arange(c, dtype=inv.dtype)[None, :])
  in_lists = jnp.zeros((k,), bool).at[cand.reshape(-1)].set(True)

  def held(slot):
    return jnp.where(slot >= 0, _at(cand, slot), k)  # k = none (dropped by scatters)

  def lam_of(price, owner):
    return jnp.min(jnp.where(owner >= 0, price, jnp.inf))

  def forward_round(price, owner, slot, eps):
    # Jacobi bidding (Bertsekas 1988) by up to `nb` unassigned latents; any subset of the
    # unassigned latents may bid, so capping the buffer keeps correctness. Everything is
    # O(nb * C + nb^2): no pass over all K codes per round.
    who = _first_true(slot < 0, nb)
    valid = who < l
    w_c = jnp.minimum(who, l - 1)
    cb, ab = cand[w_c], a[w_c]
    prof = ab - price[cb]
    v, best = _max_first(prof)
    second = jnp.max(jnp.where(jnp.arange(c) == best[:, None], -jnp.inf, prof), axis=1)
    j = _at(cb, best)
    p_old = price[j]
    # New price = old + (best - second best profit) + eps, so the winner ends eps-CS.
    # The cap only bites for single-candidate lists (second = -inf); nextafter keeps
    # float32 progress.
    bid = jnp.maximum(p_old + jnp.minimum(v - second, 4.0) + eps,
                      jnp.nextafter(p_old, jnp.inf))
    # Each code goes to its highest bidder (ties: first in the buffer).
    r = jnp.arange(nb)
    beats = (bid[None, :] > bid[:, None]) | ((bid[None, :] == bid[:, None]) &
                                             (r[None, :] < r[:, None]))
    won = valid & ~jnp.any((j[:, None] == j[None, :]) & beats & valid[None, :], axis=1)
    code = jnp.where(won, j, k)
    displaced = jnp.where(won & (owner[j] >= 0), owner[j], l)  # (-1 would wrap around)
    slot = slot.at[displaced].set(-1, mode="drop")
    slot = slot.at[jnp.where(won, who, l)].set(best, mode="drop")
    owner = owner.at[code].set(who, mode="drop")
    price = price.at[code].set(bid, mode="drop")
    return price, owner, slot, jnp.max(jnp.where(won, bid, -jnp.inf))

  def violators(price, owner, lam):
    viol = in_lists & (owner < 0) & (price > lam)
    return _first_true(viol, nv), jnp.any(viol)

  def reverse_round(price, owner, slot, eps, lam, codes):
    # Reverse iteration for the asymmetric problem (Bertsekas & Castanon 1993), Jacobi
    # form, lambda fixed: each unheld code priced above lambda either drops to lambda (no
    # latent would gain more than eps from it) or takes its best latent at
    # max(lambda, second best - eps), which keeps every held price >= lambda.
    valid = codes < k
    col = inv[:, jnp.minimum(codes, k - 1)].astype(jnp.int32).T  # [nv, L]
    profit = _at(a, slot) - price[held(slot)]  # current profits; all latents assigned
    val = jnp.where(col >= 0, a[person[None, :], jnp.maximum(col, 0)] - profit[None, :],
                    -jnp.inf)
    beta, bp = _max_first(val)
    omega = jnp.max(jnp.where(person[None, :] == bp[:, None], -jnp.inf, val), axis=1)
    take = valid & (beta - eps > lam)
    lower = valid & ~take
    q = jnp.maximum(lam, omega - eps)
    gain = jnp.where(take, beta - q, -jnp.inf)
    # A latent offered several codes accepts the largest gain (ties: first offer).
    r = jnp.arange(nv)
    beats = (gain[None, :] > gain[:, None]) | ((gain[None, :] == gain[:, None]) &
                                               (r[None, :] < r[:, None]))
    accepted = take & ~jnp.any((bp[:, None] == bp[None, :]) & beats & take[None, :],
                               axis=1)
    mover = jnp.where(accepted, bp, l)
    owner = owner.at[jnp.where(accepted, held(slot)[jnp.minimum(bp, l - 1)], k)].set(
        -1, mode="drop")
    owner = owner.at[jnp.where(accepted, codes, k)].set(bp, mode="drop")
    price = price.at[jnp.where(accepted, codes, k)].set(q, mode="drop")
    price = price.at[jnp.where(lower, codes, k)].set(lam, mode="drop")
    new_slot = inv[jnp.minimum(bp, l - 1), jnp.minimum(codes, k - 1)].astype(jnp.int32)
    slot = slot.at[mover].set(new_slot, mode="drop")
    return price, owner, slot

  def running(top_price, rounds):
    return (rounds < max_rounds) & (top_price <= price_cap)

  def phase(carry, eps, limit=None):
    price, owner, slot, rounds, top_price = carry
    start = rounds
    # Latents violating the new (smaller) eps-CS give their codes up; the others keep them.
    prof = a - price[cand]
    evict = (slot >= 0) & (_at(prof, slot) < jnp.max(prof, axis=1) - eps)
    owner = owner.at[jnp.where(evict, held(slot), k)].set(-1, mode="drop")
    slot = jnp.where(evict, -1, slot)

    def fwd_cond(s):
      go = jnp.any(s[2] < 0) & running(s[4], s[3])
      return go if limit is None else go & (s[3] - start < limit)

    def fwd_body(s):
      price, owner, slot, top = forward_round(*s[:3], eps)
      return price, owner, slot, s[3] + 1, jnp.maximum(s[4], top)

    price, owner, slot, rounds, top_price = jax.lax.while_loop(
        fwd_cond, fwd_body, (price, owner, slot, rounds, top_price))
    forward = rounds - start
    lam = lam_of(price, owner)

    def rev_cond(s):
      return s[5] & jnp.all(s[2] >= 0) & running(top_price, s[3])

    def rev_body(s):
      price, owner, slot = reverse_round(*s[:3], eps, lam, s[4])
      return (price, owner, slot, s[3] + 1, *violators(price, owner, lam))

    price, owner, slot, rounds, _, _ = jax.lax.while_loop(
        rev_cond, rev_body, (price, owner, slot, rounds, *violators(price, owner, lam)))
    # Shift prices so lambda = 0 (keeps them ~1 for float32 resolution); unheld codes go
    # up to lambda, which never breaks eps-CS.
    price = jnp.maximum(price - jnp.where(jnp.isfinite(lam), lam, 0.0), 0.0)
    # This phase's forward and reverse rounds: under vmap each while loop runs until the
    # batch's slowest image is done, so their batch maxima are the iterations executed.
    return (price, owner, slot, rounds, jnp.max(price)), jnp.stack(
        [forward, rounds - start - forward])

  slot = jnp.where(init_codes >= 0, inv[person, jnp.clip(init_codes, 0, k - 1)], -1)
  slot = slot.astype(jnp.int32)
  owner = jnp.full((k,), -1, jnp.int32).at[held(slot)].set(person, mode="drop")
  init = (init_price.astype(jnp.float32), owner, slot, jnp.int32(0), jnp.max(init_price))
  # The direct attempt: EPS_FINAL at once, at most direct_rounds(L) forward rounds. From
  # zero prices (or a converged level's, whose unheld codes sit at 0) forward rounds keep
  # every unheld code at the lowest price, so reverse steps are rare. Where it
  # finishes (latents that rarely compete) the eps-scaling phases below find nothing to
  # do; elsewhere they start over from `init`. Its rounds count either way.
  direct, first = phase(init, jnp.float32(EPS_FINAL), limit=direct_rounds(l))
  done = jnp.all(direct[2] >= 0) & running(direct[4], direct[3])
  start = jax.tree.map(lambda d, i: jnp.where(done, d, i), direct, init)
  start = (*start[:3], direct[3], start[4])
  (price, owner, slot, rounds, top_price), phase_rounds = jax.lax.scan(
      phase, start, jnp.asarray(_phases()))
  phase_rounds = jnp.concatenate([first[None], phase_rounds])
  ok = jnp.all(slot >= 0) & running(top_price, rounds)
  return slot, ok, rounds, price, phase_rounds


def _fill_unassigned(codes, num_codes):
  """Gives latents without a code distinct unused codes (only after a failed solve)."""
  l = codes.shape[0]
  used = jnp.zeros((num_codes,), bool).at[jnp.where(codes >= 0, codes, num_codes)].set(
      True, mode="drop")
  free = jnp.nonzero(~used, size=l, fill_value=0)[0].astype(jnp.int32)
  rank = jnp.cumsum(codes < 0) - 1
  return jnp.where(codes < 0, free[jnp.clip(rank, 0, l - 1)], codes)


def _lists(cost, c):
  """Each latent's c nearest codes in order: (-costs, ids, costs minus the nearest's), all
  [B, L, c]. Ties go in index order, so shorter lists prefix longer ones."""
  # The barrier keeps XLA from rewriting top_k into a full sort when fused with its users.
  # One barrier per array: a barrier over the (values, indices) pair crashes XLA:CPU's
  # compiler under shard_map on several devices (jax 0.10.2).
  neg, cand = map(jax.lax.optimization_barrier, jax.lax.top_k(-cost, c))
  return neg, cand, neg[..., :1] - neg


def _scale(spread):
  """S per image: the largest spread of its lists (1 where all are 0)."""
  scale = jnp.max(spread, axis=(1, 2))
  return jnp.where(scale > 0, scale, 1.0)


def _crowd(cand, num_codes):
  """Per image, the most latents sharing a nearest code (shorter lists cannot hold them)."""
  b = cand.shape[0]
  top1 = jnp.zeros((b, num_codes), jnp.int32).at[jnp.arange(b)[:, None], cand[..., 0]].add(1)
  return jnp.max(top1, axis=1)


def _level(cost, init, *, c, final, max_rounds):
  """Auction on each latent's c nearest codes, warm-started from the previous level's
  result `init` where that one converged; a result dict ("phase_rounds" as info's)."""
  bsz, l, k = cost.shape
  neg, cand, spread = _lists(cost, c)  # each list shifted so its best costs 0
  scale = _scale(spread)
  a = -spread / scale[:, None, None]
  solve = jax.vmap(functools.partial(_auction_one, num_codes=k, max_rounds=max_rounds,
                                     price_cap=np.inf if final else PRICE_CAP))
  warm = init["warm"][:, None]
  init_codes = jnp.where(warm, init["codes"], -1)
  init_price = jnp.where(warm, init["price"] * (init["scale"] / scale)[:, None], 0.0)

  def run(_):
    slot, ok, rounds, price, phase_rounds = solve(cand, a, init_codes, init_price)
    converged = ok
    # Certificate over all K codes (for c = L pruning is provably safe): the duality gap
    # at the final prices, sum_i (best profit over all K - own profit) + the unheld
    # codes' prices, bounds total - optimum. Checking it summed, not latent by latent
    # (eps-CS against every code), gives the same guarantee and accepts short lists
    # whose slack sits unevenly (collapsed latents: whole levels of rounds saved).
    if not final:
      prof = -(neg[..., :1] + cost) / scale[:, None, None] - price[:, None, :]
      codes = _codes(cand, slot)
      own = (jnp.take_along_axis(a, jnp.maximum(slot, 0)[..., None], -1)[..., 0]
             - jnp.take_along_axis(price, codes, axis=1))
      held = jnp.zeros((bsz, k), bool).at[jnp.arange(bsz)[:, None], codes].set(True)
      gap = (jnp.sum(jnp.max(prof, axis=2) - own, axis=1)
             + jnp.sum(jnp.where(held, 0.0, price), axis=1))
      ok = ok & (gap <= 2 * l * EPS_FINAL)
    return {"codes": jnp.where(slot >= 0, _codes(cand, slot), -1), "ok": ok,
            "warm": converged, "price": price, "rounds": rounds, "scale": scale,
            "level": jnp.full((bsz,), c, jnp.int32), "phase_rounds": phase_rounds}

  if final:
    return run(None)
  # Cheap precheck against lists too short to hold a perfect matching: a group of latents
  # sharing one nearest code (a collapsed cluster) has nearly the same lists, so skip
  # this level when such a group outnumbers a list.
  skipped = {"codes": jnp.full((bsz, l), -1, jnp.int32), "ok": jnp.zeros((bsz,), bool),
             "warm": jnp.zeros((bsz,), bool), "price": jnp.zeros((bsz, k), jnp.float32),
             "rounds": jnp.zeros((bsz,), jnp.int32), "scale": scale,
             "level": jnp.full((bsz,), c, jnp.int32),
             "phase_rounds": jnp.zeros((bsz, len(_phases()) + 1, 2), jnp.int32)}
  return jax.lax.cond(jnp.max(_crowd(cand, k)) <= c, run, lambda _: skipped, None)


def _codes(cand, slot):
  return jnp.take_along_axis(cand, jnp.maximum(slot, 0)[..., None], axis=-1)[..., 0]


def list_lengths(l: int, k: int) -> list[int]:
  """The candidate-list lengths tried for L latents and K codes, cheapest first: the
  LADDER sizes below the final C = min(K, max(L, 2)) (2 even for L = 1, so a "second
  best" exists), then that one. info["level_rounds"] has one column per entry."""
  final_c = min(k, max(l, 2))
  return sorted(set(c for c in LADDER if c < final_c)) + [final_c]


def auction_solve(cost, *, max_rounds=None, kernel="xla"):
  """Auction (PI-VQ paper §3.4 matching) on cost float[B, L, K] -> (int32[B, L], info).

  Tries candidate lists of LADDER sizes (cheap, certified over all K codes, skipped or
  abandoned when too short) and falls back to C = L lists, which pruning makes safe.
  info: "rounds" (auction rounds of the accepted level), "level" (its list length),
  "converged" (False only if max_rounds ran out: the leftover latents then got arbitrary
  free codes, still one-to-one), "gap_bound" (L * 2^-21 * S, the guaranteed bound on
  total cost - optimum in cost units; see the module docstring), "level_rounds" (int32[B,
  levels]: each image's rounds per list length, abandoned levels included), "phase_rounds"
  (int32[B, levels, 1 + eps phases, 2]: forward and reverse, direct attempt first),
  "lockstep_rounds" (the rounds the loops ran, the accelerator's cost: "xla" moves the
  batch in lock step and runs a level for all unless all are certified; "pallas" is one
  launch, as long as its slowest image's rounds). kernel: "xla" (pure JAX) or "pallas"
  (`auction_kernel`; Pallas' interpreter off GPU); `matching.assign` picks one.
  """
  if kernel not in KERNELS:
    raise ValueError(f"Unknown auction kernel {kernel!r}; use one of {KERNELS}.")
  bsz, l, k = cost.shape
  if max_rounds is None:
    max_rounds = 100 * l + 20_000
  cost = cost.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(cost), axis=(1, 2))
  cost = jnp.where(jnp.isfinite(cost), cost, 0.0)
  levels = list_lengths(l, k)
  final_c = levels[-1]
  res = {"codes": jnp.full((bsz, l), -1, jnp.int32), "ok": jnp.zeros((bsz,), bool),
         "warm": jnp.zeros((bsz,), bool), "price": jnp.zeros((bsz, k), jnp.float32),
         "rounds": jnp.zeros((bsz,), jnp.int32), "scale": jnp.ones((bsz,), jnp.float32),
         "level": jnp.zeros((bsz,), jnp.int32),
         "history": jnp.zeros((bsz, len(levels), len(_phases()) + 1, 2), jnp.int32)}

  def level(r, i, c):
    out = _level(cost, r, c=c, final=c == final_c, max_rounds=budgets[i])
    out["history"] = r["history"].at[:, i].set(out.pop("phase_rounds"))
    return out

  budgets = [max_rounds if c == final_c else 20 * l + 4000 for c in levels]
  if kernel == "pallas":  # the same lists, scales and precheck, per image
    neg, cand, spread = _lists(cost, final_c)  # every level's lists are prefixes
    fits = jnp.stack([(_crowd(cand, k) <= c) | (c == final_c) for c in levels], axis=1)
    scale = jnp.stack([_scale(spread[..., :c]) for c in levels], axis=1)
    res = auction_kernel.solve(
        cost, neg[..., 0], cand, spread, fits=fits, scale=scale, levels=levels,
        max_rounds=budgets, price_caps=[np.inf if c == final_c else PRICE_CAP for c in levels],
        phases=_phases(), direct_limit=direct_rounds(l), buffer=BUFFER,
        reverse_buffer=REVERSE_BUFFER, eps_final=EPS_FINAL)
  for i, c in enumerate(levels if kernel == "xla" else []):
    run = functools.partial(level, i=i, c=c)
    res = run(res) if i == 0 else jax.lax.cond(jnp.all(res["ok"]), lambda r: r, run, res)
  converged = res["ok"] & finite
  codes = jax.vmap(functools.partial(_fill_unassigned, num_codes=k))(res["codes"])
  codes = jnp.where(finite[:, None], codes, -1).astype(jnp.int32)
  info = {"rounds": res["rounds"], "level": res["level"], "converged": converged,
          "gap_bound": 2 * l * EPS_FINAL * res["scale"],
          "phase_rounds": res["history"],
          "level_rounds": jnp.sum(res["history"], axis=(2, 3)),
          "lockstep_rounds": jnp.sum(jnp.max(res["history"], axis=0)) if kernel == "xla"
                             else jnp.max(jnp.sum(res["history"], axis=(1, 2, 3)))}
  return codes, info

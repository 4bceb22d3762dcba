"""Matching quantization: one-to-one assignment of latents to codes (PI-VQ paper §3.4).

For each image the L latents are assigned to L *distinct* codes minimising the total cost
sum_l ||z_l - e_pi(l)|| (a rectangular L x K linear assignment problem, L <= K).

Solvers (`assign(cost, solver=...)`):
  - "auction" (default): on-device, pure JAX; an epsilon-scaling forward/reverse auction for
    the asymmetric problem (Bertsekas 1988; Bertsekas & Castanon 1992). Jit-, vmap- and
    sharding-friendly (batched ops and `lax.while_loop`, no host round trips).
  - "hungarian": exact, scipy's `linear_sum_assignment` on the host through
    `jax.pure_callback`; usable under jit and vmap. It is the ground truth.
  - "sinkhorn": the peer baseline, ott-jax entropic OT followed by a greedy one-to-one
    repair. Valid but not optimal.

Auction algorithm (per image; all images run in lock step)
----------------------------------------------------------
Persons are the L latents, objects the K codes, benefit a_ij = -cost_ij.
1. Pruning. Some optimal assignment puts every latent on one of its own L nearest codes: a
   latent sitting elsewhere has one of its L nearest free (only L-1 other latents exist)
   and moving there does not raise the cost. So each latent keeps only its top-L codes
   (candidate lists [L, L]); objects keep their global code ids. Each candidate list is
   shifted so its best benefit is 0 (this changes every assignment's total by the same
   amount) and the image's benefits are divided by S, the largest spread of a candidate
   list, so benefits lie in [-1, 0] whatever the cost scale.
2. Forward auction (Jacobi): every unassigned latent bids for its best code at current
   prices, raising the price by (best - second best profit) + eps; each code goes to its
   highest bidder, displacing the previous holder. A code, once held, stays held.
   Invariant (eps-complementary slackness, eps-CS): every holder's profit is within eps of
   its best profit. One-to-one holds by construction: a code has at most one holder.
3. The asymmetric trap. With L < K, eps-CS is not enough: optimality also needs every
   *unheld* code to be priced no higher than every held one (Bertsekas' lambda condition).
   eps-scaling keeps prices between phases, so a code held in an earlier phase can end
   unheld with a stale high price, and the result is then suboptimal (a restart-per-phase
   auction measured 3-14% gaps at L < K). Fix: after the forward auction, with
   lambda = min held price, run reverse-auction iterations on unheld codes priced above
   lambda: such a code either drops its price to lambda (when no latent would gain more than
   eps from it), or takes its best latent at price max(lambda, second best - eps), freeing
   that latent's old code. Each take raises a latent's profit by >= eps, so this ends;
   eps-CS is kept and all latents stay assigned. At the end the lambda condition holds.
4. eps-scaling: eps runs from 1/4 down to EPS_FINAL = 2^-22 (x1/8 per phase). Between
   phases assignments are kept and only latents violating the new eps-CS are evicted
   (restarting from scratch every phase makes identical latents re-fight their price war
   each phase). Prices are shifted so lambda = 0 after each phase, and unheld codes are
   raised to lambda (harmless: raising an unheld price never breaks eps-CS).

Optimality bound
----------------
eps-CS plus the lambda condition give an assignment within L * eps of the optimum
(Bertsekas' asymmetric assignment theorem). In cost units:
    total_cost(auction) - optimum <= L * EPS_FINAL * S,   S = max candidate-list spread,
i.e. at most S * L * 2^-22 (S * 1.2e-4 at L = 512; relative to the optimal total of L
latents this is 2^-22 S / mean matched cost, ~2.4e-7 for the spreads seen in practice).
Integer costs on a grid of step delta are solved exactly when L * EPS_FINAL * S < delta.
EPS_FINAL cannot go much lower: prices live in float32 on a [0, ~1] scale, where one ulp
is 2^-23..2^-24; a bid always moves a price by at least one ulp (nextafter), so every round
makes progress and the loops end.

Non-finite costs
----------------
A NaN/Inf cost means the model has diverged. Every solver raises ValueError("Matching cost
contains NaN or Inf ..."): eagerly when the cost is concrete; under jit/vmap through a
`jax.debug.callback` on one boolean per call (the error surfaces as a runtime error
carrying the same message when the result is used). As a second line of defence the
auction returns -1 for every latent of an image whose costs are not finite (the auction
itself runs on sanitised costs, so it always terminates).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

SOLVERS = ("auction", "hungarian", "sinkhorn")
OPTS = dict(restart=True, rev_every=False, spread=True)

EPS_START = 0.25  # in units of the image's candidate spread S (benefits lie in [-1, 0])
EPS_FINAL = 2.0 ** -22
EPS_FACTOR = 8.0
_NONFINITE_MSG = ("Matching cost contains NaN or Inf; the encoder output or codebook has "
                  "diverged (lower the learning rate or check the inputs).")


# ----------------------------------------------------------------------------------------
# Exact host solver.


def _hungarian_host(cost: np.ndarray) -> np.ndarray:
  cost = np.asarray(cost)
  if not np.all(np.isfinite(cost)):
    raise ValueError(_NONFINITE_MSG)
  *lead, l, k = cost.shape
  flat = cost.reshape(-1, l, k)
  out = np.empty((flat.shape[0], l), np.int32)
  for i, c in enumerate(flat):
    rows, cols = scipy.optimize.linear_sum_assignment(c)
    out[i, rows] = cols
  return out.reshape(*lead, l)


def _hungarian(cost):
  out_shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  return jax.pure_callback(_hungarian_host, out_shape, cost, vmap_method="expand_dims")


# ----------------------------------------------------------------------------------------
# Auction (one image; vmapped over the batch).


def _phases():
  n = int(np.ceil(np.log(EPS_START / EPS_FINAL) / np.log(EPS_FACTOR))) + 1
  return np.maximum(EPS_START / EPS_FACTOR ** np.arange(n), EPS_FINAL).astype(np.float32)


def _row_of(x, slot):
  """x[i, slot[i]] for x [L, C], slot [L] (slot clipped into range)."""
  return jnp.take_along_axis(x, jnp.maximum(slot, 0)[:, None], axis=1)[:, 0]


def _auction_one(cand, a, num_codes, max_rounds):
  """Auction on candidate lists: cand int32[L, C] code ids, a float32[L, C] benefits.

  Returns (slot int32[L] into the candidate lists, -1 only if max_rounds ran out;
  rounds int32).
  """
  l, c = a.shape
  k = num_codes
  person = jnp.arange(l, dtype=jnp.int32)
  code = jnp.arange(k, dtype=jnp.int32)
  flat = cand.reshape(-1)
  person_of_entry = jnp.repeat(person, c)

  def profits(price):
    return a - price[cand]

  def held_code(slot):
    return jnp.where(slot >= 0, _row_of(cand, slot), k)  # k = "none" (dropped on scatter)

  def forward_round(price, owner, slot, eps, rnd):
    prof = profits(price)
    best = jnp.argmax(prof, axis=1).astype(jnp.int32)
    v = _row_of(prof, best)
    w = jnp.max(jnp.where(jnp.arange(c) == best[:, None], -jnp.inf, prof), axis=1)
    if OPTS["spread"]:
      near = prof >= (v - 0.5 * eps)[:, None]
      x = (person[:, None] * c + jnp.arange(c)[None, :]).astype(jnp.uint32)
      x = x ^ (rnd.astype(jnp.uint32) * jnp.uint32(0x9E3779B9))
      x = x * jnp.uint32(0x85EBCA6B)
      x = x ^ (x >> 13)
      x = x * jnp.uint32(0xC2B2AE35)
      x = (x ^ (x >> 16)) | jnp.uint32(1)
      choice = jnp.argmax(jnp.where(near, x, jnp.uint32(0)), axis=1).astype(jnp.int32)
      pj = _row_of(prof, choice)
      wj = jnp.where(choice == best, w, v)
    else:
      choice, pj, wj = best, v, w
    # Bid: new price = old + (v - w) + eps (Bertsekas). The cap only matters when a list
    # has a single candidate (w = -inf); nextafter guarantees float progress.
    j = _row_of(cand, choice)
    p_old = price[j]
    bid = jnp.maximum(p_old + jnp.minimum(pj - wj, 4.0) + eps, jnp.nextafter(p_old, jnp.inf))
    bidding = slot < 0
    target = jnp.where(bidding, j, k)
    top = jnp.full((k,), -jnp.inf).at[target].max(bid, mode="drop")
    is_top = bidding & (bid == top[jnp.minimum(target, k - 1)])
    winner = jnp.full((k,), l, jnp.int32).at[target].min(jnp.where(is_top, person, l),
                                                          mode="drop")
    got = winner < l
    won = bidding & (winner[jnp.minimum(target, k - 1)] == person)
    displaced = (slot >= 0) & got[jnp.minimum(held_code(slot), k - 1)]
    slot = jnp.where(won, choice, jnp.where(displaced, -1, slot))
    owner = jnp.where(got, winner, owner)
    price = jnp.where(got, top, price)
    return price, owner, slot

  def lam_of(price, owner):
    return jnp.min(jnp.where(owner >= 0, price, jnp.inf))

  def reverse_round(price, owner, slot, eps):
    # Bertsekas' reverse iteration for the asymmetric problem, in Jacobi form: every unheld
    # code priced above lambda either drops to lambda or takes its best latent.
    lam = lam_of(price, owner)
    pi = _row_of(a, slot) - price[held_code(slot)]  # current profits (all assigned)
    val = (a - pi[:, None]).reshape(-1)
    beta = jnp.full((k,), -jnp.inf).at[flat].max(val)
    bp = jnp.full((k,), l, jnp.int32).at[flat].min(
        jnp.where(val == beta[flat], person_of_entry, l))
    omega = jnp.full((k,), -jnp.inf).at[flat].max(
        jnp.where(person_of_entry != bp[flat], val, -jnp.inf))
    viol = (owner < 0) & (price > lam)
    lower = viol & ~(beta - eps > lam)
    offer = viol & (beta - eps > lam)
    q = jnp.maximum(lam, omega - eps)
    gain = jnp.where(offer, beta - q, -jnp.inf)  # latent's profit rise if it accepts
    to = jnp.where(offer, bp, l)
    best_gain = jnp.full((l,), -jnp.inf).at[to].max(gain, mode="drop")
    pick = jnp.full((l,), k, jnp.int32).at[to].min(
        jnp.where(offer & (gain == best_gain[jnp.minimum(to, l - 1)]), code, k), mode="drop")
    moving = pick < k
    accepted = offer & (pick[jnp.minimum(to, l - 1)] == code)
    owner = owner.at[jnp.where(moving, held_code(slot), k)].set(-1, mode="drop")
    owner = jnp.where(accepted, bp, owner)
    price = jnp.where(lower, lam, jnp.where(accepted, q, price))
    new_slot = jnp.argmax(cand == pick[:, None], axis=1).astype(jnp.int32)
    slot = jnp.where(moving, new_slot, slot)
    return price, owner, slot

  def phase(carry, xs):
    eps, final = xs
    price, owner, slot, rounds = carry
    if OPTS["restart"]:
      price = jnp.where(owner < 0, 0.0, price)
      evict = slot >= 0
    else:
      # Evict latents violating the new (smaller) eps-CS; the others keep their codes.
      prof = profits(price)
      evict = (slot >= 0) & (_row_of(prof, slot) < jnp.max(prof, axis=1) - eps)
    owner = owner.at[jnp.where(evict, held_code(slot), k)].set(-1, mode="drop")
    slot = jnp.where(evict, -1, slot)

    def fwd_cond(s):
      return jnp.any(s[2] < 0) & (s[3] < max_rounds)

    def fwd_body(s):
      return (*forward_round(*s[:3], eps, s[3]), s[3] + 1)

    r0 = rounds
    nev = jnp.sum(evict)
    price, owner, slot, rounds = jax.lax.while_loop(fwd_cond, fwd_body,
                                                    (price, owner, slot, rounds))
    r1 = rounds

    def rev_cond(s):
      viol = (s[1] < 0) & (s[0] > lam_of(s[0], s[1]))
      return ((final | OPTS["rev_every"]) & jnp.any(viol) & jnp.all(s[2] >= 0)
              & (s[3] < max_rounds))

    def rev_body(s):
      return (*reverse_round(*s[:3], eps), s[3] + 1)

    price, owner, slot, rounds = jax.lax.while_loop(rev_cond, rev_body,
                                                    (price, owner, slot, rounds))
    # Shift prices so lambda = 0 (keeps magnitudes ~1 for float32 resolution); unheld
    # codes go up to lambda, which never breaks eps-CS.
    lam = lam_of(price, owner)
    price = jnp.maximum(price - jnp.where(jnp.isfinite(lam), lam, 0.0), 0.0)
    return (price, owner, slot, rounds), jnp.stack([nev, r1 - r0, rounds - r1])

  init = (jnp.zeros((k,), jnp.float32), jnp.full((k,), -1, jnp.int32),
          jnp.full((l,), -1, jnp.int32), jnp.int32(0))
  (price, owner, slot, rounds), per_phase = jax.lax.scan(
      phase, init, (jnp.asarray(_phases()), jnp.arange(len(_phases())) == len(_phases()) - 1))
  return slot, owner, rounds, per_phase


def _fill_unassigned(codes, owner, num_codes):
  """Gives latents left without a code (only if max_rounds ran out) distinct free codes."""
  l = codes.shape[0]
  free = jnp.nonzero(owner < 0, size=l, fill_value=0)[0].astype(jnp.int32)
  rank = jnp.cumsum(codes < 0) - 1
  return jnp.where(codes < 0, free[jnp.clip(rank, 0, l - 1)], codes)


def auction_solve(cost, *, max_rounds=None):
  """Auction on cost float[B, L, K] -> (int32[B, L] codes, info dict).

  info: "rounds" (forward + reverse rounds, per image), "converged" (bool per image;
  False only if max_rounds ran out, in which case the leftover latents got arbitrary free
  codes: still one-to-one, not optimal), "gap_bound" (L * EPS_FINAL * S per image, the
  guaranteed bound on total_cost - optimum in cost units).
  """
  bsz, l, k = cost.shape
  if max_rounds is None:
    max_rounds = 200 * l + 10_000
  cost = cost.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(cost), axis=(1, 2))
  cost = jnp.where(jnp.isfinite(cost), cost, 0.0)
  c = min(k, max(l, 2))  # 2 candidates even for L = 1, so "second best" exists
  neg, cand = jax.lax.top_k(-cost, c)
  spread = neg[..., :1] - neg  # >= 0; candidate list shifted so its best is 0
  scale = jnp.max(spread, axis=(1, 2), keepdims=True)
  scale = jnp.where(scale > 0, scale, 1.0)
  a = -spread / scale
  solve = jax.vmap(functools.partial(_auction_one, num_codes=k, max_rounds=max_rounds))
  slot, owner, rounds, per_phase = solve(cand.astype(jnp.int32), a)
  codes = jnp.where(slot >= 0, jnp.take_along_axis(cand, jnp.maximum(slot, 0)[..., None],
                                                   axis=-1)[..., 0], -1)
  converged = jnp.all(slot >= 0, axis=1)
  codes = jax.vmap(functools.partial(_fill_unassigned, num_codes=k))(codes, owner)
  codes = jnp.where(finite[:, None], codes, -1).astype(jnp.int32)
  info = {"rounds": rounds, "per_phase": per_phase, "converged": converged & finite,
          "gap_bound": l * EPS_FINAL * scale[:, 0, 0]}
  return codes, info


# ----------------------------------------------------------------------------------------
# Sinkhorn baseline.


def sinkhorn_solve(cost, *, epsilon=0.05, max_iterations=2000):
  """ott-jax Sinkhorn + greedy repair. cost float[B, L, K] -> int32[B, L].

  Marginals: the L latents carry mass 1 each; a dummy latent with mass K - L and zero cost
  to every code absorbs the codes left unused; each code has mass 1 (all divided by K).
  This is the entropic relaxation of the rectangular assignment LP (each latent placed
  once, each code used at most once). `epsilon` is relative to the mean cost (ott's
  relative_epsilon="mean"). Repair: rounds in which each unassigned latent proposes its
  free code of largest plan mass (log-plan f_i + g_j - C_ij, so tiny masses still rank)
  and each code accepts its strongest proposer; every round assigns at least one latent.
  """
  from ott.geometry import geometry  # pylint: disable=g-import-not-at-top
  from ott.problems.linear import linear_problem  # pylint: disable=g-import-not-at-top
  from ott.solvers.linear import sinkhorn  # pylint: disable=g-import-not-at-top

  bsz, l, k = cost.shape
  cost = cost.astype(jnp.float32)

  def one(c):
    full = jnp.concatenate([c, jnp.zeros((1, k), c.dtype)], axis=0)
    mass_a = jnp.concatenate([jnp.ones((l,)), jnp.full((1,), float(k - l))]) / k
    geom = geometry.Geometry(cost_matrix=full, epsilon=epsilon, relative_epsilon="mean")
    prob = linear_problem.LinearProblem(geom, a=mass_a, b=jnp.full((k,), 1.0 / k))
    out = sinkhorn.Sinkhorn(max_iterations=max_iterations)(prob)
    # log of the transport plan (up to a per-problem constant), latent rows only
    return (out.f[:l, None] + out.g[None, :] - c) / geom.epsilon

  score = jax.vmap(one)(cost)
  return jax.vmap(_greedy_repair)(score)


def _greedy_repair(score):
  """score float[L, K] (higher = preferred) -> int32[L] distinct codes."""
  l, k = score.shape
  person = jnp.arange(l, dtype=jnp.int32)

  def body(s):
    codes, taken = s
    pref = jnp.where(taken[None, :], -jnp.inf, score)
    choice = jnp.argmax(pref, axis=1).astype(jnp.int32)
    strength = jnp.where(codes < 0, jnp.max(pref, axis=1), -jnp.inf)
    target = jnp.where(codes < 0, choice, k)
    top = jnp.full((k,), -jnp.inf).at[target].max(strength, mode="drop")
    is_top = (codes < 0) & (strength == top[jnp.minimum(target, k - 1)])
    winner = jnp.full((k,), l, jnp.int32).at[target].min(jnp.where(is_top, person, l),
                                                          mode="drop")
    won = (codes < 0) & (winner[jnp.minimum(target, k - 1)] == person)
    return jnp.where(won, choice, codes), taken | (winner < l)

  codes, _ = jax.lax.while_loop(lambda s: jnp.any(s[0] < 0), body,
                                (jnp.full((l,), -1, jnp.int32), jnp.zeros((k,), bool)))
  return codes


# ----------------------------------------------------------------------------------------
# Public entry point.


def _raise_if_nonfinite(all_finite):
  if not np.all(all_finite):
    raise ValueError(_NONFINITE_MSG)


def assign(cost, *, solver: str = "auction"):
  """cost: float[..., L, K] with L <= K -> int32[..., L] of distinct codes per row.

  Minimises sum_l cost[..., l, out[..., l]] subject to out[...] having no repeats
  ("auction": within L * 2^-22 * S of the optimum, see the module docstring; "hungarian":
  exact; "sinkhorn": one-to-one but not optimal). NaN/Inf costs raise ValueError, eagerly
  for concrete inputs, at run time under jit/vmap.
  """
  if solver not in SOLVERS:
    raise ValueError(f"Unknown matching solver {solver!r}; use one of {SOLVERS}.")
  *lead, l, k = cost.shape
  if l > k:
    raise ValueError(f"Matching needs L <= K, got L={l} latents and K={k} codes.")
  cost = jax.lax.stop_gradient(jnp.asarray(cost))
  if solver == "hungarian":
    return _hungarian(cost)  # checks finiteness on the host
  if isinstance(cost, jax.core.Tracer):
    jax.debug.callback(_raise_if_nonfinite, jnp.all(jnp.isfinite(cost)))
  elif not np.all(np.isfinite(np.asarray(cost))):
    raise ValueError(_NONFINITE_MSG)
  flat = cost.reshape(-1, l, k)
  if solver == "auction":
    out = _auction_jit(flat)
  else:
    out = _sinkhorn_jit(flat)
  return out.reshape(*lead, l)


_auction_jit = jax.jit(lambda c: auction_solve(c)[0])
_sinkhorn_jit = jax.jit(sinkhorn_solve)

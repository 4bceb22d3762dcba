"""The Sinkhorn baseline for matching quantization (§3.4's peer): ott-jax entropic optimal
transport, then a greedy repair to a one-to-one assignment. Valid, not optimal."""

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from pivq_jax.quantizers.ops import max_first


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
    choice = max_first(pref)[1]
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

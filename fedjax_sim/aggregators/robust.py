"""Byzantine-robust aggregators, each an ``Aggregator`` made by a factory with keyword
hyperparameters (validated at construction).

All of them see the whole cohort at once (``updates`` stacked along a leading client axis of
fixed size) and drop padded clients (weight 0) by masking, never by multiplying by their zero
weight, so a padded row may hold any value (huge, inf, NaN) without changing the result. The
number of real clients ``n`` is traced, so one compiled round serves cohorts with dropouts.

Coordinate-wise rules (trimmed mean) work leaf by leaf; rules that need distances or norms
between whole updates (Krum, geometric median, norm bounding, centered clipping) work on each
client's update flattened into one vector (``jax.flatten_util.ravel_pytree``) and unflatten
the aggregate back into the update's structure and dtypes.

Which rules use the aggregation weights: trimmed mean, Krum, Multi-Krum and centered clipping
are unweighted over the real clients, as in their papers (a client claiming a large weight
must not buy more influence); the geometric median (RFA) and norm bounding weight clients by
``weights``, as in theirs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_sim.aggregators.base import Aggregator
from fedjax_sim.core.types import Array, PyTree

__all__ = [
    "ROBUST_AGGREGATORS",
    "centered_clipping",
    "check_krum_bound",
    "geometric_median",
    "krum",
    "krum_scores",
    "multi_krum",
    "norm_bounding",
    "trimmed_mean",
]


def _flatten_clients(updates: PyTree) -> tuple[Array, object]:
    """``updates`` as ``[clients, dim]`` plus the function unflattening one ``[dim]`` row."""
    _, unravel = ravel_pytree(jax.tree.map(lambda u: u[0], updates))
    flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates)
    return flat, unravel


def _zero_padded(flat: Array, real: Array) -> Array:
    # `where`, not a multiply: 0 * inf is NaN, and padded rows may hold anything.
    return jnp.where(real[:, None], flat, jnp.zeros((), flat.dtype))


def _masked_mean(flat: Array, real: Array) -> Array:
    """Unweighted mean of the real rows of ``flat`` (zeros when none is real)."""
    count = jnp.sum(real).astype(flat.dtype)
    total = jnp.sum(_zero_padded(flat, real), axis=0)
    return total / jnp.maximum(count, jnp.ones((), flat.dtype))


def _clip_rows(flat: Array, max_norm: float) -> Array:
    """Each row scaled to L2 norm at most ``max_norm`` (rows within it are unchanged)."""
    norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
    tiny = jnp.finfo(flat.dtype).tiny
    return flat * jnp.minimum(1.0, max_norm / jnp.maximum(norms, tiny)).astype(flat.dtype)


# --- Trimmed mean ------------------------------------------------------------------------------


def trimmed_mean(trim_fraction: float = 0.1) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates").

    In every coordinate, of the ``n`` real clients' values the ``floor(trim_fraction * n)``
    largest and as many smallest are dropped and the rest averaged, unweighted. With
    ``trim_fraction = 0`` this is the plain (unweighted) mean of the real clients.

    Args:
      trim_fraction: the fraction ``beta`` trimmed from each end, in ``[0, 0.5)`` (so at
        least one value is always kept).

    Returns:
      A stateless ``Aggregator``; the aggregate is zero when no client is real.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5); got {trim_fraction}.")

    def apply(state, updates, weights, key):
        del key
        real = weights > 0
        cohort = real.shape[0]
        n = jnp.sum(real.astype(jnp.int32))
        # floor(beta * n) for every possible n, computed on the host in float64: in float32
        # beta * n can round just below an integer (0.35 * 20) and trim one value too few.
        trims = jnp.asarray([math.floor(trim_fraction * m) for m in range(cohort + 1)], jnp.int32)
        k = trims[n]
        rank = jnp.arange(cohort)
        keep = (rank >= k) & (rank < n - k)
        count = jnp.maximum(n - 2 * k, 1)

        def leaf_trimmed_mean(u):
            shape = (-1,) + (1,) * (u.ndim - 1)
            # Padded clients become +inf, so sorting puts the n real values first.
            ranked = jnp.sort(jnp.where(real.reshape(shape), u, jnp.inf), axis=0)
            kept = jnp.where(keep.reshape(shape), ranked, jnp.zeros((), u.dtype))
            return jnp.sum(kept, axis=0) / count.astype(u.dtype)

        return jax.tree.map(leaf_trimmed_mean, updates), state

    return Aggregator(init=lambda params: (), apply=apply)


# --- Krum and Multi-Krum -----------------------------------------------------------------------


def check_krum_bound(cohort_size: int, num_byzantine: int) -> None:
    """Raises ``ValueError`` unless ``cohort_size > 2 * num_byzantine + 2``, the condition under
    which Krum's guarantee holds (Blanchard et al. 2017, Proposition 1).

    Args:
      cohort_size: ``n``, the number of clients aggregated per round.
      num_byzantine: ``f``, the number of Byzantine clients to tolerate.
    """
    if 2 * num_byzantine + 2 >= cohort_size:
        raise ValueError(
            f"Krum tolerates f byzantine clients only when n > 2f + 2; got n={cohort_size}, "
            f"f={num_byzantine}: lower num_byzantine or raise clients_per_round."
        )


def krum_scores(flat_updates: Array, real_mask: Array, num_byzantine: int) -> Array:
    """Krum's score of every client (Blanchard et al. 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent"): the sum of squared L2 distances to its ``n - f - 2``
    nearest other real clients, with ``n`` the number of real clients.

    Args:
      flat_updates: ``[clients, dim]`` client updates, one flat vector each.
      real_mask: ``[clients]`` bool, False for padded clients.
      num_byzantine: ``f``.

    Returns:
      ``[clients]`` scores; ``+inf`` for padded clients. When dropouts leave ``n <= f + 2``
      real clients, each real client is scored by its single nearest neighbour instead (the
      formula's neighbour count would be below one).
    """
    cohort = flat_updates.shape[0]
    flat = _zero_padded(flat_updates, real_mask)
    # Squared distances one row at a time: memory [clients, dim], not [clients, clients, dim],
    # and exact, unlike |a|^2 + |b|^2 - 2ab, which cancels when clients are close compared
    # with their norms (honest clients next to a far outlier).
    dists = jax.lax.map(lambda x: jnp.sum(jnp.square(flat - x), axis=1), flat)
    # A client is no neighbour of itself, and padded clients are nobody's neighbour.
    others = real_mask[None, :] & ~jnp.eye(cohort, dtype=bool)
    ranked = jnp.sort(jnp.where(others, dists, jnp.inf), axis=1)
    n = jnp.sum(real_mask.astype(jnp.int32))
    neighbours = jnp.clip(n - num_byzantine - 2, 1, jnp.maximum(n - 1, 1))
    nearest = jnp.arange(cohort)[None, :] < neighbours
    scores = jnp.sum(jnp.where(nearest, ranked, jnp.zeros((), ranked.dtype)), axis=1)
    # A lone real client has no neighbour (its row is all inf): score 0 so it is chosen.
    scores = jnp.where(n > 1, scores, jnp.zeros((), scores.dtype))
    return jnp.where(real_mask, scores, jnp.inf)


def multi_krum(num_byzantine: int, num_selected: int) -> Aggregator:
    """Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent"): the unweighted mean of the ``num_selected`` real clients with
    the lowest Krum scores (``krum_scores``).

    Args:
      num_byzantine: ``f``, the number of Byzantine clients tolerated; the cohort size ``n``
        must satisfy ``n > 2f + 2`` (checked when the round is traced).
      num_selected: ``m >= 1``, how many clients are averaged (fewer when fewer are real).

    Returns:
      A stateless ``Aggregator``; the aggregate is zero when no client is real.
    """
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0; got {num_byzantine}.")
    if num_selected < 1:
        raise ValueError(f"num_selected must be >= 1; got {num_selected}.")

    def apply(state, updates, weights, key):
        del key
        real = weights > 0
        check_krum_bound(real.shape[0], num_byzantine)
        flat, unravel = _flatten_clients(updates)
        scores = krum_scores(flat, real, num_byzantine)
        # Rank by score (stable, so ties go to the lower index); padded clients score inf
        # and rank last, and the real-mask keeps them out even when m exceeds n.
        order = jnp.argsort(scores, stable=True)
        rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        selected = real & (rank < num_selected)
        return unravel(_masked_mean(flat, selected)), state

    return Aggregator(init=lambda params: (), apply=apply)


def krum(num_byzantine: int) -> Aggregator:
    """Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent"): the update of the real client with the lowest Krum score
    (``krum_scores``), that is ``multi_krum(num_byzantine=f, num_selected=1)``.

    Args:
      num_byzantine: ``f``, the number of Byzantine clients tolerated; the cohort size ``n``
        must satisfy ``n > 2f + 2`` (checked when the round is traced).

    Returns:
      A stateless ``Aggregator``.
    """
    return multi_krum(num_byzantine=num_byzantine, num_selected=1)


# --- Geometric median (RFA) --------------------------------------------------------------------


def geometric_median(max_iters: int = 100, eps: float = 1e-6, ftol: float = 1e-6) -> Aggregator:
    """Robust federated aggregation by the weighted geometric median (Pillutla, Kakade and
    Harchaoui 2022, "Robust Aggregation for Federated Learning", RFA), computed with their
    smoothed Weiszfeld algorithm.

    Minimizes ``sum_i alpha_i ||v - x_i||`` with ``alpha_i`` the clients' weights. Starting from
    the weighted mean, each iteration sets ``beta_i = alpha_i / max(eps, ||v - x_i||)`` and
    ``v = sum_i beta_i x_i / sum_i beta_i``; it stops after ``max_iters`` iterations or once an
    iteration lowers the objective by at most ``ftol`` times its value.

    Args:
      max_iters: the most Weiszfeld iterations, ``>= 1``.
      eps: the smoothing ``nu > 0``: distances below it count as ``eps``, so a point on top of
        a client's update does not divide by zero.
      ftol: relative objective improvement at or below which iteration stops, ``>= 0``
        (``0``: always run ``max_iters``).

    Returns:
      A stateless ``Aggregator``; the aggregate is zero when every weight is zero.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1; got {max_iters}.")
    if eps <= 0:
        raise ValueError(f"eps (the smoothing) must be > 0; got {eps}.")
    if ftol < 0:
        raise ValueError(f"ftol must be >= 0; got {ftol}.")

    def apply(state, updates, weights, key):
        del key
        real = weights > 0
        flat, unravel = _flatten_clients(updates)
        flat = _zero_padded(flat, real)
        alpha = jnp.where(real, weights, jnp.zeros((), weights.dtype)).astype(flat.dtype)
        alpha = alpha / jnp.maximum(jnp.sum(alpha), jnp.finfo(flat.dtype).tiny)

        def weighted_average(w):
            return jnp.sum(w[:, None] * flat, axis=0) / jnp.maximum(
                jnp.sum(w), jnp.finfo(flat.dtype).tiny
            )

        def objective(v):
            return jnp.sum(alpha * jnp.linalg.norm(flat - v, axis=1))

        def cond(carry):
            i, _, obj, prev_obj = carry
            if ftol == 0:
                # Float32 objectives stall long before the iterates do: run every iteration.
                return i < max_iters
            return (i < max_iters) & (prev_obj - obj > ftol * obj)

        def body(carry):
            i, v, obj, _ = carry
            beta = alpha / jnp.maximum(jnp.linalg.norm(flat - v, axis=1), eps)
            v = weighted_average(beta)
            return i + 1, v, objective(v), obj

        v0 = weighted_average(alpha)
        # prev_obj = inf lets the first iteration run.
        init = (jnp.zeros((), jnp.int32), v0, objective(v0), jnp.asarray(jnp.inf, flat.dtype))
        _, v, _, _ = jax.lax.while_loop(cond, body, init)
        return unravel(v), state

    return Aggregator(init=lambda params: (), apply=apply)


# --- Norm bounding -----------------------------------------------------------------------------


def norm_bounding(max_norm: float) -> Aggregator:
    """Norm bounding (Sun, Kairouz, Suresh and McMahan 2019, "Can You Really Backdoor
    Federated Learning?"): each client's update is scaled to L2 norm at most ``max_norm``
    (over all its leaves together), then the weighted mean is taken.

    Args:
      max_norm: the bound ``M > 0``.

    Returns:
      A stateless ``Aggregator``; the aggregate is zero when every weight is zero.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0; got {max_norm}.")

    def apply(state, updates, weights, key):
        del key
        real = weights > 0
        flat, unravel = _flatten_clients(updates)
        clipped = _zero_padded(_clip_rows(_zero_padded(flat, real), max_norm), real)
        w = jnp.where(real, weights, jnp.zeros((), weights.dtype)).astype(flat.dtype)
        total = jnp.sum(w)
        mean = jnp.sum(w[:, None] * clipped, axis=0) / jnp.where(total > 0, total, 1.0)
        return unravel(mean), state

    return Aggregator(init=lambda params: (), apply=apply)


# --- Centered clipping -------------------------------------------------------------------------


def centered_clipping(clip_radius: float, iters: int = 1) -> Aggregator:
    """Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine
    Robust Optimization").

    Starting from the previous round's aggregate ``v`` (kept as the state; zeros at first),
    ``iters`` times: ``v <- v + (1/n) sum_i clip(x_i - v, tau)`` over the ``n`` real clients,
    unweighted as in the paper, where ``clip(z, tau) = z * min(1, tau / ||z||)``. With a radius
    larger than every ``||x_i - v||`` one iteration gives the plain mean.

    Args:
      clip_radius: ``tau > 0``.
      iters: the number of clipping iterations ``L >= 1`` (the paper finds 1 enough when
        starting from the previous aggregate).

    Returns:
      An ``Aggregator`` whose state is the last aggregate, shaped like ``params`` (the updates
      must share that structure). A round without real clients keeps it unchanged.
    """
    if not clip_radius > 0:
        raise ValueError(f"clip_radius must be > 0; got {clip_radius}.")
    if iters < 1:
        raise ValueError(f"iters must be >= 1; got {iters}.")

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def apply(state, updates, weights, key):
        del key
        real = weights > 0
        flat, unravel = _flatten_clients(updates)
        flat = _zero_padded(flat, real)
        v = ravel_pytree(state)[0].astype(flat.dtype)

        def step(_, v):
            return v + _masked_mean(_clip_rows(flat - v, clip_radius), real)

        v = jax.lax.fori_loop(0, iters, step, v)
        aggregate = unravel(v)
        new_state = jax.tree.map(lambda s, a: a.astype(s.dtype), state, aggregate)
        return aggregate, new_state

    return Aggregator(init=init, apply=apply)


ROBUST_AGGREGATORS = {
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "geometric_median": geometric_median,
    "norm_bounding": norm_bounding,
    "centered_clipping": centered_clipping,
}

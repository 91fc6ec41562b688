"""The aggregator protocol and the two basic reducers (mean, median): pure
``(state, updates, weights, key) -> (aggregate, state)`` in init/apply form.

``updates`` is the cohort's stacked client updates (leading axis = clients) and ``weights`` the
``[clients]`` aggregation weights; padded clients have weight 0 and must not count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.core.types import Array, PRNGKey, PyTree


class Aggregator(NamedTuple):
    """``init(params) -> state``; ``apply(state, updates, weights, key) -> (aggregate, state)``.

    ``from_sums(state, sum_weighted_updates, sum_weights, key)``, when set, computes the same
    aggregate from running sums, which the round accumulates inside the client loop instead
    of stacking every client's update (linear aggregators only).

    ``upload_bytes(d, cohort_size)``, when set, is what one client sends through this reducer
    for a ``d``-number update (secure aggregation's masked vector, keys and shares); ``None``:
    the reducer takes the update as the clients' stage left it.
    """

    init: Callable[[PyTree], PyTree]
    apply: Callable[[PyTree, PyTree, Array, PRNGKey], tuple[PyTree, PyTree]]
    from_sums: Callable[[PyTree, PyTree, Array, PRNGKey], tuple[PyTree, PyTree]] | None = None
    upload_bytes: Callable[[int, int], int] | None = None


def aggregate(aggregator: Aggregator, state: PyTree, outputs, key: PRNGKey):
    """Aggregates a round's ``ClientOutput``s, stacked or summed (see ``run_clients``)."""
    if aggregator.from_sums is not None:
        weighted_sum, weight_sum = outputs.update
        return aggregator.from_sums(state, weighted_sum, weight_sum, key)
    return aggregator.apply(state, outputs.update, outputs.weight, key)


def _safe_inverse(total):
    return jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_mean() -> Aggregator:
    """``sum_i w_i u_i / sum_i w_i`` per leaf; zero when every weight is zero."""

    def from_sums(state, weighted_sum, weight_sum, key):
        del key
        scale = _safe_inverse(weight_sum)
        return jax.tree.map(lambda s: s * scale.astype(s.dtype), weighted_sum), state

    def apply(state, updates, weights, key):
        def leaf_sum(u):
            w = weights.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
            return jnp.sum(u * w, axis=0)

        return from_sums(state, jax.tree.map(leaf_sum, updates), jnp.sum(weights), key)

    return Aggregator(init=lambda params: (), apply=apply, from_sums=from_sums)


def coordinate_median() -> Aggregator:
    """Coordinate-wise median over the real (weight > 0) clients (Yin et al. 2018).

    Needs every client's update at once; padded clients are left out via NaN.
    """

    def apply(state, updates, weights, key):
        del key
        real = weights > 0

        def leaf_median(u):
            r = real.reshape((-1,) + (1,) * (u.ndim - 1))
            med = jnp.nanmedian(jnp.where(r, u, jnp.nan), axis=0)
            return jnp.where(jnp.any(real), med, jnp.zeros_like(med))

        return jax.tree.map(leaf_median, updates), state

    return Aggregator(init=lambda params: (), apply=apply)

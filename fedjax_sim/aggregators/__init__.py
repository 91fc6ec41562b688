"""Aggregators: pure ``(state, updates, weights, key) -> (aggregate, state)`` in init/apply form.

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
    init: Callable[[PyTree], PyTree]
    apply: Callable[[PyTree, PyTree, Array, PRNGKey], tuple[PyTree, PyTree]]


def weighted_mean() -> Aggregator:
    """``sum_i w_i u_i / sum_i w_i`` per leaf; zero when every weight is zero."""

    def apply(state, updates, weights, key):
        del key
        total = jnp.sum(weights)
        scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)

        def leaf_mean(u):
            w = weights.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
            return jnp.sum(u * w, axis=0) * scale.astype(u.dtype)

        return jax.tree.map(leaf_mean, updates), state

    return Aggregator(init=lambda params: (), apply=apply)


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


AGGREGATORS = {"mean": weighted_mean, "median": coordinate_median}


def get_aggregator(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}.")
    return AGGREGATORS[name]()

"""Aggregators: pure ``(state, updates, weights, key) -> (aggregate, state)`` in init/apply form.

``updates`` is the cohort's stacked client updates (leading axis = clients) and ``weights`` the
``[clients]`` aggregation weights; padded clients have weight 0 and must not count. The
protocol and the mean and median live in ``aggregators.base`` (which every aggregator module
imports, never this package), the robust ones in ``robust``, secure aggregation in ``secure``.
"""

from __future__ import annotations

from collections.abc import Callable

from fedjax_sim.aggregators import compression, robust, secure
from fedjax_sim.aggregators.base import (
    Aggregator,
    aggregate,
    coordinate_median,
    weighted_mean,
)

AGGREGATORS = {"mean": weighted_mean, "median": coordinate_median}


def registry() -> dict[str, Callable[..., Aggregator]]:
    """Every aggregator by its config name: the mean and median here, the robust ones
    (``aggregators.robust``), simulated secure aggregation (``secure``) and signSGD's
    majority vote (``majority_vote``, ``aggregators.compression``)."""
    return {
        **AGGREGATORS,
        **robust.ROBUST_AGGREGATORS,
        "secure": secure.secure_mean,
        "majority_vote": compression.majority_vote_aggregator,
    }


def get_aggregator(name: str, **kwargs) -> Aggregator:
    """The aggregator ``name`` built with ``kwargs`` (the config's ``aggregator_kwargs``)."""
    known = registry()
    if name not in known:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(sorted(known))}.")
    try:
        return known[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"aggregator {name!r}: bad aggregator_kwargs {kwargs}: {err}") from err


__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "aggregate",
    "coordinate_median",
    "get_aggregator",
    "registry",
    "weighted_mean",
]

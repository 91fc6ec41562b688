"""Differential privacy: jittable clipping and noise, as aggregation transforms.

``clip_updates`` bounds each client's update (the client stage); ``gaussian_noise`` adds
N(0, (z * S / n)^2) to the mean of the ``n`` clipped updates (the server stage): together
the mechanism of DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", fixed cohort size, uniform weighting). The clip norm ``S`` and noise
multiplier ``z`` are read from the round's hyperparameters (``dp.clip_norm``,
``dp.noise_multiplier``), so both are sweepable. Accounting (host-side, with
``dp_accounting``) is in ``privacy.accounting``; adaptive clipping in ``privacy.adaptive``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.aggregators.transforms import AggregationTransform
from fedjax_sim.core.keys import NOISE_SALT
from fedjax_sim.core.types import PyTree

CLIP_NORM = "dp.clip_norm"
NOISE_MULTIPLIER = "dp.noise_multiplier"


def clip_by_norm(tree: PyTree, max_norm) -> PyTree:
    """``tree`` scaled to global L2 norm at most ``max_norm`` (unchanged when within it, or
    when ``max_norm`` is 0)."""
    norm = optax.tree.norm(tree)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    scale = jnp.where(max_norm > 0, scale, 1.0)  # a traced 0 (a sweep member's): no clipping
    return jax.tree.map(lambda a: a * scale.astype(a.dtype), tree)


def add_gaussian_noise(tree: PyTree, std, key: jax.Array) -> PyTree:
    """``tree`` plus independent N(0, std^2) noise in every coordinate."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        a + (std * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
        for a, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def clip_updates(name: str = CLIP_NORM) -> AggregationTransform:
    """Scales each client's update to L2 norm at most ``hparams[name]``."""
    return AggregationTransform(
        init=lambda params: (), client=lambda u, ctx: clip_by_norm(u, ctx.hparams[name])
    )


def gaussian_noise(
    multiplier: str = NOISE_MULTIPLIER,
    clip_norm: str = CLIP_NORM,
    expected_clients: float | None = None,
) -> AggregationTransform:
    """Adds N(0, std^2), ``std = z * S / n``, to every coordinate of the aggregate (the mean of
    ``n`` real clients' updates clipped to ``S``); its key is ``fold_in(round_key, NOISE_SALT)``.

    With ``expected_clients`` (Poisson sampling) ``n`` is that fixed number, as for the
    aggregate of ``fixed_denominator``; otherwise the cohort's real clients."""

    def server(aggregate, state, ctx):
        n = ctx.num_clients if expected_clients is None else expected_clients
        std = ctx.hparams[multiplier] * ctx.hparams[clip_norm] / n
        return add_gaussian_noise(aggregate, std, jax.random.fold_in(ctx.key, NOISE_SALT)), state

    return AggregationTransform(init=lambda params: (), server=server)


def fixed_denominator(expected_clients: float) -> AggregationTransform:
    """Turns the (uniform) mean of the cohort's updates into their sum over
    ``expected_clients``: McMahan et al. 2018's estimator for Poisson sampling at rate ``q``
    (``expected_clients = q * N``). Dividing by the realized cohort size would make the
    aggregate depend on it, which the accountant's analysis does not cover."""
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}.")

    def server(aggregate, state, ctx):
        scale = jnp.sum(ctx.weights) / expected_clients
        return jax.tree.map(lambda a: a * scale.astype(a.dtype), aggregate), state

    return AggregationTransform(init=lambda params: (), server=server)


# The accountant's two questions at the package level (host-side; dp_accounting loads lazily):
# the epsilon a mechanism spends, and the noise multiplier that meets a target epsilon.
from fedjax_sim.privacy import accounting  # noqa: E402

epsilon = accounting.epsilon
noise_multiplier_for_epsilon = accounting.noise_multiplier_for_epsilon

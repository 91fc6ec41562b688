"""Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping", Algorithm 1), as one aggregation transform.

Each round every client clips its update to the current clip norm ``C`` and reports the bit
``b_i = [||update_i|| <= C]``, centred to ``b_i - 1/2`` (sensitivity 1/2). The server releases

- the update: ``(sum_i clip(update_i) + N(0, (z_delta C)^2)) / m``;
- the fraction within ``C``: ``b = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2``;

and moves the clip norm geometrically towards the target quantile ``gamma`` of the update
norms: ``C <- C * exp(-eta_C (b - gamma))``. ``m`` is the expected cohort size under Poisson
sampling (``expected_clients``), else the real clients of the round. The two releases
together are one Gaussian mechanism with noise multiplier ``z``,
``z^-2 = z_delta^-2 + (2 sigma_b)^-2`` (``accounting.adaptive_clipping_noise``): the config's
``dp.noise_multiplier`` is that ``z`` (what the accountant is given) and ``z_delta`` is split
from it inside the round (``accounting.split_noise_multiplier``).

Numbers in ``state.hparams`` (sweepable): ``dp.noise_multiplier`` (z), ``dp.target_quantile``
(gamma; the paper's default 0.5), ``dp.clip_learning_rate`` (eta_C, 0.2) and
``dp.clipped_count_stddev`` (sigma_b; the paper: expected clients / 20). The initial clip norm
is ``dp.clip_norm`` (the paper starts from 0.1); the current one is in the transform's state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.aggregators.transforms import AggregationTransform
from fedjax_sim.core.keys import NOISE_SALT
from fedjax_sim.privacy import NOISE_MULTIPLIER, add_gaussian_noise

TARGET_QUANTILE = "dp.target_quantile"
CLIP_LEARNING_RATE = "dp.clip_learning_rate"
COUNT_STDDEV = "dp.clipped_count_stddev"


class AdaptiveClipState(NamedTuple):
    clip_norm: jax.Array  # the clip norm of the next round (float32 scalar)


def update_noise_multiplier(z, sigma_b):
    """``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` in the round (0 when ``z`` is 0); the host
    checks ``2 sigma_b > z`` when the algorithm is built."""
    safe_z = jnp.where(z > 0, z, 1.0)
    rest = safe_z**-2 - (2 * jnp.maximum(sigma_b, 1e-30)) ** -2
    return jnp.where(z > 0, jnp.maximum(rest, 1e-30) ** -0.5, 0.0)


def adaptive_clipping(
    initial_clip_norm: float, expected_clients: float | None = None
) -> AggregationTransform:
    """The adaptive clipping transform (clip on the clients, noise and clip update on the
    server); its client stage adds the centred bit to the update as ``(update, bit)``, which
    its server stage removes, so it must be the pipeline's only transform.

    Args:
      initial_clip_norm: ``C`` of the first round (> 0).
      expected_clients: ``m`` for Poisson sampling (``q N``); ``None``: the real clients.

    Returns:
      An ``AggregationTransform`` whose state is an ``AdaptiveClipState``.
    """
    if not initial_clip_norm > 0:
        raise ValueError(
            f"adaptive clipping starts from dp.clip_norm > 0 (Andrew et al.: 0.1), got "
            f"{initial_clip_norm}."
        )

    def init(params):
        del params
        return AdaptiveClipState(jnp.asarray(initial_clip_norm, jnp.float32))

    def client(update, ctx):
        clip = ctx.state.clip_norm
        norm = optax.tree.norm(update)
        scale = jnp.minimum(1.0, clip / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        clipped = jax.tree.map(lambda a: a * scale.astype(a.dtype), update)
        return clipped, (norm <= clip).astype(jnp.float32) - 0.5

    def server(aggregate, state, ctx):
        mean_update, mean_bit = aggregate
        hp = ctx.hparams
        real = jnp.sum(ctx.weights)  # uniform weights: the mean is the sum over them
        m = real if expected_clients is None else jnp.float32(expected_clients)
        m = jnp.maximum(m, 1.0)
        sum_update = jax.tree.map(lambda a: a * real.astype(a.dtype), mean_update)
        sigma_b = hp[COUNT_STDDEV]
        z_delta = update_noise_multiplier(hp[NOISE_MULTIPLIER], sigma_b)
        k_update, k_count = jax.random.split(jax.random.fold_in(ctx.key, NOISE_SALT))
        noised = add_gaussian_noise(sum_update, z_delta * state.clip_norm, k_update)
        released = jax.tree.map(lambda a: a / m.astype(a.dtype), noised)
        count_noise = sigma_b * jax.random.normal(k_count, (), jnp.float32)
        within = (mean_bit * real + count_noise) / m + 0.5
        clip = state.clip_norm * jnp.exp(-hp[CLIP_LEARNING_RATE] * (within - hp[TARGET_QUANTILE]))
        # An empty round (no real clients) releases nothing new about the norms.
        clip = jnp.where(real > 0, clip, state.clip_norm)
        return released, AdaptiveClipState(clip.astype(jnp.float32))

    def metrics(state):  # the clip norm this round's update chose (the next round's)
        return {"dp_clip_norm": state.clip_norm}

    return AggregationTransform(init=init, client=client, server=server, metrics=metrics)

"""The aggregation pipeline: built once, from explicit settings, and handed to an algorithm.

A ``Pipeline`` is everything between the clients' updates and the server optimizer that is not
the algorithm's own: the adversary (data poisoning before local training, model poisoning of
the uploads), error feedback (each client's update plus its residual, compressed; the
residuals are the pipeline's per-client state), the transforms' client stage on each update
(clipping, compression), the reducer (mean, robust, secure), and the transforms' server
stage on the aggregate (DP noise, adaptive clipping's clip-norm update).
``algorithms.base.ServerSide`` runs it; an algorithm built on ``ServerSide`` takes every
feature the pipeline has.

The numbers the pipeline reads from ``state.hparams`` each round (``dp.clip_norm``,
``dp.noise_multiplier``, adaptive clipping's, ``attack.fraction``) are ``Pipeline.hparams``;
an algorithm adds them to its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax

from fedjax_sim.aggregators.adversary import FRACTION, Adversary
from fedjax_sim.aggregators.base import Aggregator, weighted_mean
from fedjax_sim.aggregators.compression import Compressor
from fedjax_sim.aggregators.transforms import AggregationTransform, chain
from fedjax_sim.core.types import tree_bytes
from fedjax_sim.privacy import (
    CLIP_NORM,
    NOISE_MULTIPLIER,
    accounting,
    clip_updates,
    fixed_denominator,
    gaussian_noise,
)
from fedjax_sim.privacy import adaptive as privacy_adaptive

ADAPTIVE_KEYS = ("target_quantile", "clip_learning_rate", "clipped_count_stddev")


class Pipeline(NamedTuple):
    """Attributes:
    aggregator: reduces the clients' (transformed) updates.
    transforms: client stages on each update, server stages on the aggregate.
    adversary: malicious clients, or ``None``.
    error_feedback: the compressor applied with error feedback to each update, or ``None``.
    hparams: ``{name: value}`` the pipeline reads from ``state.hparams``.
    num_clients: the population: rows of the error-feedback residual table (0 without).
    """

    aggregator: Aggregator
    transforms: AggregationTransform
    adversary: Adversary | None = None
    error_feedback: Compressor | None = None
    hparams: Mapping[str, float] = {}  # noqa: RUF012 (never mutated)
    num_clients: int = 0

    def upload_bytes(self, update, cohort_size: int) -> int:
        """Bytes one client uploads for ``update`` (a tree of arrays or shapes) as this
        pipeline was built: the reducer's count where it has one (secure aggregation), else
        the client stage's encoding (the compressor's bits, with or without error feedback),
        else the update's own bytes (a compressor without a bit count, e.g. a plain function
        given as ``error_feedback``, is priced so). A run's ``bytes_up`` and simulated upload
        times are this number plus what the algorithm sends beside the pipeline
        (``Messages.extras``)."""
        leaves = jax.tree.leaves(update)
        d = sum(math.prod(a.shape) for a in leaves)
        if self.aggregator.upload_bytes is not None:
            return int(self.aggregator.upload_bytes(d, int(cohort_size)))
        encoding = self.transforms.upload_bits
        if self.error_feedback is not None:
            encoding = getattr(self.error_feedback, "bits", None)
        if encoding is None:
            return tree_bytes(update)
        return -(-int(encoding(d)) // 8)


def build_pipeline(
    *,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    transforms: tuple[AggregationTransform, ...] = (),
    clip_norm: float = 0.0,
    noise_multiplier: float = 0.0,
    expected_clients: float | None = None,
    adaptive_clipping: Mapping[str, float] | None = None,
    adversary: Adversary | None = None,
    attack_fraction: float = 0.0,
    error_feedback: Compressor | None = None,
    num_clients: int = 0,
    dp_numbers: bool = True,
) -> Pipeline:
    """The pipeline of these settings, checked (see ``fs.fedopt`` for each one's meaning).

    Args:
      weighting: the algorithm's client weighting (noise needs ``uniform``).
      aggregator: default the weighted mean.
      transforms: client-stage transforms (compression), after clipping, before the noise.
      clip_norm: bound on each client's update norm (0: none).
      noise_multiplier: Gaussian noise on the aggregate in units of ``clip_norm / n``.
      expected_clients: under Poisson sampling, ``q N`` (the noised sum's denominator).
      adaptive_clipping: ``{target_quantile, clip_learning_rate, clipped_count_stddev}``.
      adversary: malicious clients, a fraction ``attack_fraction`` of the population.
      attack_fraction: see ``adversary``.
      error_feedback: a compressor for error feedback (no clipping may follow it).
      num_clients: the population (client ids index the residual table); needed with
        ``error_feedback``.
      dp_numbers: keep ``dp.clip_norm`` and ``dp.noise_multiplier`` in ``hparams`` (so a
        sweep can trace them from 0); ``False`` for an algorithm that takes no DP (they must
        then be 0).

    Returns:
      A ``Pipeline``.
    """
    _check_numbers(clip_norm, noise_multiplier, weighting, aggregator)
    if not dp_numbers and (clip_norm or noise_multiplier or adaptive_clipping is not None):
        raise ValueError("this algorithm takes no DP: clip_norm and noise_multiplier must be 0.")
    if adaptive_clipping is not None:
        _check_adaptive(clip_norm, noise_multiplier, transforms, adaptive_clipping)
        stages = chain(privacy_adaptive.adaptive_clipping(clip_norm, expected_clients))
    else:
        noise = bool(noise_multiplier)
        stages = chain(
            *([clip_updates()] if clip_norm else []),
            *transforms,
            *([fixed_denominator(expected_clients)] if noise and expected_clients else []),
            *([gaussian_noise(expected_clients=expected_clients)] if noise else []),
        )
    if error_feedback is not None and clip_norm:
        raise ValueError(
            "error feedback needs no clipping after it (dp.clip_norm = 0): the residual must "
            "be what compression dropped."
        )
    if error_feedback is not None and not num_clients:
        raise ValueError("error feedback needs num_clients (its residual table's rows).")
    dp = {CLIP_NORM: float(clip_norm), NOISE_MULTIPLIER: float(noise_multiplier)}
    hparams = {
        **(dp if dp_numbers else {}),
        **({FRACTION: float(attack_fraction)} if adversary is not None else {}),
        **{f"dp.{k}": float(v) for k, v in (adaptive_clipping or {}).items()},
    }
    return Pipeline(
        aggregator or weighted_mean(),
        stages,
        adversary,
        error_feedback,
        hparams,
        int(num_clients) if error_feedback is not None else 0,
    )


def _check_adaptive(clip_norm, noise_multiplier, transforms, settings) -> None:
    if set(settings) != set(ADAPTIVE_KEYS):
        raise ValueError(
            f"adaptive_clipping needs exactly {sorted(ADAPTIVE_KEYS)}, got {sorted(settings)}."
        )
    if not 0.0 < settings["target_quantile"] < 1.0:
        raise ValueError(
            f"dp.target_quantile must be in (0, 1), got {settings['target_quantile']}."
        )
    if settings["clip_learning_rate"] < 0 or settings["clipped_count_stddev"] < 0:
        raise ValueError("dp.clip_learning_rate and dp.clipped_count_stddev must be >= 0.")
    if clip_norm <= 0:
        raise ValueError("adaptive clipping starts from dp.clip_norm > 0 (Andrew et al.: 0.1).")
    if transforms:
        raise ValueError("adaptive clipping is the only aggregation transform it supports.")
    if noise_multiplier > 0:  # the count's noise must leave budget for the update's
        accounting.split_noise_multiplier(noise_multiplier, settings["clipped_count_stddev"])


def _check_numbers(clip_norm, noise_multiplier, weighting, aggregator) -> None:
    if clip_norm < 0 or noise_multiplier < 0:
        raise ValueError(
            f"clip_norm and noise_multiplier must be >= 0, got {clip_norm}, {noise_multiplier}."
        )
    if noise_multiplier > 0:
        if clip_norm <= 0:
            raise ValueError(
                "noise_multiplier > 0 needs clip_norm > 0: the noise is scaled by the clipping "
                "norm (DP-FedAvg); set dp.clip_norm."
            )
        if weighting != "uniform":
            raise ValueError(
                "noise_multiplier > 0 needs weighting='uniform': with example weights one "
                "client's influence on the mean is not bounded by clip_norm / n."
            )
        if aggregator is not None and aggregator.from_sums is None:
            raise ValueError("noise_multiplier > 0 needs the mean aggregator (DP-FedAvg).")

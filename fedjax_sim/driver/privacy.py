"""The privacy budget of a run, from its config: which accountant, and where to stop.

A config with ``dp.noise_multiplier > 0`` is accounted for with ``privacy.accounting`` (Google's
``dp_accounting``): the sampling the accountant assumes is the run's own
(``sampling.scheme = "poisson"``: ``PoissonSampledDpEvent`` at rate ``q``; ``"uniform"``:
``clients_per_round`` of the population without replacement). Every evaluation record gets the
``epsilon`` spent so far at ``dp.delta``; with ``dp.target_epsilon > 0`` the run ends after the
last round that stays within it (its results kept, the summary saying why it stopped).

The accounting covers the sampling and the Gaussian mechanism only: stragglers, dropouts and
unavailable clients only remove sampled clients, which spends no more privacy.
"""

from __future__ import annotations

import math
from typing import Any

ACCOUNTED = ("poisson", "uniform")


def dp_group(config) -> dict[str, Any]:
    """``config.dp`` with the accounting fields' defaults (older configs lack them)."""
    group = config.get("dp")
    values = group.to_dict() if group is not None else {}
    return {
        "clip_norm": float(values.get("clip_norm", 0.0)),
        "noise_multiplier": float(values.get("noise_multiplier", 0.0)),
        "delta": float(values.get("delta", 1e-5)),
        "accountant": str(values.get("accountant", "rdp")),
        "target_epsilon": float(values.get("target_epsilon", 0.0)),
    }


def accountant_of(config, num_clients: int):
    """The ``privacy.accounting.Accountant`` of ``config``'s mechanism, or ``None`` (no noise).

    Args:
      config: an experiment config.
      num_clients: the training population.

    Raises:
      ValueError: a sampling scheme no accountant models, a target without noise, or a bad
        delta / accountant name (from ``privacy.accounting``).
    """
    dp = dp_group(config)
    if dp["target_epsilon"] < 0 or not math.isfinite(dp["target_epsilon"]):
        raise ValueError(f"dp.target_epsilon must be >= 0 (0: none), got {dp['target_epsilon']}.")
    if dp["noise_multiplier"] <= 0:
        if dp["target_epsilon"] > 0:
            raise ValueError(
                f"dp.target_epsilon={dp['target_epsilon']} but dp.noise_multiplier is 0: without "
                "noise no epsilon is finite. Set dp.noise_multiplier (and dp.clip_norm) > 0."
            )
        return None
    from fedjax_sim.driver.systems import poisson_rate, systems_of
    from fedjax_sim.privacy.accounting import Accountant

    sampling = config.get("sampling")
    scheme = sampling.scheme if sampling is not None else "uniform"
    if scheme not in ACCOUNTED:
        raise ValueError(
            f"sampling.scheme={scheme!r} has no privacy accountant (dp.noise_multiplier > 0); "
            f"use one of {', '.join(ACCOUNTED)} (poisson is what DP-FedAvg's analysis assumes)."
        )
    cohort = int(config.clients_per_round)
    if scheme == "poisson":
        rate = poisson_rate(systems_of(config), num_clients, cohort)
        return Accountant(
            noise_multiplier=dp["noise_multiplier"],
            sampling_rate=rate,
            delta=dp["delta"],
            accountant=dp["accountant"],
            sampling="poisson",
        )
    return Accountant(
        noise_multiplier=dp["noise_multiplier"],
        delta=dp["delta"],
        accountant=dp["accountant"],
        sampling="uniform",
        cohort_size=cohort,
        population=num_clients,
    )


def rounds_within_budget(config, accountant, num_rounds: int) -> int:
    """The last round to run: ``num_rounds``, or fewer where ``dp.target_epsilon`` would be
    exceeded by the next round (at least 1 round must fit, or it is refused)."""
    target = dp_group(config)["target_epsilon"]
    if accountant is None or target <= 0:
        return num_rounds
    fit = accountant.rounds_within(target, num_rounds)
    if fit < 1:
        raise ValueError(
            f"dp.target_epsilon={target} cannot be met: one round already spends epsilon "
            f"{accountant.epsilon(1):.4g} at delta {accountant.delta}. Raise "
            "dp.noise_multiplier or the target, or sample fewer clients per round."
        )
    return fit


def privacy_fields(accountant, r: int) -> dict[str, float]:
    """The fields an evaluation record of round ``r`` gets (none without noise)."""
    if accountant is None:
        return {}
    return {"epsilon": round(accountant.epsilon(r), 6), "delta": accountant.delta}

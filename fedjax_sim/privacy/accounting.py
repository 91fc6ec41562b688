"""Host-side privacy accounting for DP-FedAvg, built on Google's ``dp_accounting`` package.

Nothing here runs under ``jit``: the driver asks, between rounds, what (epsilon, delta) the
rounds so far have cost, or how much noise a target budget needs. Every number comes from
``dp_accounting`` (its RDP or PLD accountant); this module only builds the ``DpEvent`` that
describes one training run and checks the inputs.

The mechanism accounted for is the one of ``fedjax_sim.privacy`` (McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models"): each round a cohort of clients
is sampled, each client's update is clipped to L2 norm ``S``, and Gaussian noise of standard
deviation ``z * S`` is added to their sum (``z * S / n`` on a mean over a fixed ``n``). One
client is one record, so the guarantees are client-level. ``noise_multiplier`` is always that
``z``: the noise std over the clip norm.

Two samplings, with different neighbouring relations:

* ``"poisson"``: each client joins each round independently with probability ``q``
  (``PoissonSampledDpEvent``), under add-or-remove-one-client. The mean must then divide by
  the expected cohort size ``q * population``, not the realized one, or the realized cohort
  size leaks unaccounted information.
* ``"uniform"``: a cohort of exactly ``cohort_size`` of ``population`` clients, drawn without
  replacement (``SampledWithoutReplacementDpEvent``; Wang, Balle and Kasiviswanathan 2019,
  "Subsampled Renyi Differential Privacy and Analytical Moments Accountant"). Its analysis
  needs replace-one-client neighbours, under which the clipped sum moves by up to ``2 * S``;
  ``dp_accounting`` measures the noise against that sensitivity, so the event carries
  ``z / 2``. Only the RDP accountant supports it. Its epsilon (replace-one) is not comparable
  with a Poisson (add-or-remove) epsilon.

``dp_accounting`` is imported on first use, so ``import fedjax_sim`` does not pay for it
(about a second: it imports SciPy).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dp_accounting

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "uniform")
# dp_accounting's own default for PLDAccountant, passed explicitly so that the cached
# one-round PLD of ``Accountant`` and ``epsilon(accountant="pld")`` discretize alike.
PLD_DISCRETIZATION = 1e-4


def _dpa():
    try:
        import dp_accounting
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "privacy accounting needs the dp_accounting package: pip install dp-accounting"
        ) from err
    return dp_accounting


# Input checks. Each message names the argument, the value and what to do.


def check_noise_multiplier(noise_multiplier: float) -> float:
    """``noise_multiplier`` as a float, refused unless finite and >= 0."""
    z = float(noise_multiplier)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0 (the noise std over the clip "
            f"norm; 0 means no noise); got {noise_multiplier!r}"
        )
    return z


def _check_rounds(rounds: int, name: str = "rounds") -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 0; got {rounds!r}")
    if rounds < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {rounds}")
    return int(rounds)


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0 < d < 1:
        raise ValueError(
            f"delta must be in (0, 1), usually well below 1 / population (say 1e-5); got {delta!r}"
        )
    return d


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")
    return accountant


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def _sampling_params(
    sampling: str,
    sampling_rate: float | None,
    cohort_size: int | None,
    population: int | None,
) -> tuple[float, int | None, int | None]:
    """``(q, cohort_size, population)`` after checking that they describe one sampling."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; known: {', '.join(SAMPLINGS)}")
    if (cohort_size is None) != (population is None):
        raise ValueError(
            f"give cohort_size and population together (got cohort_size={cohort_size!r}, "
            f"population={population!r})"
        )
    if cohort_size is not None:
        cohort_size = _check_positive_int(cohort_size, "cohort_size")
        population = _check_positive_int(population, "population")
        if cohort_size > population:
            raise ValueError(
                f"cohort_size ({cohort_size}) must be at most population ({population})"
            )
    if sampling == "uniform" and cohort_size is None:
        raise ValueError(
            "sampling='uniform' (a fixed-size cohort without replacement) needs cohort_size "
            "and population; for a sampling rate alone use sampling='poisson'"
        )
    if sampling_rate is None:
        if cohort_size is None:
            raise ValueError(
                "give sampling_rate (each client's probability of joining a round), or "
                "cohort_size and population"
            )
        return cohort_size / population, cohort_size, population
    q = float(sampling_rate)
    if not 0 < q <= 1:
        raise ValueError(
            f"sampling_rate must be in (0, 1] (the fraction of clients in a round); "
            f"got {sampling_rate!r}"
        )
    if cohort_size is not None and not math.isclose(q, cohort_size / population, rel_tol=1e-9):
        raise ValueError(
            f"sampling_rate ({q}) disagrees with cohort_size / population "
            f"({cohort_size} / {population}); give one or the other"
        )
    return q, cohort_size, population


def _round_event(z: float, q: float, sampling: str, cohort_size, population):
    """One round's DpEvent (``z > 0``)."""
    dpa = _dpa()
    if sampling == "poisson":
        return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    # Replace-one sensitivity of the clipped sum is 2 S, and dp_accounting's noise multiplier
    # is std / sensitivity (its RDP at q = 1 is alpha / (2 sigma^2)).
    return dpa.SampledWithoutReplacementDpEvent(population, cohort_size, dpa.GaussianDpEvent(z / 2))


def _compose(round_event, z: float, rounds: int):
    dpa = _dpa()
    if rounds == 0:
        # dp_accounting rejects SelfComposedDpEvent(count=0); nothing released costs nothing.
        return dpa.NoOpDpEvent()
    if z == 0:
        # Without noise the release is not private at all (epsilon = inf in both accountants;
        # the RDP formulas for sampling without replacement would divide by zero).
        return dpa.NonPrivateDpEvent()
    return dpa.SelfComposedDpEvent(round_event, rounds)


def dp_event(
    *,
    noise_multiplier: float,
    sampling_rate: float | None = None,
    rounds: int,
    sampling: str = "poisson",
    cohort_size: int | None = None,
    population: int | None = None,
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``rounds`` rounds of DP-FedAvg (McMahan et al. 2018).

    Args:
      noise_multiplier: ``z``, the std of the noise on the sum of clipped updates over the
        clip norm; 0 means no noise (the event is ``NonPrivateDpEvent``, epsilon = inf).
      sampling_rate: ``q``, each client's probability of joining a round (``"poisson"``);
        may be omitted when ``cohort_size`` and ``population`` are given.
      rounds: the number of rounds (0 gives ``NoOpDpEvent``, epsilon = 0).
      sampling: ``"poisson"`` (``PoissonSampledDpEvent(q, GaussianDpEvent(z))``) or
        ``"uniform"``: exactly ``cohort_size`` of ``population`` clients without replacement
        (``SampledWithoutReplacementDpEvent(population, cohort_size, GaussianDpEvent(z / 2))``,
        replace-one neighbours; see the module docstring for the factor 2).
      cohort_size: clients per round (required for ``"uniform"``).
      population: the number of clients sampled from (required for ``"uniform"``).

    Returns:
      ``SelfComposedDpEvent(one_round, rounds)``, or ``NoOpDpEvent`` / ``NonPrivateDpEvent``
      in the edge cases above.
    """
    z = check_noise_multiplier(noise_multiplier)
    rounds = _check_rounds(rounds)
    q, cohort_size, population = _sampling_params(sampling, sampling_rate, cohort_size, population)
    round_event = _round_event(z, q, sampling, cohort_size, population) if z > 0 else None
    return _compose(round_event, z, rounds)


def _make_accountant(accountant: str, relation):
    dpa = _dpa()
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant(neighboring_relation=relation)
    return dpa.pld.PLDAccountant(
        neighboring_relation=relation, value_discretization_interval=PLD_DISCRETIZATION
    )


def _relation_for(accountant: str, event):
    """The neighbouring relation under which ``accountant`` can account for ``event``.

    Add-or-remove-one is tried first (Poisson sampling's); replace-one is what
    ``SampledWithoutReplacementDpEvent`` needs, and dp_accounting refuses it under any other.
    """
    dpa = _dpa()
    rel = dpa.NeighboringRelation
    for relation in (rel.ADD_OR_REMOVE_ONE, rel.REPLACE_ONE):
        if _make_accountant(accountant, relation).supports(event):
            return relation
    hint = (
        "; it has no analysis of fixed-size sampling without replacement: use accountant='rdp' "
        "for sampling='uniform' (or sampling='poisson' with pld)"
        if accountant == "pld"
        else "; see dp_accounting.rdp.RdpAccountant for the events it supports"
    )
    raise ValueError(f"dp_accounting's {accountant} accountant does not support {event!r}{hint}")


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of any ``DpEvent`` at ``delta``, from a fresh ``dp_accounting`` accountant.

    Args:
      event: what was released, e.g. from ``dp_event``.
      delta: the target delta, in (0, 1).
      accountant: ``"rdp"`` (Renyi DP; Mironov 2017, "Renyi Differential Privacy") or ``"pld"``
        (privacy loss distributions; tighter, slower for small noise).

    Returns:
      Epsilon (``inf`` for a non-private event, 0 for no event).
    """
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    acct = _make_accountant(accountant, _relation_for(accountant, event))
    acct.compose(event)
    return float(acct.get_epsilon(delta))


def _check_pld_sampling(accountant: str, sampling: str) -> None:
    if accountant == "pld" and sampling == "uniform":
        raise ValueError(
            "dp_accounting's PLD accountant does not support sampling='uniform' (fixed-size "
            "sampling without replacement); use accountant='rdp', or sampling='poisson'"
        )


def epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float | None = None,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "poisson",
    cohort_size: int | None = None,
    population: int | None = None,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of DP-FedAvg (McMahan et al. 2018).

    Args:
      noise_multiplier, sampling_rate, rounds, sampling, cohort_size, population: as in
        ``dp_event``.
      delta: the target delta, in (0, 1).
      accountant: ``"rdp"`` or ``"pld"`` (``"pld"`` supports only ``sampling="poisson"``).

    Returns:
      Epsilon, a float (``inf`` when ``noise_multiplier`` is 0 and ``rounds > 0``).
    """
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    _check_pld_sampling(accountant, sampling)
    event = dp_event(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        rounds=rounds,
        sampling=sampling,
        cohort_size=cohort_size,
        population=population,
    )
    return epsilon_of_event(event, delta, accountant)


def noise_multiplier_for_epsilon(
    *,
    target_epsilon: float,
    sampling_rate: float | None = None,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "poisson",
    cohort_size: int | None = None,
    population: int | None = None,
    tol: float = 1e-6,
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds cost at most ``target_epsilon``.

    A bracketing root search by ``dp_accounting.calibrate_dp_mechanism`` (Brent's method over
    ``noise_multiplier``, from the bracket [0, 1] grown upwards), which guarantees that the
    returned value meets the target.

    Args:
      target_epsilon: the budget, > 0.
      sampling_rate, rounds, sampling, cohort_size, population: as in ``dp_event``.
      delta: the target delta, in (0, 1).
      accountant: ``"rdp"`` or ``"pld"`` (``"pld"`` takes seconds to tens of seconds: each
        probe builds a privacy loss distribution, the larger the smaller the noise).
      tol: the absolute tolerance on the noise multiplier.

    Returns:
      ``z`` with ``epsilon(noise_multiplier=z, ...) <= target_epsilon``, within ``tol`` of the
      smallest such value (0.0 when ``rounds`` is 0).

    Raises:
      ValueError: bad inputs, or no noise multiplier up to about 2^30 meets the target.
    """
    _check_pld_sampling(_check_accountant(accountant), sampling)
    rounds = _check_rounds(rounds)
    q, cohort_size, population = _sampling_params(sampling, sampling_rate, cohort_size, population)

    def make_event(z):
        round_event = _round_event(z, q, sampling, cohort_size, population) if z > 0 else None
        return _compose(round_event, z, rounds)

    if rounds == 0:
        _check_calibration(target_epsilon, delta, accountant, tol)
        return 0.0
    return calibrate_noise_multiplier(
        make_event,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        tol=tol,
        what=f"over {rounds} rounds; raise the target or delta, or use fewer rounds",
    )


def _check_calibration(target_epsilon, delta, accountant, tol) -> tuple[float, float, str]:
    eps = float(target_epsilon)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0; got {target_epsilon!r}")
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0; got {tol!r}")
    return eps, delta, accountant


def calibrate_noise_multiplier(
    make_event, *, target_epsilon: float, delta: float, accountant: str, tol: float, what: str
) -> float:
    """The smallest ``z`` whose ``make_event(z)`` costs at most ``target_epsilon`` at
    ``delta``: ``dp_accounting.calibrate_dp_mechanism`` with the accountant (and neighbouring
    relation) that supports the event. Shared by DP-FedAvg's and DP-FTRL's inverses.

    Args:
      make_event: ``z -> DpEvent``.
      target_epsilon, delta, accountant, tol: as in ``noise_multiplier_for_epsilon``.
      what: the end of the error message when no ``z`` meets the target (say what to change).

    Raises:
      ValueError: bad inputs, or no noise multiplier up to about 2^30 meets the target.
    """
    dpa = _dpa()
    eps, delta, accountant = _check_calibration(target_epsilon, delta, accountant, tol)
    relation = _relation_for(accountant, make_event(1.0))
    try:
        z = dpa.calibrate_dp_mechanism(
            lambda: _make_accountant(accountant, relation), make_event, eps, delta, tol=tol
        )
    except dpa.mechanism_calibration.NoBracketIntervalFoundError as err:
        raise ValueError(
            f"no noise multiplier meets target_epsilon={eps} at delta={delta} {what}"
        ) from err
    return float(z)


def adaptive_clipping_noise(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Effective noise multiplier of DP-FedAvg with adaptive clipping.

    Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private Learning with
    Adaptive Clipping" (Theorem 1): each round releases the noised sum of clipped updates
    (noise multiplier ``z_delta``) and the noised count of clients whose update was within
    the clip norm, with each client's bit centred to ``b_i - 1/2`` so that the count has
    sensitivity 1/2; noise of std ``sigma_b`` on it is a Gaussian mechanism with noise
    multiplier ``2 sigma_b``. Two Gaussian mechanisms on the same data compose to one with
    ``z^-2 = z_delta^-2 + (2 sigma_b)^-2`` (their RDP ``alpha / (2 z^2)`` adds), and that ``z``
    is what the accountant should be given. Same as TFF's
    ``DifferentiallyPrivateFactory.gaussian_adaptive``.

    Args:
      noise_multiplier: ``z_delta``, the noise multiplier of the update sum (>= 0).
      clipped_count_stddev: ``sigma_b``, the std of the noise on the sum of the centred bits,
        in clients (>= 0; Andrew et al. suggest ``expected_clients_per_round / 20``).

    Returns:
      ``z``; 0.0 when either noise is 0 (that release alone is not private).
    """
    z_delta = check_noise_multiplier(noise_multiplier)
    sigma_b = _check_count_stddev(clipped_count_stddev)
    if z_delta == 0 or sigma_b == 0:
        return 0.0
    return (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5


def split_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The update's noise multiplier ``z_delta`` that, with the count noise, gives ``z``.

    The inverse of ``adaptive_clipping_noise`` (Andrew et al. 2021, Theorem 1):
    ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``. The count uses part of the budget, so the
    update needs more noise than ``z``.

    Args:
      noise_multiplier: ``z``, the effective noise multiplier to account for (>= 0).
      clipped_count_stddev: ``sigma_b``, the std of the noise on the clipped count (in clients).

    Returns:
      ``z_delta`` (0.0 when ``z`` is 0: no privacy asked for).

    Raises:
      ValueError: ``2 * sigma_b <= z``, so the count alone spends the whole budget.
    """
    z = check_noise_multiplier(noise_multiplier)
    sigma_b = _check_count_stddev(clipped_count_stddev)
    if z == 0:
        return 0.0
    if 2 * sigma_b <= z:
        raise ValueError(
            f"clipped_count_stddev={sigma_b} leaves no privacy budget for the update: adaptive "
            f"clipping needs 2 * clipped_count_stddev > noise_multiplier ({z}). Increase "
            f"clipped_count_stddev (Andrew et al. suggest expected_clients_per_round / 20) "
            f"or lower noise_multiplier"
        )
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def _check_count_stddev(clipped_count_stddev: float) -> float:
    s = float(clipped_count_stddev)
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(
            f"clipped_count_stddev must be a finite number >= 0; got {clipped_count_stddev!r}"
        )
    return s


class Accountant:
    """The privacy spent by a run with fixed noise and sampling, as the driver needs it.

    ``epsilon(rounds)`` is cheap enough to call at every evaluation: the one-round privacy
    object is built once and composed ``rounds`` times on demand (RDP curves add; a privacy
    loss distribution self-composes by FFT), and results are cached. Its values equal
    ``epsilon(...)``'s for the same arguments (exactly for RDP, to about 1e-12 for PLD).

    Args:
      noise_multiplier, sampling_rate, sampling, cohort_size, population: as in ``dp_event``.
      delta: the target delta, in (0, 1).
      accountant: ``"rdp"`` or ``"pld"``.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float | None = None,
        delta: float,
        accountant: str = "rdp",
        sampling: str = "poisson",
        cohort_size: int | None = None,
        population: int | None = None,
    ):
        dpa = _dpa()
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.delta = _check_delta(delta)
        self.accountant = _check_accountant(accountant)
        _check_pld_sampling(accountant, sampling)
        q, cohort_size, population = _sampling_params(
            sampling, sampling_rate, cohort_size, population
        )
        self.sampling_rate, self.sampling = q, sampling
        self.cohort_size, self.population = cohort_size, population
        self._cache: dict[int, float] = {0: 0.0}
        self._round = None
        if self.noise_multiplier == 0:
            return
        round_event = _round_event(self.noise_multiplier, q, sampling, cohort_size, population)
        if accountant == "rdp":
            # RDP composes by adding curves: r rounds cost r times one round, order by order,
            # which is what RdpAccountant.compose(SelfComposedDpEvent(e, r)) computes.
            acct = _make_accountant("rdp", _relation_for("rdp", round_event))
            acct.compose(round_event)
            self._round = (acct.orders, acct.rdp)
        else:
            # The one-round PLD dominates the cost (~0.4 s); PLDAccountant builds the same one
            # for PoissonSampledDpEvent(GaussianDpEvent) before self-composing it.
            self._round = dpa.pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=self.noise_multiplier,
                sampling_prob=q,
                value_discretization_interval=PLD_DISCRETIZATION,
                neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
            )

    def dp_event(self, rounds: int) -> dp_accounting.DpEvent:
        """The ``DpEvent`` of ``rounds`` rounds of this run."""
        return dp_event(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sampling_rate,
            rounds=rounds,
            sampling=self.sampling,
            cohort_size=self.cohort_size,
            population=self.population,
        )

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``self.delta`` after ``rounds`` rounds."""
        rounds = _check_rounds(rounds)
        if rounds not in self._cache:
            self._cache[rounds] = self._epsilon(rounds)
        return self._cache[rounds]

    def _epsilon(self, rounds: int) -> float:
        if self._round is None:
            return math.inf
        dpa = _dpa()
        if self.accountant == "rdp":
            orders, rdp = self._round
            return float(dpa.rdp.compute_epsilon(orders, rounds * rdp, self.delta)[0])
        return float(self._round.self_compose(rounds).get_epsilon_for_delta(self.delta))

    def rounds_within(self, target_epsilon: float, max_rounds: int) -> int:
        """The most rounds, at most ``max_rounds``, whose epsilon is at most ``target_epsilon``.

        A binary search (epsilon grows with the rounds), so a run can stop before it exceeds
        its budget. ``O(log max_rounds)`` evaluations of ``epsilon``.

        Args:
          target_epsilon: the budget, >= 0.
          max_rounds: the most rounds the run would train.

        Returns:
          An integer in ``[0, max_rounds]`` (0 rounds always cost nothing).
        """
        target = float(target_epsilon)
        if not target >= 0:
            raise ValueError(f"target_epsilon must be >= 0; got {target_epsilon!r}")
        max_rounds = _check_rounds(max_rounds, "max_rounds")
        if self.epsilon(max_rounds) <= target:
            return max_rounds
        lo, hi = 0, max_rounds  # epsilon(lo) <= target < epsilon(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(mid) <= target:
                lo = mid
            else:
                hi = mid
        return lo

    def __repr__(self) -> str:
        return (
            f"Accountant(noise_multiplier={self.noise_multiplier}, "
            f"sampling_rate={self.sampling_rate}, delta={self.delta}, "
            f"accountant={self.accountant!r}, sampling={self.sampling!r}, "
            f"cohort_size={self.cohort_size}, population={self.population})"
        )

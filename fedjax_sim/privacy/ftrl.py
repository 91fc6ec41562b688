"""DP-FTRL: correlated noise by matrix factorization, as an aggregation transform.

DP-FedAvg adds independent noise every round. DP-FTRL (Kairouz, McMahan, Song, Thakkar,
Thakurta and Xu 2021, "Practical and Private (Deep) Learning without Sampling or Shuffling")
adds noise that is correlated across rounds so that the noise in the *prefix sums* of the
aggregates, which is what a server taking SGD steps accumulates in its model, stays small.
The matrix factorization (MF) view (Denisov, McMahan, Rush, Smith and Thakurta 2022,
"Improved Differential Privacy for SGD via Optimal Private Linear Operators on Adaptive
Streams"): write the prefix-sum workload ``A = B C`` with a lower-triangular strategy ``C``;
the mechanism releases ``C x + z S Z`` (``x`` the ``T`` rounds' sums of clipped updates,
``Z`` standard Gaussian), i.e. round ``t`` adds the ``t``-th row of ``z S C^{-1} Z`` to its
sum. It is a single Gaussian mechanism whose L2 sensitivity is ``S * sens(C)``, where
``sens(C)`` is the largest norm of ``C u`` over the participation patterns ``u`` a client may
have; Denisov et al. show that this holds even though each round's updates depend on the
noisy past (adaptive streams). ``C = I`` is DP-FedAvg's independent noise.

Everything about the strategy comes from Google's ``jax_privacy`` (2.x, module
``jax_privacy.matrix_factorization``): the strategies' optimisation, their streaming
``C^{-1}`` (a ``StreamingMatrix`` whose ``multiply_next`` produces one round's row from a
fixed-shape state) and their sensitivities. Strategies (``STRATEGIES``):

* ``"blt"``: a buffered linear Toeplitz (BLT) ``C`` optimised for ``num_rounds`` and the
  participation pattern by ``buffered_toeplitz.optimize`` (Dvijotham, McMahan, Pillutla,
  Steinke and Thakurta 2024, "Efficient and Near-Optimal Noise Generation for Streaming
  Differential Privacy"; McMahan, Xu and Zhang 2024, "A Hassle-free Algorithm for Private
  Learning in Practice: Don't Use Tree Aggregation, Use BLTs"). The state is ``buffers``
  copies of the model. The optimisation compiles for ~10-40 s on a CPU; it is cached per
  process.
* ``"blt_rational"``: the BLT of a rational approximation of ``1 / sqrt(1 - x)``
  (``BufferedToeplitz.from_rational_approx_to_sqrt_x``; Dvijotham et al. 2024, Prop. 4.5,
  "RA-BLT"), closed form: no optimisation, slightly worse than ``"blt"``.
* ``"banded"``: a column-normalised ``bands``-banded Toeplitz ``C`` optimised for the mean
  squared error of the prefix sums by ``toeplitz.optimize_banded_toeplitz`` (Choquette-Choo,
  Ganesh, McKenna, McMahan, Rush, Thakurta and Xu 2023, "(Amplified) Banded Matrix
  Factorization: A unified approach to private training"; McKenna 2024, "Scaling up the
  Banded Matrix Factorization Mechanism for Differentially Private ML"). The state is
  ``bands - 1`` copies of the model; ``bands=1`` is independent noise.
* ``"identity"``: ``C = I``, independent noise (DP-FedAvg), with no state.

Participation (what the accounting assumes, and what the driver must enforce): every client
contributes to at most ``participations`` rounds of the ``num_rounds``, any two of them at
least ``min_separation`` rounds apart (the (k, b)-min-separation participation of
Choquette-Choo et al. 2023). ``participations=1`` (each client in at most one round) is
Kairouz et al.'s single-pass setting; cycling the population through ``b`` fixed groups gives
``min_separation = b`` and ``participations = ceil(num_rounds / b)``. No amplification by
sampling or shuffling is claimed: the cohorts may be chosen in any (data-independent) way.
Neighbouring datasets add or remove one client (all its contributions), with the aggregate's
denominator fixed: pass ``expected_clients`` (or use a fixed cohort size), as for
``gaussian_noise``. Rounds past ``num_rounds`` lie outside the factorization: they still get
noise (for ``"banded"`` at a smaller scale), but ``ftrl_epsilon`` does not cover them, so set
``num_rounds`` to the run's rounds.

Tree aggregation (Kairouz et al.'s original DP-FTRL) is not in ``jax_privacy`` 2.0; BLTs have
lower error at similar memory (McMahan et al. 2024). ``jax_privacy`` is imported on first
use, so importing this module does not need it: ``pip install jax-privacy``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators.transforms import AggregationTransform
from fedjax_sim.core.keys import FTRL_SALT
from fedjax_sim.core.types import Params, PRNGKey, PyTree
from fedjax_sim.privacy import CLIP_NORM, NOISE_MULTIPLIER
from fedjax_sim.privacy.accounting import check_noise_multiplier

if TYPE_CHECKING:
    from jax_privacy.matrix_factorization import StreamingMatrix

# Folded into the round key for the Gaussian draws Z_t (after core.keys' salts and
# aggregators.adversary's 2**31 - 6 and 2**31 - 7), so they are independent of
# gaussian_noise's (NOISE_SALT) and of every client's key.

STRATEGIES = ("banded", "blt", "blt_rational", "identity")
BLT_STRATEGIES = ("blt", "blt_rational")
# Buffers of the RA-BLT when none are given: its error barely improves past 3-4 buffers
# (measured at 64 rounds: 0.155, 0.151, 0.151, 0.152 of independent noise for 2-5).
DEFAULT_RATIONAL_BUFFERS = 4
# jax_privacy refuses to optimise BLTs with more buffers (numerically unstable).
MAX_BLT_BUFFERS = 15


def _mf():
    try:
        from jax_privacy import matrix_factorization
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "correlated noise (DP-FTRL) needs the jax_privacy package: pip install jax-privacy"
        ) from err
    return matrix_factorization


@contextlib.contextmanager
def _host_numerics():
    """jax_privacy's host-side code (optimisation, sensitivities) relies on standard dtype
    promotion (it mixes int32 and int64) and on float64, while the simulator may run with
    strict promotion and without x64: those calls run inside this context."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        yield


@dataclasses.dataclass(frozen=True, eq=False)
class FtrlStrategy:
    """A factorization ``A = B C`` of the prefix sums over ``num_rounds`` rounds.

    Attributes:
      name: one of ``STRATEGIES``.
      num_rounds: ``T``, the rounds ``C`` is built (and accounted) for.
      participations: ``k``, the most rounds a client contributes to (capped at
        ``ceil(T / min_separation)``, which is all the separation allows).
      min_separation: ``b``, the fewest rounds between two contributions of a client
        (``T`` when ``k`` is 1: then it plays no part).
      sensitivity: ``sens(C)``, the largest ``||C u||_2`` over the participation patterns
        ``u`` (0/1 vectors with at most ``k`` ones ``b`` apart), per unit clip norm; computed
        by ``jax_privacy`` in float64 from the float32 parameters the rounds use.
      noising_matrix: ``C^{-1}`` as a ``jax_privacy`` ``StreamingMatrix`` in float32:
        ``multiply_next(z_t, state)`` returns row ``t`` of ``C^{-1} Z`` and a state of fixed
        structure.
      params: the strategy's parameters, for logs (``{"coefs": ...}`` for a banded Toeplitz
        ``C``, ``{"buf_decay": ..., "output_scale": ...}`` for a BLT).
    """

    name: str
    num_rounds: int
    participations: int
    min_separation: int
    sensitivity: float
    noising_matrix: StreamingMatrix
    params: dict[str, tuple[float, ...]]
    _materialize: Callable[[], np.ndarray] = dataclasses.field(repr=False)

    def strategy_matrix(self) -> np.ndarray:
        """``C`` as a ``[T, T]`` float64 array (``T^2`` memory: for checks, not the rounds)."""
        return self._materialize()

    def effective_noise_multiplier(self, noise_multiplier: float) -> float:
        """The noise multiplier of the equivalent single Gaussian mechanism, ``z / sens(C)``."""
        return float(noise_multiplier) / self.sensitivity


# Input checks: each message names the argument, the value and what to do.


def _check_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def _check_strategy_args(
    num_rounds, strategy, bands, buffers, participations, min_separation
) -> tuple[int, str, int | None, int | None, int, int]:
    """The checked arguments, with ``participations`` capped and ``min_separation`` set."""
    num_rounds = _check_int(num_rounds, "num_rounds")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if strategy == "banded":
        if bands is None:
            raise ValueError("strategy='banded' needs bands (an integer >= 1; 1 is DP-FedAvg)")
        bands = _check_int(bands, "bands")
        if bands > num_rounds:
            raise ValueError(f"bands ({bands}) must be at most num_rounds ({num_rounds})")
    elif bands is not None:
        raise ValueError(f"bands applies to strategy='banded' only; got bands={bands!r}")
    if strategy in BLT_STRATEGIES:
        if buffers is not None:
            buffers = _check_int(buffers, "buffers")
            if buffers > MAX_BLT_BUFFERS:
                raise ValueError(
                    f"buffers must be at most {MAX_BLT_BUFFERS} (jax_privacy: more are "
                    f"numerically unstable; 3 to 7 is typical); got {buffers}"
                )
    elif buffers is not None:
        raise ValueError(
            f"buffers applies to strategy in {BLT_STRATEGIES} only; got buffers={buffers!r}"
        )
    participations = _check_int(participations, "participations")
    if min_separation is not None:
        min_separation = _check_int(min_separation, "min_separation")
    if participations == 1:
        min_separation = num_rounds  # one contribution: no second one to separate
    elif min_separation is None:
        raise ValueError(
            f"participations={participations} needs min_separation, the fewest rounds between "
            f"two contributions of a client"
        )
    # More participations than the separation allows cannot happen; jax_privacy caps alike.
    participations = min(participations, -(-num_rounds // min_separation))
    if strategy == "banded" and participations > 1 and min_separation < bands:
        raise ValueError(
            f"banded MF with repeated participation needs min_separation >= bands "
            f"(Choquette-Choo et al. 2023): got bands={bands}, min_separation="
            f"{min_separation}; use at most {min_separation} bands"
        )
    return num_rounds, strategy, bands, buffers, participations, min_separation


def ftrl_strategy(
    *,
    num_rounds: int,
    strategy: str = "blt",
    bands: int | None = None,
    buffers: int | None = None,
    participations: int = 1,
    min_separation: int | None = None,
) -> FtrlStrategy:
    """The factorization a DP-FTRL run uses, built by ``jax_privacy`` (cached per process).

    Args:
      num_rounds: ``T`` (>= 1), the rounds the strategy is built and accounted for.
      strategy: one of ``STRATEGIES`` (see the module docstring).
      bands: for ``"banded"`` (required), the bands of ``C``, in ``[1, num_rounds]``.
      buffers: for ``"blt"``, the most buffers the optimiser may use (it adds buffers while
        the loss improves by over 1%; ``None``: up to 10); for ``"blt_rational"``, the
        buffers (``None``: ``DEFAULT_RATIONAL_BUFFERS``).
      participations: ``k`` (>= 1), the most rounds a client contributes to.
      min_separation: ``b``, the fewest rounds between two contributions (needed when
        ``k > 1``; for ``"banded"`` at least ``bands``).

    Returns:
      An ``FtrlStrategy``.

    Raises:
      ValueError: bad or inconsistent arguments.
    """
    args = _check_strategy_args(
        num_rounds, strategy, bands, buffers, participations, min_separation
    )
    return _build_strategy(*args)


@functools.lru_cache(maxsize=32)
def _build_strategy(
    num_rounds: int,
    strategy: str,
    bands: int | None,
    buffers: int | None,
    participations: int,
    min_separation: int,
) -> FtrlStrategy:
    mf = _mf()
    n, k, b = num_rounds, participations, min_separation
    if strategy in ("identity", "banded"):
        coefs = _banded_coefs(n, 1 if strategy == "identity" else bands)
        coefs64 = coefs.astype(np.float64)

        def materialize():
            with _host_numerics():
                c = mf.banded.ColumnNormalizedBanded.from_banded_toeplitz(n, jnp.asarray(coefs64))
                return np.asarray(c.materialize(), np.float64)

        with _host_numerics():
            # Column normalisation makes every column unit norm and, with b >= bands, the
            # columns a client touches orthogonal: sens^2 = k (Choquette-Choo et al. 2023).
            c = mf.banded.ColumnNormalizedBanded.from_banded_toeplitz(n, jnp.asarray(coefs64))
            sens2 = mf.banded.minsep_sensitivity_squared(c, min_sep=b, max_participations=k, n=n)
        with jax.numpy_dtype_promotion("standard"):
            if strategy == "identity":
                noising = mf.streaming_matrix.identity()
            else:
                noising = mf.toeplitz.inverse_as_streaming_matrix(
                    jnp.asarray(coefs), column_normalize_for_n=n
                )
        params = {"coefs": tuple(float(c) for c in coefs)}
    else:
        with _host_numerics():
            if strategy == "blt":
                if k == 1:
                    blt = mf.buffered_toeplitz.optimize(n=n, **_max_buffers(buffers))
                else:
                    blt = mf.buffered_toeplitz.optimize(
                        n=n, min_sep=b, max_participations=k, **_max_buffers(buffers)
                    )
            else:
                blt = mf.buffered_toeplitz.BufferedToeplitz.from_rational_approx_to_sqrt_x(
                    DEFAULT_RATIONAL_BUFFERS if buffers is None else buffers
                )
        # The rounds run the BLT in float32; account for exactly that C (a buf_decay of
        # 0.99999999 rounds to 1.0, which raises the sensitivity slightly).
        buf_decay = np.asarray(blt.buf_decay, np.float32)
        output_scale = np.asarray(blt.output_scale, np.float32)
        with _host_numerics():
            blt64 = mf.buffered_toeplitz.BufferedToeplitz.build(
                buf_decay.astype(np.float64), output_scale.astype(np.float64)
            )
            sens2 = _blt_sensitivity_squared(mf, blt64, n, k, b)

        def materialize():
            with _host_numerics():
                return np.asarray(blt64.materialize(n), np.float64)

        with jax.numpy_dtype_promotion("standard"):
            blt32 = mf.buffered_toeplitz.BufferedToeplitz.build(
                buf_decay, output_scale, dtype=jnp.float32
            )
            noising = blt32.inverse_as_streaming_matrix()
        params = {
            "buf_decay": tuple(float(v) for v in buf_decay),
            "output_scale": tuple(float(v) for v in output_scale),
        }
    return FtrlStrategy(
        name=strategy,
        num_rounds=n,
        participations=k,
        min_separation=b,
        sensitivity=math.sqrt(float(sens2)),
        noising_matrix=noising,
        params=params,
        _materialize=materialize,
    )


@functools.lru_cache(maxsize=32)
def _banded_coefs(n: int, bands: int) -> np.ndarray:
    """Unit-norm float32 Toeplitz coefficients; the optimum does not depend on the
    participation (column normalisation makes the sensitivity sqrt(k) for any of them)."""
    if bands == 1:
        return np.ones(1, np.float32)
    with _host_numerics():
        coefs = np.asarray(_mf().toeplitz.optimize_banded_toeplitz(n, bands), np.float32)
    coefs = coefs / np.linalg.norm(coefs)  # jax_privacy's column normalisation needs unit norm
    coefs.flags.writeable = False  # shared by the cache
    return coefs


def _max_buffers(buffers: int | None) -> dict[str, int]:
    return {} if buffers is None else {"max_buffers": buffers}


def _blt_sensitivity_squared(mf, blt64, n: int, k: int, b: int) -> float:
    if k == 1:
        # Closed form of the largest column norm (Dvijotham et al. 2024, Lemma 5.3).
        return float(mf.buffered_toeplitz.sensitivity_squared(blt64, n))
    coefs = blt64.toeplitz_coefs(n)
    try:
        # For non-negative, non-increasing Toeplitz coefficients the worst pattern is k
        # contributions exactly b apart from round 0 (Kalinin and Lampert 2024,
        # arXiv:2405.13763, Theorem 2).
        return float(
            mf.toeplitz.minsep_sensitivity_squared(coefs, min_sep=b, max_participations=k, n=n)
        )
    except ValueError:
        # Otherwise a valid upper bound from the Gram matrix (Choquette-Choo et al. 2023,
        # Algorithm 4); O(T^3), which only odd BLTs reach.
        c = blt64.materialize(n)
        return mf.sensitivity.get_min_sep_sensitivity_upper_bound(c, b, k) ** 2


class CorrelatedNoiseState(NamedTuple):
    """``noise_state``: the ``StreamingMatrix`` state of ``C^{-1}`` (per parameter leaf: a
    round index and ``bands - 1`` buffers for ``"banded"``, ``buffers`` buffers for a BLT,
    nothing for ``"identity"``), all float32 buffers shaped like the model."""

    noise_state: PyTree


def standard_normal_like(tree: PyTree, key: PRNGKey) -> PyTree:
    """Independent float32 N(0, 1) draws shaped like ``tree``'s leaves, one split key per
    leaf (the draws ``add_gaussian_noise(zeros, 1.0, key)`` would add)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    draws = [jax.random.normal(k, a.shape, jnp.float32) for a, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, draws)


def _strong(tree: PyTree) -> PyTree:
    # jax_privacy starts round indices as weakly typed scalars; a checkpoint restores them
    # strongly typed, which would retrace the round. Strong from the start: one trace.
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), tree)


def correlated_noise(
    *,
    num_rounds: int,
    strategy: str = "blt",
    bands: int | None = None,
    buffers: int | None = None,
    participations: int = 1,
    min_separation: int | None = None,
    clip_norm_name: str = CLIP_NORM,
    multiplier_name: str = NOISE_MULTIPLIER,
    expected_clients: float | None = None,
) -> AggregationTransform:
    """DP-FTRL's correlated noise on the aggregate (Kairouz et al. 2021; Denisov et al. 2022).

    Round ``t`` (counted by the state) adds ``(z S / n) (C^{-1} Z)_t`` to the aggregate, the
    mean of ``n`` clients' updates clipped to ``S`` (chain after ``clip_updates``), where
    ``Z_t`` are fresh N(0, 1) draws from ``fold_in(round_key, FTRL_SALT)`` and ``C^{-1}`` is
    ``jax_privacy``'s streaming inverse of the strategy. ``z`` and ``S`` are read from the
    round's hyperparameters (sweepable); the state's structure, shapes and dtypes never
    change, so the transform runs under ``jit`` and ``lax.scan`` and checkpoints as is.
    Privacy: ``ftrl_epsilon`` with the same strategy arguments.

    Args:
      num_rounds, strategy, bands, buffers, participations, min_separation: as in
        ``ftrl_strategy``.
      clip_norm_name: the hyperparameter holding ``S``.
      multiplier_name: the hyperparameter holding ``z``.
      expected_clients: ``n`` when fixed (Poisson sampling with ``fixed_denominator``, or
        cohorts of known size); ``None``: the round's real clients.

    Returns:
      An ``AggregationTransform`` with a server stage and a ``CorrelatedNoiseState``.

    Raises:
      ValueError: bad arguments (see ``ftrl_strategy``), or ``expected_clients <= 0``.
    """
    if expected_clients is not None and not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients!r}")
    noising = ftrl_strategy(
        num_rounds=num_rounds,
        strategy=strategy,
        bands=bands,
        buffers=buffers,
        participations=participations,
        min_separation=min_separation,
    ).noising_matrix

    def init(params: Params) -> CorrelatedNoiseState:
        # float32 buffers whatever the parameters' dtype: the noise recursions run for
        # thousands of rounds, and bfloat16 buffers would lose the correlations.
        shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.float32), params)
        return CorrelatedNoiseState(_strong(noising.init_multiply(shapes)))

    def server(aggregate, state, ctx):
        n = ctx.num_clients if expected_clients is None else expected_clients
        std = ctx.hparams[multiplier_name] * ctx.hparams[clip_norm_name] / n
        draws = standard_normal_like(aggregate, jax.random.fold_in(ctx.key, FTRL_SALT))
        noise, noise_state = noising.multiply_next(draws, state.noise_state)
        noisy = jax.tree.map(lambda a, e: a + (std * e).astype(a.dtype), aggregate, noise)
        return noisy, CorrelatedNoiseState(noise_state)

    return AggregationTransform(init=init, server=server)


def _gaussian_event(noise_multiplier: float) -> Any:
    import dp_accounting

    return dp_accounting.GaussianDpEvent(noise_multiplier)


def ftrl_epsilon(
    *,
    noise_multiplier: float,
    num_rounds: int,
    delta: float,
    strategy: str = "blt",
    bands: int | None = None,
    buffers: int | None = None,
    participations: int = 1,
    min_separation: int | None = None,
    accountant: str = "rdp",
) -> float:
    """Epsilon at ``delta`` of ``num_rounds`` rounds of ``correlated_noise``.

    The whole run is one Gaussian mechanism ``C x + z S Z`` with L2 sensitivity
    ``S * sens(C)`` under the participation pattern (each client in at most
    ``participations`` rounds, ``min_separation`` apart; see the module docstring), so its
    epsilon is that of ``GaussianDpEvent(z / sens(C))`` from ``dp_accounting`` (as
    ``jax_privacy.accounting.SingleReleaseTrainingAccountant`` does; Choquette-Choo et al.
    2023, "Multi-Epoch Matrix Factorization Mechanisms for Private Machine Learning"). With
    ``C = I`` and ``k`` participations that is ``k`` composed Gaussian mechanisms with noise
    multiplier ``z``: DP-FedAvg without sampling.

    Args:
      noise_multiplier: ``z`` (>= 0), the noise std over the clip norm.
      num_rounds, strategy, bands, buffers, participations, min_separation: as in
        ``ftrl_strategy``.
      delta: the target delta, in (0, 1).
      accountant: ``"rdp"`` or ``"pld"`` (``privacy.accounting.epsilon_of_event``).

    Returns:
      Epsilon, a float (``inf`` when ``noise_multiplier`` is 0).
    """
    from fedjax_sim.privacy.accounting import epsilon_of_event

    z = check_noise_multiplier(noise_multiplier)
    s = ftrl_strategy(
        num_rounds=num_rounds,
        strategy=strategy,
        bands=bands,
        buffers=buffers,
        participations=participations,
        min_separation=min_separation,
    )
    if z == 0:
        return math.inf
    return epsilon_of_event(_gaussian_event(s.effective_noise_multiplier(z)), delta, accountant)


def ftrl_noise_multiplier(
    *,
    target_epsilon: float,
    num_rounds: int,
    delta: float,
    strategy: str = "blt",
    bands: int | None = None,
    buffers: int | None = None,
    participations: int = 1,
    min_separation: int | None = None,
    accountant: str = "rdp",
    tol: float = 1e-6,
) -> float:
    """The noise multiplier ``z`` whose run costs ``target_epsilon`` (the inverse of
    ``ftrl_epsilon``): ``sens(C)`` times the smallest Gaussian noise multiplier meeting the
    target, found by ``dp_accounting.calibrate_dp_mechanism``.

    Args:
      target_epsilon: the budget, finite and > 0.
      num_rounds, strategy, bands, buffers, participations, min_separation: as in
        ``ftrl_strategy``.
      delta: the target delta, in (0, 1).
      accountant: ``"rdp"`` or ``"pld"``.
      tol: the absolute tolerance on the Gaussian noise multiplier ``z / sens(C)``.

    Returns:
      ``z`` (> 0).
    """
    from fedjax_sim.privacy import accounting

    accounting._check_calibration(target_epsilon, delta, accountant, tol)  # before the strategy
    s = ftrl_strategy(
        num_rounds=num_rounds,
        strategy=strategy,
        bands=bands,
        buffers=buffers,
        participations=participations,
        min_separation=min_separation,
    )
    z = accounting.calibrate_noise_multiplier(
        _gaussian_event,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        tol=tol,
        what="for this strategy; raise the target or delta",
    )
    return z * s.sensitivity

"""DP-FTRL's correlated noise (privacy.ftrl): the streamed noise is C^{-1} Z for the library's
C, the identity strategy is DP-FedAvg's independent noise, the state has a fixed structure
under jit and scan, correlated noise beats independent noise on the prefix sums at the same
epsilon, and the accounting is one Gaussian mechanism with C's sensitivity."""

import functools

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.aggregators.transforms import ServerContext, chain
from fedjax_sim.privacy import accounting, add_gaussian_noise, clip_updates, ftrl, gaussian_noise

pytest.importorskip("jax_privacy")

DELTA = 1e-5
HP = {"dp.clip_norm": jnp.float32(0.5), "dp.noise_multiplier": jnp.float32(1.3)}
CLIENTS = 4.0
STD = 1.3 * 0.5 / 4.0  # z * S / n
ROOT = jax.random.key(7)
# One number of rounds for most tests, so that each strategy is optimized once (it is cached).
T = 32


def _ctx(round_num, hparams=HP, num_clients=CLIENTS):
    return ServerContext(
        key=jax.random.fold_in(ROOT, round_num),
        hparams=hparams,
        client_ids=jnp.arange(4),
        weights=jnp.ones(4),
        num_clients=jnp.float32(num_clients),
    )


def _run(transform, aggregate, num_rounds, hparams=HP):
    """``num_rounds`` rounds (from 1) of the server stage in one jitted scan; the outputs are
    stacked on a leading round axis."""

    @jax.jit
    def run(state):
        def body(state, r):
            out, state = transform.server(aggregate, state, _ctx(r, hparams))
            return state, out

        return jax.lax.scan(body, state, jnp.arange(1, num_rounds + 1))

    return run(transform.init(aggregate))


def _draws(aggregate, num_rounds):
    """The N(0, 1) draws Z_t of rounds 1..T, made independently of ftrl (by
    ``add_gaussian_noise`` on zeros with the same key), stacked as ``[T, ...]`` per leaf."""
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aggregate)
    keys = [jax.random.fold_in(_ctx(r).key, ftrl.FTRL_SALT) for r in range(1, num_rounds + 1)]
    rounds = [add_gaussian_noise(zeros, 1.0, k) for k in keys]
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x, np.float64) for x in xs]), *rounds)


# The identity (and bands=1) strategies are checked against plain Gaussian noise below. The
# participation changes the noise of neither (only their sensitivity, tested below); it does
# change the optimized BLT's (test_blt_strategy_passes_the_participation_...).
STRATEGIES = [dict(strategy="banded", bands=4), dict(strategy="blt_rational")]


@pytest.mark.parametrize("kwargs", STRATEGIES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_streamed_noise_is_inverse_strategy_times_the_draws(kwargs):
    aggregate = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(3)}
    transform = ftrl.correlated_noise(num_rounds=T, **kwargs)
    final, noise = _run(transform, aggregate, T)
    # The state has the same structure, shapes, dtypes and weak types after T rounds, so it
    # scans, donates and checkpoints as is.
    assert jax.eval_shape(transform.init, aggregate) == jax.eval_shape(lambda s: s, final)
    strategy = ftrl.ftrl_strategy(num_rounds=T, **kwargs)
    c = strategy.strategy_matrix()
    # The matrix jax_privacy materializes is the strategy described by its parameters.
    if "buf_decay" in strategy.params:
        # A BLT: Toeplitz with c_0 = 1, c_j = sum_i output_scale_i * buf_decay_i^(j-1).
        d, w = (np.array(strategy.params[k], np.float64) for k in ("buf_decay", "output_scale"))
        first = np.r_[1.0, [np.sum(w * d ** (j - 1)) for j in range(1, T)]]
        np.testing.assert_allclose(c[:, 0], first, rtol=1e-12)
    else:
        bands = len(strategy.params["coefs"])
        np.testing.assert_array_equal(np.tril(c, -bands), 0)  # banded...
        np.testing.assert_allclose(np.linalg.norm(c, axis=0), 1, rtol=1e-12)  # ...unit columns
    for name, z in _draws(aggregate, T).items():
        # Round t's noise is row t of (z S / n) C^{-1} Z: the solve of C e = Z in float64.
        expected = STD * np.linalg.solve(c, z.reshape(T, -1))
        got = np.asarray(noise[name], np.float64).reshape(T, -1)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kwargs", [dict(strategy="identity"), dict(strategy="banded", bands=1)])
def test_identity_strategy_is_independent_noise_of_std_z_s_over_n(kwargs):
    t, d = 4, 20_000
    aggregate = {"w": jnp.full((d,), 0.25)}
    _, out = _run(ftrl.correlated_noise(num_rounds=T, **kwargs), aggregate, t)
    noise = np.asarray(out["w"]) - 0.25
    # Exactly gaussian_noise's formula, N(0, (z S / n)^2) from the round's FTRL_SALT key (to
    # 1 float32 ulp of 0.25 + noise: XLA may fuse the multiply-add).
    for r in range(1, t + 1):
        ref = add_gaussian_noise(aggregate, STD, jax.random.fold_in(_ctx(r).key, ftrl.FTRL_SALT))
        np.testing.assert_allclose(out["w"][r - 1], ref["w"], rtol=0, atol=1.2e-7)
    # Measured: std z S / n (2% is ~4 standard errors at 20k draws), uncorrelated rounds.
    np.testing.assert_allclose(noise.std(axis=1), STD, rtol=0.02)
    corr = np.corrcoef(noise)
    assert np.abs(corr[np.triu_indices(t, 1)]).max() < 0.03  # 1/sqrt(20k) = 0.007
    # gaussian_noise's own noise has the same std.
    plain = gaussian_noise().server(aggregate, (), _ctx(1))[0]["w"] - 0.25
    np.testing.assert_allclose(np.std(np.asarray(plain)), STD, rtol=0.02)
    # A fixed denominator replaces the real clients: std z S / expected_clients.
    fixed = ftrl.correlated_noise(num_rounds=T, expected_clients=10.0, **kwargs)
    out, _ = fixed.server(aggregate, fixed.init(aggregate), _ctx(1))
    np.testing.assert_allclose(np.std(np.asarray(out["w"]) - 0.25), 1.3 * 0.5 / 10, rtol=0.02)


def test_jits_and_traces_once_with_a_fixed_state():
    t = 6
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4, jnp.bfloat16), "s": jnp.float32(2.0)}
    # Clipping then noise, as DP-FTRL runs: the chain's state is the tuple of both.
    transform = chain(clip_updates(), ftrl.correlated_noise(num_rounds=T, strategy="blt_rational"))
    traces = []

    @jax.jit
    def step(state, r):
        traces.append(r)
        return transform.server(params, state, _ctx(r))

    state = eager = transform.init(params)
    assert state[0] == ()
    for r in range(1, t + 1):
        out, state = step(state, jnp.int32(r))
        # Each leaf keeps its dtype (the noise is drawn and correlated in float32).
        assert jax.tree.map(lambda a: a.dtype, out) == jax.tree.map(lambda a: a.dtype, params)
        if r <= 2:
            # jit equals no-jit (to 1 float32 ulp: XLA may fuse the multiply-add).
            expected, eager = transform.server(params, eager, _ctx(r))
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(
                    np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6
                )
    # One trace for all rounds: the state's structure, shapes and dtypes never change.
    assert len(traces) == 1
    assert jax.eval_shape(transform.init, params) == jax.eval_shape(lambda s: s, state)


@functools.cache
def _total_prefix_variance(z, **kwargs):
    """The noise in the prefix sums of T rounds (what server SGD accumulates), summed over
    the rounds and averaged over 4096 coordinates."""
    hp = dict(HP, **{"dp.noise_multiplier": jnp.float32(z)})
    _, out = _run(ftrl.correlated_noise(num_rounds=T, **kwargs), {"w": jnp.zeros(4096)}, T, hp)
    prefix = np.cumsum(np.asarray(out["w"], np.float64), axis=0)
    return np.mean(np.sum(prefix**2, axis=0))


@pytest.mark.parametrize(
    "kwargs, most",
    # Analytic ratios to independent noise at 32 rounds: RA-BLT 0.245, 4-banded 0.366.
    [(dict(strategy="blt_rational"), 0.3), (dict(strategy="banded", bands=4), 0.45)],
)
def test_prefix_sums_have_less_noise_than_independent_noise_at_the_same_epsilon(kwargs, most):
    t = T
    z_plain = 2.0
    strategy = ftrl.ftrl_strategy(num_rounds=t, **kwargs)
    # Same epsilon: the factorization's sensitivity is paid for with z * sens(C).
    z_mf = z_plain * strategy.sensitivity
    eps = ftrl.ftrl_epsilon(
        noise_multiplier=z_plain, num_rounds=t, delta=DELTA, strategy="identity"
    )
    eps_mf = ftrl.ftrl_epsilon(noise_multiplier=z_mf, num_rounds=t, delta=DELTA, **kwargs)
    assert eps_mf == pytest.approx(eps, rel=1e-9)

    plain = _total_prefix_variance(z_plain, strategy="identity")
    mf = _total_prefix_variance(z_mf, **kwargs)
    # Against the analytic values: sum_t t for independent noise, ||A C^{-1}||_F^2 for MF.
    a = np.tril(np.ones((t, t)))
    scale = (0.5 / CLIENTS) ** 2
    np.testing.assert_allclose(plain, scale * z_plain**2 * t * (t + 1) / 2, rtol=0.05)
    b = a @ np.linalg.inv(strategy.strategy_matrix())
    np.testing.assert_allclose(mf, scale * z_mf**2 * np.sum(b**2), rtol=0.05)
    assert mf < most * plain


def _rdp_epsilon(event, count=1):
    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(event, count)
    return acct.get_epsilon(DELTA)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strategy="blt_rational"),
        dict(strategy="blt_rational", participations=4, min_separation=8),
        dict(strategy="banded", bands=4, participations=4, min_separation=8),
        dict(strategy="banded", bands=4),
    ],
)
def test_epsilon_is_the_gaussian_mechanism_with_the_strategys_sensitivity(kwargs):
    t, z = T, 3.0
    strategy = ftrl.ftrl_strategy(num_rounds=t, **kwargs)
    c = strategy.strategy_matrix()
    k = kwargs.get("participations", 1)
    # Independent sensitivities: the largest column norm for one participation; for a
    # Toeplitz BLT with decreasing coefficients the k columns b apart from round 0 (Kalinin
    # and Lampert 2024, Thm. 2); for unit, b-orthogonal banded columns sqrt(k).
    if k == 1:
        sens = np.linalg.norm(c, axis=0).max()
    elif kwargs["strategy"] == "banded":
        sens = np.sqrt(k)
    else:
        sens = np.linalg.norm(c[:, 0 : 8 * k : 8].sum(axis=1))
    assert strategy.sensitivity == pytest.approx(sens, rel=1e-9)
    eps = ftrl.ftrl_epsilon(noise_multiplier=z, num_rounds=t, delta=DELTA, **kwargs)
    assert eps == pytest.approx(_rdp_epsilon(dp_accounting.GaussianDpEvent(z / sens)), rel=1e-9)
    pld = ftrl.ftrl_epsilon(
        noise_multiplier=z, num_rounds=t, delta=DELTA, accountant="pld", **kwargs
    )
    acct = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=accounting.PLD_DISCRETIZATION
    )
    acct.compose(dp_accounting.GaussianDpEvent(z / sens))
    assert pld == pytest.approx(acct.get_epsilon(DELTA), rel=1e-9)
    assert pld < eps  # PLD is tighter than RDP
    # Calibration inverts it.
    z_back = ftrl.ftrl_noise_multiplier(target_epsilon=eps, num_rounds=t, delta=DELTA, **kwargs)
    assert z_back == pytest.approx(z, rel=1e-5)
    assert ftrl.ftrl_epsilon(noise_multiplier=z_back, num_rounds=t, delta=DELTA, **kwargs) <= (
        eps * (1 + 1e-9)
    )


@pytest.mark.parametrize("kwargs", [dict(strategy="identity"), dict(strategy="banded", bands=1)])
def test_independent_noise_composes_like_plain_gaussian_rounds(kwargs):
    # 5 participations 7 rounds apart in 32 rounds: 5 composed Gaussian(z) rounds, as the
    # DP-FedAvg accountant counts them without sampling (q = 1).
    z = 1.7
    eps = ftrl.ftrl_epsilon(
        noise_multiplier=z, num_rounds=T, delta=DELTA, participations=5, min_separation=7, **kwargs
    )
    assert eps == pytest.approx(_rdp_epsilon(dp_accounting.GaussianDpEvent(z), 5), rel=1e-9)
    dp_fedavg = accounting.epsilon(noise_multiplier=z, sampling_rate=1.0, rounds=5, delta=DELTA)
    assert eps == pytest.approx(dp_fedavg, rel=1e-9)
    # One participation: one Gaussian round, whatever the number of rounds.
    once = ftrl.ftrl_epsilon(noise_multiplier=z, num_rounds=T, delta=DELTA, **kwargs)
    assert once == pytest.approx(_rdp_epsilon(dp_accounting.GaussianDpEvent(z)), rel=1e-9)
    # Participations beyond what the separation allows are capped: ceil(32 / 7) = 5.
    capped = ftrl.ftrl_epsilon(
        noise_multiplier=z, num_rounds=T, delta=DELTA, participations=9, min_separation=7, **kwargs
    )
    assert capped == eps
    assert ftrl.ftrl_epsilon(noise_multiplier=0.0, num_rounds=T, delta=DELTA, **kwargs) == np.inf


def test_blt_strategy_passes_the_participation_to_the_library_optimizer(monkeypatch):
    from jax_privacy.matrix_factorization import buffered_toeplitz

    calls = []

    def fake_optimize(**kwargs):
        calls.append(kwargs)
        return buffered_toeplitz.BufferedToeplitz.build([0.95, 0.6], [0.2, 0.25])

    monkeypatch.setattr(buffered_toeplitz, "optimize", fake_optimize)
    ftrl._build_strategy.cache_clear()  # no strategy built with the real optimizer is reused
    try:
        one = ftrl.ftrl_strategy(num_rounds=20, strategy="blt", buffers=3)
        many = ftrl.ftrl_strategy(num_rounds=21, strategy="blt", participations=3, min_separation=7)
        ftrl.correlated_noise(num_rounds=20, strategy="blt", buffers=3)  # cached: no call
    finally:
        ftrl._build_strategy.cache_clear()
    assert calls == [{"n": 20, "max_buffers": 3}, {"n": 21, "min_sep": 7, "max_participations": 3}]
    # The rounds run float32 parameters, and those are what is accounted for.
    assert one.params["buf_decay"] == (float(np.float32(0.95)), float(np.float32(0.6)))
    assert many.participations == 3 and many.min_separation == 7
    np.testing.assert_allclose(
        one.sensitivity, np.linalg.norm(one.strategy_matrix()[:, 0]), rtol=1e-9
    )


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown strategy 'tree'; known: banded, blt"):
        ftrl.correlated_noise(num_rounds=8, strategy="tree")
    for bands in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="bands must be an integer >= 1"):
            ftrl.correlated_noise(num_rounds=8, strategy="banded", bands=bands)
    with pytest.raises(ValueError, match="needs bands"):
        ftrl.ftrl_strategy(num_rounds=8, strategy="banded")
    with pytest.raises(ValueError, match="at most num_rounds"):
        ftrl.ftrl_strategy(num_rounds=8, strategy="banded", bands=9)
    with pytest.raises(ValueError, match="bands applies to strategy='banded'"):
        ftrl.ftrl_strategy(num_rounds=8, strategy="blt", bands=4)
    with pytest.raises(ValueError, match="buffers applies"):
        ftrl.ftrl_strategy(num_rounds=8, strategy="banded", bands=2, buffers=2)
    with pytest.raises(ValueError, match="buffers must be at most 15"):
        ftrl.ftrl_strategy(num_rounds=8, strategy="blt", buffers=16)
    for rounds in (0, -3, 2.0):
        with pytest.raises(ValueError, match="num_rounds must be an integer >= 1"):
            ftrl.correlated_noise(num_rounds=rounds, strategy="identity")
    with pytest.raises(ValueError, match="needs min_separation"):
        ftrl.ftrl_strategy(num_rounds=8, strategy="identity", participations=2)
    with pytest.raises(ValueError, match="min_separation must be an integer >= 1"):
        ftrl.ftrl_strategy(num_rounds=8, strategy="identity", participations=2, min_separation=0)
    with pytest.raises(ValueError, match="min_separation >= bands"):
        ftrl.ftrl_strategy(
            num_rounds=8, strategy="banded", bands=4, participations=2, min_separation=3
        )
    with pytest.raises(ValueError, match="expected_clients must be > 0"):
        ftrl.correlated_noise(num_rounds=8, strategy="identity", expected_clients=0)
    for z in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
            ftrl.ftrl_epsilon(noise_multiplier=z, num_rounds=8, delta=DELTA, strategy="identity")
    with pytest.raises(ValueError, match="delta"):
        ftrl.ftrl_epsilon(noise_multiplier=1.0, num_rounds=8, delta=0.0, strategy="identity")
    with pytest.raises(ValueError, match="unknown accountant"):
        ftrl.ftrl_epsilon(
            noise_multiplier=1.0, num_rounds=8, delta=DELTA, strategy="identity", accountant="x"
        )
    with pytest.raises(ValueError, match="target_epsilon"):
        ftrl.ftrl_noise_multiplier(
            target_epsilon=0.0, num_rounds=8, delta=DELTA, strategy="identity"
        )

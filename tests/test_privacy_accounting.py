"""Privacy accounting (``fedjax_sim.privacy.accounting``) against dp_accounting and by hand.

PLD and sampling-without-replacement evaluations cost 0.1-0.5 s each, so the settings below
are chosen to keep the file at a few seconds.
"""

import math

import dp_accounting as dpa
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.privacy import accounting

DELTA = 1e-5
# The TFF tutorial "Differential privacy in TFF": 3,383 EMNIST clients, 120 per round,
# noise multiplier 1.2, 100 rounds, delta 1e-5, chosen to reach epsilon ~ 2.
TFF = dict(noise_multiplier=1.2, sampling_rate=120 / 3383, rounds=100, delta=DELTA)


def direct_epsilon(event, accountant, relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE):
    if accountant == "rdp":
        acct = dpa.rdp.RdpAccountant(neighboring_relation=relation)
    else:
        acct = dpa.pld.PLDAccountant(neighboring_relation=relation)
    acct.compose(event)
    return acct.get_epsilon(DELTA)


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_poisson_epsilon_equals_dp_accounting(name):
    q, z, rounds = 0.05, 1.5, 30
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    ours = accounting.epsilon(
        noise_multiplier=z, sampling_rate=q, rounds=rounds, delta=DELTA, accountant=name
    )
    assert ours == pytest.approx(direct_epsilon(event, name), rel=1e-9, abs=1e-9)
    assert accounting.dp_event(noise_multiplier=z, sampling_rate=q, rounds=rounds) == event


def test_uniform_epsilon_equals_dp_accounting_with_replace_one_sensitivity():
    # Replace-one moves the clipped sum by up to 2 S, so the Gaussian event carries z / 2.
    z, cohort, population, rounds = 2.0, 10, 100, 20
    event = dpa.SelfComposedDpEvent(
        dpa.SampledWithoutReplacementDpEvent(population, cohort, dpa.GaussianDpEvent(z / 2)),
        rounds,
    )
    kwargs = dict(noise_multiplier=z, rounds=rounds, sampling="uniform")
    kwargs.update(cohort_size=cohort, population=population)
    assert accounting.dp_event(**kwargs) == event
    ours = accounting.epsilon(delta=DELTA, **kwargs)
    expected = direct_epsilon(event, "rdp", dpa.NeighboringRelation.REPLACE_ONE)
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_full_cohort_uniform_is_the_gaussian_mechanism_at_half_the_noise():
    # Every client every round: no amplification; replace-one sensitivity 2 S against noise
    # z S is the Gaussian mechanism with multiplier z / 2, whose RDP at order a is
    # a / (2 (z/2)^2) = 2 a / z^2 per round: compose by hand and convert with dp_accounting.
    z, rounds = 4.0, 10
    ours = accounting.epsilon(
        noise_multiplier=z,
        rounds=rounds,
        delta=DELTA,
        sampling="uniform",
        cohort_size=50,
        population=50,
    )
    orders = dpa.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    by_hand = [rounds * 2 * a / z**2 for a in orders]
    assert ours == pytest.approx(dpa.rdp.compute_epsilon(orders, by_hand, DELTA)[0], rel=1e-9)


def test_tff_tutorial_epsilon():
    rdp = accounting.epsilon(**TFF, accountant="rdp")
    pld = accounting.epsilon(**TFF, accountant="pld")
    print(f"TFF tutorial setting: epsilon rdp={rdp!r} pld={pld!r}")
    # The tutorial picks its settings to reach epsilon 2 with RDP: just under it
    # (1.98611459987846 with dp_accounting 0.6.0's default orders).
    assert 1.9 < rdp <= 2.0
    # PLD accounting is tighter than the RDP bound (1.70747 with dp_accounting 0.6.0).
    assert 1.5 < pld < rdp
    # At the package level, as the README shows it, with its inverse.
    assert fs.privacy.epsilon(**TFF) == rdp
    z = fs.privacy.noise_multiplier_for_epsilon(
        target_epsilon=rdp, **{k: v for k, v in TFF.items() if k != "noise_multiplier"}
    )
    np.testing.assert_allclose(z, TFF["noise_multiplier"], rtol=1e-3)


def test_noise_and_rounds_edge_cases():
    assert accounting.epsilon(noise_multiplier=0.0, sampling_rate=0.1, rounds=3, delta=DELTA) == (
        math.inf
    )
    kwargs = dict(noise_multiplier=0.0, rounds=3, delta=DELTA, sampling="uniform")
    assert accounting.epsilon(cohort_size=5, population=50, **kwargs) == math.inf
    pld = accounting.epsilon(
        noise_multiplier=0.0, sampling_rate=0.1, rounds=3, delta=DELTA, accountant="pld"
    )
    assert pld == math.inf
    assert accounting.epsilon(noise_multiplier=1.0, sampling_rate=0.1, rounds=0, delta=DELTA) == 0
    no_noise = accounting.dp_event(noise_multiplier=0, sampling_rate=0.1, rounds=2)
    assert no_noise == dpa.NonPrivateDpEvent()
    no_rounds = accounting.dp_event(noise_multiplier=1, sampling_rate=0.1, rounds=0)
    assert no_rounds == dpa.NoOpDpEvent()


def test_poisson_rate_from_cohort_and_population():
    by_rate = accounting.epsilon(**TFF)
    tff = {k: v for k, v in TFF.items() if k != "sampling_rate"}
    assert accounting.epsilon(cohort_size=120, population=3383, **tff) == by_rate


@pytest.mark.parametrize(
    "name, target, tol",
    [("rdp", 2.0, 1e-6), ("rdp", 0.5, 1e-6), ("pld", 0.1, 1e-4)],
)
def test_noise_multiplier_for_epsilon_round_trips(name, target, tol):
    # PLD at small noise is slow, so its case uses a setting that needs z ~ 2.5.
    setting = TFF if name == "rdp" else dict(sampling_rate=0.01, rounds=50, delta=DELTA)
    setting = {k: v for k, v in setting.items() if k != "noise_multiplier"}
    z = accounting.noise_multiplier_for_epsilon(
        target_epsilon=target, accountant=name, tol=tol, **setting
    )
    assert accounting.epsilon(noise_multiplier=z, accountant=name, **setting) <= target
    # Within tol of the smallest such z: a little less noise already exceeds the target.
    assert accounting.epsilon(noise_multiplier=z - 2 * tol, accountant=name, **setting) > target
    if name == "rdp" and target == 2.0:
        assert z == pytest.approx(1.2, abs=0.01)  # the tutorial's 1.2 was chosen this way


def test_noise_multiplier_for_epsilon_with_no_rounds_needs_no_noise():
    assert (
        accounting.noise_multiplier_for_epsilon(
            target_epsilon=1.0, sampling_rate=0.1, rounds=0, delta=DELTA
        )
        == 0.0
    )


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    q = TFF["sampling_rate"]
    by_rounds = [
        accounting.epsilon(noise_multiplier=1.2, sampling_rate=q, rounds=r, delta=DELTA)
        for r in (1, 10, 100, 1000)
    ]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [
        accounting.epsilon(noise_multiplier=z, sampling_rate=q, rounds=100, delta=DELTA)
        for z in (0.8, 1.2, 2.0, 4.0)
    ]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    # And with the sampling rate, and for PLD (through the cheap cached Accountant).
    assert (
        accounting.epsilon(noise_multiplier=1.2, sampling_rate=2 * q, rounds=100, delta=DELTA)
        > (by_rounds[2])
    )
    pld = accounting.Accountant(
        noise_multiplier=1.2, sampling_rate=q, delta=DELTA, accountant="pld"
    )
    by_rounds_pld = [pld.epsilon(r) for r in (1, 10, 100, 1000)]
    assert by_rounds_pld == sorted(by_rounds_pld) and len(set(by_rounds_pld)) == 4


def test_adaptive_clipping_noise_by_hand():
    # z_delta = 1, sigma_b = 0.5: z^-2 = 1 + (2 * 0.5)^-2 = 2, z = 1 / sqrt(2).
    assert accounting.adaptive_clipping_noise(1.0, 0.5) == pytest.approx(2**-0.5, rel=1e-12)
    # TFF's default sigma_b = clients / 20: z = 1 with 100 clients, sigma_b = 5:
    # z_delta = (1 - 10^-2)^-1/2 = 1 / sqrt(0.99) = 1.0050378152592...
    assert accounting.split_noise_multiplier(1.0, 5.0) == pytest.approx(0.99**-0.5, rel=1e-12)
    assert accounting.split_noise_multiplier(1.0, 5.0) == pytest.approx(1.0050378152592, rel=1e-12)
    # No noise on either release: not private.
    assert accounting.adaptive_clipping_noise(0.0, 5.0) == 0.0
    assert accounting.adaptive_clipping_noise(1.0, 0.0) == 0.0
    assert accounting.split_noise_multiplier(0.0, 5.0) == 0.0


@pytest.mark.parametrize("z, sigma_b", [(0.3, 0.2), (1.0, 5.0), (1.2, 6.0), (5.0, 2.6)])
def test_split_and_combine_are_inverse(z, sigma_b):
    z_delta = accounting.split_noise_multiplier(z, sigma_b)
    assert z_delta > z  # the count takes part of the budget
    assert accounting.adaptive_clipping_noise(z_delta, sigma_b) == pytest.approx(z, rel=1e-12)
    combined = accounting.adaptive_clipping_noise(z, sigma_b)
    assert combined < z
    assert accounting.split_noise_multiplier(combined, sigma_b) == pytest.approx(z, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sampling_rate=120 / 3383, accountant="rdp"),
        dict(sampling_rate=120 / 3383, accountant="pld"),
        dict(sampling="uniform", cohort_size=120, population=3383, accountant="rdp"),
    ],
    ids=["rdp", "pld", "uniform"],
)
def test_accountant_matches_epsilon_and_brute_force_rounds(kwargs):
    acct = accounting.Accountant(noise_multiplier=2.0, delta=DELTA, **kwargs)
    rounds = (0, 1, 25)
    by_acct = [acct.epsilon(r) for r in rounds]
    by_fn = [
        accounting.epsilon(noise_multiplier=2.0, rounds=r, delta=DELTA, **kwargs) for r in rounds
    ]
    assert by_acct == pytest.approx(by_fn, rel=1e-9, abs=1e-12)
    if kwargs["accountant"] == "rdp":
        assert by_acct == by_fn  # the same RDP curve, scaled the same way
    # Brute force over every round count up to 25 against the binary search.
    every = [acct.epsilon(r) for r in range(26)]
    for target in (0.0, every[1], (every[5] + every[6]) / 2, every[17], every[25], 1e9):
        brute = max(r for r in range(26) if every[r] <= target)
        assert acct.rounds_within(target, 25) == brute
    assert acct.rounds_within(1e9, 0) == 0


def test_accountant_without_noise():
    acct = accounting.Accountant(noise_multiplier=0.0, sampling_rate=0.1, delta=DELTA)
    assert acct.epsilon(0) == 0 and acct.epsilon(5) == math.inf
    assert acct.rounds_within(100.0, 50) == 0
    assert acct.dp_event(3) == dpa.NonPrivateDpEvent()


BASE = dict(noise_multiplier=1.0, sampling_rate=0.1, rounds=10, delta=DELTA)
UNIFORM = dict(sampling="uniform", cohort_size=10, population=100)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(delta=0.0), r"delta must be in \(0, 1\)"),
        (dict(delta=1.0), r"delta must be in \(0, 1\)"),
        (dict(delta=-1e-5), r"delta must be in \(0, 1\)"),
        (dict(sampling_rate=0.0), r"sampling_rate must be in \(0, 1\]"),
        (dict(sampling_rate=1.5), r"sampling_rate must be in \(0, 1\]"),
        (dict(noise_multiplier=-0.1), "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=math.nan), "noise_multiplier must be a finite number >= 0"),
        (dict(rounds=-1), "rounds must be an integer >= 0"),
        (dict(rounds=2.5), "rounds must be an integer >= 0"),
        (dict(accountant="moments"), "unknown accountant 'moments'; known: pld, rdp"),
        (dict(sampling="shuffle"), "unknown sampling 'shuffle'; known: poisson, uniform"),
        (dict(sampling_rate=None), "give sampling_rate"),
        (dict(sampling="uniform"), "needs cohort_size and population"),
        (dict(cohort_size=10), "give cohort_size and population together"),
        (dict(UNIFORM, cohort_size=101), r"cohort_size \(101\) must be at most population"),
        (dict(UNIFORM, cohort_size=0), "cohort_size must be an integer >= 1"),
        (dict(UNIFORM, sampling_rate=0.2), "disagrees with cohort_size / population"),
        (dict(UNIFORM, accountant="pld"), "PLD accountant does not support sampling='uniform'"),
    ],
)
def test_bad_inputs_raise(changes, match):
    kwargs = dict(BASE, **changes)
    with pytest.raises(ValueError, match=match):
        accounting.epsilon(**kwargs)
    rounds = kwargs.pop("rounds")
    if "rounds" not in changes:  # the Accountant takes the rounds per call
        with pytest.raises(ValueError, match=match):
            accounting.Accountant(**kwargs)
    else:
        acct = accounting.Accountant(**kwargs)
        with pytest.raises(ValueError, match=match):
            acct.epsilon(rounds)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: accounting.noise_multiplier_for_epsilon(
                target_epsilon=0.0, sampling_rate=0.1, rounds=10, delta=DELTA
            ),
            "target_epsilon must be a finite number > 0",
        ),
        (
            lambda: accounting.noise_multiplier_for_epsilon(
                target_epsilon=1.0, sampling_rate=0.1, rounds=10, delta=2.0
            ),
            r"delta must be in \(0, 1\)",
        ),
        (
            lambda: accounting.noise_multiplier_for_epsilon(
                target_epsilon=1.0, rounds=10, delta=DELTA, accountant="pld", **UNIFORM
            ),
            "use accountant='rdp'",
        ),
        (
            lambda: accounting.epsilon_of_event(
                dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(1.0)),
                DELTA,
                "pld",
            ),
            "use accountant='rdp'",
        ),
        (
            lambda: accounting.epsilon_of_event(dpa.NoOpDpEvent(), DELTA, "gdp"),
            "unknown accountant 'gdp'; known: pld, rdp",
        ),
        (
            lambda: accounting.split_noise_multiplier(1.0, 0.5),
            "leaves no privacy budget.*Increase clipped_count_stddev",
        ),
        (
            lambda: accounting.adaptive_clipping_noise(1.0, -1.0),
            "clipped_count_stddev must be a finite number >= 0",
        ),
        (
            lambda: accounting.adaptive_clipping_noise(-1.0, 1.0),
            "noise_multiplier must be a finite number >= 0",
        ),
        (
            lambda: accounting.Accountant(
                noise_multiplier=1.0, sampling_rate=0.1, delta=DELTA
            ).rounds_within(-1.0, 10),
            "target_epsilon must be >= 0",
        ),
        (
            lambda: accounting.Accountant(
                noise_multiplier=1.0, sampling_rate=0.1, delta=DELTA
            ).rounds_within(1.0, -3),
            "max_rounds must be an integer >= 0",
        ),
    ],
)
def test_other_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""The simulated population (driver.systems): sampling schemes, availability, stragglers,
dropouts and the clock; each checked against its definition, and end to end through
``simulate`` (deterministic, resumable, unchanged when off)."""

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.data import pack_cohort
from fedjax_sim.driver import systems
from fedjax_sim.driver.cohorts import sample_clients
from tests.helpers import ragged_dataset


def _systems(**kw):
    scheme = kw.pop("scheme", "uniform")
    rate = kw.pop("rate", 0.0)
    out = systems.Systems(scheme=scheme, rate=rate, **kw)
    systems._check(out)
    return out


def _population(sizes, seed=0, cohort=4, model_bytes=1000, **kw):
    return systems.Population(_systems(**kw), np.asarray(sizes), seed, cohort, model_bytes)


def test_uniform_sampling_with_everyone_online_is_the_historical_draw():
    pop = _population([5] * 30, seed=3, cohort=7)
    for r in range(1, 20):
        np.testing.assert_array_equal(pop.sample(r), sample_clients(3, r, 30, 7))


def test_poisson_sampling_includes_each_client_with_probability_q():
    n, q, rounds = 200, 0.1, 400
    pop = _population([5] * n, cohort=20, scheme="poisson", rate=q)
    counts = np.zeros(n)
    sizes = []
    for r in range(1, rounds + 1):
        ids = pop.sample(r)
        assert len(set(ids.tolist())) == len(ids)
        counts[ids] += 1
        sizes.append(len(ids))
    # Each inclusion is Bernoulli(q): the mean cohort is q n = 20, its std sqrt(n q (1-q)) = 4.2;
    # over 400 rounds the mean's std is 0.21.
    assert abs(np.mean(sizes) - q * n) < 1.0
    assert 3.0 < np.std(sizes) < 5.5
    # Per client: 40 expected inclusions, std 6; every client within 6 sigma.
    assert np.all(np.abs(counts - q * rounds) < 36)
    np.testing.assert_array_equal(pop.sample(5), pop.sample(5))  # a pure function of the round


def test_poisson_rate_defaults_to_the_cohort_fraction_and_capacity_covers_it():
    s = _systems(scheme="poisson")
    assert systems.poisson_rate(s, 100, 10) == 0.1
    # mean 10, std 3: room for 10 + 6 * 3 + 1 -> 29.
    assert systems.cohort_capacity(s, 100, 10) == 29
    assert systems.cohort_capacity(_systems(), 100, 10) == 10


def test_weighted_sampling_prefers_large_clients():
    sizes = np.array([1] * 10 + [100] * 10)
    pop = _population(sizes, cohort=2, scheme="weighted")
    counts = np.zeros(20)
    for r in range(1, 301):
        ids = pop.sample(r)
        assert len(ids) == 2 and ids[0] != ids[1]
        counts[ids] += 1
    # The large clients hold 1000 of 1010 examples: nearly every draw is one of them.
    assert counts[10:].sum() > 0.97 * counts.sum()


def test_bernoulli_availability_follows_each_clients_probability():
    pop = _population([5] * 50, availability="bernoulli", availability_prob=0.5,
                      availability_spread=0.4)  # fmt: skip
    p = pop.traits.online_prob
    assert p.min() >= 0.1 - 1e-12 and p.max() <= 0.9 + 1e-12 and p.std() > 0.15
    online = np.mean([pop.online(r) for r in range(1, 801)], axis=0)
    # 800 Bernoulli draws per client: std <= 0.018; 5 sigma.
    np.testing.assert_allclose(online, p, atol=0.09)
    for r in range(1, 30):  # only online clients are sampled
        assert pop.online(r)[pop.sample(r)].all()


def test_diurnal_availability_follows_the_wave():
    pop = _population([5] * 400, availability="diurnal", availability_prob=0.5,
                      availability_spread=0.5, diurnal_period=8)  # fmt: skip
    for r in (1, 3, 6):
        expected = 0.5 + 0.5 * np.sin(2 * np.pi * (r / 8 + pop.traits.phase))
        # 400 clients: the fraction online in a round matches the expected mean closely.
        assert abs(pop.online(r).mean() - expected.mean()) < 0.08
    # Client 0 online more often near its peak than near its trough.
    peak = round((0.25 - pop.traits.phase[0]) % 1 * 8)
    trough = round((0.75 - pop.traits.phase[0]) % 1 * 8)
    on = lambda r0: np.mean([pop.online(r0 + 8 * k)[0] for k in range(1, 200)])
    assert on(peak) > on(trough) + 0.5


def _cohort(sizes, ids, steps_per_client=None):
    ds = ragged_dataset(sizes)
    return ds, pack_cohort(ds, ids, batch_size=2, seed=0, round_num=1, num_clients=len(ids) + 1)


def test_partial_stragglers_keep_a_uniform_share_of_their_steps():
    ds, cohort = _cohort([8] * 10, list(range(10)))
    s = _systems(straggler_fraction=0.9)
    full = np.asarray(cohort.mask).any(-1).sum(-1)  # 4 steps per client, 0 for the pad row
    budgets = []
    for r in range(1, 201):
        out, dropped = systems.apply_systems(cohort, s, 0, r, ds.num_clients)
        steps = np.asarray(out.mask).any(-1).sum(-1)
        assert not dropped.any()
        # FedProx's rule: C - round(C * (1 - 0.9)) = 9 of the 10 clients straggle.
        assert (steps[:10] < full[:10]).sum() <= 9 and (steps[:10] >= 1).all()
        np.testing.assert_array_equal(out.num_examples, cohort.num_examples)  # weights kept
        np.testing.assert_array_equal(out.client_ids, cohort.client_ids)
        # Truncation only: every kept step is the original step.
        keep = np.asarray(out.mask)
        assert not (keep & ~np.asarray(cohort.mask)).any()
        budgets += steps[:10].tolist()
    # U{1..4} for 9 clients and 4 for one: mean (9 * 2.5 + 4) / 10 = 2.65.
    assert abs(np.mean(budgets) - 2.65) < 0.1
    assert set(budgets) == {1, 2, 3, 4}


def test_fixed_budget_and_drop_mode():
    ds, cohort = _cohort([8] * 4, [0, 1, 2, 3])
    out, _ = systems.apply_systems(
        cohort, _systems(straggler_fraction=1.0, straggler_budget="fixed", straggler_work=0.5),
        0, 1, ds.num_clients,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.mask).any(-1).sum(-1), [2, 2, 2, 2, 0])
    out, dropped = systems.apply_systems(
        cohort, _systems(straggler_fraction=0.5, straggler_mode="drop"), 0, 1, ds.num_clients
    )
    # Half of 4 dropped: weight 0, out-of-range id (per-client state untouched), no steps.
    assert dropped.sum() == 2
    assert (np.asarray(out.num_examples)[dropped] == 0).all()
    assert (np.asarray(out.client_ids)[dropped] == ds.num_clients).all()
    assert not np.asarray(out.mask)[dropped].any()
    kept = ~dropped & (np.asarray(cohort.num_examples) > 0)
    np.testing.assert_array_equal(np.asarray(out.mask)[kept], np.asarray(cohort.mask)[kept])


def test_round_seconds_is_the_slowest_reporting_client():
    ds, cohort = _cohort([4, 6], [0, 1])
    pop = _population([4, 6], model_bytes=1000, compute_speed=2.0, bandwidth_down=500.0,
                      bandwidth_up=250.0)  # fmt: skip
    # Client 1: 1000/500 + 6 examples / 2 per s + 1000/250 = 2 + 3 + 4 = 9 s; client 0: 8 s.
    assert systems.round_seconds(pop, cohort, ds.num_clients) == pytest.approx(9.0)
    np.testing.assert_allclose(pop.client_seconds([0, 1], [4, 6]), [8.0, 9.0])


def test_a_client_downloads_what_comes_once_the_first_time_only():
    """A LoRA model's base (``once_bytes``) costs a client ``once_bytes / down`` seconds in its
    first round; the driver's cohort source charges it once per client, as it counts bytes."""
    s = _systems(compute_speed=2.0, bandwidth_down=500.0, bandwidth_up=250.0)
    pop = systems.Population(s, np.asarray([4, 6]), 0, 2, 1000, None, 5000)
    np.testing.assert_allclose(pop.client_seconds([0, 1], [4, 6], [True, False]), [18.0, 9.0])
    ds, cohort = _cohort([4, 6], [0, 1])
    # Client 0 first: 8 + 5000/500 = 18 s; then neither: 9 s.
    assert systems.round_seconds(pop, cohort, 2, np.array([False, True])) == pytest.approx(18.0)
    assert systems.round_seconds(pop, cohort, 2, np.array([True, True])) == pytest.approx(9.0)


def test_local_examples_counts_whole_epochs_and_caps():
    # 5 examples, batch 2: 3 steps per epoch (2 + 2 + 1). Two epochs: 10; capped at 4 steps:
    # one epoch (5) + one full batch (2) = 7.
    kw = dict(batch_size=2, local_epochs=2)
    np.testing.assert_array_equal(systems.local_examples([5], **kw, max_local_steps=None), [10])
    np.testing.assert_array_equal(systems.local_examples([5], **kw, max_local_steps=4), [7])


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("systems.availability_prob", 1.5, r"availability_prob must be in \[0, 1\]"),
        ("systems.straggler_fraction", -0.1, r"straggler_fraction must be in \[0, 1\]"),
        ("systems.dropout", 2.0, r"dropout must be in \[0, 1\]"),
        ("systems.availability", "sometimes", "known: always, bernoulli, diurnal"),
        ("systems.straggler_mode", "wait", "known: partial, drop"),
        ("sampling.scheme", "stratified", "known: uniform, poisson, weighted"),
        ("systems.compute_speed", -1.0, "compute_speed"),
        ("eval.finetune_steps", -2, "finetune_steps must be >= 0"),
    ],
)
def test_bad_settings_are_refused_before_any_data(field, value, match):
    config = fs.load_config("default:smoke")
    config.dataset.name = "no_such_dataset_would_fail_later"
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=match):
        fs.build_experiment(config)


def _smoke(**systems_fields):
    config = fs.load_config("default:smoke")
    config.num_rounds, config.eval_every, config.checkpoint_every = 6, 2, 3
    config.client.local_epochs = 1
    for k, v in systems_fields.items():
        group, name = k.split("__")
        config[group][name] = v
    return config


def test_simulate_with_systems_is_deterministic_and_logs_the_clock(tmp_path):
    config = _smoke(systems__straggler_fraction=0.5, systems__dropout=0.2,
                    systems__availability="bernoulli", systems__availability_prob=0.8,
                    systems__speed_sigma=0.5, sampling__scheme="poisson")  # fmt: skip
    a = fs.simulate(config, tmp_path / "a", progress=False)
    b = fs.simulate(config, tmp_path / "b", progress=False)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    times = [h["sim_time_s"] for h in a["history"]]
    assert times == [h["sim_time_s"] for h in b["history"]]
    assert all(t2 > t1 > 0 for t1, t2 in zip(times, times[1:]))
    plain = fs.simulate(_smoke(), tmp_path / "plain", progress=False)
    assert plain["final_test_accuracy"] != a["final_test_accuracy"]


def test_resumed_systems_run_matches_an_uninterrupted_one(tmp_path):
    config = _smoke(systems__straggler_fraction=0.9, systems__speed_sigma=1.0)
    full = fs.simulate(config, tmp_path / "full", progress=False)
    short = config.copy_and_resolve_references()
    short.num_rounds = 4  # evaluated (eval_every 2) and checkpointed at its end
    fs.simulate(short, tmp_path / "resumed", progress=False)
    resumed = fs.simulate(config, tmp_path / "resumed", progress=False)  # rounds 5-6
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("wall_s", "train_s")} for r in h]
    assert strip(resumed["history"]) == strip(full["history"])
    for x, y in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(resumed["params"])):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()

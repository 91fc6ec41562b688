"""FedBuff (Nguyen et al. 2022): the asynchronous schedule on the simulated clock, the buffered
server step against a by-hand reference, the synchronous special case, and the driver (a run
is deterministic and resumes exactly)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.algorithms.base import AsyncSettings
from fedjax_sim.data import pack_cohort
from fedjax_sim.driver import systems
from fedjax_sim.driver.asynchronous import AsyncSchedule
from tests.helpers import linear_model, mean_loss, ragged_dataset, train_clients_by_hand

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
LR = 0.1


def _schedule(sizes, concurrency, k, max_staleness=10, seed=0, **kw):
    s = systems.Systems(**kw)
    pop = systems.Population(s, np.asarray(sizes), seed, concurrency, model_bytes=0)
    work = np.asarray(sizes, np.float64)  # one pass over the data
    return AsyncSchedule(
        pop, work, concurrency=concurrency, settings=AsyncSettings(k, max_staleness)
    )


def test_a_clients_first_start_downloads_what_comes_once():
    """Equal work (0.1 s), one client at a time, buffer 1: step r's client starts at step
    r-1's time, so it lands 0.1 s later, or 1.1 s if it starts for the first time and so first
    downloads what comes once (1000 bytes at 1000 B/s: a LoRA model's base)."""
    s = systems.Systems(bandwidth_down=1000.0)
    pop = systems.Population(s, np.full(4, 10), 0, 1, model_bytes=0, once_bytes=1000)
    sched = AsyncSchedule(pop, np.full(4, 10.0), concurrency=1, settings=AsyncSettings(1, 10))
    seen, last, gaps = set(), 0.0, set()
    for r in range(1, 16):
        step = sched.step(r)
        new = not set(step.clients.tolist()) <= seen
        assert step.time - last == pytest.approx(1.1 if new else 0.1)
        gaps.add(new)
        seen |= set(step.clients.tolist())
        last = step.time
    assert gaps == {True, False} and seen == set(range(4))


def test_equal_durations_and_a_full_buffer_have_no_staleness():
    sched = _schedule([10] * 12, concurrency=4, k=4)
    for r in range(1, 11):
        step = sched.step(r)
        assert len(set(step.clients.tolist())) == 4
        np.testing.assert_array_equal(step.staleness, 0)
        # Every client takes 10 examples / 100 per s = 0.1 s: step r lands at 0.1 r.
        assert step.time == pytest.approx(0.1 * r)


def test_a_buffer_of_one_under_two_concurrent_clients_alternates_staleness():
    # Two clients always finish together; the first arrival fills the buffer (step 2j-1, no
    # staleness), the second arrives after that step (step 2j, staleness 1); both replacements
    # then start from the newest model.
    sched = _schedule([10] * 6, concurrency=2, k=1)
    got = [int(sched.step(r).staleness[0]) for r in range(1, 9)]
    assert got == [0, 1] * 4


def test_slow_clients_arrive_stale_and_too_stale_ones_are_discarded():
    # Client speeds spread log-normally: fast clients cycle while slow ones train.
    sched = _schedule([10] * 40, concurrency=8, k=2, max_staleness=3, speed_sigma=1.5)
    steps = [sched.step(r) for r in range(1, 41)]
    stale = np.concatenate([s.staleness for s in steps])
    assert stale.max() <= 3 and stale.max() > 0 and sched.discarded > 0
    discarded = [s.discarded for s in steps]  # each step carries the count so far
    assert discarded == sorted(discarded) and 0 < discarded[-1] <= sched.discarded
    times = [s.time for s in steps]
    assert times == sorted(times)
    again = _schedule([10] * 40, concurrency=8, k=2, max_staleness=3, speed_sigma=1.5)
    for r in range(40, 0, -1):  # deterministic, and computable out of order
        np.testing.assert_array_equal(again.step(r).clients, steps[r - 1].clients)


def test_schedule_refusals():
    with pytest.raises(ValueError, match="buffer_size must be in 1..4"):
        _schedule([10] * 12, concurrency=4, k=5)
    with pytest.raises(ValueError, match="needs at least 8 clients"):
        _schedule([10] * 7, concurrency=4, k=4)


def _cohort(ds, ids, r, staleness=None):
    c = pack_cohort(ds, ids, batch_size=4, num_steps=4, seed=0, round_num=r)
    if staleness is not None:
        c = c._replace(info={"staleness": np.asarray(staleness, np.int32)})
    return c


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_no_staleness_is_synchronous_fedavg(weighting):
    ds = ragged_dataset([8, 12, 5, 9])
    buff = fs.fedbuff(MODEL, optax.sgd(LR), optax.sgd(1.0), weighting=weighting)
    avg = fs.fedavg(MODEL, optax.sgd(LR), weighting=weighting)
    a, b = buff.init(PARAMS), avg.init(PARAMS)
    for r in range(1, 4):
        a, _ = buff.apply(a, _cohort(ds, [0, 1, 2, 3], r, [0, 0, 0, 0]), jax.random.key(r))
        b, _ = avg.apply(b, _cohort(ds, [0, 1, 2, 3], r), jax.random.key(r))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_buffered_steps_match_the_paper_by_hand():
    # Algorithm 1 of the paper in plain Python: each client trains from the model of its
    # start, sends Delta / sqrt(1 + tau); the server steps by eta_g / K * sum.
    ds = ragged_dataset([8, 12, 5, 9, 7, 6])
    eta_g = 0.7
    buff = fs.fedbuff(MODEL, optax.sgd(LR), optax.sgd(eta_g), max_staleness=2)
    plan = [([0, 1], [0, 0]), ([2, 3], [0, 1]), ([4, 0], [1, 2]), ([1, 5], [2, 0])]
    step = jax.jit(buff.apply)
    state = buff.init(PARAMS)
    grad = jax.grad(lambda p, x, y: mean_loss(MODEL, p, x, y))
    models = [PARAMS]  # models[v]: the global model after v server steps
    for r, (ids, stale) in enumerate(plan, 1):
        cohort = _cohort(ds, ids, r, stale)
        state, _ = step(state, cohort, jax.random.key(r))
        total = jax.tree.map(jnp.zeros_like, PARAMS)
        for row, tau in enumerate(stale):
            start = models[r - 1 - tau]
            one = cohort._replace(
                batches={k: v[row : row + 1] for k, v in cohort.batches.items()},
                mask=cohort.mask[row : row + 1],
            )
            (y,) = train_clients_by_hand(start, one, grad, LR)
            total = jax.tree.map(lambda t, s, y: t + (s - y) / np.sqrt(1.0 + tau), total, start, y)
        x = models[-1]
        models.append(jax.tree.map(lambda x, t: x - eta_g * t / len(ids), x, total))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(models[-1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert step._cache_size() == 1


def test_fedbuff_refusals():
    config = fs.load_config("default:smoke")
    config.algorithm = "fedbuff"
    config.algorithm_kwargs.buffer_size = 11
    with pytest.raises(ValueError, match=r"buffer_size must be in 1..clients_per_round \(10"):
        fs.build_experiment(config)
    with pytest.raises(ValueError, match="staleness_exponent must be >= 0"):
        fs.fedbuff(MODEL, optax.sgd(LR), optax.sgd(1.0), staleness_exponent=-1.0)
    config.algorithm_kwargs.buffer_size = 4
    config.systems.straggler_fraction = 0.5
    with pytest.raises(ValueError, match="no rounds to straggle"):
        fs.simulate(config, "/tmp/fedjax_sim_never_written", progress=False)


def test_a_fedbuff_run_resumes_exactly(tmp_path):
    config = fs.load_config("default:smoke")
    config.algorithm = "fedbuff"
    config.algorithm_kwargs.buffer_size = 4
    config.systems.speed_sigma = 1.0
    config.algorithm_kwargs.max_staleness = 1  # some slow clients arrive too stale
    config.num_rounds, config.eval_every, config.checkpoint_every = 8, 2, 4
    config.client.local_epochs = 1
    full = fs.simulate(config, tmp_path / "full", progress=False)
    short = config.copy_and_resolve_references()
    short.num_rounds = 4
    fs.simulate(short, tmp_path / "resumed", progress=False)
    resumed = fs.simulate(config, tmp_path / "resumed", progress=False)  # the schedule replays
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("wall_s", "train_s")} for r in h]
    assert strip(resumed["history"]) == strip(full["history"])
    for x, y in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(resumed["params"])):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    times = [h["sim_time_s"] for h in full["history"]]
    assert times == sorted(times) and times[0] > 0
    discarded = [h["async_discarded"] for h in full["history"]]  # replayed on resume too
    assert discarded == sorted(discarded) and discarded[-1] > 0
    assert full["async_discarded"] == discarded[-1]

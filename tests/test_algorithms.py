"""Invariants and independent references for FedAvg, FedSGD and FedOpt."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import pack_cohort
from tests.helpers import (
    linear_model,
    mean_loss,
    ragged_dataset,
    train_clients_by_hand,
    tree_allclose,
)

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
KEY = jax.random.key(42)


def cohort_of(ds, ids, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("seed", 0)
    kw.setdefault("round_num", 1)
    return pack_cohort(ds, ids, **kw)


def test_fedavg_one_client_one_step_is_one_sgd_step():
    ds = ragged_dataset([4])
    cohort = cohort_of(ds, [0], batch_size=4)
    algo = fs.fedavg(MODEL, optax.sgd(0.1))
    state, _ = algo.apply(algo.init(PARAMS), cohort, KEY)
    x, y = ds.client(0)["x"], ds.client(0)["y"]
    grads = jax.grad(lambda p: mean_loss(MODEL, p, x, y))(PARAMS)
    opt = optax.sgd(0.1)
    updates, _ = opt.update(grads, opt.init(PARAMS), PARAMS)
    tree_allclose(state.params, optax.apply_updates(PARAMS, updates), rtol=1e-6, atol=1e-7)


def test_fedsgd_full_batches_equal_centralized_gradient_descent():
    ds = ragged_dataset([5, 11, 8])
    everything = ds.all_examples()
    algo = fs.fedsgd(MODEL, optax.sgd(0.5))
    state = algo.init(PARAMS)
    params = PARAMS
    for r in range(3):
        # Batch size 3 does not divide the client sizes: accumulation must still be exact.
        cohort = cohort_of(ds, [0, 1, 2], batch_size=3, round_num=r)
        state, _ = algo.apply(state, cohort, KEY)
        g = jax.grad(lambda p: mean_loss(MODEL, p, everything["x"], everything["y"]))(params)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, g)
    tree_allclose(state.params, params, rtol=1e-5, atol=1e-6)


def reference_fedavg_round(params, ds, ids, *, lr, batch_size, epochs, seed, round_num):
    """Clients trained one by one in Python with the same batches, then averaged by size."""
    cohort = cohort_of(
        ds, ids, batch_size=batch_size, local_epochs=epochs, seed=seed, round_num=round_num
    )
    finals = train_clients_by_hand(
        params, cohort, jax.grad(lambda q, x, y: mean_loss(MODEL, q, x, y)), lr
    )
    weights = [ds.sizes[ci] for ci in ids]
    w = np.array(weights, np.float32) / np.sum(weights)
    return jax.tree.map(lambda *ps: sum(wi * pi for wi, pi in zip(w, ps)), *finals)


def test_fedopt_with_server_sgd_1_is_the_weighted_mean_of_client_models():
    ds = ragged_dataset([6, 13, 3, 9])
    ids = [3, 0, 1]
    algo = fs.fedopt(MODEL, optax.sgd(0.2), optax.sgd(1.0))
    state, metrics = algo.apply(algo.init(PARAMS), cohort_of(ds, ids, local_epochs=2), KEY)
    ref = reference_fedavg_round(
        PARAMS, ds, ids, lr=0.2, batch_size=4, epochs=2, seed=0, round_num=1
    )
    tree_allclose(state.params, ref, rtol=1e-5, atol=1e-6)
    assert int(metrics["num_clients"]) == 3
    # Every example seen twice (two epochs).
    assert float(metrics["num_examples_seen"]) == 2 * (9 + 6 + 13)
    fedavg_state, _ = fs.fedavg(MODEL, optax.sgd(0.2)).apply(
        algo.init(PARAMS), cohort_of(ds, ids, local_epochs=2), KEY
    )
    tree_allclose(fedavg_state.params, state.params, rtol=0, atol=0)


def test_uniform_weighting():
    ds = ragged_dataset([2, 20])
    ids = [0, 1]
    algo = fs.fedavg(MODEL, optax.sgd(0.3), weighting="uniform")
    state, _ = algo.apply(algo.init(PARAMS), cohort_of(ds, ids, batch_size=20), KEY)
    solo = []
    for i in ids:
        s, _ = fs.fedavg(MODEL, optax.sgd(0.3)).apply(
            algo.init(PARAMS), cohort_of(ds, [i], batch_size=20), KEY
        )
        solo.append(s.params)
    tree_allclose(state.params, jax.tree.map(lambda a, b: (a + b) / 2, *solo), rtol=1e-6)


@pytest.mark.parametrize("strategy", ["vmap", "chunked", "sequential", "auto"])
def test_every_strategy_gives_the_same_result(strategy):
    ds = ragged_dataset([5, 17, 2, 9, 11, 4, 8])
    ids = [6, 1, 2, 4, 0, 5, 3]
    cohort = cohort_of(ds, ids, local_epochs=2)
    client_opt = optax.adam(0.05)  # stateful client optimizer: padded steps must not move it
    # The reference is the sequential strategy, or vmap for a strategy that is (or, auto on
    # CPU, resolves to) sequential: a program is never compared with itself.
    reference = "vmap" if fs.Executor(strategy).resolved() == "sequential" else "sequential"
    ref_algo = fs.fedopt(MODEL, client_opt, optax.adam(0.1), executor=fs.Executor(reference))
    algo = fs.fedopt(
        MODEL, client_opt, optax.adam(0.1), executor=fs.Executor(strategy, chunk_size=3)
    )
    ref, ref_m = jax.jit(ref_algo.apply)(ref_algo.init(PARAMS), cohort, KEY)
    got, got_m = jax.jit(algo.apply)(algo.init(PARAMS), cohort, KEY)
    tree_allclose(got.params, ref.params, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_m["train_loss"], ref_m["train_loss"], rtol=1e-5)


def test_padded_clients_and_steps_change_nothing():
    ds = ragged_dataset([5, 9, 3])
    algo = fs.fedopt(
        MODEL, optax.sgd(0.1, momentum=0.9), optax.sgd(1.0), executor=fs.Executor("vmap")
    )
    plain = cohort_of(ds, [0, 1, 2])
    padded = cohort_of(ds, [0, 1, 2], num_steps=plain.num_steps + 5, num_clients=6)
    a, ma = algo.apply(algo.init(PARAMS), plain, KEY)
    b, mb = algo.apply(algo.init(PARAMS), padded, KEY)
    tree_allclose(a.params, b.params, rtol=1e-6, atol=1e-7)
    assert int(mb["num_clients"]) == 3
    np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-6)


def test_cohort_order_does_not_matter():
    ds = ragged_dataset([5, 9, 3, 7])
    algo = fs.fedopt(MODEL, optax.sgd(0.1), optax.adam(0.05))
    a, _ = algo.apply(algo.init(PARAMS), cohort_of(ds, [0, 1, 2, 3]), KEY)
    b, _ = algo.apply(algo.init(PARAMS), cohort_of(ds, [3, 1, 0, 2]), KEY)
    tree_allclose(a.params, b.params, rtol=1e-5, atol=1e-6)


def test_fedadam_round_matches_reddi_algorithm_2_by_hand():
    ds = ragged_dataset([6, 10])
    cohort = cohort_of(ds, [0, 1])
    lr, b1, b2, tau = 0.03, 0.9, 0.99, 1e-3
    algo = fs.fedopt(MODEL, optax.sgd(0.1), fs.optimizers.fedadam(lr, b1=b1, b2=b2, tau=tau))
    state = algo.init(PARAMS)
    state, _ = algo.apply(state, cohort, KEY)
    # The mean client model, as FedAvg (server sgd(1)) computes it.
    avg_state, _ = fs.fedavg(MODEL, optax.sgd(0.1)).apply(
        state._replace(params=PARAMS), cohort, KEY
    )
    for x0, xbar, x1 in zip(
        jax.tree.leaves(PARAMS), jax.tree.leaves(avg_state.params), jax.tree.leaves(state.params)
    ):
        delta = np.asarray(xbar, np.float64) - np.asarray(x0, np.float64)  # Delta_t
        m = (1 - b1) * delta  # m_t = b1 * 0 + (1 - b1) Delta_t
        v = b2 * tau**2 + (1 - b2) * delta**2  # v_{-1} = tau^2
        expected = np.asarray(x0, np.float64) + lr * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(np.asarray(x1), expected, rtol=2e-5, atol=1e-6)
    # A second round uses the stored moments: v_1 = b2 v_0 + (1 - b2) Delta_1^2.
    assert np.all(np.asarray(jax.tree.leaves(state.opt_state.v)[0]) >= tau**2 * b2)


def test_server_adam_by_optax_name_is_bias_corrected():
    ds = ragged_dataset([6, 10])
    cohort = cohort_of(ds, [0, 1])
    algo = fs.fedopt(MODEL, optax.sgd(0.1), fs.get_optimizer("adam", 0.01, eps=1e-3))
    state, _ = algo.apply(algo.init(PARAMS), cohort, KEY)
    avg, _ = fs.fedavg(MODEL, optax.sgd(0.1)).apply(algo.init(PARAMS), cohort, KEY)
    for x0, xbar, x1 in zip(*(jax.tree.leaves(t) for t in (PARAMS, avg.params, state.params))):
        delta = np.asarray(xbar, np.float64) - np.asarray(x0, np.float64)
        # After one step Adam's bias-corrected moments are Delta and Delta^2.
        expected = np.asarray(x0) + 0.01 * delta / (np.abs(delta) + 1e-3)
        np.testing.assert_allclose(np.asarray(x1), expected, rtol=2e-5, atol=1e-6)


def test_round_compiles_once_and_jit_equals_no_jit():
    ds = ragged_dataset([5, 9, 3, 7, 12])
    algo = fs.fedopt(MODEL, optax.sgd(0.1), optax.sgd(1.0, momentum=0.9))
    step = jax.jit(algo.apply)
    state = algo.init(PARAMS)
    eager_state = algo.init(PARAMS)
    n = fs.data.max_local_steps_of(ds, batch_size=4, local_epochs=1)
    rng = np.random.default_rng(0)
    for r in range(6):
        ids = rng.choice(5, size=3, replace=False)
        cohort = cohort_of(ds, ids, num_steps=n, round_num=r)
        key = jax.random.fold_in(KEY, r)
        state, _ = step(state, cohort, key)
        eager_state, _ = algo.apply(eager_state, cohort, key)
    assert step._cache_size() == 1
    assert int(state.round) == 6
    tree_allclose(state.params, eager_state.params, rtol=1e-5, atol=1e-6)
    # The state's structure, shapes and dtypes are those of init.
    assert jax.tree.structure(state) == jax.tree.structure(algo.init(PARAMS))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(algo.init(PARAMS))):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_median_aggregator_ignores_padded_clients():
    updates = {"w": jnp.array([[1.0], [5.0], [3.0], [100.0]])}
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    agg = fs.coordinate_median()
    out, _ = agg.apply(agg.init(None), updates, weights, KEY)
    assert float(out["w"][0]) == 3.0
    mean, _ = fs.weighted_mean().apply((), updates, weights, KEY)
    assert float(mean["w"][0]) == 3.0  # (1 + 5 + 3) / 3
    zero, _ = fs.weighted_mean().apply((), updates, jnp.zeros(4), KEY)
    assert float(zero["w"][0]) == 0.0


def test_transform_client_stage_acts_on_each_client_before_aggregation():
    ds = ragged_dataset([5, 9])
    plain = fs.fedavg(MODEL, optax.sgd(0.5), weighting="uniform")
    # Each client's own delta: a cohort of that client alone (its key is fold_in(KEY, id)
    # whatever the cohort, and padded steps are skipped).
    deltas = []
    for i in (0, 1):
        alone, _ = plain.apply(plain.init(PARAMS), cohort_of(ds, [i]), KEY)
        deltas.append({k: np.asarray(PARAMS[k] - alone.params[k]) for k in PARAMS})
    # Clip client i's delta to +-c * (i + 1): needs the update and the id of every client.
    c = float(np.median(np.abs(deltas[0]["w"])))

    def clip_by_id(update, ctx):
        bound = c * (ctx.client_id + 1).astype(jnp.float32)
        return jax.tree.map(lambda d: jnp.clip(d, -bound, bound), update)

    transform = fs.AggregationTransform(init=lambda params: (), client=clip_by_id)
    algo = fs.fedavg(MODEL, optax.sgd(0.5), weighting="uniform", transforms=(transform,))
    state, _ = algo.apply(algo.init(PARAMS), cohort_of(ds, [0, 1]), KEY)
    for k in PARAMS:
        per_client = [np.clip(d[k], -c * (i + 1), c * (i + 1)) for i, d in enumerate(deltas)]
        expected = np.asarray(PARAMS[k]) - (per_client[0] + per_client[1]) / 2
        np.testing.assert_allclose(state.params[k], expected, rtol=1e-6, atol=1e-7)
        # Clipping the mean instead would give another model: the test tells them apart.
        of_mean = np.asarray(PARAMS[k]) - np.clip((deltas[0][k] + deltas[1][k]) / 2, -c, c)
        assert np.max(np.abs(of_mean - expected)) > 1e-4


def test_transform_server_stage_is_stateful_and_sees_the_aggregate():
    ds = ragged_dataset([5, 9, 7])

    def halve_and_count(aggregate, count, ctx):
        assert ctx.client_ids.shape == (3,)
        return jax.tree.map(lambda a: 0.5 * a, aggregate), count + ctx.num_clients

    transform = fs.AggregationTransform(
        init=lambda params: jnp.zeros((), jnp.float32), server=halve_and_count
    )
    plain = fs.fedavg(MODEL, optax.sgd(0.5))
    algo = fs.fedavg(MODEL, optax.sgd(0.5), transforms=(transform,))
    cohort = cohort_of(ds, [0, 1, 2])
    ref, _ = plain.apply(plain.init(PARAMS), cohort, KEY)
    state, _ = algo.apply(algo.init(PARAMS), cohort, KEY)
    state, _ = jax.jit(algo.apply)(state, cohort, KEY)
    # Round 1: params - mean/2 (server SGD at 1.0 on the halved pseudo-gradient).
    one, _ = algo.apply(algo.init(PARAMS), cohort, KEY)
    for k in PARAMS:
        np.testing.assert_allclose(
            one.params[k], PARAMS[k] - 0.5 * (PARAMS[k] - ref.params[k]), rtol=1e-6, atol=1e-7
        )
    # The transform's state counted 3 real clients in each of the two rounds.
    assert float(state.aggregator_state[1]) == 6.0


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: .*sequential"):
        fs.resolve_strategy("fast")
    with pytest.raises(ValueError, match="known: .*adam"):
        fs.get_optimizer("adamm", 0.1)
    with pytest.raises(ValueError, match="takes no argument"):
        fs.get_optimizer("sgd", 0.1, beta=3)
    with pytest.raises(ValueError, match="known: num_examples, uniform"):
        fs.fedavg(MODEL, optax.sgd(0.1), weighting="size")
    with pytest.raises(ValueError, match="known: .*krum, majority_vote, mean, median"):
        fs.aggregators.get_aggregator("krum2")
    with pytest.raises(ValueError, match=r"known: (.*, )?fedavg, (.*, )?fedopt, (.*, )?fedsgd"):
        fs.algorithms.get_spec("fedprox2")


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("strategy", ["vmap", "chunked", "sequential"])
@pytest.mark.parametrize("algorithm", ["fedopt", "fedsgd", "fedprox_dp"])
def test_sharding_the_cohort_over_devices_gives_the_same_result(devices, strategy, algorithm):
    # conftest.py fakes 4 CPU devices. Gradients w.r.t. the replicated server params must not
    # be summed across devices (the shard_map trap in ../shared/PERF_NOTES.md).
    ds = ragged_dataset([5, 17, 2, 9, 11, 4, 8])
    cohort = cohort_of(ds, [6, 1, 2, 4, 0, 5, 3], num_clients=8, local_epochs=2)
    mesh = fs.client_mesh(devices)

    def make(mesh, strategy):
        if algorithm == "fedsgd":
            return fs.fedsgd(MODEL, optax.adam(0.1), executor=fs.Executor(strategy, mesh=mesh))
        extra = {}
        if algorithm == "fedprox_dp":  # proximal term, clipping and noise under shard_map
            extra = dict(proximal_mu=0.3, clip_norm=0.05, noise_multiplier=0.5)
            extra["weighting"] = "uniform"
        return fs.fedopt(
            MODEL,
            optax.adam(0.05),
            optax.adam(0.1),
            executor=fs.Executor(strategy, mesh=mesh),
            **extra,
        )

    ref_algo, algo = make(None, "sequential"), make(mesh, strategy)
    ref, ref_m = jax.jit(ref_algo.apply)(ref_algo.init(PARAMS), cohort, KEY)
    got, got_m = jax.jit(algo.apply)(algo.init(PARAMS), cohort, KEY)
    tree_allclose(got.params, ref.params, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_m["train_loss"], ref_m["train_loss"], rtol=1e-5)
    assert int(got_m["num_clients"]) == 7


def test_a_cohort_that_does_not_split_over_the_devices_is_an_error():
    ds = ragged_dataset([5, 6, 7])
    algo = fs.fedavg(MODEL, optax.sgd(0.1), executor=fs.Executor(mesh=fs.client_mesh(2)))
    with pytest.raises(ValueError, match="does not split over 2 devices"):
        algo.apply(algo.init(PARAMS), cohort_of(ds, [0, 1, 2]), KEY)


def test_stragglers_run_only_their_step_budget():
    ds = ragged_dataset([9, 13])
    algo = fs.fedavg(MODEL, optax.sgd(0.1, momentum=0.9))
    full = cohort_of(ds, [0, 1], batch_size=2, local_epochs=2)
    limited = fs.data.packing.limit_local_steps(full, [3, 5])
    state, metrics = algo.apply(algo.init(PARAMS), limited, KEY)
    assert float(metrics["num_examples_seen"]) == 3 * 2 + 5 * 2
    # Reference: each client alone, packed with a cap of its budget (same shuffle), averaged
    # with the FedAvg weights of the full clients (9 and 13 examples).
    solo = []
    for i, budget in [(0, 3), (1, 5)]:
        c = cohort_of(ds, [i], batch_size=2, local_epochs=2, max_local_steps=budget)
        s, _ = algo.apply(algo.init(PARAMS), c, KEY)
        solo.append(s.params)
    expected = jax.tree.map(lambda a, b: (9 * a + 13 * b) / 22, *solo)
    tree_allclose(state.params, expected, rtol=1e-5, atol=1e-6)
    # Inside a compiled round, with jax.numpy.
    jitted = jax.jit(lambda c, s: fs.data.packing.limit_local_steps(c, s, xp=jnp))(
        jax.device_put(full), jnp.array([3, 5])
    )
    np.testing.assert_array_equal(np.asarray(jitted.mask), limited.mask)


@pytest.mark.parametrize(
    "name, input_shape, num_classes, x_dtype",
    [
        ("cnn_emnist", (28, 28, 1), 62, np.float32),  # dropout from the client key
        ("lstm_shakespeare", (12,), 80, np.int32),  # a scan over time inside the model
        ("resnet18_gn", (8, 8, 3), 10, np.uint8),  # group norm, strided convs, uint8 input
    ],
)
def test_every_model_family_shards_over_devices(name, input_shape, num_classes, x_dtype):
    model = fs.get_model(name, num_classes=num_classes, input_shape=input_shape)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    clients = {}
    for i in range(4):
        x = rng.integers(0, num_classes if x_dtype == np.int32 else 2, (3, *input_shape))
        clients[f"c{i}"] = {"x": x.astype(x_dtype), "y": rng.integers(0, num_classes, 3)}
    ds = fs.FederatedDataset(clients)
    cohort = cohort_of(ds, [0, 1, 2, 3], batch_size=3)
    results = []
    for mesh in (None, fs.client_mesh(2)):
        algo = fs.fedavg(model, optax.sgd(0.05), executor=fs.Executor(mesh=mesh))
        state, _ = jax.jit(algo.apply)(algo.init(params), cohort, KEY)
        results.append(state.params)
    tree_allclose(results[1], results[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["vmap", "chunked", "sequential"])
@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("algorithm", ["fedopt", "fedsgd"])
def test_lazy_cohort_equals_the_gathered_cohort(strategy, devices, algorithm):
    # Batches gathered step by step from the shared examples train exactly like the cohort
    # gathered whole (bitwise where nothing but the gather changes: one device).
    from fedjax_sim.data.packing import gather_cohort, pack_cohort_indices

    ds = ragged_dataset([5, 17, 2, 9, 11, 4, 8])
    kw = dict(batch_size=4, local_epochs=2, num_clients=8, seed=0, round_num=1)
    indexed = pack_cohort_indices(ds, [6, 1, 2, 4, 0, 5, 3], **kw)
    examples = jax.device_put(ds.all_examples())
    mesh = fs.client_mesh(devices)
    if algorithm == "fedsgd":
        algo = fs.fedsgd(MODEL, optax.adam(0.1), executor=fs.Executor(strategy, mesh=mesh))
    else:
        algo = fs.fedopt(
            MODEL, optax.adam(0.05), optax.sgd(1.0), executor=fs.Executor(strategy, mesh=mesh)
        )
    assert algo.lazy_examples
    apply = jax.jit(algo.apply)
    whole, m1 = apply(algo.init(PARAMS), gather_cohort(examples, indexed, xp=jnp), KEY)
    lazy, m2 = apply(algo.init(PARAMS), indexed._replace(examples=examples), KEY)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(lazy.params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m1["train_loss"], m2["train_loss"])

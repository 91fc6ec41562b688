"""One contract every algorithm meets: jittable, stable state, deterministic, converges; and
every registered algorithm, built from a config, under every strategy on 1 and 2 devices:
strategies agree, its hyperparameters are sweepable (vmapped states equal solo ones), its state
checkpoints and resumes bitwise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint, sweep
from fedjax_sim.data import pack_cohort
from tests import toy_algorithm
from tests.helpers import (
    build_experiment,
    linear_model,
    mean_loss,
    ragged_dataset,
    three_step_cohort,
    with_lora_model,
)

fs.algorithms.register("fedavg_memory", toy_algorithm.SPEC)

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))

PYTHON_API = {
    "fedavg": lambda: fs.fedavg(MODEL, optax.sgd(0.1)),
    "fedavgm": lambda: fs.fedopt(MODEL, optax.sgd(0.1), fs.get_optimizer("momentum", 0.5)),
    "fedadam": lambda: fs.fedopt(MODEL, optax.sgd(0.1), fs.optimizers.fedadam(0.05)),
    "fedyogi": lambda: fs.fedopt(MODEL, optax.sgd(0.1), fs.optimizers.fedyogi(0.05)),
    "fedadagrad": lambda: fs.fedopt(MODEL, optax.sgd(0.1), fs.optimizers.fedadagrad(0.05)),
    "optax_adam_server": lambda: fs.fedopt(MODEL, optax.sgd(0.1), fs.get_optimizer("adam", 0.05)),
    "fedsgd": lambda: fs.fedsgd(MODEL, optax.sgd(1.0)),
    "median": lambda: fs.fedavg(MODEL, optax.sgd(0.1), aggregator=fs.coordinate_median()),
    "fedprox": lambda: fs.fedavg(MODEL, optax.sgd(0.1), proximal_mu=0.1),
    "dp_fedavg": lambda: fs.fedavg(
        MODEL, optax.sgd(0.1), weighting="uniform", clip_norm=1.0, noise_multiplier=0.01
    ),
}


@pytest.mark.parametrize("name", sorted(PYTHON_API))
def test_algorithm_contract(name):
    algo = PYTHON_API[name]()
    ds = ragged_dataset([12, 20, 7, 15, 9, 30], seed=1)
    everything = ds.all_examples()
    n = fs.data.max_local_steps_of(ds, batch_size=5, local_epochs=1)
    step = jax.jit(algo.apply)
    state = algo.init(PARAMS)
    init_struct = jax.tree.structure(state)
    loss0 = float(mean_loss(MODEL, PARAMS, everything["x"], everything["y"]))
    rng = np.random.default_rng(0)
    for r in range(30):
        ids = rng.choice(ds.num_clients, size=4, replace=False)
        cohort = pack_cohort(ds, ids, batch_size=5, num_steps=n, seed=0, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        assert jax.tree.structure(state) == init_struct
        assert np.isfinite(float(metrics["train_loss"]))
    assert step._cache_size() == 1
    loss = float(mean_loss(MODEL, state.params, everything["x"], everything["y"]))
    # A convex problem: 30 rounds must cut the loss by at least a third.
    assert loss < 0.67 * loss0, (loss0, loss)
    # Deterministic: the same inputs give bitwise the same state.
    cohort = pack_cohort(ds, [0, 1, 2, 3], batch_size=5, num_steps=n, seed=0, round_num=99)
    a, _ = step(state, cohort, jax.random.key(7))
    b, _ = step(state, cohort, jax.random.key(7))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dropout_draws_from_the_client_key():
    # A model whose output depends on the key: each client must see fold_in(round_key, id).
    def apply(params, x, *, train, key=None):
        noise = jax.random.normal(key, (x.shape[0], 3)) if train else 0.0
        return x.reshape(x.shape[0], -1) @ params["w"] + noise

    model = fs.Model(
        init=lambda k: {"w": jnp.zeros((5, 3))},
        apply=apply,
        loss=lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y),
        name="noisy",
        input_shape=(5,),
    )
    ds = ragged_dataset([4, 4, 4])
    algo = fs.fedavg(model, optax.sgd(0.1))
    params = model.init(None)
    c1 = pack_cohort(ds, [0, 1, 2], batch_size=4, seed=0, round_num=0)
    c2 = pack_cohort(ds, [2, 0, 1], batch_size=4, seed=0, round_num=0)
    a, _ = algo.apply(algo.init(params), c1, jax.random.key(3))
    b, _ = algo.apply(algo.init(params), c2, jax.random.key(3))
    c, _ = algo.apply(algo.init(params), c1, jax.random.key(4))
    np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6, atol=1e-7)
    assert not np.allclose(a.params["w"], c.params["w"])


# Algorithms whose contract runs on a LoRA model (``tests.helpers.with_lora_model``): FLoRA
# needs one, and FedAvg on one is a case of its own, named ``fedavg+lora``.
ON_LORA = ("flora", "fedavg+lora")


def _registered_config(name, strategy, devices):
    config = fs.load_config("default:smoke")
    if name in ON_LORA:
        with_lora_model(config)
    config.algorithm = name.removesuffix("+lora")
    config.strategy, config.chunk_size, config.num_devices = strategy, 3, devices
    config.dataset.kwargs.num_clients = 8
    config.clients_per_round = 4
    config.client.local_epochs, config.client.max_local_steps = 1, 3
    config.client.kwargs.momentum = 0.5  # a client hyperparameter besides the learning rate
    if name == "fedopt":
        config.server.optimizer, config.server.learning_rate = "fedadam", 0.03
    if name in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        # Reddi et al.'s names refuse client momentum (their clients run plain SGD).
        config.client.kwargs.momentum = 0.0
        config.server.learning_rate = 0.5 if name == "fedavgm" else 0.03
    if name in ("fedper", "fedrep"):
        config.model.name = "mlp"  # a shared body below the personal head (logreg has none)
    if name == "fedrep":
        config.algorithm_kwargs.head_epochs = 2.0  # the sweep check halves it to 1.0
    return config


def _cohorts(exp, rounds):
    n = exp.data.train.num_clients
    return [three_step_cohort(exp, fs.driver.cohorts.sample_clients(0, r, n, 4), r) for r in rounds]


def _run(step, state, cohorts, first_round=1):
    for r, cohort in enumerate(cohorts, first_round):
        state, metrics = step(state, cohort, jax.random.key(r))
        assert np.isfinite(float(metrics["train_loss"]))
    return state


# Params after four rounds on one device, by (algorithm, strategy): the references the cases
# compare with. A one-device case leaves its own params here, so a later case in the same
# worker that needs that run as its reference does not compile and run it again.
_ONE_DEVICE_PARAMS = {}


def _one_device_params(name, strategy):
    """Four rounds on one device with ``strategy``."""
    if (name, strategy) not in _ONE_DEVICE_PARAMS:
        exp = build_experiment(_registered_config(name, strategy, 1))
        state = exp.algorithm.init(exp.model.init(jax.random.key(0)))
        state = _run(jax.jit(exp.algorithm.apply), state, _cohorts(exp, range(1, 5)))
        _ONE_DEVICE_PARAMS[name, strategy] = state.params
    return _ONE_DEVICE_PARAMS[name, strategy]


def _assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


# Every strategy on 1 and 2 devices for the algorithms the executor was built around; the
# others (each compared to its sequential one-device run) on one device vmapped (where the
# sweep checks run) and on two devices chunked and sequential (shard_map with their own
# broadcasts and per-client state); the Reddi names are fedopt with another server optimizer
# (fedopt's cases cover its code), so one case each, as FedAvg on a LoRA model (fedavg's code
# on a transformer's adapters). Keeps the suite's time in CI bounded.
EVERY_CASE = ("fedavg", "fedopt", "fedsgd")
ONE_CASE = ("fedadagrad", "fedadam", "fedavgm", "fedyogi", "fedavg+lora")
ALL_CASES = [(s, d) for d in (1, 2) for s in ("vmap", "chunked", "sequential")]


def _cases():
    for name in sorted([*fs.algorithms.ALGORITHMS, "fedavg+lora"]):
        if name in EVERY_CASE:
            cases = ALL_CASES
        elif name in ONE_CASE:
            cases = [("vmap", 1)]
        else:
            cases = [("vmap", 1), ("chunked", 2), ("sequential", 2)]
        # One worker runs an algorithm's cases, so its one-device references are computed once.
        group = pytest.mark.xdist_group(f"contract-{name}")
        yield from (pytest.param(name, s, d, marks=group) for s, d in cases)


@pytest.mark.parametrize("name, strategy, devices", list(_cases()))
def test_every_registered_algorithm(name, strategy, devices, tmp_path):
    spec = fs.algorithms.get_spec(name.removesuffix("+lora"))
    config = _registered_config(name, strategy, devices)
    exp = build_experiment(config)
    algo = exp.algorithm
    assert exp.executor.num_devices == devices and exp.strategy == strategy
    # Its spec names the hyperparameters the state keeps, as float32 scalars.
    assert set(algo.hparams) == set(spec.hparams(config)) and algo.hparams
    params = exp.model.init(jax.random.key(0))
    # The algorithm places its state where its rounds return it (one compilation below).
    state0 = algo.init(params)
    assert set(state0.hparams) == set(algo.hparams)
    assert all(v.dtype == jnp.float32 and v.shape == () for v in state0.hparams.values())
    cohorts = _cohorts(exp, range(1, 5))

    # Jittable, one trace, the state's structure, shapes and dtypes stable, deterministic.
    step = jax.jit(algo.apply)
    state = _run(step, state0, cohorts)
    assert step._cache_size() == 1
    shapes = lambda t: [(a.shape, a.dtype) for a in jax.tree.leaves(t)]
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    assert shapes(state) == shapes(state0)
    again = _run(step, fs.replicate(algo.init(params), exp.mesh), cohorts)
    _assert_bitwise(state, again)

    # Every strategy and device count agrees with the sequential one-device run, and that run
    # itself with the vmapped one-device run: never a run with a rebuild of itself. Vectorizing
    # reorders sums, compounded over four rounds: about 1e-5.
    if devices == 1:
        _ONE_DEVICE_PARAMS.setdefault((name, strategy), state.params)
    reference = "vmap" if (strategy, devices) == ("sequential", 1) else "sequential"
    expected = _one_device_params(name, reference)
    assert jax.tree.structure(state.params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)

    # Resumable: a checkpoint after round 2 restores bitwise and rounds 3-4 then match.
    mid = _run(step, fs.replicate(algo.init(params), exp.mesh), cohorts[:2])
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(2, mid, {"round": 2})
    restored = fs.replicate(ckpt.restore_state(2, mid), exp.mesh)
    ckpt.close()
    _assert_bitwise(restored, mid)
    resumed = _run(step, restored, cohorts[2:], first_round=3)
    _assert_bitwise(resumed, state)

    if devices == 1:
        # Sweepable: states whose hparams differ, vmapped in one program, equal solo runs.
        other = {k: v * 0.5 for k, v in state0.hparams.items()}
        members = [state0, state0._replace(hparams=other)]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
        vstep = jax.jit(jax.vmap(algo.apply, in_axes=(0, None, None)))
        for r, cohort in enumerate(cohorts[:2], 1):
            stacked, _ = vstep(stacked, cohort, jax.random.key(r))
        solo = [_run(step, m, cohorts[:2]) for m in members]
        for i, s in enumerate(solo):
            got = jax.tree.map(lambda a, i=i: a[i], stacked.params)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(s.params)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # A member's own config starts where the shared init with its hparams swapped in does:
        # no declared hyperparameter shapes the initial state (FedAdam's tau would).
        own_config = _registered_config(name, strategy, 1)
        for path, value in other.items():
            sweep._set(own_config, path, float(value))
        own = build_experiment(own_config).algorithm.init(params)
        # (The injected copies inside optimizer states differ; every round overwrites them.)
        own_next, swapped_next = (
            step(s, cohorts[0], jax.random.key(1))[0] for s in (own, members[1])
        )
        _assert_bitwise(own_next.params, swapped_next.params)
        # The halved hyperparameters changed the result (the axis is not ignored).
        assert any(
            not np.allclose(a, b) for a, b in zip(*(jax.tree.leaves(s.params) for s in solo))
        )


@pytest.mark.parametrize("name", sorted(fs.algorithms.BUILT_IN))
def test_every_algorithm_trains_the_adapters_of_a_frozen_base(name):
    """Each registered algorithm, built from a config over a LoRA model: two rounds train the
    adapters (the only parameters the algorithm sees; FLoRA keeps its merged deltas beside
    them) and leave the state's structure unchanged."""
    config = fs.load_config("default:smoke")
    fs.algorithms.switch_algorithm(config, name)
    # FedPer and FedRep: two blocks, a shared body below the personal head.
    with_lora_model(config, num_layers=2 if name in ("fedper", "fedrep") else 1)
    config.clients_per_round = 4
    exp = build_experiment(config)
    assert exp.model.frozen is not None and exp.model.name == "transformer+lora"
    adapters = exp.model.init(jax.random.key(1))
    assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(adapters)} == {
        "lora_a",
        "lora_b",
    }
    start = exp.algorithm.init(adapters)
    step = jax.jit(exp.algorithm.apply)
    state = _run(step, start, _cohorts(exp, range(1, 3)))
    assert jax.tree.structure(state) == jax.tree.structure(start)
    assert _differs(state.params, start.params)


def _differs(a, b):
    return any(
        np.asarray(x).tobytes() != np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )

"""Reddi et al. 2021's names (fedadam, fedyogi, fedadagrad, fedavgm) are fedopt with the
server optimizer fixed and momentum-free SGD clients: bitwise the same training, the paper's
defaults, every number configurable, other optimizers refused."""

import functools

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import sweep
from fedjax_sim.algorithms import adaptive
from fedjax_sim.algorithms.adaptive import SERVER_OPTIMIZERS
from fedjax_sim.core.task import as_task
from fedjax_sim.data import pack_cohort
from tests.helpers import linear_model, ragged_dataset

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
DS = ragged_dataset([5, 9, 3, 7, 6], seed=2)
STEPS = fs.data.max_local_steps_of(DS, batch_size=2, local_epochs=1)
COHORTS = [
    pack_cohort(DS, ids, batch_size=2, num_steps=STEPS, num_clients=3, seed=0, round_num=r)
    for r, ids in enumerate([[0, 2, 4], [1, 3], [4, 2, 0]])
]
NAMES = sorted(SERVER_OPTIMIZERS)


def _config(name, **server):
    config = fs.load_config("default:smoke")
    config.algorithm = name
    config.client.learning_rate = 0.1
    config.server.learning_rate = 0.05
    for k, v in server.items():
        sweep._set(config, f"server.{k}", v)
    return config


def _build(config):
    ctx = fs.BuildContext(as_task(MODEL), fs.Executor("sequential"), DS.num_clients)
    return fs.algorithms.get_spec(config.algorithm).build(config, ctx)


def _train(algo):
    step = jax.jit(algo.apply)
    state = algo.init(PARAMS)
    for r, cohort in enumerate(COHORTS):
        state, _ = step(state, cohort, jax.random.key(r))
    return state


def _assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@functools.cache
def _trained_by_name(name):
    return _train(_build(_config(name)))


def _as_fedopt(config):
    """The config ``fedavg.build`` receives, with ``algorithm`` set aside."""
    name = config.algorithm
    out = adaptive.paper_config(config, name) if name in SERVER_OPTIMIZERS else config
    return {k: v for k, v in out.to_dict().items() if k != "algorithm"}


@pytest.mark.parametrize("name", NAMES)
def test_each_name_is_fedopt_with_its_server_optimizer(name):
    config = _config(name)
    fedopt_config = _config("fedopt", optimizer=SERVER_OPTIMIZERS[name])
    spec = fs.algorithms.get_spec(name)
    assert spec.hparams(config) == fs.algorithms.get_spec("fedopt").hparams(fedopt_config)
    by_name = _trained_by_name(name)
    _assert_bitwise(by_name, _train(_build(fedopt_config)))
    # Three rounds moved the model (the comparison is not between two no-ops).
    assert not np.allclose(by_name.params["w"], PARAMS["w"])
    # Naming the same server optimizer explicitly hands fedavg.build the same config.
    explicit = _config(name, optimizer=SERVER_OPTIMIZERS[name])
    assert _as_fedopt(explicit) == _as_fedopt(config) == _as_fedopt(fedopt_config)


def test_the_papers_defaults_and_every_number_is_configurable():
    hp = {n: fs.algorithms.get_spec(n).hparams(_config(n)) for n in NAMES}
    # beta1 = 0.9, beta2 = 0.99 for FedAdam and FedYogi; server momentum 0.9 for FedAvgM.
    for n in ("fedadam", "fedyogi"):
        assert hp[n]["server.kwargs.b1"] == pytest.approx(0.9)
        assert hp[n]["server.kwargs.b2"] == pytest.approx(0.99)
    assert hp["fedavgm"]["server.kwargs.momentum"] == pytest.approx(0.9)
    assert hp["fedadam"]["server.learning_rate"] == pytest.approx(0.05)
    # tau shapes the initial state (v starts at tau^2 = 1e-6), so it is not vectorized.
    for n in ("fedadam", "fedyogi", "fedadagrad"):
        assert "server.kwargs.tau" not in hp[n]
        v = _build(_config(n)).init(PARAMS).opt_state.inner_state.v["b"]
        np.testing.assert_allclose(v, np.full_like(v, 1e-6), rtol=1e-6)
    # Config numbers override the defaults: fedavg.build gets fedopt's config with them.
    tuned = _config("fedadam", **{"kwargs.b1": 0.5, "kwargs.tau": 0.01})
    assert fs.algorithms.get_spec("fedadam").hparams(tuned)["server.kwargs.b1"] == 0.5
    same = _config("fedopt", optimizer="fedadam", **{"kwargs.b1": 0.5, "kwargs.tau": 0.01})
    assert _as_fedopt(tuned) == _as_fedopt(same)
    v = _build(tuned).init(PARAMS).opt_state.inner_state.v["b"]
    np.testing.assert_allclose(v, np.full_like(v, 1e-4), rtol=1e-6)  # tau^2
    nesterov = _config("fedavgm", **{"kwargs.momentum": 0.5, "kwargs.nesterov": True})
    assert float(_build(nesterov).init(PARAMS).hparams["server.kwargs.momentum"]) == 0.5
    same = _config("fedopt", optimizer="momentum", **{"kwargs.momentum": 0.5})
    sweep._set(same, "server.kwargs.nesterov", True)
    assert _as_fedopt(nesterov) == _as_fedopt(same)


def test_python_factories_are_fedopt_with_reddis_defaults():
    sgd = lambda lr: fs.get_optimizer("sgd", lr, inject=True)
    server = lambda name, **kw: fs.get_optimizer(name, 0.05, inject=True, **kw)
    lrs = {"client_learning_rate": 0.1, "server_learning_rate": 0.05}
    pairs = {
        "fedadam": (
            fs.fedadam(MODEL, **lrs),
            fs.fedopt(MODEL, sgd(0.1), server("fedadam", b1=0.9, b2=0.99, tau=1e-3)),
        ),
        "fedyogi": (
            fs.fedyogi(MODEL, **lrs),
            fs.fedopt(MODEL, sgd(0.1), server("fedyogi", b1=0.9, b2=0.99, tau=1e-3)),
        ),
        "fedadagrad": (
            fs.fedadagrad(MODEL, **lrs),
            fs.fedopt(MODEL, sgd(0.1), server("fedadagrad", tau=1e-3)),
        ),
        "fedavgm": (
            fs.fedavgm(MODEL, **lrs),
            fs.fedopt(MODEL, sgd(0.1), server("momentum", momentum=0.9)),
        ),
    }
    for algo, ref in pairs.values():
        # The same hyperparameters (the defaults injected) and bitwise the same initial state.
        assert algo.hparams == ref.hparams
        _assert_bitwise(algo.init(PARAMS), ref.init(PARAMS))
    # The factory trains bitwise like the registered name with the same numbers (its state
    # also keeps tau, which a config's leaves out: it shapes the initial state).
    trained = _train(pairs["fedadam"][0])
    _assert_bitwise(trained.params, _trained_by_name("fedadam").params)
    _assert_bitwise(
        trained.opt_state.inner_state, _trained_by_name("fedadam").opt_state.inner_state
    )


@pytest.mark.parametrize("name", NAMES)
def test_another_server_optimizer_is_refused(name):
    other = "fedyogi" if name == "fedadam" else "adam"
    config = _config(name, optimizer=other)
    message = f"algorithm='{name}' fixes the server optimizer"
    with pytest.raises(ValueError, match=message):
        fs.algorithms.get_spec(name).hparams(config)
    with pytest.raises(ValueError, match=message):
        _build(config)


@pytest.mark.parametrize(
    "field, value",
    [
        ("client.kwargs.momentum", 0.5),
        ("client.optimizer", "adam"),
        ("client.kwargs.nesterov", True),
    ],
)
def test_clients_that_are_not_momentum_free_sgd_are_refused(field, value):
    config = _config("fedadam")
    sweep._set(config, field, value)
    with pytest.raises(ValueError, match="momentum-free SGD on the clients"):
        _build(config)
    # Momentum 0 is plain SGD: accepted.
    config = _config("fedadam")
    config.client.kwargs.momentum = 0.0
    assert "client.kwargs.momentum" in fs.algorithms.get_spec("fedadam").hparams(config)

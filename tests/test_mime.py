"""Mime and MimeLite (Karimireddy et al. 2021, Algorithm 1) against references written from the
paper, plus their invariants and refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.algorithms.base import BuildContext
from fedjax_sim.core.task import as_task
from fedjax_sim.data import pack_cohort
from tests.helpers import linear_model, ragged_dataset, tree_allclose

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
PARAMS64 = jax.tree.map(lambda a: np.asarray(a, np.float64), PARAMS)  # for the references
SIZES = [5, 9, 3, 7]
KEY = jax.random.key(3)


def GRAD(params, x, y):
    """The gradient of the linear model's mean cross-entropy, in float64 NumPy:
    softmax(x w + b) - onehot(y), averaged over the examples."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    x = np.asarray(x, np.float64)
    logits = x @ w + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    err = (p - np.eye(w.shape[1])[np.asarray(y)]) / len(x)
    return {"b": err.sum(0), "w": x.T @ err}


def momentum(lr, beta):
    return fs.get_optimizer("momentum", lr, inject=True, momentum=beta)


def tree_mean(trees, weights):
    w = np.asarray(weights, np.float32) / np.sum(weights)
    return jax.tree.map(lambda *a: sum(wi * ai for wi, ai in zip(w, a)), *trees)


def cohorts_of(ds, rounds, **kw):
    ids = list(range(ds.num_clients))  # full participation
    return [pack_cohort(ds, ids, seed=0, round_num=r, **kw) for r in range(1, rounds + 1)]


def full_batch_grads(ds, x, ids):
    """grad f_i(x) on each client's whole dataset (what whole local epochs average to)."""
    return [GRAD(x, ds.client(int(i))["x"], ds.client(int(i))["y"]) for i in ids]


def mime_by_hand(ds, cohorts, *, lite, lr, beta, server_lr):
    """Algorithm 1 with the heavy-ball base optimizer in Optax's convention: U(g, m) =
    lr * (beta * m + g), V(g, m) = beta * m + g; uniform means over the cohort."""
    x = PARAMS64
    m = jax.tree.map(np.zeros_like, x)
    for cohort in cohorts:
        ids = np.asarray(cohort.client_ids)
        grads = full_batch_grads(ds, x, ids)
        c = tree_mean(grads, np.ones(len(ids)))  # c = 1/|S| sum_j grad f_j(x)
        ys = []
        for row in range(len(ids)):
            y = x
            for s in range(cohort.num_steps):
                mask = np.asarray(cohort.mask[row, s])
                if not mask.any():
                    continue  # padded step: skipped
                bx, by = cohort.batches["x"][row, s][mask], cohort.batches["y"][row, s][mask]
                g = GRAD(y, bx, by)
                if not lite:  # Mime: g = grad f_i(y; z) - grad f_i(x; z) + c
                    g = jax.tree.map(lambda a, b, cc: a - b + cc, g, GRAD(x, bx, by), c)
                # y <- y - U(g, m), m fixed on the client
                y = jax.tree.map(lambda y, g, m: y - lr * (beta * m + g), y, g, m)
            ys.append(y)
        # s <- V(mean_i grad f_i(x), s); x <- x - server_lr * mean_i (x - y_i)
        m = jax.tree.map(lambda m, g: beta * m + g, m, c)
        delta = tree_mean([jax.tree.map(np.subtract, x, y) for y in ys], np.ones(len(ys)))
        x = jax.tree.map(lambda x, d: x - server_lr * d, x, delta)
    return x, m


def run(algo, cohorts):
    step = jax.jit(algo.apply)
    state = algo.init(PARAMS)
    for r, cohort in enumerate(cohorts):
        state, metrics = step(state, cohort, jax.random.fold_in(KEY, r))
        assert np.isfinite(float(metrics["train_loss"]))
    assert step._cache_size() == 1
    return state


def trace_of(opt_state):
    """The momentum buffer inside an injected ``sgd(momentum=...)`` state."""
    (trace, _) = opt_state.inner_state
    return trace.trace


@pytest.mark.parametrize("lite", [False, True], ids=["mime", "mimelite"])
@pytest.mark.parametrize(
    "batching, strategy",
    [
        # Full batch: each local step is the client's whole dataset, three local epochs.
        ({"batch_size": 16, "local_epochs": 3}, "sequential"),
        # Ragged minibatches: partial last batches and padded steps for the small clients.
        ({"batch_size": 3, "local_epochs": 1}, "vmap"),
    ],
    ids=["full_batch", "minibatch"],
)
def test_matches_algorithm_1_by_hand(lite, batching, strategy):
    ds = ragged_dataset(SIZES)
    cohorts = cohorts_of(ds, 3, **batching)
    factory = fs.mimelite if lite else fs.mime
    algo = factory(
        MODEL, momentum(0.1, 0.6), server_learning_rate=0.8, executor=fs.Executor(strategy)
    )
    state = run(algo, cohorts)
    x, m = mime_by_hand(ds, cohorts, lite=lite, lr=0.1, beta=0.6, server_lr=0.8)
    tree_allclose(state.params, x, rtol=1e-5, atol=1e-6)
    tree_allclose(trace_of(state.opt_state), m, rtol=1e-5, atol=1e-6)
    assert int(state.round) == 3


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_mimelite_with_plain_sgd_is_fedavg(weighting):
    # SGD has no state: U(g, s) = lr * g, so each client runs plain local SGD and the server
    # step x - server_lr * mean delta is FedAvg's with the same weighting.
    ds = ragged_dataset(SIZES)
    cohorts = cohorts_of(ds, 3, batch_size=3, local_epochs=2)
    sgd = fs.get_optimizer("sgd", 0.1, inject=True)
    lite = run(fs.mimelite(MODEL, sgd, server_learning_rate=0.7, weighting=weighting), cohorts)
    avg = run(fs.fedavg(MODEL, sgd, server_learning_rate=0.7, weighting=weighting), cohorts)
    tree_allclose(lite.params, avg.params, rtol=1e-6, atol=1e-7)


def test_mime_one_full_batch_step_is_one_centralized_step():
    # One local step on the whole client dataset starts at y = x, so the correction cancels:
    # g = grad f_i(x) - grad f_i(x) + c = c for every client, y_i = x - U(c, s) is the same for
    # all, and the round is x <- x - U(c, s), s <- V(c, s): the base optimizer stepped once,
    # centrally, on c. With example weighting c is the gradient of the mean loss over the
    # union of the clients' data: heavy-ball gradient descent on it,
    #   m <- beta m + grad F(x);  x <- x - lr m.
    ds = ragged_dataset(SIZES)
    cohorts = cohorts_of(ds, 4, batch_size=16, local_epochs=1)
    algo = fs.mime(MODEL, momentum(0.3, 0.5), weighting="num_examples")
    state = run(algo, cohorts)
    everything = ds.all_examples()
    x, m = PARAMS64, jax.tree.map(np.zeros_like, PARAMS64)
    for _ in cohorts:
        g = GRAD(x, everything["x"], everything["y"])
        m = jax.tree.map(lambda m, g: 0.5 * m + g, m, g)
        x = jax.tree.map(lambda x, m: x - 0.3 * m, x, m)
    tree_allclose(state.params, x, rtol=1e-5, atol=1e-6)
    tree_allclose(trace_of(state.opt_state), m, rtol=1e-5, atol=1e-6)


def test_mime_one_full_batch_step_with_adam_is_centralized_adam():
    # The same with a base optimizer whose step is not linear in g (where MimeLite, stepping
    # each client on its own grad f_i(x), would differ): uniform weights, c = the mean of the
    # clients' gradients, and every round one Optax Adam step on c.
    ds = ragged_dataset(SIZES)
    cohorts = cohorts_of(ds, 3, batch_size=16, local_epochs=1)
    adam = fs.get_optimizer("adam", 0.05, inject=True, b1=0.8, b2=0.9)
    state = run(fs.mime(MODEL, adam), cohorts)
    x, s = PARAMS, adam.init(PARAMS)
    for _ in cohorts:
        c = tree_mean(full_batch_grads(ds, x, range(ds.num_clients)), np.ones(ds.num_clients))
        with jax.numpy_dtype_promotion("standard"):  # Optax's Adam mixes int32 and floats
            updates, s = adam.update(jax.tree.map(jnp.float32, c), s, x)
        x = optax.apply_updates(x, updates)
    tree_allclose(state.params, x, rtol=1e-5, atol=1e-6)
    tree_allclose(state.opt_state, s, rtol=1e-5, atol=1e-7)
    lite = run(fs.mimelite(MODEL, adam), cohorts)
    assert not np.allclose(lite.params["w"], x["w"], rtol=1e-3)


@pytest.mark.parametrize("lite", [False, True], ids=["mime", "mimelite"])
def test_server_state_is_the_base_optimizer_stepped_on_the_mean_full_batch_gradient(lite):
    # Adam's moments (and its step count) after a round are those of one Adam step on
    # mean_i grad f_i(x), however many local steps the clients took with the state fixed.
    # With max_local_steps=2 a client's full-batch gradient averages the examples of its two
    # real steps only (every real example slot of its packed steps).
    ds = ragged_dataset(SIZES)
    ids = [2, 0, 3]
    cohort = pack_cohort(ds, ids, batch_size=2, max_local_steps=2, seed=0, round_num=1)
    adam = fs.get_optimizer("adam", 0.05, inject=True, b1=0.8, b2=0.9)
    factory = fs.mimelite if lite else fs.mime
    state = run(factory(MODEL, adam), [cohort])
    grads = []
    for row in range(len(ids)):
        mask = np.asarray(cohort.mask[row]).reshape(-1)
        bx = np.asarray(cohort.batches["x"][row]).reshape(-1, 5)[mask]
        by = np.asarray(cohort.batches["y"][row]).reshape(-1)[mask]
        assert len(by) == min(4, SIZES[ids[row]])
        grads.append(GRAD(PARAMS, bx, by))
    mean_grad = jax.tree.map(jnp.float32, tree_mean(grads, np.ones(3)))
    with jax.numpy_dtype_promotion("standard"):  # Optax's Adam mixes int32 counts and floats
        _, expected = adam.update(mean_grad, adam.init(PARAMS), PARAMS)
    tree_allclose(state.opt_state, expected, rtol=1e-5, atol=1e-7)
    assert int(state.opt_state.inner_state[0].count) == 1


def test_hyperparameters_are_the_base_optimizers_and_the_server_learning_rate():
    algo = fs.mime(MODEL, fs.get_optimizer("adam", 0.05, inject=True, b1=0.8))
    assert set(algo.hparams) == {
        "client.learning_rate",
        "client.kwargs.b1",
        "client.kwargs.b2",
        "client.kwargs.eps",
        "client.kwargs.eps_root",
        "server.learning_rate",
    }
    config = fs.load_config("default:smoke")
    config.algorithm = "mimelite"
    config.client.optimizer, config.client.kwargs.momentum = "momentum", 0.7
    config.server.learning_rate = 0.5
    hp = fs.algorithms.get_spec("mimelite").hparams(config)
    assert hp == {
        "client.learning_rate": 0.01,
        "client.kwargs.momentum": 0.7,
        "server.learning_rate": 0.5,
    }


def _build(name, **fields):
    config = fs.load_config("default:smoke")
    config.algorithm = name
    for path, value in fields.items():
        group, _, key = path.rpartition("__")
        (config[group] if group else config)[key] = value
    ctx = BuildContext(task=as_task(MODEL), executor=fs.Executor(), num_clients=4)
    return fs.algorithms.build(config, ctx)


@pytest.mark.parametrize("name", ["mime", "mimelite"])
def test_bad_input_is_refused(name):
    with pytest.raises(ValueError, match=r"unknown base optimizer 'nesterov'.*known:.*adam"):
        _build(name, client__optimizer="nesterov")
    with pytest.raises(ValueError, match=r"base optimizer.*config.client.optimizer.*'sgd'"):
        _build(name, server__optimizer="adam")
    with pytest.raises(ValueError, match=r"does not support proximal_term \(client.proximal_mu"):
        _build(name, client__proximal_mu=0.1)
    # The deltas go through the pipeline (a robust reducer, model poisoning, compression);
    # the gradients averaged beside it would be left unprotected by DP or secure aggregation.
    assert _build(name, aggregator="median").hparams == _build(name).hparams
    with pytest.raises(ValueError, match=r"does not support dp \(dp.clip_norm"):
        _build(name, dp__clip_norm=0.1)
    with pytest.raises(ValueError, match=r"does not support secure_aggregation \(aggregator"):
        _build(name, aggregator="secure")
    factory = getattr(fs, name)
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"server_learning_rate must be >= 0"):
        factory(MODEL, sgd, server_learning_rate=-1.0)
    with pytest.raises(ValueError, match=r"unknown weighting 'size'; known: num_examples"):
        factory(MODEL, sgd, weighting="size")
    with pytest.raises(TypeError, match=r"optax.GradientTransformation"):
        factory(MODEL, "adam")
    with pytest.raises(ValueError, match=r"unknown hyperparameter"):
        factory(MODEL, sgd, hparams={"client.kwargs.beta": 0.5})

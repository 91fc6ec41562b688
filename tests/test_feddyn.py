"""FedDyn (Acar et al. 2021, Algorithm 1) against a NumPy transcription of the paper, its
invariants, padded and dropped clients, a sweep over alpha, and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import sweep
from fedjax_sim.data import pack_cohort
from tests.helpers import linear_model, ragged_dataset, tree_allclose

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
LR = 0.1
ALPHA = 0.1
SIZES = [5, 9, 3, 7, 6, 4]  # six clients (m = 6); client 5 is never sampled below
ROUNDS = [[0, 2], [2, 4, 1], [1, 2, 3], [4, 0]]  # partial participation, some slots padded


def _client_sgd():
    return fs.get_optimizer("sgd", LR, inject=True)


def _grad_np(w, b, x, y):
    """Gradient of the mean softmax cross-entropy of ``x @ w + b``, written out."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0  # d loss / d logits = softmax - onehot
    p /= len(y)
    return x.T @ p, p.sum(0)


def feddyn_by_hand(ds, rounds, steps, alpha):
    """Algorithm 1 of the paper in float64 NumPy, every client trained alone, step by step."""
    m = ds.num_clients
    theta = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    h = {k: np.zeros_like(v) for k, v in theta.items()}
    grad_mem = [{k: np.zeros_like(v) for k, v in theta.items()} for _ in range(m)]
    for r, ids in enumerate(rounds):
        cohort = pack_cohort(ds, ids, batch_size=2, num_steps=steps, seed=0, round_num=r)
        models = []
        for row, k in enumerate(ids):
            w, b = theta["w"].copy(), theta["b"].copy()
            for s in range(steps):
                mask = np.asarray(cohort.mask[row, s])
                if not mask.any():
                    continue
                x = np.asarray(cohort.batches["x"][row, s][mask], np.float64)
                y = np.asarray(cohort.batches["y"][row, s][mask])
                gw, gb = _grad_np(w, b, x, y)
                # grad of L_k(th) - <grad L_k(th_k^{t-1}), th> + alpha/2 ||th - th^{t-1}||^2
                gw = gw - grad_mem[k]["w"] + alpha * (w - theta["w"])
                gb = gb - grad_mem[k]["b"] + alpha * (b - theta["b"])
                w, b = w - LR * gw, b - LR * gb
            new = {"w": w, "b": b}
            # grad L_k(th_k^t) = grad L_k(th_k^{t-1}) - alpha (th_k^t - th^{t-1})
            grad_mem[k] = {n: grad_mem[k][n] - alpha * (new[n] - theta[n]) for n in new}
            models.append(new)
        # h^t = h^{t-1} - alpha/m sum_{P_t} (th_k^t - th^{t-1})
        # th^t = mean_{P_t} th_k^t - h^t / alpha
        h = {n: h[n] - alpha / m * sum(mod[n] - theta[n] for mod in models) for n in h}
        theta = {n: sum(mod[n] for mod in models) / len(models) - h[n] / alpha for n in theta}
    return theta, h, grad_mem


def _run(algo, ds, rounds, steps, slots, mesh=None):
    step = jax.jit(algo.apply)
    state = fs.replicate(algo.init(PARAMS), mesh)
    for r, ids in enumerate(rounds):
        cohort = pack_cohort(
            ds, ids, batch_size=2, num_steps=steps, num_clients=slots, seed=0, round_num=r
        )
        state, metrics = step(state, cohort, jax.random.key(r))
        assert np.isfinite(float(metrics["train_loss"]))
    assert step._cache_size() == 1
    return state


@pytest.mark.parametrize("strategy, devices", [("sequential", 1), ("vmap", 2)])
def test_matches_the_paper_by_hand(strategy, devices):
    ds = ragged_dataset(SIZES)
    steps = fs.data.max_local_steps_of(ds, batch_size=2, local_epochs=1)
    mesh = fs.client_mesh(devices)
    algo = fs.feddyn(
        MODEL,
        _client_sgd(),
        num_clients=ds.num_clients,
        alpha=ALPHA,
        executor=fs.Executor(strategy, mesh=mesh),
    )
    assert set(algo.hparams) == {"algorithm_kwargs.alpha", "client.learning_rate"}
    state = _run(algo, ds, ROUNDS, steps, slots=4, mesh=mesh)
    theta, h, grad_mem = feddyn_by_hand(ds, ROUNDS, steps, ALPHA)
    tree_allclose(state.params, theta, rtol=1e-5, atol=1e-5)
    tree_allclose(state.h, h, rtol=1e-5, atol=1e-6)
    for k in range(ds.num_clients):
        row = jax.tree.map(lambda a, k=k: a[k], state.client_states)
        tree_allclose(row, grad_mem[k], rtol=1e-5, atol=1e-6)
    # Client 5 never took part: its memory is exactly zero.
    assert not any(np.any(np.asarray(a[5])) for a in jax.tree.leaves(state.client_states))
    # Invariant: h^t = 1/m sum_k grad L_k(theta_k^t) over all m clients. Both start at 0, and
    # each round adds alpha/m sum_{P_t} (theta^{t-1} - theta_k^t) to either side.
    tree_allclose(
        state.h,
        jax.tree.map(lambda a: jnp.mean(a, axis=0), state.client_states),
        rtol=1e-5,
        atol=1e-7,
    )
    assert int(state.round) == len(ROUNDS)


def test_first_round_is_fedprox_with_server_step_one_plus_cohort_share():
    # Round 1 has h = 0 and grad L_k = 0: each client minimizes L_k + alpha/2 ||th - th^0||^2,
    # FedProx's objective with mu = alpha. Then h^1 = alpha n/m D with D = th^0 - mean th_k
    # (n = |P_1|), so th^1 = th^0 - D - h^1/alpha = th^0 - (1 + n/m) D: FedProx with uniform
    # weights and a server SGD step of 1 + n/m. Here n = 3 of m = 6: a step of 1.5.
    ds = ragged_dataset(SIZES)
    cohort = pack_cohort(ds, [1, 3, 4], batch_size=2, num_clients=4, seed=0, round_num=0)
    dyn = fs.feddyn(MODEL, _client_sgd(), num_clients=6, alpha=ALPHA)
    got, _ = jax.jit(dyn.apply)(dyn.init(PARAMS), cohort, jax.random.key(1))
    prox = fs.fedopt(MODEL, _client_sgd(), optax.sgd(1.5), weighting="uniform", proximal_mu=ALPHA)
    want, _ = jax.jit(prox.apply)(prox.init(PARAMS), cohort, jax.random.key(1))
    tree_allclose(got.params, want.params, rtol=1e-6, atol=1e-7)
    # h^1 = alpha * n/m * D = alpha/m * sum_k (th^0 - th_k), and D = (th^0 - th^1) / 1.5.
    d = jax.tree.map(lambda a, b: (a - b) / 1.5, PARAMS, want.params)
    tree_allclose(got.h, jax.tree.map(lambda x: ALPHA * 0.5 * x, d), rtol=1e-5, atol=1e-7)


def test_dropped_and_padded_clients_change_nothing():
    ds = ragged_dataset(SIZES)
    algo = fs.feddyn(MODEL, _client_sgd(), num_clients=6, alpha=ALPHA)
    step = jax.jit(algo.apply)
    pack = lambda ids, r: pack_cohort(
        ds, ids, batch_size=2, num_steps=5, num_clients=3, seed=0, round_num=r
    )
    # One round first, so that h and the memories are not zero.
    state, _ = step(algo.init(PARAMS), pack([0, 4], 0), jax.random.key(0))
    two, three = pack([1, 2], 1), pack([1, 2, 4], 1)
    # Client 4 is sampled but drops out: its mask is cut to nothing (its size still counts).
    dropped = three._replace(mask=three.mask.copy())
    dropped.mask[2] = False
    assert dropped.num_examples[2] > 0
    a, _ = step(state, two, jax.random.key(1))
    b, _ = step(state, dropped, jax.random.key(1))
    # |P_t| = 2 either way: the same server model and h; client 4's memory is untouched.
    tree_allclose(a.params, b.params, rtol=1e-7, atol=1e-8)
    tree_allclose(a.h, b.h, rtol=1e-7, atol=1e-8)
    for x, y, s in zip(*(jax.tree.leaves(t.client_states) for t in (a, b, state))):
        np.testing.assert_array_equal(y[4], s[4])
        np.testing.assert_allclose(x, y, rtol=1e-7, atol=1e-8)
    # A round in which nobody trains leaves params, h and memories as they were.
    nobody = two._replace(mask=np.zeros_like(two.mask))
    c, _ = step(state, nobody, jax.random.key(1))
    assert step._cache_size() == 1
    before = (state.params, state.h, state.client_states)
    for x, y in zip(jax.tree.leaves((c.params, c.h, c.client_states)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(x, y)


def test_alpha_and_learning_rate_sweep_is_one_vectorized_program():
    # The grid's members differ only in declared hyperparameters: one group, one program (the
    # contract test checks that such vmapped members equal their solo runs).
    base = fs.load_config("default:smoke")
    base.algorithm = "feddyn"
    axes = {"algorithm_kwargs.alpha": [0.001, 0.01, 0.1], "client.learning_rate": [0.01, 0.1]}
    members = sweep.member_configs(base, axes)
    assert len(members) == 6
    assert len({sweep._group_key(config, axes) for _, _, config in members}) == 1
    # A server learning rate is not FedDyn's: sweeping it is refused before any compute.
    with pytest.raises(ValueError, match="does not use server.learning_rate"):
        sweep.member_configs(base, {"server.learning_rate": [0.5, 1.0]})


@pytest.mark.parametrize("alpha", [0.0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        fs.feddyn(MODEL, _client_sgd(), num_clients=3, alpha=alpha)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        fs.feddyn(MODEL, _client_sgd(), num_clients=3, hparams={"algorithm_kwargs.alpha": 0.0})
    with pytest.raises(ValueError, match="num_clients must be a positive int"):
        fs.feddyn(MODEL, _client_sgd(), num_clients=0)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        fs.feddyn(MODEL, _client_sgd(), num_clients=3, hparams={"server.learning_rate": 1.0})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("algorithm_kwargs.alpha", 0.0, "alpha must be a finite number > 0"),
        ("aggregator", "secure", "'feddyn' does not support secure_aggregation"),
        ("client.proximal_mu", 0.1, "does not support proximal_term"),
        ("dp.clip_norm", 1.0, r"does not support dp \(dp.clip_norm"),
        ("algorithm_kwargs.alhpa", 0.5, r"no algorithm_kwargs.alhpa \(did you mean 'alpha'\?\)"),
        ("algorithm_kwargs.alpha", "big", "algorithm_kwargs.alpha must be a float"),
        ("server.learning_rate", 0.5, "has none"),
        ("server.optimizer", "adam", "has none"),
    ],
)
def test_config_settings_feddyn_would_ignore_are_refused(field, value, message):
    config = fs.load_config("default:smoke")
    config.algorithm = "feddyn"
    sweep._set(config, field, value)
    ctx = fs.BuildContext(
        task=fs.core.task.as_task(MODEL), executor=fs.Executor("sequential"), num_clients=3
    )
    with pytest.raises(ValueError, match=message):
        fs.algorithms.build(config, ctx)

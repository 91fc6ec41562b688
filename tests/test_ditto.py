"""Ditto (Li et al. 2021, Algorithm 1): a NumPy reference from the paper, its limits in lambda,
its global model as FedAvg's, personalize under jit and vmap, and refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import sweep
from fedjax_sim.algorithms.ditto import LAMBDA
from fedjax_sim.data import pack_cohort
from fedjax_sim.data.packing import limit_local_steps
from tests import toy_algorithm
from tests.helpers import linear_model, ragged_dataset, tree_allclose

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
SIZES = [5, 9, 3, 7, 6]


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def softmax_grad(p, x, y):
    """Gradient of the mean softmax cross-entropy of ``x @ w + b`` (NumPy, float64):
    d/dlogits = softmax - onehot, averaged over the examples."""
    logits = x @ p["w"] + p["b"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    g = e / e.sum(-1, keepdims=True)
    g[np.arange(len(y)), y] -= 1.0
    g /= len(y)
    return {"w": x.T @ g, "b": g.sum(0)}


def ditto_by_hand(ds, rounds, steps, lr, lam):
    """Algorithm 1 with full batches: each sampled client k runs ``steps[r][k]`` steps of
    w_k <- w_k - lr grad F_k(w_k) from w^t (the global update) and of
    v_k <- v_k - lr (grad F_k(v_k) + lam (v_k - w^t)); then w^{t+1} = sum n_k w_k / sum n_k."""
    w = _np(PARAMS)
    v = [_np(PARAMS) for _ in range(ds.num_clients)]  # v_k^0 = w^0
    for r, ids in enumerate(rounds):
        finals, sizes = [], []
        for k in ids:
            data = ds.client(k)
            x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"])
            wk = w
            for _ in range(steps[r][k]):
                g = softmax_grad(wk, x, y)
                wk = {n: wk[n] - lr * g[n] for n in wk}
                gv = softmax_grad(v[k], x, y)
                v[k] = {n: v[k][n] - lr * (gv[n] + lam * (v[k][n] - w[n])) for n in w}
            finals.append(wk)
            sizes.append(len(y))
        total = sum(sizes)
        w = {n: sum(s * f[n] for s, f in zip(sizes, finals)) / total for n in w}
    return w, v


def _cohorts(ds, rounds, *, batch_size, epochs, stragglers=None):
    """Packed cohorts of ``rounds`` (3 slots: a padded client where fewer are sampled);
    ``stragglers[r] = {client: steps}`` truncates those clients' masks."""
    steps = fs.data.max_local_steps_of(ds, batch_size=batch_size, local_epochs=epochs)
    out = []
    for r, ids in enumerate(rounds):
        c = pack_cohort(
            ds,
            ids,
            batch_size=batch_size,
            local_epochs=epochs,
            num_steps=steps,
            num_clients=3,
            seed=0,
            round_num=r,
        )
        budget = [(stragglers or {}).get(r, {}).get(k, steps) for k in ids]
        out.append(limit_local_steps(c, budget + [steps] * (3 - len(ids))))
    return out


def _train(algo, cohorts, state=None):
    step = jax.jit(algo.apply)
    state = algo.init(PARAMS) if state is None else state
    for r, c in enumerate(cohorts):
        state, _ = step(state, c, jax.random.key(r))
    assert step._cache_size() == 1
    return state


ROUNDS = [[0, 1, 2], [1, 3], [2, 4, 1], [0, 4]]


def test_matches_algorithm_1_by_hand():
    # Ragged clients, full batches (batch 9 >= every client), 2 local epochs = 2 steps each;
    # client 1 straggles in round 2 (1 step), client 3 is sampled once, a padded slot in
    # rounds 1 and 3.
    ds = ragged_dataset(SIZES)
    lr, lam = 0.3, 0.7
    stragglers = {2: {1: 1}}
    cohorts = _cohorts(ds, ROUNDS, batch_size=9, epochs=2, stragglers=stragglers)
    algo = fs.ditto(MODEL, optax.sgd(lr), num_clients=ds.num_clients, ditto_lambda=lam)
    state = _train(algo, cohorts)
    steps = [{k: stragglers.get(r, {}).get(k, 2) for k in ids} for r, ids in enumerate(ROUNDS)]
    w, v = ditto_by_hand(ds, ROUNDS, steps, lr, lam)
    tree_allclose(state.params, w, rtol=1e-5, atol=1e-6)
    for k in range(ds.num_clients):
        tree_allclose(jax.tree.map(lambda a, k=k: a[k], state.client_states), v[k], 1e-5, 1e-6)
    # personalize returns the v_k, jitted, in the order asked.
    ids = jnp.array([4, 0, 3], jnp.int32)
    got = jax.jit(algo.personalize)(state, ids)
    for row, k in enumerate([4, 0, 3]):
        tree_allclose(jax.tree.map(lambda a, row=row: a[row], got), v[k], 1e-5, 1e-6)
    assert float(state.hparams[LAMBDA]) == pytest.approx(lam)


def test_global_model_is_fedavg_exactly_and_lambda_zero_is_local_training():
    ds = ragged_dataset(SIZES)
    cohorts = _cohorts(ds, ROUNDS, batch_size=3, epochs=1)  # mini-batches this time
    opt = optax.sgd(0.2)
    algo = fs.ditto(MODEL, opt, num_clients=ds.num_clients, ditto_lambda=0.0)
    state = _train(algo, cohorts)
    # The global part runs FedAvg's round unchanged: bitwise the same model.
    plain = fs.fedavg(MODEL, opt)
    ref = _train(plain, cohorts)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # lambda = 0: v_k never sees w. It is client k's own SGD over the batches of its rounds,
    # i.e. FedAvg on one-client cohorts [k] (the server takes the client's model; a client's
    # batches and key depend on (seed, round, k) only).
    steps = cohorts[0].num_steps
    one_step = jax.jit(plain.apply)
    for k in range(ds.num_clients):
        local = plain.init(PARAMS)
        for r, ids in enumerate(ROUNDS):
            if k in ids:
                one = pack_cohort(
                    ds, [k], batch_size=3, num_steps=steps, num_clients=3, seed=0, round_num=r
                )
                local, _ = one_step(local, one, jax.random.key(r))
        v_k = jax.tree.map(lambda a, k=k: a[k], state.client_states)
        tree_allclose(v_k, local.params, rtol=1e-6, atol=1e-7)
    # Client-wise: every sampled client moved; all started at w^0.
    assert all(
        not np.allclose(np.asarray(state.client_states["w"][k]), PARAMS["w"]) for k in range(5)
    )


def test_large_lambda_tracks_the_global_model():
    # lr * lambda = 1 (2^-10 * 2^10, exact): a personal step gives
    # v <- v - lr (g(v) + lambda (v - w^t)) = w^t - lr g(v), so after a round of a client,
    # |v_k - w^t| <= lr max|g| (softmax CE gradients here are below 3: lr * 3 < 3e-3). A large
    # server step (sgd(200)) moves the global model far meanwhile.
    ds = ragged_dataset(SIZES)
    lr = 2.0**-10
    cohorts = _cohorts(ds, ROUNDS, batch_size=3, epochs=1)
    glob = fs.fedopt(MODEL, optax.sgd(lr), optax.sgd(200.0))
    algo = fs.ditto(
        MODEL, optax.sgd(lr), num_clients=5, ditto_lambda=2.0**10, global_algorithm=glob
    )
    state = _train(algo, cohorts[:-1])
    w_last = state.params  # w^t of the last round
    state = _train(algo, cohorts[-1:], state)
    assert np.abs(np.asarray(w_last["w"] - PARAMS["w"])).max() > 0.1
    for k in ROUNDS[-1]:
        v_k = jax.tree.map(lambda a, k=k: a[k], state.client_states)
        tree_allclose(v_k, w_last, rtol=0, atol=3e-3)
    # Client 3 last took part in round 1: it tracks that round's w, not the latest.
    assert np.abs(np.asarray(state.client_states["w"][3] - w_last["w"])).max() > 0.05


def test_personalize_under_vmap_over_a_stacked_state():
    # A sweep vmaps apply and personalize over members whose hparams differ: lambda changes
    # the personal models only; the global model is the same for every member.
    ds = ragged_dataset(SIZES)
    cohorts = _cohorts(ds, ROUNDS[:2], batch_size=3, epochs=1)
    algo = fs.ditto(MODEL, optax.sgd(0.2), num_clients=5, ditto_lambda=0.5)
    s0 = algo.init(PARAMS)
    members = [s0, s0._replace(hparams={**s0.hparams, LAMBDA: jnp.float32(5.0)})]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    vstep = jax.jit(jax.vmap(algo.apply, in_axes=(0, None, None)))
    for r, c in enumerate(cohorts):
        stacked, _ = vstep(stacked, c, jax.random.key(r))
    ids = jnp.array([1, 3], jnp.int32)
    both = jax.jit(jax.vmap(algo.personalize, in_axes=(0, None)))(stacked, ids)
    for m, solo in enumerate(_train(algo, cohorts, s) for s in members):
        got = jax.tree.map(lambda a, m=m: a[m], both)
        tree_allclose(got, algo.personalize(solo, ids), rtol=1e-5, atol=1e-6)
    tree_allclose(*(jax.tree.map(lambda a, m=m: a[m], stacked.params) for m in (0, 1)))
    assert not np.allclose(both["w"][0], both["w"][1])


def test_config_lambda_is_a_vectorized_axis_and_bad_input_is_refused():
    config = fs.load_config("default:smoke")
    config.algorithm = "ditto"
    config.algorithm_kwargs.ditto_lambda = 0.5
    assert LAMBDA in fs.algorithms.get_spec("ditto").hparams(config)
    axes = {LAMBDA: [0.1, 1.0], "client.learning_rate": [0.01, 0.02]}
    members = sweep.member_configs(config, axes)
    assert all(sweep.is_vector_axis(p, config) for p in axes)
    assert len({sweep._group_key(c, axes) for _, _, c in members}) == 1  # one program
    spec = fs.algorithms.get_spec("ditto")
    ctx = fs.BuildContext(fs.classification_task(MODEL), fs.Executor(), num_clients=5)
    algo = spec.build(config, ctx)
    assert set(algo.hparams) == set(spec.hparams(config))
    assert float(algo.init(PARAMS).hparams[LAMBDA]) == 0.5

    with pytest.raises(ValueError, match="ditto_lambda must be >= 0"):
        fs.ditto(MODEL, optax.sgd(0.1), num_clients=5, ditto_lambda=-0.1)
    config.algorithm_kwargs.ditto_lambda = -1.0
    with pytest.raises(ValueError, match="ditto_lambda must be >= 0"):
        spec.build(config, ctx)
    for wrong in ("lam", "lambda"):
        bad = fs.load_config("default:smoke")
        bad.algorithm = "ditto"
        bad.algorithm_kwargs[wrong] = 1.0
        with pytest.raises(ValueError, match=r"did you mean 'ditto_lambda'"):
            fs.algorithms.build(bad, ctx)
    bad = fs.load_config("default:smoke")
    bad.algorithm = "ditto"
    bad.algorithm_kwargs.ditto_lamda = 1.0
    with pytest.raises(ValueError, match=r"takes no algorithm_kwargs.ditto_lamda \(did you"):
        fs.algorithms.build(bad, ctx)
    inner = fs.ditto(MODEL, optax.sgd(0.1), num_clients=5)
    with pytest.raises(ValueError, match="plain global algorithm"):
        fs.ditto(MODEL, optax.sgd(0.1), num_clients=5, global_algorithm=inner)
    memory = toy_algorithm.fedavg_memory(MODEL, optax.sgd(0.1), num_clients=5)
    with pytest.raises(ValueError, match="keeps per-client state"):
        fs.ditto(MODEL, optax.sgd(0.1), num_clients=5, global_algorithm=memory).init(PARAMS)

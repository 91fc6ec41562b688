"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II) against a NumPy reference written
from the paper; its invariants (the first round is FedAvg, one step gives option I, clients
never sampled or without real steps change nothing) and its refusals."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import pack_cohort
from tests.helpers import linear_model, ragged_dataset, tree_allclose

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
LR, SERVER_LR = 0.3, 0.7
CTX = fs.BuildContext(fs.core.task.as_task(MODEL), fs.Executor(), num_clients=3)
SIZES = [5, 9, 3, 7, 6]
# Partial participation (|S| of N = 5 in each round); client 3 is never sampled.
ROUNDS = [[0, 2], [2, 4, 1], [1, 2], [4, 0, 2]]
EPOCHS = 3  # full batch: every client could run 3 steps; the masks below cut some short


def local_steps(r, i):
    """K_i of client i in round r: 1, 2 or 3 (as a straggler's truncated mask gives)."""
    return 1 + (r + 2 * i) % EPOCHS


def cohorts(ds, rounds):
    out = []
    for r, ids in enumerate(rounds):
        c = pack_cohort(
            ds, ids, batch_size=max(SIZES), local_epochs=EPOCHS, num_clients=3, seed=0,
            round_num=r,
        )  # fmt: skip
        mask = np.array(c.mask)
        for row, i in enumerate(ids):
            mask[row, local_steps(r, i) :] = False
        out.append(c._replace(mask=mask))
    return out


def np_grad(p, x, y):
    """Gradient of the mean softmax cross-entropy of x @ w + b (float64)."""
    logits = x @ p["w"] + p["b"]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    prob[np.arange(len(y)), y] -= 1.0
    return {"w": x.T @ prob / len(y), "b": prob.mean(0)}


def scaffold_reference(ds, rounds, weighting):
    """Algorithm 1 of the paper, option II, in NumPy; full-batch gradients g_i(y)."""
    n = ds.num_clients
    tmap = lambda f, *ts: {k: f(*(t[k] for t in ts)) for k in ts[0]}
    x = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    c = tmap(np.zeros_like, x)
    c_i = [tmap(np.zeros_like, x) for _ in range(n)]
    for r, ids in enumerate(rounds):
        dys, dcs, ws = [], [], []
        for i in ids:
            data = ds.client(i)
            xi, yi = np.asarray(data["x"], np.float64), np.asarray(data["y"])
            k = local_steps(r, i)
            y = x
            for _ in range(k):
                g = np_grad(y, xi, yi)
                y = tmap(lambda y, g, a, b: y - LR * (g - a + b), y, g, c_i[i], c)
            # c_i+ = c_i - c + (x - y) / (K eta_l)
            new = tmap(lambda a, b, xx, yy: a - b + (xx - yy) / (k * LR), c_i[i], c, x, y)
            dys.append(tmap(np.subtract, y, x))  # Delta y_i = y_i - x
            dcs.append(tmap(np.subtract, new, c_i[i]))  # Delta c_i = c_i+ - c_i
            ws.append(1.0 if weighting == "uniform" else float(ds.sizes[i]))
            c_i[i] = new
        w = np.asarray(ws) / np.sum(ws)
        dx = tmap(lambda *a: sum(wi * ai for wi, ai in zip(w, a)), *dys)
        dc = tmap(lambda *a: sum(a) / len(a), *dcs)  # the paper's 1/|S| mean
        x = tmap(lambda xx, d: xx + SERVER_LR * d, x, dx)  # x <- x + eta_g Delta x
        c = tmap(lambda cc, d: cc + len(ids) / n * d, c, dc)  # c <- c + |S|/N Delta c
    return x, c, c_i


@pytest.mark.parametrize(
    "weighting, strategy, devices",
    [("uniform", "sequential", 1), ("num_examples", "vmap", 1), ("uniform", "chunked", 3)],
)
def test_matches_the_papers_algorithm(weighting, strategy, devices):
    ds = ragged_dataset(SIZES)
    mesh = fs.client_mesh(devices)
    algo = fs.scaffold(
        MODEL,
        fs.get_optimizer("sgd", LR, inject=True),
        optax.sgd(SERVER_LR),
        num_clients=ds.num_clients,
        weighting=weighting,
        executor=fs.Executor(strategy, chunk_size=2, mesh=mesh),
    )
    step = jax.jit(algo.apply)
    state = fs.replicate(algo.init(PARAMS), mesh)
    for r, cohort in enumerate(cohorts(ds, ROUNDS)):
        state, metrics = step(state, cohort, jax.random.key(r))
        assert int(metrics["num_clients"]) == len(ROUNDS[r])
    assert step._cache_size() == 1
    x, c, c_i = scaffold_reference(ds, ROUNDS, weighting)
    tree_allclose(state.params, x, rtol=1e-5, atol=1e-6)
    tree_allclose(state.control, c, rtol=1e-5, atol=1e-6)
    for i in range(ds.num_clients):
        tree_allclose(jax.tree.map(lambda a, i=i: a[i], state.client_states), c_i[i], 1e-5, 1e-6)
    # Client 3 was never sampled: its control variate is exactly zero.
    assert all(not np.any(np.asarray(a[3])) for a in jax.tree.leaves(state.client_states))
    # c stays the mean of all N control variates (the |S|/N factor).
    mean_ci = jax.tree.map(lambda a: np.mean(np.asarray(a), 0), state.client_states)
    tree_allclose(state.control, mean_ci, rtol=1e-5, atol=1e-6)


def test_first_round_is_fedavg_and_one_step_gives_option_one():
    ds = ragged_dataset([5, 9, 3, 7])
    cohort = pack_cohort(ds, [0, 1, 3], batch_size=3, max_local_steps=1, seed=0, round_num=0)
    algo = fs.scaffold(
        MODEL, fs.get_optimizer("sgd", LR, inject=True), optax.sgd(SERVER_LR), num_clients=4
    )
    state, _ = jax.jit(algo.apply)(algo.init(PARAMS), cohort, jax.random.key(1))
    # All control variates start at 0: the correction vanishes, the round is FedAvg with the
    # paper's uniform weights and the same server optimizer.
    avg = fs.fedopt(MODEL, optax.sgd(LR), optax.sgd(SERVER_LR), weighting="uniform")
    ref, _ = jax.jit(avg.apply)(avg.init(PARAMS), cohort, jax.random.key(1))
    tree_allclose(state.params, ref.params, rtol=1e-6, atol=1e-7)
    # With K = 1, option II's (x - y) / eta_l = g_i(x) - c_i + c, so c_i+ = g_i(x) (option I)
    # on the client's one batch.
    np_params = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    for row, i in enumerate([0, 1, 3]):
        m = np.asarray(cohort.mask[row, 0])
        g = np_grad(np_params, np.asarray(cohort.batches["x"][row, 0][m], np.float64),
                    np.asarray(cohort.batches["y"][row, 0][m]))  # fmt: skip
        tree_allclose(jax.tree.map(lambda a, i=i: a[i], state.client_states), g, 1e-5, 1e-6)


def test_a_client_without_real_steps_changes_nothing():
    ds = ragged_dataset([5, 9, 3])
    algo = fs.scaffold(MODEL, fs.get_optimizer("sgd", LR, inject=True), num_clients=3)
    step = jax.jit(algo.apply)
    # Round 1 gives everyone nonzero control variates.
    first = pack_cohort(ds, [0, 1, 2], batch_size=4, seed=0, round_num=0)
    state, _ = step(algo.init(PARAMS), first, jax.random.key(0))
    full = pack_cohort(ds, [0, 1, 2], batch_size=4, seed=0, round_num=1)
    # Client 2 dropped: its row keeps its id and size but no real step.
    dropped = full._replace(mask=np.asarray(full.mask).copy())
    dropped.mask[2] = False
    without = pack_cohort(ds, [0, 1], batch_size=4, num_clients=3, seed=0, round_num=1)
    a, metrics = step(state, dropped, jax.random.key(1))
    b, _ = step(state, without, jax.random.key(1))
    assert int(metrics["num_clients"]) == 2
    tree_allclose(a.params, b.params, rtol=1e-6, atol=1e-7)
    tree_allclose(a.control, b.control, rtol=1e-6, atol=1e-7)
    for new, old in zip(jax.tree.leaves(a.client_states), jax.tree.leaves(state.client_states)):
        np.testing.assert_array_equal(new[2], old[2])
        assert np.all(np.isfinite(new))


def test_bad_input_is_refused():
    sgd = fs.get_optimizer("sgd", 0.1, inject=True)
    with pytest.raises(ValueError, match="inject=True"):
        fs.scaffold(MODEL, optax.sgd(0.1), num_clients=3)
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        fs.scaffold(MODEL, fs.get_optimizer("sgd", 0.0, inject=True), num_clients=3)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        fs.scaffold(MODEL, sgd, num_clients=0)
    with pytest.raises(ValueError, match="unknown weighting 'by_size'; known: num_examples"):
        fs.scaffold(MODEL, sgd, num_clients=3, weighting="by_size")
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        fs.scaffold(MODEL, sgd, "sgd", num_clients=3)
    for field, value, match in [
        ("client.proximal_mu", 0.1, "'scaffold' does not support proximal_term"),
        ("aggregator", "secure", "'scaffold' does not support secure_aggregation"),
        ("dp.clip_norm", 1.0, r"'scaffold' does not support dp \(dp.clip_norm=1.0\)"),
    ]:
        config = fs.load_config("default:smoke")
        config.algorithm = "scaffold"
        fs.sweep._set(config, field, value)
        with pytest.raises(ValueError, match=match):
            fs.algorithms.build(config, CTX)

"""FedNova (Wang et al. 2020) against a NumPy reference written from the paper, with very
different local step counts, plain SGD, momentum and the proximal term; its invariant (equal
local steps make it FedAvg) and its refusals."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import pack_cohort
from tests.helpers import linear_model, ragged_dataset, tree_allclose

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
CTX = fs.BuildContext(fs.core.task.as_task(MODEL), fs.Executor(), num_clients=4)
LR, BATCH, MAX_STEPS = 0.1, 2, 10
# Batches of 2 capped at 10 steps: tau_i = 1, 10, 3, 6.
SIZES = [2, 30, 6, 11]


def np_grad(p, x, y):
    """Gradient of the mean softmax cross-entropy of x @ w + b (float64)."""
    logits = x @ p["w"] + p["b"]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    prob[np.arange(len(y)), y] -= 1.0
    return {"w": x.T @ prob / len(y), "b": prob.mean(0)}


def fednova_reference(ds, cohorts, *, rho, mu):
    """The paper's FedNova in NumPy (server SGD at 1): x <- x - tau_eff sum_i p_i eta d_i."""
    tmap = lambda f, *ts: {k: f(*(t[k] for t in ts)) for k in ts[0]}
    x = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    p = np.asarray(ds.sizes, np.float64) / np.sum(ds.sizes)  # p_i = n_i / n
    for cohort in cohorts:
        eta_d, norms, taus = [], [], []
        for row in range(len(SIZES)):
            y, buf, tau = x, tmap(np.zeros_like, x), 0
            for s in range(cohort.mask.shape[1]):
                m = np.asarray(cohort.mask[row, s])
                if not m.any():
                    continue
                g = np_grad(y, np.asarray(cohort.batches["x"][row, s][m], np.float64),
                            np.asarray(cohort.batches["y"][row, s][m]))  # fmt: skip
                g = tmap(lambda g, yy, xx: g + mu * (yy - xx), g, y, x)  # proximal gradient
                buf = tmap(lambda b, g: rho * b + g, buf, g)  # heavy ball: m <- rho m + g
                y = tmap(lambda yy, b: yy - LR * b, y, buf)
                tau += 1
            # ||a_i||_1 in the paper's closed forms.
            if mu:
                a = (1 - (1 - LR * mu) ** tau) / (LR * mu)
            elif rho:
                a = (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
            else:
                a = tau
            eta_d.append(tmap(lambda xx, yy, a=a: (xx - yy) / a, x, y))  # eta d_i
            norms.append(a)
            taus.append(tau)
        # tau_eff = sum_i p_i ||a_i||_1; with the proximal term sum_i p_i tau_i (authors' code).
        tau_eff = float(np.dot(p, taus if mu else norms))
        step = tmap(lambda *ds_: sum(pi * di for pi, di in zip(p, ds_)), *eta_d)
        x = tmap(lambda xx, s: xx - tau_eff * s, x, step)
    return x, taus


@pytest.mark.parametrize(
    "momentum, mu, strategy",
    [(None, 0.0, "sequential"), (0.5, 0.0, "vmap"), (None, 0.4, "chunked")],
)
def test_matches_the_paper_with_very_different_local_steps(momentum, mu, strategy):
    ds = ragged_dataset(SIZES)
    algo = fs.fednova(
        MODEL, LR, momentum=momentum, proximal_mu=mu,
        executor=fs.Executor(strategy, chunk_size=3),
    )  # fmt: skip
    cohorts = [
        pack_cohort(
            ds, range(len(SIZES)), batch_size=BATCH, max_local_steps=MAX_STEPS, seed=0, round_num=r
        )  # fmt: skip
        for r in range(3)
    ]
    step = jax.jit(algo.apply)
    state = algo.init(PARAMS)
    for r, cohort in enumerate(cohorts):
        state, _ = step(state, cohort, jax.random.key(r))
    assert step._cache_size() == 1
    x, taus = fednova_reference(ds, cohorts, rho=momentum or 0.0, mu=mu)
    assert taus == [1, 10, 3, 6]
    tree_allclose(state.params, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_equal_local_steps_make_it_fedavg(momentum):
    # Every client runs 4 steps of batch 2 (sizes >= 8): a_i is the same for all, tau_eff is
    # that a, and tau_eff * sum_i p_i (x - y_i) / a = FedAvg's sum_i p_i (x - y_i).
    ds = ragged_dataset([8, 12, 9])
    cohort = pack_cohort(ds, [0, 1, 2], batch_size=2, max_local_steps=4, seed=0, round_num=0)
    nova = fs.fednova(MODEL, LR, momentum=momentum, server_optimizer=optax.sgd(0.8))
    avg = fs.fedopt(MODEL, optax.sgd(LR, momentum=momentum), optax.sgd(0.8))
    a, _ = jax.jit(nova.apply)(nova.init(PARAMS), cohort, jax.random.key(1))
    b, _ = jax.jit(avg.apply)(avg.init(PARAMS), cohort, jax.random.key(1))
    tree_allclose(a.params, b.params, rtol=1e-6, atol=1e-7)


def test_a_client_without_real_steps_changes_nothing():
    ds = ragged_dataset([5, 9, 3])
    step = jax.jit(fs.fednova(MODEL, LR, momentum=0.5).apply)
    state = fs.fednova(MODEL, LR, momentum=0.5).init(PARAMS)
    full = pack_cohort(ds, [0, 1, 2], batch_size=2, seed=0, round_num=1)
    dropped = full._replace(mask=np.asarray(full.mask).copy())
    dropped.mask[2] = False  # client 2 keeps its id and size but runs no step
    without = pack_cohort(ds, [0, 1], batch_size=2, num_clients=3, seed=0, round_num=1)
    a, metrics = step(state, dropped, jax.random.key(1))
    b, _ = step(state, without, jax.random.key(1))
    assert int(metrics["num_clients"]) == 2
    tree_allclose(a.params, b.params, rtol=1e-6, atol=1e-7)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not for both at once"):
        fs.fednova(MODEL, LR, momentum=0.5, proximal_mu=0.1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        fs.fednova(MODEL, LR, momentum=1.0)
    with pytest.raises(ValueError, match="learning rate must be >= 0"):
        fs.fednova(MODEL, -0.1)
    with pytest.raises(ValueError, match="proximal_mu must be >= 0"):
        fs.fednova(MODEL, LR, proximal_mu=-1.0)
    with pytest.raises(ValueError, match="must be < 1"):
        fs.fednova(MODEL, 0.5, proximal_mu=2.0)
    with pytest.raises(ValueError, match="unknown weighting"):
        fs.fednova(MODEL, LR, weighting="by_steps")
    for fields, match in [
        ({"client.optimizer": "adam"}, "client.optimizer 'adam' is not one of sgd, momentum"),
        ({"client.kwargs.nesterov": True, "client.kwargs.momentum": 0.5}, "nesterov"),
        ({"client.kwargs.dampening": 0.1}, r"takes only client.kwargs.momentum; got \['damp"),
        ({"dp.clip_norm": 1.0}, r"'fednova' does not support dp \(dp.clip_norm=1.0\)"),
        ({"aggregator": "secure"}, "'fednova' does not support secure_aggregation"),
    ]:
        config = fs.load_config("default:smoke")
        config.algorithm = "fednova"
        for field, value in fields.items():
            fs.sweep._set(config, field, value)
        with pytest.raises(ValueError, match=match):
            fs.algorithms.build(config, CTX)

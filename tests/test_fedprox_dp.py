"""FedProx's proximal term and the DP-FedAvg mechanism (clipping, Gaussian noise) against
hand-written references, and their refusals."""

import jax
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
KEY = jax.random.key(7)
DS = ragged_dataset([6, 13, 3, 9])
IDS = [3, 0, 1]


def cohort(ds=DS, ids=IDS, **kw):
    return pack_cohort(ds, ids, batch_size=4, local_epochs=2, seed=0, round_num=1, **kw)


def reference_client_models(params, *, lr, mu, model=MODEL, ds=DS, ids=IDS):
    """Each client trained alone in Python on loss + mu/2 ||w - w_server||^2 (jax.grad of the
    whole objective, not the gradient correction the algorithm adds)."""

    def objective(q, x, y):
        prox = sum(
            jax.numpy.sum((a - b) ** 2)
            for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(params), strict=True)
        )
        return mean_loss(model, q, x, y) + 0.5 * mu * prox

    return train_clients_by_hand(params, cohort(ds, ids), jax.grad(objective), lr)


def flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


def mean_of(trees, weights):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return jax.tree.map(lambda *ps: sum(wi * np.asarray(pi) for wi, pi in zip(w, ps)), *trees)


@pytest.mark.parametrize("strategy", ["sequential", "vmap"])
def test_fedprox_round_matches_clients_trained_on_the_proximal_objective(strategy):
    algo = fs.fedopt(
        MODEL, optax.sgd(0.2), optax.sgd(1.0), proximal_mu=0.7, executor=fs.Executor(strategy)
    )
    state, _ = algo.apply(algo.init(PARAMS), cohort(), KEY)
    finals = reference_client_models(PARAMS, lr=0.2, mu=0.7)
    tree_allclose(state.params, mean_of(finals, DS.sizes[IDS]), rtol=1e-5, atol=1e-6)
    # The proximal term pulls clients back: the round moves the model less than FedAvg's.
    plain = reference_client_models(PARAMS, lr=0.2, mu=0.0)
    moved = np.linalg.norm(flat(mean_of(finals, DS.sizes[IDS])) - flat(PARAMS))
    moved_plain = np.linalg.norm(flat(mean_of(plain, DS.sizes[IDS])) - flat(PARAMS))
    assert moved < 0.9 * moved_plain


def test_mu_zero_is_fedavg_bitwise():
    a = fs.fedopt(MODEL, optax.sgd(0.2), optax.sgd(1.0), proximal_mu=0.0)
    b = fs.fedopt(MODEL, optax.sgd(0.2), optax.sgd(1.0))
    sa, _ = a.apply(a.init(PARAMS), cohort(), KEY)
    sb, _ = b.apply(b.init(PARAMS), cohort(), KEY)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_clipping_bounds_each_client_delta_before_averaging():
    finals = reference_client_models(PARAMS, lr=0.2, mu=0.0)
    deltas = [flat(PARAMS) - flat(f) for f in finals]
    norms = np.array([np.linalg.norm(d) for d in deltas])
    clip = float(np.median(norms))  # some clients above it, some not
    assert (norms > clip).any() and (norms <= clip).any()
    clipped = [d * min(1.0, clip / n) for d, n in zip(deltas, norms, strict=True)]
    w = DS.sizes[IDS] / DS.sizes[IDS].sum()
    want = flat(PARAMS) - sum(wi * d for wi, d in zip(w, clipped, strict=True))
    algo = fs.fedopt(MODEL, optax.sgd(0.2), optax.sgd(1.0), clip_norm=clip)
    state, _ = algo.apply(algo.init(PARAMS), cohort(), KEY)
    np.testing.assert_allclose(flat(state.params), want, rtol=1e-5, atol=1e-6)


def test_gaussian_noise_has_the_dp_fedavg_scale():
    model = linear_model(dim=200, num_classes=10)  # 2,010 coordinates to measure the std
    params = model.init(jax.random.key(1))
    ds = ragged_dataset([8, 5, 7, 6], dim=200, num_classes=10)
    packed = pack_cohort(ds, [0, 1, 2, 3], batch_size=4, seed=0, round_num=1)
    clip, z = 0.3, 1.5

    def run(noise, key=KEY):
        algo = fs.fedopt(
            model, optax.sgd(0.1), optax.sgd(1.0), weighting="uniform", clip_norm=clip,
            noise_multiplier=noise,
        )  # fmt: skip
        return flat(algo.apply(algo.init(params), packed, key)[0].params)

    clean = run(0.0)
    noise = clean - run(z)  # server sgd(1): params - (mean + noise)
    std = z * clip / 4  # 4 clients
    assert abs(noise.std() / std - 1) < 0.06
    assert abs(noise.mean()) < 4 * std / np.sqrt(noise.size)
    np.testing.assert_array_equal(run(z), run(z))  # drawn from the round key
    assert not np.allclose(run(z), run(z, jax.random.key(8)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise_multiplier": 1.0}, "needs clip_norm > 0"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0}, "weighting='uniform'"),
        (
            {
                "noise_multiplier": 1.0,
                "clip_norm": 1.0,
                "weighting": "uniform",
                "aggregator": fs.aggregators.coordinate_median(),
            },
            "mean aggregator",
        ),  # fmt: skip
        ({"clip_norm": -1.0}, ">= 0"),
        ({"proximal_mu": -0.1}, "proximal_mu must be >= 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fs.fedopt(MODEL, optax.sgd(0.1), optax.sgd(1.0), **kwargs)


def test_fedsgd_config_with_a_proximal_term_is_refused(tmp_path):
    config = fs.load_config("fedsgd:smoke")
    config.client.proximal_mu = 0.1
    with pytest.raises(ValueError, match="'fedsgd' does not support proximal_term"):
        fs.simulate(config, tmp_path / "run", progress=False)

"""The driver's evaluator: global models, and one model per test client (personalization)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.driver.evaluation import Evaluator
from tests.helpers import linear_model, ragged_dataset

MODEL = linear_model()


def _by_hand(models, test):
    """Per-client (hits, count, loss sum) with each client's own model, in NumPy."""
    rows = []
    for c in range(test.num_clients):
        ex = test.subset([c]).all_examples()
        x, y = ex["x"].astype(np.float64), ex["y"]
        p = jax.tree.map(lambda a, c=c: np.asarray(a[c], np.float64), models)
        logits = x @ p["w"] + p["b"]
        shifted = logits - logits.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))  # log-softmax
        hits = float(np.sum(logits.argmax(1) == y))
        rows.append((hits, float(len(y)), float(-np.sum(logp[np.arange(len(y)), y]))))
    return [np.asarray(col) for col in zip(*rows, strict=True)]


def test_per_client_models_score_their_own_clients():
    test = ragged_dataset([7, 3, 12, 5], seed=2)
    params = MODEL.init(jax.random.key(0))
    ev = Evaluator(fs.classification_task(MODEL), {0: test}, [0], batch_size=4, vectorized=False)
    # Every client holding the global model: the same numbers as the global evaluation.
    same = jax.tree.map(lambda a: jnp.stack([a] * test.num_clients), params)
    glob, per = ev(params)[0], ev.client_models(0, same)
    assert per.keys() == glob.keys()
    for k in glob:
        assert per[k] == pytest.approx(glob[k], rel=1e-5), k
    # Four different models (client c's scaled by c - 1.5): scored against NumPy by hand.
    scales = jnp.asarray([-1.5, -0.5, 0.5, 1.5])
    models = jax.tree.map(lambda a: scales.reshape((-1,) + (1,) * a.ndim) * a, params)
    hits, count, loss = _by_hand(models, test)
    out = ev.client_models(0, models)
    assert out["test_accuracy"] == pytest.approx(hits.sum() / count.sum(), abs=1e-12)
    assert out["test_loss"] == pytest.approx(loss.sum() / count.sum(), rel=1e-5)
    assert out["client_accuracy_p50"] == pytest.approx(np.percentile(hits / count, 50))
    assert out["client_accuracy_mean"] == pytest.approx(np.mean(hits / count))
    # The global model's numbers differ: the per-client path really used each client's model.
    assert out["test_loss"] != pytest.approx(glob["test_loss"], rel=1e-3)

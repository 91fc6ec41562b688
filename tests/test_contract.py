"""One contract every algorithm meets: jittable, stable state, deterministic, converges."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import pack_cohort
from tests.helpers import linear_model, mean_loss, ragged_dataset

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))

ALGORITHMS = {
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


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithm_contract(name):
    algo = ALGORITHMS[name]()
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

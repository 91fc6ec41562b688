"""A toy stateful algorithm (SCAFFOLD-style control variates) written on the public API.

It shows the API's room for per-client persistent state kept on the server, extra broadcast
state, gradient corrections inside local training, and a strategy-independent round.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.core.client import local_train, masked_mean_loss, num_real_steps, tree_sub
from fedjax_sim.core.round import replicate
from fedjax_sim.data import pack_cohort
from tests.helpers import linear_model, ragged_dataset, tree_allclose

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
LR = 0.1


class ToyState(NamedTuple):
    params: dict
    control: dict  # the server's control variate c (broadcast)
    client_controls: dict  # [num_clients, ...] per-client c_i kept on the server
    participations: jax.Array  # [num_clients] int32


def toy_scaffold(num_clients: int, strategy: str, mesh=None) -> fs.FederatedAlgorithm:
    loss_fn = masked_mean_loss(MODEL)
    opt = optax.sgd(LR)

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        stacked = jax.tree.map(lambda p: jnp.zeros((num_clients,) + p.shape, p.dtype), params)
        return ToyState(params, zeros, stacked, jnp.zeros((num_clients,), jnp.int32))

    def apply(state, cohort, key):
        x, c = state.params, state.control

        def client_fn(shared, data, client_state, ckey):
            x, c = shared  # the broadcast: server params and control variate
            c_i, count = client_state
            correct = lambda g, p: jax.tree.map(lambda g, ci, cc: g - ci + cc, g, c_i, c)
            local = local_train(
                x,
                data["batches"],
                data["mask"],
                ckey,
                loss_fn=loss_fn,
                optimizer=opt,
                grad_transform=correct,
            )
            k = jnp.maximum(num_real_steps(data["mask"]), 1).astype(jnp.float32)
            delta = tree_sub(x, local.params)
            new_ci = jax.tree.map(lambda ci, cc, d: ci - cc + d / (k * LR), c_i, c, delta)
            real = data["num_examples"] > 0
            return fs.ClientOutput(
                update=(delta, tree_sub(new_ci, c_i)),
                weight=real.astype(jnp.float32),
                metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
                client_state=(new_ci, count + real.astype(jnp.int32)),
            )

        outputs, (new_controls, new_counts) = fs.run_clients(
            client_fn,
            cohort,
            key,
            broadcast=(x, c),
            strategy=strategy,
            chunk_size=2,
            client_states=(state.client_controls, state.participations),
            mesh=mesh,
        )
        (mean_delta, mean_dc), _ = fs.weighted_mean().apply((), outputs.update, outputs.weight, key)
        frac = jnp.sum(outputs.weight) / num_clients
        return (
            ToyState(
                params=tree_sub(x, mean_delta),
                control=jax.tree.map(lambda cc, d: cc + frac * d, c, mean_dc),
                client_controls=new_controls,
                participations=new_counts,
            ),
            {},
        )

    return fs.FederatedAlgorithm(init, apply)


@pytest.mark.parametrize(
    "strategy, devices", [("vmap", 1), ("chunked", 1), ("sequential", 1), ("sequential", 3)]
)
def test_toy_stateful_algorithm_fits_the_api(strategy, devices):
    ds = ragged_dataset([5, 9, 3, 7, 6])
    mesh = fs.client_mesh(devices)
    algo = toy_scaffold(ds.num_clients, strategy, mesh)
    step = jax.jit(algo.apply)
    state = replicate(algo.init(PARAMS), mesh)
    rounds = [[0, 2], [2, 4], [1, 2]]
    n = fs.data.max_local_steps_of(ds, batch_size=2, local_epochs=1)
    for r, ids in enumerate(rounds):
        cohort = pack_cohort(ds, ids, batch_size=2, num_steps=n, num_clients=3, seed=0, round_num=r)
        before = state
        state, _ = step(state, cohort, jax.random.key(r))
        untouched = [i for i in range(ds.num_clients) if i not in ids]
        for leaf_new, leaf_old in zip(
            jax.tree.leaves(state.client_controls), jax.tree.leaves(before.client_controls)
        ):
            leaf_new, leaf_old = np.asarray(leaf_new), np.asarray(leaf_old)
            np.testing.assert_array_equal(leaf_new[untouched], leaf_old[untouched])
            assert np.all(leaf_new[ids] != 0)
    assert step._cache_size() == 1
    np.testing.assert_array_equal(state.participations, [1, 1, 3, 0, 1])
    assert jax.tree.structure(state) == jax.tree.structure(algo.init(PARAMS))


def test_toy_first_round_equals_fedavg_with_uniform_weights():
    # With all control variates zero the first round's correction vanishes: plain FedAvg.
    ds = ragged_dataset([5, 9, 3])
    cohort = pack_cohort(ds, [0, 1, 2], batch_size=2, seed=0, round_num=0)
    toy = toy_scaffold(3, "vmap")
    state, _ = toy.apply(toy.init(PARAMS), cohort, jax.random.key(1))
    avg = fs.fedavg(MODEL, optax.sgd(LR), weighting="uniform")
    ref, _ = avg.apply(avg.init(PARAMS), cohort, jax.random.key(1))
    tree_allclose(state.params, ref.params, rtol=1e-6, atol=1e-7)

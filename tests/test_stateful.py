"""A SCAFFOLD-style algorithm (control variates, Karimireddy et al. 2020, option II) written on
the low-level API: per-client state through ``Executor.run``, a broadcast beyond the params, a
gradient correction inside local training. Its arithmetic is checked by hand."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.core.client import local_train, num_real_steps, tree_sub
from fedjax_sim.core.task import mean_loss_fn
from fedjax_sim.data import pack_cohort
from tests.helpers import linear_model, mean_loss, ragged_dataset, tree_allclose

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
LR = 0.1


class ToyState(NamedTuple):
    params: dict
    control: dict  # the server's control variate c (broadcast)
    client_states: tuple  # ([num_clients, ...] per-client c_i, [num_clients] participations)
    hparams: dict = {}  # noqa: RUF012


def toy_scaffold(num_clients: int, executor: fs.Executor) -> fs.FederatedAlgorithm:
    loss_fn = mean_loss_fn(MODEL)
    opt = optax.sgd(LR)

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        stacked = jax.tree.map(lambda p: jnp.zeros((num_clients,) + p.shape, p.dtype), params)
        return ToyState(params, zeros, (stacked, jnp.zeros((num_clients,), jnp.int32)))

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

        outputs, client_states = executor.run(
            client_fn, cohort, key, broadcast=(x, c), client_states=state.client_states
        )
        (mean_delta, mean_dc), _ = fs.weighted_mean().apply((), outputs.update, outputs.weight, key)
        frac = jnp.sum(outputs.weight) / num_clients
        return (
            ToyState(
                params=tree_sub(x, mean_delta),
                control=jax.tree.map(lambda cc, d: cc + frac * d, c, mean_dc),
                client_states=client_states,
            ),
            {},
        )

    return fs.FederatedAlgorithm(init, apply)


def scaffold_by_hand(ds, rounds, steps):
    """SCAFFOLD option II in NumPy-style Python: every client trained alone, step by step."""
    n = ds.num_clients
    x = PARAMS
    c = jax.tree.map(jnp.zeros_like, PARAMS)
    c_i = [jax.tree.map(jnp.zeros_like, PARAMS) for _ in range(n)]
    grad = jax.grad(lambda p, bx, by: mean_loss(MODEL, p, bx, by))
    for r, ids in enumerate(rounds):
        cohort = pack_cohort(ds, ids, batch_size=2, num_steps=steps, seed=0, round_num=r)
        deltas, dcs = [], []
        for row, i in enumerate(ids):
            y, k = x, 0
            for s in range(steps):
                m = np.asarray(cohort.mask[row, s])
                if not m.any():
                    continue
                g = grad(y, cohort.batches["x"][row, s][m], cohort.batches["y"][row, s][m])
                # y <- y - lr (g - c_i + c)
                y = jax.tree.map(lambda y, g, ci, cc: y - LR * (g - ci + cc), y, g, c_i[i], c)
                k += 1
            delta = tree_sub(x, y)
            # c_i+ = c_i - c + (x - y) / (K lr)
            new_ci = jax.tree.map(lambda ci, cc, d: ci - cc + d / (k * LR), c_i[i], c, delta)
            deltas.append(delta)
            dcs.append(tree_sub(new_ci, c_i[i]))
            c_i[i] = new_ci
        mean = lambda trees: jax.tree.map(lambda *a: sum(a) / len(a), *trees)
        x = tree_sub(x, mean(deltas))  # global step size 1
        # c <- c + |S| / N * mean(c_i+ - c_i)
        c = jax.tree.map(lambda cc, d: cc + len(ids) / n * d, c, mean(dcs))
    return x, c, c_i


@pytest.mark.parametrize(
    "strategy, devices", [("vmap", 1), ("chunked", 1), ("sequential", 1), ("sequential", 3)]
)
def test_control_variates_match_scaffold_by_hand(strategy, devices):
    ds = ragged_dataset([5, 9, 3, 7, 6])
    mesh = fs.client_mesh(devices)
    algo = toy_scaffold(ds.num_clients, fs.Executor(strategy, chunk_size=2, mesh=mesh))
    step = jax.jit(algo.apply)
    state = fs.replicate(algo.init(PARAMS), mesh)
    rounds = [[0, 2], [2, 4], [1, 2]]
    n = fs.data.max_local_steps_of(ds, batch_size=2, local_epochs=1)
    for r, ids in enumerate(rounds):
        cohort = pack_cohort(ds, ids, batch_size=2, num_steps=n, num_clients=3, seed=0, round_num=r)
        state, _ = step(state, cohort, jax.random.key(r))
    assert step._cache_size() == 1
    x, c, c_i = scaffold_by_hand(ds, rounds, n)
    tree_allclose(state.params, x, rtol=1e-5, atol=1e-6)
    tree_allclose(state.control, c, rtol=1e-5, atol=1e-6)
    controls, counts = state.client_states
    for i in range(ds.num_clients):
        tree_allclose(jax.tree.map(lambda a, i=i: a[i], controls), c_i[i], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, [1, 1, 3, 0, 1])
    # Client 3 never took part: its control variate is exactly zero.
    assert not any(np.any(np.asarray(a[3])) for a in jax.tree.leaves(controls))
    assert jax.tree.structure(state) == jax.tree.structure(algo.init(PARAMS))


def test_toy_first_round_equals_fedavg_with_uniform_weights():
    # With all control variates zero the first round's correction vanishes: plain FedAvg.
    ds = ragged_dataset([5, 9, 3])
    cohort = pack_cohort(ds, [0, 1, 2], batch_size=2, seed=0, round_num=0)
    toy = toy_scaffold(3, fs.Executor("vmap"))
    state, _ = toy.apply(toy.init(PARAMS), cohort, jax.random.key(1))
    avg = fs.fedavg(MODEL, optax.sgd(LR), weighting="uniform")
    ref, _ = avg.apply(avg.init(PARAMS), cohort, jax.random.key(1))
    tree_allclose(state.params, ref.params, rtol=1e-6, atol=1e-7)

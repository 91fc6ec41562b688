"""A toy algorithm added the way every algorithm is: this one file plus one registry line
(``fs.algorithms.register("fedavg_memory", SPEC)``, or a line in ``algorithms.ALGORITHMS``).

FedAvg with a per-client update memory: client ``i`` sends ``u_i = beta * m_i + (1 - beta) *
delta_i`` and keeps ``m_i = u_i`` for its next round (``m_i`` starts at 0), the server takes the
example-weighted mean of the ``u_i`` as its pseudo-gradient (server SGD at 1.0). ``beta = 0``
is FedAvg. It exercises the protocol's three promises: an own hyperparameter in
``state.hparams`` (``algorithm_kwargs.beta``, a vectorized sweep axis), per-client state in
``state.client_states`` (kept, checkpointed and resumed by the driver), and the shared server
side (``ServerSide``: the mean, no transforms, server SGD at 1.0).
"""

import jax
import jax.numpy as jnp
import optax

import fedjax_sim as fs
from fedjax_sim.algorithms.base import (
    ServerSide,
    config_optimizer_hparams,
    on_mesh,
    optimizer_hparams,
    select_hparams,
    with_optimizer_hparams,
)
from fedjax_sim.core.client import local_train, tree_sub
from fedjax_sim.core.task import as_task, mean_loss_fn
from fedjax_sim.optimizers import optimizer_from_config

BETA = "algorithm_kwargs.beta"


def fedavg_memory(model, client_optimizer, *, num_clients, beta=0.5, executor=None, hparams=None):
    """FedAvg whose clients send a running mix of their updates (see the module docstring)."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}.")
    task = as_task(model)
    executor = (executor or fs.Executor()).check()
    loss_fn = mean_loss_fn(task)
    server = ServerSide(optax.sgd(1.0), fs.weighted_mean(), fs.chain())
    known = {BETA: float(beta), **optimizer_hparams(client_optimizer, "client")}
    hparams = select_hparams(known, hparams)

    def init(params):
        memory = jax.tree.map(lambda p: jnp.zeros((num_clients, *p.shape), p.dtype), params)
        return server.init(params, hparams, client_states=memory)

    def apply(state, cohort, key):
        def client_fn(broadcast, data, memory, ckey):
            hp = data["hparams"]
            local = local_train(
                broadcast,
                data["batches"],
                data["mask"],
                ckey,
                loss_fn=loss_fn,
                optimizer=client_optimizer,
                opt_state=with_optimizer_hparams(client_optimizer.init(broadcast), hp, "client"),
                examples=data.get("examples"),
            )
            b = hp[BETA]
            delta = tree_sub(broadcast, local.params)
            sent = jax.tree.map(lambda m, d: b * m + (1.0 - b) * d, memory, delta)
            return fs.ClientOutput(
                update=sent,
                weight=data["num_examples"],
                metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
                client_state=sent,
            )

        return server.round(state, cohort, key, client_fn, executor)

    # Its state on the executor's mesh from the start, where the rounds return it.
    return fs.FederatedAlgorithm(
        on_mesh(init, executor), apply, lazy_examples=True, hparams=hparams
    )


def hparams_of_config(config):
    return {
        BETA: float(config.algorithm_kwargs.get("beta", 0.5)),
        **config_optimizer_hparams(config.client, "client"),
    }


def build(config, ctx):
    return fedavg_memory(
        ctx.task,
        optimizer_from_config(config.client),
        num_clients=ctx.num_clients,
        beta=hparams_of_config(config)[BETA],
        executor=ctx.executor,
        hparams=hparams_of_config(config),
    )


SPEC = fs.AlgorithmSpec(
    build, hparams_of_config, "FedAvg with a per-client update memory", kwargs={"beta": 0.5}
)

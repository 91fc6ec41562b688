"""FedSGD: one full-batch gradient per client, aggregated, then a server step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_sim.aggregators import Aggregator, aggregate, weighted_mean
from fedjax_sim.algorithms.fedavg import ServerState, client_weight
from fedjax_sim.core.client import masked_mean_loss, match_vma, num_real_steps, step_batch
from fedjax_sim.core.execution import resolve_strategy
from fedjax_sim.core.round import (
    AGGREGATE_SALT,
    run_clients,
    weighted_client_metrics,
)
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Model
from fedjax_sim.optimizers import optimizer_update


def fedsgd(
    model: Model,
    server_optimizer: optax.GradientTransformation,
    *,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    strategy: str = "auto",
    chunk_size: int = 10,
    mesh: jax.sharding.Mesh | None = None,
) -> FederatedAlgorithm:
    """FedSGD (McMahan et al. 2017, the ``E = 1, B = inf`` baseline).

    Every client computes the gradient of its mean loss over all its examples at the server
    params (accumulated over its packed batches, so any batch size gives the full-batch
    gradient); the server takes the weighted mean and applies ``server_optimizer``. With
    example weighting, ``optax.sgd(lr)`` and all clients in the cohort, one round is one step
    of centralized gradient descent on the union of the clients' data.

    Args:
      model: the model.
      server_optimizer: applied to the aggregated gradient.
      weighting: ``num_examples`` or ``uniform``.
      aggregator: default the weighted mean.
      strategy: client execution strategy.
      chunk_size: clients per chunk for ``chunked``.
      mesh: optional device mesh (``fs.client_mesh()``) to split the cohort over devices.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``.
    """
    client_weight(jnp.zeros(()), weighting)
    aggregator = aggregator or weighted_mean()
    batch_loss = masked_mean_loss(model, train=True)

    def sum_loss(params, batch, mask, key):
        return batch_loss(params, batch, mask, key) * jnp.sum(mask).astype(jnp.float32)

    grad_fn = jax.value_and_grad(sum_loss)

    def init(params):
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            aggregator_state=aggregator.init(params),
            round=jnp.zeros((), jnp.int32),
        )

    def apply(state, cohort, key):
        params = state.params
        strat = resolve_strategy(strategy, params=params, num_clients=cohort.num_clients)

        def client_fn(broadcast, data, client_state, ckey):
            batches, mask = data["batches"], data["mask"]

            def body(i, carry):
                g_sum, l_sum, n = carry
                batch = step_batch(batches, mask, i, data.get("examples"))
                loss, g = grad_fn(broadcast, batch, mask[i], jax.random.fold_in(ckey, i))
                g_sum = jax.tree.map(jnp.add, g_sum, g)
                return g_sum, l_sum + loss, n + jnp.sum(mask[i]).astype(jnp.float32)

            zero = match_vma(jnp.zeros((), jnp.float32), mask)
            init = (jax.tree.map(jnp.zeros_like, broadcast), zero, zero)
            if strat == "sequential":
                g_sum, l_sum, n = lax.fori_loop(0, num_real_steps(mask), body, init)
            else:
                # Padded steps add exact zeros; a static scan vectorizes well (see local_train).
                g_sum, l_sum, n = lax.fori_loop(0, mask.shape[0], body, init)
            grad = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), g_sum)
            return ClientOutput(
                update=grad,
                weight=client_weight(data["num_examples"], weighting),
                metrics={"loss_sum": l_sum, "num_seen": n},
                client_state=client_state,
            )

        outputs, _ = run_clients(
            client_fn,
            cohort,
            key,
            broadcast=params,
            strategy=strat,
            chunk_size=chunk_size,
            mesh=mesh,
            sum_weighted_updates=aggregator.from_sums is not None,
        )
        agg_key = jax.random.fold_in(key, AGGREGATE_SALT)
        grad, agg_state = aggregate(aggregator, state.aggregator_state, outputs, agg_key)
        updates, opt_state = optimizer_update(server_optimizer, grad, state.opt_state, params)
        new_state = ServerState(
            params=optax.apply_updates(params, updates),
            opt_state=opt_state,
            aggregator_state=agg_state,
            round=state.round + 1,
        )
        return new_state, weighted_client_metrics(outputs)

    return FederatedAlgorithm(init=init, apply=apply, lazy_examples=True)

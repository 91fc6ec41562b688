"""FedAvg and the FedOpt family (FedAvgM, FedAdam, FedYogi, FedAdagrad)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.aggregators import Aggregator, aggregate, weighted_mean
from fedjax_sim.core.client import local_train, masked_mean_loss, tree_sub
from fedjax_sim.core.execution import resolve_strategy
from fedjax_sim.core.round import (
    AGGREGATE_SALT,
    UPDATE_SALT,
    run_clients,
    weighted_client_metrics,
)
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Model, Params, PyTree
from fedjax_sim.optimizers import optimizer_update, with_hyperparams

WEIGHTINGS = ("num_examples", "uniform")
# Local loops of at most this many packed steps are unrolled (measured: scripts/bench.py).
UNROLL_STEPS = 4

# (update, key) -> update: applied to each client's update before aggregation (clipping,
# noise, compression).
UpdateTransform = Callable[[Params, jax.Array], Params]


class ServerState(NamedTuple):
    """State of FedAvg/FedOpt between rounds.

    Attributes:
      params: the global model.
      opt_state: the server optimizer's state.
      aggregator_state: the aggregator's state.
      round: rounds applied so far (int32).
      client_hparams: values (scalar arrays) that replace the client optimizer's injected
        hyperparameters (``get_optimizer(..., inject=True)``) in every client's fresh
        optimizer state, e.g. ``{"learning_rate": 0.1}``. Empty: the optimizer's own values.
        Kept in the state so a sweep can vmap over them (``fedjax_sim.sweep``).
    """

    params: Params
    opt_state: PyTree
    aggregator_state: PyTree
    round: jax.Array
    client_hparams: Mapping[str, jax.Array] = {}  # noqa: RUF012 (never mutated)


def client_weight(num_examples: jax.Array, weighting: str) -> jax.Array:
    if weighting == "num_examples":
        return num_examples
    if weighting == "uniform":
        return (num_examples > 0).astype(num_examples.dtype)
    raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}.")


def fedopt(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    update_transform: UpdateTransform | None = None,
    strategy: str = "auto",
    chunk_size: int = 10,
    mesh: jax.sharding.Mesh | None = None,
) -> FederatedAlgorithm:
    """FedOpt (Reddi et al. 2021, Algorithm 1): local training, then a server optimizer step.

    Each client starts from the server params, runs its local steps with
    ``client_optimizer`` and returns the delta ``server - client``. The server averages the
    deltas (the pseudo-gradient) and applies ``server_optimizer`` to it. With
    ``optax.sgd(1.0)`` this is FedAvg (McMahan et al. 2017); with momentum, FedAvgM (Hsu et al.
    2019); with ``fs.optimizers.fedadam/fedyogi/fedadagrad``, FedAdam/FedYogi/FedAdagrad.

    Args:
      model: the model (its ``apply`` and per-example ``loss``).
      client_optimizer: the local optimizer, re-initialized every round.
      server_optimizer: applied to the aggregated pseudo-gradient.
      weighting: ``num_examples`` (weight by client size) or ``uniform``.
      aggregator: how client deltas combine; default the weighted mean.
      update_transform: optional ``(delta, key) -> delta`` applied per client before
        aggregation.
      strategy: client execution strategy (``auto``, ``vmap``, ``chunked``, ``sequential``).
      chunk_size: clients per chunk for ``chunked``.
      mesh: optional device mesh (``fs.client_mesh()``) to split the cohort over devices.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``.
    """
    client_weight(jnp.zeros(()), weighting)  # validates the name eagerly
    aggregator = aggregator or weighted_mean()
    loss_fn = masked_mean_loss(model, train=True)

    def init(params):
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            aggregator_state=aggregator.init(params),
            round=jnp.zeros((), jnp.int32),
        )

    def apply(state, cohort, key):
        server_params = state.params
        strat = resolve_strategy(strategy, params=server_params, num_clients=cohort.num_clients)

        client_hparams = dict(state.client_hparams)

        def client_fn(broadcast, data, client_state, ckey):
            opt_state = None
            if client_hparams:
                opt_state = with_hyperparams(client_optimizer.init(broadcast), client_hparams)
            local = local_train(
                broadcast,
                data["batches"],
                data["mask"],
                ckey,
                loss_fn=loss_fn,
                optimizer=client_optimizer,
                opt_state=opt_state,
                # A few steps unroll best; many ragged ones want the dynamic loop.
                static_loop=strat != "sequential" or cohort.num_steps <= UNROLL_STEPS,
                unroll=cohort.num_steps <= UNROLL_STEPS,
            )
            delta = tree_sub(broadcast, local.params)
            if update_transform is not None:
                delta = update_transform(delta, jax.random.fold_in(ckey, UPDATE_SALT))
            return ClientOutput(
                update=delta,
                weight=client_weight(data["num_examples"], weighting),
                metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
                client_state=client_state,
            )

        outputs, _ = run_clients(
            client_fn,
            cohort,
            key,
            broadcast=server_params,
            strategy=strat,
            chunk_size=chunk_size,
            mesh=mesh,
            sum_weighted_updates=aggregator.from_sums is not None,
        )
        agg_key = jax.random.fold_in(key, AGGREGATE_SALT)
        pseudo_grad, agg_state = aggregate(aggregator, state.aggregator_state, outputs, agg_key)
        updates, opt_state = optimizer_update(
            server_optimizer, pseudo_grad, state.opt_state, server_params
        )
        new_state = ServerState(
            params=optax.apply_updates(server_params, updates),
            opt_state=opt_state,
            aggregator_state=agg_state,
            round=state.round + 1,
            client_hparams=state.client_hparams,
        )
        return new_state, weighted_client_metrics(outputs)

    return FederatedAlgorithm(init=init, apply=apply)


def fedavg(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    *,
    server_learning_rate: float = 1.0,
    **kwargs,
) -> FederatedAlgorithm:
    """FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"): ``fedopt`` with the server optimizer ``sgd(server_learning_rate)``.

    Args:
      model: the model.
      client_optimizer: the local optimizer.
      server_learning_rate: 1.0 replaces the global model by the clients' weighted mean.
      **kwargs: ``weighting``, ``aggregator``, ``update_transform``, ``strategy``,
        ``chunk_size``, ``mesh`` as in ``fedopt``.

    Returns:
      A ``FederatedAlgorithm``.
    """
    return fedopt(model, client_optimizer, optax.sgd(server_learning_rate), **kwargs)

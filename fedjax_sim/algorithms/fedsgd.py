"""FedSGD: one full-batch gradient per client, aggregated, then a server step."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_sim.aggregators import Aggregator
from fedjax_sim.aggregators.pipeline import Pipeline, build_pipeline
from fedjax_sim.aggregators.transforms import AggregationTransform
from fedjax_sim.algorithms.base import (
    AlgorithmSpec,
    BuildContext,
    ServerSide,
    client_weight,
    config_optimizer_hparams,
    on_mesh,
    optimizer_hparams,
    pipeline_for,
    select_hparams,
)
from fedjax_sim.core.client import match_vma, num_real_steps, step_batch
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.task import as_task, mean_loss_fn
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm
from fedjax_sim.features import FEATURES, pipeline_hparams_of_config
from fedjax_sim.optimizers import optimizer_from_config


def fedsgd(
    model,
    server_optimizer: optax.GradientTransformation,
    *,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    transforms: tuple[AggregationTransform, ...] = (),
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """FedSGD (McMahan et al. 2017, the ``E = 1, B = inf`` baseline).

    Every client computes the gradient of its mean loss over all its examples at the server
    params (accumulated over its packed batches, so any batch size gives the full-batch
    gradient); the server takes the weighted mean and applies ``server_optimizer``. With
    example weighting, ``optax.sgd(lr)`` and all clients in the cohort, one round is one step
    of centralized gradient descent on the union of the clients' data. The server optimizer's
    injected hyperparameters live in ``state.hparams``.

    Args:
      model: a ``Model`` or a ``Task``.
      server_optimizer: applied to the aggregated gradient.
      weighting: ``num_examples`` or ``uniform``.
      aggregator: default the weighted mean.
      transforms: aggregation transforms (``fedjax_sim.aggregators.transforms``).
      executor: how clients run (default ``Executor()``).
      pipeline: a built aggregation pipeline (``aggregators.pipeline``: clipping, noise,
        compression, attacks, the reducer) in place of ``aggregator`` and ``transforms``;
        each client's gradient goes through it.
      hparams: the hyperparameters ``state.hparams`` keeps (default: every injected one of
        the server optimizer; a subset of those).

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``.
    """
    task = as_task(model)
    executor = (executor or Executor()).check()
    client_weight(jnp.zeros(()), weighting)
    if pipeline is None:
        pipeline = build_pipeline(weighting=weighting, aggregator=aggregator, transforms=transforms)
    known = {**pipeline.hparams, **optimizer_hparams(server_optimizer, "server")}
    hparams = select_hparams(known, hparams)

    mean_loss = mean_loss_fn(task, train=True)

    def sum_loss(params, batch, mask, key):
        mean, weight = mean_loss(params, batch, mask, key)
        return mean * weight, weight

    grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

    server = ServerSide.of(server_optimizer, pipeline)

    def init(params):
        return server.init(params, hparams)

    def apply(state, cohort, key):
        sequential = executor.resolved() == "sequential"

        def client_fn(broadcast, data, client_state, ckey):
            batches, mask = data["batches"], data["mask"]

            def body(i, carry):
                g_sum, l_sum, n = carry
                batch = step_batch(batches, mask, i, data.get("examples"))
                (loss, weight), g = grad_fn(broadcast, batch, mask[i], jax.random.fold_in(ckey, i))
                g_sum = jax.tree.map(jnp.add, g_sum, g)
                return g_sum, l_sum + loss, n + weight

            zero = match_vma(jnp.zeros((), jnp.float32), mask)
            init = (jax.tree.map(jnp.zeros_like, broadcast), zero, zero)
            # Padded steps add exact zeros; without a dynamic bound the loop vectorizes well.
            steps = num_real_steps(mask) if sequential else mask.shape[0]
            g_sum, l_sum, n = lax.fori_loop(0, steps, body, init)
            grad = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), g_sum)
            return ClientOutput(
                update=grad,
                weight=client_weight(data["num_examples"], weighting),
                metrics={"loss_sum": l_sum, "num_seen": n},
                client_state=client_state,
            )

        return server.round(state, cohort, key, client_fn, executor)

    return FederatedAlgorithm(
        init=on_mesh(init, executor), apply=apply, lazy_examples=True, hparams=hparams
    )


def hparams_of_config(config) -> dict[str, float]:
    return {
        **pipeline_hparams_of_config(config),
        **config_optimizer_hparams(config.server, "server"),
    }


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``fedsgd`` from a config: the ``server.*`` optimizer, ``weighting`` and the framework's
    aggregation pipeline (``ctx.pipeline``)."""
    return fedsgd(
        ctx.task,
        optimizer_from_config(config.server),
        weighting=config.weighting,
        pipeline=pipeline_for(config, ctx),
        executor=ctx.executor,
        hparams=hparams_of_config(config),
    )


SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    description="FedSGD: one full-batch gradient per client (McMahan et al. 2017)",
    supports=frozenset(FEATURES) - {"proximal_term"},
)

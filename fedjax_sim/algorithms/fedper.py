"""FedPer: federated base layers, personal top layers (Arivazhagan et al. 2019)."""

from __future__ import annotations

from collections.abc import Mapping

import optax

from fedjax_sim.aggregators import Aggregator
from fedjax_sim.aggregators.pipeline import Pipeline
from fedjax_sim.algorithms.base import (
    AlgorithmSpec,
    BuildContext,
    local_update,
    optimizer_and_pipeline_hparams,
    optimizer_hparams,
    pipeline_for,
    select_hparams,
)
from fedjax_sim.algorithms.heads import (
    body_and_head_model,
    body_messages,
    body_pipeline,
    choose_head,
    personal_head_algorithm,
)
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.task import as_task, mean_loss_fn
from fedjax_sim.core.types import FederatedAlgorithm, Model
from fedjax_sim.features import FEATURES
from fedjax_sim.optimizers import optimizer_from_config


def fedper(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    *,
    num_clients: int,
    head_layers: int = 1,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers").

    The model's last ``head_layers`` top-level layers (in the order ``model.init`` creates
    them, see ``algorithms.heads``) are personalization layers kept by each client; the other
    (base) layers are federated. Each round a sampled client loads the server's base layers
    under its own head, trains base and head jointly for its local steps with
    ``client_optimizer`` (re-initialized every round), keeps the head and uploads the base;
    the server averages the bases (Algorithm 1: ``W_B <- sum_j n_j/n W_B,j`` is
    ``server_optimizer = sgd(1.0)`` on the mean update; any Optax server optimizer works).

    A client's head before its first round is the initial model's head (the paper initializes
    personalization layers on each client; all start from the same draw here). ``state.params``
    is the global base with the example-weighted mean of the round's clients' new heads (an
    evaluation device: no client receives it); ``personalize(state, ids)`` gives each client's
    own model (base + its head).

    Args:
      model: a ``Model`` (or ``Task``) whose params are a dict of at least two layers.
      client_optimizer: the local optimizer (base and head together).
      server_optimizer: applied to the mean base update (default ``sgd(1.0)``: FedAvg).
      num_clients: the training population (one head each).
      head_layers: how many of the last top-level layers are personal (default 1).
      weighting: ``num_examples`` (the paper's ``n_j/n``) or ``uniform``.
      aggregator: how base updates combine (default the weighted mean).
      pipeline: the aggregation pipeline (``aggregators.pipeline``) the body updates go
        through instead of ``aggregator`` alone (a config's build passes the framework's).
      executor: how clients run.
      hparams: which optimizer hyperparameters ``state.hparams`` keeps (default: every
        injected one), with their values.

    Returns:
      A ``FederatedAlgorithm`` with ``personalize``; its state is a ``ServerState`` whose
      ``client_states`` are the heads (each leaf ``[num_clients, ...]``).
    """
    task = as_task(model)
    split = choose_head(task, head_layers, algorithm="fedper")
    executor = (executor or Executor()).check()
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    pipeline = body_pipeline(pipeline, aggregator, weighting)
    known = {
        **pipeline.hparams,
        **optimizer_hparams(client_optimizer, "client"),
        **optimizer_hparams(server_optimizer, "server"),
    }
    hparams = select_hparams(known, hparams)
    loss_fn = mean_loss_fn(task, train=True)

    def client_update(body, head, data, ckey):
        params = split.merge(body, head)
        local = local_update(
            params,
            data,
            ckey,
            loss_fn=loss_fn,
            optimizer=client_optimizer,
            executor=executor,
        )
        new_body, new_head = split.split(local.params)
        return new_body, new_head, local.loss_sum, local.num_seen

    return personal_head_algorithm(
        split,
        client_update,
        server_optimizer=server_optimizer,
        num_clients=num_clients,
        hparams=hparams,
        weighting=weighting,
        executor=executor,
        pipeline=pipeline,
    )


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``fedper`` from a config: ``client.*``/``server.*`` optimizers, ``weighting``,
    ``aggregator``, ``algorithm_kwargs.head_layers`` (default 1)."""
    return fedper(
        ctx.task,
        optimizer_from_config(config.client),
        optimizer_from_config(config.server),
        num_clients=ctx.num_clients,
        head_layers=config.algorithm_kwargs.get("head_layers", 1),
        weighting=config.weighting,
        pipeline=pipeline_for(config, ctx),
        executor=ctx.executor,
        hparams=optimizer_and_pipeline_hparams(config),
    )


SPEC = AlgorithmSpec(
    build=build,
    hparams=optimizer_and_pipeline_hparams,
    config_defaults=body_and_head_model,
    # DP is refused: the reported model averages the cohort's personal heads, unnoised.
    supports=frozenset(FEATURES) - {"dp", "adaptive_clipping", "proximal_term"},
    kwargs={"head_layers": 1},
    description="FedPer: FedAvg of the base layers, personal head layers on every client",
    messages=body_messages,
)

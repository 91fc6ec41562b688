"""FedRep: a federated representation, personal heads trained first (Collins et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_sim.aggregators import Aggregator
from fedjax_sim.aggregators.pipeline import Pipeline
from fedjax_sim.algorithms.base import (
    AlgorithmSpec,
    BuildContext,
    config_optimizer_hparams,
    local_update,
    optimizer_hparams,
    pipeline_for,
    select_hparams,
    with_optimizer_hparams,
)
from fedjax_sim.algorithms.heads import (
    body_and_head_model,
    body_messages,
    body_pipeline,
    choose_head,
    is_count,
    personal_head_algorithm,
)
from fedjax_sim.core.client import match_vma, num_real_steps, step_batch
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.task import as_task, mean_loss_fn
from fedjax_sim.core.types import FederatedAlgorithm, Model
from fedjax_sim.features import FEATURES, pipeline_hparams_of_config
from fedjax_sim.optimizers import optimizer_from_config, optimizer_update

HEAD_EPOCHS = "algorithm_kwargs.head_epochs"


def fedrep(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    *,
    num_clients: int,
    head_layers: int = 1,
    head_epochs: int = 10,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized
    Federated Learning", Algorithm 1).

    The model's last ``head_layers`` top-level layers are each client's head ``h_i``, the rest
    the shared representation ``phi`` (see ``algorithms.heads``). Each round a sampled client
    first trains its head with ``phi`` frozen for ``tau_h = head_epochs`` epochs, then
    ``phi`` with the new head frozen for its usual local steps, keeps the head and uploads
    ``phi``; the server averages the representations (``server_optimizer = sgd(1.0)``; the
    reference code weighs clients by their sizes, ``weighting="num_examples"``).

    A head epoch is one pass over the client's real packed steps of the round (its
    ``local_epochs`` passes over its data, capped by ``max_local_steps``): the head runs
    ``tau_h * tau_i`` steps, step ``j`` on packed batch ``j mod tau_i``, ``tau_i`` the client's
    real steps. With ``local_epochs = 1`` (the paper's one epoch for ``phi``) that is
    ``tau_h`` epochs of its data; the paper's experiments use ``tau_h = 10``. Both phases use
    ``client_optimizer``, each with a fresh state over its own parameters (the reference
    code's frozen parameters keep no optimizer state either). Heads start at the initial
    model's head (the reference code's ``w_locals``); ``state.params`` holds the global ``phi``
    with the example-weighted mean of the round's new heads, as the reference code's
    ``net_glob`` does; ``personalize(state, ids)`` gives each client's own model.

    ``head_epochs`` lives in ``state.hparams`` (``algorithm_kwargs.head_epochs``), so a sweep
    over it runs in one program (its loop bound then differs per member: each member runs the
    longest member's head steps with the others masked).

    Args:
      model: a ``Model`` (or ``Task``) whose params are a dict of at least two layers.
      client_optimizer: the local optimizer of both phases.
      server_optimizer: applied to the mean representation update (default ``sgd(1.0)``).
      num_clients: the training population (one head each).
      head_layers: how many of the last top-level layers are the head (default 1).
      head_epochs: ``tau_h``, passes over the round's steps for the head (an integer >= 1).
      weighting: ``num_examples`` or ``uniform``.
      aggregator: how representation updates combine (default the weighted mean).
      pipeline: the aggregation pipeline (``aggregators.pipeline``) the body updates go
        through instead of ``aggregator`` alone (a config's build passes the framework's).
      executor: how clients run.
      hparams: which hyperparameters ``state.hparams`` keeps (default: ``head_epochs`` and
        every injected optimizer hyperparameter), with their values.

    Returns:
      A ``FederatedAlgorithm`` with ``personalize``; its state is a ``ServerState`` whose
      ``client_states`` are the heads. Its train loss is the representation phase's.
    """
    if not is_count(head_epochs) or head_epochs < 1:
        raise ValueError(
            f"fedrep: head_epochs must be an integer >= 1 (tau_h, the head's local epochs; "
            f"the paper uses 10), got {head_epochs!r}."
        )
    task = as_task(model)
    split = choose_head(task, head_layers, algorithm="fedrep")
    executor = (executor or Executor()).check()
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    pipeline = body_pipeline(pipeline, aggregator, weighting)
    known = {
        **pipeline.hparams,
        HEAD_EPOCHS: float(head_epochs),
        **optimizer_hparams(client_optimizer, "client"),
        **optimizer_hparams(server_optimizer, "server"),
    }
    hparams = select_hparams(known, hparams)
    loss_fn = mean_loss_fn(task, train=True)

    def train_head(head, body, data, key):
        """``tau_h * tau_i`` steps on the head, ``phi`` frozen, cycling over the real steps."""
        hp, mask = data["hparams"], data["mask"]
        tau = num_real_steps(mask)
        epochs = hp[HEAD_EPOCHS].astype(jnp.int32) if HEAD_EPOCHS in hp else int(head_epochs)
        grad_fn = jax.grad(lambda h, batch, m, k: loss_fn(split.merge(body, h), batch, m, k)[0])
        opt_state = with_optimizer_hparams(client_optimizer.init(head), hp, "client")

        def step(j, carry):
            h, s = carry
            i = j % jnp.maximum(tau, 1)
            batch = step_batch(data["batches"], mask, i, data.get("examples"))
            g = grad_fn(h, batch, mask[i], jax.random.fold_in(key, j))
            updates, s = optimizer_update(client_optimizer, g, s, h)
            return optax.apply_updates(h, updates), s

        # Under shard_map the fresh optimizer counters must vary per device like the data.
        carry = (head, match_vma(opt_state, mask))
        return lax.fori_loop(0, epochs * tau, step, carry)[0]

    def client_update(body, head, data, ckey):
        head_key, body_key = jax.random.split(ckey)
        head = train_head(head, body, data, head_key)
        local = local_update(
            body,
            data,
            body_key,
            loss_fn=lambda b, batch, m, k: loss_fn(split.merge(b, head), batch, m, k),
            optimizer=client_optimizer,
            executor=executor,
        )
        return local.params, head, local.loss_sum, local.num_seen

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


def hparams_of_config(config) -> dict[str, float]:
    """``fedrep``'s hyperparameters for ``config``: ``algorithm_kwargs.head_epochs`` (default
    10) and the client and server optimizers'."""
    return {
        HEAD_EPOCHS: float(config.algorithm_kwargs.get("head_epochs", 10)),
        **config_optimizer_hparams(config.client, "client"),
        **config_optimizer_hparams(config.server, "server"),
        **pipeline_hparams_of_config(config),
    }


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``fedrep`` from a config: ``client.*``/``server.*`` optimizers, ``weighting``,
    ``aggregator``, ``algorithm_kwargs.head_layers`` (default 1) and ``head_epochs``."""
    hp = hparams_of_config(config)
    return fedrep(
        ctx.task,
        optimizer_from_config(config.client),
        optimizer_from_config(config.server),
        num_clients=ctx.num_clients,
        head_layers=config.algorithm_kwargs.get("head_layers", 1),
        head_epochs=config.algorithm_kwargs.get("head_epochs", 10),
        weighting=config.weighting,
        pipeline=pipeline_for(config, ctx),
        executor=ctx.executor,
        hparams=hp,
    )


SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    config_defaults=body_and_head_model,
    # DP is refused: the reported model averages the cohort's personal heads, unnoised.
    supports=frozenset(FEATURES) - {"dp", "adaptive_clipping", "proximal_term"},
    kwargs={"head_layers": 1, "head_epochs": 10},
    description="FedRep: personal heads trained first, then the shared representation (FedAvg)",
    messages=body_messages,
)

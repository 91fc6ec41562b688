"""A shared body and personal heads: choosing the head, splitting and merging params, and the
round of algorithms that federate the body and keep every client's head on the client
(FedPer, FedRep).

A model's layers are its params' top-level keys in the order ``model.init`` creates them
(Flax: ``Dense_0, Dense_1, ..., Dense_10``; ``Conv_0, Conv_1, Dense_0, Dense_1``). The head is
the last ``head_layers`` of them, the body the rest. The order is read from the model itself
(``layer_order``), not from the keys: tree operations return dicts in sorted key order, which
puts ``Dense_10`` before ``Dense_2`` and ``BasicBlock_*`` before ``Conv_0``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.aggregators import Aggregator
from fedjax_sim.aggregators.pipeline import Pipeline, build_pipeline
from fedjax_sim.algorithms.base import (
    Messages,
    ServerSide,
    ServerState,
    client_weight,
    on_mesh,
)
from fedjax_sim.core.client import tree_sub
from fedjax_sim.core.execution import Executor, gather_client_states
from fedjax_sim.core.task import as_task
from fedjax_sim.core.types import Array, ClientOutput, FederatedAlgorithm, Params, PRNGKey

# (body, head, client data, key) -> (new body, new head, loss_sum, num_seen): a client's local
# work from the server's body and its own head (``data["hparams"]`` holds the round's numbers).
ClientUpdate = Callable[[Params, Params, dict, PRNGKey], tuple[Params, Params, Array, Array]]


class HeadSplit(NamedTuple):
    """Which top-level keys of the params form the shared body and which the personal head.

    Attributes:
      body: the body's keys, in model order.
      head: the head's keys (the last layers), in model order.
    """

    body: tuple[str, ...]
    head: tuple[str, ...]

    def split(self, params: Mapping[str, Params]) -> tuple[dict, dict]:
        """``(body, head)``: two dicts of the params' layers."""
        missing = sorted(set(self.body + self.head) - set(params))
        extra = sorted(set(params) - set(self.body + self.head))
        if missing or extra:
            raise ValueError(
                f"params do not match the model's layers: missing {missing}, unexpected "
                f"{extra} (the layers are {', '.join(self.body + self.head)})."
            )
        return {k: params[k] for k in self.body}, {k: params[k] for k in self.head}

    def merge(self, body: Mapping[str, Params], head: Mapping[str, Params]) -> dict:
        """The params with ``body``'s and ``head``'s layers (the inverse of ``split``)."""
        return {**{k: body[k] for k in self.body}, **{k: head[k] for k in self.head}}


def layer_order(model) -> tuple[str, ...]:
    """The params' top-level keys in the order ``model.init`` creates them.

    Read while tracing ``init`` abstractly (``jax.eval_shape``): no parameter is computed.

    Args:
      model: a ``Model`` or a ``Task``.

    Returns:
      The layer names, first to last.
    """
    init = as_task(model).model.init
    order: list[str] = []

    def probe(key):
        params = init(key)
        if not isinstance(params, Mapping):
            raise ValueError(
                f"a shared body and personal heads need params that are a dict of layers; "
                f"this model's init returns {type(params).__name__}."
            )
        order.extend(params.keys())
        return params

    jax.eval_shape(probe, jax.random.key(0))
    return tuple(order)


def choose_head(model, head_layers: int, *, algorithm: str) -> HeadSplit:
    """The split whose head is the model's last ``head_layers`` layers.

    Args:
      model: a ``Model`` or a ``Task``.
      head_layers: how many of the last top-level layers are personal (>= 1).
      algorithm: the algorithm's name, for messages.

    Returns:
      The ``HeadSplit``.

    Raises:
      ValueError: ``head_layers`` is not a positive integer, or leaves no body.
    """
    if not is_count(head_layers) or head_layers < 1:
        raise ValueError(
            f"{algorithm}: head_layers must be a positive integer (how many of the model's "
            f"last layers are personal), got {head_layers!r}."
        )
    head_layers = int(head_layers)
    order = layer_order(model)
    if head_layers >= len(order):
        name = as_task(model).model.name
        raise ValueError(
            f"{algorithm}: model {name!r} has {len(order)} top-level layer(s) "
            f"({', '.join(order)}); a head of the last {head_layers} leaves no shared body. "
            "Use a model with more layers (e.g. --config.model.name=mlp) or lower "
            "algorithm_kwargs.head_layers."
        )
    return HeadSplit(body=order[:-head_layers], head=order[-head_layers:])


def is_count(value) -> bool:
    """An integer, or a float with an integer value (a sweep sets numbers as floats)."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
    )


def personal_head_algorithm(
    split: HeadSplit,
    client_update: ClientUpdate,
    *,
    server_optimizer: optax.GradientTransformation,
    num_clients: int,
    hparams: Mapping[str, float],
    pipeline: Pipeline,
    weighting: str = "num_examples",
    executor: Executor | None = None,
) -> FederatedAlgorithm:
    """The round shared by FedPer and FedRep: the body is federated, heads stay on clients.

    Every client's head lives in ``state.client_states`` (each leaf ``[num_clients, ...]``),
    starting at the initial model's head. A sampled client runs ``client_update`` from the
    server's body and its own head, keeps its new head and uploads only its body: the update
    is ``body - new body`` (the FedAvg sign), goes through ``pipeline`` (its reducer weighs
    clients by ``weighting``) and ``server_optimizer`` (``sgd(1.0)``: the mean of the
    bodies). Heads of clients not sampled do not change.

    ``state.params`` (what the driver evaluates as the global model) is the global body with
    the ``weighting``-weighted mean of the heads the round's clients ended with (FedRep's
    reference code reports the same average; no client ever starts from it). Each client's own
    model is ``personalize(state, ids)``.

    Args:
      split: the body's and the head's layers.
      client_update: a client's local work (see ``ClientUpdate``).
      server_optimizer: applied to the aggregated body update.
      num_clients: the training population (rows of the head table).
      hparams: the numbers ``state.hparams`` keeps (their values, the pipeline's included).
      pipeline: the aggregation pipeline the body updates go through (``body_pipeline``).
      weighting: ``num_examples`` or ``uniform``, for the body and the reported head.
      executor: how clients run.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``: ``params`` the full model, the
      server optimizer's and aggregator's states those of the body, ``client_states`` the heads.
    """
    executor = (executor or Executor()).check()
    client_weight(jnp.zeros(()), weighting)  # validates the name eagerly
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    server = ServerSide.of(server_optimizer, pipeline)

    def init(params):
        body, head = split.split(params)
        table = jax.tree.map(lambda h: jnp.broadcast_to(h, (num_clients, *h.shape)), head)
        return server.init(body, hparams, client_states=table)._replace(params=params)

    def apply(state: ServerState, cohort, key):
        def client_fn(body, data, head, ckey):
            new_body, new_head, loss_sum, num_seen = client_update(body, head, data, ckey)
            return ClientOutput(
                update=tree_sub(body, new_body),
                weight=client_weight(data["num_examples"], weighting),
                metrics={"loss_sum": loss_sum, "num_seen": num_seen},
                client_state=new_head,
            )

        body, head = split.split(state.params)
        new, metrics = server.round(state._replace(params=body), cohort, key, client_fn, executor)
        # The reported head: the weighted mean of the cohort's new heads (padded rows weigh 0).
        w = client_weight(cohort.num_examples, weighting)
        total = jnp.sum(w)
        heads = gather_client_states(new.client_states, cohort.table_rows)

        def mean_head(stacked, old):
            summed = jnp.tensordot(w.astype(stacked.dtype), stacked, axes=1)
            return jnp.where(total > 0, summed / jnp.maximum(total, 1e-30), old)

        reported = jax.tree.map(mean_head, heads, head)
        return new._replace(params=split.merge(new.params, reported)), metrics

    def personalize(state: ServerState, client_ids):
        body, _ = split.split(state.params)
        k = client_ids.shape[0]
        bodies = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), body)
        return split.merge(bodies, gather_client_states(state.client_states, client_ids))

    return FederatedAlgorithm(
        init=on_mesh(init, executor),
        apply=apply,
        lazy_examples=True,
        hparams=dict(hparams),
        personalize=personalize,
    )


def body_pipeline(
    pipeline: Pipeline | None, aggregator: Aggregator | None, weighting: str
) -> Pipeline:
    """FedPer's and FedRep's aggregation pipeline: ``pipeline`` (a config's build passes the
    framework's), or one with ``aggregator`` alone; never DP numbers (the reported model
    averages unnoised heads)."""
    if pipeline is None:
        pipeline = build_pipeline(weighting=weighting, aggregator=aggregator, dp_numbers=False)
    elif aggregator is not None:
        raise ValueError("pass the aggregator inside the pipeline, not beside it.")
    return pipeline


def body_messages(config, task, params):
    """FedPer's and FedRep's ``AlgorithmSpec.messages``: the body down and up (the heads never
    leave the clients)."""
    head_layers = config.algorithm_kwargs.get("head_layers", 1)
    body, _ = choose_head(task, head_layers, algorithm=str(config.algorithm)).split(params)
    return Messages(down=body, update=body)


def body_and_head_model(config) -> dict:
    """``AlgorithmSpec.config_defaults`` of FedPer and FedRep: a config on the one-layer
    ``logreg`` (no body to share) switches to ``mlp``, the smallest model with a body and a
    head; any other model is kept (``choose_head`` refuses one with too few layers)."""
    model = config.model
    if model.name == "logreg" and not model.kwargs.to_dict():
        return {"model.name": "mlp"}
    return {}

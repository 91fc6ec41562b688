"""Aggregation transforms: the stateful, composable steps between the clients and the server
optimizer, in Optax's style (``init`` plus pure update functions, combined with ``chain``).

A round's server side is: every client's update passes the ``client`` stage of each transform
(inside the client loop, in chain order: clipping, compression, masking...), the aggregator
(``fedjax_sim.aggregators``) reduces them, and the aggregate passes the ``server`` stage of each
transform (noise, unmasking, adaptive clip-norm updates...) before the Optax server optimizer.
Each stage sees the round's hyperparameters (``state.hparams``), a key, and the client ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from fedjax_sim.core.types import Array, Params, PRNGKey, PyTree


class ClientContext(NamedTuple):
    """What a transform's ``client`` stage sees besides the update.

    Attributes:
      client_id: the client's index in its dataset (out of range for a padded client).
      weight: its aggregation weight (0 for a padded client).
      key: the client's key for update transforms (``fold_in(client_key, UPDATE_SALT)``).
      hparams: the algorithm's hyperparameters this round (``state.hparams``).
      state: the transform's own state as the round starts (adaptive clipping's clip norm);
        read-only on the clients.
    """

    client_id: Array
    weight: Array
    key: PRNGKey
    hparams: Mapping[str, Array]
    state: PyTree = ()


class ServerContext(NamedTuple):
    """What a transform's ``server`` stage sees besides the aggregate.

    Attributes:
      key: the round key (transforms fold in their own salt, ``core.keys``).
      hparams: the algorithm's hyperparameters this round.
      client_ids: ``[cohort]`` ids of the cohort's clients.
      weights: ``[cohort]`` aggregation weights (0 for padding).
      num_clients: the number of real clients in the cohort (float32, at least 1).
    """

    key: PRNGKey
    hparams: Mapping[str, Array]
    client_ids: Array
    weights: Array
    num_clients: Array


class AggregationTransform(NamedTuple):
    """``init(params) -> state``; ``client(update, ctx) -> update`` per client (stateless, in
    the client loop); ``server(aggregate, state, ctx) -> (aggregate, state)`` once per round;
    ``metrics(state) -> {name: scalar}``, the transform's own round metrics read from its
    state after the round (they reach ``metrics.jsonl``); ``upload_bits(d) -> bits``, what
    one client sends for a ``d``-number update once this transform encoded it (a
    compressor's count; ``None``: the transform does not change what is sent). Any of the
    last four may be ``None``."""

    init: Callable[[Params], PyTree]
    client: Callable[[Params, ClientContext], Params] | None = None
    server: Callable[[Params, PyTree, ServerContext], tuple[Params, PyTree]] | None = None
    metrics: Callable[[PyTree], dict[str, Array]] | None = None
    upload_bits: Callable[[int], int] | None = None


def identity() -> AggregationTransform:
    return AggregationTransform(init=lambda params: ())


def chain(*transforms: AggregationTransform) -> AggregationTransform:
    """The transforms applied in order (client stages in order, then server stages in order);
    the state is the tuple of their states; what is sent is the last encoding's
    (``upload_bits``)."""
    if not transforms:
        return identity()
    if len(transforms) == 1:
        return transforms[0]

    def init(params):
        return tuple(t.init(params) for t in transforms)

    clients = [i for i, t in enumerate(transforms) if t.client is not None]

    def client(update, ctx):
        states = ctx.state
        for i in clients:
            update = transforms[i].client(update, ctx._replace(state=states[i]))
        return update

    def server(aggregate, state, ctx):
        new_states = []
        for t, s in zip(transforms, state, strict=True):
            if t.server is not None:
                aggregate, s = t.server(aggregate, s, ctx)
            new_states.append(s)
        return aggregate, tuple(new_states)

    def metrics(state):
        out = {}
        for t, s in zip(transforms, state, strict=True):
            if t.metrics is not None:
                out.update(t.metrics(s))
        return out

    has_server = any(t.server is not None for t in transforms)
    has_metrics = any(t.metrics is not None for t in transforms)
    encodings = [t.upload_bits for t in transforms if t.upload_bits is not None]
    return AggregationTransform(
        init=init,
        client=client if clients else None,
        server=server if has_server else None,
        metrics=metrics if has_metrics else None,
        upload_bits=encodings[-1] if encodings else None,
    )


def client_map(fn: Callable[[Params, PRNGKey], Params]) -> AggregationTransform:
    """A stateless per-client transform from ``(update, key) -> update``."""
    return AggregationTransform(init=lambda params: (), client=lambda u, ctx: fn(u, ctx.key))

"""What every algorithm is built from: the registry entry, the server state, the round.

An algorithm is one file that defines ``SPEC = AlgorithmSpec(build=..., hparams=...)`` and one
line in ``fedjax_sim.algorithms.ALGORITHMS`` (or ``fs.algorithms.register(name, SPEC)`` from
user code). ``build(config, ctx)`` returns a ``FederatedAlgorithm``; ``hparams(config)`` names
its numeric hyperparameters (config field paths) with their values, which the algorithm keeps
in ``state.hparams`` and the sweep vectorizes over.

``ServerSide`` (its ``round`` is ``federated_round``) is the composable server side most
algorithms share: the clients' local work (run by the ``Executor``), each client's update
through the transforms' client stage, the aggregator, the transforms' server stage, then the
Optax server optimizer on the result.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.aggregators import Aggregator, aggregate
from fedjax_sim.aggregators.adversary import FRACTION, Adversary
from fedjax_sim.aggregators.compression import Compressor, with_error_feedback
from fedjax_sim.aggregators.pipeline import Pipeline, build_pipeline
from fedjax_sim.aggregators.transforms import AggregationTransform, ClientContext, ServerContext
from fedjax_sim.core.client import LocalResult, local_train
from fedjax_sim.core.execution import ClientFn, Executor, replicate
from fedjax_sim.core.keys import AGGREGATE_SALT, EF_SALT, UPDATE_SALT
from fedjax_sim.core.task import Task, as_task, mean_loss_fn
from fedjax_sim.core.types import ClientOutput, Cohort, FederatedAlgorithm, Params, PyTree
from fedjax_sim.features import FEATURES, pipeline_hparams_of_config
from fedjax_sim.optimizers import (
    get_optimizer,
    injected_hyperparams,
    optimizer_update,
    with_hyperparams,
)

WEIGHTINGS = ("num_examples", "uniform")
# What FedOpt's round takes (``features.FEATURES``): every feature, through ``ServerSide``.
ALL_FEATURES = frozenset(FEATURES)
# Local loops of at most this many packed steps are unrolled (measured: scripts/bench.py).
UNROLL_STEPS = 4


class BuildContext(NamedTuple):
    """What the driver hands an algorithm's builder besides the config.

    Attributes:
      task: the model with its loss and metrics (``core.task``).
      executor: how clients run (strategy, chunk size, device mesh).
      num_clients: the training population (for per-client state tables).
      pipeline: the aggregation pipeline the framework built from the config
        (``features.pipeline_of``; ``fs.algorithms.build`` fills it in).
    """

    task: Task
    executor: Executor
    num_clients: int
    pipeline: Pipeline | None = None


def pipeline_for(config, ctx: BuildContext) -> Pipeline:
    """The pipeline the framework built (``ctx.pipeline``), or, for a context made by hand,
    the one ``config`` switches on after the same support check ``fs.algorithms.build``
    makes: a build never drops the config's features."""
    if ctx.pipeline is not None:
        return ctx.pipeline
    from fedjax_sim import algorithms, features

    algorithms.check_support(config)
    return features.pipeline_of(config, ctx.task, ctx.num_clients)


class Messages(NamedTuple):
    """What one client receives and sends in a round, as trees of ``jax.ShapeDtypeStruct``
    (the bytes the run reports and the simulated clock transfers).

    Attributes:
      down: what the server sends a client (FedAvg: the model).
      update: the upload that goes through the aggregation pipeline (its compression and
        secure aggregation price it).
      extras: what a client sends beside the pipeline, uncompressed (SCAFFOLD's control
        delta); ``()`` for none.
    """

    down: PyTree
    update: PyTree
    extras: PyTree = ()


def model_messages(config, task, params: PyTree) -> Messages:
    """The default ``AlgorithmSpec.messages``: the model down, an update of its shape up."""
    del config, task
    return Messages(params, params)


class AsyncSettings(NamedTuple):
    """What an asynchronous algorithm asks of the driver's schedule (``driver.asynchronous``):
    a server step every ``buffer_size`` arrived updates; updates staler than ``max_staleness``
    server steps are discarded."""

    buffer_size: int
    max_staleness: int


class AlgorithmSpec(NamedTuple):
    """A registry entry.

    Attributes:
      build: ``(config, ctx) -> FederatedAlgorithm``; validates the config's settings.
      hparams: ``config -> {field path: value}``, the numbers ``build``'s algorithm keeps in
        ``state.hparams`` (the same names: a contract test checks it). Cheap: no data, no model.
      description: one line for listings.
      async_schedule: ``None`` (synchronous rounds), or ``config -> AsyncSettings`` for an
        asynchronous algorithm: the driver then runs clients on its simulated clock and every
        round is one server step over a buffer of arrived updates, each cohort carrying
        ``info["staleness"]``.
      config_defaults: ``None``, or ``config -> {field path: value}``: the settings this
        algorithm needs where a config chosen for another algorithm has them otherwise (a
        server step size, a cap on local steps, a model with a head). Applied by
        ``fedjax_sim.algorithms.switch_algorithm`` (the CLI's ``--config.algorithm=NAME``)
        before the command line's other overrides, which win; a config file that names the
        algorithm itself sets its own numbers.
      supports: the cross-cutting features (``fedjax_sim.features.FEATURES``) ``build``
        builds into the round; any other that a config switches on is refused before compute
        (``features.check_support``), never ignored.
      kwargs: the ``algorithm_kwargs`` ``build`` reads, with their defaults (whose types
        the config's values must have); any other key is refused.
      messages: ``(config, task, params shapes) -> Messages``, what a client receives and
        sends each round (default ``model_messages``: the model each way).
      check: ``None``, or ``config -> None`` raising ``ValueError`` for settings the
        algorithm cannot run (a model it needs), before any data loads.
    """

    build: Callable[[Any, BuildContext], FederatedAlgorithm]
    hparams: Callable[[Any], dict[str, float]]
    description: str = ""
    async_schedule: Callable[[Any], AsyncSettings] | None = None
    config_defaults: Callable[[Any], dict[str, Any]] | None = None
    supports: frozenset[str] = frozenset()
    kwargs: Mapping[str, Any] = {}  # noqa: RUF012 (never mutated)
    messages: Callable[[Any, Any, PyTree], Messages] = model_messages
    check: Callable[[Any], None] | None = None


class ServerState(NamedTuple):
    """State of FedAvg, FedOpt, FedProx and FedSGD between rounds.

    Attributes:
      params: the global model.
      opt_state: the server optimizer's state.
      aggregator_state: the aggregator's and the aggregation transforms' states.
      round: rounds applied so far (int32).
      hparams: the algorithm's numeric hyperparameters (``FederatedAlgorithm.hparams``) as
        float32 scalars, read by every round; a sweep gives each member its own.
      client_states: per-client persistent state (``()`` for these algorithms).
    """

    params: Params
    opt_state: PyTree
    aggregator_state: PyTree
    round: jax.Array
    hparams: Mapping[str, jax.Array] = {}  # noqa: RUF012 (never mutated)
    client_states: PyTree = ()


def as_hparams(values: Mapping[str, float]) -> dict[str, jax.Array]:
    """Hyperparameter values as the float32 scalars a state holds."""
    return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


def client_weight(num_examples: jax.Array, weighting: str) -> jax.Array:
    if weighting == "num_examples":
        return num_examples
    if weighting == "uniform":
        return (num_examples > 0).astype(num_examples.dtype)
    raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}.")


# ---------------------------------------------------------------- optimizer hyperparameters


def optimizer_hparams(optimizer: optax.GradientTransformation, prefix: str) -> dict[str, float]:
    """The injected hyperparameters of ``optimizer`` (built with ``get_optimizer(...,
    inject=True)``) named as config fields: ``{prefix}.learning_rate`` and
    ``{prefix}.kwargs.<name>``; ``{}`` for an optimizer without injected hyperparameters."""
    hyper = injected_hyperparams(optimizer.init(jnp.zeros((), jnp.float32)))
    if not hyper:
        return {}
    return {_field(prefix, k): float(v) for k, v in hyper.items()}


def optimizer_and_pipeline_hparams(config) -> dict[str, float]:
    """The hyperparameters of ``config``'s client and server optimizers and of its aggregation
    pipeline: ``AlgorithmSpec.hparams`` of an algorithm with no numbers of its own."""
    return {
        **config_optimizer_hparams(config.client, "client"),
        **config_optimizer_hparams(config.server, "server"),
        **pipeline_hparams_of_config(config),
    }


def _field(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if name == "learning_rate" else f"{prefix}.kwargs.{name}"


def config_optimizer_hparams(spec, prefix: str) -> dict[str, float]:
    """The hyperparameters of a config's optimizer group (``config.client``/``config.server``)
    that members of one program may differ in: the injected ones that ``init`` ignores.

    One that shapes the initial state (FedAdam's ``tau``: ``v`` starts at ``tau**2``;
    Adagrad's ``initial_accumulator_value``) cannot be swapped into a state made with another
    value, so it is left out: a sweep over it runs one program per value, each exact.
    """
    kwargs = dict(spec.kwargs.to_dict()) if spec.get("kwargs") is not None else {}
    key = json.dumps(kwargs, sort_keys=True, default=str)
    values = _init_free_hparams(spec.optimizer, float(spec.learning_rate), key)
    return {_field(prefix, k): v for k, v in values}


@functools.lru_cache(maxsize=512)
def _init_free_hparams(name: str, learning_rate: float, kwargs_json: str):
    """``((hyperparameter, value), ...)`` of an injected optimizer whose ``init`` they do not
    change (each checked by building the optimizer with that value changed)."""
    kwargs = json.loads(kwargs_json)
    probe = jnp.ones((3,), jnp.float32)

    def inner_init(args):
        args = dict(args)
        opt = get_optimizer(name, args.pop("learning_rate"), inject=True, **args)
        state = opt.init(probe)
        return state, [np.asarray(a) for a in jax.tree.leaves(state.inner_state)]

    args = {"learning_rate": learning_rate, **kwargs}
    state, base = inner_init(args)
    out = []
    for k, v in injected_hyperparams(state).items():
        try:
            # Another value in range (halving also stays finite for the largest floats).
            probe_value = 0.5 * float(v) if float(v) != 0.0 else 0.5
            _, other = inner_init({**args, k: probe_value})
        except Exception:  # a value the optimizer refuses: keep the number fixed, to be safe
            continue
        if len(other) == len(base) and all(np.array_equal(a, b) for a, b in zip(base, other)):
            out.append((k, float(args.get(k, v))))  # the config's own number where it set one
    return tuple(out)


def select_hparams(
    known: Mapping[str, float], chosen: Mapping[str, float] | None
) -> dict[str, float]:
    """``chosen`` (default: all of ``known``), refused where it names an unknown one."""
    if chosen is None:
        return dict(known)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown}; this algorithm has {', '.join(sorted(known))}."
        )
    return {k: float(v) for k, v in chosen.items()}


def with_optimizer_hparams(opt_state, hparams: Mapping[str, jax.Array], prefix: str):
    """``opt_state`` with those of its injected hyperparameters that ``hparams`` (the state's)
    holds taken from there; the others keep the values the optimizer was built with."""
    hyper = injected_hyperparams(opt_state)
    if not hyper:
        return opt_state
    values = {k: hparams[f] for k in hyper if (f := _field(prefix, k)) in hparams}
    return with_hyperparams(opt_state, values) if values else opt_state


# ---------------------------------------------------------------- the shared round


def weighted_client_metrics(outputs: ClientOutput) -> dict:
    """Round metrics: example-weighted mean train loss and totals over real clients."""
    m = outputs.metrics
    seen = m["num_seen"]
    loss = jnp.sum(m["loss_sum"]) / jnp.maximum(jnp.sum(seen), 1.0)
    real = outputs.weight > 0
    return {
        "train_loss": loss,
        "num_clients": jnp.sum(real).astype(jnp.int32),
        "num_examples_seen": jnp.sum(seen),
    }


class ServerSide(NamedTuple):
    """The composable server side: aggregation transforms around an aggregator, then the
    Optax server optimizer.

    Attributes:
      server_optimizer: applied to the transformed aggregate (the pseudo-gradient).
      aggregator: reduces the clients' transformed updates.
      transforms: client stages on each update, server stages on the aggregate.
      adversary: malicious clients (``aggregators.adversary``; their fraction is the
        hyperparameter ``attack.fraction``), or ``None``.
      error_feedback: a compressor applied with error feedback to each client's update (its
        residual, what compression dropped, is per-client state of the pipeline), or ``None``.
      num_clients: the population (rows of the residual table; needed with error feedback).
    """

    server_optimizer: optax.GradientTransformation
    aggregator: Aggregator
    transforms: AggregationTransform
    adversary: Adversary | None = None
    error_feedback: Compressor | None = None
    num_clients: int = 0

    @classmethod
    def of(cls, server_optimizer: optax.GradientTransformation, pipeline: Pipeline) -> ServerSide:
        """The server side that runs ``pipeline``."""
        return cls(
            server_optimizer,
            pipeline.aggregator,
            pipeline.transforms,
            pipeline.adversary,
            pipeline.error_feedback,
            pipeline.num_clients,
        )

    def init(
        self, params: Params, hparams: Mapping[str, float], client_states: PyTree = ()
    ) -> ServerState:
        """The state at round 0 with ``hparams``' values and optional per-client state.
        ``aggregator_state`` is the pipeline's: ``(reducer's, transforms', error-feedback
        residuals)``, the residuals a zero ``[num_clients, ...]`` table per leaf (or ``()``)."""
        residuals = ()
        if self.error_feedback is not None:
            n = self.num_clients
            residuals = jax.tree.map(lambda p: jnp.zeros((n, *p.shape), p.dtype), params)
        return ServerState(
            params=params,
            opt_state=self.server_optimizer.init(params),
            aggregator_state=(
                self.aggregator.init(params),
                self.transforms.init(params),
                residuals,
            ),
            round=jnp.zeros((), jnp.int32),
            hparams=as_hparams(hparams),
            client_states=client_states,
        )

    def round(
        self,
        state: ServerState,
        cohort: Cohort,
        key: jax.Array,
        client_fn: ClientFn,
        executor: Executor,
        broadcast: PyTree | None = None,
        server_rule=None,
        aggregate_rule=None,
    ) -> tuple[ServerState, dict]:
        """One round (``federated_round``) with these pieces."""
        return federated_round(
            state, cohort, key, client_fn, executor=executor, server=self, broadcast=broadcast,
            server_rule=server_rule, aggregate_rule=aggregate_rule,
        )  # fmt: skip


def on_mesh(init: Callable, executor: Executor) -> Callable:
    """``init`` whose state is replicated on ``executor``'s mesh (as is), where the rounds
    return it: a jitted round then compiles once, from the first round on."""
    if executor.mesh is None:
        return init
    return lambda params: replicate(init(params), executor.mesh)


class Setup(NamedTuple):
    """What an algorithm factory starts from (``setup``)."""

    executor: Executor
    loss_fn: Callable
    hparams: dict[str, float]
    server: ServerSide


def setup(
    model,
    executor: Executor | None,
    weighting: str,
    pipeline: Pipeline | None,
    hparams: Mapping[str, float] | None,
    own: Mapping[str, float] | None,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
) -> Setup:
    """The first lines of every factory, once: the model's mean training loss (as a
    ``Task``), the executor checked, ``weighting`` checked, the pipeline (default: the mean, no DP
    numbers), the hyperparameters ``state.hparams`` keeps (the pipeline's, the algorithm's
    ``own``, the injected ones of the two optimizers; ``hparams`` picks a subset with values)
    and the ``ServerSide`` (``server_optimizer`` over the pipeline). Positional, so a
    factory's call is one line of its own arguments: ``setup(model, executor, weighting,
    pipeline, hparams, own, client_optimizer, server_optimizer)``.

    Returns:
      ``Setup(executor, loss_fn, hparams, server)``.

    Raises:
      TypeError: an optimizer that is not an ``optax.GradientTransformation``.
      ValueError: an unknown weighting, or ``hparams`` naming an unknown hyperparameter.
    """
    for name, opt in (
        ("client_optimizer", client_optimizer),
        ("server_optimizer", server_optimizer),
    ):
        if not isinstance(opt, optax.GradientTransformation):
            raise TypeError(
                f"{name} must be an optax.GradientTransformation, got {type(opt).__name__}."
            )
    client_weight(jnp.zeros(()), weighting)  # validates the name eagerly
    task = as_task(model)
    if pipeline is None:
        pipeline = build_pipeline(weighting=weighting, dp_numbers=False)
    known = {
        **pipeline.hparams,
        **(own or {}),
        **optimizer_hparams(client_optimizer, "client"),
        **optimizer_hparams(server_optimizer, "server"),
    }
    return Setup(
        (executor or Executor()).check(),
        mean_loss_fn(task, train=True),
        select_hparams(known, hparams),
        ServerSide.of(server_optimizer, pipeline),
    )


def federated_round(
    state: ServerState,
    cohort: Cohort,
    key: jax.Array,
    client_fn: ClientFn,
    *,
    executor: Executor,
    server: ServerSide,
    broadcast: PyTree | None = None,
    server_rule=None,
    aggregate_rule=None,
) -> tuple[ServerState, dict]:
    """One round of the composable server side.

    Args:
      state: the ``ServerState``.
      cohort: the packed cohort.
      key: the round key.
      client_fn: a client's local work, ``(broadcast, data, client_state, key) ->
        ClientOutput`` whose ``update`` is the pseudo-gradient contribution (FedAvg: server
        minus client params; FedSGD: the gradient); ``data["hparams"]`` holds the round's
        hyperparameters (read them there, not from ``state``: see ``Executor.run``).
      executor: runs the clients.
      server: the transforms, the aggregator and the server optimizer.
      broadcast: what clients receive (default: ``state.params``).
      server_rule: an algorithm's own server step after the shared one, ``(new state, sum
        of the clients' extras, the pseudo-gradient the optimizer got) -> new state``
        (SCAFFOLD's control-variate update, FedDyn's ``h``), or ``None``.
      aggregate_rule: ``(aggregate, sum of the clients' extras) -> pseudo-gradient``, applied
        after the pipeline and before the server optimizer (FedNova's ``tau_eff``), or ``None``.

    Returns:
      ``(new state, metrics)``.
    """
    aggregator, transforms, server_optimizer = (
        server.aggregator,
        server.transforms,
        server.server_optimizer,
    )
    hp = state.hparams
    agg_state, transform_state, residuals = state.aggregator_state
    client_states = state.client_states
    if server.error_feedback is not None:
        client_fn = _with_error_feedback(client_fn, server.error_feedback)
        client_states = (client_states, residuals)
    per_client = transforms.client
    if per_client is not None:
        inner = client_fn

        def client_fn(shared, data, client_state, ckey):
            out = inner(shared, data, client_state, ckey)
            ctx = ClientContext(
                data["client_id"],
                out.weight,
                jax.random.fold_in(ckey, UPDATE_SALT),
                data["hparams"],
                transform_state,
            )
            return out._replace(update=per_client(out.update, ctx))

    adversary = server.adversary
    if adversary is not None and adversary.data_attack is not None:
        trains = client_fn

        def client_fn(shared, data, client_state, ckey):
            return trains(
                shared, adversary.poison(data, data["hparams"][FRACTION]), client_state, ckey
            )

    # A model-poisoning attack needs every client's update: no running sums then.
    attacked = adversary is not None and adversary.update_attack is not None
    outputs, client_states = executor.run(
        client_fn,
        cohort,
        key,
        broadcast=state.params if broadcast is None else broadcast,
        client_states=client_states,
        hparams=hp,
        sum_weighted_updates=aggregator.from_sums is not None and not attacked,
    )
    if server.error_feedback is not None:
        client_states, residuals = client_states
    agg_key = jax.random.fold_in(key, AGGREGATE_SALT)
    if attacked:
        updates = adversary.attack_updates(
            outputs.update, cohort.client_ids, outputs.weight, hp[FRACTION], key
        )
        pseudo_grad, agg_state = aggregator.apply(agg_state, updates, outputs.weight, agg_key)
    else:
        pseudo_grad, agg_state = aggregate(aggregator, agg_state, outputs, agg_key)
    if transforms.server is not None:
        ctx = ServerContext(
            key=key,
            hparams=hp,
            client_ids=cohort.client_ids,
            weights=outputs.weight,
            num_clients=jnp.maximum(jnp.sum(cohort.num_examples > 0), 1).astype(jnp.float32),
        )
        pseudo_grad, transform_state = transforms.server(pseudo_grad, transform_state, ctx)
    if aggregate_rule is not None:
        pseudo_grad = aggregate_rule(pseudo_grad, outputs.extras)
    opt_state = with_optimizer_hparams(state.opt_state, hp, "server")
    updates, opt_state = optimizer_update(server_optimizer, pseudo_grad, opt_state, state.params)
    new_state = state._replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        aggregator_state=(agg_state, transform_state, residuals),
        round=state.round + 1,
        client_states=client_states,
    )
    if server_rule is not None:
        new_state = server_rule(new_state, outputs.extras, pseudo_grad)
    metrics = weighted_client_metrics(outputs)
    if transforms.metrics is not None:
        metrics.update(transforms.metrics(transform_state))
    return new_state, metrics


def _with_error_feedback(client_fn: ClientFn, compressor: Compressor) -> ClientFn:
    """``client_fn`` whose update is compressed with error feedback (Stich et al. 2018): the
    client state becomes ``(the algorithm's, the residual)``; the residual adds to the update
    before compression and keeps what compression dropped. A client whose update does not
    count (weight 0: no real steps) keeps its residual."""
    feedback = with_error_feedback(compressor)

    def with_feedback(shared, data, both, ckey):
        own, residual = both
        out = client_fn(shared, data, own, ckey)
        update, new = feedback(out.update, residual, jax.random.fold_in(ckey, EF_SALT))
        new = jax.tree.map(lambda n, o: jnp.where(out.weight > 0, n, o), new, residual)
        return out._replace(update=update, client_state=(out.client_state, new))

    return with_feedback


# ---------------------------------------------------------------- pieces of client work


def local_update(
    start: Params,
    data: dict,
    key: jax.Array,
    *,
    loss_fn,
    optimizer: optax.GradientTransformation,
    executor: Executor,
    opt_state: PyTree | None = None,
    grad_transform=None,
) -> LocalResult:
    """A client's local training as every algorithm runs it (``local_train`` on its data).

    The optimizer starts from ``opt_state`` (default: fresh) with the round's client
    hyperparameters (``data["hparams"]``, ``client.*``) swapped in; the loop is a static scan
    under ``vmap``/``chunked`` (a batched dynamic loop would select the whole state every
    step), the client's own step count under ``sequential``, and unrolled for a few packed
    steps; a lazy cohort's steps gather their batches from ``data["examples"]``.

    Args:
      start: the parameters local training starts from.
      data: the client's data as ``Executor.run`` hands it over.
      key: the client's key.
      loss_fn: ``(params, batch, mask, key) -> (mean loss, units)``.
      optimizer: the local optimizer.
      executor: the round's executor (its strategy picks the loop form).
      opt_state: a starting optimizer state (Mime: the server's).
      grad_transform: optional ``(grads, params) -> grads``.

    Returns:
      The ``LocalResult``.
    """
    if opt_state is None:
        opt_state = optimizer.init(start)
    opt_state = with_optimizer_hparams(opt_state, data["hparams"], "client")
    mask = data["mask"]
    few_steps = mask.shape[0] <= UNROLL_STEPS
    return local_train(
        start,
        data["batches"],
        mask,
        key,
        loss_fn=loss_fn,
        optimizer=optimizer,
        opt_state=opt_state,
        grad_transform=grad_transform,
        static_loop=executor.resolved() != "sequential" or few_steps,
        unroll=few_steps,
        examples=data.get("examples"),
    )


def proximal_gradient(grads: Params, params: Params, *, mu, anchor: Params) -> Params:
    """``grads`` plus the gradient of ``mu/2 * ||params - anchor||^2`` (FedProx's term; Ditto's
    pull of a personal model towards the global one)."""
    return jax.tree.map(lambda g, p, a: g + mu * (p - a), grads, params, anchor)

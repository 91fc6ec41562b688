"""Mime and MimeLite (Karimireddy et al. 2021): a centralized base optimizer mimicked by clients.

Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich, Suresh, "Breaking the centralized barrier for
cross-device federated learning" (NeurIPS 2021; arXiv 2008.03606, "Mime: Mimicking Centralized
Stochastic Algorithms in Federated Learning"), Algorithm 1. A base optimizer ``B = (U, V)`` (an
Optax transformation: its ``update`` gives ``U``, the step, and ``V``, the new state) keeps its
state ``s`` (momentum, Adam's moments) on the server. Clients step with ``U(g, s)`` and never
change ``s``; the server updates ``s`` once per round from the cohort's mean full-batch gradient
at the server model, as the centralized optimizer would step once on it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.aggregators.pipeline import Pipeline
from fedjax_sim.algorithms.base import (
    AlgorithmSpec,
    BuildContext,
    Messages,
    client_weight,
    config_optimizer_hparams,
    local_update,
    on_mesh,
    pipeline_for,
    setup,
    with_optimizer_hparams,
)
from fedjax_sim.core.client import match_vma, num_real_steps, step_batch, tree_sub
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Params
from fedjax_sim.features import pipeline_hparams_of_config
from fedjax_sim.optimizers import OPTIMIZER_NAMES, optimizer_from_config, optimizer_update

SERVER_LEARNING_RATE = "server.learning_rate"


def mime(
    model,
    base_optimizer: optax.GradientTransformation,
    *,
    server_learning_rate: float = 1.0,
    weighting: str = "uniform",
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """Mime (Karimireddy et al. 2021, Algorithm 1): base-optimizer steps with SVRG-style
    control variates and the server's optimizer state held fixed on the clients.

    A round, with ``x`` the server model and ``s`` the base optimizer's state:

    1. Every cohort client computes its full-batch gradient at ``x``, ``grad f_i(x)`` (the
       mean over every real example slot of its packed steps); the server takes their mean,
       the control variate ``c``. As in Algorithm 1 (and FedJAX's ``mime``), ``c`` comes from
       the round's own cohort before local training, not from the previous round: two client
       passes per round (one extra round trip).
    2. Each client starts at ``y = x`` and runs its real local steps with
       ``g = grad f_i(y; z) - grad f_i(x; z) + c`` (both gradients on the same batch ``z``
       and the same key) and ``y <- y + U(g, s)``: the Optax update with the server's state,
       whose new state is discarded, so ``s`` stays fixed during local work.
    3. The server sets ``s <- V(c, s)`` (the base optimizer stepped once on ``c``, keeping its
       new state) and ``x <- x - server_learning_rate * mean_i (x - y_i)``; at 1.0, the
       paper's ``x <- mean_i y_i`` (FedJAX adds the server learning rate).

    With one full-batch local step the correction cancels (``g = c``): a round is one step of
    the centralized base optimizer on the cohort's mean gradient. Optax's momentum at
    learning rate ``lr`` (``m <- b m + g``, step ``-lr m``) is the paper's ``m <- (1 - b) g +
    b m`` at learning rate ``lr / (1 - b)``.

    The base optimizer's injected hyperparameters (build it with
    ``fs.get_optimizer(..., inject=True)``; named ``client.learning_rate``,
    ``client.kwargs.momentum``, ``client.kwargs.b1``, ...: the base optimizer is the config's
    client optimizer) and ``server.learning_rate`` live in ``state.hparams``.

    Args:
      model: a ``Model`` (classification) or a ``Task``.
      base_optimizer: the centralized optimizer to mimic (SGD, momentum, Adam, ...).
      server_learning_rate: scales the mean client delta (>= 0; 1.0: the paper).
      weighting: how the cohort means (``c``, the delta, the state's gradient) weight
        clients: ``uniform`` (the paper's ``1/|S|``) or ``num_examples`` (FedJAX).
      executor: how clients run (default ``Executor()``).
      hparams: the hyperparameters ``state.hparams`` keeps (default: all of them; a subset
        with their values).
      pipeline: the aggregation pipeline the deltas go through (default the mean); the
        full-batch gradients (``c``, and MimeLite's for ``s``) are averaged beside it,
        uncompressed.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState`` with the base optimizer's
      state ``s`` in ``opt_state``.
    """
    return _mime_family(
        model,
        base_optimizer,
        control_variate=True,
        server_learning_rate=server_learning_rate,
        weighting=weighting,
        executor=executor,
        hparams=hparams,
        pipeline=pipeline,
    )


def mimelite(
    model,
    base_optimizer: optax.GradientTransformation,
    *,
    server_learning_rate: float = 1.0,
    weighting: str = "uniform",
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """MimeLite (Karimireddy et al. 2021, Algorithm 1 without the control variate).

    Like ``mime`` but each local step uses the plain stochastic gradient ``g = grad f_i(y; z)``
    and ``y <- y + U(g, s)`` with the server's base-optimizer state ``s`` held fixed; one
    client pass per round. Each client also sends its full-batch gradient at the server model
    ``x`` (the mean over every real example slot of its packed steps); the server sets
    ``s <- V(mean_i grad f_i(x), s)`` and ``x <- x - server_learning_rate * mean_i (x - y_i)``.
    With a stateless base optimizer (plain SGD) this is FedAvg.

    Args:
      model: a ``Model`` (classification) or a ``Task``.
      base_optimizer: the centralized optimizer to mimic (SGD, momentum, Adam, ...).
      server_learning_rate: scales the mean client delta (>= 0; 1.0: the paper).
      weighting: ``uniform`` (the paper) or ``num_examples`` (FedJAX).
      executor: how clients run (default ``Executor()``).
      hparams: the hyperparameters ``state.hparams`` keeps (see ``mime``).
      pipeline: see ``mime``.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState`` (``opt_state``: ``s``).
    """
    return _mime_family(
        model,
        base_optimizer,
        control_variate=False,
        server_learning_rate=server_learning_rate,
        weighting=weighting,
        executor=executor,
        hparams=hparams,
        pipeline=pipeline,
    )


def _mime_family(
    model,
    base_optimizer,
    *,
    control_variate: bool,
    server_learning_rate,
    weighting,
    executor,
    hparams,
    pipeline,
) -> FederatedAlgorithm:
    if not isinstance(base_optimizer, optax.GradientTransformation):
        raise TypeError(
            "base_optimizer must be an optax.GradientTransformation (fs.get_optimizer(name, "
            f"lr, inject=True)), got {type(base_optimizer).__name__}."
        )
    if server_learning_rate < 0:
        raise ValueError(
            f"server_learning_rate must be >= 0, got {server_learning_rate}; a negative step "
            "moves away from the clients' models."
        )
    own = {SERVER_LEARNING_RATE: float(server_learning_rate)}
    executor, loss_fn, hparams, server = setup(
        model, executor, weighting, pipeline, hparams, own, base_optimizer, optax.sgd(1.0)
    )
    # The server side's "optimizer" only holds s: the server rule replaces its step.
    holds_s = optax.GradientTransformation(base_optimizer.init, lambda g, s, p=None: (g, s))
    server = server._replace(server_optimizer=holds_s)
    # s is held fixed on the clients: the step U(g, s) with the state's update discarded.
    fixed_state = optax.GradientTransformation(
        base_optimizer.init,
        lambda g, s, p=None: (optimizer_update(base_optimizer, g, s, p)[0], s),
    )
    sequential = executor.resolved() == "sequential"

    def full_batch_grad(params, data, ckey):
        return _full_batch_grad(loss_fn, params, data, ckey, all_steps=not sequential)

    def train_client(shared, data, client_state, ckey):
        x, s, c = shared
        local_loss = loss_fn if c is None else _corrected_loss(loss_fn, x, c)
        # s, the server's state, is held fixed (fixed_state discards its updates).
        local = local_update(
            x, data, ckey, loss_fn=local_loss, optimizer=fixed_state, executor=executor,
            opt_state=s,
        )  # fmt: skip
        weight = client_weight(data["num_examples"], weighting)
        # MimeLite sends its full-batch gradient at x beside the delta (summed, weighted).
        extras = () if c is not None else _weighted(full_batch_grad(x, data, ckey), weight)
        metrics = {"loss_sum": local.loss_sum, "num_seen": local.num_seen}
        return ClientOutput(tree_sub(x, local.params), weight, metrics, client_state, extras)

    def grad_client(x, data, client_state, ckey):  # Mime's first pass: grad f_i(x)
        weight = client_weight(data["num_examples"], weighting)
        return ClientOutput(full_batch_grad(x, data, ckey), weight, {}, client_state)

    def apply(state, cohort, key):
        hp = state.hparams
        c = None
        if control_variate:  # c: the cohort's mean full-batch gradient, before local work
            outputs, _ = executor.run(
                grad_client, cohort, key, broadcast=state.params, hparams=hp,
                sum_weighted_updates=True,
            )  # fmt: skip
            c = weighted_mean().from_sums((), *outputs.update, key)[0]

        def server_rule(new, sums, mean_delta):
            mean_grad = c if c is not None else weighted_mean().from_sums((), *sums, key)[0]
            # s <- V(mean gradient, s): the base optimizer's new state after one step on it.
            s = with_optimizer_hparams(state.opt_state, hp, "client")
            _, s = optimizer_update(base_optimizer, mean_grad, s, state.params)
            lr = hp[SERVER_LEARNING_RATE]
            params = jax.tree.map(lambda p, d: p - lr.astype(p.dtype) * d, state.params, mean_delta)
            return new._replace(params=params, opt_state=s)

        shared = (state.params, state.opt_state, c)
        return server.round(state, cohort, key, train_client, executor, shared, server_rule)

    def init(params):
        return server.init(params, hparams)

    return FederatedAlgorithm(
        init=on_mesh(init, executor), apply=apply, lazy_examples=True, hparams=hparams
    )


def _weighted(tree, weight):
    """``(weight * tree, weight)``: a client's share of a weighted mean, summed over clients."""
    return jax.tree.map(lambda g: g * weight.astype(g.dtype), tree), weight


def _corrected_loss(loss_fn, x: Params, c: Params):
    """The local objective whose gradient at ``y`` is Mime's ``grad f(y; z) - grad f(x; z) + c``.

    ``f(y; z) + <v, y>`` with ``v = c - grad f(x; z)`` held constant; the linear term enters
    as ``<v, y> - stop_gradient(<v, y>)`` so the loss value (the reported training loss) is
    exactly ``f(y; z)`` while its gradient gains ``v``.
    """

    def loss(y, batch, mask, key):
        value, n = loss_fn(y, batch, mask, key)
        at_x = jax.grad(lambda p: loss_fn(p, batch, mask, key)[0])(x)
        v = lax.stop_gradient(jax.tree.map(lambda cc, g: cc - g, c, at_x))
        linear = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(y)))
        return value + (linear - lax.stop_gradient(linear)), n

    return loss


def _full_batch_grad(loss_fn, params: Params, data: dict, key, *, all_steps: bool) -> Params:
    """The gradient at ``params`` of the client's mean loss over every real example slot of its
    packed steps (step ``i`` draws from ``fold_in(key, i)`` as local step ``i`` does).

    ``all_steps``: loop over every packed step (padded ones add exact zeros; vectorizes
    better) instead of the real ones only (sequential execution never visits padding).
    """
    batches, mask = data["batches"], data["mask"]

    def summed(p, batch, m, k):
        value, n = loss_fn(p, batch, m, k)
        return value * n, n

    grad_fn = jax.grad(summed, has_aux=True)

    def body(i, carry):
        g_sum, seen = carry
        batch = step_batch(batches, mask, i, data.get("examples"))
        g, n = grad_fn(params, batch, mask[i], jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, g_sum, g), seen + n

    zero = match_vma(jnp.zeros((), jnp.float32), mask)
    steps = mask.shape[0] if all_steps else num_real_steps(mask)
    g_sum, seen = lax.fori_loop(0, steps, body, (jax.tree.map(jnp.zeros_like, params), zero))
    return jax.tree.map(lambda g: g / jnp.maximum(seen, 1.0).astype(g.dtype), g_sum)


def hparams_of_config(config) -> dict[str, float]:
    """The base optimizer's (``config.client``) sweepable numbers, ``server.learning_rate`` and
    the pipeline's (``attack.fraction``)."""
    return {
        **config_optimizer_hparams(config.client, "client"),
        SERVER_LEARNING_RATE: float(config.server.learning_rate),
        **pipeline_hparams_of_config(config),
    }


def _from_config(config, ctx: BuildContext, factory) -> FederatedAlgorithm:
    """The factory from a config: the base optimizer is ``config.client`` (``optimizer``,
    ``learning_rate``, ``kwargs``: it runs on the clients with the client learning rate, its
    state lives on the server), the server step ``server.learning_rate``, ``weighting``."""
    name = config.algorithm
    if config.client.optimizer not in OPTIMIZER_NAMES:
        raise ValueError(
            f"unknown base optimizer {config.client.optimizer!r} for {name} "
            f"(config.client.optimizer); known: {', '.join(OPTIMIZER_NAMES)}."
        )
    server_kwargs = config.server.get("kwargs")
    if config.server.optimizer != "sgd" or (server_kwargs is not None and server_kwargs.to_dict()):
        raise ValueError(
            f"{name}'s server step is x - server.learning_rate * mean(x - y_i); its base "
            "optimizer (momentum, Adam, ...) is config.client.optimizer. Set "
            f"server.optimizer='sgd' without server.kwargs (got {config.server.optimizer!r})."
        )
    hp = hparams_of_config(config)
    return factory(
        ctx.task,
        optimizer_from_config(config.client),
        server_learning_rate=hp[SERVER_LEARNING_RATE],
        weighting=config.weighting,
        executor=ctx.executor,
        hparams=hp,
        pipeline=pipeline_for(config, ctx),
    )


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``mime`` from a config (see ``_from_config``)."""
    return _from_config(config, ctx, mime)


def build_lite(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``mimelite`` from a config (see ``_from_config``)."""
    return _from_config(config, ctx, mimelite)


def _base_state(config, params):
    return jax.eval_shape(optimizer_from_config(config.client).init, params)


def messages(config, task, params) -> Messages:
    """Mime: the model down, its full-batch gradient up (first pass); ``s`` and ``c`` down,
    the delta up (second)."""
    del task
    return Messages(
        down=(params, _base_state(config, params), params), update=params, extras=params
    )


def lite_messages(config, task, params) -> Messages:
    """MimeLite: the model and ``s`` down; the delta, its full-batch gradient and weight up."""
    del task
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return Messages(
        down=(params, _base_state(config, params)), update=params, extras=(params, scalar)
    )


# The deltas go through the pipeline; the full-batch gradients are averaged beside it, in the
# clear and uncompressed: DP and secure aggregation would leave them unprotected, so they are
# refused; compression (with or without error feedback) compresses the deltas only, and the
# bytes count the gradients in full (``messages``). Mime's first pass (c) would see clean data
# while its second sees the poisoned data, so it takes no data poisoning.
_COMPRESSION = {"compression", "error_feedback"}
SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    description="Mime: client.* base optimizer, server-held state, control variates "
    "(Karimireddy et al. 2021)",
    supports=frozenset({"robust_aggregation", "update_attack", *_COMPRESSION}),
    messages=messages,
)
LITE_SPEC = AlgorithmSpec(
    build=build_lite,
    hparams=hparams_of_config,
    description="MimeLite: client.* base optimizer, server-held state (Karimireddy et al. 2021)",
    supports=frozenset({"robust_aggregation", "update_attack", "data_attack", *_COMPRESSION}),
    messages=lite_messages,
)

"""FedAvg and the FedOpt family (FedAvgM, FedAdam, FedYogi, FedAdagrad)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.aggregators import Aggregator, aggregate, weighted_mean
from fedjax_sim.core.client import local_train, masked_mean_loss, tree_sub
from fedjax_sim.core.execution import resolve_strategy
from fedjax_sim.core.round import (
    AGGREGATE_SALT,
    NOISE_SALT,
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
        optimizer state, e.g. ``{"learning_rate": 0.1}``, and the algorithm's own
        ``proximal_mu``, ``clip_norm`` and ``noise_multiplier``.
        Empty: the values ``fedopt`` was built with. Kept in the state so a sweep can vmap
        over them (``fedjax_sim.sweep``).
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
    proximal_mu: float = 0.0,
    clip_norm: float = 0.0,
    noise_multiplier: float = 0.0,
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

    ``proximal_mu`` > 0 makes it FedProx (Li et al. 2020): each client minimizes its loss plus
    ``mu/2 * ||w - w_server||^2``. ``clip_norm`` > 0 scales each client's delta to L2 norm at
    most ``clip_norm``; ``noise_multiplier`` > 0 then adds Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm / n`` to the mean of the ``n`` clients' deltas: the
    mechanism of DP-FedAvg (McMahan et al. 2018, fixed cohort size, uniform weighting). No
    privacy accounting is done here.

    Args:
      model: the model (its ``apply`` and per-example ``loss``).
      client_optimizer: the local optimizer, re-initialized every round.
      server_optimizer: applied to the aggregated pseudo-gradient.
      weighting: ``num_examples`` (weight by client size) or ``uniform``.
      aggregator: how client deltas combine; default the weighted mean.
      update_transform: optional ``(delta, key) -> delta`` applied per client before
        aggregation (after clipping).
      proximal_mu: FedProx's proximal coefficient (0: none).
      clip_norm: bound on each client's delta norm (0: no clipping).
      noise_multiplier: Gaussian noise on the aggregate, in units of ``clip_norm / n`` (0:
        none); needs ``clip_norm`` > 0, ``weighting="uniform"`` and the mean aggregator.
      strategy: client execution strategy (``auto``, ``vmap``, ``chunked``, ``sequential``).
      chunk_size: clients per chunk for ``chunked``.
      mesh: optional device mesh (``fs.client_mesh()``) to split the cohort over devices.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``.
    """
    client_weight(jnp.zeros(()), weighting)  # validates the name eagerly
    _check_dp(clip_norm, noise_multiplier, weighting, aggregator)
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}.")
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
        # The algorithm's traced numbers (a sweep's) or the built-in ones; a built-in 0 turns
        # the piece off, so a plain run computes nothing for it.
        mu = client_hparams.pop("proximal_mu", proximal_mu)
        clip = client_hparams.pop("clip_norm", clip_norm)
        noise = client_hparams.pop("noise_multiplier", noise_multiplier)
        if not _off(noise) and weighting != "uniform":
            raise ValueError("noise_multiplier needs weighting='uniform' (DP-FedAvg).")

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
                grad_transform=None if _off(mu) else partial(_proximal, mu=mu, anchor=broadcast),
                # A few steps unroll best; many ragged ones want the dynamic loop.
                static_loop=strat != "sequential" or cohort.num_steps <= UNROLL_STEPS,
                unroll=cohort.num_steps <= UNROLL_STEPS,
                examples=data.get("examples"),
            )
            delta = tree_sub(broadcast, local.params)
            if not _off(clip):
                delta = clip_by_norm(delta, clip)
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
        if not _off(noise):
            num_clients = jnp.maximum(jnp.sum(cohort.num_examples > 0), 1).astype(jnp.float32)
            std = noise * clip / num_clients
            pseudo_grad = add_gaussian_noise(pseudo_grad, std, jax.random.fold_in(key, NOISE_SALT))
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

    return FederatedAlgorithm(init=init, apply=apply, lazy_examples=True)


def _proximal(grads: Params, params: Params, *, mu, anchor: Params) -> Params:
    """FedProx: the gradient of ``mu/2 * ||params - anchor||^2`` added to ``grads``."""
    return jax.tree.map(lambda g, p, a: g + mu * (p - a), grads, params, anchor)


def _off(value) -> bool:
    """A built-in (Python) zero: the piece it controls is left out of the program."""
    return isinstance(value, int | float) and value == 0


def _check_dp(clip_norm, noise_multiplier, weighting, aggregator) -> None:
    if clip_norm < 0 or noise_multiplier < 0:
        raise ValueError(
            f"clip_norm and noise_multiplier must be >= 0, got {clip_norm}, {noise_multiplier}."
        )
    if noise_multiplier > 0:
        if clip_norm <= 0:
            raise ValueError(
                "noise_multiplier > 0 needs clip_norm > 0: the noise is scaled by the clipping "
                "norm (DP-FedAvg); set dp.clip_norm."
            )
        if weighting != "uniform":
            raise ValueError(
                "noise_multiplier > 0 needs weighting='uniform': with example weights one "
                "client's influence on the mean is not bounded by clip_norm / n."
            )
        if aggregator is not None and aggregator.from_sums is None:
            raise ValueError("noise_multiplier > 0 needs the mean aggregator (DP-FedAvg).")


def clip_by_norm(tree: PyTree, max_norm) -> PyTree:
    """``tree`` scaled to global L2 norm at most ``max_norm`` (unchanged when within it, or
    when ``max_norm`` is 0)."""
    norm = optax.tree.norm(tree)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    scale = jnp.where(max_norm > 0, scale, 1.0)  # a traced 0 (a sweep member's): no clipping
    return jax.tree.map(lambda a: a * scale.astype(a.dtype), tree)


def add_gaussian_noise(tree: PyTree, std, key: jax.Array) -> PyTree:
    """``tree`` plus independent N(0, std^2) noise in every coordinate."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        a + (std * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
        for a, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


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
      **kwargs: ``weighting``, ``aggregator``, ``update_transform``, ``proximal_mu``,
        ``clip_norm``, ``noise_multiplier``, ``strategy``, ``chunk_size``, ``mesh`` as in
        ``fedopt``.

    Returns:
      A ``FederatedAlgorithm``.
    """
    return fedopt(model, client_optimizer, optax.sgd(server_learning_rate), **kwargs)

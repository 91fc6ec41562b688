"""FedBuff: buffered asynchronous aggregation (Nguyen et al. 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.aggregators.pipeline import Pipeline
from fedjax_sim.algorithms.base import (
    AlgorithmSpec,
    AsyncSettings,
    BuildContext,
    client_weight,
    config_optimizer_hparams,
    local_update,
    on_mesh,
    pipeline_for,
    setup,
)
from fedjax_sim.core.client import tree_sub
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Params, PyTree
from fedjax_sim.features import FEATURES, pipeline_hparams_of_config
from fedjax_sim.optimizers import optimizer_from_config

STALENESS_EXPONENT = "algorithm_kwargs.staleness_exponent"


class FedBuffState(NamedTuple):
    """``ServerState``'s fields plus the models of the last server steps.

    Attributes:
      history: ``[max_staleness + 1, ...]`` per leaf: ``history[j]`` is the global model of
        ``j`` server steps ago (``history[0] == params``), which a client of staleness ``j``
        started from.
    """

    params: Params
    opt_state: PyTree
    aggregator_state: PyTree
    round: jax.Array
    hparams: Mapping[str, jax.Array]
    client_states: PyTree
    history: Params


def staleness_weight(staleness: jax.Array, exponent: jax.Array) -> jax.Array:
    """FedBuff's down-weighting of stale updates, ``(1 + staleness) ** -exponent`` (the paper's
    ``1 / sqrt(1 + staleness)`` at exponent 0.5; 0: no down-weighting)."""
    return (1.0 + staleness.astype(jnp.float32)) ** (-exponent)


def fedbuff(
    model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    max_staleness: int = 10,
    staleness_exponent: float = 0.5,
    weighting: str = "uniform",
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
    Aggregation", Algorithm 1).

    One ``apply`` is one server step over a buffer of ``K`` arrived updates (the cohort). The
    driver's asynchronous schedule (``driver.asynchronous``) decides which clients fill each
    buffer and how stale each is: ``cohort.info["staleness"]`` is the number of server steps
    between the model a client downloaded and this step. Client ``i`` trains from that model
    (kept in ``state.history``) with ``client_optimizer`` and sends ``Δ_i = x_start - y_i``
    scaled by ``s(τ_i) = (1 + τ_i) ** -staleness_exponent``. The server averages the scaled
    updates over the buffer, ``(1/K) Σ s(τ_i) Δ_i`` (with ``weighting="num_examples"``, the
    example-weighted mean instead of 1/K), and applies ``server_optimizer`` to it (the
    paper's server learning rate is ``optax.sgd(eta_g)``). A cohort without ``info`` (or all
    staleness 0) is synchronous FedAvg.

    Args:
      model: a ``Model`` (classification) or a ``Task``.
      client_optimizer: the local optimizer, re-initialized at each client start.
      server_optimizer: applied to the buffer's averaged update.
      max_staleness: server steps of history kept (the schedule discards staler updates).
      staleness_exponent: ``a`` in ``(1 + τ) ** -a`` (>= 0).
      weighting: ``uniform`` (the paper: 1/K) or ``num_examples``.
      executor: how clients run.
      hparams: the hyperparameters ``state.hparams`` keeps (default: ``staleness_exponent``
        and every injected optimizer hyperparameter).
      pipeline: the aggregation pipeline each scaled update goes through (compression,
        attacks, a robust or secure reducer; ``aggregators.pipeline``); default the mean.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``FedBuffState``.
    """
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}.")
    if staleness_exponent < 0:
        raise ValueError(
            f"staleness_exponent must be >= 0 (0: no down-weighting), got {staleness_exponent}."
        )
    own = {STALENESS_EXPONENT: float(staleness_exponent)}
    executor, loss_fn, hparams, server = setup(
        model, executor, weighting, pipeline, hparams, own, client_optimizer, server_optimizer
    )
    depth = max_staleness + 1

    def init(params):
        base = server.init(params, hparams)
        history = jax.tree.map(lambda p: jnp.broadcast_to(p, (depth, *p.shape)), params)
        return FedBuffState(*base, history=history)

    def apply(state, cohort, key):
        def client_fn(history, data, client_state, ckey):
            hp = data["hparams"]
            stale = data["info"]["staleness"] if "info" in data else jnp.zeros((), jnp.int32)
            stale = jnp.clip(stale, 0, depth - 1)
            start = jax.tree.map(lambda h: h[stale], history)
            local = local_update(
                start,
                data,
                ckey,
                loss_fn=loss_fn,
                optimizer=client_optimizer,
                executor=executor,
            )
            scale = staleness_weight(stale, hp.get(STALENESS_EXPONENT, staleness_exponent))
            return ClientOutput(
                update=jax.tree.map(lambda d: d * scale, tree_sub(start, local.params)),
                weight=client_weight(data["num_examples"], weighting),
                metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
                client_state=client_state,
            )

        new, metrics = server.round(state, cohort, key, client_fn, executor, state.history)
        history = jax.tree.map(
            lambda h, p: jnp.concatenate([p[None], h[:-1]]), state.history, new.params
        )
        return new._replace(history=history), metrics

    return FederatedAlgorithm(
        init=on_mesh(init, executor), apply=apply, lazy_examples=True, hparams=hparams
    )


def _settings(config) -> dict:
    kw = config.algorithm_kwargs
    c = int(config.clients_per_round)
    out = {
        "buffer_size": int(kw.get("buffer_size", 0)) or c,
        "max_staleness": int(kw.get("max_staleness", 10)),
        "staleness_exponent": float(kw.get("staleness_exponent", 0.5)),
    }
    if not 1 <= out["buffer_size"] <= c:
        raise ValueError(
            f"algorithm_kwargs.buffer_size must be in 1..clients_per_round ({c}: the clients "
            f"training at once), got {out['buffer_size']}."
        )
    if out["max_staleness"] < 0:
        raise ValueError(
            f"algorithm_kwargs.max_staleness must be >= 0, got {out['max_staleness']}."
        )
    return out


def async_schedule(config) -> AsyncSettings:
    s = _settings(config)
    return AsyncSettings(s["buffer_size"], s["max_staleness"])


def hparams_of_config(config) -> dict[str, float]:
    return {
        STALENESS_EXPONENT: _settings(config)["staleness_exponent"],
        **config_optimizer_hparams(config.client, "client"),
        **config_optimizer_hparams(config.server, "server"),
        **pipeline_hparams_of_config(config),
    }


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``fedbuff`` from a config: ``algorithm_kwargs.buffer_size`` (K, default (0):
    ``clients_per_round``, the clients training at once), ``max_staleness`` (default 10),
    ``staleness_exponent`` (default 0.5), the ``client.*``/``server.*`` optimizers and
    ``weighting``."""
    s = _settings(config)
    hp = hparams_of_config(config)
    return fedbuff(
        ctx.task,
        optimizer_from_config(config.client),
        optimizer_from_config(config.server),
        max_staleness=s["max_staleness"],
        staleness_exponent=s["staleness_exponent"],
        weighting=config.weighting,
        executor=ctx.executor,
        hparams=hp,
        pipeline=pipeline_for(config, ctx),
    )


SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    description="FedBuff: buffered asynchronous aggregation on the simulated clock",
    async_schedule=async_schedule,
    kwargs={"buffer_size": 0, "max_staleness": 10, "staleness_exponent": 0.5},
    # DP is refused: the simulated clock, not random sampling, fills each buffer, so no
    # accountant models who is in it.
    supports=frozenset(FEATURES) - {"dp", "adaptive_clipping", "proximal_term"},
)

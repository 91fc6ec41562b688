"""Ditto: a global model by FedAvg and a regularized personal model per client (Li et al. 2021)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import (
    ALL_FEATURES,
    AlgorithmSpec,
    BuildContext,
    as_hparams,
    local_update,
    on_mesh,
    proximal_gradient,
)
from fedjax_sim.algorithms.fedavg import build as fedopt_build
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedavg import hparams_of_config as fedopt_hparams_of_config
from fedjax_sim.core.execution import Executor, gather_client_states
from fedjax_sim.core.task import as_task, mean_loss_fn
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Model
from fedjax_sim.optimizers import optimizer_from_config

LAMBDA = "algorithm_kwargs.ditto_lambda"


def ditto(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    *,
    num_clients: int,
    ditto_lambda: float = 1.0,
    global_algorithm: FederatedAlgorithm | None = None,
    executor: Executor | None = None,
) -> FederatedAlgorithm:
    """Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
    Personalization", Algorithm 1).

    The global model ``w`` trains by ``global_algorithm`` (default FedAvg:
    ``fedavg(model, client_optimizer)``; its round runs unchanged, so Ditto's ``w`` is that
    algorithm's exactly). Each sampled client ``k`` also updates its personal model ``v_k``
    (per-client state) for ``s`` steps of
    ``v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t))``, where ``w^t`` is the round's
    global model (fixed during the round). As in the paper's code (``ditto.py``: a personal
    and a global step on each ``data_batch`` of the ``local_iters``), the personal steps are
    the client's own real local steps on the same batches (and the same per-step keys) as its
    global update, so ``s = tau_k``; ``eta`` and the optimizer are ``client_optimizer``'s,
    re-initialized each round (plain SGD is the paper's update). ``v_k`` starts at the initial
    global model ``w^0`` (the code's ``local_models``), so a client never sampled keeps it;
    ``personalize(state, ids)`` returns the ``v_k``.

    ``lambda`` (``ditto_lambda``; "lambda" is a Python keyword) lives in ``state.hparams`` as
    ``algorithm_kwargs.ditto_lambda``: 0 is local training of ``v_k`` alone; large values pull
    ``v_k`` to ``w^t`` (with ``eta * lambda = 1`` a personal step lands at
    ``w^t - eta grad F_k(v_k)``). The released run scripts use ``lambda = 1``.

    Args:
      model: the model (or a ``Task``).
      client_optimizer: the personal steps' optimizer (and the default global algorithm's);
        its injected hyperparameters are read from ``state.hparams`` (``client.*``).
      num_clients: the training population (one personal model each).
      ditto_lambda: ``lambda >= 0``, the pull of each personal model to the global one.
      global_algorithm: the global model's algorithm, a ``FederatedAlgorithm`` without
        per-client state (``fedopt``/``fedavg``, possibly with FedProx or DP settings).
      executor: how clients run (the global algorithm should use the same).

    Returns:
      A ``FederatedAlgorithm`` with ``personalize``; its state is ``global_algorithm``'s with
      ``client_states`` the personal models (each leaf ``[num_clients, ...]``) and
      ``algorithm_kwargs.ditto_lambda`` added to ``hparams``. Its metrics add
      ``personal_train_loss`` (the personal steps' example-weighted pre-step loss).
    """
    if not ditto_lambda >= 0:
        raise ValueError(
            f"ditto_lambda must be >= 0 (0: purely local personal models), got {ditto_lambda}."
        )
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    task = as_task(model)
    executor = (executor or Executor()).check()
    if global_algorithm is None:
        global_algorithm = fedavg(task, client_optimizer, executor=executor)
    if global_algorithm.personalize is not None or LAMBDA in global_algorithm.hparams:
        raise ValueError(
            "ditto's global_algorithm must be a plain global algorithm (fedavg, fedopt, ...), "
            "not a personalized one."
        )
    hparams = {**global_algorithm.hparams, LAMBDA: float(ditto_lambda)}
    loss_fn = mean_loss_fn(task, train=True)

    def init(params):
        state = global_algorithm.init(params)
        if jax.tree.leaves(getattr(state, "client_states", ())):
            raise ValueError(
                "ditto's global_algorithm keeps per-client state; Ditto's personal models take "
                "that slot, so use a global algorithm without it (fedavg, fedopt, ...)."
            )
        personal = jax.tree.map(lambda p: jnp.broadcast_to(p, (num_clients, *p.shape)), params)
        return state._replace(
            hparams={**state.hparams, **as_hparams({LAMBDA: ditto_lambda})},
            client_states=personal,
        )

    def apply(state, cohort, key):
        def personal_fn(w, data, v, ckey):
            hp = data["hparams"]
            # grad F_k(v) + lambda (v - w^t): FedProx's proximal gradient, anchored at w^t.
            local = local_update(
                v, data, ckey, loss_fn=loss_fn, optimizer=client_optimizer, executor=executor,
                grad_transform=partial(proximal_gradient, mu=hp[LAMBDA], anchor=w),
            )  # fmt: skip
            return ClientOutput(
                update=(),
                weight=data["num_examples"],
                metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
                client_state=local.params,
            )

        personal, client_states = executor.run(
            personal_fn,
            cohort,
            key,
            broadcast=state.params,
            client_states=state.client_states,
            hparams=state.hparams,
        )
        new, metrics = global_algorithm.apply(state._replace(client_states=()), cohort, key)
        m = personal.metrics
        loss = jnp.sum(m["loss_sum"]) / jnp.maximum(jnp.sum(m["num_seen"]), 1.0)
        return new._replace(client_states=client_states), {**metrics, "personal_train_loss": loss}

    def personalize(state, client_ids):
        return gather_client_states(state.client_states, client_ids)

    return FederatedAlgorithm(
        init=on_mesh(init, executor),
        apply=apply,
        lazy_examples=global_algorithm.lazy_examples,
        hparams=hparams,
        personalize=personalize,
    )


def hparams_of_config(config) -> dict[str, float]:
    """The global FedOpt's hyperparameters and ``algorithm_kwargs.ditto_lambda`` (default 1)."""
    return {
        **fedopt_hparams_of_config(config),
        LAMBDA: float(config.algorithm_kwargs.get("ditto_lambda", 1.0)),
    }


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``ditto`` from a config: the global model is ``fedopt`` built from the same config
    (``client.*``, ``server.*``, ``client.proximal_mu``, ``dp.*``, ``weighting``,
    ``aggregator``), the personal steps use ``client.*``, lambda is
    ``algorithm_kwargs.ditto_lambda``."""
    return ditto(
        ctx.task,
        optimizer_from_config(config.client),
        num_clients=ctx.num_clients,
        ditto_lambda=hparams_of_config(config)[LAMBDA],
        global_algorithm=fedopt_build(config, ctx),
        executor=ctx.executor,
    )


SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    description="Ditto: FedAvg global model plus a lambda-regularized personal model per client",
    # Each acts on the global model, which is fedopt's.
    supports=ALL_FEATURES,
    kwargs={"ditto_lambda": 1.0},  # 'lambda' is a Python keyword
)

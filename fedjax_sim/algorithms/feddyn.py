"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization")."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.aggregators.pipeline import Pipeline
from fedjax_sim.algorithms.base import (
    AlgorithmSpec,
    BuildContext,
    Messages,
    config_optimizer_hparams,
    local_update,
    on_mesh,
    pipeline_for,
    setup,
)
from fedjax_sim.core.client import num_real_steps, tree_sub
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Params, PyTree
from fedjax_sim.features import pipeline_hparams_of_config
from fedjax_sim.optimizers import optimizer_from_config

ALPHA = "algorithm_kwargs.alpha"
# The official code's examples (github.com/alpemreacar/FedDyn) use alpha_coef = 1e-2; the
# paper reports alpha from {1e-1, 1e-2, 1e-3}.
DEFAULT_ALPHA = 0.01


class FedDynState(NamedTuple):
    """FedDyn's state between rounds: ``ServerState``'s fields and the server's ``h``.

    Attributes:
      params: the server model theta^t (what the driver evaluates and broadcasts).
      opt_state: the server step's state (SGD at 1.0: ``theta - mean delta``).
      aggregator_state: the aggregation pipeline's state.
      round: rounds applied so far (int32).
      hparams: ``algorithm_kwargs.alpha`` and the client optimizer's injected numbers.
      client_states: every client's gradient memory grad L_k(theta_k^t) (shaped like the
        params, with a leading ``[num_clients]`` axis; starts at 0).
      h: the server state h^t (shaped like the params; starts at 0).
    """

    params: Params
    opt_state: PyTree
    aggregator_state: PyTree
    round: jax.Array
    hparams: Mapping[str, jax.Array]
    client_states: Params
    h: Params


def feddyn(
    model,
    client_optimizer: optax.GradientTransformation,
    *,
    num_clients: int,
    alpha: float = DEFAULT_ALPHA,
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization",
    Algorithm 1).

    Each sampled client ``k`` of ``P_t`` starts from the server model ``theta^{t-1}`` and runs
    its local steps on ``L_k(theta) - <grad L_k(theta_k^{t-1}), theta> + alpha/2 *
    ||theta - theta^{t-1}||^2`` (the gradient ``alpha (theta - theta^{t-1}) - grad L_k`` of the
    two extra terms is added to every step's gradient), then updates its gradient memory
    ``grad L_k <- grad L_k - alpha (theta_k^t - theta^{t-1})``. The server updates
    ``h <- h - alpha/m * sum_{k in P_t} (theta_k^t - theta^{t-1})`` with ``m = num_clients``
    (the whole population, not the cohort) and sets ``theta^t = mean_{k in P_t} theta_k^t -
    h / alpha``: a uniform mean over the cohort, as in the paper, whatever the clients' sizes.
    There is no server learning rate (the paper has none). Hence ``h^t = 1/m * sum_k grad
    L_k`` over all clients at every round.

    A cohort member that ran no local step (a padded slot, or a client whose mask a straggler
    cut to nothing) sent no model: it is left out of ``P_t`` and its memory is unchanged. A
    round without any participant leaves the state as it was (but for ``round``).

    Departures from the authors' code, on purpose: their clients use ``alpha / w_k`` with
    ``w_k`` the client's size over the mean size (here every client uses ``alpha``, as
    Algorithm 1 writes), and they evaluate the mean of the cohort's models while
    ``state.params`` here is the paper's ``theta^t``.

    Args:
      model: a ``Model`` (classification) or a ``Task``.
      client_optimizer: the local optimizer (the paper: SGD), re-initialized every round;
        build it with ``fs.get_optimizer(..., inject=True)`` to sweep its numbers.
      num_clients: the training population ``m`` (the per-client memory table's size).
      alpha: the dynamic regularization coefficient (> 0); ``state.hparams`` keeps it as
        ``algorithm_kwargs.alpha``.
      executor: how clients run (default ``Executor()``).
      hparams: the hyperparameters ``state.hparams`` keeps (default: ``alpha`` and every
        injected client optimizer hyperparameter), a subset with their values; ``alpha`` is
        always kept.
      pipeline: the aggregation pipeline the deltas ``theta^{t-1} - theta_k^t`` go through
        (default the mean). Its output is the mean over ``P_t``; ``h`` is updated from it
        times ``|P_t|`` (the participants counted beside it, ``ClientOutput.extras``), so a
        robust reducer or compression acts on both ``theta^t`` and ``h``.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``FedDynState``.
    """
    _check_alpha(alpha)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int (the population), got {num_clients}.")
    # theta - mean delta = mean theta_k: FedDyn's server has no learning rate (sgd(1.0)).
    own, server_optimizer = {ALPHA: float(alpha)}, optax.sgd(1.0)
    executor, loss_fn, hparams, server = setup(
        model, executor, "uniform", pipeline, hparams, own, client_optimizer, server_optimizer
    )
    hparams = {ALPHA: float(alpha), **hparams}
    _check_alpha(hparams[ALPHA])

    def init(params):
        memory = jax.tree.map(lambda p: jnp.zeros((num_clients, *p.shape), p.dtype), params)
        base = server.init(params, hparams, client_states=memory)
        return FedDynState(*base, h=jax.tree.map(jnp.zeros_like, params))

    def client_fn(server_params, data, grad_memory, ckey):
        a = data["hparams"][ALPHA]

        def dynamic_regularizer(grads, params):
            # d/dtheta [-<grad L_k, theta> + alpha/2 ||theta - theta^{t-1}||^2]
            return jax.tree.map(
                lambda g, p, s, m: g + a.astype(g.dtype) * (p - s) - m,
                grads, params, server_params, grad_memory,
            )  # fmt: skip

        local = local_update(
            server_params, data, ckey, loss_fn=loss_fn, optimizer=client_optimizer,
            executor=executor, grad_transform=dynamic_regularizer,
        )  # fmt: skip
        delta = tree_sub(server_params, local.params)  # theta^{t-1} - theta_k^t
        # grad L_k <- grad L_k - alpha (theta_k^t - theta^{t-1})
        new_memory = jax.tree.map(lambda m, d: m + a.astype(d.dtype) * d, grad_memory, delta)
        took_part = (num_real_steps(data["mask"]) > 0).astype(jnp.float32)
        return ClientOutput(
            update=delta,
            weight=took_part,  # a uniform mean over P_t
            metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
            client_state=new_memory,
            extras=took_part,  # |P_t|
        )

    def apply(state, cohort, key):
        a = state.hparams[ALPHA]

        def server_rule(new, participants, mean_delta):
            # h^t = h^{t-1} - alpha/m sum_{P_t} (theta_k^t - theta^{t-1}), the sum being
            # |P_t| times the pipeline's mean; theta^t = mean_{P_t} theta_k^t - h^t / alpha.
            scale = (a / num_clients) * participants
            h = jax.tree.map(lambda h, d: h + scale.astype(d.dtype) * d, new.h, mean_delta)
            params = jax.tree.map(lambda p, h: p - h / a.astype(h.dtype), new.params, h)
            anyone = participants > 0  # a round without participants changes nothing
            keep = lambda n, o: jnp.where(anyone, n, o)  # noqa: E731
            return new._replace(
                params=jax.tree.map(keep, params, state.params), h=jax.tree.map(keep, h, state.h)
            )

        return server.round(state, cohort, key, client_fn, executor, None, server_rule)

    return FederatedAlgorithm(
        init=on_mesh(init, executor), apply=apply, lazy_examples=True, hparams=hparams
    )


def _check_alpha(alpha) -> None:
    ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if not (ok and math.isfinite(float(alpha)) and float(alpha) > 0):
        raise ValueError(
            f"FedDyn's alpha must be a finite number > 0 (theta^t subtracts h / alpha), got "
            f"{alpha!r}; the paper uses 0.1, 0.01 or 0.001 (set algorithm_kwargs.alpha)."
        )


def hparams_of_config(config) -> dict[str, float]:
    """``feddyn``'s hyperparameters for ``config``: ``algorithm_kwargs.alpha`` and the client
    optimizer's numbers (see ``AlgorithmSpec.hparams``)."""
    return {
        ALPHA: float(config.algorithm_kwargs.get("alpha", DEFAULT_ALPHA)),
        **config_optimizer_hparams(config.client, "client"),
        **pipeline_hparams_of_config(config),
    }


def _check_config(config) -> None:
    """Refuses settings FedDyn would otherwise ignore silently."""
    problems = []
    server = config.server
    server_kwargs = server.kwargs.to_dict() if server.get("kwargs") is not None else {}
    if server.optimizer != "sgd" or float(server.learning_rate) != 1.0 or server_kwargs:
        problems.append(
            "a server optimizer (FedDyn's Algorithm 1 has none: leave server.optimizer='sgd', "
            "server.learning_rate=1.0, server.kwargs empty)"
        )
    if problems:
        raise ValueError("feddyn does not support " + "; ".join(problems) + ".")


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``feddyn`` from a config: the ``client.*`` optimizer (injected) and
    ``algorithm_kwargs.alpha``; the population is ``ctx.num_clients``. ``config.weighting`` is
    not read: Algorithm 1 averages the cohort's models uniformly."""
    _check_config(config)
    hp = hparams_of_config(config)
    return feddyn(
        ctx.task,
        optimizer_from_config(config.client),
        num_clients=ctx.num_clients,
        alpha=hp[ALPHA],
        executor=ctx.executor,
        hparams=hp,
        pipeline=pipeline_for(config, ctx),
    )


def messages(config, task, params) -> Messages:
    """The model down; the delta and the participant count up."""
    del config, task
    return Messages(down=params, update=params, extras=jax.ShapeDtypeStruct((), jnp.float32))


SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    description="FedDyn: dynamic regularization with per-client gradient memory (Acar et al. 2021)",
    kwargs={"alpha": DEFAULT_ALPHA},
    # h's update multiplies the aggregate by the participant count, sent beside the pipeline:
    # DP's and adaptive clipping's accounting and SecAgg would not cover it.
    supports=frozenset(
        {"robust_aggregation", "compression", "error_feedback", "update_attack", "data_attack"}
    ),
    messages=messages,
)

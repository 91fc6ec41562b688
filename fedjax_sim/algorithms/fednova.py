"""FedNova (Wang et al. 2020): normalized averaging of clients with unequal local work.

Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization" (NeurIPS 2020; arXiv 2007.07481). A client that runs more local steps
moves further; FedAvg's average then leans towards it and converges to the optimum of a
different objective. FedNova divides each client's model change by how much its local solver
accumulated gradients (``||a_i||_1``) and rescales the average by a common effective step count.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

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
from fedjax_sim.algorithms.fedavg import PROXIMAL_MU
from fedjax_sim.core.client import num_real_steps, tree_sub
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.types import Array, ClientOutput, FederatedAlgorithm
from fedjax_sim.features import FEATURES, pipeline_hparams_of_config
from fedjax_sim.optimizers import (
    get_optimizer,
    injected_hyperparams,
    optimizer_from_config,
)

# config.client.optimizer names FedNova knows the accumulation vector a_i of.
CLIENT_OPTIMIZERS = ("sgd", "momentum")


def fednova(
    model,
    client_learning_rate: float,
    *,
    momentum: float | None = None,
    proximal_mu: float = 0.0,
    server_optimizer: optax.GradientTransformation | None = None,
    weighting: str = "num_examples",
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """FedNova (Wang et al. 2020, Section 5): normalized averaging.

    Client ``i`` runs its ``tau_i`` real local steps (from its mask) of SGD at learning rate
    ``eta`` from the server model ``x``, optionally with heavy-ball momentum ``rho`` (Optax's
    and PyTorch's ``m <- rho m + g``, ``y <- y - eta m``, ``m`` reset every round) or FedProx's
    proximal term ``mu/2 ||y - x||^2``. Its model change is then ``x - y_i = eta G_i a_i``, a
    combination of its local gradients with weights ``a_i`` (Section 4):

    - plain SGD: ``a_i = [1, ..., 1]``, ``||a_i||_1 = tau_i``;
    - momentum: the gradient of step ``k`` is carried by the remaining steps,
      ``||a_i||_1 = sum_{k=1..tau_i} (1 - rho^k) / (1 - rho)``;
    - proximal: ``a_i = [(1 - eta mu)^(tau_i - 1), ..., 1 - eta mu, 1]``,
      ``||a_i||_1 = sum_{k=0..tau_i-1} (1 - eta mu)^k``.

    The client sends ``eta d_i = (x - y_i) / ||a_i||_1`` (its normalized gradient ``d_i``
    times ``eta``). With ``p_i = w_i / sum_S w`` over the cohort's real clients (``weighting``:
    ``num_examples``, the paper's ``n_i / n``, or ``uniform``), the server's pseudo-gradient is
    ``tau_eff * sum_i p_i eta d_i`` (server minus client, as FedAvg's), to which it applies
    ``server_optimizer``; with ``sgd(1.0)`` this is the paper's update
    ``x <- x - tau_eff sum_i p_i eta d_i``. ``tau_eff = sum_i p_i ||a_i||_1`` (for plain SGD
    ``sum_i p_i tau_i``), except with a proximal term, where it is ``sum_i p_i tau_i``: the
    choice of the authors' code (github.com/JYWa/FedNova, ``FedNova.average``), which undoes
    the shorter effective step the proximal term gives FedProx. So when every client runs the
    same number of steps with SGD or momentum, FedNova is FedAvg with the same weights.

    Momentum and a proximal term together are refused (the paper gives no ``a_i`` for the
    pair), as are other local solvers. A client with no real steps has weight 0.

    ``client.learning_rate``, ``client.kwargs.momentum`` (when ``momentum`` is given),
    ``client.proximal_mu`` and the server optimizer's injected numbers live in
    ``state.hparams``; clients read ``eta``, ``rho`` and ``mu`` there.

    Args:
      model: a ``Model`` (classification) or a ``Task``.
      client_learning_rate: the local SGD step size ``eta`` (>= 0).
      momentum: heavy-ball momentum ``rho`` in ``[0, 1)``; ``None``: plain SGD (no momentum
        hyperparameter).
      proximal_mu: FedProx's coefficient ``mu`` (>= 0; 0: none).
      server_optimizer: applied to the pseudo-gradient; default ``optax.sgd(1.0)``.
      weighting: ``num_examples`` (the paper's ``p_i``) or ``uniform``.
      executor: how clients run (default ``Executor()``).
      hparams: the hyperparameters ``state.hparams`` keeps (default: all of the above; a
        subset with their values).
      pipeline: the aggregation pipeline the normalized updates go through (default the
        mean); ``tau_eff``'s terms are summed beside it (``ClientOutput.extras``) and scale
        its output before the server optimizer.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``.
    """
    _check_numbers(client_learning_rate, momentum, proximal_mu)
    extra = {} if momentum is None else {"momentum": float(momentum)}
    client_optimizer = get_optimizer("sgd", float(client_learning_rate), inject=True, **extra)
    own = {PROXIMAL_MU: float(proximal_mu)}
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    executor, loss_fn, hparams, server = setup(
        model, executor, weighting, pipeline, hparams, own, client_optimizer, server_optimizer
    )

    def init(params):
        return server.init(params, hparams)

    def client_fn(x, data, client_state, ckey):
        hp = data["hparams"]
        opt_state = with_optimizer_hparams(client_optimizer.init(x), hp, "client")
        opt_hp = injected_hyperparams(opt_state)
        lr = opt_hp["learning_rate"]
        rho = opt_hp.get("momentum", jnp.zeros((), jnp.float32))
        mu = hp[PROXIMAL_MU] if PROXIMAL_MU in hp else jnp.asarray(proximal_mu, jnp.float32)

        def prox(g, p):
            return jax.tree.map(lambda g, p, a: g + mu.astype(g.dtype) * (p - a), g, p, x)

        local = local_update(
            x,
            data,
            ckey,
            loss_fn=loss_fn,
            optimizer=client_optimizer,
            executor=executor,
            opt_state=opt_state,
            # A built-in 0 leaves the term out; a sweep over it builds it in.
            grad_transform=prox if proximal_mu else None,
        )
        tau = num_real_steps(data["mask"]).astype(jnp.float32)
        a = accumulation_norm(tau, rho, lr * mu, data["mask"].shape[0])
        inv_a = jnp.where(a > 0, 1.0 / jnp.where(a > 0, a, 1.0), 0.0)
        w = jnp.where(tau > 0, client_weight(data["num_examples"], weighting), 0.0)
        steps = jnp.where(mu > 0, tau, a)
        return ClientOutput(
            # eta d_i = (x - y_i) / ||a_i||_1 goes through the pipeline ...
            update=jax.tree.map(lambda d: d * inv_a.astype(d.dtype), tree_sub(x, local.params)),
            weight=w,
            metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
            client_state=client_state,
            extras=(w * steps, w),  # ... and this client's term of tau_eff is summed beside it
        )

    def aggregate_rule(mean_normalized, sums):
        weighted_steps, total = sums
        # tau_eff = sum_i p_i ||a_i||_1 (or p_i tau_i with a proximal term).
        tau_eff = weighted_steps * jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
        return jax.tree.map(lambda s: s * tau_eff.astype(s.dtype), mean_normalized)

    def apply(state, cohort, key):
        return server.round(state, cohort, key, client_fn, executor, aggregate_rule=aggregate_rule)

    return FederatedAlgorithm(
        init=on_mesh(init, executor), apply=apply, lazy_examples=True, hparams=hparams
    )


def accumulation_norm(tau: Array, rho: Array, eta_mu: Array, max_steps: int) -> Array:
    """``||a_i||_1`` for ``tau`` local steps (at most ``max_steps``) of SGD with momentum
    ``rho`` or a proximal term with ``eta * mu = eta_mu`` (at most one of them nonzero).

    Momentum: ``sum_{k=1..tau} (1 - rho^k) / (1 - rho) = sum_{j<tau} (tau - j) rho^j`` (the
    second form has no division, so ``rho = 0`` gives ``tau`` exactly). Proximal:
    ``sum_{j<tau} (1 - eta_mu)^j``. Both are ``tau`` when their coefficient is 0.
    """
    j = jnp.arange(max_steps, dtype=jnp.float32)
    live = j < tau
    with_momentum = jnp.sum(jnp.where(live, (tau - j) * jnp.power(rho, j), 0.0))
    proximal = jnp.sum(jnp.where(live, jnp.power(1.0 - eta_mu, j), 0.0))
    return jnp.where(eta_mu > 0, proximal, with_momentum)


def _check_numbers(client_learning_rate, momentum, proximal_mu) -> None:
    if client_learning_rate < 0:
        raise ValueError(
            f"the client learning rate must be >= 0, got {client_learning_rate}; a negative "
            "step size ascends the loss."
        )
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"client momentum must be in [0, 1), got {momentum}.")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}.")
    if momentum and proximal_mu:
        raise ValueError(
            "FedNova normalizes by the local solver's accumulation vector a_i, which the paper "
            "gives for momentum SGD and for the proximal term but not for both at once; set "
            f"client momentum (got {momentum}) or client.proximal_mu (got {proximal_mu}) to 0."
        )
    if proximal_mu and client_learning_rate * proximal_mu >= 1.0:
        raise ValueError(
            f"client.learning_rate * client.proximal_mu must be < 1 (got "
            f"{client_learning_rate} * {proximal_mu}): each local step would overshoot the "
            "server model."
        )


def hparams_of_config(config) -> dict[str, float]:
    """``fednova``'s hyperparameters for ``config`` (see ``AlgorithmSpec.hparams``)."""
    return {
        PROXIMAL_MU: float(config.client.get("proximal_mu", 0.0)),
        **config_optimizer_hparams(config.client, "client"),
        **config_optimizer_hparams(config.server, "server"),
        **pipeline_hparams_of_config(config),
    }


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``fednova`` from a config: ``client.optimizer`` ``sgd`` (optionally ``kwargs.momentum``)
    or ``momentum``, ``client.learning_rate``, ``client.proximal_mu``, any ``server.*``
    optimizer, ``weighting``."""
    spec = config.client
    if spec.optimizer not in CLIENT_OPTIMIZERS:
        raise ValueError(
            f"fednova knows the accumulation vector a_i of SGD, momentum SGD and the proximal "
            f"term only; client.optimizer {spec.optimizer!r} is not one of "
            f"{', '.join(CLIENT_OPTIMIZERS)} (set client.kwargs.momentum for momentum)."
        )
    kwargs = dict(spec.kwargs.to_dict()) if spec.get("kwargs") is not None else {}
    unknown = sorted(set(kwargs) - {"momentum", "nesterov"})
    if unknown:
        raise ValueError(f"fednova's client SGD takes only client.kwargs.momentum; got {unknown}.")
    if kwargs.get("nesterov"):
        raise ValueError(
            "fednova's a_i is that of heavy-ball momentum; client.kwargs.nesterov=True is not "
            "supported (set it to False)."
        )
    momentum = kwargs.get("momentum", 0.9 if spec.optimizer == "momentum" else None)
    hp = hparams_of_config(config)
    return fednova(
        ctx.task,
        float(spec.learning_rate),
        momentum=None if momentum is None else float(momentum),
        proximal_mu=hp[PROXIMAL_MU],
        server_optimizer=optimizer_from_config(config.server),
        weighting=config.weighting,
        executor=ctx.executor,
        hparams=hp,
        pipeline=pipeline_for(config, ctx),
    )


def messages(config, task, params) -> Messages:
    """The model down; the normalized delta and ``tau_eff``'s two terms up."""
    del config, task
    return Messages(
        down=params,
        update=params,
        extras=(jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)),
    )


SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    description="FedNova: normalized averaging for unequal local steps (Wang et al. 2020)",
    # tau_eff (summed outside the pipeline) scales the aggregate after DP noise or SecAgg
    # would have acted, and carries the clients' step counts in the clear: both refused.
    supports=frozenset(FEATURES) - {"secure_aggregation", "dp", "adaptive_clipping"},
    messages=messages,
)

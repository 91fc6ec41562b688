"""FedAvg and the FedOpt family (FedAvgM, FedAdam, FedYogi, FedAdagrad), FedProx, DP-FedAvg."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import optax

from fedjax_sim import features
from fedjax_sim.aggregators import Aggregator
from fedjax_sim.aggregators.adversary import Adversary
from fedjax_sim.aggregators.compression import Compressor
from fedjax_sim.aggregators.pipeline import Pipeline, build_pipeline
from fedjax_sim.aggregators.transforms import AggregationTransform
from fedjax_sim.algorithms.base import (
    ALL_FEATURES,
    UNROLL_STEPS,  # noqa: F401 (re-exported: its old home)
    AlgorithmSpec,
    BuildContext,
    client_weight,
    config_optimizer_hparams,
    local_update,
    on_mesh,
    pipeline_for,
    proximal_gradient,
    setup,
)
from fedjax_sim.core.client import tree_sub
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Model
from fedjax_sim.optimizers import optimizer_from_config

PROXIMAL_MU = "client.proximal_mu"


def fedopt(
    model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    weighting: str = "num_examples",
    aggregator: Aggregator | None = None,
    transforms: tuple[AggregationTransform, ...] = (),
    proximal_mu: float = 0.0,
    clip_norm: float = 0.0,
    noise_multiplier: float = 0.0,
    expected_clients: float | None = None,
    adaptive_clipping: Mapping[str, float] | None = None,
    adversary: Adversary | None = None,
    attack_fraction: float = 0.0,
    error_feedback: Compressor | None = None,
    num_clients: int | None = None,
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
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

    The three numbers, and every injected hyperparameter of the two optimizers (build them
    with ``fs.get_optimizer(..., inject=True)``), live in ``state.hparams`` (names:
    ``client.proximal_mu``, ``dp.clip_norm``, ``dp.noise_multiplier``,
    ``client.learning_rate``, ``server.kwargs.momentum``, ...). A built-in 0 leaves its piece
    out of the program; a sweep that traces it builds the algorithm with the piece in.

    Args:
      model: a ``Model`` (classification) or a ``Task``.
      client_optimizer: the local optimizer, re-initialized every round.
      server_optimizer: applied to the aggregated pseudo-gradient.
      weighting: ``num_examples`` (weight by client size) or ``uniform``.
      aggregator: how client deltas combine; default the weighted mean.
      transforms: further aggregation transforms, after clipping and before the noise.
      proximal_mu: FedProx's proximal coefficient (0: none).
      clip_norm: bound on each client's delta norm (0: no clipping).
      noise_multiplier: Gaussian noise on the aggregate, in units of ``clip_norm / n`` (0:
        none); needs ``clip_norm`` > 0, ``weighting="uniform"`` and the mean aggregator.
      expected_clients: with noise under Poisson sampling, the expected cohort size ``q N``:
        the aggregate is the sum of the clipped updates over it and the noise std
        ``z S / (q N)`` (McMahan et al. 2018); ``None``: the mean over the real clients.
      adaptive_clipping: ``{"target_quantile", "clip_learning_rate", "clipped_count_stddev"}``
        to clip adaptively (Andrew et al. 2021, ``privacy.adaptive``): ``clip_norm`` is the
        initial clip norm and ``noise_multiplier`` the total ``z`` the accountant sees.
      adversary: malicious clients (``aggregators.adversary``), a fraction
        ``attack_fraction`` of the population (hyperparameter ``attack.fraction``).
      error_feedback: a compressor ``(update, key) -> update`` applied with error feedback
        (Stich et al. 2018; ``aggregators.compression.with_error_feedback``): each client
        keeps what compression dropped as its residual (the pipeline's per-client state,
        ``state.aggregator_state[2]``, a ``[num_clients, ...]`` table) and adds it to its
        next update.
      num_clients: the population (the residual table's rows; needed with error feedback).
      executor: how clients run (default ``Executor()``: strategy ``auto``, one device).
      hparams: the hyperparameters ``state.hparams`` keeps (default: the three numbers above
        and every injected optimizer hyperparameter); a subset of those, with their values.
        An optimizer hyperparameter left out keeps its built-in value.
      pipeline: a built ``aggregators.pipeline.Pipeline`` (what a config's build passes);
        it replaces ``weighting``'s checks and the aggregation arguments above.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``.
    """
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}.")
    if pipeline is None:
        pipeline = build_pipeline(
            weighting=weighting,
            aggregator=aggregator,
            transforms=transforms,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            expected_clients=expected_clients,
            adaptive_clipping=adaptive_clipping,
            adversary=adversary,
            attack_fraction=attack_fraction,
            error_feedback=error_feedback,
            num_clients=num_clients or 0,
        )
    own = {PROXIMAL_MU: float(proximal_mu)}
    executor, loss_fn, hparams, server = setup(
        model, executor, weighting, pipeline, hparams, own, client_optimizer, server_optimizer
    )

    def init(params):
        return server.init(params, hparams)

    def apply(state, cohort, key):
        def client_fn(broadcast, data, client_state, ckey):
            prox = partial(proximal_gradient, mu=data["hparams"][PROXIMAL_MU], anchor=broadcast)
            local = local_update(
                broadcast,
                data,
                ckey,
                loss_fn=loss_fn,
                optimizer=client_optimizer,
                executor=executor,
                grad_transform=prox if proximal_mu else None,
            )
            return ClientOutput(
                update=tree_sub(broadcast, local.params),
                weight=client_weight(data["num_examples"], weighting),
                metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
                client_state=client_state,
            )

        return server.round(state, cohort, key, client_fn, executor)

    return FederatedAlgorithm(
        init=on_mesh(init, executor), apply=apply, lazy_examples=True, hparams=hparams
    )


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
      model: the model (or a ``Task``).
      client_optimizer: the local optimizer.
      server_learning_rate: 1.0 replaces the global model by the clients' weighted mean.
      **kwargs: ``weighting``, ``aggregator``, ``transforms``, ``proximal_mu``,
        ``clip_norm``, ``noise_multiplier``, ``executor`` as in ``fedopt``.

    Returns:
      A ``FederatedAlgorithm``.
    """
    return fedopt(model, client_optimizer, optax.sgd(server_learning_rate), **kwargs)


def hparams_of_config(config) -> dict[str, float]:
    """``fedopt``'s hyperparameters for ``config`` (see ``AlgorithmSpec.hparams``)."""
    return {
        PROXIMAL_MU: float(config.client.get("proximal_mu", 0.0)),
        **features.pipeline_hparams_of_config(config),
        **config_optimizer_hparams(config.client, "client"),
        **config_optimizer_hparams(config.server, "server"),
    }


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``fedopt`` from a config: ``client.*`` and ``server.*`` optimizers (injected, so their
    numbers are sweepable), ``client.proximal_mu``, ``weighting`` and the framework's
    aggregation pipeline (``ctx.pipeline``: ``aggregator``, ``dp.*``, ``compression.*``,
    ``attack.*``)."""
    hp = hparams_of_config(config)
    return fedopt(
        ctx.task,
        optimizer_from_config(config.client),
        optimizer_from_config(config.server),
        weighting=config.weighting,
        proximal_mu=hp[PROXIMAL_MU],
        num_clients=ctx.num_clients,
        executor=ctx.executor,
        hparams=hp,
        pipeline=pipeline_for(config, ctx),
    )


SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    description="FedAvg / FedOpt (any Optax server optimizer), FedProx, DP-FedAvg mechanism",
    supports=ALL_FEATURES,
)

"""FedAvg and the FedOpt family (FedAvgM, FedAdam, FedYogi, FedAdagrad), FedProx, DP-FedAvg."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import optax

from fedjax_sim import aggregators
from fedjax_sim.aggregators import Aggregator, weighted_mean
from fedjax_sim.aggregators.adversary import FRACTION, Adversary, check_fraction
from fedjax_sim.aggregators.adversary import adversary as make_adversary
from fedjax_sim.aggregators.compression import (
    Compressor,
    compress_updates,
    compressor,
    with_error_feedback,
)
from fedjax_sim.aggregators.transforms import AggregationTransform, chain
from fedjax_sim.algorithms.base import (
    ALL_FEATURES,
    UNROLL_STEPS,  # noqa: F401 (re-exported: its old home)
    AlgorithmSpec,
    BuildContext,
    ServerSide,
    client_weight,
    config_optimizer_hparams,
    local_update,
    optimizer_hparams,
    proximal_gradient,
    select_hparams,
)
from fedjax_sim.core.client import tree_sub
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.task import as_task, mean_loss_fn
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Model
from fedjax_sim.optimizers import optimizer_from_config
from fedjax_sim.privacy import (
    CLIP_NORM,
    NOISE_MULTIPLIER,
    accounting,
    clip_updates,
    fixed_denominator,
    gaussian_noise,
)
from fedjax_sim.privacy import adaptive as privacy_adaptive

EF_SALT = 2**31 - 9  # folded into a client's key: its error-feedback compressor's randomness
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
        keeps what compression dropped as its residual (``state.client_states``, a
        ``[num_clients, ...]`` table) and adds it to its next update.
      num_clients: the population (the residual table's rows; needed with error feedback).
      executor: how clients run (default ``Executor()``: strategy ``auto``, one device).
      hparams: the hyperparameters ``state.hparams`` keeps (default: the three numbers above
        and every injected optimizer hyperparameter); a subset of those, with their values.
        An optimizer hyperparameter left out keeps its built-in value.

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``.
    """
    task = as_task(model)
    executor = (executor or Executor()).check()
    client_weight(jax.numpy.zeros(()), weighting)  # validates the name eagerly
    _check_numbers(proximal_mu, clip_norm, noise_multiplier, weighting, aggregator)
    aggregator = aggregator or weighted_mean()
    loss_fn = mean_loss_fn(task, train=True)
    if adaptive_clipping is not None:
        _check_adaptive(clip_norm, noise_multiplier, transforms, adaptive_clipping)
        pipeline = chain(privacy_adaptive.adaptive_clipping(clip_norm, expected_clients))
        clip_norm_piece = noise_piece = False
    else:
        clip_norm_piece, noise_piece = bool(clip_norm), bool(noise_multiplier)
    pipeline = (
        pipeline
        if adaptive_clipping is not None
        else chain(
            *([clip_updates()] if clip_norm_piece else []),
            *transforms,
            *([fixed_denominator(expected_clients)] if noise_piece and expected_clients else []),
            *([gaussian_noise(expected_clients=expected_clients)] if noise_piece else []),
        )
    )
    known = {
        PROXIMAL_MU: float(proximal_mu),
        CLIP_NORM: float(clip_norm),
        NOISE_MULTIPLIER: float(noise_multiplier),
        **({FRACTION: float(attack_fraction)} if adversary is not None else {}),
        **{f"dp.{k}": float(v) for k, v in (adaptive_clipping or {}).items()},
        **optimizer_hparams(client_optimizer, "client"),
        **optimizer_hparams(server_optimizer, "server"),
    }
    hparams = select_hparams(known, hparams)

    server = ServerSide(server_optimizer, aggregator, pipeline, adversary)
    if error_feedback is not None:
        if not num_clients or clip_norm:
            raise ValueError(
                "error feedback needs num_clients (its residual table) and no clipping after "
                "it (dp.clip_norm = 0): the residual must be what compression dropped."
            )
        feedback = with_error_feedback(error_feedback)

    def init(params):
        if error_feedback is None:
            return server.init(params, hparams)
        table = jax.tree.map(lambda p: jax.numpy.zeros((num_clients, *p.shape), p.dtype), params)
        return server.init(params, hparams, client_states=table)

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
            update = tree_sub(broadcast, local.params)
            weight = client_weight(data["num_examples"], weighting)
            if error_feedback is not None:
                ekey = jax.random.fold_in(ckey, EF_SALT)
                update, residual = feedback(update, client_state, ekey)
                # A client whose update does not count (no real steps) keeps its residual.
                client_state = jax.tree.map(
                    lambda new, old: jax.numpy.where(weight > 0, new, old), residual, client_state
                )
            return ClientOutput(
                update=update,
                weight=weight,
                metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
                client_state=client_state,
            )

        return server.round(state, cohort, key, client_fn, executor)

    return FederatedAlgorithm(init=init, apply=apply, lazy_examples=True, hparams=hparams)


def _check_adaptive(clip_norm, noise_multiplier, transforms, settings) -> None:
    known = {"target_quantile", "clip_learning_rate", "clipped_count_stddev"}
    if set(settings) != known:
        raise ValueError(
            f"adaptive_clipping needs exactly {sorted(known)}, got {sorted(settings)}."
        )
    if not 0.0 < settings["target_quantile"] < 1.0:
        raise ValueError(
            f"dp.target_quantile must be in (0, 1), got {settings['target_quantile']}."
        )
    if settings["clip_learning_rate"] < 0 or settings["clipped_count_stddev"] < 0:
        raise ValueError("dp.clip_learning_rate and dp.clipped_count_stddev must be >= 0.")
    if clip_norm <= 0:
        raise ValueError("adaptive clipping starts from dp.clip_norm > 0 (Andrew et al.: 0.1).")
    if transforms:
        raise ValueError("adaptive clipping is the only aggregation transform it supports.")
    if noise_multiplier > 0:  # the count's noise must leave budget for the update's
        accounting.split_noise_multiplier(noise_multiplier, settings["clipped_count_stddev"])


def _check_numbers(proximal_mu, clip_norm, noise_multiplier, weighting, aggregator) -> None:
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}.")
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
    adaptive = adaptive_of(config)
    return {
        PROXIMAL_MU: float(config.client.get("proximal_mu", 0.0)),
        CLIP_NORM: float(config.dp.clip_norm) if "dp" in config else 0.0,
        NOISE_MULTIPLIER: float(config.dp.noise_multiplier) if "dp" in config else 0.0,
        **({FRACTION: attack_of(config)[1]} if attack_of(config) else {}),
        **{f"dp.{k}": v for k, v in (adaptive or {}).items()},
        **config_optimizer_hparams(config.client, "client"),
        **config_optimizer_hparams(config.server, "server"),
    }


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``fedopt`` from a config: ``client.*`` and ``server.*`` optimizers (injected, so their
    numbers are sweepable), ``client.proximal_mu``, ``dp.*``, ``weighting``, ``aggregator``."""
    hp = hparams_of_config(config)
    return fedopt(
        ctx.task,
        optimizer_from_config(config.client),
        optimizer_from_config(config.server),
        weighting=config.weighting,
        aggregator=aggregator_of(config),
        proximal_mu=hp[PROXIMAL_MU],
        clip_norm=hp[CLIP_NORM],
        noise_multiplier=hp[NOISE_MULTIPLIER],
        expected_clients=expected_clients_of(config, ctx.num_clients),
        transforms=compression_transforms(config),
        error_feedback=error_feedback_of(config),
        num_clients=ctx.num_clients,
        adaptive_clipping=adaptive_of(config),
        adversary=adversary_of(config, ctx),
        attack_fraction=hp.get(FRACTION, 0.0),
        executor=ctx.executor,
        hparams=hp,
    )


def compression_transforms(config) -> tuple[AggregationTransform, ...]:
    """The upload compression of ``config.compression`` as a client-stage transform (none
    with error feedback: ``error_feedback_of``)."""
    group = config.get("compression")
    if group is None or group.method == "none" or group.get("error_feedback", False):
        return ()
    return (compress_updates(str(group.method), **group.kwargs.to_dict()),)


def error_feedback_of(config) -> Compressor | None:
    """The compressor of ``config.compression`` with ``error_feedback``, else ``None``."""
    group = config.get("compression")
    if group is None or group.method == "none" or not group.get("error_feedback", False):
        return None
    return compressor(str(group.method), **group.kwargs.to_dict())


def aggregator_of(config) -> Aggregator:
    """``config.aggregator`` built with ``config.aggregator_kwargs``."""
    kwargs = config.get("aggregator_kwargs")
    return aggregators.get_aggregator(config.aggregator, **(kwargs.to_dict() if kwargs else {}))


def attack_of(config) -> tuple[str, float] | None:
    """``(attack name, fraction)`` of a config with an attack, else ``None``."""
    group = config.get("attack")
    if group is None or group.name == "none":
        return None
    return group.name, check_fraction(float(group.fraction))


def adversary_of(config, ctx: BuildContext) -> Adversary | None:
    """The config's malicious clients, drawn from its data seed (see ``aggregators.adversary``)."""
    attack = attack_of(config)
    if attack is None:
        return None
    seed = int(config.get("data_seed", -1))
    seed = int(config.seed) if seed < 0 else seed
    model = ctx.task.model
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.numpy.zeros((1, *model.input_shape), jax.numpy.float32)
    logits = jax.eval_shape(lambda p: model.apply(p, x, train=False, key=None), shapes)
    num_classes = int(logits.shape[-1])  # label flipping maps y to num_classes - 1 - y
    return make_adversary(
        attack[0], seed=seed, num_classes=num_classes, **config.attack.kwargs.to_dict()
    )


def adaptive_of(config) -> dict[str, float] | None:
    """The adaptive clipping settings of a config with ``dp.adaptive``, else ``None``."""
    dp = config.get("dp")
    if dp is None or not dp.get("adaptive", False):
        return None
    stddev = float(dp.get("clipped_count_stddev", 0.0))
    if stddev == 0:  # Andrew et al.: the expected cohort over 20
        stddev = float(config.clients_per_round) / 20
    return {
        "target_quantile": float(dp.target_quantile),
        "clip_learning_rate": float(dp.clip_learning_rate),
        "clipped_count_stddev": stddev,
    }


def expected_clients_of(config, num_clients: int) -> float | None:
    """``q N`` for a noised config under Poisson sampling (``fedopt``'s ``expected_clients``)."""
    sampling = config.get("sampling")
    if sampling is None or sampling.scheme != "poisson" or not config.dp.noise_multiplier:
        return None
    return float(sampling.rate or config.clients_per_round / num_clients) * num_clients


SPEC = AlgorithmSpec(
    build=build,
    hparams=hparams_of_config,
    description="FedAvg / FedOpt (any Optax server optimizer), FedProx, DP-FedAvg mechanism",
    supports=ALL_FEATURES,
)

"""The names of Reddi et al. 2021 ("Adaptive Federated Optimization"): FedAdam, FedYogi,
FedAdagrad and FedAvgM, each ``fedopt`` with its server optimizer fixed.

The paper's experiments (Section 5) run momentum-free SGD on the clients and one of these on
the server: FedAdam and FedYogi with ``beta1 = 0.9, beta2 = 0.99``, FedAdagrad (here without a
first moment), all with adaptivity ``tau`` (``1e-3`` here; the paper tunes it per task), FedAvgM
with server momentum ``0.9``. Those are the defaults of the server updates in
``fedjax_sim.optimizers`` (``fedadam``, ``fedyogi``, ``fedadagrad`` follow Algorithm 2 to the
letter; ``momentum`` is SGD with momentum). From a config, every number stays configurable:
``server.learning_rate``, ``server.kwargs.{b1,b2,tau,momentum,...}``, ``client.learning_rate``.
The paper tunes the server learning rate per task (its grid runs from 10^-3 to 10^1). A
config file written for FedAvg has ``server.learning_rate = 1.0``, too large for FedAdam and
FedYogi, whose steps are about ``eta`` per coordinate from the first round: switching to them
with ``--config.algorithm`` sets ``server.learning_rate = 0.1`` (``AlgorithmSpec.
config_defaults``; measured on ``default:smoke``: FedAdam 0.498 test accuracy at 1.0, 0.797 at
0.1; FedYogi 0.500 and 0.796). FedAdagrad and FedAvgM keep the config's value (0.803 and 0.798
there at 1.0). A config file that names the algorithm sets its own.

Nothing here re-implements FedOpt: the factories call ``fedopt`` and the specs call
``fedavg.build`` on the config with its server optimizer set to the name's. A config whose
``server.optimizer`` names another optimizer than the name's (other than the default
``sgd``), or whose clients are not plain SGD, is refused: ``algorithm = "fedopt"`` runs any
combination.
"""

from __future__ import annotations

import functools

import optax

from fedjax_sim.algorithms import fedavg
from fedjax_sim.algorithms.base import AlgorithmSpec, BuildContext
from fedjax_sim.core.types import FederatedAlgorithm
from fedjax_sim.optimizers import get_optimizer

# Algorithm name -> the server optimizer it fixes (``fedjax_sim.optimizers`` names).
SERVER_OPTIMIZERS = {
    "fedadam": "fedadam",
    "fedyogi": "fedyogi",
    "fedadagrad": "fedadagrad",
    "fedavgm": "momentum",
}


def _client_sgd(learning_rate: float) -> optax.GradientTransformation:
    return get_optimizer("sgd", learning_rate, inject=True)


def fedadam(
    model,
    *,
    client_learning_rate: float,
    server_learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    **kwargs,
) -> FederatedAlgorithm:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): clients
    run SGD, the server applies Adam without bias correction to the mean client delta
    (``fs.optimizers.fedadam``).

    Args:
      model: a ``Model`` or a ``Task``.
      client_learning_rate: the clients' SGD step size (no momentum, as in the paper).
      server_learning_rate: the server's step size ``eta``.
      b1, b2: the moment decays (the paper: 0.9, 0.99).
      tau: the adaptivity, ``v_{-1} = tau**2`` and the denominator's offset.
      **kwargs: ``weighting``, ``aggregator``, ``transforms``, ``proximal_mu``,
        ``clip_norm``, ``noise_multiplier``, ``executor``, ``hparams`` as in ``fedopt``.

    Returns:
      ``fedopt``'s ``FederatedAlgorithm`` with these optimizers (all numbers injected).
    """
    server = get_optimizer("fedadam", server_learning_rate, inject=True, b1=b1, b2=b2, tau=tau)
    return fedavg.fedopt(model, _client_sgd(client_learning_rate), server, **kwargs)


def fedyogi(
    model,
    *,
    client_learning_rate: float,
    server_learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    **kwargs,
) -> FederatedAlgorithm:
    """FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): clients
    run SGD, the server applies Yogi's additive second-moment update
    (``fs.optimizers.fedyogi``).

    Args:
      model: a ``Model`` or a ``Task``.
      client_learning_rate: the clients' SGD step size (no momentum, as in the paper).
      server_learning_rate: the server's step size ``eta``.
      b1, b2: the moment decays (the paper: 0.9, 0.99).
      tau: the adaptivity, ``v_{-1} = tau**2`` and the denominator's offset.
      **kwargs: further ``fedopt`` arguments (see ``fedadam``).

    Returns:
      ``fedopt``'s ``FederatedAlgorithm`` with these optimizers (all numbers injected).
    """
    server = get_optimizer("fedyogi", server_learning_rate, inject=True, b1=b1, b2=b2, tau=tau)
    return fedavg.fedopt(model, _client_sgd(client_learning_rate), server, **kwargs)


def fedadagrad(
    model,
    *,
    client_learning_rate: float,
    server_learning_rate: float,
    tau: float = 1e-3,
    **kwargs,
) -> FederatedAlgorithm:
    """FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): clients
    run SGD, the server accumulates squared mean deltas (``fs.optimizers.fedadagrad``, which
    keeps no first moment: ``beta1 = 0``).

    Args:
      model: a ``Model`` or a ``Task``.
      client_learning_rate: the clients' SGD step size (no momentum, as in the paper).
      server_learning_rate: the server's step size ``eta``.
      tau: the adaptivity, ``v_{-1} = tau**2`` and the denominator's offset.
      **kwargs: further ``fedopt`` arguments (see ``fedadam``).

    Returns:
      ``fedopt``'s ``FederatedAlgorithm`` with these optimizers (all numbers injected).
    """
    server = get_optimizer("fedadagrad", server_learning_rate, inject=True, tau=tau)
    return fedavg.fedopt(model, _client_sgd(client_learning_rate), server, **kwargs)


def fedavgm(
    model,
    *,
    client_learning_rate: float,
    server_learning_rate: float,
    momentum: float = 0.9,
    **kwargs,
) -> FederatedAlgorithm:
    """FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution
    for Federated Visual Classification"; the baseline of Reddi et al. 2021): clients run SGD,
    the server applies SGD with heavy-ball momentum to the mean client delta.

    Args:
      model: a ``Model`` or a ``Task``.
      client_learning_rate: the clients' SGD step size (no momentum, as in Reddi et al.).
      server_learning_rate: the server's step size.
      momentum: the server momentum (Reddi et al.: 0.9).
      **kwargs: further ``fedopt`` arguments (see ``fedadam``).

    Returns:
      ``fedopt``'s ``FederatedAlgorithm`` with these optimizers (all numbers injected).
    """
    server = get_optimizer("momentum", server_learning_rate, inject=True, momentum=momentum)
    return fedavg.fedopt(model, _client_sgd(client_learning_rate), server, **kwargs)


def paper_config(config, name: str):
    """A copy of ``config`` with the server optimizer that ``name`` fixes; refuses a config
    that names another server optimizer, or clients that are not momentum-free SGD."""
    implied = SERVER_OPTIMIZERS[name]
    given = config.server.optimizer
    if given not in ("sgd", implied):  # "sgd" is the config default: nothing was chosen
        raise ValueError(
            f"algorithm={name!r} fixes the server optimizer to {implied!r}, but "
            f"server.optimizer={given!r}; leave server.optimizer at 'sgd' (or {implied!r}), "
            f"or use algorithm='fedopt' with server.optimizer={given!r}."
        )
    client = config.client
    kwargs = client.kwargs.to_dict() if client.get("kwargs") is not None else {}
    if client.optimizer != "sgd" or kwargs.get("momentum") or kwargs.get("nesterov"):
        raise ValueError(
            f"algorithm={name!r} runs momentum-free SGD on the clients (Reddi et al. 2021), "
            f"but client.optimizer={client.optimizer!r} with client.kwargs={kwargs}; set "
            "client.optimizer='sgd' without momentum, or use algorithm='fedopt' for other "
            "client optimizers."
        )
    out = config.copy_and_resolve_references()
    out.server.optimizer = implied
    return out


def _hparams_of_config(config, *, name: str) -> dict[str, float]:
    return fedavg.hparams_of_config(paper_config(config, name))


def _build(config, ctx: BuildContext, *, name: str) -> FederatedAlgorithm:
    return fedavg.build(paper_config(config, name), ctx)


def _spec(name: str, description: str, server_learning_rate: float | None = None) -> AlgorithmSpec:
    defaults = None
    if server_learning_rate is not None:
        defaults = lambda config: {"server.learning_rate": server_learning_rate}  # noqa: E731
    return AlgorithmSpec(
        build=functools.partial(_build, name=name),
        hparams=functools.partial(_hparams_of_config, name=name),
        description=description,
        config_defaults=defaults,
        supports=fedavg.SPEC.supports,
    )


FEDADAM_SPEC = _spec(
    "fedadam", "FedAdam: fedopt with SGD clients and Reddi et al.'s Adam server", 0.1
)
FEDYOGI_SPEC = _spec(
    "fedyogi", "FedYogi: fedopt with SGD clients and Reddi et al.'s Yogi server", 0.1
)
FEDADAGRAD_SPEC = _spec(
    "fedadagrad", "FedAdagrad: fedopt with SGD clients and Reddi et al.'s Adagrad server"
)
FEDAVGM_SPEC = _spec("fedavgm", "FedAvgM: fedopt with SGD clients and server momentum (0.9)")

"""Federated algorithms, each one file plus one line in ``ALGORITHMS``.

A file defines a factory for the Python API (``fedopt(model, client_opt, server_opt, ...)``)
and ``SPEC = AlgorithmSpec(build, hparams)`` for configs (``config.algorithm = NAME``); see
``algorithms/base.py`` for the protocol and README "Architecture" for a walk-through.
"""

from fedjax_sim.algorithms import fedavg as _fedavg
from fedjax_sim.algorithms import fedsgd as _fedsgd
from fedjax_sim.algorithms.base import AlgorithmSpec, BuildContext, ServerState
from fedjax_sim.algorithms.fedavg import fedavg, fedopt
from fedjax_sim.algorithms.fedsgd import fedsgd

ALGORITHMS: dict[str, AlgorithmSpec] = {
    "fedavg": _fedavg.SPEC,
    "fedopt": _fedavg.SPEC,
    "fedsgd": _fedsgd.SPEC,
}


def register(name: str, spec: AlgorithmSpec) -> None:
    """Adds an algorithm under ``name`` (from user code or a config file); names are unique."""
    if not isinstance(spec, AlgorithmSpec):
        raise TypeError(f"register({name!r}, ...) needs an AlgorithmSpec, got {type(spec)}.")
    if name in ALGORITHMS and ALGORITHMS[name] is not spec:
        raise ValueError(f"an algorithm named {name!r} is already registered.")
    ALGORITHMS[name] = spec


def get_spec(name: str) -> AlgorithmSpec:
    """The registry entry of ``name``; an unknown name lists the known ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}.")
    return ALGORITHMS[name]


__all__ = [
    "ALGORITHMS",
    "AlgorithmSpec",
    "BuildContext",
    "ServerState",
    "fedavg",
    "fedopt",
    "fedsgd",
    "get_spec",
    "register",
]

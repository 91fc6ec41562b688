"""Federated algorithms, each a factory returning ``FederatedAlgorithm(init, apply)``."""

from fedjax_sim.algorithms.fedavg import ServerState, fedavg, fedopt
from fedjax_sim.algorithms.fedsgd import fedsgd

ALGORITHMS = {"fedavg": fedopt, "fedopt": fedopt, "fedsgd": fedsgd}
ALGORITHM_NAMES = tuple(sorted(ALGORITHMS))


def check_algorithm_name(name: str) -> str:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHM_NAMES)}.")
    return name


__all__ = ["ALGORITHMS", "ALGORITHM_NAMES", "ServerState", "fedavg", "fedopt", "fedsgd"]

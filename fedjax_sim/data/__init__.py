"""Federated data: containers, built-in datasets and packing into cohorts."""

import inspect

from fedjax_sim.data.federated import FederatedData, FederatedDataset, from_client_arrays
from fedjax_sim.data.on_disk import OnDiskClients, on_disk, write_clients
from fedjax_sim.data.packing import max_local_steps_of, pack_cohort, pack_eval
from fedjax_sim.data.population import SyntheticPopulation, population
from fedjax_sim.data.registry import DATASETS, PARTITIONERS, data_stats, load_federated
from fedjax_sim.data.synthetic import synthetic, synthetic_iid

BUILTIN_DATASETS = {
    "synthetic": "FedProx Synthetic(alpha, beta): 30 devices, 60 features, 10 classes",
    "synthetic_iid": "FedProx Synthetic-IID",
    "population": "clients generated on demand from the seed, any number (num_clients=10**6)",
    "on_disk": "a write_clients folder (path=): train clients read from disk on demand",
}


def dataset_names() -> list[str]:
    return sorted(set(BUILTIN_DATASETS) | set(DATASETS))


def get_federated_data(name: str, *, seed: int, **kwargs) -> FederatedData:
    """Builds a dataset by name: built-in (``synthetic``, ``synthetic_iid``) or a real one.

    Real datasets go through ``load_federated`` (TFDS, LEAF, TFF and FedJAX files); ``seed``
    seeds their partition unless ``kwargs`` sets ``seed``.
    """
    builtin = {
        "synthetic": synthetic,
        "synthetic_iid": synthetic_iid,
        "population": population,
        "on_disk": on_disk,
    }
    if name in builtin:
        fn = builtin[name]
        if name == "synthetic":
            kwargs.setdefault("alpha", 1.0)
            kwargs.setdefault("beta", 1.0)
        known = [p for p in inspect.signature(fn).parameters if p != "seed"]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(
                f"dataset {name!r} takes no argument(s) {', '.join(unknown)}; its arguments: "
                f"{', '.join(known)}."
            )
        if name == "on_disk":  # the folder's clients are what they are: no seed
            return fn(**kwargs)
        return fn(seed=seed, **kwargs)
    if name in DATASETS:
        if DATASETS[name].kind == "centralized":
            kwargs.setdefault("seed", seed)
        return load_federated(name, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}.")


__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "PARTITIONERS",
    "data_stats",
    "dataset_names",
    "load_federated",
    "FederatedData",
    "FederatedDataset",
    "from_client_arrays",
    "get_federated_data",
    "max_local_steps_of",
    "pack_cohort",
    "pack_eval",
    "on_disk",
    "OnDiskClients",
    "write_clients",
    "population",
    "SyntheticPopulation",
    "synthetic",
    "synthetic_iid",
]

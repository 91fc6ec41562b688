"""Federated data: containers, built-in datasets and packing into cohorts."""

from fedjax_sim.data.federated import FederatedData, FederatedDataset, from_client_arrays
from fedjax_sim.data.packing import max_local_steps_of, pack_cohort, pack_eval
from fedjax_sim.data.synthetic import synthetic, synthetic_iid

BUILTIN_DATASETS = {
    "synthetic": "FedProx Synthetic(alpha, beta): 30 devices, 60 features, 10 classes",
    "synthetic_iid": "FedProx Synthetic-IID",
}


def get_federated_data(name: str, *, seed: int, **kwargs) -> FederatedData:
    """Builds a dataset by name (``synthetic``, ``synthetic_iid``, ...)."""
    if name == "synthetic":
        kwargs.setdefault("alpha", 1.0)
        kwargs.setdefault("beta", 1.0)
        return synthetic(seed=seed, **kwargs)
    if name == "synthetic_iid":
        return synthetic_iid(seed=seed, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(BUILTIN_DATASETS))}.")


__all__ = [
    "BUILTIN_DATASETS",
    "FederatedData",
    "FederatedDataset",
    "from_client_arrays",
    "get_federated_data",
    "max_local_steps_of",
    "pack_cohort",
    "pack_eval",
    "synthetic",
    "synthetic_iid",
]

"""Host-side federated datasets: a mapping from client id to that client's arrays."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

ClientArrays = Mapping[str, np.ndarray]


class FederatedDataset:
    """Ragged per-client data held on the host as NumPy arrays.

    Every client maps feature names (for example ``x`` and ``y``) to arrays that share their
    leading (example) dimension; all clients share feature names, trailing shapes and dtypes.
    Clients keep the order they were given in; ``client_ids[i]`` names client index ``i``.

    Args:
      clients: mapping of client id to a dict of arrays, e.g. ``{"f0": {"x": x0, "y": y0}}``.
      name: optional label used in messages.
    """

    def __init__(self, clients: Mapping[str, ClientArrays], name: str = "dataset"):
        if not clients:
            raise ValueError(f"{name}: a federated dataset needs at least one client.")
        self.name = name
        self.client_ids: list[str] = [str(c) for c in clients]
        if len(set(self.client_ids)) != len(self.client_ids):
            raise ValueError(f"{name}: client ids are not unique once turned into strings.")
        self._clients: list[dict[str, np.ndarray]] = []
        spec = None
        for cid, arrays in clients.items():
            if not isinstance(arrays, Mapping) or not arrays:
                raise TypeError(
                    f"{name}: client {cid!r} must map feature names to arrays, got "
                    f"{type(arrays).__name__}."
                )
            arrays = {k: np.asarray(v) for k, v in arrays.items()}
            sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
            if None in sizes.values() or len(set(sizes.values())) != 1:
                raise ValueError(
                    f"{name}: client {cid!r} has features with different numbers of examples "
                    f"{sizes}; every feature needs the same leading dimension."
                )
            this_spec = {k: (v.shape[1:], v.dtype) for k, v in arrays.items()}
            if spec is None:
                spec = this_spec
            elif this_spec != spec:
                raise ValueError(
                    f"{name}: client {cid!r} has features {_fmt_spec(this_spec)} but the first "
                    f"client has {_fmt_spec(spec)}; all clients need the same names, trailing "
                    "shapes and dtypes."
                )
            self._clients.append(arrays)
        self.element_spec: dict[str, tuple[tuple[int, ...], np.dtype]] = spec
        self.sizes = np.array(
            [next(iter(a.values())).shape[0] for a in self._clients], dtype=np.int64
        )

    @property
    def num_clients(self) -> int:
        return len(self._clients)

    @property
    def num_examples(self) -> int:
        return int(self.sizes.sum())

    def client(self, index: int) -> dict[str, np.ndarray]:
        return self._clients[index]

    def __len__(self) -> int:
        return self.num_clients

    def __iter__(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        return iter(zip(self.client_ids, self._clients))

    def all_examples(self) -> dict[str, np.ndarray]:
        """All clients' examples concatenated in client order."""
        return {k: np.concatenate([c[k] for c in self._clients]) for k in self.element_spec}

    def subset(self, indices) -> FederatedDataset:
        return FederatedDataset(
            {self.client_ids[i]: self._clients[i] for i in indices}, name=self.name
        )

    def __repr__(self) -> str:
        return (
            f"FederatedDataset({self.name!r}, clients={self.num_clients}, "
            f"examples={self.num_examples}, features={_fmt_spec(self.element_spec)})"
        )


class FederatedData(NamedTuple):
    """A train/test pair of federated datasets over the same task."""

    train: FederatedDataset
    test: FederatedDataset
    num_classes: int


def from_client_arrays(
    train: Mapping[str, ClientArrays],
    test: Mapping[str, ClientArrays] | None = None,
    *,
    num_classes: int | None = None,
    name: str = "custom",
) -> FederatedData:
    """Wraps your own per-client arrays (client id -> {"x": ..., "y": ...}).

    Args:
      train: client id -> dict of arrays for training.
      test: the same for evaluation; defaults to ``train``.
      num_classes: number of label classes; inferred as ``max(y) + 1`` when omitted.
      name: label used in messages.

    Returns:
      A ``FederatedData``.
    """
    train_ds = FederatedDataset(train, name=f"{name}/train")
    test_ds = FederatedDataset(test, name=f"{name}/test") if test is not None else train_ds
    if "y" not in train_ds.element_spec:
        raise ValueError(f"{name}: every client needs a label array 'y'.")
    if num_classes is None:
        num_classes = int(max(int(np.max(c["y"], initial=0)) for _, c in train_ds)) + 1
    return FederatedData(train_ds, test_ds, num_classes)


def _fmt_spec(spec) -> str:
    return "{" + ", ".join(f"{k}: {np.dtype(d).name}{list(s)}" for k, (s, d) in spec.items()) + "}"

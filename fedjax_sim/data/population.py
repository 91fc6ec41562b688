"""Populations generated on demand: any number of clients, none of them held in memory.

A cross-device study samples cohorts of thousands from populations of millions. Here every
client's data is a pure function of ``(seed, split, client id)``: the round's cohort is
generated when it is packed and dropped after, so memory does not grow with the population.
The only per-client array is the index of sizes (one int32 per client, 4 MB per million),
itself a hash of the id, so any client's size is known without generating its data.

The task is linear classification with feature shift: a labelling model ``W, b`` shared by all
clients (drawn once from the seed), client ``i``'s features ``x ~ N(v_i, I)`` around its own
mean ``v_i ~ N(0, shift^2 I)``, labels ``argmax(x W + b)``. Clients therefore see different
label mixes (non-IID) of one learnable task; a logistic-regression model can reach high
accuracy, so a run's progress is visible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from fedjax_sim.core.keys import POPULATION_DATA_TAG
from fedjax_sim.data.federated import FederatedData, FederatedDataset

# Client ids fold into round keys below the salts of ``core.keys`` (2**31 - 11 and up).
MAX_POPULATION = 10**9
_SPLITS = {"train": 0, "test": 1}
_GLOBAL = 2**32 - 1  # the stream of the shared labelling model (never a client id)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, vectorized: a well-mixed 64-bit hash of each uint64."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _ClientIds(Sequence):
    """``c0000042``-style names of ``n`` clients, made when asked for (never a list of n)."""

    def __init__(self, n: int, prefix: str):
        self._n, self._prefix = n, prefix

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        i = int(i) + (self._n if int(i) < 0 else 0)
        if not 0 <= i < self._n:
            raise IndexError(f"client index {i} outside 0..{self._n - 1}")
        return f"{self._prefix}{i:07d}"


class OnDemandClients:
    """What a population held nowhere whole shares (``SyntheticPopulation``, the on-disk
    ``OnDiskClients``): ``num_clients``, iteration, ``subset`` (clients held in memory: an
    evaluation set) and the refusal of ``all_examples``. Subclasses set ``_n``, ``name``,
    ``client_ids``, ``sizes`` and ``client(i)``."""

    on_demand = True
    _n: int
    name: str

    @property
    def num_clients(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n

    def _check_index(self, index) -> int:
        index = int(index)
        if not 0 <= index < self._n:
            raise IndexError(f"client index {index} outside 0..{self._n - 1}")
        return index

    def __iter__(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        return ((self.client_ids[i], self.client(i)) for i in range(self._n))

    def all_examples(self):
        raise ValueError(
            f"{self.name}: clients made or read on demand ({self._n:_} of them) are never "
            "held in memory whole; keep the data on the host (data_on_device='host' or 'auto')."
        )

    def subset(self, indices) -> FederatedDataset:
        """Clients ``indices`` held in memory (an evaluation set)."""
        return FederatedDataset({self.client_ids[i]: self.client(i) for i in indices}, self.name)


class SyntheticPopulation(OnDemandClients):
    """A population whose clients are generated on demand (see the module docstring).

    It offers what packing and sampling read from a ``FederatedDataset`` (``num_clients``,
    ``sizes``, ``element_spec``, ``client(i)``, ``client_ids``) but never materializes the
    population: ``all_examples()`` is refused, so a run keeps its data on the host and packs
    each round's cohort from freshly generated clients.

    Args:
      num_clients: the population (1 .. 10**9).
      seed: the population's seed (the labelling model, every client's size and data).
      split: ``"train"`` or ``"test"``: two disjoint sets of clients of one task.
      dim: features per example.
      num_classes: label classes.
      min_examples, max_examples: each client's example count, uniform in this range.
      shift: standard deviation of the clients' feature means (0: IID features).
    """

    def __init__(
        self,
        num_clients: int,
        *,
        seed: int,
        split: str = "train",
        dim: int = 20,
        num_classes: int = 10,
        min_examples: int = 10,
        max_examples: int = 50,
        shift: float = 1.0,
    ):
        if not 1 <= int(num_clients) <= MAX_POPULATION:
            raise ValueError(
                f"a population needs 1..{MAX_POPULATION:_} clients, got {num_clients}."
            )
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(_SPLITS)}.")
        if dim < 1 or num_classes < 2:
            raise ValueError(f"need dim >= 1 and num_classes >= 2, got {dim} and {num_classes}.")
        if not 1 <= min_examples <= max_examples:
            raise ValueError(
                f"need 1 <= min_examples <= max_examples, got {min_examples}, {max_examples}."
            )
        if not shift >= 0:
            raise ValueError(f"shift must be >= 0, got {shift}.")
        self._n, self.seed, self.split = int(num_clients), int(seed), split
        self.dim, self.num_classes = int(dim), int(num_classes)
        self.min_examples, self.max_examples = int(min_examples), int(max_examples)
        self.shift = float(shift)
        self.name = f"population/{split}"
        self.client_ids = _ClientIds(self._n, "t" if split == "test" else "c")
        self.element_spec = {
            "x": ((self.dim,), np.dtype(np.float32)),
            "y": ((), np.dtype(np.int32)),
        }
        rng = np.random.default_rng([self.seed, POPULATION_DATA_TAG, _GLOBAL])
        self._w = rng.standard_normal((self.dim, self.num_classes)).astype(np.float32)
        self._b = rng.standard_normal(self.num_classes).astype(np.float32)
        self._sizes = None

    def sizes_of(self, indices) -> np.ndarray:
        """The example counts of clients ``indices`` (a hash of seed, split and id)."""
        ids = np.asarray(indices, np.uint64)
        salt = _splitmix64(np.uint64(self.seed) * np.uint64(2) + np.uint64(_SPLITS[self.split]))
        h = _splitmix64(ids ^ salt)
        span = np.uint64(self.max_examples - self.min_examples + 1)
        return (self.min_examples + (h % span)).astype(np.int32)

    @property
    def sizes(self) -> np.ndarray:
        """``[num_clients]`` int32 example counts: the population's one per-client array."""
        if self._sizes is None:
            self._sizes = self.sizes_of(np.arange(self._n, dtype=np.uint64))
        return self._sizes

    @property
    def num_examples(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def client(self, index: int) -> dict[str, np.ndarray]:
        """Client ``index``'s examples, generated now from ``(seed, split, index)``."""
        index = self._check_index(index)
        n = int(self.sizes_of([index])[0])
        rng = np.random.default_rng([self.seed, POPULATION_DATA_TAG, _SPLITS[self.split], index])
        mean = self.shift * rng.standard_normal(self.dim)
        x = (mean + rng.standard_normal((n, self.dim))).astype(np.float32)
        y = np.argmax(x @ self._w + self._b, axis=1).astype(np.int32)
        return {"x": x, "y": y}

    def __repr__(self) -> str:
        return (
            f"SyntheticPopulation({self.split!r}, clients={self._n:_}, dim={self.dim}, "
            f"classes={self.num_classes}, examples/client={self.min_examples}.."
            f"{self.max_examples})"
        )


def population(
    num_clients: int = 10_000,
    *,
    seed: int,
    test_clients: int = 100,
    dim: int = 20,
    num_classes: int = 10,
    min_examples: int = 10,
    max_examples: int = 50,
    shift: float = 1.0,
) -> FederatedData:
    """A synthetic population of ``num_clients`` training clients generated on demand and
    ``test_clients`` test clients of the same task, generated once and held (for evaluation).

    See ``SyntheticPopulation`` for the task and the arguments.
    """
    kw = dict(
        seed=seed, dim=dim, num_classes=num_classes, min_examples=min_examples,
        max_examples=max_examples, shift=shift,
    )  # fmt: skip
    if int(test_clients) < 1:
        raise ValueError(f"test_clients must be >= 1, got {test_clients}.")
    train = SyntheticPopulation(num_clients, split="train", **kw)
    test = SyntheticPopulation(test_clients, split="test", **kw).subset(range(int(test_clients)))
    return FederatedData(train, test, int(num_classes))

"""Real datasets by name: ``load_federated("mnist", partition="dirichlet", ...)``.

``DATASETS`` maps each name to a ``DatasetEntry`` (one-line ``description``, ``kind``
``"centralized"`` or ``"federated"``, the sub-folder of the data root it reads); ``PARTITIONERS``
maps each partition recipe to a ``PartitionerEntry``. Centralized datasets need a partition
(default ``iid`` when only ``num_clients`` is given); naturally federated ones bring their own
clients.

Caching (``cache_dir``, default ``$FEDJAX_SIM_CACHE`` or ``~/.cache/fedjax_sim``): decoded
centralized arrays (``arrays/``), client partitions (``partitions/``) and natural datasets
(``federated/``) are stored as ``.npz`` keyed by dataset, options, partition parameters and
seed, so a second run skips decoding and partitioning; a corrupt entry is rebuilt.

Offline by default: no loader reaches the network unless it is given ``download=True`` (TFDS
datasets only; ``dataset.kwargs.download=True`` in a config). Files that are not where a loader
looks are a one-line ``DataNotFoundError`` naming the path and what belongs there.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_sim.data import bucketing, centralized, federated_files, leaf, partition
from fedjax_sim.data.cache import arrays_to_federated, cached_arrays, federated_to_arrays
from fedjax_sim.data.federated import FederatedData, FederatedDataset
from fedjax_sim.data.files import dataset_dir, default_cache_dir, default_data_dir

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "DatasetEntry",
    "PartitionerEntry",
    "data_stats",
    "load_centralized",
    "load_federated",
    "partition_centralized",
]


class DatasetEntry(NamedTuple):
    """A named dataset.

    Attributes:
      name: registry name.
      description: one line for listings.
      kind: ``"centralized"`` (needs a partition) or ``"federated"`` (natural clients).
      subdir: the folder under the data root it reads (None: given by path arguments).
      load: centralized: ``load(data_dir=, tfds_data_dir=, **kwargs) -> (raw splits,
        num_classes)``; federated: ``load(data_dir=, **kwargs) -> FederatedData``.
      finalize: centralized only: raw split arrays -> model-ready arrays (e.g. uint8 -> float).
      cacheable: whether its arrays are worth storing in the cache.
    """

    name: str
    description: str
    kind: str
    subdir: str | None
    load: Callable
    finalize: Callable[[dict], dict] | None = None
    cacheable: bool = True


class PartitionerEntry(NamedTuple):
    name: str
    description: str
    fn: Callable[..., partition.Partition]


def _identity(d: dict) -> dict:
    return d


def _gray(d: dict) -> dict:
    return {**d, "x": np.asarray(d["x"], np.float32) * np.float32(1 / 255)}


def _tfds_entry(name: str, description: str, finalize, raw_fn, cacheable: bool = True):
    def load(*, data_dir=None, tfds_data_dir=None, **kwargs):
        return raw_fn(data_dir=data_dir, tfds_data_dir=tfds_data_dir, **kwargs)

    return DatasetEntry(name, description, "centralized", name, load, finalize, cacheable)


def _cifar10_raw(**kw):
    return centralized.cifar10(**kw), 10


def _cifar100_raw(*, label="label", **kw):
    return centralized.cifar100(label=label, **kw), (100 if label == "label" else 20)


def _tiny_shakespeare_raw(**kw):
    return centralized.tiny_shakespeare(**kw), len(leaf.LEAF_CHARS)


def _cifar10_jpeg_raw(*, data_dir=None, tfds_data_dir=None, verify_checksum=True):
    del tfds_data_dir
    return centralized.cifar10_jpeg(
        dataset_dir(data_dir, "cifar10_jpeg"), verify_checksum=verify_checksum
    ), 10


def _natural(fn, subdir):
    def load(*, data_dir=None, **kwargs):
        return fn(dataset_dir(data_dir, subdir), **kwargs)

    return load


def _fedjax_sqlite(*, data_dir=None, **kwargs):
    del data_dir
    if "train_path" not in kwargs:
        raise ValueError(
            "fedjax_sqlite is path-based: pass train_path=<file.sqlite> (and test_path=...)."
        )
    return federated_files.fedjax_sqlite(**kwargs)


DATASETS: dict[str, DatasetEntry] = {
    "mnist": _tfds_entry(
        "mnist",
        "MNIST via TFDS (manual: the 4 idx .gz files); 10 classes",
        _gray,
        centralized.mnist_raw,
    ),
    "fashion_mnist": _tfds_entry(
        "fashion_mnist", "Fashion-MNIST via TFDS; 10 classes", _gray, centralized.fashion_mnist_raw
    ),
    "emnist": _tfds_entry(
        "emnist",
        "EMNIST via TFDS, config=byclass|bymerge|balanced|letters|digits|mnist",
        _gray,
        centralized.emnist_raw,
    ),
    "cifar10": _tfds_entry(
        "cifar10", "CIFAR-10 via TFDS; uint8 32x32x3, 10 classes", _identity, _cifar10_raw
    ),
    "cifar10_jpeg": DatasetEntry(
        "cifar10_jpeg",
        "CIFAR-10 from the JPEG image-folder tar (lossy copy); uint8 32x32x3, 10 classes",
        "centralized",
        "cifar10_jpeg",
        _cifar10_jpeg_raw,
        _identity,
    ),
    "cifar100": _tfds_entry(
        "cifar100",
        "CIFAR-100 via TFDS, label=label|coarse_label; uint8 32x32x3",
        _identity,
        _cifar100_raw,
    ),
    "tiny_shakespeare": _tfds_entry(
        "tiny_shakespeare",
        "Tiny Shakespeare via TFDS, next character over LEAF's 80 symbols",
        _identity,
        _tiny_shakespeare_raw,
        cacheable=False,
    ),
    "femnist_leaf": DatasetEntry(
        "femnist_leaf",
        "FEMNIST in LEAF's JSON shards; writers are clients, 62 classes",
        "federated",
        "femnist_leaf",
        _natural(leaf.femnist_leaf, "femnist_leaf"),
    ),
    "shakespeare_leaf": DatasetEntry(
        "shakespeare_leaf",
        "LEAF's Shakespeare from the Gutenberg text; (play, role) clients, next character",
        "federated",
        "shakespeare",
        _natural(leaf.shakespeare_leaf, "shakespeare"),
        cacheable=False,
    ),
    "tff_emnist": DatasetEntry(
        "tff_emnist",
        "TFF's federated EMNIST-62 HDF5 files (fed_emnist_{train,test}.h5)",
        "federated",
        "tff_emnist",
        _natural(federated_files.tff_emnist, "tff_emnist"),
    ),
    "tff_stackoverflow": DatasetEntry(
        "tff_stackoverflow",
        "TFF's Stack Overflow HDF5 files as next-word prediction (10k vocabulary)",
        "federated",
        "tff_stackoverflow",
        _natural(federated_files.tff_stackoverflow, "tff_stackoverflow"),
    ),
    "fedjax_sqlite": DatasetEntry(
        "fedjax_sqlite",
        "FedJAX SQLiteFederatedData files, train_path=/test_path= (features=xy|emnist)",
        "federated",
        None,
        _fedjax_sqlite,
        cacheable=False,
    ),
}

PARTITIONERS: dict[str, PartitionerEntry] = {
    "iid": PartitionerEntry("iid", "uniformly random, equal sizes", partition.iid_partition),
    "dirichlet": PartitionerEntry(
        "dirichlet",
        "label skew, q ~ Dir(alpha/C) per client, equal sizes (Hsu et al. 2019); alpha=",
        partition.dirichlet_partition,
    ),
    "pathological": PartitionerEntry(
        "pathological",
        "sort by label, shards_per_client= shards each (McMahan et al. 2017)",
        partition.pathological_partition,
    ),
    "quantity_skew": PartitionerEntry(
        "quantity_skew",
        "log-normal client sizes (sigma=), labels IID",
        partition.quantity_skew_partition,
    ),
}


def _entry(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def _partitioner(name: str) -> PartitionerEntry:
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partition {name!r}; known: {', '.join(sorted(PARTITIONERS))}.")
    return PARTITIONERS[name]


def _resolve_cache(cache_dir, use_cache: bool) -> Path | None:
    if not use_cache:
        return None
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _fingerprint(path: Path) -> list:
    """Names, sizes and modification times of the files under ``path`` (2 levels)."""
    if not path.exists():
        return []
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in list(path.glob("*")) + list(path.glob("*/*")) if p.is_file())
    )
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def load_centralized(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    **loader_kwargs,
) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """A centralized dataset's model-ready split arrays and its number of classes.

    Args:
      name: a ``"centralized"`` entry of ``DATASETS``.
      data_dir: data root (files you have; ``<data_dir>/<name>`` for TFDS manual files).
      tfds_data_dir: TFDS's prepared-data folder; default ``<cache_dir>/tfds``.
      cache_dir, use_cache: the array cache (see module docstring).
      **loader_kwargs: dataset options (``config=`` for emnist, ``label=`` for cifar100,
        ``download=True`` to let TFDS download, ``manual_dir=``, ...).

    Returns:
      ``({"train": {"x", "y"}, "test": {...}}, num_classes)``.
    """
    entry = _entry(name)
    if entry.kind != "centralized":
        raise ValueError(f"{name} is naturally federated; load it with load_federated.")
    cache = _resolve_cache(cache_dir, use_cache)
    if tfds_data_dir is None and cache is not None:
        tfds_data_dir = cache / "tfds"
    data_root = Path(data_dir) if data_dir is not None else default_data_dir()

    def build():
        splits, num_classes = entry.load(
            data_dir=data_root, tfds_data_dir=tfds_data_dir, **loader_kwargs
        )
        out = {f"{s}__{k}": v for s, d in splits.items() for k, v in d.items()}
        out["num_classes"] = np.array(num_classes)
        return out

    key = {
        "dataset": name,
        "kwargs": {k: v for k, v in loader_kwargs.items() if k not in ("download",)},
        "source": _fingerprint(data_root / entry.subdir) if entry.subdir else None,
    }
    arrays = cached_arrays(cache if entry.cacheable else None, "arrays", key, build)
    num_classes = int(arrays.pop("num_classes"))
    splits: dict[str, dict[str, np.ndarray]] = {}
    for k, v in arrays.items():
        s, feat = k.split("__", 1)
        splits.setdefault(s, {})[feat] = v
    return splits, num_classes


def partition_centralized(
    splits: Mapping[str, Mapping[str, np.ndarray]],
    num_classes: int,
    *,
    partition: str,
    num_clients: int,
    seed: int,
    partition_kwargs: Mapping | None = None,
    test_partition: str = "central",
    finalize: Callable[[dict], dict] = _identity,
    name: str = "dataset",
    cache_dir: Path | None = None,
    cache_key: Mapping | None = None,
) -> FederatedData:
    """Turns ``{"train", "test"}`` arrays into ``FederatedData`` with a named partitioner.

    Args:
      splits: ``{"train": {"x", "y"}, "test": {"x", "y"}}``.
      num_classes: number of label classes.
      partition: a name in ``PARTITIONERS``.
      num_clients: clients to create from the train split.
      seed: the partition seed.
      partition_kwargs: the recipe's parameters (``alpha=``, ``shards_per_client=``, ...).
      test_partition: ``"central"``: the test split is one client ``"test"``; ``"same"``: the
        test split is cut into ``num_clients`` clients by the same recipe (an independent
        draw, same parameters and seed; client ``i`` of both splits shares an id).
      finalize: applied to each split's arrays after indexing (e.g. uint8 -> float32).
      name: dataset label.
      cache_dir: where to cache the partition's indices (None: no cache).
      cache_key: what identifies ``splits`` for the cache.

    Returns:
      ``FederatedData`` whose clients are views into one reordered copy of each split.
    """
    entry = _partitioner(partition)
    if test_partition not in ("central", "same"):
        raise ValueError(f"test_partition must be 'central' or 'same', got {test_partition!r}.")
    kwargs = dict(partition_kwargs or {})
    if entry.name == "dirichlet":
        kwargs.setdefault("num_classes", num_classes)
    _check_partition_kwargs(entry, kwargs)

    def build():
        out = {}
        for s in ("train", "test") if test_partition == "same" else ("train",):
            parts = entry.fn(splits[s]["y"], num_clients=num_clients, seed=seed, **kwargs)
            out[f"{s}__order"] = np.concatenate(parts).astype(np.int64)
            out[f"{s}__sizes"] = np.array([len(p) for p in parts], np.int64)
        return out

    key = {
        "data": dict(cache_key or {}),
        "sizes": {s: int(len(d["y"])) for s, d in splits.items()},
        "partition": entry.name,
        "kwargs": kwargs,
        "num_clients": int(num_clients),
        "seed": int(seed),
        "test_partition": test_partition,
    }
    idx = cached_arrays(cache_dir if cache_key is not None else None, "partitions", key, build)
    width = max(5, len(str(num_clients - 1)))
    datasets = {}
    for s in ("train", "test"):
        if f"{s}__order" in idx:
            order, sizes = idx[f"{s}__order"], idx[f"{s}__sizes"]
            flat = finalize({k: v[order] for k, v in splits[s].items()})
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            clients = {
                f"c{i:0{width}d}": {k: v[bounds[i] : bounds[i + 1]] for k, v in flat.items()}
                for i in range(len(sizes))
            }
        else:
            clients = {"test": finalize(dict(splits[s]))}
        datasets[s] = FederatedDataset(clients, name=f"{name}/{s}")
    return FederatedData(datasets["train"], datasets["test"], int(num_classes))


def _check_partition_kwargs(entry: PartitionerEntry, kwargs: Mapping) -> None:
    params = inspect.signature(entry.fn).parameters
    own = {k: p for k, p in params.items() if k not in ("labels", "num_clients", "seed")}
    unknown = sorted(set(kwargs) - set(own))
    if unknown:
        raise ValueError(
            f"partition {entry.name!r} takes {sorted(own)} in partition_kwargs, not {unknown}."
        )
    missing = sorted(k for k, p in own.items() if p.default is p.empty and k not in kwargs)
    if missing:
        raise ValueError(
            f"partition {entry.name!r} needs partition_kwargs with {missing}, e.g. "
            f"partition_kwargs={{{missing[0]!r}: ...}}."
        )


def load_federated(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    partition: str | None = None,
    partition_kwargs: Mapping | None = None,
    num_clients: int | None = None,
    seed: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    test_partition: str = "central",
    tfds_data_dir: str | os.PathLike | None = None,
    **loader_kwargs,
) -> FederatedData:
    """Loads a dataset by name as ``FederatedData``.

    Args:
      name: a key of ``DATASETS``.
      data_dir: data root holding one folder per dataset (default ``$FEDJAX_SIM_DATA_DIR`` or
        ``<repo>/../shared/data``).
      partition: for centralized datasets, a key of ``PARTITIONERS`` (default ``"iid"``).
      partition_kwargs: the recipe's parameters, e.g. ``{"alpha": 0.5}``.
      num_clients: clients to create (centralized datasets only).
      seed: partition seed (required for centralized datasets).
      cache_dir, use_cache: the on-disk cache (see module docstring).
      test_partition: see ``partition_centralized``.
      tfds_data_dir: TFDS's prepared-data folder (default ``<cache_dir>/tfds``).
      **loader_kwargs: dataset options, e.g. ``config="balanced"`` (emnist),
        ``min_samples=64`` (shakespeare_leaf), ``train_path=`` (fedjax_sqlite),
        ``manual_dir=``/``download=True`` (TFDS datasets; they download nothing without it).

    Returns:
      ``FederatedData``.

    Raises:
      ValueError: unknown dataset or partition (listing the known ones), or options that do
        not apply to the dataset.
    """
    entry = _entry(name)
    cache = _resolve_cache(cache_dir, use_cache)
    data_root = Path(data_dir) if data_dir is not None else default_data_dir()
    if entry.kind == "federated":
        if partition is not None or num_clients is not None or partition_kwargs:
            raise ValueError(
                f"{name} is naturally federated (its clients come with the data): partition, "
                "partition_kwargs and num_clients do not apply."
            )
        if not entry.cacheable or cache is None:
            return entry.load(data_dir=data_root, **loader_kwargs)
        key = {
            "dataset": name,
            "kwargs": loader_kwargs,
            "source": _fingerprint(data_root / entry.subdir) if entry.subdir else None,
        }
        holder = {}

        def build():
            data = entry.load(data_dir=data_root, **loader_kwargs)
            holder["data"] = data
            return {
                **federated_to_arrays(data.train, "train__"),
                **federated_to_arrays(data.test, "test__"),
                "num_classes": np.array(data.num_classes),
            }

        arrays = cached_arrays(cache, "federated", key, build)
        if "data" in holder:
            return holder["data"]
        return FederatedData(
            arrays_to_federated(arrays, "train__", f"{name}/train"),
            arrays_to_federated(arrays, "test__", f"{name}/test"),
            int(arrays["num_classes"]),
        )

    partition = partition or "iid"
    _partitioner(partition)
    if num_clients is None:
        raise ValueError(f"{name} is centralized: pass num_clients= (and a partition).")
    if seed is None:
        raise ValueError(f"{name}: partitioning needs an explicit seed=.")
    splits, num_classes = load_centralized(
        name,
        data_dir=data_root,
        tfds_data_dir=tfds_data_dir,
        cache_dir=cache,
        use_cache=use_cache,
        **loader_kwargs,
    )
    return partition_centralized(
        splits,
        num_classes,
        partition=partition,
        num_clients=num_clients,
        seed=seed,
        partition_kwargs=partition_kwargs,
        test_partition=test_partition,
        finalize=entry.finalize or _identity,
        name=name,
        cache_dir=cache,
        cache_key={"dataset": name, "kwargs": {k: v for k, v in loader_kwargs.items()}},
    )


def _split_stats(ds: FederatedDataset) -> dict:
    sizes = ds.sizes
    qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    return {
        "num_clients": int(ds.num_clients),
        "num_examples": int(ds.num_examples),
        "size_quantiles": {f"p{int(q * 100)}": float(np.quantile(sizes, q)) for q in qs},
        "size_mean": float(sizes.mean()),
        "features": {
            k: {"dtype": np.dtype(d).name, "shape": list(s)}
            for k, (s, d) in ds.element_spec.items()
        },
    }


def data_stats(
    data: FederatedData,
    *,
    batch_size: int,
    local_epochs: int,
    num_buckets: int = 4,
    max_local_steps: int | None = None,
) -> dict:
    """Summary of a ``FederatedData`` for ``fedjax-sim data-stats --json``.

    Returns:
      A JSON-serializable dict: ``num_classes``; per split ``num_clients``, ``num_examples``,
      client-size quantiles and mean, feature dtypes and shapes; and ``padding`` for the train
      clients: the waste (padded slots / total slots, every client packed once) with one
      bucket and with ``num_buckets`` size buckets, and the buckets' step counts.
    """
    kw = dict(batch_size=batch_size, local_epochs=local_epochs, max_local_steps=max_local_steps)
    sizes = data.train.sizes
    buckets = bucketing.bucket_by_size(sizes, num_buckets=num_buckets, **kw)
    return {
        "num_classes": int(data.num_classes),
        "train": _split_stats(data.train),
        "test": _split_stats(data.test),
        "padding": {
            **{k: v for k, v in kw.items()},
            "waste_single_bucket": bucketing.padding_waste(sizes, num_buckets=1, **kw),
            "waste_bucketed": bucketing.padding_waste(sizes, num_buckets=num_buckets, **kw),
            "num_buckets": int(len(buckets.num_steps)),
            "bucket_num_steps": buckets.num_steps.tolist(),
            "clients_per_bucket": buckets.sizes.tolist(),
        },
    }

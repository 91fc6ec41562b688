"""Seeded recipes that split a centralized labeled dataset into clients, and their statistics.

Every partitioner has the signature ``fn(labels, *, num_clients, seed, **params)`` and returns
one sorted ``int64`` index array per client; together they hold every index exactly once
(except where a recipe says otherwise). Randomness comes from ``np.random.default_rng(seed)``
only, so a seed reproduces a split on any machine.

* ``iid_partition``: a random permutation cut into equal parts.
* ``dirichlet_partition``: label skew of Hsu, Qi and Brown, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification", 2019
  (arXiv:1909.06335).
* ``pathological_partition``: the shards of McMahan et al., "Communication-Efficient Learning
  of Deep Networks from Decentralized Data", AISTATS 2017.
* ``quantity_skew_partition``: log-normal client sizes, labels IID.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedDataset

Partition = list[np.ndarray]

__all__ = [
    "Partition",
    "dirichlet_partition",
    "format_stats",
    "iid_partition",
    "label_stats",
    "partition_stats",
    "pathological_partition",
    "plot_stats",
    "quantity_skew_partition",
    "save_stats",
]


def iid_partition(labels: np.ndarray, *, num_clients: int, seed: int) -> Partition:
    """IID split: a random permutation of all examples cut into ``num_clients`` parts whose
    sizes differ by at most one.

    Args:
      labels: ``[n]`` labels (only their number is used).
      num_clients: number of clients.
      seed: seed of the permutation.

    Returns:
      One sorted index array per client.
    """
    n = _num_examples(labels)
    _check_clients(num_clients, n, "iid")
    perm = np.random.default_rng(_seed(seed)).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    seed: int,
    num_classes: int | None = None,
) -> Partition:
    """Label skew by a Dirichlet draw per client (Hsu, Qi and Brown 2019, Section 3).

    Each client ``k`` draws class proportions ``q_k ~ Dir(alpha * p)`` with ``p`` the uniform
    prior ``1/C`` over the ``C`` classes. Clients are filled one after another, each to the same
    size (``n // num_clients``, the first ``n % num_clients`` clients one more, so every example
    is used): each example is a class drawn from ``q_k`` and then an example of that class drawn
    without replacement. A class with no examples left is removed and ``q_k`` renormalized over
    the classes that remain (if all of ``q_k``'s mass sits on exhausted classes, the remaining
    classes are drawn uniformly).

    Draws are made in blocks, which gives exactly the one-at-a-time process: the block is
    accepted up to the first draw that hits an exhausted class, and the rest is redrawn from the
    renormalized proportions.

    Note the scale of ``alpha``: the concentration of each class is ``alpha / C``, so
    ``alpha = 1`` over 10 classes is ``Dir(0.1, ..., 0.1)``. Code that draws ``Dir(a * ones)``
    uses ``a = alpha / C``. ``alpha -> 0`` gives one class per client; ``alpha -> inf`` gives
    identical proportions.

    Args:
      labels: ``[n]`` integer labels in ``0..num_classes-1``.
      num_clients: number of clients.
      alpha: concentration, > 0.
      seed: seed of all draws.
      num_classes: number of classes; defaults to ``max(labels) + 1``.

    Returns:
      One sorted index array per client.
    """
    labels = _int_labels(labels, "dirichlet")
    n = labels.shape[0]
    _check_clients(num_clients, n, "dirichlet")
    if not isinstance(alpha, numbers.Real) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"dirichlet: alpha must be a finite number > 0, got {alpha!r}.")
    num_classes = _num_classes(labels, num_classes, "dirichlet")
    rng = np.random.default_rng(_seed(seed))

    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    taken = np.zeros(num_classes, np.int64)
    left = np.array([len(p) for p in pools], np.int64)
    sizes = np.full(num_clients, n // num_clients, np.int64)
    sizes[: n % num_clients] += 1
    prior = np.full(num_classes, alpha / num_classes)
    q_all = rng.dirichlet(prior, size=num_clients)

    parts = []
    for k in range(num_clients):
        q = q_all[k]
        need = int(sizes[k])
        counts = np.zeros(num_classes, np.int64)
        while need > 0:
            avail = left - counts
            open_ = avail > 0
            w = np.where(open_, q, 0.0)
            w = w / w.sum() if w.sum() > 0 else open_ / open_.sum()
            draws = rng.choice(num_classes, size=need, p=w)
            # Running count of each draw's class; the first draw past a class's stock is where
            # the one-at-a-time process would have removed that class.
            order = np.argsort(draws, kind="stable")
            rank = np.empty(need, np.int64)
            sd = draws[order]
            starts = np.searchsorted(sd, sd, side="left")
            rank[order] = np.arange(need) - starts
            over = np.flatnonzero(rank >= avail[draws])
            accept = need if over.size == 0 else int(over[0])
            np.add.at(counts, draws[:accept], 1)
            need -= accept
        idx = np.concatenate(
            [pools[c][taken[c] : taken[c] + counts[c]] for c in range(num_classes)]
        )
        taken += counts
        left -= counts
        parts.append(np.sort(idx).astype(np.int64))
    return parts


def pathological_partition(
    labels: np.ndarray,
    *,
    num_clients: int,
    shards_per_client: int = 2,
    num_shards: int | None = None,
    seed: int,
) -> Partition:
    """McMahan et al. 2017's pathological non-IID split.

    Examples are sorted by label (stably, so ties keep their order), cut into ``num_shards``
    contiguous shards of equal size, and each client gets ``shards_per_client`` shards drawn at
    random without replacement. MNIST in the paper: 60,000 examples, 200 shards of 300,
    100 clients with 2 shards each, so most clients see two digits.

    Args:
      labels: ``[n]`` integer labels.
      num_clients: number of clients.
      shards_per_client: shards each client receives.
      num_shards: total shards; must equal ``num_clients * shards_per_client`` (the default).
      seed: seed of the shard assignment.

    Returns:
      One sorted index array per client.

    Raises:
      ValueError: if the shards do not divide the examples evenly or do not match the clients.
    """
    labels = _int_labels(labels, "pathological")
    n = labels.shape[0]
    _check_clients(num_clients, n, "pathological")
    _check_int(shards_per_client, 1, "pathological: shards_per_client")
    if num_shards is None:
        num_shards = num_clients * shards_per_client
    _check_int(num_shards, 1, "pathological: num_shards")
    if num_shards != num_clients * shards_per_client:
        raise ValueError(
            f"pathological: {num_clients} clients x {shards_per_client} shards each need "
            f"{num_clients * shards_per_client} shards, but num_shards={num_shards}."
        )
    if num_shards > n:
        raise ValueError(
            f"pathological: {num_shards} shards cannot be cut from {n} examples "
            "(each shard needs at least one)."
        )
    if n % num_shards:
        raise ValueError(
            f"pathological: {n} examples do not split into {num_shards} equal shards "
            f"({n} % {num_shards} = {n % num_shards}); choose num_clients * shards_per_client "
            f"dividing {n}, as McMahan et al.'s 200 shards of 300 divide MNIST's 60,000."
        )
    shard_size = n // num_shards
    by_label = np.argsort(labels, kind="stable")
    shards = by_label.reshape(num_shards, shard_size)
    assign = np.random.default_rng(_seed(seed)).permutation(num_shards)
    assign = assign.reshape(num_clients, shards_per_client)
    return [np.sort(shards[a].reshape(-1)).astype(np.int64) for a in assign]


def quantity_skew_partition(
    labels: np.ndarray,
    *,
    num_clients: int,
    sigma: float = 1.0,
    min_size: int = 1,
    seed: int,
) -> Partition:
    """Quantity skew: client sizes proportional to log-normal draws, labels IID.

    Weights ``w_k ~ LogNormal(0, sigma)``; each client gets ``min_size`` examples plus a share
    of the rest proportional to ``w_k`` (rounded by largest remainder, so sizes sum to ``n``);
    the examples are a random permutation cut at those sizes. ``sigma = 0`` gives equal sizes.

    Args:
      labels: ``[n]`` labels (only their number is used).
      num_clients: number of clients.
      sigma: standard deviation of the log of the weights, >= 0.
      min_size: the fewest examples a client gets, >= 1.
      seed: seed of the weights and the permutation.

    Returns:
      One sorted index array per client.
    """
    n = _num_examples(labels)
    _check_clients(num_clients, n, "quantity_skew")
    _check_int(min_size, 1, "quantity_skew: min_size")
    if not isinstance(sigma, numbers.Real) or not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"quantity_skew: sigma must be a finite number >= 0, got {sigma!r}.")
    if num_clients * min_size > n:
        raise ValueError(
            f"quantity_skew: {num_clients} clients x min_size {min_size} = "
            f"{num_clients * min_size} examples, more than the {n} there are."
        )
    rng = np.random.default_rng(_seed(seed))
    w = rng.lognormal(0.0, float(sigma), num_clients)
    spare = n - num_clients * min_size
    share = w / w.sum() * spare
    sizes = np.floor(share).astype(np.int64)
    short = spare - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
    sizes += min_size
    perm = rng.permutation(n)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(perm[bounds[k] : bounds[k + 1]]).astype(np.int64) for k in range(num_clients)]


# ---------------------------------------------------------------------------------------------
# Statistics.


def partition_stats(
    partition: Sequence[np.ndarray], labels: np.ndarray, num_classes: int | None = None
) -> dict:
    """Client sizes and per-client label histograms of a partition of ``labels``."""
    labels = np.asarray(labels)
    num_classes = _num_classes(labels, num_classes, "stats")
    hist = np.stack([np.bincount(labels[p], minlength=num_classes) for p in partition])
    return _stats(hist, [f"c{k:05d}" for k in range(len(partition))])


def label_stats(dataset: FederatedDataset, num_classes: int) -> dict:
    """The same statistics for any ``FederatedDataset`` with integer labels ``y``."""
    hist = np.stack(
        [np.bincount(np.asarray(c["y"]).reshape(-1), minlength=num_classes) for _, c in dataset]
    )
    return _stats(hist, list(dataset.client_ids))


def _stats(hist: np.ndarray, ids: list[str]) -> dict:
    sizes = hist.sum(axis=1)
    total = hist.sum(axis=0)
    glob = total / max(total.sum(), 1)
    frac = hist / np.maximum(sizes[:, None], 1)
    # Total variation distance of each client's label distribution from the pooled one.
    tv = 0.5 * np.abs(frac - glob[None]).sum(axis=1)
    q = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    return {
        "num_clients": int(len(sizes)),
        "num_examples": int(sizes.sum()),
        "num_classes": int(hist.shape[1]),
        "client_ids": ids,
        "client_sizes": sizes.astype(int).tolist(),
        "size_quantiles": {f"p{int(p * 100)}": float(np.quantile(sizes, p)) for p in q},
        "size_mean": float(sizes.mean()),
        "label_histograms": hist.astype(int).tolist(),
        "classes_per_client_mean": float((hist > 0).sum(axis=1).mean()),
        "label_tv_from_global_mean": float(tv.mean()),
    }


def format_stats(stats: Mapping, *, max_clients: int = 20) -> str:
    """A human-readable summary: totals, size quantiles and the first clients' histograms."""
    q = stats["size_quantiles"]
    lines = [
        f"clients: {stats['num_clients']}  examples: {stats['num_examples']}  "
        f"classes: {stats['num_classes']}",
        "client sizes: "
        + "  ".join(f"{k}={v:g}" for k, v in q.items())
        + f"  mean={stats['size_mean']:.1f}",
        f"classes per client (mean): {stats['classes_per_client_mean']:.2f}  "
        f"label TV distance from global (mean): {stats['label_tv_from_global_mean']:.3f}",
        "per-client label histograms:",
    ]
    for cid, size, h in list(
        zip(stats["client_ids"], stats["client_sizes"], stats["label_histograms"])
    )[:max_clients]:
        lines.append(f"  {cid}: n={size:<6d} {h}")
    if stats["num_clients"] > max_clients:
        lines.append(f"  ... {stats['num_clients'] - max_clients} more")
    return "\n".join(lines)


def plot_stats(stats: Mapping, path: str | os.PathLike, *, max_clients: int = 100) -> Path:
    """Saves a PNG: stacked per-client label histograms (top) and client sizes (bottom).

    Matplotlib is imported here, through its object API and the Agg canvas, so nothing changes
    the process-wide backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = np.asarray(stats["label_histograms"])[:max_clients]
    sizes = np.asarray(stats["client_sizes"])
    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1)
    bottom = np.zeros(hist.shape[0])
    x = np.arange(hist.shape[0])
    for c in range(hist.shape[1]):
        ax1.bar(x, hist[:, c], bottom=bottom, width=1.0, linewidth=0)
        bottom += hist[:, c]
    ax1.set_xlabel(f"client (first {hist.shape[0]})")
    ax1.set_ylabel("examples, stacked by label")
    ax1.set_title(
        f"{stats['num_clients']} clients, {stats['num_examples']} examples, "
        f"{stats['num_classes']} classes"
    )
    ax2.hist(sizes, bins=min(50, max(5, len(sizes) // 2)))
    ax2.set_xlabel("client size (examples)")
    ax2.set_ylabel("clients")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def save_stats(stats: Mapping, directory: str | os.PathLike, *, plot: bool = True) -> dict:
    """Writes ``stats.json``, ``stats.txt`` and (``plot=True``) ``stats.png`` to ``directory``.

    Returns:
      ``{"json": path, "text": path, "plot": path or None}``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "stats.json", "text": directory / "stats.txt", "plot": None}
    paths["json"].write_text(json.dumps(stats, indent=1))
    paths["text"].write_text(format_stats(stats) + "\n")
    if plot:
        paths["plot"] = plot_stats(stats, directory / "stats.png")
    return paths


# ---------------------------------------------------------------------------------------------
# Argument checks.


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"partition seed must be an integer >= 0, got {seed!r}.")
    return int(seed)


def _check_int(value, least: int, label: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{label} must be an integer >= {least}, got {value!r}.")


def _num_examples(labels) -> int:
    return int(np.asarray(labels).shape[0])


def _check_clients(num_clients, n: int, name: str) -> None:
    _check_int(num_clients, 1, f"{name}: num_clients")
    if num_clients > n:
        raise ValueError(
            f"{name}: cannot give each of {num_clients} clients at least one example: there "
            f"are only {n} examples."
        )


def _int_labels(labels, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name}: needs a 1-D integer label array, got {labels.dtype}{list(labels.shape)}."
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, found {labels.min()}.")
    return labels


def _num_classes(labels: np.ndarray, num_classes, name: str) -> int:
    found = int(labels.max()) + 1 if labels.size else 0
    if num_classes is None:
        return max(found, 1)
    _check_int(num_classes, 1, f"{name}: num_classes")
    if found > num_classes:
        raise ValueError(f"{name}: label {found - 1} is outside 0..{num_classes - 1}.")
    return int(num_classes)

"""Grouping clients by size so that packed cohorts waste few padded slots, and measuring it.

A packed client occupies ``num_steps * batch_size`` example slots, where ``num_steps`` is the
step dimension of the cohort it is packed into; it fills ``local_epochs * n`` of them (fewer if
``max_local_steps`` caps it). With one bucket every cohort is padded to the largest client's
step count; with several, each bucket has its own step dimension (one compiled round per
bucket) and small clients stop paying for the largest.

``padding_waste = padded slots / total slots`` over all clients of a dataset, each packed once.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedjax_sim.data.packing import num_local_steps

__all__ = ["SizeBuckets", "bucket_by_size", "padding_report", "padding_waste", "real_slots"]


class SizeBuckets(NamedTuple):
    """Clients grouped by their local step count.

    Attributes:
      bucket_of: ``[clients]`` int, the bucket of each client.
      num_steps: ``[buckets]`` int, the step dimension a cohort from each bucket is padded to
        (ascending; the largest step count of its members).
      sizes: ``[buckets]`` int, how many clients each bucket holds.
    """

    bucket_of: np.ndarray
    num_steps: np.ndarray
    sizes: np.ndarray

    def members(self, bucket: int) -> np.ndarray:
        """Indices of the clients in ``bucket``."""
        return np.flatnonzero(self.bucket_of == bucket)


def real_slots(
    sizes, *, batch_size: int, local_epochs: int, max_local_steps: int | None = None
) -> np.ndarray:
    """Example slots each client really fills: ``epochs * n``, or less when steps are capped.

    Only an epoch's last batch can be partial, so ``s`` steps over a client of ``n`` examples
    (``b = ceil(n / batch)`` batches per epoch) fill ``(s // b) * n + (s % b) * batch`` slots.
    """
    n = np.asarray(sizes, np.int64)
    steps = num_local_steps(
        n, batch_size=batch_size, local_epochs=local_epochs, max_local_steps=max_local_steps
    )
    per_epoch = np.maximum(-(-n // batch_size), 1)
    return (steps // per_epoch) * n + (steps % per_epoch) * batch_size


def bucket_by_size(
    sizes: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    local_epochs: int,
    num_buckets: int,
    max_local_steps: int | None = None,
) -> SizeBuckets:
    """Splits clients into at most ``num_buckets`` groups of similar step counts.

    The groups are the contiguous ranges of sorted step counts that minimize the total padded
    slots (an exact dynamic program over the distinct step counts, ``O(buckets * distinct^2)``).

    Args:
      sizes: ``[clients]`` examples per client.
      batch_size: examples per local step.
      local_epochs: passes over each client's data.
      num_buckets: the most buckets to use (fewer when there are fewer distinct step counts).
      max_local_steps: optional cap on local steps.

    Returns:
      ``SizeBuckets``.
    """
    _check(batch_size, local_epochs, num_buckets)
    steps = num_local_steps(
        np.asarray(sizes, np.int64),
        batch_size=batch_size,
        local_epochs=local_epochs,
        max_local_steps=max_local_steps,
    )
    steps = np.maximum(steps, 1)
    values, counts = np.unique(steps, return_counts=True)
    u = len(values)
    k = min(int(num_buckets), u)
    # cost(i, j) = padded steps when distinct values i..j share the step dimension values[j].
    cnt = np.concatenate([[0], np.cumsum(counts)])
    tot = np.concatenate([[0], np.cumsum(counts * values)])

    def cost(i: np.ndarray, j: int) -> np.ndarray:
        return (cnt[j + 1] - cnt[i]) * values[j] - (tot[j + 1] - tot[i])

    inf = np.iinfo(np.int64).max // 4
    best = np.full((k + 1, u + 1), inf, np.int64)  # best[b, j]: first j values in b buckets
    best[0, 0] = 0
    cut = np.zeros((k + 1, u + 1), np.int64)
    for b in range(1, k + 1):
        for j in range(b, u + 1):
            i = np.arange(b - 1, j)  # last bucket holds values i..j-1
            c = best[b - 1, i] + cost(i, j - 1)
            a = int(np.argmin(c))
            best[b, j], cut[b, j] = c[a], i[a]
    b_best = int(np.argmin(best[1:, u])) + 1
    edges, j = [], u
    for b in range(b_best, 0, -1):
        i = int(cut[b, j])
        edges.append(int(values[j - 1]))
        j = i
    num_steps = np.array(sorted(edges), np.int64)
    bucket_of = np.searchsorted(num_steps, steps, side="left")
    return SizeBuckets(
        bucket_of=bucket_of.astype(np.int64),
        num_steps=num_steps,
        sizes=np.bincount(bucket_of, minlength=len(num_steps)).astype(np.int64),
    )


def padding_waste(
    sizes: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    local_epochs: int,
    num_buckets: int = 1,
    max_local_steps: int | None = None,
) -> float:
    """Padded slots / total slots when every client is packed once into its bucket's shape.

    Args:
      sizes: ``[clients]`` examples per client.
      batch_size: examples per local step.
      local_epochs: passes over each client's data.
      num_buckets: 1 pads everyone to the largest client; more uses ``bucket_by_size``.
      max_local_steps: optional cap on local steps.

    Returns:
      A float in ``[0, 1)``.
    """
    sizes = np.asarray(sizes, np.int64)
    buckets = bucket_by_size(
        sizes,
        batch_size=batch_size,
        local_epochs=local_epochs,
        num_buckets=num_buckets,
        max_local_steps=max_local_steps,
    )
    total = int((buckets.num_steps[buckets.bucket_of] * batch_size).sum())
    real = int(
        real_slots(
            sizes,
            batch_size=batch_size,
            local_epochs=local_epochs,
            max_local_steps=max_local_steps,
        ).sum()
    )
    return 1.0 - real / total if total else 0.0


def padding_report(
    sizes: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    local_epochs: int,
    num_buckets: Sequence[int] = (1, 2, 4, 8),
    max_local_steps: int | None = None,
) -> dict:
    """Padding waste for each bucket count in ``num_buckets`` plus the buckets' step sizes.

    Returns:
      ``{"batch_size", "local_epochs", "max_local_steps", "buckets": {str(b): {"waste",
      "num_steps", "clients_per_bucket"}}}`` (JSON-serializable).
    """
    sizes = np.asarray(sizes, np.int64)
    out = {
        "batch_size": int(batch_size),
        "local_epochs": int(local_epochs),
        "max_local_steps": max_local_steps,
        "buckets": {},
    }
    for b in num_buckets:
        kw = dict(batch_size=batch_size, local_epochs=local_epochs, max_local_steps=max_local_steps)
        buckets = bucket_by_size(sizes, num_buckets=b, **kw)
        out["buckets"][str(b)] = {
            "waste": padding_waste(sizes, num_buckets=b, **kw),
            "num_steps": buckets.num_steps.tolist(),
            "clients_per_bucket": buckets.sizes.tolist(),
        }
    return out


def _check(batch_size, local_epochs, num_buckets) -> None:
    for label, v in (
        ("batch_size", batch_size),
        ("local_epochs", local_epochs),
        ("num_buckets", num_buckets),
    ):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {v!r}.")

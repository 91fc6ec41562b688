"""The cohort source: which clients train in a round and their packed data, per stream.

A stream is a (seed, data seed) pair: it fixes the clients sampled each round (uniformly
without replacement, a pure function of ``(seed, round)``), their local shuffles, and the
dataset they come from. A plain run has one stream; a sweep one per distinct pair. Every
stream's cohort is padded to one step count per round (the bucket that holds its longest
client), so the streams stack into one array.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np

from fedjax_sim import data
from fedjax_sim.core.keys import EVAL_SAMPLE_TAG, SAMPLING_TAG
from fedjax_sim.core.types import Cohort
from fedjax_sim.driver.asynchronous import AsyncSchedule, AsyncSettings
from fedjax_sim.driver.systems import (
    Population,
    apply_systems,
    local_examples,
    round_seconds,
    systems_of,
)

# The training examples go to the device (``data_on_device="auto"``) when they take at most this.
DEVICE_DATA_BUDGET = 1 << 30


def sample_clients(seed: int, round_num: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Uniform sampling without replacement, a pure function of (seed, round) (the draw of
    ``systems.Population.sample`` when every client is online)."""
    rng = np.random.default_rng([seed, SAMPLING_TAG, round_num])
    return rng.choice(num_clients, size=cohort_size, replace=False)


def eval_clients(test: data.FederatedDataset, config) -> data.FederatedDataset:
    """The test clients evaluated: all, or a fixed seeded sample of ``eval_max_clients``."""
    k = config.eval_max_clients
    if not k or k >= test.num_clients:
        return test
    rng = np.random.default_rng([config.seed, EVAL_SAMPLE_TAG])
    return test.subset(sorted(rng.choice(test.num_clients, size=k, replace=False)))


def packing_of(config) -> dict[str, Any]:
    """The local-work arguments of ``pack_cohort`` a config sets."""
    return dict(
        batch_size=config.client.batch_size,
        local_epochs=config.client.local_epochs,
        max_local_steps=config.client.max_local_steps or None,
    )


def data_on_device(setting: str, train: data.FederatedDataset) -> bool:
    """Whether the training examples live on the device (``auto``: when they take <= 1 GiB)."""
    if setting not in ("auto", "device", "host"):
        raise ValueError(f"unknown data_on_device {setting!r}; known: auto, device, host.")
    if getattr(train, "on_demand", False):  # a population generated as it is sampled
        if setting == "device":
            raise ValueError(
                f"{train.name}: clients generated on demand are never held whole, on the "
                "device or elsewhere; set data_on_device to 'host' or 'auto'."
            )
        return False
    if setting == "auto":
        nbytes = sum(
            train.num_examples * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for shape, dtype in train.element_spec.values()
        )
        return nbytes <= DEVICE_DATA_BUDGET
    return setting == "device"


def step_bucketer(config, train: data.FederatedDataset, max_steps: int):
    """``ids -> num_steps`` for a cohort: one fixed size, or ``client.step_buckets`` sizes.

    With buckets, a cohort is padded to the smallest bucket that holds its longest client:
    less padding for ragged datasets, one compiled round per bucket used.
    """
    kw = packing_of(config)
    if config.client.step_buckets <= 1:
        return lambda ids: max_steps
    from fedjax_sim.data.bucketing import bucket_by_size

    bounds = bucket_by_size(train.sizes, num_buckets=config.client.step_buckets, **kw).num_steps
    steps = data.packing.num_local_steps(train.sizes, **kw)

    def for_cohort(ids):
        need = int(steps[np.asarray(ids)].max())
        return int(bounds[np.searchsorted(bounds, need)])

    return for_cohort


class CohortSource:
    """Samples and packs every stream's cohort for a round.

    With data on the device (``examples`` is not None) only indices are packed; the round
    gathers the examples on the device. Several data seeds then share one example array that
    holds each distinct example once (``data.packing.shared_examples``), each stream's indices
    remapped into it.

    Attributes:
      examples: the examples to place on the device (a dict of host arrays), or ``None``.
      real_slots, total_slots: real and packed example slots so far (the padding waste).
    """

    def __init__(
        self,
        config,
        trains: dict[int, data.FederatedDataset],
        streams: list[tuple[int, int]],
        *,
        slots: int,
        max_steps: int,
        model_bytes: int = 0,
        upload_bytes: int | None = None,
        slot_multiple: int = 1,
        async_settings: AsyncSettings | None = None,
        once_bytes: int = 0,
        share_of=None,
        prefetch: bool = True,
    ):
        self.streams = streams
        # The next round's cohorts, being prepared in the background: ``(round, future)``.
        self._next, self._pool = None, None
        # ``slots -> rows`` of the cohort this process feeds (a multi-process run: only those
        # rows' examples are gathered), or ``None``: every row.
        self.share_of = share_of
        self.trains = trains
        self.cohort_size = config.clients_per_round
        self.slots = slots  # packed clients per cohort (>= cohort_size: padded for devices)
        self.slot_multiple = slot_multiple  # slots stay a multiple of the device count
        self.pack_kw = packing_of(config)
        self.bucket_steps = {d: step_bucketer(config, t, max_steps) for d, t in trains.items()}
        self.real_slots = self.total_slots = 0
        self.systems = systems_of(config)
        self.populations = [
            Population(
                self.systems,
                trains[d].sizes,
                s,
                self.cohort_size,
                model_bytes,
                upload_bytes,
                once_bytes,
            )
            for s, d in streams
        ]
        self.clock = [0.0] * len(streams)  # simulated seconds after the last round, per stream
        # Bytes sent down (the model) and up (updates) by the clients that reported, so far.
        self.bytes = [(0, 0)] * len(streams)
        # What a client downloads once, the first time it reports (a LoRA model's frozen
        # base), and which clients have, per stream.
        self.once_bytes = int(once_bytes)
        self.served = [np.zeros(trains[d].num_clients, bool) for _, d in streams]
        # Asynchronous runs: (updates discarded as too stale, clients lost to dropouts) so far.
        self.async_counts = [(0, 0)] * len(streams)
        self.schedules = None
        if async_settings is not None:
            if self.systems.straggler_fraction > 0 or self.systems.scheme == "poisson":
                raise ValueError(
                    "an asynchronous algorithm (FedBuff) has no rounds to straggle in or to "
                    "Poisson-sample: set systems.straggler_fraction = 0 and sampling.scheme to "
                    "uniform or weighted."
                )
            self.schedules = [
                AsyncSchedule(
                    pop,
                    local_examples(trains[d].sizes, **self.pack_kw),
                    concurrency=self.cohort_size,
                    settings=async_settings,
                    dropout=self.systems.dropout,
                )
                for pop, (_, d) in zip(self.populations, streams, strict=True)
            ]
        seeds = sorted(trains)
        self.examples, self.row_maps = None, {}
        if data_on_device(config.data_on_device, trains[seeds[0]]):
            if len(seeds) == 1:
                self.examples = trains[seeds[0]].all_examples()
            else:  # every data seed's examples in one array, each distinct example once
                pool, maps = data.packing.shared_examples([trains[d] for d in seeds])
                nbytes = sum(int(a.nbytes) for a in pool.values())
                if config.data_on_device != "auto" or nbytes <= DEVICE_DATA_BUDGET:
                    self.examples, self.row_maps = pool, dict(zip(seeds, maps, strict=True))
        self.last_round = None  # no round after it is prepared ahead (the driver sets it)
        if prefetch and self.schedules is None and self.systems.scheme != "poisson":
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "fedjax_sim_cohorts")

    @property
    def on_device(self) -> bool:
        return self.examples is not None

    @property
    def num_device_examples(self) -> int:
        return 0 if self.examples is None else len(next(iter(self.examples.values())))

    def cohorts(self, round_num: int) -> list[Cohort]:
        """Every stream's packed cohort for ``round_num``, all with one step count.

        Where preparing a round is a pure function of its number (no asynchronous schedule, no
        Poisson cohort whose room may grow), the next round's cohorts are prepared in a
        background thread while this round trains; the bookkeeping (clock, bytes, padding)
        stays here, in round order, so the results are the same whatever the timing.
        """
        prepared = None
        if self._next is not None:
            r, future = self._next
            self._next = None
            if r == round_num:
                prepared = future.result()
        if prepared is None:
            prepared = self._prepare(round_num)
        out = [self._account(j, c, step) for j, (c, step) in enumerate(prepared)]
        if self._pool is not None and (self.last_round is None or round_num < self.last_round):
            self._next = (round_num + 1, self._pool.submit(self._prepare, round_num + 1))
        return out

    def _prepare(self, round_num: int) -> list[tuple[Cohort, Any]]:
        """Each stream's cohort for ``round_num`` with its asynchronous step (or ``None``):
        sampled, packed, with stragglers and dropouts applied and its examples gathered."""
        if self.schedules is not None:
            steps_ = [sched.step(round_num) for sched in self.schedules]
            ids = [st.clients for st in steps_]
        else:
            steps_ = [None] * len(self.streams)
            ids = [pop.sample(round_num) for pop in self.populations]
        biggest = max(len(i) for i in ids)
        if biggest > self.slots:  # a large Poisson draw: room grows (the round recompiles)
            m = self.slot_multiple
            self.slots = -(-biggest // m) * m
        steps = max(
            (
                self.bucket_steps[d](i)
                for (_, d), i in zip(self.streams, ids, strict=True)
                if len(i)
            ),
            default=1,
        )
        packing = data.packing
        pack = packing.pack_cohort_indices if self.on_device else packing.pack_cohort_local
        out = []
        share = None if self.share_of is None else self.share_of(self.slots)
        for j, ((s, d), i) in enumerate(zip(self.streams, ids, strict=True)):
            c = pack(
                self.trains[d],
                i,
                num_steps=steps,
                num_clients=self.slots,
                seed=s,
                round_num=round_num,
                rows=share,
                **self.pack_kw,
            )
            if steps_[j] is not None:
                stale = np.zeros((self.slots,), np.int32)
                stale[: len(i)] = steps_[j].staleness
                c = c._replace(info={"staleness": stale})
            elif self.systems.alters_cohorts:
                c, _ = apply_systems(c, self.systems, s, round_num, self.trains[d].num_clients)
            if not self.on_device:  # the examples, after stragglers and dropouts masked theirs
                c = packing.fill_cohort(self.trains[d], c, share)
            out.append((c, steps_[j]))
        return out

    def _account(self, j: int, c: Cohort, step) -> Cohort:
        """Stream ``j``'s bookkeeping for its cohort ``c`` (its clock, bytes, the clients
        served, the padding); returns ``c`` as the round takes it."""
        d = self.streams[j][1]
        n = self.trains[d].num_clients
        if step is not None:
            self.clock[j] = step.time
            self.async_counts[j] = (step.discarded, step.lost)
        else:
            self.clock[j] += round_seconds(self.populations[j], c, n, self.served[j])
        pop = self.populations[j]
        ids_ = np.asarray(c.client_ids)
        ids_ = ids_[ids_ < n]
        first = int((~self.served[j][ids_]).sum())
        self.served[j][ids_] = True
        down, up = self.bytes[j]
        down += len(ids_) * pop.model_bytes + first * self.once_bytes
        self.bytes[j] = (down, up + len(ids_) * pop.upload_bytes)
        self.real_slots += int(np.asarray(c.mask).sum())
        self.total_slots += c.mask.size
        return data.packing.remap_cohort(c, self.row_maps[d]) if self.row_maps else c

    def preview(self, round_num: int) -> list[Cohort]:
        """``cohorts(round_num)`` without advancing the bookkeeping (to trace a round)."""
        saved = self.bookkeeping()
        try:
            return self.cohorts(round_num)
        finally:
            self.restore(saved)

    def bookkeeping(self) -> dict[str, Any]:
        """What a checkpoint keeps of the source (the rest is recomputed from the seeds)."""
        return {
            "real_slots": self.real_slots,
            "total_slots": self.total_slots,
            "clock": list(self.clock),
            "slots": self.slots,
            "bytes": [list(b) for b in self.bytes],
            "served": [np.flatnonzero(s).tolist() for s in self.served] if self.once_bytes else [],
        }

    def restore(self, saved: dict[str, Any]) -> None:
        self.real_slots, self.total_slots = saved["real_slots"], saved["total_slots"]
        self.clock, self.slots = list(saved["clock"]), int(saved["slots"])
        self.bytes = [tuple(b) for b in saved.get("bytes", [(0, 0)] * len(self.streams))]
        for served, ids in zip(self.served, saved.get("served") or [], strict=False):
            served[:] = False
            served[np.asarray(ids, np.int64)] = True

    def extras(self, stream: int) -> dict[str, float]:
        """Fields of a stream's evaluation records: the simulated clock, and for an
        asynchronous run the updates discarded as staler than ``max_staleness`` and the
        clients lost to dropouts so far (recomputed on resume: the schedule is replayed)."""
        out = {"sim_time_s": round(self.clock[stream], 6)}
        out["bytes_down"], out["bytes_up"] = self.bytes[stream]
        if self.schedules is not None:
            out["async_discarded"], out["async_dropped"] = self.async_counts[stream]
        return out

    @property
    def padding_waste(self) -> float:
        return round(1 - self.real_slots / max(self.total_slots, 1), 4)

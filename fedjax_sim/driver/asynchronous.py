"""The asynchronous schedule of FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered
Asynchronous Aggregation"), simulated on the host from the population's clock.

``concurrency`` clients train at once. Each starts from the server model of the moment it
starts (its version) and finishes after its simulated duration (``Population.client_seconds``:
download, local work, upload). Finished updates fill a buffer; every ``buffer_size`` updates
the server takes one step (one "round" of the driver loop) and the version grows by one. A
finished (or dropped-out) client is replaced at once by a client drawn from those online and
neither training nor waiting in the buffer (so a buffer never holds one client twice).
Clients finishing at the same instant are all received before any replacement starts (with
equal durations and ``buffer_size == concurrency`` there is no staleness at all: synchronous
FedAvg). An update staler than ``max_staleness`` versions is discarded on arrival.

The schedule depends only on the seed, the population and the settings, never on the model,
so it is computed ahead of the rounds that need it, deterministically, and recomputed from the
start when a run resumes (cheap: no training).
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import numpy as np

from fedjax_sim.algorithms.base import AsyncSettings
from fedjax_sim.core.keys import ASYNC_TAG
from fedjax_sim.driver.systems import Population

__all__ = ["AsyncSchedule", "AsyncSettings", "ServerStep"]


class ServerStep(NamedTuple):
    clients: np.ndarray  # [K] client indices, in arrival order
    staleness: np.ndarray  # [K] server steps between a client's start and this step
    time: float  # simulated seconds at which the buffer filled
    discarded: int = 0  # updates discarded as staler than max_staleness, up to this step
    lost: int = 0  # clients that dropped out, up to this step


class AsyncSchedule:
    """Server steps (rounds 1, 2, ...) with their clients and staleness.

    Args:
      population: the simulated clients (availability, speeds, links).
      work: ``[num_clients]`` examples each client processes in its local work.
      concurrency: clients training at once (the config's ``clients_per_round``).
      settings: buffer size and maximum staleness.
      dropout: probability that a client leaves before its update arrives.
    """

    def __init__(
        self,
        population: Population,
        work: np.ndarray,
        *,
        concurrency: int,
        settings: AsyncSettings,
        dropout: float = 0.0,
    ):
        k, s = settings.buffer_size, settings.max_staleness
        n = population.num_clients
        if not 1 <= k <= concurrency:
            raise ValueError(
                f"buffer_size must be in 1..{concurrency} (clients_per_round, the clients "
                f"training at once), got {k}."
            )
        if s < 0:
            raise ValueError(f"max_staleness must be >= 0, got {s}.")
        if concurrency + k > n:
            raise ValueError(
                f"clients_per_round ({concurrency} training at once) plus buffer_size ({k}) "
                f"needs at least {concurrency + k} clients; the dataset has {n}."
            )
        self.population, self.work = population, np.asarray(work, np.float64)
        self.concurrency, self.settings, self.dropout = concurrency, settings, float(dropout)
        self.steps: list[ServerStep] = []
        self.discarded = 0  # updates staler than max_staleness
        self.lost = 0  # clients that dropped out
        self._rng = np.random.default_rng([population.seed, ASYNC_TAG])
        self._busy = np.zeros(n, bool)  # training now, or waiting in the buffer
        self._started = np.zeros(n, bool)  # has downloaded what comes once (a frozen base)
        self._flight: list[tuple[float, int, int, int]] = []  # (finish, seq, client, version)
        self._buffer: list[tuple[int, int]] = []  # (client, version)
        self._seq = self._draws = 0
        self._time = 0.0
        self._start(concurrency)

    @property
    def version(self) -> int:
        return len(self.steps)

    def _start(self, count: int) -> None:
        if count <= 0:
            return
        ids = self.population.sample(self.version, exclude=self._busy, size=count, draw=self._draws)
        self._draws += 1
        seconds = self.population.client_seconds(ids, self.work[ids], ~self._started[ids])
        self._started[ids] = True
        for c, dt in zip(ids.tolist(), seconds.tolist(), strict=True):
            self._busy[c] = True
            heapq.heappush(self._flight, (self._time + dt, self._seq, c, self.version))
            self._seq += 1

    def step(self, r: int) -> ServerStep:
        """Server step ``r`` (from 1), simulating ahead as far as needed."""
        while len(self.steps) < r:
            if not self._flight:
                raise RuntimeError(
                    f"the asynchronous schedule stalled before server step {len(self.steps) + 1}"
                    ": no client is training or online. Raise systems.availability_prob."
                )
            t = self._flight[0][0]
            arrived = []
            while self._flight and self._flight[0][0] == t:
                arrived.append(heapq.heappop(self._flight))
            self._time = t
            for _, _, c, v in arrived:
                if self.dropout and self._rng.uniform() < self.dropout:
                    self.lost += 1
                    self._busy[c] = False
                    continue
                if self.version - v > self.settings.max_staleness:
                    self.discarded += 1
                    self._busy[c] = False
                    continue
                self._buffer.append((c, v))
                if len(self._buffer) == self.settings.buffer_size:
                    clients = np.array([b[0] for b in self._buffer], np.int64)
                    stale = np.array([self.version - b[1] for b in self._buffer], np.int64)
                    self.steps.append(ServerStep(clients, stale, t, self.discarded, self.lost))
                    self._busy[clients] = False
                    self._buffer = []
            self._start(self.concurrency - len(self._flight))
        return self.steps[r - 1]

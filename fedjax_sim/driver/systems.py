"""The simulated population: who is online, who is sampled, who straggles, how long a round takes.

Everything here runs on the host, before a round is compiled, and is a pure function of the
run's seed and the round number, so runs stay deterministic and resume exactly:

- **Client sampling** (``config.sampling``): ``uniform`` without replacement (a fixed cohort
  size), ``poisson`` (each online client independently with probability ``rate``; the sampling
  DP accountants assume; the cohort size varies) or ``weighted`` (without replacement, with
  probability proportional to each client's number of examples; Li et al. 2020's scheme, to be
  paired with ``weighting="uniform"``).
- **Availability** (``systems.availability``): ``always``; ``bernoulli`` (client ``i`` is online
  each round with its own probability ``p_i``, drawn once uniformly from ``availability_prob +-
  availability_spread``); ``diurnal`` (``p_i(r) = availability_prob + availability_spread *
  sin(2 pi (r / diurnal_period + phase_i))``, phases drawn once: clients in time zones).
- **Stragglers** (Li et al. 2020, FedProx, Section 5.2): each round ``C - round(C (1 -
  straggler_fraction))`` of the ``C`` sampled clients straggle; a straggler completes only
  ``U{1..K_i}`` (``straggler_budget="uniform"``, FedProx's code) or ``ceil(straggler_work *
  K_i)`` (``"fixed"``) of its ``K_i`` local steps. ``straggler_mode="partial"`` keeps that
  partial work (FedProx); ``"drop"`` drops stragglers from the round (FedAvg as in the paper).
- **Dropouts**: a sampled client leaves mid-round with probability ``dropout``; its work is lost.
- **The simulated clock**: client ``i`` has a compute speed (examples/s, log-normal around
  ``compute_speed`` with ``speed_sigma``) and link bandwidths (bytes/s, around
  ``bandwidth_down``/``bandwidth_up``, 0 = unlimited, ``bandwidth_sigma``); its round takes
  ``model_bytes / down + examples_processed / speed + upload_bytes / up`` (plus ``once_bytes /
  down`` the first time it takes part: a LoRA model's frozen base) and a synchronous round
  takes as long as its slowest reporting client. ``sim_time_s`` (cumulative) is logged with
  every evaluation, so time-to-accuracy can be read next to rounds-to-accuracy.

Dropped clients (stragglers under ``drop``, dropouts) become padding: weight 0, an out-of-range
client id (their per-client state is untouched), no real steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fedjax_sim.core.keys import POPULATION_TAG, SAMPLING_TAG, SYSTEMS_TAG
from fedjax_sim.core.types import Cohort

SAMPLING_SCHEMES = ("uniform", "poisson", "weighted")
AVAILABILITY = ("always", "bernoulli", "diurnal")
STRAGGLER_MODES = ("partial", "drop")
STRAGGLER_BUDGETS = ("uniform", "fixed")


class Systems(NamedTuple):
    """The validated sampling and systems settings of a config (see the module docstring)."""

    scheme: str = "uniform"
    rate: float = 0.0
    straggler_fraction: float = 0.0
    straggler_mode: str = "partial"
    straggler_budget: str = "uniform"
    straggler_work: float = 0.5
    availability: str = "always"
    availability_prob: float = 1.0
    availability_spread: float = 0.0
    diurnal_period: float = 24.0
    dropout: float = 0.0
    compute_speed: float = 100.0
    speed_sigma: float = 0.0
    bandwidth_down: float = 0.0
    bandwidth_up: float = 0.0
    bandwidth_sigma: float = 0.0

    @property
    def alters_cohorts(self) -> bool:
        """Whether packed cohorts are changed after sampling (stragglers, dropouts)."""
        return self.straggler_fraction > 0 or self.dropout > 0


def systems_of(config) -> Systems:
    """``config.sampling`` and ``config.systems`` validated (defaults where a config has none)."""
    fields = {}
    sampling = config.get("sampling")
    if sampling is not None:
        fields.update(scheme=str(sampling.get("scheme", "uniform")))
        fields.update(rate=float(sampling.get("rate", 0.0)))
    systems = config.get("systems")
    if systems is not None:
        for name, default in Systems._field_defaults.items():
            if name in ("scheme", "rate") or name not in systems:
                continue
            value = systems[name]
            fields[name] = str(value) if isinstance(default, str) else float(value)
        unknown = sorted(set(systems.keys()) - set(Systems._fields))
        if unknown:
            raise KeyError(
                f"unknown config field(s) systems.{', systems.'.join(unknown)}; known: "
                f"{', '.join(f for f in Systems._fields if f not in ('scheme', 'rate'))}."
            )
    out = Systems(**fields)
    _check(out)
    return out


def _check(s: Systems) -> None:
    for name, value, known in (
        ("sampling.scheme", s.scheme, SAMPLING_SCHEMES),
        ("systems.availability", s.availability, AVAILABILITY),
        ("systems.straggler_mode", s.straggler_mode, STRAGGLER_MODES),
        ("systems.straggler_budget", s.straggler_budget, STRAGGLER_BUDGETS),
    ):
        if value not in known:
            raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}.")
    if s.scheme == "poisson" and not 0.0 <= s.rate <= 1.0:
        raise ValueError(
            f"sampling.rate must be in [0, 1] (0: clients_per_round / num_clients), got {s.rate}."
        )
    if s.scheme != "poisson" and s.rate:
        raise ValueError(
            f"sampling.rate={s.rate} is only used by sampling.scheme='poisson' (got "
            f"{s.scheme!r}); set the scheme or leave the rate at 0."
        )
    for name in ("straggler_fraction", "dropout", "availability_prob"):
        v = getattr(s, name)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"systems.{name} must be in [0, 1], got {v}.")
    if s.availability_prob == 0.0 and s.availability != "always":
        raise ValueError("systems.availability_prob = 0 leaves no client ever online.")
    if not 0.0 < s.straggler_work <= 1.0:
        raise ValueError(f"systems.straggler_work must be in (0, 1], got {s.straggler_work}.")
    if s.availability_spread < 0 or s.diurnal_period <= 0:
        raise ValueError(
            "systems.availability_spread must be >= 0 and systems.diurnal_period > 0, got "
            f"{s.availability_spread} and {s.diurnal_period}."
        )
    if s.compute_speed <= 0:
        raise ValueError(
            f"systems.compute_speed (examples per second) must be > 0, got {s.compute_speed}."
        )
    for name in ("speed_sigma", "bandwidth_down", "bandwidth_up", "bandwidth_sigma"):
        if getattr(s, name) < 0:
            raise ValueError(f"systems.{name} must be >= 0, got {getattr(s, name)}.")


def cohort_capacity(systems: Systems, num_clients: int, clients_per_round: int) -> int:
    """Clients a packed cohort holds room for (before rounding to the device count).

    A Poisson cohort's size varies; room for 6 standard deviations above its mean makes a
    larger draw (which grows the room and compiles the round again) rarer than 1e-9.
    """
    if systems.scheme != "poisson":
        return clients_per_round
    q = poisson_rate(systems, num_clients, clients_per_round)
    mean = q * num_clients
    return int(min(num_clients, max(1, math.ceil(mean + 6 * math.sqrt(mean * (1 - q)) + 1))))


def poisson_rate(systems: Systems, num_clients: int, clients_per_round: int) -> float:
    return systems.rate or clients_per_round / num_clients


class Traits(NamedTuple):
    """Each client's fixed traits, ``[num_clients]`` each."""

    online_prob: np.ndarray  # bernoulli availability
    phase: np.ndarray  # diurnal availability
    speed: np.ndarray  # examples per second
    down: np.ndarray  # bytes per second
    up: np.ndarray


class Population:
    """One stream's simulated clients: their availability, speeds and links, fixed per seed.

    Args:
      systems: the settings.
      sizes: ``[num_clients]`` examples per training client.
      seed: the stream's seed.
      clients_per_round: the cohort size (uniform and weighted sampling; Poisson's mean).
      model_bytes: bytes of one model (what a client downloads and, uncompressed, uploads).
      upload_bytes: bytes of one client's upload (default ``model_bytes``).
      once_bytes: bytes a client downloads once, before its first local work (a LoRA model's
        frozen base; ``client_seconds``'s ``first``).
    """

    def __init__(
        self,
        systems: Systems,
        sizes: np.ndarray,
        seed: int,
        clients_per_round: int,
        model_bytes: int,
        upload_bytes: int | None = None,
        once_bytes: int = 0,
    ):
        self.systems, self.seed = systems, int(seed)
        self.once_bytes = int(once_bytes)
        # What a client uploads: the model's bytes, or its compressed / masked update's.
        self.upload_bytes = int(model_bytes if upload_bytes is None else upload_bytes)
        self.sizes = np.asarray(sizes)
        if not np.issubdtype(self.sizes.dtype, np.integer):
            self.sizes = self.sizes.astype(np.int64)
        self.num_clients = len(self.sizes)
        self.cohort_size = clients_per_round
        self.model_bytes = int(model_bytes)
        self._traits = None

    @property
    def uniform(self) -> bool:
        """Every client alike and always online: no per-client trait is ever drawn (a
        population of millions then holds no array of its size here)."""
        s = self.systems
        return (
            s.availability == "always"
            and s.speed_sigma == 0
            and (s.bandwidth_sigma == 0 or (s.bandwidth_down <= 0 and s.bandwidth_up <= 0))
        )

    @property
    def traits(self) -> Traits:
        """Every client's fixed availability, speed and links, drawn at first use."""
        if self._traits is None:
            n, s = self.num_clients, self.systems
            rng = np.random.default_rng([self.seed, POPULATION_TAG])
            lo, hi = s.availability_prob - s.availability_spread, s.availability_prob
            hi += s.availability_spread
            online_prob = np.clip(rng.uniform(lo, hi, n), 0.0, 1.0)
            phase = rng.uniform(0.0, 1.0, n)
            speed = s.compute_speed * np.exp(s.speed_sigma * rng.standard_normal(n))
            down = _links(s.bandwidth_down, s.bandwidth_sigma, rng, n)
            up = _links(s.bandwidth_up, s.bandwidth_sigma, rng, n)
            self._traits = Traits(online_prob, phase, speed, down, up)
        return self._traits

    def online(self, r: int) -> np.ndarray:
        """``[num_clients]`` bool: who is online in round ``r``."""
        s = self.systems
        if s.availability == "always":
            return np.ones(self.num_clients, bool)
        if s.availability == "bernoulli":
            p = self.traits.online_prob
        else:
            wave = np.sin(2 * np.pi * (r / s.diurnal_period + self.traits.phase))
            p = np.clip(s.availability_prob + s.availability_spread * wave, 0.0, 1.0)
        rng = np.random.default_rng([self.seed, SYSTEMS_TAG, r, 0])
        return rng.uniform(size=self.num_clients) < p

    def sample(
        self,
        r: int,
        exclude: np.ndarray | None = None,
        size: int | None = None,
        draw: int | None = None,
    ) -> np.ndarray:
        """The clients sampled in round ``r`` (a pure function of seed, round and ``draw``).

        ``exclude`` marks clients that may not be drawn (busy ones); ``size`` overrides the
        cohort size; ``draw`` numbers several draws within a round (the asynchronous schedule).

        Uniform sampling with every client always online is the same draw as before systems
        existed (``sample_clients``), so such runs are unchanged.
        """
        s, n = self.systems, self.num_clients
        size = self.cohort_size if size is None else size
        tag = [self.seed, SAMPLING_TAG, r] + ([] if draw is None else [draw])
        if s.availability == "always" and exclude is None and s.scheme == "uniform":
            # The historical draw, without an O(population) mask: NumPy's choice without
            # replacement draws k of n in O(k) memory when k << n.
            return np.random.default_rng(tag).choice(n, size=min(size, n), replace=False)
        online = self.online(r)
        if exclude is not None:
            online = online & ~exclude
        candidates = np.flatnonzero(online)
        rng = np.random.default_rng(tag)
        if s.scheme == "poisson":
            q = poisson_rate(s, n, self.cohort_size)
            return candidates[rng.uniform(size=len(candidates)) < q]
        k = min(size, len(candidates))
        if s.scheme == "weighted":
            p = self.sizes[candidates].astype(np.float64)
            if p.sum() <= 0:
                return candidates[:0]
            k = min(k, int(np.count_nonzero(p)))
            return candidates[rng.choice(len(candidates), size=k, replace=False, p=p / p.sum())]
        if len(candidates) == n:  # everyone online: the historical draw
            return rng.choice(n, size=k, replace=False)
        return candidates[rng.choice(len(candidates), size=k, replace=False)]

    def client_seconds(
        self, ids: np.ndarray, examples: np.ndarray, first: np.ndarray | None = None
    ) -> np.ndarray:
        """Seconds each client takes: download (with ``once_bytes`` where ``first``, a bool per
        client, marks its first time), ``examples`` processed, upload."""
        ids = np.asarray(ids, np.int64)
        down = self.model_bytes + (0 if first is None else self.once_bytes * np.asarray(first))
        if self.uniform:  # the traits' values without drawing them (exp(0 * z) == 1)
            s = self.systems
            rate_down, rate_up = (
                np.inf if b <= 0 else b for b in (s.bandwidth_down, s.bandwidth_up)
            )
            speed = s.compute_speed
        else:
            t = self.traits
            rate_down, rate_up, speed = t.down[ids], t.up[ids], t.speed[ids]
        link = down / rate_down + self.upload_bytes / rate_up
        return link + np.asarray(examples, np.float64) / speed


def _links(median: float, sigma: float, rng, n: int) -> np.ndarray:
    draws = np.exp(sigma * rng.standard_normal(n))  # drawn even when unused: stable streams
    return np.full(n, np.inf) if median <= 0 else median * draws


def apply_systems(cohort: Cohort, systems: Systems, seed: int, r: int, num_clients: int):
    """The cohort after stragglers and dropouts (see the module docstring).

    Returns:
      ``(cohort, dropped)``: ``dropped`` marks the rows whose work the server never receives.
    """
    mask = np.array(cohort.mask)
    num_examples = np.array(cohort.num_examples)
    ids = np.array(cohort.client_ids)
    real = np.flatnonzero(num_examples > 0)
    dropped = np.zeros(len(ids), bool)
    rng = np.random.default_rng([seed, SYSTEMS_TAG, r, 1])
    if systems.straggler_fraction > 0 and len(real):
        c = len(real)
        n_slow = c - int(round(c * (1 - systems.straggler_fraction)))
        slow = rng.choice(real, size=n_slow, replace=False) if n_slow else real[:0]
        for row in slow:
            k = int(np.any(mask[row], axis=-1).sum())
            if systems.straggler_mode == "drop":
                dropped[row] = True
                continue
            if systems.straggler_budget == "uniform":
                budget = int(rng.integers(1, k + 1)) if k else 0
            else:
                budget = max(1, math.ceil(systems.straggler_work * k)) if k else 0
            mask[row, budget:] = False
    if systems.dropout > 0 and len(real):
        dropped[real] |= rng.uniform(size=len(real)) < systems.dropout
    if dropped.any():
        mask[dropped] = False
        num_examples[dropped] = 0
        ids[dropped] = num_clients
    out = cohort._replace(mask=mask, num_examples=num_examples, client_ids=ids)
    return out, dropped


def round_seconds(
    population: Population, cohort: Cohort, num_clients: int, served: np.ndarray | None = None
) -> float:
    """A synchronous round's simulated duration: its slowest reporting client's (one that
    ``served``, ``[num_clients]`` bool, does not mark downloads ``once_bytes`` first)."""
    ids = np.asarray(cohort.client_ids)
    reporting = ids < num_clients
    if not reporting.any():
        return 0.0
    examples = np.asarray(cohort.mask)[reporting].reshape(int(reporting.sum()), -1).sum(1)
    first = None if served is None else ~np.asarray(served)[ids[reporting]]
    return float(population.client_seconds(ids[reporting], examples, first).max())


def local_examples(sizes, *, batch_size: int, local_epochs: int, max_local_steps: int | None):
    """Examples each client processes in a full round of local work (whole epochs of its
    shuffled batches, the last of each epoch partial, capped at ``max_local_steps`` steps)."""
    from fedjax_sim.data.packing import num_local_steps

    n = np.asarray(sizes, np.int64)
    steps = num_local_steps(
        n, batch_size=batch_size, local_epochs=local_epochs, max_local_steps=max_local_steps
    )
    per_epoch = np.maximum(-(-n // batch_size), 1)
    return (steps // per_epoch) * n + (steps % per_epoch) * batch_size

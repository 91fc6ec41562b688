#!/usr/bin/env python
"""Peer benchmark: the same FedAvg workloads in fedjax_sim, FedJAX, Flower and pfl-research.

Every framework runs the same workload: synthetic clients of equal size (images float32 in
[0, 1) and integer labels, drawn from ``numpy.random.default_rng([seed, client])`` so every
framework sees the same examples), a cohort of clients per round, one local epoch of client
SGD at 0.1 (last batch partial), the examples-weighted mean of the client updates, server SGD
at 1.0. Models, each framework's own rendering of the same network:

- ``cnn_emnist``: Reddi et al. 2021's EMNIST CNN (3x3 conv 32, 3x3 conv 64, 2x2 max-pool,
  dropout 0.25, dense 128, dropout 0.5, dense 62) on 28x28x1:
  ``fedjax.models.emnist.create_conv_model``, ``fs.get_model("cnn_emnist")``, the same layers
  in PyTorch for Flower, pfl and the plain PyTorch loop;
- ``cnn_cifar``: pfl-research's CIFAR-10 benchmark CNN, the same layers on 32x32x3 with 10
  classes (1,626,442 parameters; ``fs.get_model("cnn_emnist", input_shape=(32, 32, 3),
  num_classes=10)``);
- ``mlp``: 784-200-200-62 (``create_dense_model``, ``fs.get_model("mlp")``);
- ``logreg``: 784-62 (``create_logistic_model``, ``fs.get_model("logreg")``).

Workloads are named ``MODEL-[COHORTof]CLIENTSxEXAMPLES[bBATCH]``. The defaults are issue 26's
table, each against the peers it names (``--every_peer``: every selected peer that has the
model): ``logreg-1000x20b10`` (FedJAX), ``mlp-100x32b8`` (FedJAX, Flower),
``cnn_emnist-100x32b8`` (FedJAX), ``cnn_cifar-50of1000x50b10`` (pfl-research: 50 of 1,000
clients per round); the CNN rows also run ``torch``, FedAvg written by hand in PyTorch with no
framework around it: not a peer (no target) but the reference for the CPU kernels, oneDNN's.
The table gives each framework's median training seconds per round, GFLOP/s and MFU for the
CNN rows (analytic training FLOPs per example, against the float32 matmul peak measured at the
start by ``scripts/bench.py``'s ``measure_peak_flops``), the ratio (the peer's time over
fedjax_sim's) and the issue's target for it (>= 4x FedJAX, >= 30x Flower, >= 2x pfl-research);
``--check`` exits 1 when a measured ratio misses its target.

    bash scripts/setup_peers.sh                         # once: the peers' own venvs
    python scripts/bench_peers.py                       # ~15 min on 2 cores
    python scripts/bench_peers.py --quick               # 2 timed rounds each
    python scripts/bench_peers.py --peers fedjax --workloads logreg-100x32 --rounds 3
    python scripts/bench_peers.py --one_core --workloads cnn_emnist-100x32b8 \
        --peers fedjax,pfl,torch --every_peer             # each framework's speed per core

``--one_core`` runs every framework on one core with one thread (each runner process started
on the first allowed core, every thread of it there from exec on, XLA's Eigen on one thread,
one torch thread, fedjax_sim on one device; the matmul peak is measured the same way): what
each one's kernels and loop do per core, apart from how it uses a second core. Its table has
no targets (they are for the whole machine) and ``--check`` finds none missed.

How each framework runs a round:

- ``fedjax_sim`` (this process's Python): the examples placed on the devices once (as
  ``fedjax-sim run`` keeps them), each round's batches packed as example indices on the host
  (``pack_cohort_indices``, reshuffled by ``round_num``) and gathered in the round, then
  ``jax.jit(algo.apply, donate_argnums=0)`` of ``fs.fedavg`` with ``fs.Executor("auto")`` (the
  fixed rule: sequential on CPU), clients split over one virtual CPU device per core
  (``fs.client_mesh``), the donated state fed to the next round (the public API, as a user
  writes it; ``fedjax-sim run`` adds sampling and evaluation around the same compiled round).
  Each round is dispatched, then the next round's indices are packed on the host while it
  runs (as ``fedjax-sim run`` prepares the next round while one trains), then it is waited
  on: every timed round packs one round and trains one. The JSON also records the host's
  packing time (``pack_median_s``) and how many times the round compiled (``compiles``: 1).
- ``fedjax``: ``fedjax.algorithms.fed_avg.federated_averaging`` with FedJAX's default
  ``for_each_client`` backend, ``fedjax.ClientDataset`` per client, ``ShuffleRepeatBatchHParams``.
- ``flower``: ``flwr.simulation.run_simulation`` (Ray backend) with one SuperNode per client,
  ``flwr.serverapp.strategy.FedAvg``'s ``configure_train`` / ``aggregate_train`` driven one
  round at a time by the ServerApp (no evaluation round), PyTorch clients (one Ray CPU and one
  torch thread each, so as many clients train at once as there are cores).
- ``pfl``: ``pfl.algorithm.FederatedAveraging`` with ``pfl.model.pytorch.PyTorchModel`` and
  ``SimulatedBackend`` (in-process), paced by a callback, ``--torch_threads`` torch threads
  (default: one per core, as fedjax_sim uses every core; on the CIFAR workload, 2026-12-07,
  two threads ran a round in 7.0 s against 14.2 s for one).
- ``torch`` (pfl-research's venv and its torch): one model, one ``torch.optim.SGD``; each
  client of the cohort starts from the server's params and runs its steps in ``batch_order``;
  the server steps toward the clients' mean. ``--torch_threads`` threads. (Checked once
  against ``scripts/bench_sweep.py``'s NumPy FedAvg on the MLP, 3 clients of 20 examples in
  batches of 8, server learning rate 0.5: the same params after a round to 1.5e-8.)

Every framework runs in its own process (a peer with its venv's Python, from
``scripts/setup_peers.sh``, ``--prefix``), which sets up, runs ``--warmup`` untimed rounds
(compilation, caches, Ray start-up) and then runs one round per command from this process.
The rounds are interleaved: each pass runs one round of every framework in a fresh random
order, so that noise from other processes hits all of them alike; only the framework being
timed computes (the others wait on a pipe). Reported: the median and the best of the timed
rounds (N stated), and each peer's median over fedjax_sim's median measured in the same run.
A peer that is not installed, whose install failed, or that crashes, is reported unavailable
with the reason.

The module imports only the standard library and NumPy at the top: the peers' venvs run this
same file as their runner (``--runner``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import re
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Run as a script, scripts/ is sys.path[0], and its compression.py would shadow the
# `compression` module that JAX's compilation cache imports (a circular import of jax).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

FRAMEWORK = "fedjax_sim"
# "torch" is no peer but a reference: FedAvg written by hand in PyTorch (oneDNN's CPU kernels)
# with no federated framework around it, in pfl-research's venv (which installs that torch).
PEERS = ("fedjax", "flower", "pfl", "torch")
PEER_TITLES = {
    "fedjax": "FedJAX 0.0.17",
    "flower": "Flower 1.42",
    "pfl": "pfl-research 0.6",
    "torch": "plain PyTorch loop",
}
PEER_VENVS = {"torch": "pfl"}  # a peer whose runner runs in another peer's venv
REFERENCES = ("torch",)  # rows without a target: what the kernels do with no framework
# model -> (input shape, classes); cnn_cifar is pfl-research's CIFAR-10 benchmark network,
# layer for layer cnn_emnist built for 32x32x3 images and 10 classes (1,626,442 parameters).
MODELS = {
    "cnn_emnist": ((28, 28, 1), 62),
    "mlp": ((28, 28, 1), 62),
    "logreg": ((28, 28, 1), 62),
    "cnn_cifar": ((32, 32, 3), 10),
}
# The table: each workload with the peers it is compared against by default.
DEFAULT_WORKLOADS = (
    "logreg-1000x20b10",
    "mlp-100x32b8",
    "cnn_emnist-100x32b8",
    "cnn_cifar-50of1000x50b10",
)
DEFAULT_PEERS = {
    "logreg": ("fedjax",),
    "mlp": ("fedjax", "flower"),
    "cnn_emnist": ("fedjax", "torch"),
    "cnn_cifar": ("pfl", "torch"),
}
# The models each peer's runner has (FedJAX ships the EMNIST models only).
PEER_MODELS = {
    "fedjax": ("cnn_emnist", "mlp", "logreg"),
    "flower": tuple(MODELS),
    "pfl": tuple(MODELS),
    "torch": tuple(MODELS),
}
# Issue 26's targets: how many times faster than each peer fedjax_sim must be.
TARGETS = {"fedjax": 4.0, "flower": 30.0, "pfl": 2.0}
DEFAULT_PREFIX = os.path.join(os.path.expanduser("~"), ".cache", "fedjax_sim_peers")
FULL_ROUNDS, QUICK_ROUNDS = 5, 2
# Seconds to wait for a runner to set up (imports, Ray, compiles) or to run one round.
SETUP_TIMEOUT_S, ROUND_TIMEOUT_S = 600.0, 600.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The workload


@dataclasses.dataclass(frozen=True)
class Workload:
    """One FedAvg workload: a model, a population of equal clients, ``num_clients`` of them
    per round (the round's cohort: clients ``r * num_clients + i`` modulo the population),
    and the local training."""

    model: str
    num_clients: int
    examples_per_client: int
    batch_size: int = 8
    population: int = 0  # 0: num_clients (every client every round)
    local_epochs: int = 1
    client_learning_rate: float = 0.1
    server_learning_rate: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known models: {', '.join(MODELS)}")
        if self.population == 0:
            object.__setattr__(self, "population", self.num_clients)
        for field in ("num_clients", "examples_per_client", "batch_size", "local_epochs"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.population < self.num_clients:
            raise ValueError(
                f"a cohort of {self.num_clients} needs a population of at least as many, got "
                f"{self.population}"
            )

    @property
    def name(self) -> str:
        cohort = f"{self.num_clients}of" if self.population != self.num_clients else ""
        return (
            f"{self.model}-{cohort}{self.population}x{self.examples_per_client}b{self.batch_size}"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return MODELS[self.model][0]

    @property
    def num_classes(self) -> int:
        return MODELS[self.model][1]

    @property
    def steps_per_client(self) -> int:
        return self.local_epochs * math.ceil(self.examples_per_client / self.batch_size)

    @property
    def examples_per_round(self) -> int:
        return self.local_epochs * self.num_clients * self.examples_per_client

    def cohort(self, round_num: int) -> list[int]:
        """The clients of round ``round_num``."""
        start = round_num * self.num_clients
        return [(start + i) % self.population for i in range(self.num_clients)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))


_WORKLOAD_NAME = re.compile(
    r"^(?P<model>[a-z_]+)-((?P<cohort>\d+)of)?(?P<clients>\d+)x(?P<examples>\d+)"
    r"(b(?P<batch>\d+))?$"
)


def parse_workload(name: str, **overrides: Any) -> Workload:
    """``MODEL-[COHORTof]CLIENTSxEXAMPLES[bBATCH]`` (``cnn_cifar-50of1000x50b10``: 50 of 1,000
    clients of 50 examples per round, batches of 10; the batch defaults to 8) with
    ``overrides`` of the other fields.

    Raises:
      ValueError: for a malformed name or an unknown model (the message lists the known ones).
    """
    m = _WORKLOAD_NAME.match(name.strip())
    if m is None:
        raise ValueError(
            f"bad workload {name!r}: expected MODEL-[COHORTof]CLIENTSxEXAMPLES[bBATCH] such as "
            f"logreg-1000x20b10 or cnn_cifar-50of1000x50b10 (models: {', '.join(MODELS)})"
        )
    clients = int(m["clients"])
    fields = {"population": clients, "batch_size": int(m["batch"] or 8), **overrides}
    return Workload(m["model"], int(m["cohort"] or clients), int(m["examples"]), **fields)


def client_data(w: Workload, client: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``client``'s examples: ``x`` ``[n, *input_shape]`` float32 in [0, 1), ``y``
    ``[n]`` int32 labels, the same in every framework and process."""
    rng = np.random.default_rng([w.seed, client])
    x = rng.random((w.examples_per_client, *w.input_shape), dtype=np.float32)
    y = rng.integers(0, w.num_classes, size=(w.examples_per_client,), dtype=np.int32)
    return x, y


def batch_order(w: Workload, client: int, round_num: int) -> list[np.ndarray]:
    """The example indices of each local step of ``client`` in ``round_num``: a fresh
    permutation per epoch, cut into batches of ``batch_size`` (the last one partial)."""
    rng = np.random.default_rng([w.seed, client, round_num, 1])
    n, b = w.examples_per_client, w.batch_size
    out = []
    for _ in range(w.local_epochs):
        perm = rng.permutation(n)
        out.extend(perm[i : i + b] for i in range(0, n, b))
    return out


def training_flops_per_example(model: str) -> float | None:
    """Analytic training FLOPs per example of a CNN (None for the dense models, where the
    rows report no GFLOP/s): 2 per multiply-add forward, twice that backward, less the first
    convolution's input gradient, which nothing needs."""
    if not model.startswith("cnn_"):
        return None
    (h, w_, c), classes = MODELS[model]
    conv1 = 2 * (h - 2) * (w_ - 2) * 9 * c * 32
    conv2 = 2 * (h - 4) * (w_ - 4) * 9 * 32 * 64
    flat = ((h - 4) // 2) * ((w_ - 4) // 2) * 64
    dense = 2 * (flat * 128 + 128 * classes)
    forward = conv1 + conv2 + dense
    return float(3 * forward - conv1)


# --------------------------------------------------------------------------------------------
# Statistics and the table


def summarize(times: Sequence[float]) -> dict[str, float | int | None]:
    """``n``, ``median_s``, ``best_s`` and ``mean_s`` of the timed rounds (None when empty)."""
    if not times:
        return {"n": 0, "median_s": None, "best_s": None, "mean_s": None}
    return {
        "n": len(times),
        "median_s": float(statistics.median(times)),
        "best_s": float(min(times)),
        "mean_s": float(statistics.fmean(times)),
    }


def ratio(peer_s: float | None, ours_s: float | None) -> float | None:
    """How many times longer the peer's round takes than fedjax_sim's (None when unknown)."""
    if peer_s is None or ours_s is None or ours_s <= 0:
        return None
    return peer_s / ours_s


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "n/a"
    if s >= 100:
        return f"{s:.0f}"
    if s >= 10:
        return f"{s:.1f}"
    if s >= 1:
        return f"{s:.2f}"
    if s >= 0.01:
        return f"{s:.3f}"
    return f"{s:.4f}"


def format_ratio(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "n/a"
    return f"{r:.0f}x" if r >= 100 else (f"{r:.1f}x" if r >= 10 else f"{r:.2f}x")


def short_reason(reason: str, limit: int = 90) -> str:
    """One line of at most ``limit`` characters, for a table cell (no ``|``)."""
    line = " ".join(str(reason).split()).replace("|", "/")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def speed_cell(info: dict) -> str:
    """A framework's median s/round, with GFLOP/s (and MFU) where the workload has FLOPs."""
    cell = format_seconds(info.get("median_s"))
    extra = []
    if info.get("gflops") is not None:
        extra.append(f"{info['gflops']:.0f} GFLOP/s")
    if info.get("mfu") is not None:
        extra.append(f"MFU {info['mfu']:.0%}")
    return f"{cell} ({', '.join(extra)})" if extra else cell


def add_rates(results: dict[str, Any], peak_flops: float | None) -> None:
    """Adds ``gflops`` and ``mfu`` (against ``peak_flops``) to every timed CNN framework."""
    for wl in results["workloads"]:
        w = Workload(**wl["workload"])
        flops = training_flops_per_example(w.model)
        for info in wl["frameworks"].values():
            if flops is None or info.get("status") != "ok" or not info.get("median_s"):
                continue
            rate = flops * w.examples_per_round / info["median_s"]
            info["gflops"] = rate / 1e9
            info["mfu"] = rate / peak_flops if peak_flops else None


def markdown_table(results: dict[str, Any]) -> str:
    """One row per workload and peer: fedjax_sim's and the peer's median s/round, the ratio
    (the peer's time over fedjax_sim's) and the issue's target for it."""
    one_core = results.get("meta", {}).get("one_core", False)  # the targets are for both cores
    rows = [
        "| workload | fedjax_sim s/round | peer | peer s/round | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for wl in results["workloads"]:
        fws = wl["frameworks"]
        ours = fws.get(FRAMEWORK, {})
        ours_s = ours.get("median_s") if ours.get("status") == "ok" else None
        ours_cell = (
            speed_cell(ours)
            if ours_s is not None
            else ("unavailable: " + short_reason(ours.get("reason", "not run")))
        )
        peers = [p for p in fws if p != FRAMEWORK] or ["(none)"]
        for peer in peers:
            info = fws.get(peer, {"status": "unavailable", "reason": "no peer selected"})
            title = PEER_TITLES.get(peer, peer)
            target = TARGETS.get(peer)
            r = ratio(info.get("median_s"), ours_s) if info.get("status") == "ok" else None
            if one_core and (target is not None or peer in REFERENCES):
                verdict = "per core: no target"
            elif target is None:
                verdict = "reference" if peer in REFERENCES else ""
            elif r is None:
                verdict = f">= {target:g}x: not measured"
            else:
                verdict = f">= {target:g}x: {'met' if r >= target else 'NOT met'}"
            cell = (
                speed_cell(info)
                if info.get("status") == "ok"
                else ("unavailable: " + short_reason(info.get("reason", "unknown")))
            )
            rows.append(
                f"| {wl['name']} | {ours_cell} | {title} | {cell} | {format_ratio(r)} | {verdict} |"
            )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Peers: where they are and whether they installed


def peer_python(prefix: str, peer: str) -> tuple[str | None, str]:
    """``(python, "")`` for an installed peer, else ``(None, why not)``: the install error
    that ``scripts/setup_peers.sh`` recorded, or how to install it."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; known peers: {', '.join(PEERS)}")
    venv = PEER_VENVS.get(peer, peer)
    root = os.path.join(prefix, venv)
    python = os.path.join(root, "venv", "bin", "python")
    status_file, error_file = os.path.join(root, "status"), os.path.join(root, "error.txt")
    status = _read(status_file).strip()
    if status == "failed":
        error = _read(error_file).strip() or "see " + os.path.join(root, "pip.log")
        return None, f"install failed: {error}"
    if not os.path.exists(python):
        return None, f"not installed (bash scripts/setup_peers.sh --prefix {prefix} {venv})"
    if status != "ok":
        return None, f"install incomplete in {root} (rerun scripts/setup_peers.sh {venv})"
    return python, ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Runner side: one framework in one process, one round per command


class Pacer:
    """Reports each round's time on ``report_fd`` and waits for the next command.

    ``boundary()`` is called before the first round and after every round: it times the round
    just ended, reports it (the first ``warmup`` rounds as warmup, then ``ready`` once), and
    returns True when the next round should start (no wait during warmup; else a ``round``
    line on stdin) or False on ``quit`` or end of input.
    """

    def __init__(
        self, report_fd: int, warmup: int, setup_start: float, info: dict, torch_threads: int = 1
    ):
        self.report_fd, self.warmup = report_fd, warmup
        self.torch_threads = torch_threads
        self.setup_start, self.info = setup_start, info
        self.t0: float | None = None
        self.done = 0  # rounds finished
        self.warmup_s: list[float] = []

    def report(self, event: dict) -> None:
        os.write(self.report_fd, (json.dumps(event) + "\n").encode())

    def boundary(self, extra: dict | None = None) -> bool:
        now = time.perf_counter()
        if self.t0 is None:
            self.info["setup_s"] = now - self.setup_start
        else:
            dt = now - self.t0
            self.done += 1
            if self.done <= self.warmup:
                self.warmup_s.append(dt)
            else:
                self.report({"event": "round", "seconds": dt, **(extra or {})})
        if self.done < self.warmup:
            self.t0 = time.perf_counter()
            return True
        if self.done == self.warmup:
            self.report({"event": "ready", "warmup_s": self.warmup_s, **self.info})
        line = sys.stdin.readline().strip()
        if line != "round":
            return False
        self.t0 = time.perf_counter()
        return True


def run_fedjax_sim(w: Workload, pacer: Pacer) -> None:
    import jax

    # One virtual CPU device per core, as the CLI and scripts/bench.py run (no-op on GPU).
    jax.config.update("jax_num_cpu_devices", usable_cpus())
    import optax

    import fedjax_sim as fs

    name = "cnn_emnist" if w.model == "cnn_cifar" else w.model  # the same layers
    model = fs.get_model(name, num_classes=w.num_classes, input_shape=w.input_shape)
    data = [client_data(w, c) for c in range(w.population)]
    ds = fs.FederatedDataset({f"c{c}": {"x": x, "y": y} for c, (x, y) in enumerate(data)})
    devices = len(jax.devices())
    mesh = fs.client_mesh(max(d for d in range(1, devices + 1) if w.num_clients % d == 0))
    executor = fs.Executor("auto", mesh=mesh)
    algo = fs.fedavg(
        model,
        optax.sgd(w.client_learning_rate),
        server_learning_rate=w.server_learning_rate,
        executor=executor,
    )
    state = algo.init(model.init(jax.random.key(w.seed)))  # placed on the mesh by init
    root = jax.random.key(w.seed + 1)
    apply = jax.jit(algo.apply, donate_argnums=0)
    pacer.info["versions"] = _versions("jax", "jaxlib", "flax", "optax", "numpy", "fedjax_sim")
    pacer.info["strategy"] = fs.resolve_strategy("auto")
    pacer.info["devices"] = 1 if mesh is None else mesh.size
    # The examples live on the devices, as `fedjax-sim run` keeps them (data_on_device): each
    # round packs only the batches' example indices on the host and its local steps gather
    # their batches in the compiled round (Cohort.examples; the same params as packing the
    # whole cohort on the host, 12% faster on the logistic workload).
    from fedjax_sim.data.packing import pack_cohort_indices

    examples = fs.replicate(jax.device_put(ds.all_examples()), mesh)
    pacer.info["data"] = "on the devices; per round, the batches' example indices"

    def pack(r: int):
        indexed = pack_cohort_indices(
            ds,
            w.cohort(r),
            batch_size=w.batch_size,
            local_epochs=w.local_epochs,
            seed=w.seed,
            round_num=r,
        )
        return indexed._replace(examples=examples)

    extra, r, cohort = None, 0, pack(0)
    while pacer.boundary(extra):
        state, _ = apply(state, cohort, jax.random.fold_in(root, r))  # dispatched, not waited on
        # The next round's batches are packed on the host while this round runs on the devices,
        # as `fedjax-sim run` prepares the next round while one trains: every timed round does
        # one round's packing and one round's training.
        t0 = time.perf_counter()
        cohort = pack(r + 1)
        pack_s = time.perf_counter() - t0
        jax.block_until_ready(state)
        # compiles: the public API must compile the round once (issue 26).
        extra = {"pack_s": pack_s, "compiles": apply._cache_size()}
        r += 1


def run_fedjax(w: Workload, pacer: Pacer) -> None:
    import fedjax
    import jax
    from fedjax.algorithms import fed_avg

    create = {
        "cnn_emnist": fedjax.models.emnist.create_conv_model,
        "mlp": fedjax.models.emnist.create_dense_model,
        "logreg": fedjax.models.emnist.create_logistic_model,
    }[w.model]  # PEER_MODELS["fedjax"]
    model = create(only_digits=False)
    algorithm = fed_avg.federated_averaging(
        fedjax.model_grad(model),
        fedjax.optimizers.sgd(w.client_learning_rate),
        fedjax.optimizers.sgd(w.server_learning_rate),
        fedjax.ShuffleRepeatBatchHParams(
            batch_size=w.batch_size, num_epochs=w.local_epochs, seed=w.seed
        ),
    )
    state = algorithm.init(model.init(jax.random.PRNGKey(w.seed)))
    clients = []
    for c in range(w.population):
        x, y = client_data(w, c)
        clients.append((f"c{c}".encode(), fedjax.ClientDataset({"x": x, "y": y})))
    root = jax.random.PRNGKey(w.seed + 1)
    pacer.info["versions"] = _versions(
        "fedjax", "jax", "jaxlib", "dm-haiku", "optax", "chex", "numpy", "tensorflow-cpu"
    )
    r = 0
    while pacer.boundary():
        keys = jax.random.split(jax.random.fold_in(root, r), w.num_clients)
        cohort = [(*clients[c], keys[i]) for i, c in enumerate(w.cohort(r))]
        state, _ = algorithm.apply(state, cohort)
        jax.block_until_ready(state.params)
        r += 1


def torch_model(name: str):
    """The PyTorch rendering of ``name`` (NCHW images), with pfl's ``loss`` / ``metrics``."""
    (h, w_, c), classes = MODELS[name]
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Net(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

        def loss(self, x, y, eval=False):
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y.long())

        def metrics(self, x, y, eval=False):
            from pfl.metrics import Weighted

            self.eval() if eval else self.train()
            with torch.no_grad():
                loss = F.cross_entropy(self(x), y.long(), reduction="sum").item()
            return {"loss": Weighted(loss, len(x))}

    d = h * w_ * c
    if name.startswith("cnn_"):
        layers = nn.Sequential(
            nn.Conv2d(c, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
            nn.Linear(64 * ((h - 4) // 2) * ((w_ - 4) // 2), 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, classes),
        )
    elif name == "mlp":
        layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(d, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, classes),
        )
    else:
        layers = nn.Sequential(nn.Flatten(), nn.Linear(d, classes))
    return Net(layers)


def torch_client_data(w: Workload, client: int):
    import torch

    x, y = client_data(w, client)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y)


def torch_local_steps(w: Workload, net, opt, x, y, client: int, round_num: int) -> None:
    """``client``'s local SGD steps on its examples ``x``, ``y`` in ``batch_order``."""
    import torch

    net.train()
    for idx in batch_order(w, client, round_num):
        idx = torch.from_numpy(idx)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx].long()).backward()
        opt.step()


def run_flower(w: Workload, pacer: Pacer) -> None:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        # As Flower's PyTorch quickstart: the model and the partition built per call.
        torch.set_num_threads(1)
        cid = int(context.node_config["partition-id"])
        round_num = int(msg.content["config"]["server-round"])
        net = torch_model(w.model)
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=w.client_learning_rate)
        x, y = torch_client_data(w, cid)
        torch_local_steps(w, net, opt, x, y, cid, round_num)
        content = RecordDict(
            {
                "arrays": ArrayRecord(net.state_dict()),
                "metrics": MetricRecord({"num-examples": len(x)}),
            }
        )
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(w.seed)
        arrays = ArrayRecord(torch_model(w.model).state_dict())
        strategy = FedAvg(  # samples the round's cohort of the population's nodes
            fraction_train=w.num_clients / w.population,
            fraction_evaluate=0.0,
            min_train_nodes=w.num_clients,
            min_evaluate_nodes=0,
            min_available_nodes=w.population,
        )
        r = 0
        while pacer.boundary():
            r += 1
            replies = grid.send_and_receive(
                messages=strategy.configure_train(r, arrays, ConfigRecord(), grid),
                timeout=ROUND_TIMEOUT_S,
            )
            new_arrays, _ = strategy.aggregate_train(r, replies)
            if new_arrays is None:
                raise RuntimeError(f"Flower round {r}: no client replied")
            arrays = new_arrays

    cpus = usable_cpus()
    pacer.info["versions"] = _versions("flwr", "ray", "torch", "numpy")
    pacer.info["client_resources"] = {"num_cpus": 1, "torch_threads": 1, "parallel": cpus}
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=w.population,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0},
        },
    )


def run_pfl(w: Workload, pacer: Pacer) -> None:
    import torch

    torch.set_num_threads(pacer.torch_threads)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    torch.manual_seed(w.seed)
    users = {c: torch_client_data(w, c) for c in range(w.population)}
    fed = FederatedDataset(
        lambda uid: Dataset(raw_data=list(users[uid]), user_id=uid),
        get_user_sampler("minimize_reuse", list(users)),
    )
    net = torch_model(w.model)
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=w.server_learning_rate),
    )

    class Paced(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            if not pacer.boundary():
                raise SystemExit(0)
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            return not pacer.boundary(), Metrics()

    pacer.info["versions"] = _versions("pfl", "torch", "numpy")
    pacer.info["torch_threads"] = torch.get_num_threads()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=10**9,
            evaluation_frequency=10**9,
            train_cohort_size=w.num_clients,
            val_cohort_size=None,
        ),
        backend=SimulatedBackend(training_data=fed, val_data=fed, postprocessors=[]),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=w.client_learning_rate,
            local_num_epochs=w.local_epochs,
            local_batch_size=w.batch_size,
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=w.batch_size),
        callbacks=[Paced()],
    )


def run_torch(w: Workload, pacer: Pacer) -> None:
    """FedAvg written by hand in PyTorch, no federated framework: each client of the cohort
    starts from the server's params and runs its SGD steps in ``batch_order``, the server
    moves by ``server_learning_rate`` toward the examples-weighted mean of the clients' params
    (all clients have as many examples). The CPU kernels' reference for the CNN rows."""
    import torch

    torch.set_num_threads(pacer.torch_threads)
    torch.manual_seed(w.seed)
    net = torch_model(w.model)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=w.client_learning_rate)
    data = {c: torch_client_data(w, c) for c in range(w.population)}
    pacer.info["versions"] = _versions("torch", "numpy")
    pacer.info["torch_threads"] = torch.get_num_threads()
    r = 0
    while pacer.boundary():
        server = [p.detach().clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        cohort = w.cohort(r)
        for c in cohort:
            with torch.no_grad():
                for p, s in zip(params, server):
                    p.copy_(s)
            torch_local_steps(w, net, opt, *data[c], c, r)
            with torch.no_grad():
                for t, p in zip(total, params):
                    t.add_(p)
        with torch.no_grad():
            for p, s, t in zip(params, server, total):
                p.copy_(s + w.server_learning_rate * (t / len(cohort) - s))
        r += 1


RUNNERS: dict[str, Callable[[Workload, Pacer], None]] = {
    FRAMEWORK: run_fedjax_sim,
    "fedjax": run_fedjax,
    "flower": run_flower,
    "pfl": run_pfl,
    "torch": run_torch,
}


def _versions(*dists: str) -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for d in dists:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "?"
    return out


def usable_cpus() -> int:
    """The cores this process may run on (its affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this OS
        return os.cpu_count() or 1


def one_core_command(cmd: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``--one_core``: ``cmd`` started on this process's first allowed core with XLA's Eigen on
    one thread. A trampoline (this Python) pins its only thread, then execs ``cmd``, so every
    thread of ``cmd`` is on that core from its start (``preexec_fn`` would fork a process that
    may run threads)."""
    cpu = min(os.sched_getaffinity(0))
    pin = f"import os, sys; os.sched_setaffinity(0, {{{cpu}}}); os.execv(sys.argv[1], sys.argv[1:])"
    flags = f"{env.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    return [sys.executable, "-c", pin, *cmd], {**env, "XLA_FLAGS": flags}


def runner_main(
    framework: str, workload_json: str, report_fd: int, warmup: int, torch_threads: int = 1
) -> int:
    setup_start = time.perf_counter()
    w = Workload.from_json(workload_json)
    pacer = Pacer(report_fd, warmup, setup_start, {"framework": framework}, torch_threads)
    try:
        RUNNERS[framework](w, pacer)
    except BaseException as e:  # report it, then let the parent see a failed runner
        if not isinstance(e, SystemExit):
            pacer.report({"event": "error", "error": f"{type(e).__name__}: {e}"})
        raise
    return 0


# --------------------------------------------------------------------------------------------
# Orchestrator side


class RunnerProcess:
    """A runner subprocess: commands on its stdin, JSON events on a pipe, logs to a file."""

    def __init__(
        self,
        framework: str,
        python: str,
        w: Workload,
        warmup: int,
        log_path: str,
        torch_threads: int = 1,
        one_core: bool = False,
    ):
        self.framework, self.log_path = framework, log_path
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        if framework != FRAMEWORK:
            env.pop("PYTHONPATH", None)  # nothing of the project's environment in a peer's
        else:  # this checkout's fedjax_sim, installed or not
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setdefault("RAY_DEDUP_LOGS", "0")
        cmd = [
            python,
            os.path.abspath(__file__),
            "--runner",
            framework,
            "--workload_json",
            w.to_json(),
            "--report_fd",
            str(write_fd),
            "--warmup",
            str(warmup),
            "--torch_threads",
            str(torch_threads),
        ]
        self.log_file = open(log_path, "w")
        if one_core:
            cmd, env = one_core_command(cmd, env)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            env=env,
            text=True,
        )
        os.close(write_fd)
        self.read_fd = read_fd
        self.buffer = b""

    def event(self, timeout: float) -> dict:
        """The next event; raises RuntimeError if the runner dies, errs or times out."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"timed out after {timeout:.0f}s ({self.tail()})")
            ready, _, _ = select.select([self.read_fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.read_fd, 65536)
                if not chunk:
                    self.proc.wait(timeout=30)
                    raise RuntimeError(
                        f"runner exited with status {self.proc.returncode} ({self.tail()})"
                    )
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        ev = json.loads(line)
        if ev.get("event") == "error":
            raise RuntimeError(f"{ev['error']} ({self.tail()})")
        return ev

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def tail(self, lines: int = 6) -> str:
        self.log_file.flush()
        text = _read(self.log_path).strip().splitlines()
        keep = [ln for ln in text if ln.strip()][-lines:]
        return f"log {self.log_path}: " + " / ".join(keep) if keep else f"log {self.log_path}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass  # the runner died with its end of the pipe
        os.close(self.read_fd)
        self.log_file.close()


def run_workload(w: Workload, pythons: dict[str, str], args) -> dict[str, dict]:
    """Starts every framework's runner for ``w`` (one after another, so set-up and warmup
    don't overlap), then runs ``args.rounds`` interleaved passes, then stops them."""
    out: dict[str, dict] = {}
    procs: dict[str, RunnerProcess] = {}
    for fw, python in pythons.items():
        log_path = os.path.join(args.log_dir, f"{w.name}.{fw}.log")
        log(f"[{w.name}] starting {fw} (log: {log_path})")
        t0 = time.perf_counter()
        proc = RunnerProcess(
            fw, python, w, args.warmup, log_path, args.torch_threads, args.one_core
        )
        try:
            ready = proc.event(SETUP_TIMEOUT_S)
        except RuntimeError as e:
            proc.close()
            out[fw] = {"status": "failed", "reason": f"setup failed: {e}"}
            log(f"[{w.name}] {fw} failed: {e}")
            continue
        ready.pop("event", None)
        out[fw] = {"status": "ok", "times_s": [], "extra": [], **ready}
        procs[fw] = proc
        warm = ", ".join(format_seconds(s) for s in ready.get("warmup_s", []))
        log(f"[{w.name}] {fw} ready in {time.perf_counter() - t0:.1f}s (warmup rounds: {warm}s)")

    rng = random.Random(args.seed)
    for p in range(args.rounds):
        order = list(procs)
        rng.shuffle(order)
        for fw in order:
            proc = procs[fw]
            try:
                proc.command("round")
                ev = proc.event(ROUND_TIMEOUT_S)
            except (RuntimeError, OSError) as e:
                out[fw].update(status="failed", reason=f"round failed: {e}")
                log(f"[{w.name}] {fw} failed: {e}")
                proc.close()
                del procs[fw]
                continue
            out[fw]["times_s"].append(ev.pop("seconds"))
            ev.pop("event", None)
            if ev:
                out[fw]["extra"].append(ev)
        done = ", ".join(f"{fw} {format_seconds(out[fw]['times_s'][-1])}s" for fw in procs)
        log(f"[{w.name}] pass {p + 1}/{args.rounds}: {done}")
    for proc in procs.values():
        proc.close()
    for info in out.values():
        if info["status"] == "ok":
            info.update(summarize(info["times_s"]))
            extras = info.pop("extra", [])
            if extras and all("pack_s" in e for e in extras):
                info["pack_median_s"] = summarize([e["pack_s"] for e in extras])["median_s"]
                info["compiles"] = max(e.get("compiles", 0) for e in extras)
    return out


def workload_peers(w: Workload, selected: Sequence[str], every_peer: bool) -> list[str]:
    """The selected peers that run ``w``: the issue's pairing, or (``every_peer``) every one
    whose runner has the model."""
    wanted = selected if every_peer else DEFAULT_PEERS[w.model]
    return [p for p in selected if p in wanted and w.model in PEER_MODELS[p]]


def missed_targets(results: dict[str, Any]) -> list[str]:
    """``workload peer: ratio < target`` for every measured ratio below its target (none for
    a ``--one_core`` run: the targets are for the whole machine)."""
    out = []
    if results.get("meta", {}).get("one_core", False):
        return out
    for wl in results["workloads"]:
        ours = wl["frameworks"].get(FRAMEWORK, {})
        for peer, info in wl["frameworks"].items():
            r = ratio(info.get("median_s"), ours.get("median_s"))
            if peer in TARGETS and r is not None and r < TARGETS[peer]:
                out.append(f"{wl['name']} {peer}: {r:.2f}x < {TARGETS[peer]:g}x")
    return out


BENCH_PY = os.path.join(_HERE, "bench.py")


def measure_peak_flops(one_core: bool = False) -> float | None:
    """The float32 matmul peak (FLOP/s) by ``scripts/bench.py``'s ``measure_peak_flops``, in
    a child process of this Python (so this process never starts JAX; with ``one_core``, on
    one core as the runners), or None on failure."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bench', {BENCH_PY!r})\n"
        "bench = importlib.util.module_from_spec(spec); sys.modules['bench'] = bench\n"
        "spec.loader.exec_module(bench); print(bench.measure_peak_flops(n=1024, reps=20))"
    )
    try:
        cmd, env = [sys.executable, "-c", code], dict(os.environ)
        if one_core:
            cmd, env = one_core_command(cmd, env)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        log(f"matmul peak not measured: {short_reason(str(e))}")
        return None


def parse_list(text: str | None, known: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``known`` (all of them for None); an unknown item is an
    error that lists the known ones."""
    if text is None:
        return list(known)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none)'}; known: {', '.join(known)}")
    return list(dict.fromkeys(items))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_peers.json", help="JSON file to write")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} timed rounds each")
    p.add_argument("--rounds", type=int, default=None, help=f"timed rounds ({FULL_ROUNDS})")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (>= 1)")
    p.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated subset of {PEERS}; each workload runs the selected ones it is "
        "compared against in the issue (logreg: fedjax; mlp: fedjax, flower; cnn_emnist: "
        "fedjax, torch; cnn_cifar: pfl, torch)",
    )
    p.add_argument(
        "--every_peer",
        action="store_true",
        help="run every selected peer on every workload whose model it has",
    )
    p.add_argument(
        "--check", action="store_true", help="exit 1 when a measured ratio misses its target"
    )
    p.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help="comma-separated MODEL-[COHORTof]CLIENTSxEXAMPLES[bBATCH] (default: %(default)s)",
    )
    p.add_argument("--batch_size", type=int, default=None, help="default: the workload's")
    p.add_argument("--local_epochs", type=int, default=1)
    p.add_argument("--client_learning_rate", type=float, default=0.1)
    p.add_argument("--server_learning_rate", type=float, default=1.0)
    p.add_argument(
        "--torch_threads",
        type=int,
        default=None,
        help="torch intra-op threads of pfl and the plain PyTorch loop (default: one per core; "
        "Flower: one per Ray actor, one actor per core)",
    )
    p.add_argument(
        "--one_core",
        action="store_true",
        help="every framework on one core, one thread (fedjax_sim one device): each one's "
        "per-core speed, the kernels side by side",
    )
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="where setup_peers.sh put the venvs")
    p.add_argument("--log_dir", default=None, help="runner logs (default: next to --out)")
    p.add_argument("--seed", type=int, default=0)
    # Runner mode (what the orchestrator starts in each framework's Python).
    p.add_argument("--runner", choices=list(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--workload_json", help=argparse.SUPPRESS)
    p.add_argument("--report_fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_threads is not None and args.torch_threads < 1:
        p.error(f"--torch_threads must be >= 1, got {args.torch_threads}")
    if args.one_core and args.torch_threads not in (None, 1):
        p.error(f"--one_core runs one torch thread, got --torch_threads {args.torch_threads}")
    if args.one_core and not hasattr(os, "sched_setaffinity"):
        p.error("--one_core needs os.sched_setaffinity (Linux)")
    if args.torch_threads is None:
        args.torch_threads = 1 if args.one_core else usable_cpus()
    if args.runner is not None:
        if args.workload_json is None or args.report_fd is None:
            p.error("--runner needs --workload_json and --report_fd")
        return args
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else FULL_ROUNDS
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (the first round compiles), got {args.warmup}")
    try:
        args.peer_list = parse_list(args.peers, PEERS, "peer")
        overrides = {
            "local_epochs": args.local_epochs,
            "client_learning_rate": args.client_learning_rate,
            "server_learning_rate": args.server_learning_rate,
            "seed": args.seed,
        }
        names = [t.strip() for t in args.workloads.split(",") if t.strip()]
        if not names:
            raise ValueError("--workloads is empty")
        if args.batch_size is not None:
            overrides["batch_size"] = args.batch_size
        args.workload_list = [parse_workload(n, **overrides) for n in names]
    except ValueError as e:
        p.error(str(e))
    if args.log_dir is None:
        args.log_dir = os.path.splitext(os.path.abspath(args.out))[0] + "_logs"
    return args


def metadata(args, argv: Sequence[str], load_start, load_end) -> dict:
    return {
        "command": " ".join(["python", "scripts/bench_peers.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        },
        "rounds": args.rounds,
        "warmup": args.warmup,
        "one_core": args.one_core,
        "statistic": f"median (and best) of {args.rounds} timed rounds after {args.warmup} "
        "warmup round(s), interleaved across frameworks in a random order each pass",
        "prefix": args.prefix,
    }


def _cpu_name() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.runner is not None:
        return runner_main(
            args.runner, args.workload_json, args.report_fd, args.warmup, args.torch_threads
        )

    os.makedirs(args.log_dir, exist_ok=True)
    pythons = {FRAMEWORK: sys.executable}
    unavailable: dict[str, str] = {}
    for peer in args.peer_list:
        python, why = peer_python(args.prefix, peer)
        if python is None:
            unavailable[peer] = why
            log(f"{peer}: unavailable: {why}")
        else:
            pythons[peer] = python
    load_start = _loadavg()
    t_start = time.perf_counter()
    peak = measure_peak_flops(args.one_core)
    log(f"float32 matmul peak: {peak / 1e9:.0f} GFLOP/s" if peak else "matmul peak: not measured")
    workloads = []
    for w in args.workload_list:
        peers = workload_peers(w, args.peer_list, args.every_peer)
        fws = run_workload(
            w, {fw: pythons[fw] for fw in (FRAMEWORK, *peers) if fw in pythons}, args
        )
        for peer in peers:
            if peer in unavailable:
                fws[peer] = {"status": "unavailable", "reason": unavailable[peer]}
        ordered = {fw: fws[fw] for fw in (FRAMEWORK, *peers) if fw in fws}
        workloads.append({"name": w.name, "workload": dataclasses.asdict(w), "frameworks": ordered})
    results = {"meta": metadata(args, argv, load_start, _loadavg()), "workloads": workloads}
    results["meta"]["total_s"] = time.perf_counter() - t_start
    results["meta"]["matmul_peak_gflops"] = peak / 1e9 if peak else None
    add_rates(results, peak)
    table = markdown_table(results)
    results["table_markdown"] = table
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    print(table)
    print(
        f"\n{results['meta']['statistic']}; total {results['meta']['total_s']:.0f}s; "
        f"load average {load_start} -> {results['meta']['machine']['loadavg_end']}"
    )
    print(f"wrote {args.out}")
    missed = missed_targets(results)
    for line in missed:
        print(f"target missed: {line}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark of the client execution strategies against a FedJAX-style Python loop.

One FedAvg round (client SGD, server SGD 1.0) of logistic regression, the MLP and the EMNIST
CNN on synthetic EMNIST-shaped data (28x28x1 float32, 62 classes), for cohorts of 10, 100 and
1000 clients (the CNN up to 100 on a CPU). Every strategy (``vmap``, ``chunked``,
``sequential``, ``auto``) runs the whole round as one compiled program; the reference loops
over the clients in Python, calling a jitted per-client update and a jitted weighted add, then
a jitted server update (how FedJAX's default backend runs a round).

For every model, cohort and strategy it reports clients/s, examples/s, the ratio to the
reference and to the best strategy, model-FLOPs utilization against a float32 matmul peak
measured in the same run, compile time and memory, prints a table, and writes JSON. It also
checks that every strategy's round gives the reference's params (within ``--tolerance``).

    python scripts/bench.py --out bench.json --quick
    python scripts/bench.py --out bench.json                      # full: ~10 min on 2 cores
    python scripts/bench.py --out b.json --models mlp --cohorts 100,1000
    python scripts/bench.py --out b.json --quick --algorithms fedavg,scaffold,fednova

``--gpu`` (the default on a GPU or TPU backend when no ``--models`` are named) is the GPU
table: the EMNIST CNN (28x28x1, 62 classes) and ResNet-18-GN (CIFAR-10's 32x32x3, 10 classes)
at cohorts of 10, 100 and 1000, MFU against an 8192 x 8192 float32 matmul measured in the same
run (``--peak_n``; at JAX's default precision, TF32 on recent NVIDIA GPUs), the compiled
program's memory (``mem MiB``) and the device allocator's peak after each program's first round
(``peak MiB``: the process's peak so far, which never goes down, JAX cannot reset it; so it
is an upper bound of that program's, and grows only where a program needs more), and in
the ``auto`` row both the fixed rule ``fs.Executor("auto")`` runs and what
``fs.simulate``'s measured ``auto`` picks from the same timings. On a CPU it needs ``--cohorts``
(``--gpu --cohorts 2 --examples_per_client 4 --batch_size 2 --repeats 1`` runs the table's
code path in about two minutes). A program that runs out of memory while compiling or in its
first round becomes a row that says so (``FAILED ...``) and the case's other programs still
run (``--strategies`` drops some); any other error stops the run. On a GPU the ``auto`` row
is the fixed rule's ``vmap``: where a vmapped cohort runs out of memory (ResNet-18-GN at 1000
clients may), that row fails and so does the check ``auto >= 0.9x best``, while the measured
``auto`` of ``fs.simulate`` skips the failed candidate (the note says what it picks).

    python scripts/bench.py --out bench_gpu.json --gpu

``--algorithms`` adds SCAFFOLD (option II, ``fs.scaffold`` with injected client SGD) and
FedNova (``fs.fednova``, plain client SGD), each timed with the strategy ``auto`` resolves to
(``--algorithm_strategies`` for more) against a Python-loop reference of that algorithm in the
same FedJAX style (``scaffold_reference_runner``, ``fednova_reference_runner``), in the same
interleaved loop as FedAvg's programs. SCAFFOLD's round starts from nonzero control variates
(``--control_scale``), so its correction is active in the round timed and checked; its new
control variates (server ``c`` and every ``c_i``) are checked against the reference's too.

Timing: the cohort is packed and put on the device once; compile time is the time of
``jax.jit(algo.apply, donate_argnums=0).lower(...).compile()``; each program then runs one
warmup round and the best of N timed rounds (``jax.block_until_ready`` of the round), the
state donated and each round's new state fed to the next, as the driver runs it (the checked
params are the first round's). Repetitions are interleaved across the algorithms, strategies
and references, in a fresh seeded random order each pass, so that load from other processes
hits all of them alike and no program always follows its twin. Per-client data of
the reference is sliced on the host and put on the device before timing.

Checks (exit status 1 when one fails, unless ``--no-check``):

- ``auto`` reaches 5x the reference's clients/s for logreg with 1000 clients (when run);
- ``auto`` is never below 0.9x the best strategy, for any model and cohort;
- every strategy's params match the reference's (SCAFFOLD: and its control variates);
- with ``--algorithms``: each further algorithm's ``auto`` speedup over its own reference is
  at least 80% of FedAvg's in the same case (``ratio(scaffold) >= 80% of ratio(fedavg)``).
  One-sided: a larger speedup than FedAvg's (SCAFFOLD's reference pays more Python per client
  for its control variates) loses nothing of what the compiled round is for.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import fedjax_sim as fs
from fedjax_sim.core.client import local_train, tree_sub
from fedjax_sim.core.execution import CLIENT_AXIS, replicate
from fedjax_sim.core.keys import client_keys
from fedjax_sim.core.task import mean_loss_fn
from fedjax_sim.driver import autotune
from fedjax_sim.simulation import tree_bytes

STRATEGIES = ("vmap", "chunked", "sequential", "auto")
ALGORITHMS = ("fedavg", "scaffold", "fednova")
SCAFFOLD_WEIGHTING = "uniform"  # the paper's means (the factory's default)
FEDNOVA_WEIGHTING = "num_examples"  # the paper's p_i = n_i / n (the factory's default)
# Each further algorithm's speedup over its reference is within this of FedAvg's.
RATIO_TOLERANCE = 0.2
REFERENCE = "reference"  # FedJAX's default backend: Python loops over clients and batches
FUSED = "fused_loop"  # a stronger baseline: Python loop over clients, whole client jitted
# The EMNIST CNN as a user writes it: flax.linen layers only, through model_from_linen; and
# (on request: --models) the same module applied directly, as a hand-written fs.Model would
# apply it: its convolutions and pool are Flax's (lax's) until mean_loss_fn's rewrite
# (models/rewrite.py) gives them the fast gradients.
LINEN_CNN = "cnn_emnist_linen"
LINEN_CNN_LAX = "cnn_emnist_linen_lax"
MODELS = ("logreg", "mlp", "cnn_emnist", LINEN_CNN)
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 62
# Models that train on other data than EMNIST's shape: ResNet-18-GN on CIFAR-10's.
DATA_SHAPES = {"resnet18_gn": ((32, 32, 3), 10)}
# --gpu (and the default on a GPU or TPU backend): the convolutional models, cohorts to 1000.
GPU_MODELS = ("cnn_emnist", "resnet18_gn")
GPU_COHORTS = (10, 100, 1000)
FULL_COHORTS = {
    "logreg": (10, 100, 1000),
    "mlp": (10, 100, 1000),
    "cnn_emnist": (10, 100),
    LINEN_CNN: (10, 100),
}
QUICK_COHORTS = {"logreg": (10, 100, 1000), "mlp": (10, 100), "cnn_emnist": (10,), LINEN_CNN: (10,)}
# A user's plain Flax CNN is at least this fraction of the built-in one's clients/s (auto).
USER_MODEL_TARGET = 1 / 1.25
# The CNNs' cohort cap on a CPU (vmapped convolutions of 1000 clients take minutes and GBs).
CPU_CNN_MAX_CLIENTS = 100
CONV_PREFIXES = ("cnn", "resnet")
# No reference loop for cohorts this large of a convolutional model.
REFERENCE_CONV_MAX_CLIENTS = 999
AUTO_VS_REF_TARGET = 5.0
AUTO_VS_BEST_TARGET = 0.9
MIB = 1024.0 * 1024.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Measurements


def measure_peak_flops(n: int = 1024, reps: int = 10) -> float:
    """Best float32 ``jnp.dot`` FLOP/s of an ``n x n`` by ``n x n`` product."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    jax.block_until_ready(dot(a, b))
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def cost_flops(compiled) -> float | None:
    """``flops`` of XLA's cost analysis (a dict, or a list of dicts in older JAX), or None."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is optional on some backends
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    flops = float(ca["flops"])
    return flops if flops > 0 else None


def analytic_forward_flops(params) -> float:
    """Per-example forward FLOPs of a dense-only model: 2 per weight (convs undercounted)."""
    return 2.0 * sum(int(p.size) for p in jax.tree.leaves(params) if p.ndim >= 2)


def forward_flops_per_example(model: fs.Model, params, batch_size: int) -> tuple[float, str]:
    """Forward-pass FLOPs of one example, from XLA's cost analysis of one batch."""
    x = jnp.zeros((batch_size, *model.input_shape), jnp.float32)
    fwd = jax.jit(lambda p, x: model.apply(p, x, train=False))
    flops = cost_flops(fwd.lower(params, x).compile())
    if flops is not None:
        return flops / batch_size, "xla_cost_analysis"
    return analytic_forward_flops(params), "analytic_2x_weights"


def compiled_memory(compiled) -> dict[str, float] | None:
    """Temp, argument and output bytes of a compiled program (MiB), or None."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional on some backends
        return None
    if ma is None:
        return None
    out = {
        "temp_mib": ma.temp_size_in_bytes / MIB,
        "argument_mib": ma.argument_size_in_bytes / MIB,
        "output_mib": ma.output_size_in_bytes / MIB,
    }
    out["total_mib"] = out["temp_mib"] + out["argument_mib"] + out["output_mib"]
    return out


def peak_rss_mib() -> float:
    """The process's resident-set high-water mark (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (MIB if sys.platform == "darwin" else 1024.0)


def device_peak_mib() -> float | None:
    """The device allocator's peak bytes in use (GPU/TPU), or None (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / MIB


def rel_err(a, b) -> float:
    """Max over leaves of ``max|a - b| / max|b|``."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-30)
        worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)) / scale)
    return worst


# --------------------------------------------------------------------------------------------
# Data


def data_shape(model_name: str) -> tuple[tuple[int, ...], int]:
    """``(input_shape, num_classes)`` of the data ``model_name`` trains on in this benchmark."""
    return DATA_SHAPES.get(model_name, (INPUT_SHAPE, NUM_CLASSES))


def make_cohort(num_clients: int, args, model_name: str = "logreg") -> fs.Cohort:
    """A packed cohort of random clients of ``examples_per_client`` each, shaped for
    ``model_name`` (EMNIST's 28x28x1 and 62 classes, or ``DATA_SHAPES``)."""
    input_shape, num_classes = data_shape(model_name)
    rng = np.random.default_rng(args.seed)
    n = args.examples_per_client
    x = rng.random((num_clients, n, *input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, size=(num_clients, n), dtype=np.int32)
    ds = fs.FederatedDataset({f"c{i}": {"x": x[i], "y": y[i]} for i in range(num_clients)})
    return fs.pack_cohort(
        ds,
        range(num_clients),
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        seed=args.seed,
        round_num=0,
    )


# --------------------------------------------------------------------------------------------
# Programs under test


class Runner:
    """One way of running the round: a zero-argument ``call`` returning the new params (or
    ``(params, aux)`` with ``has_aux``: further state to check, such as control variates).

    ``params`` (and ``aux``) keep a host copy of the first round's result, the one checked
    against the reference: a runner that threads a donated state through its rounds returns
    later rounds' params after that.
    """

    def __init__(
        self,
        name: str,
        call: Callable[[], Any],
        compile_s: float,
        memory,
        extra=None,
        *,
        algorithm: str = "fedavg",
        has_aux: bool = False,
    ):
        self.name = name
        self.call = call
        self.compile_s = compile_s
        self.memory = memory
        self.extra = dict(extra or {})
        self.algorithm = algorithm
        self.has_aux = has_aux
        self.times: list[float] = []
        self.first_s = math.nan
        self.params = None
        self.aux = None
        self.reps = 0

    def run_once(self) -> float:
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.call())
        dt = time.perf_counter() - t0
        if self.params is None:
            params, aux = out if self.has_aux else (out, None)
            self.params = jax.tree.map(np.asarray, params)
            self.aux = None if aux is None else jax.tree.map(np.asarray, aux)
        return dt


# What an out-of-memory error says (XLA's RESOURCE_EXHAUSTED, allocators' messages).
OUT_OF_MEMORY = ("resource_exhausted", "out of memory")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a program running out of memory (any other error is a bug)."""
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, MemoryError) or any(s in text for s in OUT_OF_MEMORY)


class FailedRunner(Runner):
    """A program that ran out of memory while compiling or in its first round: its row says
    why (and keeps its compile time and memory when it got that far); the case's other
    programs still run."""

    def __init__(self, name: str, error: BaseException, *, algorithm: str = "fedavg", like=None):
        compile_s, memory = (math.nan, None) if like is None else (like.compile_s, like.memory)
        super().__init__(name, None, compile_s, memory, algorithm=algorithm)
        self.error = first_line(error)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def out_of_memory_runner(
    error: Exception, what: str, name: str, algorithm: str, like=None
) -> FailedRunner:
    """The ``FailedRunner`` row of a program that ran out of memory (logged as ``what``);
    any other error is raised again."""
    if not out_of_memory(error):
        raise error
    log(f"{what} failed: {first_line(error)}")
    return FailedRunner(name, error, algorithm=algorithm, like=like)


def attempt(name: str, algorithm: str, build: Callable[[], Runner]) -> Runner:
    """``build()``, or a ``FailedRunner`` when it runs out of memory (anything else raises)."""
    try:
        return build()
    except Exception as e:
        return out_of_memory_runner(e, f"{name} ({algorithm})", name, algorithm)


def build_algorithm(algorithm: str, model, executor: fs.Executor, num_clients: int, args):
    """The public factory of ``algorithm``: client SGD at ``--learning_rate``, server SGD at
    ``--server_learning_rate``, no momentum."""
    if algorithm == "fedavg":
        return fs.fedavg(
            model,
            optax.sgd(args.learning_rate),
            server_learning_rate=args.server_learning_rate,
            executor=executor,
        )
    if algorithm == "scaffold":
        return fs.scaffold(
            model,
            fs.get_optimizer("sgd", args.learning_rate, inject=True),
            optax.sgd(args.server_learning_rate),
            num_clients=num_clients,
            weighting=SCAFFOLD_WEIGHTING,
            executor=executor,
        )
    if algorithm == "fednova":
        return fs.fednova(
            model,
            args.learning_rate,
            server_optimizer=optax.sgd(args.server_learning_rate),
            weighting=FEDNOVA_WEIGHTING,
            executor=executor,
        )
    raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def initial_controls(params, num_clients: int, args) -> tuple[Any, Any]:
    """SCAFFOLD's starting control variates ``(c, [c_i])``, as host arrays: ``c_i`` drawn
    from ``N(0, control_scale^2)`` and ``c = mean_i c_i`` (the invariant the server keeps),
    so the correction ``c - c_i`` is active in the round timed (0: all zeros, the first
    round of a run, where the correction vanishes)."""
    rng = np.random.default_rng(args.seed + 2)
    table = jax.tree.map(
        lambda p: (args.control_scale * rng.standard_normal((num_clients, *p.shape))).astype(
            p.dtype
        ),
        params,
    )
    control = jax.tree.map(lambda t: t.mean(axis=0, dtype=np.float64).astype(t.dtype), table)
    return control, table


def algorithm_state(algorithm: str, algo, params, num_clients: int, args):
    """The state the timed round starts from, in fresh buffers (the round donates it)."""
    state = algo.init(jax.tree.map(np.asarray, params))
    if algorithm == "scaffold":
        control, table = initial_controls(params, num_clients, args)
        state = state._replace(control=control, client_states=table)
    return jax.tree.map(lambda a: jnp.array(a, copy=True), state)


def strategy_runner(
    strategy, model, params, cohort, key, args, mesh, algorithm: str = "fedavg"
) -> Runner:
    """``algorithm``'s whole round, one compiled program, run as the driver runs it: the
    state is donated and each round's new state feeds the next."""
    executor = fs.Executor(strategy, args.chunk_size, mesh)
    algo = build_algorithm(algorithm, model, executor, cohort.num_clients, args)
    state = replicate(algorithm_state(algorithm, algo, params, cohort.num_clients, args), mesh)
    if mesh is not None:  # the cohort arrives split over the devices, as the driver sends it
        cohort = jax.device_put(cohort, NamedSharding(mesh, PartitionSpec(CLIENT_AXIS)))
    t0 = time.perf_counter()
    compiled = jax.jit(algo.apply, donate_argnums=0).lower(state, cohort, key).compile()
    compile_s = time.perf_counter() - t0
    extra = {}
    if strategy == "auto":
        extra["resolved"] = fs.resolve_strategy("auto")
    held = [state]

    def call():
        new_state, _ = compiled(held[0], cohort, key)
        held[0] = new_state
        if algorithm == "scaffold":
            return new_state.params, (new_state.control, new_state.client_states)
        return new_state.params

    return Runner(
        strategy,
        call,
        compile_s,
        compiled_memory(compiled),
        extra,
        algorithm=algorithm,
        has_aux=algorithm == "scaffold",
    )


def reference_inputs(cohort_np: fs.Cohort, key) -> tuple[list, list, list[np.float32], list]:
    """Per-client keys, host batches (real steps only, as FedJAX's client datasets hand them
    out), host weights and real step counts of the reference loops."""
    num_clients = cohort_np.num_clients
    keys = client_keys(key, jnp.asarray(cohort_np.client_ids))
    client_key = [keys[c] for c in range(num_clients)]
    steps = [int(np.any(cohort_np.mask[c], -1).sum()) for c in range(num_clients)]
    host_batches = [
        [
            ({k: v[c, s] for k, v in cohort_np.batches.items()}, cohort_np.mask[c, s])
            for s in range(steps[c])
        ]
        for c in range(num_clients)
    ]
    weights = [np.float32(w) for w in cohort_np.num_examples]
    return client_key, host_batches, weights, steps


def fedjax_sgd_client(model, args):
    """FedJAX's ``client_init`` / ``client_step`` for plain client SGD: the state is
    ``(params, opt_state, key, step)``; step ``i`` uses ``fold_in(key, i)``."""
    loss_fn = mean_loss_fn(model, train=True)
    client_opt = optax.sgd(args.learning_rate)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def client_init(shared, client_key):
        return shared, client_opt.init(shared), client_key, jnp.zeros((), jnp.int32)

    def client_step(state, batch, mask):
        p, opt_state, k, i = state
        g, _ = grad_fn(p, batch, mask, jax.random.fold_in(k, i))
        updates, opt_state = client_opt.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, k, i + 1

    return client_init, client_step


def fedjax_reference_runner(model, params, cohort_np: fs.Cohort, key, args) -> Runner:
    """FedAvg as FedJAX's default ``ForEachClientJitBackend`` runs it.

    ``client_init``, ``client_step`` and ``client_final`` are jitted separately; Python loops
    over the clients and, inside each, over its (padded, masked) batches, which come from
    host NumPy arrays as FedJAX's client datasets hand them out; a jitted add accumulates
    the weighted deltas; a jitted server step ends the round.
    """
    client_init, client_step = fedjax_sgd_client(model, args)
    server_lr = args.server_learning_rate

    def client_final(shared, state):
        return tree_sub(shared, state[0])

    def accumulate(acc, delta, weight):
        return jax.tree.map(lambda a, d: a + weight * d, acc, delta)

    def server_update(params, acc, total_weight):
        return jax.tree.map(lambda p, a: p - server_lr * (a / total_weight), params, acc)

    params = jax.device_put(params)
    client_key, host_batches, weights, _ = reference_inputs(cohort_np, key)
    acc0 = jax.tree.map(jnp.zeros_like, params)
    fns = (client_init, client_step, client_final, accumulate, server_update)
    return python_loop_runner(fns, params, client_key, host_batches, weights, acc0, "fedavg")


def python_loop_runner(fns, params, client_key, host_batches, weights, acc0, algorithm):
    """The FedJAX-style round: ``fns = (client_init, client_step, client_final, accumulate,
    server_update)`` jitted separately, Python loops over the clients and their host batches,
    the weighted accumulation, then the server step."""
    client_init, client_step, client_final, accumulate, server_update = fns
    t0 = time.perf_counter()
    init_c = jax.jit(client_init).lower(params, client_key[0]).compile()
    state0 = init_c(params, client_key[0])
    step_c = jax.jit(client_step).lower(state0, *host_batches[0][0]).compile()
    final_c = jax.jit(client_final).lower(params, state0).compile()
    out0 = jax.eval_shape(client_final, params, state0)
    add_c = jax.jit(accumulate).lower(acc0, out0, weights[0]).compile()
    server_c = jax.jit(server_update).lower(params, acc0, np.float32(1)).compile()
    compile_s = time.perf_counter() - t0

    def round_():
        acc, total = acc0, np.float32(0)
        for c in range(len(host_batches)):
            state = init_c(params, client_key[c])
            for batch, mask in host_batches[c]:
                state = step_c(state, batch, mask)
            acc = add_c(acc, final_c(params, state), weights[c])
            total += weights[c]
        return server_c(params, acc, total)

    return Runner(REFERENCE, round_, compile_s, None, algorithm=algorithm)


def scaffold_reference_runner(model, params, cohort_np: fs.Cohort, key, args) -> Runner:
    """SCAFFOLD (option II, plain SGD) in the same FedJAX style as the FedAvg reference.

    The per-client control variates ``c_i`` live in a Python list of device arrays (a
    stateful FedJAX algorithm keeps a dict keyed by client id); they start where our round
    starts (``initial_controls``). ``client_init`` takes ``(x, c)`` and ``c_i`` and carries
    the correction ``c - c_i``; the jitted ``client_step`` adds it to every gradient
    (``g - c_i + c``); ``client_final`` returns ``x - y``, ``c_i+ - c_i`` and ``c_i+ = c_i - c
    + (x - y) / (K_i eta_l)`` (``K_i`` the step counter); a jitted add accumulates the
    weighted deltas and the control changes; the server steps ``x`` by the mean delta and
    ``c`` by ``sum (c_i+ - c_i) / N``. The round returns ``(x, (c, [c_i+]))``.
    """
    loss_fn = mean_loss_fn(model, train=True)
    client_opt = optax.sgd(args.learning_rate)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    lr, server_lr = args.learning_rate, args.server_learning_rate
    num_clients = cohort_np.num_clients

    def client_init(shared, c_i, client_key):
        x, c = shared
        correction = jax.tree.map(lambda cc, ci: cc - ci, c, c_i)
        return x, client_opt.init(x), client_key, jnp.zeros((), jnp.int32), correction

    def client_step(state, batch, mask):
        p, opt_state, k, i, correction = state
        g, _ = grad_fn(p, batch, mask, jax.random.fold_in(k, i))
        g = jax.tree.map(jnp.add, g, correction)  # g - c_i + c
        updates, opt_state = client_opt.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, k, i + 1, correction

    def client_final(shared, c_i, state):
        x, c = shared
        y, k = state[0], state[3].astype(jnp.float32)
        delta = tree_sub(x, y)
        inv = jnp.where(k > 0, 1.0 / (jnp.maximum(k, 1.0) * lr), 0.0)
        new_ci = jax.tree.map(
            lambda ci, cc, d: jnp.where(k > 0, ci - cc + d * inv, ci), c_i, c, delta
        )
        return delta, tree_sub(new_ci, c_i), new_ci

    def accumulate(acc, delta, dc, weight):
        acc_d, acc_c = acc
        return (
            jax.tree.map(lambda a, d: a + weight * d, acc_d, delta),
            jax.tree.map(jnp.add, acc_c, dc),
        )

    def server_update(shared, acc, total_weight):
        x, c = shared
        acc_d, acc_c = acc
        scale = jnp.where(total_weight > 0, 1.0 / jnp.maximum(total_weight, 1e-30), 0.0)
        x = jax.tree.map(lambda p, a: p - server_lr * (a * scale), x, acc_d)
        c = jax.tree.map(lambda cc, a: cc + a / num_clients, c, acc_c)
        return x, c

    control, table = initial_controls(params, num_clients, args)
    shared = jax.device_put((params, control))
    c_list = [jax.device_put(jax.tree.map(lambda t: t[c], table)) for c in range(num_clients)]
    client_key, host_batches, _, steps = reference_inputs(cohort_np, key)
    # The paper's uniform mean over the clients that ran (SCAFFOLD_WEIGHTING).
    weights = [np.float32(s > 0) for s in steps]
    zeros = jax.tree.map(jnp.zeros_like, shared[0])
    acc0 = (zeros, zeros)

    t0 = time.perf_counter()
    init_c = jax.jit(client_init).lower(shared, c_list[0], client_key[0]).compile()
    state0 = init_c(shared, c_list[0], client_key[0])
    step_c = jax.jit(client_step).lower(state0, *host_batches[0][0]).compile()
    final_c = jax.jit(client_final).lower(shared, c_list[0], state0).compile()
    add_c = jax.jit(accumulate).lower(acc0, zeros, zeros, weights[0]).compile()
    server_c = jax.jit(server_update).lower(shared, acc0, np.float32(1)).compile()
    compile_s = time.perf_counter() - t0

    def round_():
        acc, total = acc0, np.float32(0)
        new_c = []
        for c in range(num_clients):
            state = init_c(shared, c_list[c], client_key[c])
            for batch, mask in host_batches[c]:
                state = step_c(state, batch, mask)
            delta, dc, c_plus = final_c(shared, c_list[c], state)
            acc = add_c(acc, delta, dc, weights[c])
            total += weights[c]
            new_c.append(c_plus)
        x, c = server_c(shared, acc, total)
        return x, (c, new_c)

    return Runner(REFERENCE, round_, compile_s, None, algorithm="scaffold", has_aux=True)


def fednova_reference_runner(model, params, cohort_np: fs.Cohort, key, args) -> Runner:
    """FedNova (plain client SGD) in the same FedJAX style as the FedAvg reference.

    ``client_init`` and ``client_step`` are FedAvg's; ``client_final`` returns the
    normalized update ``eta d_i = (x - y_i) / tau_i`` (``tau_i`` the step counter) and
    ``tau_i``; a jitted add accumulates ``w_i eta d_i`` and ``w_i tau_i``; the jitted server
    step is ``x - eta_g tau_eff sum_i p_i eta d_i`` with ``p_i = w_i / sum w`` and
    ``tau_eff = sum_i p_i tau_i``.
    """
    client_init, client_step = fedjax_sgd_client(model, args)
    server_lr = args.server_learning_rate

    def client_final(shared, state):
        tau = state[3].astype(jnp.float32)
        inv = jnp.where(tau > 0, 1.0 / jnp.maximum(tau, 1.0), 0.0)
        return jax.tree.map(lambda d: d * inv, tree_sub(shared, state[0])), tau

    def accumulate(acc, out, weight):
        (acc_d, acc_tau), (d, tau) = acc, out
        return jax.tree.map(lambda a, x: a + weight * x, acc_d, d), acc_tau + weight * tau

    def server_update(params, acc, total_weight):
        acc_d, acc_tau = acc
        tau_eff = acc_tau / total_weight
        return jax.tree.map(
            lambda p, a: p - server_lr * tau_eff * (a / total_weight), params, acc_d
        )

    params = jax.device_put(params)
    client_key, host_batches, weights, steps = reference_inputs(cohort_np, key)
    weights = [w if s > 0 else np.float32(0) for w, s in zip(weights, steps)]
    acc0 = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    fns = (client_init, client_step, client_final, accumulate, server_update)
    return python_loop_runner(fns, params, client_key, host_batches, weights, acc0, "fednova")


REFERENCE_RUNNERS = {
    "fedavg": fedjax_reference_runner,
    "scaffold": scaffold_reference_runner,
    "fednova": fednova_reference_runner,
}


def fused_runner(model, params, cohort_np: fs.Cohort, key, args) -> Runner:
    """A Python loop over clients, each client's whole local training one jitted call."""
    loss_fn = mean_loss_fn(model, train=True)
    client_opt = optax.sgd(args.learning_rate)
    server_lr = args.server_learning_rate

    def client_update(params, batches, mask, key):
        local = local_train(params, batches, mask, key, loss_fn=loss_fn, optimizer=client_opt)
        return tree_sub(params, local.params), local.num_seen

    def accumulate(acc, delta, weight):
        return jax.tree.map(lambda a, d: a + weight * d, acc, delta)

    def server_update(params, acc, total_weight):
        scale = 1.0 / total_weight
        return jax.tree.map(lambda p, a: p - server_lr * (a * scale), params, acc)

    num_clients = cohort_np.num_clients
    params = jax.device_put(params)
    keys = client_keys(key, jnp.asarray(cohort_np.client_ids))
    # Per-client slices, cut on the host and put on the device before any timing.
    batches = [
        jax.device_put({k: np.ascontiguousarray(v[c]) for k, v in cohort_np.batches.items()})
        for c in range(num_clients)
    ]
    masks = [jax.device_put(np.ascontiguousarray(cohort_np.mask[c])) for c in range(num_clients)]
    client_key = [keys[c] for c in range(num_clients)]
    host_weights = [float(w) for w in cohort_np.num_examples]
    weights = [jax.device_put(np.float32(w)) for w in host_weights]
    acc0 = jax.tree.map(jnp.zeros_like, params)
    total = jax.device_put(np.float32(sum(host_weights)))

    t0 = time.perf_counter()
    cu = jax.jit(client_update).lower(params, batches[0], masks[0], client_key[0]).compile()
    delta_shape = jax.eval_shape(client_update, params, batches[0], masks[0], client_key[0])[0]
    add = jax.jit(accumulate).lower(acc0, delta_shape, weights[0]).compile()
    server = jax.jit(server_update).lower(params, acc0, total).compile()
    compile_s = time.perf_counter() - t0

    def round_():
        acc = acc0
        total_weight = 0.0
        for c in range(num_clients):
            delta, _ = cu(params, batches[c], masks[c], client_key[c])
            acc = add(acc, delta, weights[c])
            total_weight += host_weights[c]
        return server(params, acc, np.float32(total_weight))

    memory = None
    mem_cu, mem_add = compiled_memory(cu), compiled_memory(add)
    if mem_cu is not None and mem_add is not None:
        # The per-client program, the accumulation, and the cohort's data held on the device.
        cohort_mib = tree_bytes(batches) / MIB + tree_bytes(masks) / MIB
        memory = {
            "client_update_mib": mem_cu["total_mib"],
            "accumulate_mib": mem_add["total_mib"],
            "cohort_data_mib": cohort_mib,
        }
        memory["total_mib"] = mem_cu["total_mib"] + mem_add["total_mib"] + cohort_mib
    return Runner(FUSED, round_, compile_s, memory)


# --------------------------------------------------------------------------------------------
# One case: a model and a cohort size


def time_interleaved(
    runners: Sequence[Runner], rounds: int, rng: random.Random | None = None
) -> None:
    """``rounds`` more passes; each pass times every runner that still wants repetitions.

    With ``rng`` each pass runs them in a fresh random order: a round right after a Python
    loop (idle XLA worker threads, cold caches) measured up to 1.6x slower than the same
    round right after a similar compiled round (logreg C=10: 2.5 vs 1.6 ms), so a fixed
    order favours whichever program follows its twin; shuffled, the best of N sees both.
    """
    for _ in range(rounds):
        order = list(runners)
        if rng is not None:
            rng.shuffle(order)
        for r in order:
            if len(r.times) < r.reps:
                r.times.append(r.run_once())


class PlainEmnistCNN(nn.Module):
    """``cnn_emnist``'s network written with ``flax.linen`` layers only (``nn.Conv``, no
    ``conv_general_dilated`` of its own), as a user would bring it."""

    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(0.25, deterministic=not train)(x)
        x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def get_model(name: str) -> fs.Model:
    """A built-in model, or ``LINEN_CNN`` through ``fs.models.model_from_linen``."""
    if name in (LINEN_CNN, LINEN_CNN_LAX):
        module = PlainEmnistCNN(NUM_CLASSES)
        model = fs.models.model_from_linen(
            module, name=name, input_shape=INPUT_SHAPE, has_dropout=True
        )
        if name == LINEN_CNN:
            return model

        def lax_apply(params, x, *, train, key=None):  # Flax's own convolutions and pool
            rngs = {"dropout": key} if train else {}
            x = jnp.reshape(x, (-1, *INPUT_SHAPE)).astype(jnp.float32)
            return module.apply({"params": params}, x, train=train, rngs=rngs)

        return model._replace(apply=lax_apply)
    input_shape, num_classes = data_shape(name)
    return fs.get_model(name, num_classes=num_classes, input_shape=input_shape)


def run_case(model_name: str, num_clients: int, args, peak_flops: float) -> list[dict]:
    model = get_model(model_name)
    params = model.init(jax.random.key(args.seed))
    key = jax.random.key(args.seed + 1)
    cohort_np = make_cohort(num_clients, args, model_name)
    cohort = jax.device_put(cohort_np)
    examples = float(np.sum(cohort_np.mask))  # real examples processed in one round
    fwd_flops, flops_source = forward_flops_per_example(model, params, args.batch_size)
    round_flops = 3.0 * fwd_flops * examples  # forward + backward

    is_conv = any(getattr(leaf, "ndim", 0) == 4 for leaf in jax.tree.leaves(params))
    # The most devices (up to --num_devices) that split the cohort evenly.
    available = args.num_devices or len(jax.local_devices())
    mesh = fs.client_mesh(max(d for d in range(1, available + 1) if num_clients % d == 0))
    with_reference = not (is_conv and num_clients > REFERENCE_CONV_MAX_CLIENTS)
    runners: list[Runner] = []
    for algorithm in args.algorithm_list:
        tag = f"[{model_name} C={num_clients}]" + ("" if algorithm == "fedavg" else f" {algorithm}")
        strategies = args.strategy_list if algorithm == "fedavg" else args.algorithm_strategy_list
        for strategy in strategies:
            log(f"{tag} compiling {strategy}")
            runners.append(
                attempt(
                    strategy,
                    algorithm,
                    functools.partial(
                        strategy_runner, strategy, model, params, cohort, key, args, mesh, algorithm
                    ),
                )
            )
        if with_reference:
            log(f"{tag} compiling {REFERENCE}" + (f" and {FUSED}" if algorithm == "fedavg" else ""))
            build = REFERENCE_RUNNERS[algorithm]
            runners.append(
                attempt(
                    REFERENCE, algorithm, lambda b=build: b(model, params, cohort_np, key, args)
                )
            )
            if algorithm == "fedavg":
                runners.append(
                    attempt(
                        FUSED, algorithm, lambda: fused_runner(model, params, cohort_np, key, args)
                    )
                )

    def label(r: Runner) -> str:
        tag = f"[{model_name} C={num_clients}]"
        return f"{tag} {r.name}" if r.algorithm == "fedavg" else f"{tag} {r.algorithm} {r.name}"

    # Warmup (first run allocates; the RSS high-water growth is charged to that runner).
    for i, r in enumerate(runners):
        if isinstance(r, FailedRunner):
            continue
        rss0 = peak_rss_mib()
        try:
            r.first_s = r.run_once()
        except Exception as e:
            what = f"{label(r)} in its first round"
            runners[i] = out_of_memory_runner(e, what, r.name, r.algorithm, like=r)
            del r
            continue
        r.extra["rss_hwm_growth_mib"] = peak_rss_mib() - rss0
        dev = device_peak_mib()
        if dev is not None:
            r.extra["device_peak_mib"] = dev
        # Best of N; fewer for slow rounds, more (up to 10N) for rounds of a few milliseconds.
        per_round = max(r.first_s, 1e-6)
        reps = max(1, min(args.repeats, int(args.max_seconds // per_round)))
        reps = max(reps, min(10 * args.repeats, int(args.min_seconds // per_round)))
        if len(args.algorithm_list) > 1 and r.name in ("auto", REFERENCE):
            # The ratio checks divide four such minima: more rounds for them, within budget.
            budget = max(1, int(2 * args.max_seconds // per_round))
            reps = max(reps, min(args.ratio_repeats, budget))
        r.reps = reps
        log(f"{label(r)}: first round {r.first_s:.3f}s, {reps} reps")
    failed = [r for r in runners if isinstance(r, FailedRunner)]
    runners = [r for r in runners if not isinstance(r, FailedRunner)]
    # Every algorithm's programs and references in one interleaved loop: load from other
    # processes hits all of them alike, so their ratios compare.
    rng = random.Random(args.seed)
    time_interleaved(runners, max((r.reps for r in runners), default=0), rng)

    # auto and the strategy it resolves to run the same program: when they differ by more
    # than noise should allow, time the two (and the best) head to head once more.
    extra_rounds: dict[Runner, int] = {}
    for algorithm in args.algorithm_list:
        by_name = {r.name: r for r in runners if r.algorithm == algorithm}
        timed = [by_name[s] for s in STRATEGIES if s in by_name]
        auto = by_name.get("auto")
        if auto is None or len(timed) < 2:
            continue
        best_strategy = min(timed, key=lambda r: min(r.times))
        if best_strategy is auto:
            continue
        if min(best_strategy.times) / min(auto.times) >= 0.95:
            continue
        contenders = [auto, best_strategy]
        resolved = by_name.get(auto.extra["resolved"])
        if resolved is not None and resolved not in contenders:
            contenders.append(resolved)
        log(f"[{model_name} C={num_clients}] re-timing {', '.join(label(r) for r in contenders)}")
        # Best of more rounds: under load from other processes the minimum converges.
        per_round = max(min(auto.times), 1e-6)
        extra = max(2 * args.repeats, min(20 * args.repeats, int(2 * args.min_seconds / per_round)))
        if per_round * extra > 2 * args.max_seconds:
            extra = max(1, args.repeats // 2)
        for r in contenders:
            extra_rounds[r] = max(extra_rounds.get(r, 0), extra)
    if extra_rounds and len(args.algorithm_list) > 1:
        # The ratio checks compare every algorithm's auto and reference: more rounds for one
        # algorithm's auto alone would favour its ratio (the minimum of more samples under
        # load), so all of them get as many more (within --max_seconds each).
        most = max(extra_rounds.values())
        for r in runners:
            if r.name in ("auto", REFERENCE) and r not in extra_rounds:
                budget = max(1, int(2 * args.max_seconds / max(min(r.times), 1e-6)))
                extra_rounds[r] = min(most, budget)
        log(f"[{model_name} C={num_clients}] re-timing every algorithm's auto and reference too")
    remeasured = list(extra_rounds)
    if remeasured:
        for r, extra in extra_rounds.items():
            r.reps = len(r.times) + extra
        time_interleaved(remeasured, max(extra_rounds.values()), rng)

    rows = []
    for algorithm in args.algorithm_list:
        group = [r for r in runners if r.algorithm == algorithm]
        reference = next((r for r in group if r.name == REFERENCE), None)
        group_rows = []
        for r in group:
            best = min(r.times)
            row = {
                "model": model_name,
                "num_clients": num_clients,
                "algorithm": algorithm,
                "devices": 1 if mesh is None or r.name in (REFERENCE, FUSED) else mesh.size,
                "strategy": r.name,
                "resolved": r.extra.get("resolved"),
                "examples_per_round": examples,
                "best_s": best,
                "median_s": float(np.median(r.times)),
                "first_s": r.first_s,
                "times_s": r.times,
                "clients_per_s": num_clients / best,
                "examples_per_s": examples / best,
                "model_flops_per_round": round_flops,
                "gflops_per_s": round_flops / best / 1e9,
                "mfu": round_flops / best / peak_flops,
                "flops_source": flops_source,
                "compile_s": r.compile_s,
                "memory": r.memory,
                "mem_mib": r.memory["total_mib"] if r.memory else None,
                "rss_hwm_growth_mib": r.extra.get("rss_hwm_growth_mib"),
                "device_peak_mib": r.extra.get("device_peak_mib"),
                "remeasured": r in remeasured,
            }
            if reference is not None:
                row["params_rel_err"] = rel_err(r.params, reference.params)
                row["update_rel_err"] = rel_err(
                    jax.tree.map(lambda a, p: a - p, r.params, params),
                    jax.tree.map(lambda a, p: a - p, reference.params, params),
                )
                row["match"] = row["params_rel_err"] <= args.tolerance
                if r.aux is not None and reference.aux is not None:
                    # SCAFFOLD: the new server and client control variates match too.
                    row["controls_rel_err"] = rel_err(
                        controls_of(r.aux), controls_of(reference.aux)
                    )
                    row["match"] = row["match"] and row["controls_rel_err"] <= args.tolerance
            else:
                row["params_rel_err"] = row["update_rel_err"] = row["match"] = None
            group_rows.append(row)

        best_cps = max(
            (r["clients_per_s"] for r in group_rows if r["strategy"] in STRATEGIES), default=None
        )
        ref_cps = next((r["clients_per_s"] for r in group_rows if r["strategy"] == REFERENCE), None)
        fused_cps = next((r["clients_per_s"] for r in group_rows if r["strategy"] == FUSED), None)
        ref_median = next((r["median_s"] for r in group_rows if r["strategy"] == REFERENCE), None)
        if algorithm == "fedavg":
            measured_auto(group_rows, num_clients, mesh, args)
        for row in group_rows:
            row["x_best"] = row["clients_per_s"] / best_cps if best_cps else None
            row["x_ref"] = row["clients_per_s"] / ref_cps if ref_cps else None
            row["x_fused"] = row["clients_per_s"] / fused_cps if fused_cps else None
            # The same ratio from median rounds: a second opinion on noisy minima.
            row["x_ref_median"] = ref_median / row["median_s"] if ref_median else None
        rows.extend(group_rows)
        rows.extend(
            failed_row(r, model_name, num_clients, mesh) for r in failed if r.algorithm == algorithm
        )
    return rows


def failed_row(r: FailedRunner, model_name: str, num_clients: int, mesh) -> dict:
    """The row of a program that could not be compiled or run: no times, the error."""
    row = {
        "model": model_name,
        "num_clients": num_clients,
        "algorithm": r.algorithm,
        "devices": 1 if mesh is None or r.name in (REFERENCE, FUSED) else mesh.size,
        "strategy": r.name,
        "resolved": fs.resolve_strategy("auto") if r.name == "auto" else None,
        "failed": r.error,
        "remeasured": False,
        "device_peak_mib": None,
        "compile_s": None if math.isnan(r.compile_s) else r.compile_s,
        "memory": r.memory,
        "mem_mib": r.memory["total_mib"] if r.memory else None,
    }
    timings = ("best_s", "median_s", "clients_per_s", "examples_per_s", "gflops_per_s", "mfu")
    checks = ("params_rel_err", "update_rel_err", "match")
    ratios = ("x_best", "x_ref", "x_fused", "x_ref_median")
    return {**row, **dict.fromkeys((*timings, *checks, *ratios))}


def measured_auto(group_rows: list[dict], num_clients: int, mesh, args) -> None:
    """What ``fs.simulate``'s measured ``auto`` (``driver.autotune``) would pick from these
    timings: the fastest of its candidates that ran, written into the ``auto`` row with the
    candidates compared (the ``auto`` program itself is ``fs.Executor("auto")``, the fixed
    rule)."""
    per_device = -(-num_clients // (1 if mesh is None else mesh.size))  # as the driver counts
    names = autotune.candidates(per_device, args.chunk_size)
    timed = {r["strategy"]: r["best_s"] for r in group_rows if r["strategy"] in names}
    for row in group_rows:
        if row["strategy"] == "auto" and timed:
            row["measured_auto"] = min(timed, key=timed.get)
            row["measured_auto_of"] = sorted(timed)


def controls_of(aux) -> tuple[Any, Any]:
    """SCAFFOLD's ``(c, table of c_i)`` from our ``(c, table)`` or the reference's
    ``(c, [c_i])``."""
    control, clients = aux
    if isinstance(clients, list):
        clients = jax.tree.map(lambda *xs: np.stack(xs), *clients)
    return control, clients


# --------------------------------------------------------------------------------------------
# Output


COLUMNS = (
    ("model", 10, "{}"),
    ("C", 5, "{}"),
    ("algo", 8, "{}"),
    ("strategy", 17, "{}"),
    ("clients/s", 10, "{:.1f}"),
    ("examples/s", 11, "{:.0f}"),
    ("x ref", 6, "{:.2f}"),
    ("x fused", 7, "{:.2f}"),
    ("x best", 6, "{:.2f}"),
    ("MFU %", 6, "{:.2f}"),
    ("compile s", 9, "{:.2f}"),
    ("mem MiB", 9, "{:.1f}"),
    ("peak MiB", 8, "{:.0f}"),
    ("note", 0, "{}"),
)


def table_header() -> str:
    head = " ".join(f"{name:>{w}}" if w else name for name, w, _ in COLUMNS)
    return head + "\n" + "-" * len(head)


def table_row(row: dict) -> str:
    strategy = row["strategy"]
    if row["resolved"]:
        strategy = f"auto->{row['resolved']}"
    notes = []
    if row["match"] is False:
        err = f"rel {row['params_rel_err']:.1e}"
        if row.get("controls_rel_err") is not None:
            err += f", controls rel {row['controls_rel_err']:.1e}"
        notes.append(f"WARNING params differ from reference ({err})")
    if row["remeasured"]:
        notes.append("re-timed")
    if row.get("measured_auto"):
        of = ", ".join(row["measured_auto_of"])
        notes.append(f"measured auto picks {row['measured_auto']} (of {of})")
    if row.get("failed"):
        notes.append(f"FAILED {row['failed']}")
    values = (
        row["model"],
        row["num_clients"],
        row.get("algorithm", "fedavg"),
        strategy,
        row["clients_per_s"],
        row["examples_per_s"],
        row["x_ref"],
        row["x_fused"],
        row["x_best"],
        None if row["mfu"] is None else 100.0 * row["mfu"],
        row["compile_s"],
        row["mem_mib"],
        row.get("device_peak_mib"),
        "; ".join(notes),
    )
    cells = []
    for (_, width, fmt), value in zip(COLUMNS, values):
        text = "-" if value is None else fmt.format(value)
        cells.append(f"{text:>{width}}" if width else text)
    return " ".join(cells).rstrip()


def run_checks(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """``(name, passed or None when not applicable, detail)`` for each check."""

    def algo(r: dict) -> str:
        return r.get("algorithm", "fedavg")

    def where(r: dict) -> str:
        suffix = "" if algo(r) == "fedavg" else f" {algo(r)}"
        return f"{r['model']} C={r['num_clients']}{suffix}"

    checks = []
    target = next(
        (
            r
            for r in rows
            if r["model"] == "logreg"
            and r["num_clients"] == 1000
            and r["strategy"] == "auto"
            and algo(r) == "fedavg"
        ),
        None,
    )
    name = f"auto >= {AUTO_VS_REF_TARGET:g}x reference on logreg C=1000"
    if target is None or target["x_ref"] is None:
        checks.append((name, None, "not run"))
    else:
        ok = target["x_ref"] >= AUTO_VS_REF_TARGET
        checks.append((name, ok, f"{target['x_ref']:.2f}x"))

    autos = [r for r in rows if r["strategy"] == "auto" and not r.get("failed")]
    failed_autos = [r for r in rows if r["strategy"] == "auto" and r.get("failed")]
    name = f"auto >= {AUTO_VS_BEST_TARGET:g}x best everywhere"
    if failed_autos:
        where_failed = ", ".join(f"{where(r)} (auto->{r['resolved']})" for r in failed_autos)
        checks.append((name, False, f"auto failed in {where_failed}"))
    elif not autos:
        checks.append((name, None, "not run"))
    else:
        worst = min(autos, key=lambda r: r["x_best"])
        best = max(
            (
                r
                for r in rows
                if r["model"] == worst["model"]
                and r["num_clients"] == worst["num_clients"]
                and algo(r) == algo(worst)
                and r["strategy"] in STRATEGIES
                and not r.get("failed")
            ),
            key=lambda r: r["clients_per_s"],
        )
        detail = (
            f"worst case {where(worst)}: {worst['x_best']:.2f}x, "
            f"auto->{worst['resolved']} vs best {best['strategy']}"
        )
        checks.append((name, worst["x_best"] >= AUTO_VS_BEST_TARGET, detail))

    compared = [r for r in rows if r["match"] is not None]
    bad = [r for r in compared if not r["match"]]
    name = "every strategy's params match the reference"
    if not compared:
        checks.append((name, None, "no reference run"))
    else:
        worst_err = max(r["params_rel_err"] for r in compared)
        detail = f"worst rel err {worst_err:.1e}"
        controls = [
            r["controls_rel_err"] for r in compared if r.get("controls_rel_err") is not None
        ]
        if controls:
            detail += f" (SCAFFOLD control variates {max(controls):.1e})"
        if bad:
            detail += "; mismatches: " + ", ".join(f"{where(r)} {r['strategy']}" for r in bad)
        checks.append((name, not bad, detail))

    # A user's plain Flax CNN against the built-in one of the same network, auto, same cohort.
    builtin = {
        r["num_clients"]: r for r in autos if r["model"] == "cnn_emnist" and algo(r) == "fedavg"
    }
    for user in (LINEN_CNN, LINEN_CNN_LAX):
        pairs = [
            (r, builtin[r["num_clients"]])
            for r in autos
            if r["model"] == user and algo(r) == "fedavg" and r["num_clients"] in builtin
        ]
        name = f"{user} >= 1/{1 / USER_MODEL_TARGET:g} of cnn_emnist's clients/s (auto)"
        if not pairs:
            if user == LINEN_CNN:  # the other only when asked for (--models)
                checks.append((name, None, "not run"))
            continue
        qs = {r["num_clients"]: r["clients_per_s"] / b["clients_per_s"] for r, b in pairs}
        detail = ", ".join(f"C={c}: {q:.2f}x" for c, q in qs.items())
        checks.append((name, min(qs.values()) >= USER_MODEL_TARGET, detail))

    # Each further algorithm's speedup over its own Python-loop reference, against FedAvg's
    # in the same case (the same run, interleaved): ratio(algo) / ratio(fedavg) >= 1 - tol.
    fedavg_auto = {
        (r["model"], r["num_clients"]): r
        for r in autos
        if algo(r) == "fedavg" and r["x_ref"] is not None
    }
    others = list(dict.fromkeys(algo(r) for r in rows if algo(r) != "fedavg"))
    for other in others:
        name = f"ratio({other}) >= {1 - RATIO_TOLERANCE:.0%} of ratio(fedavg)"
        pairs = [
            (r, fedavg_auto[(r["model"], r["num_clients"])])
            for r in autos
            if algo(r) == other
            and r["x_ref"] is not None
            and (r["model"], r["num_clients"]) in fedavg_auto
        ]
        if not pairs:
            checks.append((name, None, "no case with both references run"))
            continue
        parts, ok = [], True
        for r, f in pairs:
            q = r["x_ref"] / f["x_ref"]
            inside = q >= 1.0 - RATIO_TOLERANCE
            ok = ok and inside
            median = ""
            if r.get("x_ref_median") and f.get("x_ref_median"):
                median = f", medians {r['x_ref_median'] / f['x_ref_median']:.2f}"
            parts.append(
                f"{r['model']} C={r['num_clients']} {r['x_ref']:.2f}x vs {f['x_ref']:.2f}x "
                f"({q:.2f}{'' if inside else ' OUT'}{median})"
            )
        checks.append((name, ok, "; ".join(parts)))
    return checks


# --------------------------------------------------------------------------------------------
# Main


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions (~3 min)")
    p.add_argument(
        "--gpu",
        action="store_true",
        help=f"the GPU table: {', '.join(GPU_MODELS)} at cohorts "
        f"{', '.join(map(str, GPU_COHORTS))} (the default on a GPU or TPU backend); on a CPU "
        "only with --cohorts",
    )
    p.add_argument(
        "--strategies",
        default="all",
        help=f"FedAvg's strategies to time (comma-separated subset of {', '.join(STRATEGIES)}, "
        "or all)",
    )
    p.add_argument(
        "--peak_n",
        type=int,
        default=0,
        help="matmul size of the measured peak (0: 1024 on a CPU, 8192 on a GPU or TPU)",
    )
    p.add_argument("--models", default=None, help=f"comma-separated subset of {MODELS}")
    p.add_argument("--cohorts", default=None, help="comma-separated cohort sizes")
    p.add_argument("--examples_per_client", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=10)
    p.add_argument("--local_epochs", type=int, default=1)
    p.add_argument("--chunk_size", type=int, default=10)
    p.add_argument("--cpu_devices", type=int, default=0, help="virtual CPU devices (0: cores)")
    p.add_argument("--num_devices", type=int, default=0, help="cohort devices (0: all)")
    p.add_argument("--learning_rate", type=float, default=0.05, help="client SGD step")
    p.add_argument("--server_learning_rate", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (3 quick, 5 full)")
    p.add_argument(
        "--max_seconds",
        type=float,
        default=None,
        help="fewer repetitions for programs whose round takes long (per program; 8 quick, 20 "
        "full)",
    )
    p.add_argument(
        "--min_seconds",
        type=float,
        default=0.3,
        help="more repetitions (up to 10x --repeats) for rounds shorter than this / repeats",
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="params rel err vs reference")
    p.add_argument(
        "--algorithms",
        default="fedavg",
        help=f"comma-separated subset of {ALGORITHMS}, each timed against its own Python-loop "
        "reference (fedavg alone: the default)",
    )
    p.add_argument(
        "--algorithm_strategies",
        default="auto",
        help="strategies timed for the algorithms other than fedavg (comma-separated, or all; "
        "fedavg always runs all four)",
    )
    p.add_argument(
        "--ratio_repeats",
        type=int,
        default=10,
        help="with several --algorithms: at least this many timed rounds of every auto and "
        "reference program (within 2 x --max_seconds each), whose minima the ratio checks use",
    )
    p.add_argument(
        "--control_scale",
        type=float,
        default=0.01,
        help="SCAFFOLD's starting c_i ~ N(0, scale^2), c = mean c_i (0: zeros, no correction)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", dest="check", action="store_false", help="always exit 0")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.max_seconds is None:
        args.max_seconds = 8.0 if args.quick else 20.0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.algorithm_list = tuple(dict.fromkeys(a.strip() for a in args.algorithms.split(",")))
    args.algorithm_list = tuple(a for a in args.algorithm_list if a)
    unknown = [a for a in args.algorithm_list if a not in ALGORITHMS]
    if unknown or not args.algorithm_list:
        p.error(f"--algorithms: unknown {unknown}; known: {', '.join(ALGORITHMS)}")
    args.algorithm_strategy_list = strategy_list(
        p, "--algorithm_strategies", args.algorithm_strategies
    )
    args.strategy_list = strategy_list(p, "--strategies", args.strategies)
    return args


def strategy_list(p: argparse.ArgumentParser, flag: str, text: str) -> tuple[str, ...]:
    """``all``, or the comma-separated strategies in ``text`` (in ``STRATEGIES``' order)."""
    if text.strip() == "all":
        return STRATEGIES
    chosen = {t.strip() for t in text.split(",") if t.strip()}
    bad = sorted(chosen - set(STRATEGIES))
    if bad or not chosen:
        p.error(f"{flag}: unknown {bad}; known: {', '.join(STRATEGIES)}, all")
    return tuple(t for t in STRATEGIES if t in chosen)


def select_cases(args) -> list[tuple[str, int]]:
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu and args.gpu and not args.cohorts:
        raise SystemExit(
            "--gpu on a CPU backend: its 1000-client CNN cohorts take hours here; give --cohorts "
            "(e.g. --cohorts 2 to try the table's code path) or run it on a GPU."
        )
    models = GPU_MODELS if args.gpu else MODELS
    if args.models:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        known = dict.fromkeys([*MODELS, LINEN_CNN_LAX, *fs.models.MODEL_NAMES])
        unknown = [m for m in models if m not in known]
        if unknown:
            raise SystemExit(f"unknown models {unknown}; known: {', '.join(known)}")
    cohorts = parse_ints(args.cohorts) if args.cohorts else None
    table = QUICK_COHORTS if args.quick else FULL_COHORTS
    if args.gpu:
        table = dict.fromkeys(models, GPU_COHORTS)
    cases = []
    for m in models:
        for c in cohorts or table.get(m, (10, 100)):
            if on_cpu and m.startswith(CONV_PREFIXES) and c > CPU_CNN_MAX_CLIENTS:
                log(f"skipping {m} C={c}: the CNNs run up to {CPU_CNN_MAX_CLIENTS} on a CPU")
                continue
            cases.append((m, c))
    return cases


def metadata(args, peak_start: float, peak_end: float) -> dict:
    dev = jax.devices()[0]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    import flax

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "jax": jax.__version__,
        "jaxlib": _jaxlib_version(),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "fedjax_sim": fs.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "peak_gflops": max(peak_start, peak_end) / 1e9,
        "peak_gflops_start": peak_start / 1e9,
        "peak_gflops_end": peak_end / 1e9,
        "peak_method": f"best of 10 float32 jnp.dot {args.peak_n}x{args.peak_n} (2*n^3 FLOPs), "
        "start and end, at JAX's default matmul precision (TF32 on recent NVIDIA GPUs)",
        "matmul_precision": jax.config.jax_default_matmul_precision or "default",
        "auto_rule": "fedjax_sim.core.execution.resolve_strategy",
        "algorithms": list(args.algorithm_list),
        "round_state": "donated; each timed round's new state feeds the next (as the driver "
        "runs it); params are checked after the first round",
        "scaffold_initial_controls": (
            f"c_i ~ N(0, {args.control_scale:g}^2) per client, c = mean_i c_i; num_clients = "
            "the cohort; weighting uniform"
        ),
        "args": vars(args),
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # one virtual CPU device per core, as the CLI does; a no-op on GPU/TPU
        jax.config.update("jax_num_cpu_devices", args.cpu_devices or os.cpu_count() or 1)
    except RuntimeError:
        log("JAX already started: keeping its CPU device count")
    if jax.default_backend() != "cpu" and not args.models:
        args.gpu = True  # a GPU or TPU: the GPU table unless models are named
    cases = select_cases(args)
    log(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{len(jax.devices())} device(s), {len(cases)} cases"
    )
    args.peak_n = args.peak_n or (1024 if jax.default_backend() == "cpu" else 8192)
    peak_start = measure_peak_flops(args.peak_n)
    log(f"matmul peak {peak_start / 1e9:.1f} GFLOP/s")

    rows: list[dict] = []
    t_start = time.perf_counter()
    for model_name, num_clients in cases:
        # MFU is computed against the start peak here and rescaled to the run's peak below.
        case_rows = run_case(model_name, num_clients, args, peak_start)
        rows.extend(case_rows)
    peak_end = measure_peak_flops(args.peak_n)
    peak = max(peak_start, peak_end)
    for row in rows:
        if row["gflops_per_s"] is not None:
            row["mfu"] = row["gflops_per_s"] * 1e9 / peak
    print(table_header())
    for model_name, num_clients in cases:
        for row in rows:
            if row["model"] == model_name and row["num_clients"] == num_clients:
                print(table_row(row), flush=True)
    print(
        f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s (start {peak_start / 1e9:.1f}, end "
        f"{peak_end / 1e9:.1f}); total {time.perf_counter() - t_start:.0f}s; mem = compiled "
        "temp+argument+output (fused: per-client program + add + cohort data); x ref, x best: "
        "against the same algorithm's reference, best strategy"
    )

    checks = run_checks(rows)
    print("\nCHECK")
    for name, ok, detail in checks:
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {name}: {status} ({detail})")

    result = {
        "meta": metadata(args, peak_start, peak_end),
        "rows": rows,
        "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in checks],
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
    failed = [name for name, ok, _ in checks if ok is False]
    return 1 if (failed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Where a client step of the EMNIST CNN spends its time, layer by layer, inside a loop.

A FedAvg round of ``cnn_emnist`` is, per client, a loop of SGD steps on small batches. This
script times, each compiled on its own and run ``--steps`` times inside a ``lax.fori_loop``
(the form the round's local loop takes), one whole SGD step and its pieces: each layer's
forward pass and its backward pass (``jax.vjp``: the input and weight gradients). Reported
per piece: milliseconds per step, its share of the whole step, XLA's FLOP count for it and the
GFLOP/s it reaches, against a float32 matmul peak measured in the same run.

    python scripts/profile_cnn.py                 # batch 8, 200 steps per piece, ~1 min
    python scripts/profile_cnn.py --batch_size 10 --steps 500 --out profile.json
    python scripts/profile_cnn.py --one_thread    # on one core, as each of a round's devices

``--round`` profiles a whole compiled FedAvg round instead (``--clients`` clients of
``--examples`` examples, the sequential strategy over ``--devices`` virtual CPU devices): XLA's
own trace events (``--xla_cpu_enable_xprof_traceme``, read from ``jax.profiler``'s trace),
summed per operation over ``--repeats`` rounds and grouped by kind (the fusion's name without
its number), each top operation with its shape and the JAX operation it came from.

    python scripts/profile_cnn.py --round --clients 10 --devices 2
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable

# Set before JAX starts (hence allow_abbrev=False below): XLA's per-operation trace events
# (--round); Eigen on one thread (--one_thread, the process pinned to one core in main), as
# each of the round's per-core devices runs its clients.
if "--round" in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    ).strip()
if "--one_thread" in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fedjax_sim as fs
from fedjax_sim.driver.autotune import best_of
from fedjax_sim.models.conv import _rows_product

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cost_flops, measure_peak_flops  # noqa: E402

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 62


def _loop_time(fn: Callable, args, steps: int, repeats: int) -> tuple[float, float]:
    """(best seconds per step of ``fn(*args)`` run ``steps`` times in a fori_loop, XLA's FLOPs
    of one call)."""

    def body(_, carry):
        out = fn(*carry)
        # Every input depends on the last output (a zero-weight perturbation XLA cannot fold),
        # so no part of an iteration is loop-invariant and hoisted out of the loop.
        s = 0.0 * sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out))

        def nudge(c):
            return c + s.astype(c.dtype) if jnp.issubdtype(c.dtype, jnp.floating) else c

        return jax.tree.map(nudge, carry)

    run = jax.jit(lambda *a: lax.fori_loop(0, steps, body, a))
    flops = cost_flops(jax.jit(fn).lower(*args).compile()) or 0.0
    best = best_of(lambda: jax.block_until_ready(run(*args)), tuple, repeats=repeats)
    return best / steps, flops


def pieces(batch: int):
    """``{name: (fn, args)}``: the whole step and each layer's forward and backward pass."""
    model = fs.get_model("cnn_emnist", num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, *INPUT_SHAPE), np.float32))
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
    key = jax.random.key(1)

    def loss(p, x, y):
        logits = model.apply(p, x, train=True, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(x, p, y):
        g = jax.grad(loss)(p, x, y)
        return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), g

    out = {"whole SGD step": (step, (x, params, y))}
    conv = fs.models.conv2d
    k1, k2 = params["Conv_0"]["kernel"], params["Conv_1"]["kernel"]
    h1 = jax.nn.relu(conv(x, k1, "VALID"))
    h2 = jax.nn.relu(conv(h1, k2, "VALID"))
    pooled = h2.reshape(batch, 12, 2, 12, 2, 64).max(axis=(2, 4)).reshape(batch, -1)
    d1, d2 = params["Dense_0"]["kernel"], params["Dense_1"]["kernel"]
    h3 = jax.nn.relu(pooled @ d1)
    layers = {
        "conv 3x3x1->32": (lambda x, w: conv(x, w, "VALID"), (x, k1)),
        "conv 3x3x32->64": (lambda x, w: conv(x, w, "VALID"), (h1, k2)),
        "max-pool 2x2": (lambda h: h.reshape(batch, 12, 2, 12, 2, 64).max(axis=(2, 4)), (h2,)),
        "dense 9216->128": (lambda h, w: h @ w, (pooled, d1)),
        "dense 128->62": (lambda h, w: h @ w, (h3, d2)),
    }
    for name, (f, args) in layers.items():
        out[f"{name} forward"] = (f, args)

        def backward(*a, f=f):
            y, vjp = jax.vjp(f, *a)
            return vjp(jnp.ones_like(y))

        out[f"{name} backward"] = (backward, args)
    # The second convolution's kernel gradient two ways (models/conv.py's backward pass): as
    # a convolution with the batch contracted (before), and as one matmul over the patches.
    dy = jnp.ones((batch, 24, 24, 64), jnp.float32)

    def as_conv(x, dy):
        dw = lax.conv_general_dilated(
            x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        return dw.transpose(1, 2, 0, 3)

    def as_matmul(x, dy, wide=False):
        p = jnp.concatenate(
            [x[:, i : i + 24, j : j + 24, :] for i in range(3) for j in range(3)], axis=-1
        ).reshape(-1, 288)
        if wide:  # the [64, 288] orientation, as conv2d's backward pass computes it now
            return _rows_product(p, dy.reshape(-1, 64), None)
        return lax.dot_general(p, dy.reshape(-1, 64), (((0,), (0,)), ((), ())))

    out["conv 32->64 kernel grad as a conv"] = (as_conv, (h1, dy))
    out["conv 32->64 kernel grad im2col [288,64]"] = (as_matmul, (h1, dy))
    out["conv 32->64 kernel grad im2col [64,288]"] = (
        functools.partial(as_matmul, wide=True),
        (h1, dy),
    )
    # Dropout's masks: random bits for the pooled activations and the hidden layer.
    out["dropout masks (random bits)"] = (
        lambda x, k: (
            jax.random.bernoulli(k, 0.75, (batch, 12, 12, 64)),
            jax.random.bernoulli(k, 0.5, (batch, 128)),
        ),
        (x, key),
    )
    return out


# Trace events that are not one operation's own work (the executor, waits, Python).
NOT_OPS = ("ThunkExecutor", "$", "PjitFunction", "while", "Wait", "Rendezvous", "SlinkyThread")


def profile_round(args) -> dict:
    """Per-operation seconds of a compiled cnn_emnist FedAvg round (see the module doc)."""
    rng = np.random.default_rng(0)
    n = args.examples
    ds = fs.FederatedDataset(
        {
            f"c{c}": {
                "x": rng.random((n, *INPUT_SHAPE), dtype=np.float32),
                "y": rng.integers(0, NUM_CLASSES, n, dtype=np.int32),
            }
            for c in range(args.clients)
        }
    )
    model = fs.get_model("cnn_emnist", num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE)
    mesh = fs.client_mesh(args.devices) if args.devices > 1 else None
    algo = fs.fedavg(model, optax.sgd(0.1), executor=fs.Executor("sequential", mesh=mesh))
    state = algo.init(model.init(jax.random.key(0)))
    cohort = fs.pack_cohort(ds, range(args.clients), batch_size=args.batch_size, seed=0,
                            round_num=0)  # fmt: skip
    key = jax.random.key(1)
    compiled = jax.jit(algo.apply).lower(state, cohort, key).compile()
    cohort = jax.device_put(cohort)
    best = best_of(
        lambda: jax.block_until_ready(compiled(state, cohort, key)), tuple, repeats=args.repeats
    )
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.repeats):
                jax.block_until_ready(compiled(state, cohort, key))
        (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    per_op, per_kind = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS):
            per_op[e["name"]] += e["dur"] / 1e6 / args.repeats
            per_kind[re.sub(r"[.\d]+$", "", e["name"])] += e["dur"] / 1e6 / args.repeats
    hlo = compiled.as_text()

    def described(name: str) -> str:
        m = re.search(r"%" + re.escape(name) + r" = (\S+) .*?op_name=\"([^\"]+)\"", hlo)
        return f"{m.group(1)} {m.group(2).split('/')[-2:]}" if m else ""

    total = sum(per_kind.values())
    return {
        "round_s": best,
        "clients_per_s": args.clients / best,
        "op_s": total,
        "kinds": [{"kind": k, "s": t, "share": t / total} for k, t in per_kind.most_common(12)],
        "top_ops": [{"op": k, "s": t, "what": described(k)} for k, t in per_op.most_common(12)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=200, help="loop iterations per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per piece (best kept)")
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--round", action="store_true", help="profile a whole round's operations")
    p.add_argument(
        "--one_thread", action="store_true", help="Eigen on one thread, pinned to one core"
    )
    p.add_argument("--clients", type=int, default=10, help="--round: clients in the round")
    p.add_argument("--examples", type=int, default=32, help="--round: examples per client")
    p.add_argument("--devices", type=int, default=1, help="--round: virtual CPU devices")
    args = p.parse_args(argv)
    if args.one_thread and hasattr(os, "sched_setaffinity"):  # before XLA starts its threads
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if args.round:
        jax.config.update("jax_num_cpu_devices", args.devices)
        out = profile_round(args)
        print(f"cnn_emnist round: {args.clients} clients x {args.examples} examples, batch "
              f"{args.batch_size}, sequential on {args.devices} device(s): "
              f"{out['round_s'] * 1e3:.0f} ms ({out['clients_per_s']:.1f} clients/s); "
              f"traced op time {out['op_s'] * 1e3:.0f} ms per round (all threads)")  # fmt: skip
        for k in out["kinds"]:
            print(f"  {k['kind']:28s} {k['s'] * 1e3:8.1f} ms {k['share']:6.1%}")
        print("top operations:")
        for o in out["top_ops"]:
            print(f"  {o['op']:28s} {o['s'] * 1e3:8.1f} ms  {o['what']}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    peak = measure_peak_flops(reps=5)
    rows = []
    for name, (fn, fargs) in pieces(args.batch_size).items():
        seconds, flops = _loop_time(fn, fargs, args.steps, args.repeats)
        rows.append(
            {"piece": name, "ms": 1e3 * seconds, "flops": flops, "gflops_s": flops / seconds / 1e9}
        )
    whole = rows[0]["ms"]
    threads = "one thread" if args.one_thread else "all threads"
    print(f"cnn_emnist, batch {args.batch_size}, {args.steps} steps in a fori_loop, {threads}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    print(f"{'piece':40s} {'ms/step':>8s} {'share':>6s} {'MFLOP':>8s} {'GFLOP/s':>8s}")
    for r in rows:
        r["share"] = r["ms"] / whole
        print(f"{r['piece']:40s} {r['ms']:8.3f} {r['share']:6.1%} {r['flops'] / 1e6:8.1f} "
              f"{r['gflops_s']:8.1f}")  # fmt: skip
    parts = sum(r["ms"] for r in rows[1:] if "kernel grad" not in r["piece"])
    print(f"{'sum of the pieces':40s} {parts:8.3f} {parts / whole:6.1%}")
    if args.out:
        meta = {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "peak_flops": peak,
            "one_thread": args.one_thread,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

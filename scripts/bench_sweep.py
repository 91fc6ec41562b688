#!/usr/bin/env python
"""Benchmark of a vectorized sweep against running its members one after another.

A 16-member sweep (4 client learning rates x 4 seeds) of FedAvg on the default config
(Synthetic(1,1), logistic regression), shortened to ``--rounds`` rounds: ``run_sweep`` trains
all members in one vmapped program; the reference calls ``fs.simulate`` once per member, in the
same process, on the same data (``federated_data``), without checkpoints. Both wall times
include compilation, packing, evaluation and writing the metrics, i.e. what a user waits for.
It reports both times and their ratio and checks that every member's final params equal its
solo run's within ``--tolerance``.

``--devices N`` gives both sides N devices (on CPU, N virtual devices); the default 0 is what
``fedjax-sim run`` and ``fedjax-sim sweep`` use: one virtual device per core on CPU, every
device elsewhere. The sweep splits its streams over them, each solo run its cohort's clients.

``--axis data_seed`` sweeps 4 data seeds instead of 4 seeds (each a different Synthetic(1,1)
draw, so the sweep builds 4 datasets and pads the streams' cohorts to a common step count);
the solo runs get their data prebuilt, so dataset building counts against the sweep only.

The learning rates stop at 0.03: at 0.1 this config's 20 local epochs are chaotic enough that
any float reordering shows (``fs.simulate`` alone on 1 and 2 devices differs by 5e-3 after 3
rounds), so no vectorized run can match a solo one to 1e-5 there.

    python scripts/bench_sweep.py                 # 20 rounds; aim: ratio >= 3
    python scripts/bench_sweep.py --axis data_seed
    python scripts/bench_sweep.py --rounds 50 --out bench_sweep.json

Then (``--two-nn-rounds``, default 10; 0 skips it) McMahan et al.'s 2NN FedAvg round (10
clients x 600 MNIST-shaped examples, batch 10, 60 local steps each, lr 0.215) through the public
API (``fs.fedavg``, the ``auto`` strategy, the cohort split over the same devices) against a
plain NumPy FedAvg of the same round (``numpy_fedavg_2nn``) in a child process with one BLAS
thread, both from the same params on the same packed batches (NumPy's in memory, ours placed
on the devices once; the rounds with the host cohort sent every round are timed too, interleaved,
and reported beside them): median seconds per round (after a compiling round), their ratio,
and the largest parameter difference after the rounds (a check
that both trained the same thing: after the first round, as later rounds amplify float
rounding on these random labels). ``--skip-sweep`` runs only this.

    python scripts/bench_sweep.py --devices 1 --skip-sweep --two-nn-rounds 5

``--step-costs`` also times what the vectorized program does per local step: the default
config's logistic-regression step alone and vmapped over 4 and 16 members (``member_step_costs``),
and a reference point for the layout: the step written by hand with 1, 4 and 16 members'
kernels side by side in one matmul.

Exit status 1 when a member differs from its solo run (or, with ``--min-ratio``, when the
ratio is below it), or the 2NN's params differ from NumPy's by 1e-4 or more (or, with
``--min-2nn-ratio``, its ratio is below it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import fedjax_sim as fs
from fedjax_sim import sweep
from fedjax_sim.core.execution import CLIENT_AXIS
from fedjax_sim.driver.autotune import best_of

LEARNING_RATES = [0.001, 0.003, 0.01, 0.03]
SEEDS = [0, 1, 2, 3]
# McMahan et al. 2017's 2NN FedAvg round (issue 26): 10 clients x 600 MNIST-shaped examples,
# batches of 10 (60 local steps each), client SGD at 0.215, server SGD at 1.
TWO_NN = {"clients": 10, "examples": 600, "batch_size": 10, "learning_rate": 0.215}
# The reference runs in a child process with one BLAS thread: "plain single-threaded NumPy".
ONE_THREAD = {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def numpy_fedavg_2nn(params: list, x, y, mask, lr: float, rounds: int) -> tuple[list, list, list]:
    """Plain NumPy FedAvg of the 2NN on packed batches: ``x`` ``[clients, steps, batch, 784]``,
    ``y`` ``[clients, steps, batch]``, ``mask`` ``[clients, steps, batch]``; ``params`` the
    three layers' ``[kernel, bias]`` in order. Every round starts every client from the same
    server params and runs its real steps of SGD on the mean cross-entropy; the server takes
    the examples-weighted mean. Returns the params after the last round, each round's seconds
    and the params after the first round."""
    params = [np.asarray(p, np.float32) for p in params]
    times, first = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        total = [np.zeros_like(p) for p in params]
        weights = mask.sum(axis=(1, 2)).astype(np.float32)
        for c in range(x.shape[0]):
            w1, b1, w2, b2, w3, b3 = (p.copy() for p in params)
            for s in range(x.shape[1]):
                real = mask[c, s]
                if not real.any():
                    break
                xb, yb = x[c, s][real], y[c, s][real]
                h1 = xb @ w1 + b1
                a1 = np.maximum(h1, 0)
                h2 = a1 @ w2 + b2
                a2 = np.maximum(h2, 0)
                z = a2 @ w3 + b3
                z = np.exp(z - z.max(axis=1, keepdims=True))
                g = z / z.sum(axis=1, keepdims=True)
                g[np.arange(len(yb)), yb] -= 1
                g /= np.float32(len(yb))
                d2 = (g @ w3.T) * (h2 > 0)
                d1 = (d2 @ w2.T) * (h1 > 0)
                w3 -= lr * (a2.T @ g)
                b3 -= lr * g.sum(axis=0)
                w2 -= lr * (a1.T @ d2)
                b2 -= lr * d2.sum(axis=0)
                w1 -= lr * (xb.T @ d1)
                b1 -= lr * d1.sum(axis=0)
            for t, p in zip(total, (w1, b1, w2, b2, w3, b3), strict=True):
                t += weights[c] * p
        params = [t / weights.sum() for t in total]
        times.append(time.perf_counter() - t0)
        first = params if first is None else first
    return params, times, first


def member_step_costs(steps: int = 2000, repeats: int = 5) -> dict:
    """Microseconds per local step of the default config's model (logistic regression, 60
    features, 10 classes, batch 10, client SGD) in a ``fori_loop``: one member alone, and
    vmapped over 4 and 16 members that share the batches and the step count (one stream's
    members in a sweep), and over 16 with a step count each (members of different streams
    vmapped together)."""
    import optax

    from fedjax_sim.core.client import local_train
    from fedjax_sim.core.task import mean_loss_fn

    model = fs.get_model("logreg", num_classes=10, input_shape=(60,))
    loss_fn = mean_loss_fn(model)
    rng = np.random.default_rng(0)
    batches = {
        "x": jnp.asarray(rng.random((steps, 10, 60), dtype=np.float32)),
        "y": jnp.asarray(rng.integers(0, 10, (steps, 10)), jnp.int32),
    }
    mask = jnp.ones((steps, 10), bool)
    params = model.init(jax.random.key(0))

    def train(p, lr, n):
        return local_train(
            p, batches, mask, jax.random.key(1), loss_fn=loss_fn, optimizer=optax.sgd(lr),
            num_steps=n,
        ).params  # fmt: skip

    def per_step(fn, *args) -> float:
        best = best_of(lambda: jax.block_until_ready(fn(*args)), tuple, repeats=repeats)
        return round(best / steps * 1e6, 2)

    def stacked(m):
        return jax.tree.map(lambda a: jnp.stack([a] * m), params), jnp.full((m,), 0.01)

    out = {"solo": per_step(jax.jit(train), params, 0.01, steps)}
    shared = jax.jit(jax.vmap(train, in_axes=(0, 0, None)))
    for m in (4, 16):
        out[f"vmap{m}_shared_steps"] = per_step(shared, *stacked(m), steps)
    own = jax.jit(jax.vmap(train, in_axes=(0, 0, 0)))
    out["vmap16_own_steps"] = per_step(own, *stacked(16), jnp.full((16,), steps))

    # A reference point for the layout of the vectorized step (``side_by_side_sgd``).
    by_hand = jax.jit(side_by_side_sgd, static_argnums=4)
    for m in (1, 4, 16):
        wide = jnp.zeros((60, m, 10)), jnp.zeros((m, 10)), jnp.full((m,), 0.01)
        out[f"by_hand{m}_side_by_side"] = per_step(by_hand, *wide, batches, steps)
    return out


def side_by_side_sgd(kernel, bias, lr, batches, steps: int):
    """``steps`` SGD steps of ``m`` logistic-regression members on the same batches, written
    by hand with the members' kernels side by side (``kernel [d, m, classes]``, ``bias [m,
    classes]``, ``lr [m]``): one matmul each way per step, no transposes, no mask, metrics or
    keys; the mean cross-entropy over each batch, as ``local_train`` on full batches."""
    classes = kernel.shape[-1]

    def body(i, carry):
        kernel, bias = carry
        x, y = batches["x"][i], batches["y"][i]
        probs = jax.nn.softmax(jnp.einsum("bd,dmc->bmc", x, kernel) + bias, axis=-1)
        g = (probs - jax.nn.one_hot(y, classes)[:, None, :]) / x.shape[0]
        kernel = kernel - lr[None, :, None] * jnp.einsum("bd,bmc->dmc", x, g)
        return kernel, bias - lr[:, None] * g.sum(axis=0)

    return jax.lax.fori_loop(0, steps, body, (kernel, bias))


def two_nn_leaves(params) -> list[np.ndarray]:
    """The 2NN's ``[kernel, bias]`` of each of its three layers, in order, on the host (as
    ``numpy_fedavg_2nn`` takes and returns them)."""
    layers = [params[f"Dense_{i}"] for i in range(3)]
    return [np.asarray(layer[k]) for layer in layers for k in ("kernel", "bias")]


def bench_two_nn(rounds: int, devices: int) -> dict:
    """The 2NN round through the public API (``fs.fedavg``, the ``auto`` strategy, the
    cohort split over ``devices``) against ``numpy_fedavg_2nn`` in a one-thread child process,
    both on the same packed batches from the same params; medians of ``rounds`` rounds after
    one warmup round, and the largest parameter difference after them. Our rounds read the
    cohort from the devices (placed there once); the same rounds with the host cohort sent
    every round are timed too, interleaved with them."""
    import optax

    cfg = TWO_NN
    rng = np.random.default_rng(0)
    shape = (cfg["clients"], cfg["examples"])
    ds = fs.FederatedDataset(
        {
            f"c{c}": {"x": x, "y": y}
            for c, (x, y) in enumerate(
                zip(
                    rng.random((*shape, 28, 28, 1), dtype=np.float32),
                    rng.integers(0, 10, shape, dtype=np.int32),
                    strict=True,
                )
            )
        }
    )
    model = fs.get_model("mlp", num_classes=10, input_shape=(28, 28, 1))
    mesh = fs.client_mesh(devices) if devices > 1 else None
    algo = fs.fedavg(
        model, optax.sgd(cfg["learning_rate"]), executor=fs.Executor("auto", mesh=mesh)
    )
    init = model.init(jax.random.key(0))
    cohort = fs.pack_cohort(
        ds, range(cfg["clients"]), batch_size=cfg["batch_size"], seed=0, round_num=0
    )
    flat = two_nn_leaves(init)  # on the host: the rounds donate init
    apply = jax.jit(algo.apply, donate_argnums=0)
    key = jax.random.key(1)
    # NumPy's rounds read the packed batches from memory; ours from the devices, where the
    # cohort is placed once, split over them (as scripts/bench.py times rounds). The same
    # rounds with the host cohort sent every round are timed too (``..._from_host_s``).
    split = None if mesh is None else NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))
    on_devices = jax.device_put(cohort, split)
    times: dict[str, list[float]] = {"devices": [], "host": []}
    state, ours = algo.init(init), None
    # Interleaved; each kind's first round is left out (with a mesh, each compiles then).
    for r in range(2 * (rounds + 1)):
        where = "devices" if r % 2 == 0 else "host"
        t0 = time.perf_counter()
        state, _ = apply(state, on_devices if where == "devices" else cohort, key)
        jax.block_until_ready(state)
        times[where].append(time.perf_counter() - t0)
        if ours is None:  # compared with NumPy's first round (later ones amplify rounding)
            ours = two_nn_leaves(state.params)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        b = cohort.batches
        np.savez(
            inputs,
            x=np.asarray(b["x"]).reshape(b["x"].shape[:3] + (-1,)),
            y=np.asarray(b["y"]),
            mask=np.asarray(cohort.mask),
            **{f"p{i}": a for i, a in enumerate(flat)},
        )
        code = (
            "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import bench_sweep as b; "
            "d = np.load(sys.argv[2]); ps = [d[f'p{i}'] for i in range(6)]; "
            "_, t, first = b.numpy_fedavg_2nn(ps, d['x'], d['y'], d['mask'], "
            "float(sys.argv[4]), int(sys.argv[5])); np.savez(sys.argv[3], times=np.array(t), "
            "**{f'p{i}': a for i, a in enumerate(first)})"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(inputs), str(outputs),
             str(cfg["learning_rate"]), str(rounds + 1)],
            check=True, env={**os.environ, **ONE_THREAD},
        )  # fmt: skip
        ref = np.load(outputs)
        ref_params = [ref[f"p{i}"] for i in range(6)]
        ref_times = ref["times"][1:].tolist()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, ref_params, strict=True))
    sim_s, numpy_s = float(np.median(times["devices"][1:])), float(np.median(ref_times))
    host_s = float(np.median(times["host"][1:]))
    return {
        "workload": "2NN 784-200-200-10, 10 clients x 600 examples, batch 10, lr 0.215",
        "fedjax_sim_s": round(sim_s, 4),
        "fedjax_sim_from_host_s": round(host_s, 4),
        "fedjax_sim_compile_s": round(times["devices"][0], 2),
        "numpy_s": round(numpy_s, 4),
        "numpy_blas_threads": 1,
        "ratio": round(numpy_s / sim_s, 2),
        "ratio_from_host": round(numpy_s / host_s, 2),
        "max_param_diff_round_1": diff,
        "strategy": fs.resolve_strategy("auto"),
        "devices": 1 if mesh is None else mesh.size,
        "rounds": rounds,
    }


def base_config(rounds: int):
    config = fs.load_config(None)
    config.num_rounds = rounds
    config.eval_every = max(1, rounds // 4)
    config.checkpoint_every = 0
    config.num_devices = 1
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=None, help="default: the config's (20)")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--min-ratio", type=float, default=0.0)
    p.add_argument("--two-nn-rounds", type=int, default=10,
                   help="timed rounds of the 2NN against NumPy FedAvg (0: skip it)")  # fmt: skip
    p.add_argument("--min-2nn-ratio", type=float, default=0.0)
    p.add_argument("--skip-sweep", action="store_true", help="only the 2NN comparison")
    p.add_argument("--step-costs", action="store_true",
                   help="also time one local step alone and vmapped over members")  # fmt: skip
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    p.add_argument("--axis", choices=("seed", "data_seed"), default="seed",
                   help="the second axis beside the client learning rate")  # fmt: skip
    p.add_argument("--devices", type=int, default=0,
                   help="devices for both sides (0: one virtual CPU device per core, as the "
                        "CLI; every device on accelerators)")  # fmt: skip
    args = p.parse_args(argv)

    from fedjax_sim.cli import _set_cpu_devices

    _set_cpu_devices(args.devices)  # on CPU, before JAX starts (no-op on accelerators)
    # Both sides by the same fixed rule: a measured "auto" would time the solo runs' candidate
    # strategies once (fedjax_sim/driver/autotune.py), which the sweep does not do.
    os.environ.setdefault("FEDJAX_SIM_AUTO", "rule")
    result, ok = {}, True
    if not args.skip_sweep:
        result = bench_members(args)
        ok = result["max_param_diff"] <= args.tolerance and result["ratio"] >= args.min_ratio
    if args.two_nn_rounds > 0:
        devices = args.devices or len(jax.devices())
        two_nn = result["two_nn"] = bench_two_nn(args.two_nn_rounds, devices)
        print(
            f"2NN round: fedjax_sim {two_nn['fedjax_sim_s'] * 1e3:.1f} ms (the cohort sent "
            f"from the host every round: {two_nn['fedjax_sim_from_host_s'] * 1e3:.1f} ms, "
            f"{two_nn['ratio_from_host']:.2f}x), NumPy FedAvg (one "
            f"thread) {two_nn['numpy_s'] * 1e3:.1f} ms, ratio {two_nn['ratio']:.2f}x (max param "
            f"diff after round 1 {two_nn['max_param_diff_round_1']:.1e}; {two_nn['devices']} "
            "device(s), "
            f"{two_nn['strategy']})"
        )
        ok = ok and two_nn["ratio"] >= args.min_2nn_ratio
        ok = ok and two_nn["max_param_diff_round_1"] < 1e-4
    if args.step_costs:
        costs = result["step_us"] = member_step_costs()
        print("microseconds per local step: " + ", ".join(f"{k} {v}" for k, v in costs.items()))
    result["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


def bench_members(args) -> dict:
    """The vectorized sweep against its members run one after another."""
    base = base_config(args.rounds)
    base.num_devices = args.devices  # 0: every local device
    if args.local_epochs:
        base.client.local_epochs = args.local_epochs
    datasets = {
        s: fs.data.get_federated_data(base.dataset.name, seed=s, **base.dataset.kwargs.to_dict())
        for s in (SEEDS if args.axis == "data_seed" else [base.seed])
    }
    axes = {"client.learning_rate": LEARNING_RATES, args.axis: SEEDS}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fd = datasets[base.seed] if args.axis == "seed" else None  # else: the sweep builds them
        out = sweep.run_sweep(base, axes, Path(tmp) / "sweep", federated_data=fd)
        t_sweep = time.perf_counter() - t0

        solos = []
        t0 = time.perf_counter()
        for m in out["members"]:
            config = sweep.member_configs(base, {k: [v] for k, v in m["values"].items()})[0][2]
            fd = datasets[fs.simulation.data_seed_of(config)]
            solos.append(
                fs.simulate(
                    config, Path(tmp) / ("solo_" + m["label"]), federated_data=fd, progress=False
                )
            )
        t_seq = time.perf_counter() - t0

    worst = 0.0
    for m, solo in zip(out["members"], solos, strict=True):
        for a, b in zip(jax.tree.leaves(solo["params"]), jax.tree.leaves(m["params"]), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            worst = max(worst, float(np.max(np.abs(a - b) / (1 + np.abs(a)))))
    ratio = t_seq / t_sweep
    result = {
        "members": len(out["members"]),
        "axes": list(axes),
        "rounds": args.rounds,
        "local_epochs": base.client.local_epochs,
        "backend": jax.default_backend(),
        "devices": out["members"][0]["summary"]["devices"],
        "vectorized_s": round(t_sweep, 3),
        "sequential_s": round(t_seq, 3),
        "ratio": round(ratio, 2),
        "max_param_diff": worst,
    }
    print(
        f"{result['members']} members x {args.rounds} rounds: vectorized {t_sweep:.2f} s, "
        f"one after another {t_seq:.2f} s, ratio {ratio:.2f}x (max param diff {worst:.2e})"
    )
    return result


if __name__ == "__main__":
    sys.exit(main())

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

Exit status 1 when a member differs from its solo run (or, with ``--min-ratio``, when the
ratio is below it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import fedjax_sim as fs
from fedjax_sim import sweep

LEARNING_RATES = [0.001, 0.003, 0.01, 0.03]
SEEDS = [0, 1, 2, 3]


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
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    p.add_argument("--axis", choices=("seed", "data_seed"), default="seed",
                   help="the second axis beside the client learning rate")  # fmt: skip
    p.add_argument("--devices", type=int, default=0,
                   help="devices for both sides (0: one virtual CPU device per core, as the "
                        "CLI; every device on accelerators)")  # fmt: skip
    args = p.parse_args(argv)

    from fedjax_sim.cli import _set_cpu_devices

    _set_cpu_devices(args.devices)  # on CPU, before JAX starts (no-op on accelerators)
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
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ok = worst <= args.tolerance and ratio >= args.min_ratio
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

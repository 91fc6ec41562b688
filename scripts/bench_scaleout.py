#!/usr/bin/env python
"""Rounds per second against the run's layout: processes x CPU devices per process.

Each layout runs the same command, ``fedjax-sim run --config population`` (1,000 of 10**5
clients generated on demand per round, logistic regression, FedAvg) shortened to ``--rounds``,
as that many processes on this machine joined by ``jax.distributed`` (``--coordinator
localhost:PORT``), each with its own virtual CPU devices; one process is a plain run. Seconds
per round are the median of the training time between evaluations (``train_s`` differences:
sampling, generating and packing the process's share of the cohort, and the compiled round; no
evaluation), after the first round; every layout must end with the first layout's training loss
within 1e-5 relative (the collectives may sum in another order).

    python scripts/bench_scaleout.py                      # layouts 1x1 1x2 2x1 1x4 2x2 4x1
    python scripts/bench_scaleout.py --layouts 1x2,2x1 --rounds 6 --out scaleout.json
    python scripts/bench_scaleout.py --set model.name=mlp --set dataset.kwargs.dim=200  # compute

Exit status 1 when a layout's results differ from the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_layout(processes: int, devices: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedjax_sim.cli", "run", "--workdir", tmp, "--no-progress"]
        cmd += ["--config", "population", f"--config.num_rounds={args.rounds}"]
        cmd += ["--config.eval_every=1", "--config.checkpoint_every=0"]
        cmd += [f"--config.dataset.kwargs.num_clients={args.population}"]
        cmd += [f"--config.cpu_devices={devices}", f"--config.strategy={args.strategy}"]
        cmd += [f"--config.{field}" for field in args.set]
        if processes > 1:
            cmd += ["--coordinator", f"localhost:{free_port()}"]
            cmd += ["--num-processes", str(processes)]
        procs = [
            subprocess.Popen(
                cmd + (["--process-id", str(i)] if processes > 1 else []),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(processes)
        ]
        errs = [p.communicate(timeout=1200)[1] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"layout {processes}x{devices} failed:\n{errs[0][-2000:]}")
        history = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    train = [r["train_s"] for r in history]
    per_round = statistics.median(b - a for a, b in zip(train, train[1:], strict=False))
    return {
        "layout": f"{processes}x{devices}",
        "processes": processes,
        "devices_per_process": devices,
        "s_per_round": per_round,
        "rounds_per_s": 1 / per_round,
        "final_test_accuracy": history[-1]["test_accuracy"],
        "final_train_loss": history[-1]["train_loss"],
        "load_average": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="1x1,1x2,2x1,1x4,2x2,4x1")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--population", type=int, default=100_000)
    parser.add_argument("--strategy", default="sequential")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a config override for every layout, e.g. --set model.name=mlp (repeatable)",
    )
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    layouts = [tuple(int(x) for x in lay.split("x")) for lay in args.layouts.split(",")]
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} cores")
    head = ("layout", "devices", "s/round", "rounds/s", "vs first", "train loss")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (7, 7, 8, 8, 8, 11), strict=True)))
    rows, ok = [], True
    for processes, devices in layouts:
        row = run_layout(processes, devices, args)
        first = rows[0] if rows else row
        row["speedup"] = first["s_per_round"] / row["s_per_round"]
        row["same_results"] = abs(row["final_train_loss"] - first["final_train_loss"]) <= 1e-5 * (
            abs(first["final_train_loss"]) + 1e-6
        )
        ok &= row["same_results"]
        rows.append(row)
        print(
            f"{row['layout']:>7} {processes * devices:>7} {row['s_per_round']:>8.3f} "
            f"{row['rounds_per_s']:>8.2f} {row['speedup']:>7.2f}x {row['final_train_loss']:>11.7f}"
            + ("" if row["same_results"] else "  DIFFERS"),
            flush=True,
        )
    print(f"load average at end: {os.getloadavg()}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "time": time.time()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

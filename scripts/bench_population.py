#!/usr/bin/env python
"""Memory and time per round against the population's size: 10**4, 10**5, 10**6 clients.

Each run is ``configs/population.py`` (a synthetic population generated on demand, logistic
regression, 1,000 clients per round, one local epoch) through ``fs.simulate``, in a fresh
child process so its peak RSS (``ru_maxrss``) is its own, for FedAvg and for SCAFFOLD (whose
control variates are kept on the host for the clients sampled so far). Seconds per round are
the medians of the training time between evaluations (``train_s`` differences: packing,
generating the cohort's clients and the compiled round, no evaluation), after the first round
(compilation); each run is repeated ``--repeats`` times, interleaved over the sizes (the
machine's load drifts), and a size's row has its median seconds per round and its largest peak
RSS. The check: for each algorithm, peak RSS and seconds per round within ``--tolerance``
(10%) of the smallest population's.

    python scripts/bench_population.py                     # 3 sizes x 2 algorithms x 3, ~5 min
    python scripts/bench_population.py --sizes 10000,1000000 --repeats 1 --out pop.json

Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(size: int, algorithm: str, rounds: int, cohort: int, workdir: str) -> dict:
    """One run in this process: peak RSS and seconds per round."""
    from fedjax_sim.configs import population

    import fedjax_sim as fs

    config = population.get_config("scaffold" if algorithm == "scaffold" else None)
    config.dataset.kwargs.num_clients = size
    config.clients_per_round = cohort
    config.num_rounds, config.eval_every, config.checkpoint_every = rounds, 1, 0
    config.strategy = "sequential"  # the same program at every size (no measured choice)
    summary = fs.simulate(config, workdir, progress=False)
    train = [r["train_s"] for r in summary["history"]]
    per_round = [b - a for a, b in zip(train, train[1:], strict=False)]
    return {
        "size": size,
        "algorithm": algorithm,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "s_per_round": statistics.median(per_round),
        "rounds": rounds,
        "clients_per_round": cohort,
        "client_states": summary["client_states"],
        "final_test_accuracy": summary["final_test_accuracy"],
    }


def run_child(size: int, algorithm: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, __file__, "--child", str(size), "--algorithm", algorithm,
            "--rounds", str(args.rounds), "--cohort", str(args.cohort), "--workdir", tmp,
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"the run of {size} clients ({algorithm}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--algorithms", default="fedavg,scaffold")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        row = child(args.child, args.algorithm, args.rounds, args.cohort, args.workdir)
        print(json.dumps(row))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.rounds < 3 or min(sizes) < args.cohort:
        raise SystemExit("need --rounds >= 3 and every size >= --cohort.")
    rows, ok = [], True
    print(f"load average at start: {os.getloadavg()}")
    print(f"{'algorithm':9} {'population':>11} {'peak RSS MiB':>13} {'s/round':>8} "
          f"{'RSS ratio':>9} {'time ratio':>10} {'states':>6} {'test acc':>8}")  # fmt: skip
    for algorithm in args.algorithms.split(","):
        # Repetitions interleaved over the sizes (the machine's load drifts): per size the
        # median seconds per round and the largest peak RSS.
        runs = {size: [] for size in sizes}
        for _ in range(args.repeats):
            for size in sizes:
                runs[size].append(run_child(size, algorithm, args))
        base = None
        for size in sizes:
            row = dict(runs[size][0])
            row["s_per_round"] = statistics.median(r["s_per_round"] for r in runs[size])
            row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs[size])
            row["repeats"] = args.repeats
            base = base or row
            row["rss_ratio"] = row["peak_rss_mib"] / base["peak_rss_mib"]
            row["time_ratio"] = row["s_per_round"] / base["s_per_round"]
            row["load_average"] = os.getloadavg()[0]
            row["within"] = all(
                abs(row[k] - 1) <= args.tolerance for k in ("rss_ratio", "time_ratio")
            )
            ok &= row["within"]
            rows.append(row)
            print(
                f"{algorithm:9} {size:>11_} {row['peak_rss_mib']:>13.1f} "
                f"{row['s_per_round']:>8.3f} {row['rss_ratio']:>9.3f} {row['time_ratio']:>10.3f} "
                f"{row['client_states']:>6} {row['final_test_accuracy']:>8.3f}",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()}")
    print(f"{'PASS' if ok else 'FAIL'}: memory and time per round within "
          f"{args.tolerance:.0%} of the smallest population's")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "time": time.time()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

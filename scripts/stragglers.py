"""FedProx's systems-heterogeneity result (Li et al. 2020, Figure 1): on Synthetic(1, 1) with
90% stragglers, FedProx (mu = 1, stragglers' partial work kept) against FedAvg (stragglers
dropped), final test accuracy over seeds.

    python scripts/stragglers.py --seeds 0 1 2 --out /tmp/stragglers

The paper's setting is ``configs/default.py`` (30 devices, 10 per round, 20 local epochs of
batch 10, client SGD at 0.01, 200 rounds); stragglers run U{1..K} of their K local steps
(FedProx's code: a uniform number of iterations). Prints a Markdown table (docs/features.md,
"Systems heterogeneity") and writes ``OUT/stragglers.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import fedjax_sim as fs

METHODS = {
    "FedAvg (stragglers dropped)": {"straggler_mode": "drop", "proximal_mu": 0.0},
    "FedProx mu=0 (partial work kept)": {"straggler_mode": "partial", "proximal_mu": 0.0},
    "FedProx mu=1 (partial work kept)": {"straggler_mode": "partial", "proximal_mu": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", default="/tmp/stragglers")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for name, m in METHODS.items():
        accs = []
        for seed in args.seeds:
            config = fs.load_config("default")
            config.seed, config.num_rounds = seed, args.rounds
            config.checkpoint_every = 0
            config.systems.straggler_fraction = args.fraction
            config.systems.straggler_mode = m["straggler_mode"]
            config.client.proximal_mu = m["proximal_mu"]
            t = time.perf_counter()
            workdir = out / f"{name.split()[0]}_mu{m['proximal_mu']}_{m['straggler_mode']}_{seed}"
            summary = fs.simulate(config, workdir, progress=False, overwrite=True)
            accs.append(summary["final_test_accuracy"])
            print(f"{name} seed {seed}: {accs[-1]:.4f} ({time.perf_counter() - t:.1f} s)")
        results[name] = accs
    (out / "stragglers.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\n| Synthetic(1,1), {args.fraction:.0%} stragglers, {args.rounds} rounds | final "
        f"test accuracy (mean ± std over seeds {args.seeds}) |"
    )
    print("|---|---:|")
    for name, accs in results.items():
        print(f"| {name} | {np.mean(accs):.4f} ± {np.std(accs):.4f} |")


if __name__ == "__main__":
    main()

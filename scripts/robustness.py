"""Robust aggregation under attack: final test accuracy on MNIST (2NN, IID over 100 clients)
for each aggregator under each attack with a fraction of malicious clients, mean over seeds.

    python scripts/robustness.py --seeds 0 1 2 --out /tmp/robustness

Malicious clients are a fixed 20% of the population (``attack.fraction``; drawn once from the
seed, ``aggregators.attacks.malicious_clients``); 10 clients a round, so Krum and Multi-Krum
assume ``num_byzantine = 2`` and the trimmed mean trims 20% from each end. The attacks: none,
label flipping (data poisoning, y -> 9 - y), sign flipping, scaling (x10), Gaussian
(std 1), ALIE (Baruch et al. 2019, its z_max) and IPM (Xie et al. 2020, epsilon 0.5). Prints a
Markdown table (docs/features.md, "Privacy, security, communication") and writes
``OUT/robustness.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ml_collections
import numpy as np

import fedjax_sim as fs

AGGREGATORS = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"trim_fraction": 0.2},
    "krum": {"num_byzantine": 2},
    "multi_krum": {"num_byzantine": 2, "num_selected": 5},
    "geometric_median": {},
    "norm_bounding": {"max_norm": 1.0},
    "centered_clipping": {"clip_radius": 1.0},
}
ATTACKS = {
    "none": {},
    "label_flip": {},
    "sign_flip": {},
    "scaling": {"factor": 10.0},
    "gaussian": {"std": 1.0},
    "alie": {},
    "ipm": {"epsilon": 0.5},
}


def config_for(aggregator: str, attack: str, seed: int, args) -> ml_collections.ConfigDict:
    config = fs.load_config("configs/mnist_2nn_iid.py")
    config.seed, config.num_rounds, config.eval_every = seed, args.rounds, args.rounds
    config.data_seed = 0  # one partition for every seed (MNIST is loaded once)
    config.checkpoint_every = 0
    config.client.max_local_steps = args.local_steps
    config.aggregator = aggregator
    config.aggregator_kwargs = ml_collections.ConfigDict(AGGREGATORS[aggregator])
    if attack != "none":
        config.attack.name = attack
        config.attack.fraction = args.fraction
        config.attack.kwargs = ml_collections.ConfigDict(ATTACKS[attack])
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local_steps", type=int, default=20, help="client.max_local_steps")
    parser.add_argument("--aggregators", default=",".join(AGGREGATORS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--out", default="/tmp/robustness")
    args = parser.parse_args()
    out = Path(args.out)
    aggs, attacks = args.aggregators.split(","), args.attacks.split(",")
    data = None
    results: dict[str, dict[str, list[float]]] = {}
    for agg in aggs:
        for attack in attacks:
            accs = []
            for seed in args.seeds:
                config = config_for(agg, attack, seed, args)
                if data is None:  # MNIST loads once; every run partitions it alike (data seed)
                    data = fs.data.get_federated_data(
                        config.dataset.name,
                        seed=fs.simulation.data_seed_of(config),
                        **fs.simulation.kwargs_of(config.dataset.kwargs),
                    )
                t = time.perf_counter()
                summary = fs.simulate(
                    config,
                    out / f"{agg}_{attack}_{seed}",
                    federated_data=data,
                    progress=False,
                    overwrite=True,
                )
                accs.append(summary["final_test_accuracy"])
                took = time.perf_counter() - t
                print(f"{agg} / {attack} seed {seed}: {accs[-1]:.4f} ({took:.1f} s)")
            results.setdefault(agg, {})[attack] = accs
            (out / "robustness.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\nMNIST 2NN, {args.fraction:.0%} malicious, {args.rounds} rounds, final test accuracy "
        f"(mean over seeds {args.seeds})\n"
    )
    print("| aggregator | " + " | ".join(attacks) + " |")
    print("|---|" + "---:|" * len(attacks))
    for agg in aggs:
        cells = [f"{np.mean(results[agg][a]):.3f}" for a in attacks]
        print(f"| {agg} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Published baselines, reproduced: each paper's setting, its number, ours, the command.

    python scripts/baselines.py --list
    python scripts/baselines.py --run mcmahan17_2nn_iid --out /tmp/baselines
    python scripts/baselines.py --run mcmahan17_2nn_iid --quick --out /tmp/baselines
    python scripts/baselines.py --table /tmp/baselines > BASELINES.md

A baseline is one or more arms (FedAvg against FedProx, say), each a config with overrides.
Every arm runs its learning-rate grid and its seeds as one vectorized sweep
(``fs.run_sweep``: the grid members train in one compiled program), then its metric is taken
from each member's evaluations: ``rounds_to`` (the first evaluated round whose test accuracy
reaches the target; the paper's "rounds to reach X%") or ``final`` (final test accuracy, with
epsilon for a DP run). As in the papers, the reported grid value is the one with the best
metric averaged over seeds; every member's number is kept in ``OUT/NAME.json``.

``--quick`` runs a CPU-sized version (fewer rounds, a smaller grid, sometimes a smaller
model: each baseline says what it changes); its rows are labeled "CPU-sized" and are not the
paper's setting. A baseline that does not match the paper is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LR_GRID = [0.0215, 0.0464, 0.1, 0.215, 0.464]  # a multiplicative grid in 10^(1/3) steps


@dataclass(frozen=True)
class Baseline:
    """One published number and how we reproduce it.

    Attributes:
      name: ``--run`` name.
      paper: the citation and where the number is (table, figure).
      setting: the paper's setting in words.
      paper_value: the paper's number(s), as the paper gives them.
      arms: arm name -> (config spec, {dotted field: value} overrides).
      metric: ``rounds_to`` (needs ``target``) or ``final``.
      grid: sweep axes besides the seed (e.g. the client learning rate).
      seeds: the seeds each arm runs.
      quick: overrides applied to every arm by ``--quick`` (with ``quick_grid``, ``quick_seeds``).
      quick_note: what ``--quick`` changes, for the table.
      notes: where our setting differs from the paper's.
      pending: why the full version has not been run here (``None``: it can run on this CPU).
    """

    name: str
    paper: str
    setting: str
    paper_value: str
    arms: dict[str, tuple[str, dict[str, Any]]]
    metric: str = "rounds_to"
    target: float | None = None
    grid: dict[str, list] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    quick: dict[str, Any] = field(default_factory=dict)
    quick_grid: dict[str, list] | None = None
    quick_seeds: tuple[int, ...] | None = None
    quick_note: str = ""
    notes: str = ""
    pending: str | None = None


def _mcmahan(
    name, model, partition, epochs, target, paper_value, rounds, quick, quick_note, pending=None
):
    config = f"configs/mnist_{model}_{partition}.py"
    return Baseline(
        name=name,
        paper="McMahan et al. 2017, Table 2",
        setting=(
            f"MNIST {model.upper()}, {'IID' if partition == 'iid' else 'pathological non-IID'}"
            f", 100 clients, C = 0.1, E = {epochs}, B = 10; rounds to {target:.0%}"
        ),
        paper_value=paper_value,
        arms={
            "FedAvg": (
                config,
                {"num_rounds": rounds, "eval_every": 1, "client.local_epochs": epochs},
            )
        },
        target=target,
        grid={"client.learning_rate": LR_GRID},
        quick=quick,
        quick_grid={"client.learning_rate": [0.1]},
        quick_note=quick_note,
        notes="learning rate: the best of the grid " + ", ".join(map(str, LR_GRID)),
        pending=pending,
    )


def _synthetic_arm(alpha, beta, iid, fraction, mode, mu):
    return (
        "default",
        {
            "dataset.kwargs.alpha": alpha,
            "dataset.kwargs.beta": beta,
            "dataset.kwargs.iid": iid,
            "systems.straggler_fraction": fraction,
            "systems.straggler_mode": mode,
            "client.proximal_mu": mu,
            "checkpoint_every": 0,
        },
    )


def _fedprox(name, alpha, beta, iid, label):
    arms = {}
    for fraction in (0.0, 0.5, 0.9):
        arms[f"FedAvg, {fraction:.0%} stragglers (dropped)"] = _synthetic_arm(
            alpha, beta, iid, fraction, "drop", 0.0
        )
        arms[f"FedProx mu=1, {fraction:.0%} stragglers (partial work)"] = _synthetic_arm(
            alpha, beta, iid, fraction, "partial", 1.0
        )
    return Baseline(
        name=name,
        paper="Li et al. 2020 (FedProx), Figure 1",
        setting=(
            f"{label}: 30 devices, 10 a round, 20 local epochs of batch 10, client SGD 0.01, "
            "200 rounds; stragglers run U{1..K} of their K steps"
        ),
        paper_value=(
            "curves only (no table): FedProx mu=1 above FedAvg, the gap growing with the "
            "straggler fraction; at 90% stragglers on Synthetic(1,1) FedAvg diverges"
        ),
        arms=arms,
        metric="final",
        seeds=(0, 1, 2),
        quick={"num_rounds": 50, "eval_every": 10},
        quick_seeds=(0,),
        quick_note="50 rounds, seed 0",
        notes="FedProx's synthetic generator re-implemented (fedjax_sim.data.synthetic)",
    )


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in [
        _mcmahan(
            "mcmahan17_2nn_iid",
            "2nn",
            "iid",
            1,
            0.97,
            "87 rounds",
            300,
            {"num_rounds": 150},
            "150 rounds, lr 0.1 only",
        ),
        _mcmahan(
            "mcmahan17_2nn_noniid",
            "2nn",
            "pathological",
            1,
            0.97,
            "664 rounds",
            1200,
            {"num_rounds": 200, "eval_every": 5},
            "200 rounds, lr 0.1 only, every 5th round",
            pending="the full grid (5 learning rates x 1,200 rounds) takes about 30 minutes here",
        ),
        _mcmahan(
            "mcmahan17_cnn_iid",
            "cnn",
            "iid",
            5,
            0.99,
            "20 rounds",
            60,
            {"num_rounds": 5, "client.local_epochs": 1},
            "5 rounds of E = 1, lr 0.1 only",
            pending="CNN gradients on this 2-core CPU: minutes a round at E = 5",
        ),
        _mcmahan(
            "mcmahan17_cnn_noniid",
            "cnn",
            "pathological",
            5,
            0.99,
            "229 rounds",
            500,
            {"num_rounds": 5, "client.local_epochs": 1},
            "5 rounds of E = 1, lr 0.1 only",
            pending="CNN gradients on this 2-core CPU: minutes a round at E = 5",
        ),
        _fedprox("fedprox_synthetic_1_1", 1.0, 1.0, False, "Synthetic(1,1)"),
        _fedprox("fedprox_synthetic_05_05", 0.5, 0.5, False, "Synthetic(0.5,0.5)"),
        _fedprox("fedprox_synthetic_0_0", 0.0, 0.0, False, "Synthetic(0,0)"),
        _fedprox("fedprox_synthetic_iid", 0.0, 0.0, True, "Synthetic-IID"),
        Baseline(
            name="fedprox_femnist",
            paper="Li et al. 2020 (FedProx), Figure 1 (FEMNIST)",
            setting=(
                "FEMNIST, FedAvg (stragglers dropped) vs FedProx mu=1 (partial work), 0% and "
                "90% stragglers, 10 clients a round, 1 local epoch of batch 10"
            ),
            paper_value="curves only: FedProx mu=1 above FedAvg, more so at 90% stragglers",
            arms={
                f"{alg}, {frac:.0%} stragglers": (
                    "configs/femnist_cnn.py",
                    {
                        "systems.straggler_fraction": frac,
                        "systems.straggler_mode": mode,
                        "client.proximal_mu": mu,
                        "checkpoint_every": 0,
                    },
                )
                for frac in (0.0, 0.9)
                for alg, mode, mu in (
                    ("FedAvg (dropped)", "drop", 0.0),
                    ("FedProx mu=1 (partial)", "partial", 1.0),
                )
            },
            metric="final",
            seeds=(0, 1, 2),
            quick={"num_rounds": 30, "eval_every": 10},
            quick_seeds=(0,),
            quick_note="30 rounds, seed 0",
            notes=(
                "the LEAF FEMNIST sample here has 105 writers (the paper: 200 devices of "
                "FEMNIST's 10 lower-case letters), LEAF's CNN, client lr 0.06"
            ),
            pending="4 arms x 3 seeds x 200 CNN rounds: several hours on this CPU",
        ),
        Baseline(
            name="leaf_shakespeare",
            paper="McMahan et al. 2017 (Shakespeare LSTM) / Caldas et al. 2018 (LEAF)",
            setting=(
                "LEAF Shakespeare by speaking role, next character, 2x256 LSTM, FedAvg 10 "
                "clients a round, 1 local epoch of batch 10 (50 steps at most), client lr 0.8"
            ),
            paper_value="LEAF: accuracy curves near 0.5; McMahan et al.: rounds to 54%",
            arms={"FedAvg": ("configs/shakespeare_lstm.py", {"checkpoint_every": 0})},
            metric="final",
            quick={"num_rounds": 20, "eval_every": 10, "client.max_local_steps": 10},
            quick_note="20 rounds of at most 10 local steps",
            notes=(
                "roles built from the play text in ../shared/data/shakespeare with LEAF's "
                "rules; test on a fixed sample of 100 roles (eval_max_clients)"
            ),
            pending="200 LSTM rounds: about an hour on this CPU",
        ),
        Baseline(
            name="hsu19_cifar10",
            paper="Hsu et al. 2019, Figure 3 (CIFAR-10, Dirichlet label skew)",
            setting=(
                "CIFAR-10 (the JPEG copy), 100 clients, Dirichlet alpha in {100, 1, 0.1}, "
                "FedAvg vs FedAvgM (server momentum 0.9), ResNet-18-GN"
            ),
            paper_value="curves: FedAvgM above FedAvg, more so at small alpha",
            arms={
                f"{name}, alpha {alpha}": (
                    "configs/cifar10_dirichlet.py",
                    {
                        "dataset.kwargs.partition_kwargs.alpha": alpha,
                        "algorithm": alg,
                        "checkpoint_every": 0,
                    },
                )
                for alpha in (100.0, 1.0, 0.1)
                for name, alg in (("FedAvg", "fedavg"), ("FedAvgM", "fedavgm"))
            },
            metric="final",
            quick={
                "num_rounds": 10,
                "eval_every": 5,
                "model.name": "cnn_mcmahan",
                "model.kwargs": {},
                "client.max_local_steps": 10,
            },
            quick_note="10 rounds of at most 10 steps, McMahan's CNN instead of ResNet-18-GN",
            notes="the JPEG copy of CIFAR-10 (JPEG artefacts), not the original arrays",
            pending="ResNet-18-GN for 500 rounds needs a GPU (none lent to this session)",
        ),
        Baseline(
            name="reddi21_femnist",
            paper="Reddi et al. 2021, Table 2 (EMNIST CNN)",
            setting=(
                "FEMNIST CNN, FedAvg / FedAvgM / FedAdagrad / FedAdam / FedYogi, server "
                "learning rate from a grid, client lr 0.06"
            ),
            paper_value="federated EMNIST (3,400 writers): not this 105-writer sample",
            arms={
                name: ("configs/femnist_cnn.py", {"algorithm": alg, "checkpoint_every": 0})
                for name, alg in (
                    ("FedAvg", "fedavg"),
                    ("FedAvgM", "fedavgm"),
                    ("FedAdagrad", "fedadagrad"),
                    ("FedAdam", "fedadam"),
                    ("FedYogi", "fedyogi"),
                )
            },
            metric="final",
            grid={"server.learning_rate": [0.01, 0.0316, 0.1, 0.316, 1.0]},
            quick={"num_rounds": 30, "eval_every": 10},
            quick_grid={"server.learning_rate": [0.0316, 0.316]},
            quick_note="30 rounds, server lr in {0.0316, 0.316}",
            notes="Reddi's grids are wider (client and server lr, tau); here the server lr only",
            pending="5 optimizers x 5 server rates x 200 CNN rounds: hours on this CPU",
        ),
        Baseline(
            name="tff_dp_tutorial",
            paper="TFF tutorial 'Differential Privacy in TFF' (EMNIST, 3,383 clients)",
            setting=(
                "DP-FedAvg, z = 1.2, 120 clients a round, 100 rounds, delta = 1e-5, adaptive "
                "clipping (the tutorial's tff.learning.dp_aggregator)"
            ),
            paper_value="epsilon about 2 (RDP); the tutorial prints no accuracy to compare",
            arms={
                "DP-FedAvg": (
                    "configs/dp_fedavg.py",
                    {
                        "dataset.kwargs.num_clients": 3383,
                        "clients_per_round": 120,
                        "dp.noise_multiplier": 1.2,
                        "dp.adaptive": True,
                        "dp.clip_norm": 0.1,
                        "num_rounds": 100,
                    },
                )
            },
            metric="final",
            quick={"num_rounds": 20},
            quick_note="20 rounds",
            notes=(
                "MNIST split IID over 3,383 clients stands in for federated EMNIST (not "
                "here); our 2NN, not the tutorial's model; Poisson sampling at q = 120/3383"
            ),
        ),
    ]
}


def _set(config, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    node = config
    for p in path:
        node = node[p]
    node[leaf] = value


def arm_config(spec: str, overrides: dict[str, Any], quick: dict[str, Any]):
    import fedjax_sim as fs

    config = fs.load_config(spec)
    settings = {**overrides, **quick}
    if "algorithm" in settings:  # first, with its defaults, as --config.algorithm=NAME does
        fs.algorithms.switch_algorithm(config, settings.pop("algorithm"))
    for k, v in settings.items():
        _set(config, k, v)
    return config


def rounds_to(history: list[dict], target: float) -> int | None:
    """The first evaluated round whose test accuracy is at least ``target`` (None: never)."""
    for rec in history:
        acc = rec.get("test_accuracy")
        if acc is not None and acc >= target:
            return int(rec["round"])
    return None


def member_metric(b: Baseline, history: list[dict], summary: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"final_test_accuracy": summary.get("final_test_accuracy")}
    if b.metric == "rounds_to":
        out["rounds_to"] = rounds_to(history, b.target)
    if "epsilon" in summary:
        out["epsilon"] = summary["epsilon"]
    if summary.get("diverged"):
        out["diverged"] = True
    return out


def best_value(b: Baseline, members: list[dict]) -> dict[str, Any]:
    """The grid point with the best metric averaged over seeds (fewest rounds to the target,
    a member that never reaches it counted as infinitely many; else the highest final
    accuracy), with the per-seed numbers."""
    by_point: dict[str, list[dict]] = {}
    for m in members:
        point = json.dumps({k: v for k, v in m["values"].items() if k != "seed"}, sort_keys=True)
        by_point.setdefault(point, []).append(m)

    def score(ms):
        if b.metric == "rounds_to":
            r = [m["metric"]["rounds_to"] for m in ms]
            return float("inf") if None in r else float(np.mean(r))
        return -float(np.mean([m["metric"]["final_test_accuracy"] or 0.0 for m in ms]))

    point, ms = min(by_point.items(), key=lambda kv: score(kv[1]))
    accs = [m["metric"]["final_test_accuracy"] for m in ms]
    out = {
        "grid_point": json.loads(point),
        "seeds": [m["values"].get("seed") for m in ms],
        "final_test_accuracy": accs,
        "final_mean": float(np.mean(accs)),
        "final_std": float(np.std(accs)),
    }
    if b.metric == "rounds_to":
        out["rounds_to"] = [m["metric"]["rounds_to"] for m in ms]
    eps = [m["metric"].get("epsilon") for m in ms if m["metric"].get("epsilon") is not None]
    if eps:
        out["epsilon"] = float(np.mean(eps))
    return out


def hardware() -> str:
    import jax

    dev = jax.devices()[0]
    kind = dev.device_kind if dev.platform != "cpu" else platform.processor() or "cpu"
    return f"{dev.platform} ({kind}), {os.cpu_count()} cores, {len(jax.devices())} device(s)"


def run(b: Baseline, out: Path, *, quick: bool) -> dict[str, Any]:
    import fedjax_sim as fs

    grid = (b.quick_grid if quick and b.quick_grid is not None else b.grid) or {}
    seeds = list(b.quick_seeds if quick and b.quick_seeds is not None else b.seeds)
    tag = f"{b.name}{'_quick' if quick else ''}"
    result: dict[str, Any] = {"name": b.name, "quick": quick, "arms": {}, "hardware": hardware()}
    t0 = time.perf_counter()
    for i, (arm, (spec, overrides)) in enumerate(b.arms.items()):
        config = arm_config(spec, overrides, b.quick if quick else {})
        axes = {**grid, "seed": seeds}
        t = time.perf_counter()
        res = fs.run_sweep(config, axes, out / tag / f"arm{i}", overwrite=True)
        members = [
            {
                "label": m["label"],
                "values": m["values"],
                "metric": member_metric(b, m["history"], m["summary"]),
            }
            for m in res["members"]
        ]
        result["arms"][arm] = {
            "config": spec,
            "overrides": {**overrides, **(b.quick if quick else {})},
            "axes": axes,
            "members": members,
            "best": best_value(b, members),
            "wall_s": round(time.perf_counter() - t, 1),
        }
        print(f"{b.name} / {arm}: {result['arms'][arm]['best']}", flush=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["command"] = f"python scripts/baselines.py --run {b.name}" + (" --quick" * quick)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _ours(b: Baseline, best: dict[str, Any]) -> str:
    n = len(best["final_test_accuracy"])
    acc = (
        f"{best['final_mean']:.4f} ± {best['final_std']:.4f} (n={n})"
        if n > 1
        else f"{best['final_mean']:.4f}"
    )
    parts = []
    if b.metric == "rounds_to":
        r = best["rounds_to"]
        if None in r:
            parts.append(f"not reached ({sum(x is None for x in r)}/{len(r)} seeds)")
        else:
            parts.append(f"{np.mean(r):.0f} rounds" + (f" (seeds {r})" if len(r) > 1 else ""))
        parts.append(f"final acc {acc}")
    else:
        parts.append(f"final acc {acc}")
    if "epsilon" in best:
        parts.append(f"epsilon {best['epsilon']:.3f}")
    if best["grid_point"]:
        parts.append(", ".join(f"{k.split('.')[-1]} {v}" for k, v in best["grid_point"].items()))
    return "; ".join(parts)


def table(results_dir: Path) -> str:
    """BASELINES.md from the results in ``results_dir`` (rows without results: pending)."""
    lines = [
        "# Baselines",
        "",
        "Generated by `python scripts/baselines.py --table DIR` from the results of",
        '`python scripts/baselines.py --run NAME [--quick] --out DIR`. "CPU-sized" rows are',
        "`--quick` runs: not the paper's setting (what they change is said). A number that does",
        "not match the paper is reported as measured, never tuned after the fact.",
        "",
        "| baseline | paper | setting | paper's number | arm | ours | wall | hardware | command |",
        "|---|---|---|---|---|---|---:|---|---|",
    ]
    for b in BASELINES.values():
        found = False
        for quick in (False, True):
            path = results_dir / f"{b.name}{'_quick' if quick else ''}.json"
            if not path.exists():
                continue
            found = True
            res = json.loads(path.read_text())
            setting = b.setting + (f" — **CPU-sized**: {b.quick_note}" if quick else "")
            for arm, a in res["arms"].items():
                lines.append(
                    f"| {b.name} | {b.paper} | {setting} | {b.paper_value} | {arm} | "
                    f"{_ours(b, a['best'])} | {a['wall_s']:.0f} s | {res['hardware']} | "
                    f"`{res['command']}` |"
                )
        if not found:
            why = b.pending or "not run yet"
            lines.append(
                f"| {b.name} | {b.paper} | {b.setting} | {b.paper_value} | — | pending: {why} "
                f"| | | `python scripts/baselines.py --run {b.name}` |"
            )
    notes = [f"- **{b.name}**: {b.notes}" for b in BASELINES.values() if b.notes]
    return "\n".join(lines + ["", "Notes:", "", *notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="list the baselines")
    group.add_argument("--run", nargs="+", metavar="NAME", help="run these baselines")
    group.add_argument("--table", metavar="DIR", help="print BASELINES.md from results in DIR")
    parser.add_argument("--quick", action="store_true", help="the CPU-sized version")
    parser.add_argument("--out", default="/tmp/baselines", help="results directory")
    args = parser.parse_args(argv)
    if args.list:
        for b in BASELINES.values():
            flag = f"  [pending: {b.pending}]" if b.pending else ""
            print(f"{b.name:28s} {b.paper}: {b.setting}{flag}")
        return 0
    if args.table:
        print(table(Path(args.table)), end="")
        return 0
    unknown = [n for n in args.run if n not in BASELINES]
    if unknown:
        parser.error(f"unknown baseline(s) {unknown}; known: {', '.join(BASELINES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.run:
        run(BASELINES[name], out, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark of federated LoRA: a cohort's adapters trained over one frozen base, as the cohort
grows.

One FedAvg round (client SGD, server SGD 1.0) of a decoder-only transformer
(``fs.models.transformer``, about 10M parameters by default) whose only federated parameters are
rank-8 LoRA adapters (``fs.models.adapters_only``) on random token sequences, for cohorts of
10, 50 and 100 clients. Each strategy (``vmap``, ``chunked``, ``sequential``, ``auto``) runs the
round as one compiled program over one copy of the base. The reference, measured in the same
run, trains the clients one at a time as FlowerTune and FedML's FedLLM do: a Python loop over
the clients calling one jitted client update (the same local training) and a jitted weighted
add, then a jitted server step.

Reported per cohort and program: best round time, tokens/s, the ratio to the reference, MFU
against a float32 matmul peak measured in the same run (the round's FLOPs from XLA's cost
analysis), compile time, XLA's memory analysis of the program (arguments, temporaries, output),
and what the round would hold if every client had its own copy of the base. The load average
is recorded at the start and the end (this machine is shared).

    python scripts/bench_lora.py --out lora.json                    # ~10 min on 2 cores
    python scripts/bench_lora.py --out lora.json --quick            # a tiny model, seconds
    python scripts/bench_lora.py --out lora.json --cohorts 10,50 --strategies vmap,sequential

Every program takes the base as an argument (``core.frozen.jit``, as the driver compiles its
rounds), so XLA's memory analysis counts its one copy among the arguments; what grows with the
cohort is the clients' working memory (``temp``), activations for ``vmap``.

Checks (exit status 1 when one fails, unless ``--no-check``): every program's new adapters
match the reference's (``--tolerance``); every program's arguments are one base, the cohort's
data and a few copies of the adapters (no per-client base), within 10%; ``sequential``'s
working memory does not grow with the cohort.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim.core.client import local_train, tree_sub
from fedjax_sim.core.frozen import jit as frozen_jit
from fedjax_sim.core.keys import client_keys
from fedjax_sim.core.task import mean_loss_fn, next_token_task
from fedjax_sim.models import lora
from fedjax_sim.models.transformer import transformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import MIB, compiled_memory, cost_flops, measure_peak_flops, rel_err  # noqa: E402

from fedjax_sim.simulation import tree_bytes  # noqa: E402

STRATEGIES = ("vmap", "chunked", "sequential", "auto")
REFERENCE = "reference"  # one client at a time, a Python loop over jitted client updates
MODELS = {  # (num_layers, width, num_heads)
    "10m": (6, 384, 6),  # 6 x 12 x 384^2 = 10.6M in the blocks, 10.7M in all (vocab 80)
    "tiny": (1, 16, 2),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_model(args):
    """``(model, base)``: the adapters-only transformer and its frozen random base."""
    layers, width, heads = MODELS["tiny" if args.quick else args.model]
    kwargs = {
        "num_classes": args.vocab,
        "input_shape": (args.context,),
        "num_layers": layers,
        "width": width,
        "num_heads": heads,
    }
    base = transformer(**kwargs).init(jax.random.key(args.seed))
    adapted = transformer(**kwargs, lora_rank=args.rank, lora_targets=args.targets)
    return lora.adapters_only(adapted, base), base


def make_cohort(num_clients: int, args) -> fs.Cohort:
    rng = np.random.default_rng(args.seed)
    shape = (num_clients, args.steps, args.batch_size, args.context + 1)
    tokens = rng.integers(0, args.vocab, shape, dtype=np.int32)
    return fs.Cohort(
        batches={"x": tokens[..., :-1], "y": tokens[..., 1:]},
        mask=np.ones(shape[:3], bool),
        num_examples=np.full((num_clients,), float(args.steps * args.batch_size), np.float32),
        client_ids=np.arange(num_clients, dtype=np.int32),
    )


def strategy_program(strategy, task, adapters, cohort, key, args):
    """The round as the driver compiles it: the base an argument (``core.frozen.jit``)."""
    algo = fs.fedavg(task, optax.sgd(args.learning_rate), executor=fs.Executor(strategy, 10))
    state = algo.init(adapters)
    frozen = task.model.frozen
    t0 = time.perf_counter()
    compiled = frozen_jit(algo.apply, frozen).lower(state, cohort, key).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: compiled(frozen.value, state, cohort, key)[0].params), compiled, compile_s


def reference_program(task, adapters, cohort, key, args):
    """Clients one at a time: a jitted client update per client, a jitted weighted add, a
    jitted server step, in a Python loop (the batches sliced on the host beforehand)."""
    loss_fn = mean_loss_fn(task, train=True)
    opt = optax.sgd(args.learning_rate)

    def client_update(params, batches, mask, ckey):
        local = local_train(
            params, batches, mask, ckey, loss_fn=loss_fn, optimizer=opt,
            opt_state=opt.init(params), static_loop=True,
        )  # fmt: skip
        return tree_sub(params, local.params)

    client = frozen_jit(client_update, task.model.frozen)

    @jax.jit
    def accumulate(acc, delta, w):
        return jax.tree.map(lambda a, d: a + w * d, acc, delta)

    @jax.jit
    def server(params, acc, total):
        return jax.tree.map(lambda p, a: p - a / total, params, acc)

    keys = client_keys(key, jnp.asarray(cohort.client_ids))
    per_client = [
        (
            jax.device_put({k: v[i] for k, v in cohort.batches.items()}),
            jax.device_put(cohort.mask[i]),
        )
        for i in range(cohort.num_clients)
    ]
    weights = [np.float32(w) for w in cohort.num_examples]
    zeros = jax.tree.map(jnp.zeros_like, adapters)

    def round_():
        acc = zeros
        for (batches, mask), w, ckey in zip(per_client, weights, keys, strict=True):
            acc = accumulate(acc, client(adapters, batches, mask, ckey), w)
        return server(adapters, acc, np.float32(sum(weights)))

    t0 = time.perf_counter()
    jax.block_until_ready(round_())
    return round_, None, time.perf_counter() - t0


def run_cohort(num_clients: int, args, peak: float, model, base) -> list[dict]:
    task = next_token_task(model, pad_id=-1)
    adapters = model.init(jax.random.key(args.seed + 1))
    cohort = make_cohort(num_clients, args)
    cohort_dev = jax.device_put(cohort)
    key = jax.random.key(args.seed + 2)
    programs = {}
    for s in args.strategy_list:
        log(f"[C={num_clients}] compiling {s}")
        programs[s] = strategy_program(s, task, adapters, cohort_dev, key, args)
    log(f"[C={num_clients}] compiling {REFERENCE}")
    programs[REFERENCE] = reference_program(task, adapters, cohort, key, args)
    times = {name: [] for name in programs}
    outputs = {
        name: jax.tree.map(np.asarray, jax.block_until_ready(p[0]()))
        for name, p in programs.items()
    }
    order = list(programs)
    rng = random.Random(args.seed)
    for _ in range(args.repeats):  # interleaved, in a fresh random order each pass
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            jax.block_until_ready(programs[name][0]())
            times[name].append(time.perf_counter() - t0)
    tokens = float(np.sum(cohort.mask)) * args.context
    base_bytes = tree_bytes(base)
    adapter_bytes = tree_bytes(adapters)
    data_bytes = tree_bytes(cohort.batches) + tree_bytes((cohort.mask, cohort.num_examples))
    ref_best = min(times[REFERENCE])
    # One FLOP count for every program: XLA's cost analysis of the loop-free vmapped round
    # (it counts a loop's body once, so a sequential program's own count is too low).
    counted = [cost_flops(p[1]) for n, p in programs.items() if p[1] is not None]
    round_flops = (
        cost_flops(programs["vmap"][1])
        if "vmap" in programs
        else max((f for f in counted if f), default=None)
    )
    rows = []
    for name, (_, compiled, compile_s) in programs.items():
        best = min(times[name])
        memory = compiled_memory(compiled) if compiled is not None else None
        row = {
            "clients": num_clients,
            "program": name,
            "resolved": fs.resolve_strategy(name) if name == "auto" else name,
            "best_s": best,
            "times_s": times[name],
            "tokens_per_s": tokens / best,
            "ratio_to_reference": ref_best / best,
            "round_flops": round_flops,
            "mfu": (round_flops / best / peak) if round_flops else None,
            "compile_s": compile_s,
            "memory_mib": memory,
            "base_mib": base_bytes / MIB,
            "adapters_mib": adapter_bytes / MIB,
            "data_mib": data_bytes / MIB,
            "base_copies_mib": num_clients * base_bytes / MIB,
            "max_rel_err_vs_reference": rel_err(outputs[name], outputs[REFERENCE]),
        }
        rows.append(row)
        log(table_row(row))
    return rows


def table_row(r: dict) -> str:
    mem = r["memory_mib"]
    mem_s = f"{mem['argument_mib']:.0f}+{mem['temp_mib']:.0f}" if mem else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
    return (
        f"C={r['clients']:<4} {r['program']:<10} {r['best_s'] * 1e3:9.1f} ms "
        f"{r['tokens_per_s']:10.0f} tok/s  x{r['ratio_to_reference']:5.2f}  MFU {mfu:>6}  "
        f"args+temp {mem_s:>11} MiB  (base {r['base_mib']:.0f} MiB; per-client copies "
        f"{r['base_copies_mib']:.0f})  err {r['max_rel_err_vs_reference']:.1e}"
    )


def check(rows, args) -> list[str]:
    """Every program's adapters match the reference's; its arguments hold one base; and
    ``sequential`` holds one client's working memory whatever the cohort."""
    failures = [
        f"C={r['clients']} {r['program']}: adapters differ from the reference"
        for r in rows
        if r["max_rel_err_vs_reference"] > args.tolerance
    ]
    for r in rows:
        mem = r["memory_mib"]
        one_copy = r["base_mib"] + r["data_mib"] + 4 * r["adapters_mib"]
        if mem and mem["argument_mib"] > 1.1 * one_copy:
            failures.append(
                f"C={r['clients']} {r['program']}: arguments {mem['argument_mib']:.1f} MiB > one "
                f"base, the data and the adapters ({one_copy:.1f} MiB)"
            )
    seq = [r for r in rows if r["program"] == "sequential" and r["memory_mib"]]
    temps = {r["clients"]: r["memory_mib"]["temp_mib"] for r in seq}
    if len(temps) > 1 and temps[max(temps)] > 1.1 * temps[min(temps)] + 1:
        failures.append(f"sequential's working memory grows with the cohort: {temps} MiB")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the rows")
    p.add_argument("--quick", action="store_true", help="a tiny model and cohorts of 4, 8")
    p.add_argument("--model", default="10m", choices=sorted(MODELS))
    p.add_argument("--cohorts", default="10,50,100")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,v")
    p.add_argument("--vocab", type=int, default=80)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="local steps per client")
    p.add_argument("--learning_rate", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args(argv)
    args.strategy_list = [s for s in args.strategies.split(",") if s]
    for s in args.strategy_list:
        fs.resolve_strategy(s)  # an unknown name fails before any compute
    cohorts = [4, 8] if args.quick else [int(c) for c in args.cohorts.split(",") if c]
    if args.quick:
        args.context, args.repeats = 8, 2
    load_start = list(os.getloadavg())
    peak = measure_peak_flops()
    log(f"matmul peak {peak / 1e9:.1f} GFLOP/s, load {load_start}")
    model, base = build_model(args)
    rows = []
    for c in cohorts:
        rows.extend(run_cohort(c, args, peak, model, base))
        write(args, rows, peak, load_start)  # incrementally: a stopped run keeps its rows
    failures = [] if args.no_check else check(rows, args)
    write(args, rows, peak, load_start, failures)
    for f in failures:
        log(f"CHECK FAILED: {f}")
    return 1 if failures else 0


def write(args, rows, peak, load_start, failures=None) -> None:
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "matmul_peak_flops": peak,
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "args": {k: v for k, v in vars(args).items() if k != "strategy_list"},
        "rows": rows,
        "failures": failures,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

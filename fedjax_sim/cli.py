"""``fedjax-sim``: the command line (thin; the work happens in ``simulation``)."""

from __future__ import annotations

import argparse
import json
import sys

CONFIG_PREFIX = "--config."


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    rest, overrides = [], {}
    it = iter(argv)
    for arg in it:
        if arg.startswith(CONFIG_PREFIX):
            body = arg[len(CONFIG_PREFIX) :]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                key = body
                try:
                    value = next(it)
                except StopIteration:
                    raise SystemExit(
                        f"error: {arg} needs a value (--config.FIELD=VALUE)."
                    ) from None
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedjax-sim", description="Vectorized federated-learning simulations on JAX."
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run one simulation",
        description="Run one simulation. Override any config field with --config.FIELD=VALUE.",
    )
    run.add_argument("--workdir", required=True, help="output directory")
    run.add_argument(
        "--config",
        default=None,
        help="config file (FILE.py or FILE.py:variant) or built-in name; default: default",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run's results")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    multi = run.add_argument_group(
        "multi-process runs (one command per process; see fedjax_sim/distributed.py)"
    )
    multi.add_argument("--coordinator", help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=int, help="processes in the run")
    multi.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run described by the environment (srun, mpirun, "
        "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)",
    )
    sw = sub.add_parser(
        "sweep",
        help="train a grid of configs, vectorized where only hyperparameters change",
        description="Train every member of the grid that the config's `sweep` field names "
        "(field path -> list of values, e.g. config.sweep.client.learning_rate = [0.01, 0.1]); "
        "members that differ only in seed, learning rates or optimizer arguments train in one "
        "vectorized program. Each member writes WORKDIR/<label>/metrics.jsonl.",
    )
    sw.add_argument("--workdir", required=True, help="output directory")
    sw.add_argument("--config", required=True, help="config file (FILE.py[:variant])")
    sw.add_argument("--overwrite", action="store_true", help="replace earlier results")
    show = sub.add_parser("show-config", help="print the resolved config")
    show.add_argument("--config", default=None)
    sub.add_parser("datasets", help="list the datasets and partitioners")
    st = sub.add_parser(
        "data-stats",
        help="client counts, sizes and padding waste of a dataset",
        description="Load a dataset (and partition it) and print its statistics.",
    )
    st.add_argument("dataset", help="dataset name (see `fedjax-sim datasets`)")
    st.add_argument("--partition", default=None, help="partitioner for centralized datasets")
    st.add_argument(
        "--partition_kwargs",
        default="{}",
        help="partition parameters as JSON, e.g. '{\"alpha\": 0.1}'",
    )
    st.add_argument("--num_clients", type=int, default=None)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--data_dir", default=None, help="data root (default: ../shared/data)")
    st.add_argument("--batch_size", type=int, default=20)
    st.add_argument("--local_epochs", type=int, default=1)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--save_stats", default=None, help="folder for label histograms and a plot")
    from fedjax_sim import report

    report.add_parser(sub)
    return p


def _set_cpu_devices(count: int) -> None:
    """One virtual CPU device per core (before JAX starts), so clients run on every core."""
    import os

    import jax

    count = count or os.cpu_count() or 1
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX already started (e.g. main() called from Python): keep it.
        pass


def _datasets() -> int:
    from fedjax_sim import data

    print("datasets:")
    for name, text in sorted(data.BUILTIN_DATASETS.items()):
        print(f"  {name:18s} built-in   {text}")
    for name, entry in sorted(data.DATASETS.items()):
        print(f"  {name:18s} {entry.kind:10s} {entry.description}")
    print("partitioners (for centralized datasets):")
    for name, entry in sorted(data.PARTITIONERS.items()):
        print(f"  {name:18s} {getattr(entry, 'description', '')}")
    return 0


def _data_stats(args) -> int:
    from fedjax_sim import data

    try:
        partition_kwargs = json.loads(args.partition_kwargs)
    except json.JSONDecodeError as e:
        print(f"fedjax-sim: --partition_kwargs is not JSON: {e}", file=sys.stderr)
        return 2
    kwargs = {}
    if args.dataset in data.DATASETS:
        kwargs = {"data_dir": args.data_dir}
        if data.DATASETS[args.dataset].kind == "centralized":
            kwargs.update(
                partition=args.partition,
                partition_kwargs=partition_kwargs,
                num_clients=args.num_clients,
            )
    fd = data.get_federated_data(args.dataset, seed=args.seed, **kwargs)
    stats = data.data_stats(fd, batch_size=args.batch_size, local_epochs=args.local_epochs)
    stats = {"dataset": args.dataset, "partition": args.partition, **stats}
    if args.save_stats:
        from fedjax_sim.data import partition as partition_lib

        partition_lib.save_stats(
            partition_lib.label_stats(fd.train, fd.num_classes), args.save_stats
        )
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for split in ("train", "test"):
            sp = stats[split]
            q = sp["size_quantiles"]
            print(
                f"{split}: {sp['num_clients']} clients, {sp['num_examples']} examples, "
                f"client sizes min {q['p0']:.0f} / median {q['p50']:.0f} / max {q['p100']:.0f}"
            )
        pad = stats["padding"]
        print(
            f"padding waste (batch {pad['batch_size']}, {pad['local_epochs']} epoch): "
            f"{pad['waste_single_bucket']:.1%} in one bucket, {pad['waste_bucketed']:.1%} in "
            f"{pad['num_buckets']} buckets"
        )
    return 0


def _pop_sweep_axes(config) -> dict:
    from fedjax_sim.sweep import axes_from_config

    if "sweep" not in config or not config.sweep:
        raise ValueError(
            "the config has no `sweep` axes; set e.g. config.sweep = ml_collections.ConfigDict"
            "({'seed': [0, 1]}) and config.sweep.client = ml_collections.ConfigDict("
            "{'learning_rate': [0.01, 0.1]})."
        )
    axes = axes_from_config(config.sweep)
    with config.unlocked():
        del config["sweep"]
    return axes


def _sweep(config, axes: dict, args) -> int:
    from fedjax_sim import sweep

    try:
        out = sweep.run_sweep(config, axes, args.workdir, progress=True, overwrite=args.overwrite)
    except KeyboardInterrupt as e:
        return _interrupted(e, args.overwrite)
    except (ValueError, KeyError, FileExistsError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fedjax-sim: error: {msg}", file=sys.stderr)
        return 2
    for m in out["members"]:
        s = m["summary"]
        status = (
            f"diverged in round {s['diverged_round']}"
            if s["diverged"]
            else f"test accuracy {s['final_test_accuracy']:.4f}"
        )
        print(f"{m['label']}: {status}")
    n, groups = len(out["members"]), out["groups"]
    print(f"done: {n} members in {groups} program(s), {out['wall_s']:.1f} s")
    return 0


def _switch_algorithm(config, name: str) -> None:
    """``--config.algorithm=NAME``: the algorithm and the settings it needs, reported."""
    from fedjax_sim import algorithms

    for dotted, (old, new) in algorithms.switch_algorithm(config, name).items():
        print(
            f"fedjax-sim: algorithm={name} sets {dotted}={new!r} (was {old!r}; pass "
            f"--config.{dotted}=VALUE to choose)",
            file=sys.stderr,
        )


def _interrupted(e: KeyboardInterrupt, overwrite: bool) -> int:
    """Ctrl-C: one line (the last finished round, the checkpoint a rerun resumes from)."""
    from fedjax_sim.driver.loop import RunInterrupted

    if isinstance(e, RunInterrupted):
        hint = " without --overwrite" if overwrite and e.checkpoint_round is not None else ""
        print(f"\nfedjax-sim: {e}{hint}", file=sys.stderr)
    else:
        print(
            "\nfedjax-sim: interrupted before training started; rerun the same command to start",
            file=sys.stderr,
        )
    return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if args.command == "datasets":
        return _datasets()
    if args.command == "report":
        from fedjax_sim import report

        return report.run_cli(args)
    if args.command == "data-stats":
        from fedjax_sim.data.files import DataFileError, DataNotFoundError

        try:
            return _data_stats(args)
        except (ValueError, DataNotFoundError, DataFileError, FileNotFoundError) as e:
            print(f"fedjax-sim: error: {e}", file=sys.stderr)
            return 2

    from fedjax_sim import config as config_lib

    axes = None
    try:
        config = config_lib.load_config(args.config)
        if args.command == "sweep":
            axes = _pop_sweep_axes(config)
        reference = config_lib.load_config(None)
        config_lib.check_known_fields(config, reference)
        if "algorithm" in overrides:
            _switch_algorithm(config, overrides.pop("algorithm"))
        config_lib.apply_overrides(config, overrides)
    except (FileNotFoundError, KeyError, ValueError, AttributeError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fedjax-sim: config error: {msg}", file=sys.stderr)
        return 2

    if args.command == "show-config":
        print(config.to_json(indent=2))
        return 0

    _set_cpu_devices(config.cpu_devices)  # before JAX starts, for runs and sweeps alike
    if args.command == "sweep":
        return _sweep(config, axes, args)

    from fedjax_sim import simulation

    if args.distributed or args.coordinator or args.num_processes:
        from fedjax_sim import distributed

        try:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        except (ValueError, RuntimeError) as e:
            print(f"fedjax-sim: error: cannot join the run's processes: {e}", file=sys.stderr)
            return 2
    try:
        summary = simulation.simulate(
            config, args.workdir, progress=not args.no_progress, overwrite=args.overwrite
        )
    except KeyboardInterrupt as e:
        return _interrupted(e, args.overwrite)
    except simulation.TrainingDiverged as e:
        print(f"fedjax-sim: training diverged: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"fedjax-sim: error: {e}", file=sys.stderr)
        return 2
    from fedjax_sim import distributed

    if distributed.is_primary():  # one summary for a multi-process run
        print(simulation.format_summary(summary))
        print(json.dumps({k: v for k, v in summary.items() if k not in ("params", "history")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    show = sub.add_parser("show-config", help="print the resolved config")
    show.add_argument("--config", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)

    from fedjax_sim import config as config_lib

    try:
        config = config_lib.load_config(args.config)
        reference = config_lib.load_config(None)
        config_lib.check_known_fields(config, reference)
        config_lib.apply_overrides(config, overrides)
    except (FileNotFoundError, KeyError, ValueError, AttributeError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fedjax-sim: config error: {msg}", file=sys.stderr)
        return 2

    if args.command == "show-config":
        print(config.to_json(indent=2))
        return 0

    from fedjax_sim import simulation

    try:
        summary = simulation.simulate(
            config, args.workdir, progress=not args.no_progress, overwrite=args.overwrite
        )
    except simulation.TrainingDiverged as e:
        print(f"fedjax-sim: training diverged: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"fedjax-sim: error: {e}", file=sys.stderr)
        return 2
    print(simulation.format_summary(summary))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("params", "history")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

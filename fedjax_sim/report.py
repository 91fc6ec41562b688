"""``fedjax-sim report``: tables and plots over finished runs, and TensorBoard event files.

A run is a folder holding ``config.json`` and ``metrics.jsonl`` (as ``simulate`` writes them).
Runs whose configs agree on everything but the seed form one *point* (of a sweep); a point's
seeds give mean ± standard deviation of the final and best test accuracy and the band drawn
around each curve. ``--over seed data_seed`` averages over data partitions as well (any config
fields can be named).

    fedjax-sim report RUN_OR_SWEEP_DIR [...] --out OUT [--target 0.8] [--over seed ...]

writes ``OUT/report.md``, ``OUT/report.csv``, ``OUT/accuracy_vs_round.png``,
``OUT/loss_vs_round.png`` and ``OUT/accuracy_vs_time.png``.

``write_tensorboard(workdir)`` turns a run's ``metrics.jsonl`` into a TensorBoard event file
beside it (through ``fedjax_sim.metrics.tensorboard``: tensorboardX, no TensorFlow).

This module imports only the standard library and NumPy at import time; matplotlib and the
TensorBoard writer are imported inside the functions that use them.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
REQUIRED_KEYS = ("round", "test_accuracy")
# Config fields that do not define an experiment: how many devices ran it (results agree to
# float reordering) and how it was checkpointed (``IGNORED_PREFIXES``). The fields averaged
# over (``over``, default the seed) are left out too.
IGNORED_FIELDS = ("num_devices", "cpu_devices")
DEFAULT_OVER = ("seed",)
IGNORED_PREFIXES = ("checkpoint",)
PLOTS = {
    "accuracy_vs_round": "Test accuracy against rounds",
    "loss_vs_round": "Loss against rounds",
    "accuracy_vs_time": "Test accuracy against wall-clock time",
    "accuracy_vs_sim_time": "Test accuracy against simulated time (systems clock)",
    "accuracy_vs_bytes_up": "Test accuracy against cumulative uploaded bytes",
    "personal_accuracy_vs_round": "Personalized accuracy (mean, p10, p90 over clients)",
}


class ReportError(ValueError):
    """Bad input to the report: no runs found, or a run's files are malformed."""


@dataclass
class Run:
    workdir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def seed(self):
        return self.config.get("seed")

    def tag(self, over: tuple[str, ...]) -> str:
        """The values of the fields averaged over: ``0``, or ``seed=0,data_seed=3``."""
        flat = flatten(self.config)
        if tuple(over) == DEFAULT_OVER:
            return str(self.seed)
        return ",".join(f"{k}={_fmt_value(flat.get(k))}" for k in over)


@dataclass
class Point:
    """Runs that differ only in the fields averaged over (the seed by default)."""

    key: tuple
    fields: dict[str, Any]  # flattened config without the ignored fields
    runs: list[Run] = field(default_factory=list)
    label: str = ""


# --------------------------------------------------------------------------- loading


def load_run(workdir: str | Path) -> Run:
    """Reads ``workdir/config.json`` and ``workdir/metrics.jsonl``; ReportError if malformed."""
    workdir = Path(workdir)
    config_path, metrics_path = workdir / CONFIG_FILE, workdir / METRICS_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{config_path}: cannot read the run's config: {e}") from None
    if not isinstance(config, dict):
        raise ReportError(f"{config_path}: expected a JSON object.")
    records = read_metrics(metrics_path)
    if not records:
        raise ReportError(f"{metrics_path}: holds no evaluations (the run has not evaluated yet).")
    return Run(workdir, config, records)


def read_metrics(metrics_path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, sorted by round; ReportError naming a bad line."""
    metrics_path = Path(metrics_path)
    records = []
    try:
        lines = metrics_path.read_text().splitlines()
    except OSError as e:
        raise ReportError(f"{metrics_path}: cannot read: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{metrics_path}, line {lineno}: not valid JSON ({e}).") from None
        if not isinstance(record, dict):
            raise ReportError(f"{metrics_path}, line {lineno}: expected a JSON object.")
        missing = [k for k in REQUIRED_KEYS if not isinstance(record.get(k), (int, float))]
        if missing:
            raise ReportError(
                f"{metrics_path}, line {lineno}: missing or non-numeric {', '.join(missing)}."
            )
        records.append(record)
    records.sort(key=lambda r: r["round"])
    return records


def _is_run(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def find_runs(dirs: list[str | Path]) -> list[Run]:
    """The runs in ``dirs``: each a run folder or a folder with run folders below it."""
    found: dict[Path, None] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory.")
        candidates = [d] if _is_run(d) else []
        candidates += sorted(p.parent for p in d.rglob(METRICS_FILE) if _is_run(p.parent))
        if not candidates:
            raise ReportError(
                f"{d}: no runs found (a run is a folder with {CONFIG_FILE} and {METRICS_FILE}, "
                "here or in any subfolder)."
            )
        for c in candidates:
            found.setdefault(c.resolve(), None)
    return [load_run(p) for p in found]


# --------------------------------------------------------------------------- grouping


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):  # an empty dict (no kwargs) adds no field
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _ignored(name: str, over=DEFAULT_OVER) -> bool:
    return name in IGNORED_FIELDS or name in over or name.startswith(IGNORED_PREFIXES)


def _fmt_value(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v)


def group_points(runs: list[Run], over=DEFAULT_OVER) -> tuple[list[Point], list[str]]:
    """Groups runs by config without the fields ``over`` (the seed); returns the points and
    the fields that differ between them."""
    points: dict[tuple, Point] = {}
    for run in runs:
        flat = {k: v for k, v in flatten(run.config).items() if not _ignored(k, over)}
        key = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in flat.items()))
        points.setdefault(key, Point(key, flat)).runs.append(run)
    pts = list(points.values())
    order: dict[str, None] = {}
    for p in pts:
        for k in p.fields:
            order.setdefault(k, None)
    missing = object()
    differing = [
        k
        for k in order
        if len({json.dumps(p.fields.get(k, missing), default=str) for p in pts}) > 1
    ]
    for p in pts:
        p.runs.sort(key=lambda r: (r.tag(over), str(r.workdir)))
        if differing:
            # A field this point lacks (say server.kwargs.tau of an SGD server) is left out.
            p.label = ", ".join(
                f"{k}={_fmt_value(p.fields[k])}" for k in differing if k in p.fields
            )
        else:
            p.label = f"algorithm={_fmt_value(p.fields.get('algorithm', '?'))}"

    def sort_key(p):  # numbers by value, before other values
        return tuple(
            (0, v, "") if isinstance(v := p.fields.get(k), (int, float)) else (1, 0, str(v))
            for k in differing
        )

    pts.sort(key=sort_key)
    return pts, differing


# --------------------------------------------------------------------------- statistics


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    a = np.asarray(list(values), np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def rounds_to_target(records: list[dict[str, Any]], target: float) -> int | None:
    """The first evaluated round whose test accuracy is >= target (None if never)."""
    for r in records:
        if r["test_accuracy"] >= target:
            return int(r["round"])
    return None


def sim_time_to_target(records: list[dict[str, Any]], target: float) -> float | None:
    """Simulated seconds (``sim_time_s``) at the first evaluation with accuracy >= target."""
    for r in records:
        if r["test_accuracy"] >= target and "sim_time_s" in r:
            return float(r["sim_time_s"])
    return None


def _final(runs, key: str) -> list[float]:
    return [r.records[-1][key] for r in runs if key in r.records[-1]]


def point_stats(point: Point, target: float, over=DEFAULT_OVER) -> dict[str, Any]:
    runs = point.runs
    final = [r.records[-1]["test_accuracy"] for r in runs]
    best = [max(x["test_accuracy"] for x in r.records) for r in runs]
    reached = [t for t in (rounds_to_target(r.records, target) for r in runs) if t is not None]
    walls = [r.records[-1].get("wall_s", math.nan) for r in runs]
    losses = [r.records[-1].get("test_loss", math.nan) for r in runs]
    stats = {"label": point.label, "num_seeds": len(runs)}
    stats["seeds"] = " ".join(r.tag(over) for r in runs)
    stats["rounds"] = max(int(r.records[-1]["round"]) for r in runs)
    stats["final_acc_mean"], stats["final_acc_std"] = mean_std(final)
    stats["best_acc_mean"], stats["best_acc_std"] = mean_std(best)
    stats["final_test_loss_mean"], stats["final_test_loss_std"] = mean_std(losses)
    stats["rounds_to_target_mean"] = mean_std(reached)[0] if reached else None
    stats["reached_target"] = len(reached)
    stats["wall_s_mean"], stats["wall_s_std"] = mean_std(walls)
    timed = [t for t in (sim_time_to_target(r.records, target) for r in runs) if t is not None]
    stats["sim_time_to_target_mean"] = mean_std(timed)[0] if timed else None
    for key, name in (("personal_test_accuracy", "personal_acc"),
                      ("personal_client_accuracy_p10", "personal_p10")):  # fmt: skip
        values = _final(runs, key)
        stats[f"{name}_mean"], stats[f"{name}_std"] = mean_std(values) if values else (None, None)
    return stats


def curve(point: Point, key: str, x_key: str = "round"):
    """Per evaluated round: mean x, and mean and std of ``key`` over the seeds having it."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for run in point.runs:
        for rec in run.records:
            if isinstance(rec.get(key), (int, float)) and isinstance(rec.get(x_key), (int, float)):
                by_round.setdefault(int(rec["round"]), []).append((rec[x_key], rec[key]))
    xs, means, stds = [], [], []
    for r in sorted(by_round):
        pairs = by_round[r]
        xs.append(float(np.mean([p[0] for p in pairs])))
        m, s = mean_std(p[1] for p in pairs)
        means.append(m)
        stds.append(s)
    return np.asarray(xs), np.asarray(means), np.asarray(stds)


# --------------------------------------------------------------------------- outputs


CSV_COLUMNS = [
    "label",
    "num_seeds",
    "seeds",
    "rounds",
    "final_acc_mean",
    "final_acc_std",
    "best_acc_mean",
    "best_acc_std",
    "final_test_loss_mean",
    "final_test_loss_std",
    "rounds_to_target_mean",
    "reached_target",
    "target",
    "wall_s_mean",
    "wall_s_std",
    "sim_time_to_target_mean",
    "personal_acc_mean",
    "personal_acc_std",
    "personal_p10_mean",
    "personal_p10_std",
]


def write_csv(path: Path, points, differing, stats, target: float) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + differing)
        for p, s in zip(points, stats):
            row = {k: ("" if v is None else v) for k, v in s.items()}
            row["target"] = target
            w.writerow(
                [row[c] for c in CSV_COLUMNS] + [_fmt_value(p.fields.get(k, "")) for k in differing]
            )


def _pm(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_rounds_to_target(s: dict[str, Any]) -> str:
    if s["rounds_to_target_mean"] is None:
        return "-"
    return f"{s['rounds_to_target_mean']:.1f} ({s['reached_target']}/{s['num_seeds']})"


def _over_words(over) -> str:
    return "seeds" if tuple(over) == DEFAULT_OVER else "runs (" + ", ".join(over) + ")"


def write_markdown(
    path: Path, points, differing, stats, target: float, shared: dict, over=DEFAULT_OVER
) -> None:
    words = _over_words(over)
    head = [
        "Config",
        "Seeds" if tuple(over) == DEFAULT_OVER else "Runs",
        "Rounds",
        "Final test acc.",
        "Best test acc.",
        f"Rounds to acc. ≥ {target:g}",
        "Wall time (s)",
    ]
    timed = any(s["sim_time_to_target_mean"] is not None for s in stats)
    personal = any(s["personal_acc_mean"] is not None for s in stats)
    if timed:
        head.append(f"Sim. time to acc. ≥ {target:g} (s)")
    if personal:
        head += ["Personalized acc.", "Personalized p10"]
    lines = [
        "# fedjax-sim report",
        "",
        f"{sum(len(p.runs) for p in points)} runs in {len(points)} configurations; mean ± "
        f"sample standard deviation over {words}. Rounds to target: mean over the {words} that "
        "reached it (how many of them did).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for s in stats:
        cells = [
            s["label"].replace("|", "\\|"),
            str(s["num_seeds"]),
            str(s["rounds"]),
            _pm(s["final_acc_mean"], s["final_acc_std"]),
            _pm(s["best_acc_mean"], s["best_acc_std"]),
            format_rounds_to_target(s),
            _pm(s["wall_s_mean"], s["wall_s_std"], 1),
        ]
        if timed:
            t = s["sim_time_to_target_mean"]
            cells.append("-" if t is None else f"{t:.1f}")
        if personal:
            for name in ("personal_acc", "personal_p10"):
                m = s[f"{name}_mean"]
                cells.append("-" if m is None else _pm(m, s[f"{name}_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    keys = ("dataset.name", "model.name", "algorithm", "num_rounds", "clients_per_round")
    common = [f"{k}={_fmt_value(shared[k])}" for k in keys if k in shared]
    if common:
        lines += ["", "Shared settings: " + ", ".join(common) + "."]
    lines.append("")
    for name, title in PLOTS.items():
        if (path.parent / f"{name}.png").exists():
            lines += [f"![{title}]({name}.png)", ""]
    lines += ["## Runs", ""]
    for p in points:
        lines.append(f"- {p.label}: " + ", ".join(f"`{r.workdir}`" for r in p.runs))
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, points, y_key: str, x_key: str, title: str, xlabel: str, ylabel: str,
          target: float | None = None, dashed_key: str | None = None) -> None:  # fmt: skip
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [textwrap.fill(f"{p.label} (n={len(p.runs)})", 90) for p in points]
    legend_lines = sum(label.count("\n") + 1 for label in labels) + (target is not None)
    fig = Figure(figsize=(7.5, 4.2 + 0.2 * legend_lines), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, p in enumerate(points):
        color = f"C{i % 10}"
        x, m, s = curve(p, y_key, x_key)
        if not len(x):
            continue
        n = len(p.runs)
        ax.plot(x, m, color=color, marker="o" if len(x) < 30 else None, markersize=3,
                label=labels[i])  # fmt: skip
        if n > 1:
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.2, linewidth=0)
        if dashed_key:
            xd, md, _ = curve(p, dashed_key, x_key)
            if len(xd):
                ax.plot(xd, md, color=color, linestyle="--", linewidth=1)
    if target is not None:
        ax.axhline(target, color="0.4", linestyle=":", linewidth=1, label=f"target {target:g}")
    if x_key == "round":  # whole rounds only
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # below the axes: long labels must not squash them
        fig.legend(loc="outside lower center", fontsize="small", ncols=1)
    fig.savefig(path, dpi=120)


_BASE_PLOTS = ("accuracy_vs_round", "loss_vs_round", "accuracy_vs_time")


def _has(points, key: str) -> bool:
    return any(key in rec for p in points for r in p.runs for rec in r.records)


def write_plots(out: Path, points, target: float, over=DEFAULT_OVER) -> list[Path]:
    """The three base plots, and the simulated-time and personalization plots where the
    runs logged ``sim_time_s`` / ``personal_*`` fields."""
    words = _over_words(over)
    band = f"mean ± std over {words}"
    paths = [out / f"{name}.png" for name in _BASE_PLOTS]
    _plot(paths[0], points, "test_accuracy", "round", f"Test accuracy ({band})", "round",
          "test accuracy", target=target)  # fmt: skip
    _plot(paths[1], points, "test_loss", "round",
          f"Test loss ({band}); dashed: train loss", "round", "loss",
          dashed_key="train_loss")  # fmt: skip
    _plot(paths[2], points, "test_accuracy", "wall_s", f"Test accuracy ({band})",
          f"wall-clock time (s, mean over {words})", "test accuracy", target=target)  # fmt: skip
    if _has(points, "sim_time_s"):
        paths.append(out / "accuracy_vs_sim_time.png")
        _plot(paths[-1], points, "test_accuracy", "sim_time_s", f"Test accuracy ({band})",
              "simulated time (s, systems clock)", "test accuracy", target=target)  # fmt: skip
    if _has(points, "bytes_up"):
        paths.append(out / "accuracy_vs_bytes_up.png")
        _plot(paths[-1], points, "test_accuracy", "bytes_up", f"Test accuracy ({band})",
              "uploaded bytes (cumulative)", "test accuracy", target=target)  # fmt: skip
    if _has(points, "personal_test_accuracy"):
        paths.append(out / "personal_accuracy_vs_round.png")
        _plot(paths[-1], points, "personal_client_accuracy_mean", "round",
              f"Personalized per-client accuracy, mean ({band}); dashed: p10", "round",
              "accuracy", dashed_key="personal_client_accuracy_p10")  # fmt: skip
    return paths


def plotting_available() -> bool:
    """Whether matplotlib imports (a dependency; without it the tables are still written)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def report(
    dirs: list[str | Path], out: str | Path, *, target: float = 0.8, over=DEFAULT_OVER
) -> dict[str, Path]:
    """Writes report.md, report.csv and the plots for the runs in ``dirs`` into ``out``.

    ``over``: config fields a point averages over (default the seed; e.g. ``("seed",
    "data_seed")`` to average over data partitions too).
    """
    over = tuple(over)
    if not over:
        raise ReportError("over needs at least one config field to average over (e.g. seed).")
    runs = find_runs(dirs)
    points, differing = group_points(runs, over)
    stats = [point_stats(p, target, over) for p in points]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared = {
        k: v
        for k, v in points[0].fields.items()
        if k not in differing and all(k in p.fields for p in points)
    }
    written = {"csv": out / "report.csv", "markdown": out / "report.md"}
    write_csv(written["csv"], points, differing, stats, target)
    if plotting_available():
        for path in write_plots(out, points, target, over):  # before the page that links them
            written[path.stem] = path
    write_markdown(written["markdown"], points, differing, stats, target, shared, over)
    return written


# --------------------------------------------------------------------------- TensorBoard


def write_tensorboard(workdir: str | Path) -> Path:
    """Writes ``metrics.jsonl`` of ``workdir`` as a TensorBoard event file beside it.

    One scalar per numeric metric (``train_loss``, ``test_accuracy``, ...) at step = round;
    event times are the run's start (``config.json``'s modification time) plus ``wall_s``.
    Removes the event files written before by this function or by a
    ``fedjax_sim.metrics.tensorboard.TensorBoardLog`` (names ending ``.fedjax_sim``), so
    calling it again replaces rather than duplicates. Returns the new file's path.

    It rewrites the whole run, so a run that logs as it goes should append each evaluation
    with a ``TensorBoardLog`` instead (calling this after every evaluation is quadratic).
    """
    from fedjax_sim.metrics.tensorboard import TensorBoardLog, event_files

    workdir = Path(workdir)
    metrics_path = workdir / METRICS_FILE
    records = read_metrics(metrics_path) if metrics_path.exists() else []
    config_path = workdir / CONFIG_FILE
    start = config_path.stat().st_mtime if config_path.exists() else time.time()
    for old in event_files(workdir):
        old.unlink()
    with TensorBoardLog(workdir) as log:
        for rec in records:
            wall_s = rec.get("wall_s", 0.0)
            if isinstance(wall_s, bool) or not isinstance(wall_s, (int, float)):
                wall_s = 0.0
            log.write(rec, wall_time=start + float(wall_s))
    return log.path


# --------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="tables and plots over finished runs",
        description=(
            "Summarize runs: report.md, report.csv and plots of test accuracy and loss against "
            "rounds and wall-clock time. Runs that differ only in their seed are one point "
            "(mean ± std over seeds)."
        ),
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folder, or a folder of runs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--target", type=float, default=0.8, help="accuracy for 'rounds to target' (0.8)"
    )
    p.add_argument(
        "--over",
        nargs="+",
        default=list(DEFAULT_OVER),
        metavar="FIELD",
        help="config fields a point averages over (default: seed; e.g. --over seed data_seed)",
    )


def run_cli(args) -> int:
    try:
        written = report(args.dirs, args.out, target=args.target, over=args.over)
    except ReportError as e:
        print(f"fedjax-sim: error: {e}", file=sys.stderr)
        return 2
    for path in written.values():
        print(path)
    if not plotting_available():
        print(
            "fedjax-sim: matplotlib is not installed, so no plots were drawn (the tables are "
            "written); pip install matplotlib to draw them",
            file=sys.stderr,
        )
    return 0

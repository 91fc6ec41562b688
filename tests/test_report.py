"""``fedjax-sim report`` (tables, plots) and the TensorBoard event files (tensorboardX)."""

import csv
import json
import math
import statistics
import struct
import subprocess
import sys

import numpy as np
import pytest

from fedjax_sim import cli, report
from fedjax_sim.metrics.tensorboard import TensorBoardLog, event_files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEARNING_RATES = (0.1, 0.01)
SEEDS = (0, 1, 2)
ROUNDS = (2, 4, 6, 8, 10)
TARGET = 0.8


def _accuracy(lr, seed, r):
    # lr 0.1 climbs past 0.8 (seed 2 never does); lr 0.01 stays below it.
    top = {0.1: 0.9 - 0.06 * (seed == 2), 0.01: 0.6}[lr]
    dip = 0.05 if (seed, r) == (0, 10) else 0.0  # seed 0's best is not its final accuracy
    return round(top * (1 - math.exp(-r / (3 + seed))) + 0.01 * seed - dip, 6)


def _write_run(path, lr, seed, rounds=ROUNDS):
    path.mkdir(parents=True)
    config = {
        "seed": seed,
        "num_rounds": 10,
        "algorithm": "fedavg",
        "dataset": {"name": "synthetic", "kwargs": {"alpha": 1.0}},
        "client": {"optimizer": "sgd", "learning_rate": lr, "kwargs": {}},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    lines = []
    for r in rounds:
        acc = _accuracy(lr, seed, r)
        rec = {
            "round": r,
            "train_loss": 2.0 / r + seed * 0.01,
            "test_loss": 2.5 / r + lr + 0.05 * seed,
            "test_accuracy": acc,
            "client_accuracy_mean": acc,
            "client_accuracy_p10": acc - 0.1,
            "client_accuracy_p50": acc,
            "client_accuracy_p90": acc + 0.05,
            "wall_s": 0.5 * r + 0.1 * seed,
        }
        lines.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _csv(path):
    return list(csv.DictReader(path.read_text().splitlines()))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for lr in LEARNING_RATES:
        for seed in SEEDS:
            _write_run(root / f"lr{lr}_seed{seed}", lr, seed)
    return root


def _expected(root, lr):
    """Statistics computed straight from the metrics.jsonl files."""
    final, best, hit, walls = [], [], [], []
    for seed in SEEDS:
        recs = _records(root / f"lr{lr}_seed{seed}")
        accs = [r["test_accuracy"] for r in recs]
        final.append(accs[-1])
        best.append(max(accs))
        walls.append(recs[-1]["wall_s"])
        reached = [r["round"] for r in recs if r["test_accuracy"] >= TARGET]
        if reached:
            hit.append(reached[0])
    return {
        "final": (statistics.mean(final), statistics.stdev(final)),
        "best": (statistics.mean(best), statistics.stdev(best)),
        "hit": hit,
        "wall": (statistics.mean(walls), statistics.stdev(walls)),
    }


def test_report_numbers_match_metrics(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["report", str(sweep), "--out", str(out), "--target", str(TARGET)])
    assert rc == 0
    assert str(out / "report.md") in capsys.readouterr().out
    rows = _csv(out / "report.csv")
    assert len(rows) == 2
    md = (out / "report.md").read_text()
    for lr in LEARNING_RATES:
        exp = _expected(sweep, lr)
        (row,) = [r for r in rows if float(r["client.learning_rate"]) == lr]
        assert row["label"] == f"client.learning_rate={lr:g}"
        assert row["num_seeds"] == "3" and row["seeds"] == "0 1 2" and row["rounds"] == "10"
        assert float(row["final_acc_mean"]) == pytest.approx(exp["final"][0], abs=1e-12)
        assert float(row["final_acc_std"]) == pytest.approx(exp["final"][1], abs=1e-12)
        assert float(row["best_acc_mean"]) == pytest.approx(exp["best"][0], abs=1e-12)
        assert float(row["best_acc_std"]) == pytest.approx(exp["best"][1], abs=1e-12)
        assert float(row["wall_s_mean"]) == pytest.approx(exp["wall"][0], abs=1e-12)
        assert int(row["reached_target"]) == len(exp["hit"])
        if exp["hit"]:
            assert float(row["rounds_to_target_mean"]) == pytest.approx(statistics.mean(exp["hit"]))
            hit_cell = f"{statistics.mean(exp['hit']):.1f} ({len(exp['hit'])}/3)"
        else:
            assert row["rounds_to_target_mean"] == ""
            hit_cell = "-"
        line = [x for x in md.splitlines() if x.startswith(f"| client.learning_rate={lr:g} |")]
        assert len(line) == 1, md
        cells = [c.strip() for c in line[0].strip("|").split("|")]
        assert cells[3] == f"{exp['final'][0]:.4f} ± {exp['final'][1]:.4f}"
        assert cells[4] == f"{exp['best'][0]:.4f} ± {exp['best'][1]:.4f}"
        assert cells[5] == hit_cell
        assert cells[6] == f"{exp['wall'][0]:.1f} ± {exp['wall'][1]:.1f}"
    # lr 0.1: seeds 0 and 1 reach the target, seed 2 does not; lr 0.01 never does.
    assert [r["client.learning_rate"] for r in rows] == ["0.01", "0.1"]  # sorted by value
    assert [int(r["reached_target"]) for r in rows] == [0, 2]
    assert float(rows[1]["best_acc_mean"]) > float(rows[1]["final_acc_mean"])
    assert f"Rounds to acc. ≥ {TARGET:g}" in md
    for name in ("accuracy_vs_round", "loss_vs_round", "accuracy_vs_time"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert png.stat().st_size > 10_000
        assert f"]({name}.png)" in md


def test_grouping_single_seed_and_label_order(tmp_path):
    _write_run(tmp_path / "a", 0.1, 0)
    # A shorter seed: the curve is over the seeds that have each round.
    _write_run(tmp_path / "b", 0.1, 1, rounds=(2, 4))
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    _write_run(tmp_path / "c", 0.1, 5)
    cfg_c = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg_c["algorithm"] = "fedopt"
    cfg_c["checkpoint_every"] = 3  # storage-only fields do not split points
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg_c))
    assert cfg["seed"] == 1
    points, differing = report.group_points(report.find_runs([tmp_path]))
    assert differing == ["algorithm"]
    assert [p.label for p in points] == ["algorithm=fedavg", "algorithm=fedopt"]
    s = report.point_stats(points[1], TARGET)
    assert s["num_seeds"] == 1 and s["final_acc_std"] == 0.0
    x, m, sd = report.curve(points[0], "test_accuracy")
    assert list(x) == [2, 4, 6, 8, 10]
    assert sd[-1] == 0.0  # only seed 0 has round 10
    assert m[0] == pytest.approx((_accuracy(0.1, 0, 2) + _accuracy(0.1, 1, 2)) / 2)
    assert sd[0] == pytest.approx(statistics.stdev([_accuracy(0.1, 0, 2), _accuracy(0.1, 1, 2)]))


def test_over_data_seed_averages_partitions_too(tmp_path):
    # Four runs: seeds 0, 1 x data seeds 3, 4, one learning rate.
    for seed in (0, 1):
        for data_seed in (3, 4):
            path = tmp_path / f"s{seed}_d{data_seed}"
            _write_run(path, 0.1, seed + 2 * (data_seed - 3))  # four different curves
            cfg = json.loads((path / "config.json").read_text())
            cfg["seed"], cfg["data_seed"] = seed, data_seed
            (path / "config.json").write_text(json.dumps(cfg))
    by_seed, differing = report.group_points(report.find_runs([tmp_path]))
    assert differing == ["data_seed"] and [len(p.runs) for p in by_seed] == [2, 2]
    out = tmp_path / "out"
    assert (
        cli.main(["report", str(tmp_path), "--out", str(out), "--over", "seed", "data_seed"]) == 0
    )
    rows = _csv(out / "report.csv")
    assert len(rows) == 1 and rows[0]["num_seeds"] == "4"
    assert rows[0]["seeds"].split() == [
        "seed=0,data_seed=3", "seed=0,data_seed=4", "seed=1,data_seed=3", "seed=1,data_seed=4"
    ]  # fmt: skip
    finals = [_accuracy(0.1, k, 10) for k in range(4)]
    assert float(rows[0]["final_acc_mean"]) == pytest.approx(statistics.mean(finals))
    assert float(rows[0]["final_acc_std"]) == pytest.approx(statistics.stdev(finals))
    assert "over runs (seed, data_seed)" in (out / "report.md").read_text()


def test_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no runs found" in err and str(empty) in err

    assert cli.main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err

    _write_run(tmp_path / "bad", 0.1, 0)
    metrics = tmp_path / "bad" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:-5]  # a truncated line
    metrics.write_text("\n".join(lines) + "\n")
    assert cli.main(["report", str(tmp_path / "bad"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{metrics}, line 3" in err

    metrics.write_text('{"round": 1, "test_loss": 2.0}\n')
    with pytest.raises(report.ReportError, match="line 1: missing or non-numeric test_accuracy"):
        report.report([tmp_path / "bad"], tmp_path / "o")

    with pytest.raises(SystemExit):  # --out is required
        cli.main(["report", str(tmp_path)])


def test_cli_entry_point(sweep, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "fedjax_sim.cli", "report", str(sweep), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.csv").exists()
    proc = subprocess.run(cmd[:4] + [str(tmp_path / "nothing"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "no such directory" in proc.stderr


# --------------------------------------------------------------------------- TensorBoard


def _crc32c(data: bytes) -> int:
    """CRC-32C, bit by bit: the reader checks tensorboardX's framing independently of it."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
    """The ``Event`` protos of an event file: TFRecord framing (uint64 length, uint32 masked
    CRC of the length, data, uint32 masked CRC of the data), both CRCs checked, each record
    decoded with tensorboardX's bundled protobufs."""
    from tensorboardX.proto.event_pb2 import Event

    data, i, events = path.read_bytes(), 0, []
    while i < len(data):
        assert len(data) - i >= 16, "truncated record"
        header = data[i : i + 8]
        (length,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[i + 8 : i + 12])
        assert crc == _masked_crc32c(header)
        body = data[i + 12 : i + 12 + length]
        (crc,) = struct.unpack("<I", data[i + 12 + length : i + 16 + length])
        assert crc == _masked_crc32c(body)
        events.append(Event.FromString(body))
        i += 16 + length
    return events


def _scalar_events(events):
    """tag -> [(step, value, wall_time)] of the events' scalar summaries, in file order."""
    out = {}
    for ev in events:
        if ev.HasField("summary"):
            for v in ev.summary.value:
                assert v.WhichOneof("value") == "simple_value"
                out.setdefault(v.tag, []).append((ev.step, v.simple_value, ev.wall_time))
    return out


def _expected_scalars(records):
    """tag -> [(step, value)] as TensorBoard stores them (float32) from metrics records."""
    out = {}
    for rec in records:
        for k, v in rec.items():
            if k not in ("round", "wall_s") and isinstance(v, (int, float)):
                if not isinstance(v, bool):
                    out.setdefault(k, []).append((rec["round"], float(np.float32(v))))
    return out


def test_tensorboard_round_trip(tmp_path):
    assert _crc32c(b"123456789") == 0xE3069283  # the reader's CRC (its check value)
    run = tmp_path / "run"
    _write_run(run, 0.1, 1)
    first = report.write_tensorboard(run)
    path = report.write_tensorboard(run)  # replaces, does not duplicate
    assert path.parent == run and path.name.startswith("events.out.tfevents.")
    assert not first.exists() or first == path
    assert list(run.glob("*tfevents*")) == [path]
    records = _records(run)
    events = _read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert len(events) == 1 + len(records)  # the header, then one event per evaluation
    start = (run / "config.json").stat().st_mtime
    for ev, rec in zip(events[1:], records):
        assert ev.step == rec["round"]
        assert ev.wall_time == pytest.approx(start + rec["wall_s"])
    got = _scalar_events(events)
    assert {k: [(s, v) for s, v, _ in pts] for k, pts in got.items()} == _expected_scalars(records)
    assert set(got) == {k for k in records[0] if k not in ("round", "wall_s")}


def _tensorboard_scalars(run, tag):
    """(step, value) of ``tag`` as TensorBoard's two Python loaders read the folder ``run``:
    the legacy EventAccumulator and the plugin one (``tensorboard --load_fast=false``)."""
    ea = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed (the files are checked without it above)",
    )
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    legacy = ea.EventAccumulator(str(run))
    legacy.Reload()
    plugin = pea.EventAccumulator(str(run))
    plugin.Reload()
    return (
        [(e.step, e.value) for e in legacy.Scalars(tag)],
        [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in plugin.Tensors(tag)],
    )


def test_tensorboard_reads_it(tmp_path):
    ea = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed (the files are checked without it above)",
    )
    run = tmp_path / "run"
    _write_run(run, 0.1, 0)
    report.write_tensorboard(run)
    acc = ea.EventAccumulator(str(run))
    acc.Reload()
    expected = _expected_scalars(_records(run))
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == points, tag
        assert _tensorboard_scalars(run, tag) == (points, points), tag
    assert [e.step for e in acc.Scalars("test_accuracy")] == list(ROUNDS)

    # A resumed run (checkpoint after round 6): its log purges what the killed run logged
    # after round 6, so TensorBoard shows the resumed run's values from round 7 on.
    with TensorBoardLog(run) as killed:
        killed.write({"round": 8, "test_accuracy": 0.123, "wall_s": 1.0})
    with TensorBoardLog(run, purge_step=7) as resumed:
        for r in (8, 10):
            resumed.write({"round": r, "test_accuracy": 0.5 + r / 100, "wall_s": 2.0})
    want = [p for p in expected["test_accuracy"] if p[0] <= 6]
    want += [(8, float(np.float32(0.58))), (10, float(np.float32(0.6)))]
    assert _tensorboard_scalars(run, "test_accuracy") == (want, want)


def test_tensorboard_log_purge_step_marker(tmp_path):
    from tensorboardX.proto.event_pb2 import SessionLog

    with TensorBoardLog(tmp_path) as log:
        log.write({"round": 2, "test_accuracy": 0.25, "wall_s": 1.0})
        log.write({"round": 4, "test_accuracy": 0.5, "wall_s": 2.0})
    with TensorBoardLog(tmp_path, purge_step=3) as resumed:  # checkpoint after round 2
        resumed.write({"round": 4, "test_accuracy": 0.75, "wall_s": 2.5})
    # Read after the first (same second or not): TensorBoard reads files in name order.
    assert event_files(tmp_path) == [log.path, resumed.path] and log.path < resumed.path
    first, second = _read_events(log.path), _read_events(resumed.path)
    assert not any(ev.HasField("session_log") for ev in first)
    assert second[0].file_version == "brain.Event:2"
    # The purge marker: SessionLog.START at the purge step (twice, see TensorBoardLog).
    markers = [ev for ev in second if ev.HasField("session_log")]
    assert markers == second[1:3]
    assert [(ev.session_log.status, ev.step) for ev in markers] == [(SessionLog.START, 3)] * 2
    assert _scalar_events(second) == {"test_accuracy": [(4, 0.75, second[3].wall_time)]}
    with pytest.raises(ValueError, match="purge_step"):
        TensorBoardLog(tmp_path, purge_step=-1)


def test_tensorboard_log_appends_linearly(tmp_path):
    n = 25
    sizes = []
    with TensorBoardLog(tmp_path) as log:
        for r in range(1, n + 1):
            log.write(
                {"round": r, "train_loss": 1 / r, "test_accuracy": r / n, "wall_s": 0.1 * r,
                 "diverged": False, "label": "x"}  # bools and strings are not scalars
            )  # fmt: skip
            # Flushed: a reader sees each evaluation as soon as write returns.
            got = _scalar_events(_read_events(log.path))
            assert {k: len(v) for k, v in got.items()} == {"train_loss": r, "test_accuracy": r}
            sizes.append(log.path.stat().st_size)
    events = _read_events(log.path)
    assert len(events) == 1 + n  # the header and one event per write: nothing rewritten
    got = _scalar_events(events)
    assert [s for s, _, _ in got["test_accuracy"]] == list(range(1, n + 1))
    assert [v for _, v, _ in got["test_accuracy"]] == [float(np.float32(r / n)) for r in
                                                       range(1, n + 1)]  # fmt: skip
    growth = [b - a for a, b in zip(sizes, sizes[1:])]
    assert max(growth) <= 2 * min(growth)  # a constant amount per write, not growing
    with pytest.raises(ValueError, match="closed"):
        log.write({"round": n + 1, "test_accuracy": 1.0})
    log.close()  # idempotent


def test_import_does_not_load_tensorflow_or_matplotlib():
    code = (
        "import sys, fedjax_sim, fedjax_sim.cli, fedjax_sim.report; "
        "import fedjax_sim.metrics.tensorboard; "
        "print(*(m in sys.modules for m in ('tensorflow', 'matplotlib', 'tensorboardX')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # tensorboardX too is imported only when a log is opened.
    assert out.stdout.split() == ["False", "False", "False"], out.stderr


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_report_on_real_runs(tmp_path):
    import fedjax_sim as fs

    for seed in SEEDS:
        config = fs.load_config("default:smoke")
        config.num_rounds, config.eval_every, config.seed = 4, 2, seed
        fs.simulate(config, tmp_path / "runs" / f"seed{seed}", progress=False)
    written = report.report([tmp_path / "runs"], tmp_path / "out", target=0.3)
    rows = _csv(written["csv"])
    assert len(rows) == 1 and rows[0]["num_seeds"] == "3" and rows[0]["rounds"] == "4"
    finals = [
        json.loads((tmp_path / "runs" / f"seed{s}" / "summary.json").read_text())[
            "final_test_accuracy"
        ]
        for s in SEEDS
    ]
    assert float(rows[0]["final_acc_mean"]) == pytest.approx(statistics.mean(finals))
    assert float(rows[0]["final_acc_std"]) == pytest.approx(statistics.stdev(finals))
    for name in ("accuracy_vs_round", "loss_vs_round", "accuracy_vs_time"):
        assert written[name].read_bytes()[:8] == PNG_SIGNATURE
    assert report.write_tensorboard(tmp_path / "runs" / "seed0").stat().st_size > 100


def test_without_matplotlib_the_tables_are_written_with_a_hint(tmp_path, capsys, monkeypatch):
    _write_run(tmp_path / "runs" / "a", 0.1, 0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = cli.main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert rc == 0
    err = capsys.readouterr().err.strip()
    assert err == (
        "fedjax-sim: matplotlib is not installed, so no plots were drawn (the tables are "
        "written); pip install matplotlib to draw them"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.md"]
    text = (tmp_path / "out" / "report.csv").read_text().splitlines()
    rows = list(csv.DictReader(text))
    assert len(rows) == 1 and float(rows[0]["final_acc_mean"]) == _accuracy(0.1, 0, 10)
    assert ".png" not in (tmp_path / "out" / "report.md").read_text()

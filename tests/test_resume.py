"""Checkpoints and exact resume: SIGKILL mid-run, resume, and match a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint, simulation
from fedjax_sim.cli import main as cli_main
from fedjax_sim.config import load_config

# Default config, shortened: 24 rounds, evaluations every 2, checkpoints every 4.
OVERRIDES = [
    "--config.num_rounds=24",
    "--config.eval_every=2",
    "--config.checkpoint_every=4",
    "--config.client.local_epochs=10",
    "--config.cpu_devices=2",
]


def _cli(workdir, *extra):
    cmd = [sys.executable, "-m", "fedjax_sim.cli", "run", "--workdir", str(workdir)]
    return cmd + ["--no-progress", *OVERRIDES, *extra]


def _metrics(workdir, drop=("wall_s", "train_s")):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def _count_lines(path):
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _assert_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_sigkill_and_resume_is_bitwise_identical(tmp_path, capsys):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    # Both through the same CLI path (2 virtual CPU devices), so they are comparable bitwise.
    ref = subprocess.Popen(_cli(ref_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_cli(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    # Kill after round 10's evaluation: the last checkpoint is at round 8 (or 12), so the
    # killed run has usually appended evaluations after it that the resume must drop.
    deadline = time.monotonic() + 120
    while _count_lines(metrics) < 5 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = _count_lines(metrics)
    assert 5 <= killed_at < 12
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run(_cli(run_dir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    _, ref_err = ref.communicate(timeout=120)
    assert ref.returncode == 0, ref_err

    assert _metrics(run_dir) == _metrics(ref_dir)
    assert [m["round"] for m in _metrics(run_dir)] == list(range(2, 25, 2))
    # The final checkpoint (round 24) holds the whole algorithm state: params and optimizer.
    ckpt = checkpoint.Checkpointer(run_dir)
    assert ckpt.latest_round() == 24
    ckpt.close()
    _assert_bitwise_equal(checkpoint.load_state(run_dir), checkpoint.load_state(ref_dir))
    summaries = [json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir)]
    for key in ("final_test_accuracy", "final_test_loss", "final_train_loss", "padding_waste"):
        assert summaries[0][key] == summaries[1][key]
    kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [16, 20, 24]  # checkpoint_keep=3

    # A different config is refused before any compute, naming the field that differs.
    before = (run_dir / "metrics.jsonl").read_text()
    rc = cli_main(
        ["run", "--workdir", str(run_dir), "--no-progress", *OVERRIDES]
        + ["--config.client.learning_rate=0.1"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "client.learning_rate: 0.01 -> 0.1" in err
    assert "eval_every" not in err and "num_rounds" not in err
    assert (run_dir / "metrics.jsonl").read_text() == before


def _small_config(**fields):
    config = load_config("default:smoke")
    config.num_rounds, config.eval_every, config.checkpoint_every = 4, 2, 2
    for k, v in fields.items():
        setattr(config, k, v)
    return config


def test_in_process_resume_extends_num_rounds(tmp_path):
    short, long_ = tmp_path / "short", tmp_path / "long"
    fs.simulate(_small_config(num_rounds=4), short, progress=False)
    out = fs.simulate(_small_config(num_rounds=8), short, progress=False)
    ref = fs.simulate(_small_config(num_rounds=8), long_, progress=False)
    _assert_bitwise_equal(out["params"], ref["params"])
    assert _metrics(short) == _metrics(long_)
    # Training seconds continue across the resume, below the wall clock (which also counts
    # evaluations and checkpoint writes), and the summary repeats the last.
    records = _metrics(short, drop=())
    trains = [r["train_s"] for r in records]
    assert trains == sorted(trains) and all(0 < r["train_s"] < r["wall_s"] for r in records)
    assert out["train_s"] == trains[-1]
    # num_rounds may not fall below the rounds already done.
    with pytest.raises(checkpoint.ConfigMismatchError, match="num_rounds: 8 -> 6") as err:
        fs.simulate(_small_config(num_rounds=6, seed=3), short, progress=False)
    assert "\n" not in str(err.value)  # one line, every differing field in it
    assert "seed: " in str(err.value)


def test_unwritable_workdir_is_refused_before_compute(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def no_compute(*args, **kwargs):
        raise AssertionError("built the experiment for an unwritable workdir")

    monkeypatch.setattr(simulation, "build_experiment", no_compute)
    rc = cli_main(["run", "--workdir", str(blocker / "run"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot write to workdir" in err and "a_file" in err


def test_results_without_a_checkpoint_are_not_replaced(tmp_path):
    config = _small_config(checkpoint_every=0)
    fs.simulate(config, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(FileExistsError, match="already holds"):
        fs.simulate(config, tmp_path, progress=False)
    # --overwrite starts afresh.
    fs.simulate(_small_config(), tmp_path, progress=False, overwrite=True)
    assert checkpoint.has_checkpoint(tmp_path)


def test_a_refused_run_leaves_no_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="has 30 training clients"):
        fs.simulate(_small_config(clients_per_round=1000), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_of_an_older_format_is_refused_with_what_to_do(tmp_path):
    fs.simulate(_small_config(), tmp_path, progress=False)
    ckpt = checkpoint.Checkpointer(tmp_path)
    meta = ckpt.restore_meta(ckpt.latest_round())
    meta.pop("format")  # as fedjax_sim wrote them before the format was recorded
    state = checkpoint.load_state(tmp_path)
    ckpt.save(ckpt.latest_round() + 1, state, meta)
    ckpt.close()
    with pytest.raises(checkpoint.ConfigMismatchError, match="format 1.*--overwrite"):
        fs.simulate(_small_config(num_rounds=8), tmp_path, progress=False)


@pytest.mark.all_devices
def test_load_state_reads_a_checkpoint_sharded_over_devices_it_does_not_have(tmp_path):
    config = load_config("default:smoke")
    config.num_rounds, config.eval_every = 1, 1
    summary = fs.simulate(config, tmp_path, progress=False)
    # The cohort was split over every device of this process: 4 (conftest), or 2 where an
    # in-process CLI test of this worker made JAX start with one device per core.
    assert summary["devices"] == len(jax.local_devices()) > 1
    here = checkpoint.load_state(tmp_path)
    code = (
        "import sys, jax, numpy as np; jax.config.update('jax_num_cpu_devices', 1)\n"
        "from fedjax_sim import checkpoint\n"
        "state = checkpoint.load_state(sys.argv[1])\n"
        "np.savez(sys.argv[2], *jax.tree.leaves(state))\n"
    )
    out = tmp_path / "leaves.npz"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    there = np.load(out)
    leaves = jax.tree.leaves(here)
    assert len(there.files) == len(leaves) > 0
    for i, x in enumerate(leaves):
        assert isinstance(x, np.ndarray)
        assert there[f"arr_{i}"].tobytes() == x.tobytes()

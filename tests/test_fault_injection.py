"""Fault injection: SIGKILL at random moments (some during a checkpoint write) and damage to
the newest checkpoint, trial after trial on one workdir; the run still ends bitwise equal to
one never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from fedjax_sim import checkpoint

# default:smoke shortened: 10 rounds, an evaluation every 2, a checkpoint every round (so
# kills land in checkpoint writes often), 2 virtual CPU devices in every process.
OVERRIDES = [
    "--config.num_rounds=10",
    "--config.eval_every=2",
    "--config.checkpoint_every=1",
    "--config.client.local_epochs=2",
    "--config.cpu_devices=2",
]
TRIALS = 4  # kills in writes tried on trials 1 and 3; checkpoints damaged after 1 and 2


def _cli(workdir):
    cmd = [sys.executable, "-m", "fedjax_sim.cli", "run", "--workdir", str(workdir)]
    return cmd + ["--no-progress", "--config", "default:smoke", *OVERRIDES]


def _metrics(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("wall_s", "train_s")}
        for line in lines
    ]


def _rounds(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _writing(workdir: Path) -> bool:
    """Whether a checkpoint is being written (Orbax's temporary directory exists)."""
    d = workdir / "checkpoints"
    try:
        return any("tmp" in p.name for p in d.iterdir())
    except FileNotFoundError:
        return False


def _damage(ckpt: Path, how: str, rng) -> None:
    for p in (ckpt / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            n = p.stat().st_size
            p.write_bytes(rng.bytes(n) if how == "random" else p.read_bytes()[: n // 2])


def test_random_kills_and_damaged_checkpoints_still_end_bitwise_equal(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    t0 = time.monotonic()
    ref = subprocess.run(_cli(ref_dir), capture_output=True, text=True)
    duration = time.monotonic() - t0
    assert ref.returncode == 0, ref.stderr

    rng = np.random.default_rng(20261206)
    kills = in_write = fallbacks = 0
    damaged = set()
    for trial in range(TRIALS):
        before = _rounds(run_dir)
        proc = subprocess.Popen(_cli(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Let it resume and save one new checkpoint (progress in every trial), then kill it:
        # even trials at a random moment within the next half second, odd trials the moment
        # a checkpoint write is seen (Orbax's temporary directory).
        while proc.poll() is None and max(_rounds(run_dir), default=-1) <= max(before, default=-1):
            time.sleep(0.002)
        hit, deadline = False, time.monotonic() + (rng.uniform(0, 0.5) if trial % 2 == 0 else 5)
        while proc.poll() is None and time.monotonic() < deadline:
            if trial % 2 == 1 and _writing(run_dir):
                hit = True
                break
            time.sleep(0.0005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
            in_write += hit
        proc.wait()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        fallbacks += err.count("cannot be read")
        if proc.returncode == 0:  # it finished before the kill
            break
        assert proc.returncode == -signal.SIGKILL, err
        rounds = _rounds(run_dir)
        if trial in (1, 2) and len(rounds) >= 2:  # damage the newest; an older one remains
            how = ("random", "truncate")[len(damaged) % 2]
            _damage(run_dir / "checkpoints" / str(rounds[-1]), how, rng)
            damaged.add(str(rounds[-1]))
    final = subprocess.run(_cli(run_dir), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    fallbacks += final.stderr.count("cannot be read")

    assert kills >= TRIALS - 1 and in_write >= 1, (kills, in_write)
    # Every damaged checkpoint was named on stderr and set aside, never resumed from.
    unreadable = run_dir / "checkpoints_unreadable"
    assert damaged and damaged <= {p.name for p in unreadable.iterdir()}
    assert fallbacks >= 1
    assert _metrics(run_dir) == _metrics(ref_dir)
    a, b = checkpoint.load_state(run_dir), checkpoint.load_state(ref_dir)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    summary = json.loads((run_dir / "summary.json").read_text())
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    assert summary["final_test_accuracy"] == ref_summary["final_test_accuracy"]
    print(f"kills {kills} (in a checkpoint write: {in_write}), damaged {sorted(damaged)}, "
          f"fallbacks {fallbacks}, reference {duration:.1f} s")  # fmt: skip

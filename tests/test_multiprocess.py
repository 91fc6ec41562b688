"""Two processes x 2 CPU devices on localhost (``jax.distributed``, gloo collectives): one
``clients`` mesh over both, each process feeding its own rows; SIGKILL both mid-run, resume,
and match a 2-process run never interrupted bitwise and the one-process run within 1e-5."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint
from tests.test_resume import _assert_bitwise_equal, _count_lines, _metrics

# SCAFFOLD with its control variates on the host (checkpointed with the run), 24 rounds, the
# examples on the host (each process gathers its own clients'), stragglers.
FIELDS = {
    "data_on_device": "host",
    "num_rounds": 24,
    "eval_every": 2,
    "checkpoint_every": 4,
    "algorithm": "scaffold",
    "client_states": "host",
    "strategy": "sequential",
}
OVERRIDES = [f"--config.{k}={v}" for k, v in FIELDS.items()] + [
    "--config.client.local_epochs=10",
    "--config.systems.straggler_fraction=0.2",
    "--config.cpu_devices=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, out=subprocess.DEVNULL):
    """Both processes of a run (one command each, as on two hosts)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "fedjax_sim.cli", "run", "--workdir", str(workdir)]
    cmd += ["--no-progress", "--config", "default:smoke", *OVERRIDES]
    cmd += ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    return [
        subprocess.Popen([*cmd, "--process-id", str(i)], stdout=out, stderr=subprocess.PIPE)
        for i in range(2)
    ]


def _finish(procs):
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_two_processes_kill_resume_and_match_one_process(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = _launch(ref_dir)
    victim = _launch(run_dir)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while (
        _count_lines(metrics) < 5
        and all(p.poll() is None for p in victim)
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    for p in victim:  # freeze both first, so neither finishes the run while the other dies
        os.kill(p.pid, signal.SIGSTOP)
    assert all(p.poll() is None for p in victim), "the run ended before it could be killed"
    for p in victim:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stderr.close()
    killed_at = _count_lines(metrics)
    assert 5 <= killed_at < 12 and not (run_dir / "summary.json").exists()

    resumed = _launch(run_dir)
    errs = [p.communicate(timeout=300)[1].decode() for p in resumed]
    assert all(p.returncode == 0 for p in resumed), errs[0][-3000:] + errs[1][-3000:]
    assert "resuming" in errs[0]
    _finish(ref)

    # Bitwise: the resumed 2-process run and the one never interrupted.
    assert _metrics(run_dir) == _metrics(ref_dir)
    assert [m["round"] for m in _metrics(run_dir)] == list(range(2, 25, 2))
    _assert_bitwise_equal(checkpoint.load_state(run_dir), checkpoint.load_state(ref_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["devices"] == 4 and summary["client_states"] == "host"

    # Within 1e-5: one process with the same 4 devices (the all-reduce sums in another order).
    # The config the CLI resolved (switching to SCAFFOLD sets its own defaults), on 4 devices.
    config = ml_collections.ConfigDict(json.loads((ref_dir / "config.json").read_text()))
    config.num_devices = 4
    one = fs.simulate(config, tmp_path / "one", progress=False)
    many = _metrics(run_dir)
    assert len(one["history"]) == len(many)
    for a, b in zip(one["history"], many, strict=True):
        for key in ("train_loss", "test_loss", "test_accuracy", "client_accuracy_mean"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)

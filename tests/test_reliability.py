"""A finished run is never lost and every failure says what to do (issue 23's table).

Each test pins one row: a refused ``--overwrite`` keeps the finished run; an unreadable
checkpoint is named and the run falls back to the previous one; a broken config file is
``config error: FILE:LINE``; a loss that explodes stops the run; Ctrl-C is one line and exit
130; a finished run called again keeps its summary.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint
from fedjax_sim.cli import main as cli_main
from fedjax_sim.config import load_config
from fedjax_sim.driver import programs
from fedjax_sim.driver.loop import RunInterrupted

# default:smoke shortened to 6 rounds of 2 local epochs, evaluated every 2, a checkpoint each
# round (so the fallback has an older one to go to).
SMALL = {
    "num_rounds": 6,
    "eval_every": 2,
    "checkpoint_every": 1,
    "client.local_epochs": 1,
}


def _config(**fields):
    config = load_config("default:smoke")
    for dotted, value in {**SMALL, **fields}.items():
        node, *path = dotted.split(".")
        target = config if not path else config[node]
        setattr(target, path[-1] if path else node, value)
    return config


def _args(workdir, **fields):
    over = {**SMALL, **fields}
    return ["run", "--workdir", str(workdir), "--no-progress"] + [
        f"--config.{k}={v}" for k, v in over.items()
    ]


def _metrics(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("wall_s", "train_s")}
        for line in lines
    ]


def _bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _snapshot(workdir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(workdir)): p.read_bytes()
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-round run (checkpoints at every round, the newest 3 kept), and the
    results of the same config run to 8 rounds, for the fallback tests to compare with."""
    root = tmp_path_factory.mktemp("finished")
    run, longer = root / "run", root / "longer"
    fs.simulate(_config(), run, progress=False)
    ref = fs.simulate(_config(num_rounds=8), longer, progress=False)
    return run, longer, ref


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=resnet99", "unknown model 'resnet99'"),
        ("num_rounds=-5", "num_rounds must be an integer >= 1, got -5"),
        ("clients_per_round=100", "has 30 training clients"),
        ("client.batch_size=0", "client.batch_size must be an integer >= 1, got 0"),
    ],
)
def test_a_refused_overwrite_keeps_the_finished_run(finished, tmp_path, capsys, override, message):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    before = _snapshot(run)
    key, value = override.split("=")
    rc = cli_main(_args(run, **{key: value}) + ["--overwrite"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert _snapshot(run) == before  # metrics, checkpoints, summary and config untouched


def test_a_refused_run_creates_no_workdir(tmp_path, capsys):
    # batch_size 0 used to warn (divide by zero), draw a progress bar and write config.json
    # and a round-0 checkpoint before failing (warnings are errors in this suite).
    rc = cli_main(_args(tmp_path / "new" / "run", **{"client.batch_size": 0}))
    assert rc == 2
    assert "client.batch_size must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_overwrite_moves_the_earlier_results_to_previous(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    old_metrics = (run / "metrics.jsonl").read_bytes()
    (run / "previous").mkdir()  # an older previous/ is replaced
    (run / "previous" / "stale.txt").write_text("older")
    rc = cli_main(_args(run, num_rounds=2, seed=1) + ["--overwrite"])
    assert rc == 0
    assert f"moved the earlier results to {run / 'previous'}" in capsys.readouterr().err
    prev = run / "previous"
    assert (prev / "metrics.jsonl").read_bytes() == old_metrics
    assert sorted(p.name for p in (prev / "checkpoints").iterdir()) == ["4", "5", "6"]
    assert not (prev / "stale.txt").exists() and not (prev / "previous").exists()
    assert [m["round"] for m in _metrics(run)] == [2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0", "1", "2"]


def _corrupt_state(ckpt: Path) -> None:
    """Random bytes over every data file of a checkpoint's state (same sizes)."""
    rng = np.random.default_rng(0)
    for p in (ckpt / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(rng.bytes(p.stat().st_size))


def _truncate_state(ckpt: Path) -> None:
    for p in (ckpt / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage_meta(ckpt: Path) -> None:
    (ckpt / "meta" / "metadata").write_bytes(b"\x00garbage{")


def _wrong_digest(ckpt: Path) -> None:
    """Readable arrays that are not the ones saved (as a corrupted chunk Orbax does not
    notice would read back): the digest in the meta no longer matches. Without the file
    manifest (a run killed before writing it), so the arrays' digest is what catches it."""
    (ckpt / checkpoint.MANIFEST).unlink()
    path = ckpt / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["digest"] = "0" * 64
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_corrupt_state, _truncate_state, _garbage_meta, _wrong_digest])
def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, damage):
    run_dir, longer, ref = finished
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    damage(run / "checkpoints" / "6")
    # Extending the run resumes from round 5 and ends as a run never interrupted.
    out = fs.simulate(_config(num_rounds=8), run, progress=False)
    assert (run / "checkpoints_unreadable" / "6").is_dir()
    _bitwise_equal(out["params"], ref["params"])
    assert _metrics(run) == _metrics(longer)


def test_the_fallback_is_named_on_stderr(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    _garbage_meta(run / "checkpoints" / "6")
    assert cli_main(_args(run)) == 0
    err = capsys.readouterr().err
    where = run / "checkpoints" / "6"
    assert f"checkpoint {where} cannot be read" in err
    assert "trying the next older one" in err and f"resuming {run} after round 5" in err
    # The rerun retrained round 6 from round 5's checkpoint: the same records as before.
    assert _metrics(run) == _metrics(finished[0])


def test_no_readable_checkpoint_is_one_line_with_what_to_do(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    for r in ("4", "5", "6"):
        _garbage_meta(run / "checkpoints" / r)
    rc = cli_main(_args(run))
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedjax-sim: error: no checkpoint in ")
    assert "can be read" in last and "--overwrite" in last
    assert (run / "metrics.jsonl").exists()  # the results are kept


def test_a_finished_run_called_again_keeps_its_summary(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    before = (run / "summary.json").read_bytes()
    out = fs.simulate(_config(), run, progress=False)
    assert (run / "summary.json").read_bytes() == before
    assert out["wall_s"] == json.loads(before)["wall_s"]
    assert _metrics(run) == _metrics(finished[0])


def test_config_syntax_errors_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import ml_collections\n\n"
        "def get_config(variant=None):\n"
        "    c = ml_collections.ConfigDict(\n"
        "    return c\n"
    )
    assert cli_main(["run", "--workdir", str(tmp_path / "w"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedjax-sim: config error: {bad}:4: '(' was never closed"
    assert not (tmp_path / "w").exists()


def test_config_runtime_errors_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import ml_collections\n\n"
        "def get_config(variant=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.seed = undefined_name\n"
        "    return c\n"
    )
    assert cli_main(["show-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedjax-sim: config error: {bad}:5: ")
    assert "NameError: name 'undefined_name' is not defined" in err
    assert len(err.splitlines()) == 1


def test_a_loss_that_explodes_stops_the_run_and_keeps_its_results(tmp_path, capsys):
    # Logistic regression at client learning rate 1e6: the loss reaches ~1e7 with every
    # number finite, so only divergence_factor (1000 x the initial test loss) can stop it.
    args = _args(tmp_path / "run", checkpoint_every=0, **{"client.learning_rate": 1e6})
    assert cli_main(args) == 3
    err = capsys.readouterr().err.strip()
    assert "fedjax-sim: training diverged:" in err and "divergence_factor" in err
    assert "in round 1" in err and len(err.splitlines()) == 1
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # kept: nothing evaluated
    # With divergence_factor = 0 the same run goes on (finite) to a useless model.
    out = fs.simulate(
        _config(checkpoint_every=0, divergence_factor=0.0, **{"client.learning_rate": 1e6}),
        tmp_path / "unchecked",
        progress=False,
    )
    assert np.isfinite(out["final_test_loss"])
    initial = np.log(10.0)  # the initial model's test loss is about ln(10) (10 classes)
    assert out["final_train_loss"] > 1000 * initial


def test_a_sweep_freezes_a_member_whose_loss_explodes(tmp_path):
    config = _config(checkpoint_every=0)
    out = fs.run_sweep(config, {"client.learning_rate": [0.01, 1e6]}, tmp_path)
    calm, wild = (m["summary"] for m in out["members"])
    assert not calm["diverged"] and wild["diverged"] and wild["diverged_round"] == 1


def test_divergence_factor_is_checked(tmp_path):
    for bad in (0.5, 1.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="divergence_factor must be 0"):
            fs.simulate(_config(divergence_factor=bad), tmp_path, progress=False)


def test_ctrl_c_is_one_line_with_the_round_and_the_checkpoint(tmp_path, capsys, monkeypatch):
    step = programs.SoloProgram.step

    def interrupted_in_round_4(self, states, alive, cohorts, r):
        if r == 4:
            raise KeyboardInterrupt
        return step(self, states, alive, cohorts, r)

    monkeypatch.setattr(programs.SoloProgram, "step", interrupted_in_round_4)
    run = tmp_path / "run"
    assert cli_main(_args(run, checkpoint_every=2) + ["--overwrite"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (
        f"fedjax-sim: interrupted after round 3 of 6; rerun the same command to resume from "
        f"the checkpoint of round 2 ({run / 'checkpoints' / '2'}) without --overwrite"
    )
    with pytest.raises(RunInterrupted) as e:  # the library raises a KeyboardInterrupt
        fs.simulate(_config(checkpoint_every=0), tmp_path / "nockpt", progress=False)
    assert isinstance(e.value, KeyboardInterrupt) and e.value.checkpoint_round is None
    assert "no checkpoint was saved" in str(e.value)
    monkeypatch.setattr(programs.SoloProgram, "step", step)
    # Resuming the interrupted run ends as a run never interrupted.
    out = fs.simulate(_config(checkpoint_every=2), run, progress=False)
    ref = fs.simulate(_config(checkpoint_every=2), tmp_path / "ref", progress=False)
    _bitwise_equal(out["params"], ref["params"])
    assert _metrics(run) == _metrics(tmp_path / "ref")


def test_previous_is_documented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{checkpoint.PREVIOUS_DIR}/" in readme
    assert f"{checkpoint.UNREADABLE_DIR}/" in readme


def test_sigint_to_a_cli_run_is_one_line_and_exit_130(tmp_path):
    # A real Ctrl-C (SIGINT) to `fedjax-sim run`, after its third evaluation.
    args = _args(tmp_path, num_rounds=400, eval_every=1, checkpoint_every=2)[1:]
    cmd = [sys.executable, "-m", "fedjax_sim.cli", "run", *args, "--config.cpu_devices=2"]
    # Test workers may ignore SIGINT, and a child inherits an ignored signal: start it while
    # this process handles SIGINT (a handler is reset to the default in the child). No
    # preexec_fn: forking a process that runs JAX warns.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(
        r"fedjax-sim: interrupted after round (\d+) of 400; rerun the same command to resume "
        r"from the checkpoint of round (\d+) \((.+)\)",
        last,
    )
    assert m, last
    done, saved = int(m[1]), int(m[2])
    assert 3 <= done < 400 and saved <= done and saved % 2 == 0
    assert Path(m[3]) == tmp_path / "checkpoints" / str(saved) and Path(m[3]).is_dir()


def test_the_progress_bar_names_its_loss_and_shows_epsilon_under_dp(tmp_path, capsys):
    config = _config(checkpoint_every=0, num_rounds=2, weighting="uniform")
    config.dp.clip_norm, config.dp.noise_multiplier = 1.0, 1.0
    out = fs.simulate(config, tmp_path, progress=True)
    err = capsys.readouterr().err
    last = out["history"][-1]
    assert f"train_loss={last['train_loss']:.4f}" in err
    assert f"test_acc={last['test_accuracy']:.4f}" in err
    assert f"eps={last['epsilon']:.3f}" in err


@pytest.mark.parametrize("num_devices", [1, 2])
def test_the_check_before_writing_is_the_trace_the_round_reuses(num_devices):
    # program.check traces round 1 on abstract arguments placed as the round gets them
    # (replicated on a mesh), so the first round does not trace the algorithm a second time.
    from fedjax_sim.simulation import build_experiment, cohort_source, data_seed_of

    config = _config(num_devices=num_devices, data_on_device="device", checkpoint_every=0)
    exp = build_experiment(config)
    traces = []

    def apply(*args):
        traces.append(1)
        return exp.algorithm.apply(*args)

    algorithm = exp.algorithm._replace(apply=apply)
    stream = [(int(config.seed), data_seed_of(config))]
    source = cohort_source(exp, {stream[0][1]: exp.data.train}, stream, exp.num_steps)
    program = programs.SoloProgram(algorithm, exp.model, 0, exp.mesh, source.examples)
    assert (program.mesh is None) == (num_devices == 1)
    program.check(source.preview(1), 1)
    assert len(traces) == 1
    states, alive = program.init()
    program.step(states, alive, source.cohorts(1), 1)
    assert len(traces) == 1

"""Offline by default: a dataset that is neither prepared nor on disk is a one-line error naming
the folder and its files, raised before TensorFlow is imported and without a network attempt;
and processes sharing a TFDS cache prepare a dataset once, under a file lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fedjax_sim.data import centralized, registry
from fedjax_sim.data.files import DataNotFoundError, exclusive_lock
from fedjax_sim.data.registry import load_federated
from tests.conftest import REPO_ROOT
from tests.conftest_data import real_data

MNIST_FILES = centralized.TFDS_DATASETS["mnist"].manual_files


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture
def no_tfds(monkeypatch):
    """Makes any use of TFDS (and so any download) fail the test."""

    def refuse():
        raise AssertionError("TFDS was imported: the offline check should have failed first")

    monkeypatch.setattr(centralized, "_import_tfds", refuse)


def test_missing_data_dir_fails_fast_in_one_line_without_tensorflow(tmp_path):
    code = """
        import json, sys, time
        from fedjax_sim.data.files import DataNotFoundError
        from fedjax_sim.data.registry import load_federated
        start = time.perf_counter()
        try:
            load_federated(
                "mnist", data_dir="/nonexistent", cache_dir=sys.argv[1], num_clients=10, seed=0
            )
            message = None
        except DataNotFoundError as e:
            message = str(e)
        seconds = time.perf_counter() - start
        heavy = [m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules]
        print(json.dumps({"message": message, "seconds": seconds, "imported": heavy}))
    """
    proc = _python(code, str(tmp_path))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got = json.loads(out)
    msg = got["message"]
    assert msg is not None and "\n" not in msg
    assert msg.startswith("mnist: /nonexistent/mnist is missing (needs train-images-idx3-ubyte.gz")
    assert all(f in msg for f in MNIST_FILES)
    assert "dataset.kwargs.data_dir" in msg and "dataset.kwargs.download=True" in msg
    assert got["imported"] == []  # so no TFDS download could have started
    assert got["seconds"] < 1.0, got  # a few stat calls; measured about 0.5 ms


@pytest.mark.parametrize("name", sorted(centralized.TFDS_DATASETS))
def test_every_tfds_dataset_names_its_missing_folder(name, tmp_path, no_tfds):
    tfds_dir = tmp_path / "tfds"
    with pytest.raises(DataNotFoundError) as e:
        load_federated(
            name,
            data_dir=tmp_path,
            tfds_data_dir=tfds_dir,
            cache_dir=tmp_path / "cache",
            num_clients=2,
            seed=0,
        )
    msg = str(e.value)
    assert msg.startswith(f"{name}: {tmp_path / name} is missing (needs ")
    assert all(f in msg for f in centralized.TFDS_DATASETS[name].manual_files)
    assert str(tfds_dir) in msg and "\n" not in msg


@pytest.mark.parametrize(
    "name", ["femnist_leaf", "shakespeare_leaf", "tff_emnist", "tff_stackoverflow"]
)
def test_natural_datasets_name_their_missing_folder(name, tmp_path):
    # These read local files only; a missing folder is the same kind of one-line error.
    with pytest.raises(DataNotFoundError) as e:
        load_federated(name, data_dir=tmp_path, cache_dir=tmp_path / "cache")
    subdir = registry.DATASETS[name].subdir
    assert str(e.value).startswith(f"{name}: no directory {tmp_path / subdir}.")
    assert "\n" not in str(e.value)


def test_partial_and_explicit_manual_folders(tmp_path, no_tfds):
    mnist_dir = tmp_path / "mnist"
    mnist_dir.mkdir()
    for f in MNIST_FILES[:3]:
        (mnist_dir / f).write_bytes(b"")
    with pytest.raises(DataNotFoundError, match=f"mnist: {mnist_dir} lacks {MNIST_FILES[3]} "):
        centralized.mnist(data_dir=tmp_path, tfds_data_dir=tmp_path / "tfds")
    with pytest.raises(DataNotFoundError) as e:
        centralized.mnist(manual_dir=tmp_path / "nope", tfds_data_dir=tmp_path / "tfds")
    # manual_dir overrides data_dir, so the advice is about manual_dir only.
    assert str(e.value).startswith(f"mnist: manual_dir {tmp_path / 'nope'} is missing")
    assert "data_dir" not in str(e.value).replace("manual_dir", "")


def test_a_prepared_dataset_is_read_without_its_original_files(tmp_path, no_tfds):
    # A prepared copy in the TFDS folder is enough offline: the check lets TFDS read it (here
    # the refused TFDS import shows that the load went on to TFDS).
    version = tmp_path / "tfds" / "mnist" / "3.0.1"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")
    with pytest.raises(AssertionError, match="TFDS was imported"):
        centralized.mnist(data_dir=tmp_path, tfds_data_dir=tmp_path / "tfds")


def test_download_true_is_the_only_way_to_tfds_without_files(tmp_path, no_tfds):
    with pytest.raises(AssertionError, match="TFDS was imported"):
        centralized.mnist(data_dir=tmp_path, tfds_data_dir=tmp_path / "tfds", download=True)


@pytest.mark.slow
def test_cli_reports_the_missing_folder_in_one_line(tmp_path):
    # The command: before, about 211 s of download retries and a misleading message.
    env = {**os.environ, "FEDJAX_SIM_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [
        sys.executable,
        "-m",
        "fedjax_sim.cli",
        "run",
        "--config",
        "configs/mnist_2nn_iid.py:smoke",
        "--config.dataset.kwargs.data_dir=/nonexistent",
        "--workdir",
        str(tmp_path / "w"),
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "urllib3" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("fedjax-sim: error: mnist: /nonexistent/mnist is missing"), out.stderr
    assert seconds < 60, seconds  # JAX's import and the config; measured about 6 s


# ---------------------------------------------------------------------------------------------
# The lock.

_HOLD = """
    import sys
    from fedjax_sim.data.files import exclusive_lock
    with exclusive_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold it until the test writes a line
"""


def test_a_second_holder_waits_until_the_first_releases(tmp_path):
    lock = tmp_path / "sub" / "x.lock"
    holder = _python(_HOLD, str(lock), stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(TimeoutError, match="still locked by another process"):
            with exclusive_lock(lock, timeout=0.3):
                pass
        acquired = []
        waiter = threading.Thread(target=lambda: _acquire(lock, acquired))
        waiter.start()
        time.sleep(0.5)
        assert not acquired  # blocked while the other process holds the lock
        released = time.monotonic()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        waiter.join(timeout=30)
        assert acquired and acquired[0] >= released
    finally:
        holder.kill()
        holder.communicate()
    with exclusive_lock(lock, timeout=0):  # free again, and the file stays usable
        pass


def _acquire(lock: Path, acquired: list) -> None:
    with exclusive_lock(lock):
        acquired.append(time.monotonic())


def test_two_holders_in_one_process_exclude_each_other(tmp_path):
    # flock locks belong to the open file, not the process: threads sharing a cache are safe.
    lock = tmp_path / "y.lock"
    with exclusive_lock(lock):
        with pytest.raises(TimeoutError):
            with exclusive_lock(lock, timeout=0.1):
                pass


_PREPARE = """
    import json, logging, sys, time
    import tensorflow_datasets  # imported before the barrier, so both reach TFDS together
    from fedjax_sim.data import centralized, registry
    logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
    manual, tfds_dir, me, other = sys.argv[1:]
    open(me, "w").close()
    deadline = time.monotonic() + 120
    while not __import__("os").path.exists(other) and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.perf_counter()
    splits, num_classes = centralized.mnist_raw(manual_dir=manual, tfds_data_dir=tfds_dir)
    print(json.dumps({
        "train": int(len(splits["train"]["y"])), "test": int(len(splits["test"]["y"])),
        "num_classes": num_classes, "seconds": time.perf_counter() - start,
    }))
"""


@pytest.mark.realdata
@pytest.mark.slow
def test_two_processes_prepare_mnist_into_one_cache(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="preparing MNIST needs tensorflow-datasets")
    manual = real_data("mnist")
    tfds_dir = tmp_path / "tfds"  # fresh: both processes find MNIST unprepared
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [
        _python(_PREPARE, str(manual), str(tfds_dir), str(ready[i]), str(ready[1 - i]))
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert (got["train"], got["test"], got["num_classes"]) == (60_000, 10_000, 10)
    # One process prepared; the other waited on the lock, then read what the first wrote.
    waited = ["waiting for" in err for _, err in results]
    reused = ["prepared by another process meanwhile" in err for _, err in results]
    assert sorted(waited) == [False, True] and reused == waited, [e[-2000:] for _, e in results]
    assert (tfds_dir / "mnist.lock").is_file()

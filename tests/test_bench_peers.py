"""scripts/bench_peers.py's pure parts: the workload, its data, the statistics and the table,
peer discovery, argument errors and the runner protocol (no peer installed, no JAX round)."""

import importlib.util
import io
import json
import os
import stat
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


def load_bench_peers():
    path = os.path.join(REPO_ROOT, "scripts", "bench_peers.py")
    spec = importlib.util.spec_from_file_location("fedjax_sim_bench_peers", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bp = load_bench_peers()


def test_parse_workload_reads_model_cohort_clients_examples_and_batch():
    w = bp.parse_workload("logreg-1000x20", seed=3)
    assert (w.model, w.num_clients, w.population, w.examples_per_client, w.batch_size) == (
        "logreg",
        1000,
        1000,
        20,
        8,
    )
    assert w.seed == 3 and w.name == "logreg-1000x20b8"
    # ceil(20 / 8) = 3 local steps (8, 8, 4); 1000 clients x 20 examples per round.
    assert w.steps_per_client == 3
    assert w.examples_per_round == 20_000
    assert bp.Workload.from_json(w.to_json()) == w
    c = bp.parse_workload("cnn_cifar-50of1000x50b10")
    assert (c.num_clients, c.population, c.batch_size) == (50, 1000, 10)
    assert c.name == "cnn_cifar-50of1000x50b10" and c.input_shape == (32, 32, 3)
    assert c.examples_per_round == 2500 and c.steps_per_client == 5
    # Cohorts walk the population: round 19 takes clients 950..999, round 20 wraps to 0..49.
    assert c.cohort(19) == list(range(950, 1000)) and c.cohort(20) == list(range(50))
    assert bp.parse_workload("mlp-4x8", batch_size=2).batch_size == 2


def test_default_workloads_are_the_issues():
    ws = [bp.parse_workload(n) for n in bp.DEFAULT_WORKLOADS]
    assert [(w.model, w.num_clients, w.population, w.examples_per_client, w.batch_size)
            for w in ws] == [
        ("logreg", 1000, 1000, 20, 10),
        ("mlp", 100, 100, 32, 8),
        ("cnn_emnist", 100, 100, 32, 8),
        ("cnn_cifar", 50, 1000, 50, 10),
    ]  # fmt: skip
    w = ws[0]
    assert (w.local_epochs, w.client_learning_rate, w.server_learning_rate) == (1, 0.1, 1.0)
    every = ["fedjax", "flower", "pfl", "torch"]
    # The CNN rows also run the plain PyTorch loop, the CPU kernels' reference.
    assert [bp.workload_peers(w, every, every_peer=False) for w in ws] == [
        ["fedjax"],
        ["fedjax", "flower"],
        ["fedjax", "torch"],
        ["pfl", "torch"],
    ]
    # Every peer that has the model: FedJAX has no CIFAR network.
    assert bp.workload_peers(ws[3], every, every_peer=True) == ["flower", "pfl", "torch"]
    assert bp.workload_peers(ws[1], ["pfl"], every_peer=False) == []


def test_training_flops_per_example_match_the_issue_and_xla():
    # Issue 26: 71.6 MFLOP per EMNIST example, 99.5 per CIFAR example.
    assert bp.training_flops_per_example("cnn_emnist") == 71_605_248
    assert bp.training_flops_per_example("cnn_cifar") == 99_456_000
    assert bp.training_flops_per_example("mlp") is None
    # Against XLA's cost analysis of one example's gradient through the built-in model (its
    # convolutions' custom VJP included): the matmul and convolution FLOPs dominate.
    import jax
    import jax.numpy as jnp

    import fedjax_sim as fs

    model = fs.get_model("cnn_emnist", num_classes=10, input_shape=(32, 32, 3))
    params = model.init(jax.random.key(0))
    x = jnp.zeros((1, 32, 32, 3))

    def loss(p):
        return jnp.sum(model.apply(p, x, train=False))

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    analysis = compiled.cost_analysis()
    xla = float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])
    assert xla == pytest.approx(bp.training_flops_per_example("cnn_cifar"), rel=0.03)


@pytest.mark.parametrize(
    "name, message",
    [
        ("logreg", "expected MODEL-\\[COHORTof\\]CLIENTSxEXAMPLES"),
        ("logreg-10-20", "expected MODEL-"),
        ("resnet-10x20", "unknown model 'resnet'; known models: cnn_emnist, mlp, logreg"),
        ("mlp-0x20", "num_clients must be >= 1"),
        ("mlp-20of10x20", "a cohort of 20 needs a population of at least as many, got 10"),
    ],
)
def test_parse_workload_errors(name, message):
    with pytest.raises(ValueError, match=message):
        bp.parse_workload(name)


def test_client_data_is_emnist_shaped_deterministic_and_per_client():
    w = bp.parse_workload("mlp-3x20")
    x, y = bp.client_data(w, 1)
    assert x.shape == (20, 28, 28, 1) and x.dtype == np.float32
    assert bp.client_data(bp.parse_workload("cnn_cifar-3x4"), 0)[0].shape == (4, 32, 32, 3)
    assert y.shape == (20,) and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() < 1.0
    assert 0 <= y.min() and y.max() < 62
    x2, y2 = bp.client_data(w, 1)  # the same in every process and framework
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, bp.client_data(w, 2)[0])


def test_batch_order_is_a_permutation_per_epoch_in_batches():
    w = bp.parse_workload("mlp-3x20", local_epochs=2)
    batches = bp.batch_order(w, client=0, round_num=0)
    # 2 epochs of 20 examples in batches of 8: sizes 8, 8, 4 twice.
    assert [len(b) for b in batches] == [8, 8, 4, 8, 8, 4]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(20))
    again = bp.batch_order(w, client=0, round_num=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = bp.batch_order(w, client=0, round_num=1)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_summarize_and_ratio():
    s = bp.summarize([3.0, 1.0, 2.0, 10.0])
    # median of (1, 2, 3, 10) = 2.5; best 1; mean 16 / 4 = 4.
    assert s == {"n": 4, "median_s": 2.5, "best_s": 1.0, "mean_s": 4.0}
    assert bp.summarize([]) == {"n": 0, "median_s": None, "best_s": None, "mean_s": None}
    assert bp.ratio(3.0, 1.5) == 2.0
    assert bp.ratio(None, 1.0) is None and bp.ratio(1.0, None) is None
    assert bp.ratio(1.0, 0.0) is None


def test_formatting():
    assert bp.format_seconds(123.4) == "123"
    assert bp.format_seconds(12.34) == "12.3"
    assert bp.format_seconds(1.234) == "1.23"
    assert bp.format_seconds(0.1234) == "0.123"
    assert bp.format_seconds(0.001234) == "0.0012"
    assert bp.format_seconds(None) == "n/a"
    assert bp.format_ratio(2.345) == "2.35x"
    assert bp.format_ratio(23.45) == "23.4x"
    assert bp.format_ratio(234.5) == "234x"
    assert bp.format_ratio(None) == "n/a"
    assert bp.short_reason("a |b\n  c", limit=90) == "a /b c"
    assert bp.short_reason("x" * 100, limit=10) == "xxxxxxx..."


def results_of(workload: str, frameworks: dict) -> dict:
    """What ``bench_peers.main`` collects, for one workload whose frameworks ran as given."""
    w = bp.parse_workload(workload)
    entry = {"name": w.name, "workload": bp.dataclasses.asdict(w), "frameworks": frameworks}
    return {"workloads": [entry]}


def test_markdown_table_rows_ratios_targets_and_unavailable_peers():
    results = results_of(
        "mlp-100x32",
        {
            "fedjax_sim": {"status": "ok", "median_s": 0.5},
            "fedjax": {"status": "ok", "median_s": 1.9},
            "flower": {"status": "failed", "reason": "round failed: boom | bang"},
            "pfl": {"status": "unavailable", "reason": "install failed: no wheel"},
        },
    )
    bp.add_rates(results, peak_flops=1e11)  # a dense model: no FLOPs, nothing added
    assert "gflops" not in results["workloads"][0]["frameworks"]["fedjax_sim"]
    lines = bp.markdown_table(results).splitlines()
    assert lines[0] == "| workload | fedjax_sim s/round | peer | peer s/round | ratio | target |"
    assert lines[1] == "|---|---|---|---|---|---|"
    # FedJAX: 1.9 / 0.5 = 3.8x, under its 4x target.
    assert lines[2] == "| mlp-100x32b8 | 0.500 | FedJAX 0.0.17 | 1.90 | 3.80x | >= 4x: NOT met |"
    assert lines[3] == (
        "| mlp-100x32b8 | 0.500 | Flower 1.42 | unavailable: round failed: boom / bang | n/a "
        "| >= 30x: not measured |"
    )
    assert lines[4] == (
        "| mlp-100x32b8 | 0.500 | pfl-research 0.6 | unavailable: install failed: no wheel "
        "| n/a | >= 2x: not measured |"
    )
    assert len(lines) == 5
    assert bp.missed_targets(results) == ["mlp-100x32b8 fedjax: 3.80x < 4x"]


def test_the_plain_pytorch_loop_is_a_reference_without_a_target():
    results = results_of(
        "cnn_emnist-100x32b8",
        {
            "fedjax_sim": {"status": "ok", "median_s": 3.0},
            "torch": {"status": "ok", "median_s": 2.4},
        },
    )
    row = bp.markdown_table(results).splitlines()[2]
    assert row.startswith("| cnn_emnist-100x32b8 | 3.00 | plain PyTorch loop | 2.40 | 0.80x |")
    assert row.endswith("| reference |")
    assert bp.missed_targets(results) == []  # slower than the reference misses no target


def test_cnn_rows_report_gflops_and_mfu():
    results = results_of(
        "cnn_cifar-50of1000x50b10",
        {"fedjax_sim": {"status": "ok", "median_s": 1.0}, "pfl": {"status": "ok", "median_s": 2.5}},
    )
    bp.add_rates(results, peak_flops=500e9)
    ours = results["workloads"][0]["frameworks"]["fedjax_sim"]
    # 2,500 examples x 99.456 MFLOP in 1 s = 248.6 GFLOP/s, 49.7% of 500.
    assert ours["gflops"] == pytest.approx(248.64)
    assert ours["mfu"] == pytest.approx(0.49728)
    row = bp.markdown_table(results).splitlines()[2]
    assert row == (
        "| cnn_cifar-50of1000x50b10 | 1.00 (249 GFLOP/s, MFU 50%) | pfl-research 0.6 "
        "| 2.50 (99 GFLOP/s, MFU 20%) | 2.50x | >= 2x: met |"
    )
    assert bp.missed_targets(results) == []


def test_markdown_table_without_fedjax_sim_gives_no_ratio():
    results = {
        "workloads": [
            {
                "name": "logreg-10x32",
                "frameworks": {
                    "fedjax_sim": {"status": "failed", "reason": "setup failed: x"},
                    "fedjax": {"status": "ok", "median_s": 0.02},
                },
            }
        ]
    }
    row = bp.markdown_table(results).splitlines()[2]
    assert row == (
        "| logreg-10x32 | unavailable: setup failed: x | FedJAX 0.0.17 | 0.020 | n/a "
        "| >= 4x: not measured |"
    )
    assert bp.missed_targets(results) == []


def test_peer_python_reports_missing_failed_and_installed(tmp_path):
    prefix = str(tmp_path)
    python, why = bp.peer_python(prefix, "fedjax")
    assert python is None and why.startswith("not installed (bash scripts/setup_peers.sh")

    (tmp_path / "flower").mkdir()
    (tmp_path / "flower" / "status").write_text("failed\n")
    (tmp_path / "flower" / "error.txt").write_text("pip install x exited 1: No matching dist\n")
    python, why = bp.peer_python(prefix, "flower")
    assert python is None
    assert why == "install failed: pip install x exited 1: No matching dist"

    venv_bin = tmp_path / "pfl" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("")
    python, why = bp.peer_python(prefix, "pfl")
    assert python is None and why.startswith("install incomplete")
    (tmp_path / "pfl" / "status").write_text("ok\n")
    assert bp.peer_python(prefix, "pfl") == (str(venv_bin / "python"), "")

    # The plain PyTorch loop runs in pfl-research's venv, which installs torch.
    assert bp.peer_python(prefix, "torch") == (str(venv_bin / "python"), "")
    python, why = bp.peer_python(str(tmp_path / "none"), "torch")
    assert python is None and why.endswith("none pfl)")

    with pytest.raises(ValueError, match="unknown peer 'tff'; known peers: fedjax, flower, pfl"):
        bp.peer_python(prefix, "tff")


def test_parse_args_defaults_and_quick(tmp_path):
    args = bp.parse_args(["--out", str(tmp_path / "b.json")])
    assert args.rounds == bp.FULL_ROUNDS and args.warmup == 1
    assert args.peer_list == ["fedjax", "flower", "pfl", "torch"]
    assert [w.name for w in args.workload_list] == list(bp.DEFAULT_WORKLOADS)
    assert args.torch_threads == bp.usable_cpus() and not args.one_core
    one = bp.parse_args(["--one_core"])
    assert one.one_core and one.torch_threads == 1
    assert args.log_dir == str(tmp_path / "b_logs")
    quick = bp.parse_args(["--quick", "--peers", "pfl,fedjax,pfl", "--workloads", "mlp-4x8"])
    assert quick.rounds == bp.QUICK_ROUNDS
    assert quick.peer_list == ["pfl", "fedjax"]
    assert [w.name for w in quick.workload_list] == ["mlp-4x8b8"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--warmup", "0"], "--warmup must be >= 1"),
        (["--torch_threads", "0"], "--torch_threads must be >= 1"),
        (["--peers", "fedjax,tff"], "unknown peer tff; known: fedjax, flower, pfl, torch"),
        (["--one_core", "--torch_threads", "2"], "--one_core runs one torch thread, got"),
        (["--one_core", "--torch_threads", "0"], "--torch_threads must be >= 1, got 0"),
        (["--workloads", "cnn-10x3"], "unknown model 'cnn'"),
        (["--workloads", ","], "--workloads is empty"),
        (["--runner", "fedjax"], "--runner needs --workload_json and --report_fd"),
    ],
)
def test_parse_args_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bp.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def read_events(fd):
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        data = b""
    return [json.loads(line) for line in data.decode().splitlines()]


def test_pacer_runs_warmup_then_one_round_per_command(monkeypatch):
    read_fd, write_fd = os.pipe()
    try:
        monkeypatch.setattr(sys, "stdin", io.StringIO("round\nround\nquit\n"))
        pacer = bp.Pacer(write_fd, warmup=2, setup_start=0.0, info={"framework": "x"})
        rounds = 0
        while pacer.boundary({"k": rounds}):
            rounds += 1
        # 2 warmup rounds without commands, then 2 commanded rounds, then quit.
        assert rounds == 4
        events = read_events(read_fd)
        assert [e["event"] for e in events] == ["ready", "round", "round"]
        ready = events[0]
        assert ready["framework"] == "x" and len(ready["warmup_s"]) == 2
        assert ready["setup_s"] >= 0
        # Each round reports the extra its caller passed at the boundary that ended it.
        assert [e["k"] for e in events[1:]] == [3, 4]
        assert all(e["seconds"] >= 0 for e in events[1:])
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_pacer_stops_at_end_of_input(monkeypatch):
    read_fd, write_fd = os.pipe()
    try:
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        pacer = bp.Pacer(write_fd, warmup=1, setup_start=0.0, info={})
        assert pacer.boundary() is True  # the warmup round starts at once
        assert pacer.boundary() is False  # no command: stop
        assert [e["event"] for e in read_events(read_fd)] == ["ready"]
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_runner_process_reports_a_runner_that_dies(tmp_path):
    message = dead_runner_message(tmp_path, "echo 'ImportError: no module named fedjax'", "fedjax")
    assert "ImportError: no module named fedjax" in message


def dead_runner_message(tmp_path, shell: str, framework: str, **kwargs) -> str:
    """The error of a runner whose Python is a shell script running ``shell`` then exiting 3."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\n{shell}\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    w = bp.parse_workload("logreg-2x8")
    proc = bp.RunnerProcess(framework, str(fake), w, 1, str(tmp_path / "runner.log"), **kwargs)
    try:
        with pytest.raises(RuntimeError, match="runner exited with status 3") as exc:
            proc.event(timeout=30)
        return str(exc.value)
    finally:
        proc.close()


def test_one_core_starts_runners_and_the_peak_on_one_core_with_one_xla_thread(
    tmp_path, monkeypatch
):
    # Every thread of a --one_core runner is on the orchestrator's first allowed core from exec
    # on (a shell reports its own affinity), XLA's Eigen on one thread, torch on one thread.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    first = str(min(os.sched_getaffinity(0)))
    shell = 'grep Cpus_allowed_list /proc/self/status; echo "flags: $XLA_FLAGS args: $@"'
    message = dead_runner_message(tmp_path, shell, "torch", torch_threads=1, one_core=True)
    assert f"Cpus_allowed_list: {first} /" in message.replace("\t", " ")
    assert "flags: --xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false" in (
        message
    )
    assert "--torch_threads 1" in message
    # Without --one_core the runner starts as the orchestrator runs (here: unpinned flags).
    everywhere = dead_runner_message(tmp_path, shell, "torch")
    assert "flags: --xla_force_host_platform_device_count=2 args:" in everywhere
    # The matmul peak is measured the same way (bench.py's measure_peak_flops, here a stand-in
    # that reports the cores it may use and whether XLA's Eigen is single-threaded).
    stand_in = tmp_path / "bench.py"
    stand_in.write_text(
        "import os\n"
        "def measure_peak_flops(n, reps):\n"
        "    one = '--xla_cpu_multi_thread_eigen=false' in os.environ.get('XLA_FLAGS', '')\n"
        "    return 1000.0 * len(os.sched_getaffinity(0)) + one\n"
    )
    monkeypatch.setattr(bp, "BENCH_PY", str(stand_in))
    assert bp.measure_peak_flops(one_core=True) == 1001.0
    assert bp.measure_peak_flops() == 1000.0 * bp.usable_cpus()


def test_a_one_core_table_has_no_targets():
    results = results_of(
        "cnn_cifar-50of1000x50b10",
        {
            "fedjax_sim": {"status": "ok", "median_s": 6.0},
            "pfl": {"status": "ok", "median_s": 6.6},
            "torch": {"status": "ok", "median_s": 6.3},
        },
    )
    assert bp.missed_targets(results) == ["cnn_cifar-50of1000x50b10 pfl: 1.10x < 2x"]
    results["meta"] = {"one_core": True}  # the issue's targets are for the whole machine
    rows = bp.markdown_table(results).splitlines()[2:]
    assert [r.rsplit("|", 2)[1].strip() for r in rows] == ["per core: no target"] * 2
    assert "| 1.10x |" in rows[0] and "| 1.05x |" in rows[1]
    assert bp.missed_targets(results) == []


def test_one_command_measures_fedjax_sim_and_names_a_missing_peer(tmp_path):
    # The whole orchestration on a tiny workload: fedjax_sim's runner in its own process (the
    # public API, compiled once), a peer that is not installed reported with how to install it.
    out = tmp_path / "peers.json"
    argv = ["--workloads", "logreg-4of8x8b4", "--peers", "pfl", "--every_peer", "--rounds", "2"]
    argv += ["--prefix", str(tmp_path / "no_peers"), "--out", str(out)]
    assert bp.main(argv) == 0
    result = json.loads(out.read_text())
    (wl,) = result["workloads"]
    ours, pfl = wl["frameworks"]["fedjax_sim"], wl["frameworks"]["pfl"]
    assert ours["status"] == "ok" and ours["n"] == 2 and ours["median_s"] > 0
    assert ours["compiles"] == 1 and ours["strategy"] == "sequential"
    assert ours["pack_median_s"] > 0  # the next round packed while this one ran
    assert pfl["status"] == "unavailable" and "bash scripts/setup_peers.sh" in pfl["reason"]
    assert "| logreg-4of8x8b4 |" in result["table_markdown"]
    assert result["meta"]["matmul_peak_gflops"] > 0

"""scripts/bench.py and scripts/bench_sweep.py run end to end on tiny cases."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from tests.conftest import REPO_ROOT


def load_script(name="bench"):
    path = os.path.join(REPO_ROOT, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"fedjax_sim_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: its dataclasses (Flax modules) need it
    spec.loader.exec_module(module)
    return module


def test_bench_tiny_case_writes_rows_that_match_the_reference(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "bench.json"
    argv = ["--out", str(out), "--models", "logreg", "--cohorts", "10", "--repeats", "1"]
    argv += ["--min_seconds", "0", "--max_seconds", "1", "--no-check"]
    assert bench.main(argv) == 0

    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["strategy"] for r in rows] == [*bench.STRATEGIES, bench.REFERENCE, bench.FUSED]
    for row in rows:
        assert (row["model"], row["num_clients"]) == ("logreg", 10)
        assert row["match"] is True, row
        assert row["params_rel_err"] <= 1e-4
        assert row["clients_per_s"] > 0
        assert row["examples_per_s"] == pytest.approx(20 * row["clients_per_s"])
        assert row["compile_s"] > 0 and row["mfu"] > 0
        assert row["times_s"]
    reference, fused = rows[-2], rows[-1]
    assert reference["x_ref"] == 1.0 and fused["x_fused"] == 1.0
    assert max(r["x_best"] for r in rows if r["strategy"] in bench.STRATEGIES) == 1.0
    auto = rows[bench.STRATEGIES.index("auto")]
    assert auto["resolved"] in ("vmap", "chunked", "sequential")  # what auto ran

    meta = result["meta"]
    assert meta["backend"] == "cpu" and meta["peak_gflops"] > 0
    checks = {c["name"]: c["passed"] for c in result["checks"]}
    assert checks["every strategy's params match the reference"] is True
    assert checks["auto >= 5x reference on logreg C=1000"] is None  # not run

    printed = capsys.readouterr().out
    assert f"auto->{auto['resolved']}" in printed and "CHECK" in printed


def test_bench_sweep_tiny_case_matches_solo_runs(tmp_path):
    module = load_script("bench_sweep")
    out = tmp_path / "bench_sweep.json"
    argv = ["--rounds", "2", "--local-epochs", "1", "--axis", "data_seed", "--out", str(out)]
    argv += ["--two-nn-rounds", "0"]  # the 2NN comparison: the next test
    assert module.main(argv) == 0  # every member within 1e-5 of its solo run
    result = json.loads(out.read_text())
    assert result["members"] == 16 and result["axes"] == ["client.learning_rate", "data_seed"]
    assert result["max_param_diff"] <= 1e-5
    assert result["vectorized_s"] > 0 and result["sequential_s"] > 0


def test_bench_sweep_numpy_2nn_reference_is_fedavg():
    # The NumPy FedAvg the 2NN round is timed against trains what fs.fedavg trains: ragged
    # clients (25, 20, 13 examples: padded last batches, examples-weighted mean), two rounds.
    module = load_script("bench_sweep")
    rng = np.random.default_rng(0)
    ds = fs.FederatedDataset(
        {
            f"c{c}": {
                "x": rng.random((n, 28, 28, 1), dtype=np.float32),
                "y": rng.integers(0, 10, n, dtype=np.int32),
            }
            for c, n in enumerate((25, 20, 13))
        }
    )
    model = fs.get_model("mlp", num_classes=10, input_shape=(28, 28, 1))
    init = model.init(jax.random.key(0))
    cohort = fs.pack_cohort(ds, range(3), batch_size=10, seed=0, round_num=0)
    algo = fs.fedavg(model, optax.sgd(0.215), executor=fs.Executor("sequential"))
    state = algo.init(init)
    for _ in range(2):
        state, _ = jax.jit(algo.apply)(state, cohort, jax.random.key(1))
    flat = module.two_nn_leaves(init)
    x = np.asarray(cohort.batches["x"])
    x = x.reshape(x.shape[:3] + (-1,))
    ref, times, _ = module.numpy_fedavg_2nn(
        flat, x, np.asarray(cohort.batches["y"]), np.asarray(cohort.mask), 0.215, rounds=2
    )
    assert len(times) == 2
    ours = module.two_nn_leaves(state.params)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, flat, strict=True))
    assert moved > 1e-2  # the rounds trained
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_bench_failed_program_is_a_row_and_the_rest_still_run(tmp_path, capsys, monkeypatch):
    # On a GPU a 1000-client vmapped ResNet can run out of memory: that program's row says why
    # (failing to compile, or in its first round) and the case's other programs still run.
    bench = load_script()
    real = bench.strategy_runner

    def flaky(strategy, *args, **kwargs):
        if strategy == "vmap":
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")
        runner = real(strategy, *args, **kwargs)
        if strategy == "chunked":

            def oom():
                raise MemoryError("first round out of memory")

            runner.call = oom
        return runner

    monkeypatch.setattr(bench, "strategy_runner", flaky)
    out = tmp_path / "bench.json"
    argv = ["--out", str(out), "--models", "logreg", "--cohorts", "4", "--repeats", "1"]
    argv += ["--min_seconds", "0", "--max_seconds", "1", "--no-check"]
    assert bench.main(argv) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {*bench.STRATEGIES, bench.REFERENCE, bench.FUSED}
    assert rows["vmap"]["failed"].startswith("RuntimeError: RESOURCE_EXHAUSTED")
    assert rows["chunked"]["failed"] == "MemoryError: first round out of memory"
    for name in ("vmap", "chunked"):
        assert rows[name]["clients_per_s"] is None and rows[name]["match"] is None
    assert rows["vmap"]["compile_s"] is None  # it never compiled
    assert rows["chunked"]["compile_s"] > 0 and rows["chunked"]["mem_mib"] > 0  # it did
    for name in ("sequential", "auto", bench.REFERENCE, bench.FUSED):
        assert "failed" not in rows[name] and rows[name]["clients_per_s"] > 0
        assert rows[name]["match"] is True
    # fs.simulate's measured auto skips a candidate that fails, as this picks from the rest.
    assert rows["auto"]["measured_auto"] == "sequential"
    assert rows["auto"]["measured_auto_of"] == ["sequential"]
    printed = capsys.readouterr().out
    assert "FAILED RuntimeError: RESOURCE_EXHAUSTED" in printed
    assert "measured auto picks sequential (of sequential)" in printed


def test_bench_a_failed_auto_fails_its_check_and_other_errors_stop_the_run(tmp_path, monkeypatch):
    bench = load_script()
    real = bench.strategy_runner
    error = {"auto": RuntimeError("RESOURCE_EXHAUSTED: out of memory")}

    def failing(strategy, *args, **kwargs):
        if strategy in error:
            raise error[strategy]
        return real(strategy, *args, **kwargs)

    monkeypatch.setattr(bench, "strategy_runner", failing)
    argv = ["--out", str(tmp_path / "b.json"), "--models", "logreg", "--cohorts", "4"]
    argv += ["--repeats", "1", "--min_seconds", "0", "--max_seconds", "1"]
    argv += ["--strategies", "sequential,auto"]
    assert bench.main(argv) == 1  # the checks run: the auto the table measures failed
    checks = {c["name"]: c for c in json.loads((tmp_path / "b.json").read_text())["checks"]}
    check = checks[f"auto >= {bench.AUTO_VS_BEST_TARGET:g}x best everywhere"]
    assert check["passed"] is False and "auto failed in logreg C=4" in check["detail"]
    # A bug is not an out-of-memory row: it stops the run.
    error["auto"] = TypeError("unexpected keyword argument")
    with pytest.raises(TypeError, match="unexpected keyword"):
        bench.main(argv)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the refusal and caps are a CPU's")
def test_bench_gpu_table_shapes_and_refusal_on_cpu(tmp_path):
    bench = load_script()
    with pytest.raises(SystemExit, match="--gpu on a CPU backend.*--cohorts"):
        bench.main(["--out", str(tmp_path / "b.json"), "--gpu"])
    args = bench.parse_args(["--out", "b.json", "--gpu", "--cohorts", "3"])
    assert bench.select_cases(args) == [("cnn_emnist", 3), ("resnet18_gn", 3)]
    args = bench.parse_args(["--out", "b.json", "--gpu", "--cohorts", "3,1000"])
    assert ("resnet18_gn", 1000) not in bench.select_cases(args)  # capped on a CPU
    cohort = bench.make_cohort(3, bench.parse_args(["--out", "b.json"]), "resnet18_gn")
    assert cohort.batches["x"].shape[-3:] == (32, 32, 3)  # CIFAR-10's images
    assert int(np.max(cohort.batches["y"])) < 10
    assert bench.get_model("resnet18_gn").input_shape == (32, 32, 3)
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "b.json", "--strategies", "vmap,nope"])


def test_bench_sweep_by_hand_bound_is_the_members_own_sgd():
    # The per-step bound bench_sweep.py times trains what each member's local_train trains.
    from fedjax_sim.core.client import local_train
    from fedjax_sim.core.task import mean_loss_fn

    module = load_script("bench_sweep")
    model = fs.get_model("logreg", num_classes=10, input_shape=(60,))
    rng = np.random.default_rng(0)
    batches = {
        "x": jax.numpy.asarray(rng.random((5, 10, 60), dtype=np.float32)),
        "y": jax.numpy.asarray(rng.integers(0, 10, (5, 10)), jax.numpy.int32),
    }
    params = model.init(jax.random.key(0))
    (name,) = params  # one dense layer: {"kernel": [60, 10], "bias": [10]}
    lrs = [0.5, 2.0]
    kernel = np.stack([np.asarray(params[name]["kernel"])] * 2, axis=1)
    bias = np.stack([np.asarray(params[name]["bias"])] * 2)
    wide_k, wide_b = module.side_by_side_sgd(
        jax.numpy.asarray(kernel), jax.numpy.asarray(bias), jax.numpy.asarray(lrs), batches, 5
    )
    for m, lr in enumerate(lrs):
        solo = local_train(
            params, batches, jax.numpy.ones((5, 10), bool), jax.random.key(1),
            loss_fn=mean_loss_fn(model), optimizer=optax.sgd(lr),
        ).params[name]  # fmt: skip
        np.testing.assert_allclose(wide_k[:, m], solo["kernel"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(wide_b[m], solo["bias"], rtol=1e-5, atol=1e-6)
        assert not np.allclose(solo["kernel"], params[name]["kernel"])  # it trained

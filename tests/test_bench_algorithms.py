"""scripts/bench.py --algorithms: SCAFFOLD's and FedNova's rows and their Python-loop references."""

import json

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from tests.test_bench import load_script


def test_bench_algorithms_tiny_case_rows_match_their_references(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "bench.json"
    argv = ["--out", str(out), "--models", "logreg", "--cohorts", "10", "--repeats", "1"]
    argv += ["--min_seconds", "0", "--max_seconds", "1", "--no-check"]
    argv += ["--algorithms", "fedavg,scaffold,fednova"]
    assert bench.main(argv) == 0

    result = json.loads(out.read_text())
    rows = result["rows"]
    by_algo = {}
    for row in rows:
        by_algo.setdefault(row["algorithm"], []).append(row["strategy"])
    assert by_algo == {
        "fedavg": [*bench.STRATEGIES, bench.REFERENCE, bench.FUSED],
        "scaffold": ["auto", bench.REFERENCE],
        "fednova": ["auto", bench.REFERENCE],
    }
    for row in rows:
        assert row["match"] is True, row
        assert row["params_rel_err"] <= 1e-4
        if row["algorithm"] == "scaffold":
            assert row["controls_rel_err"] <= 1e-4
        if row["strategy"] == bench.REFERENCE:
            assert row["x_ref"] == 1.0
    assert all(r["x_fused"] is None for r in rows if r["algorithm"] != "fedavg")

    checks = {c["name"]: c["passed"] for c in result["checks"]}
    assert checks["every strategy's params match the reference"] is True
    # The timings are noise at this size, so the ratio check may go either way: it must say
    # what the rows it was given say, x_ref(algo) / x_ref(fedavg) >= 0.8 on the one case.
    auto = {r["algorithm"]: r for r in rows if r["strategy"] == "auto"}
    for algo in ("scaffold", "fednova"):
        expected = auto[algo]["x_ref"] / auto["fedavg"]["x_ref"] >= 0.8
        assert checks[f"ratio({algo}) >= 80% of ratio(fedavg)"] is expected
    assert result["meta"]["algorithms"] == ["fedavg", "scaffold", "fednova"]
    printed = capsys.readouterr().out
    assert "scaffold" in printed and "ratio(fednova)" in printed


def timing_row(algorithm, strategy, x_ref, model="logreg", num_clients=100):
    """A row of bench.py's output with the fields its checks read."""
    return {
        "model": model,
        "num_clients": num_clients,
        "algorithm": algorithm,
        "strategy": strategy,
        "resolved": "vmap" if strategy == "auto" else None,
        "x_ref": x_ref,
        "x_best": 1.0,
        "clients_per_s": 1.0,
        "match": True,
        "params_rel_err": 0.0,
    }


def test_ratio_check_compares_each_algorithm_with_fedavg_case_by_case():
    bench = load_script()
    rows = [
        # mlp C=10: fedavg 10x its reference; scaffold 8x (ratio 0.8, inside), fednova 7.9x
        # (0.79, outside).
        timing_row("fedavg", "auto", 10.0, "mlp", 10),
        timing_row("scaffold", "auto", 8.0, "mlp", 10),
        timing_row("fednova", "auto", 7.9, "mlp", 10),
        # logreg C=100: fedavg 2x; scaffold 1.6x (0.8, inside), fednova 3x (1.5, inside).
        timing_row("fedavg", "auto", 2.0),
        timing_row("scaffold", "auto", 1.6),
        timing_row("fednova", "auto", 3.0),
        # Reference rows (x_ref 1 by definition) are not autos: the check ignores them.
        timing_row("fedavg", bench.REFERENCE, 1.0),
        timing_row("fednova", bench.REFERENCE, 1.0),
    ]
    checks = {name: (ok, detail) for name, ok, detail in bench.run_checks(rows)}
    assert checks["ratio(scaffold) >= 80% of ratio(fedavg)"][0] is True
    # One case outside fails the algorithm's check, whatever its other cases do.
    ok, detail = checks["ratio(fednova) >= 80% of ratio(fedavg)"]
    assert ok is False and "mlp C=10 7.90x vs 10.00x (0.79 OUT)" in detail
    assert "logreg C=100 3.00x vs 2.00x (1.50)" in detail
    # A case without FedAvg's own reference run cannot be compared: not run, not passed.
    alone = [timing_row("fedavg", "auto", None), timing_row("scaffold", "auto", 5.0)]
    checks = {name: ok for name, ok, _ in bench.run_checks(alone)}
    assert checks["ratio(scaffold) >= 80% of ratio(fedavg)"] is None


def test_bench_default_runs_fedavg_only(tmp_path):
    bench = load_script()
    args = bench.parse_args(["--out", str(tmp_path / "x.json")])
    assert args.algorithm_list == ("fedavg",)
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x.json", "--algorithms", "fedavg,nope"])


def ragged_cohort(sizes, batch_size=10):
    """Clients of unequal sizes, so their real local step counts differ (FedNova != FedAvg)."""
    rng = np.random.default_rng(3)
    ds = fs.FederatedDataset(
        {
            f"c{i}": {
                "x": rng.random((n, 28, 28, 1), dtype=np.float32),
                "y": rng.integers(0, 62, size=n, dtype=np.int32),
            }
            for i, n in enumerate(sizes)
        }
    )
    return fs.pack_cohort(ds, range(len(sizes)), batch_size=batch_size, seed=0, round_num=0)


@pytest.mark.parametrize("algorithm", ["scaffold", "fednova"])
@pytest.mark.parametrize("strategy", ["sequential", "vmap"])
def test_reference_loops_equal_the_library_on_ragged_clients(algorithm, strategy, tmp_path):
    bench = load_script()
    args = bench.parse_args(["--out", str(tmp_path / "x.json"), "--learning_rate", "0.1"])
    cohort_np = ragged_cohort([5, 13, 20, 41])  # 1, 2, 2 and 5 real steps
    model = fs.get_model("logreg", num_classes=62, input_shape=(28, 28, 1))
    params = model.init(jax.random.key(0))
    key = jax.random.key(1)

    ours = bench.strategy_runner(
        strategy, model, params, jax.device_put(cohort_np), key, args, None, algorithm
    )
    ref = bench.REFERENCE_RUNNERS[algorithm](model, params, cohort_np, key, args)
    fedavg_ref = bench.fedjax_reference_runner(model, params, cohort_np, key, args)
    for r in (ours, ref, fedavg_ref):
        r.run_once()
    assert bench.rel_err(ours.params, ref.params) <= 1e-5
    # The references are not FedAvg in disguise on this cohort.
    assert bench.rel_err(ref.params, fedavg_ref.params) > 1e-3
    if algorithm == "scaffold":
        ours_c, ours_table = bench.controls_of(ours.aux)
        ref_c, ref_table = bench.controls_of(ref.aux)
        assert bench.rel_err(ours_c, ref_c) <= 1e-5
        assert bench.rel_err(ours_table, ref_table) <= 1e-5
        # Nonzero starting control variates: the correction was active.
        assert float(np.max(np.abs(jax.tree.leaves(ref_c)[0]))) > 0

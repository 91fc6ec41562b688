"""scripts/baselines.py: every baseline's configs load, metrics, grid choice, the table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("baselines", ROOT / "scripts" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["baselines"] = module
    spec.loader.exec_module(module)
    return module


bl = _load()


@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_every_arm_is_a_valid_config(name, monkeypatch):
    """Each arm's overrides name fields the config has (a typo would fail here, not after an
    hour of training), with --quick's too."""
    monkeypatch.chdir(ROOT)
    b = bl.BASELINES[name]
    assert b.metric in ("rounds_to", "final")
    assert (b.metric == "rounds_to") == (b.target is not None)
    for spec, overrides in b.arms.values():
        for quick in ({}, b.quick):
            config = bl.arm_config(spec, overrides, quick)
            for k, v in {**overrides, **quick}.items():
                node = config
                for part in k.split("."):
                    node = node[part]
                assert (node.to_dict() if hasattr(node, "to_dict") else node) == v


def test_rounds_to_is_the_first_round_at_target():
    history = [
        {"round": 1, "test_accuracy": 0.5},
        {"round": 2, "train_loss": 1.0},  # no evaluation this round
        {"round": 3, "test_accuracy": 0.97},
        {"round": 4, "test_accuracy": 0.99},
    ]
    assert bl.rounds_to(history, 0.97) == 3
    assert bl.rounds_to(history, 0.995) is None


def _member(lr, seed, rounds, acc):
    return {
        "values": {"client.learning_rate": lr, "seed": seed},
        "metric": {"rounds_to": rounds, "final_test_accuracy": acc},
    }


def test_best_value_fewest_mean_rounds_and_never_reached_loses():
    b = bl.BASELINES["mcmahan17_2nn_iid"]
    members = [
        _member(0.1, 0, 80, 0.98),
        _member(0.1, 1, 100, 0.98),  # mean 90
        _member(0.2, 0, 50, 0.98),
        _member(0.2, 1, None, 0.90),  # one seed never reaches: infinitely many
        _member(0.05, 0, 95, 0.97),
        _member(0.05, 1, 95, 0.97),  # mean 95
    ]
    best = bl.best_value(b, members)
    assert best["grid_point"] == {"client.learning_rate": 0.1}
    assert best["rounds_to"] == [80, 100]
    assert best["final_mean"] == pytest.approx(0.98)


def test_best_value_final_metric_is_highest_mean_accuracy():
    b = bl.BASELINES["fedprox_synthetic_1_1"]
    members = [
        _member(0.01, 0, None, 0.6),
        _member(0.01, 1, None, 0.8),
        _member(0.03, 0, None, 0.75),
        _member(0.03, 1, None, 0.75),
    ]
    best = bl.best_value(b, members)
    assert best["grid_point"] == {"client.learning_rate": 0.03}
    assert best["final_std"] == pytest.approx(0.0)


def test_table_rows_from_results_and_pending_rows(tmp_path):
    b = bl.BASELINES["mcmahan17_2nn_iid"]
    best = bl.best_value(b, [_member(0.1, 0, 91, 0.975)])
    res = {
        "name": b.name,
        "quick": True,
        "hardware": "cpu, 2 cores",
        "command": "python scripts/baselines.py --run mcmahan17_2nn_iid --quick",
        "arms": {"FedAvg": {"best": best, "wall_s": 12.0}},
    }
    (tmp_path / "mcmahan17_2nn_iid_quick.json").write_text(json.dumps(res))
    text = bl.table(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| mcmahan17_2nn_iid"))
    assert "91 rounds" in row and "CPU-sized" in row and "87 rounds" in row
    assert "learning_rate 0.1" in row and "12 s" in row
    pending = next(line for line in text.splitlines() if line.startswith("| mcmahan17_cnn_iid"))
    assert "pending: CNN gradients" in pending


def test_cli_list_and_unknown_name(capsys):
    assert bl.main(["--list"]) == 0
    assert "mcmahan17_2nn_iid" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bl.main(["--run", "mcmahan18"])
    assert "known: mcmahan17_2nn_iid" in capsys.readouterr().err


def test_run_end_to_end_on_a_tiny_baseline(tmp_path, monkeypatch):
    """A two-round, two-learning-rate baseline through run(): one sweep, per-member metrics,
    the chosen grid point and the JSON the table reads."""
    monkeypatch.chdir(ROOT)
    tiny = bl.Baseline(
        name="tiny",
        paper="-",
        setting="-",
        paper_value="-",
        arms={"FedAvg": ("default:smoke", {"num_rounds": 2, "eval_every": 1})},
        target=0.0,
        grid={"client.learning_rate": [0.01, 0.1]},
    )
    res = bl.run(tiny, tmp_path, quick=False)
    arm = res["arms"]["FedAvg"]
    assert len(arm["members"]) == 2
    assert all(m["metric"]["rounds_to"] == 1 for m in arm["members"])  # target 0: round 1
    assert arm["best"]["grid_point"]["client.learning_rate"] in (0.01, 0.1)
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["arms"]["FedAvg"]["best"] == arm["best"]

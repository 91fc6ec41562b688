"""The driver and the CLI: outputs, the default run's accuracy, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import simulation
from fedjax_sim.cli import main as cli_main
from fedjax_sim.config import apply_override, load_config
from tests.conftest import ONE_THREAD, OPT_LEVEL_0

REQUIRED = {"round", "train_loss", "test_loss", "test_accuracy", "wall_s"}


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_default_run_reaches_accuracy_far_above_chance(tmp_path):
    """The README's main job as the README runs it (FedAvg on Synthetic(1,1) with the FedProx
    paper's settings), its first 60 of 200 rounds: 0.846 there (the README's 0.899 at 200 is
    a measurement, not checked here; 16 s against 38 s on 2026-12-07). It is run-bound, so it
    runs compiled as outside the tests, without the suite's LLVM level 0 and single thread."""
    flags = [
        f for f in os.environ.get("XLA_FLAGS", "").split() if f not in (OPT_LEVEL_0, ONE_THREAD)
    ]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
    cmd = [sys.executable, "-m", "fedjax_sim.cli", "run", "--workdir", str(tmp_path)]
    cmd.append("--config.num_rounds=60")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    history = read_metrics(tmp_path)
    assert [h["round"] for h in history] == list(range(10, 61, 10))
    assert all(REQUIRED <= set(h) for h in history)
    data = fs.data.synthetic(1.0, 1.0, seed=0)
    test_y = data.test.all_examples()["y"]
    majority = np.bincount(test_y).max() / len(test_y)  # best constant guess
    chance = 1 / data.num_classes
    final = history[-1]["test_accuracy"]
    # Measured 0.846 at round 60 (0.899 at 200, README); the majority class gives about 0.48.
    assert final > 0.8 and final > majority + 0.3 > chance, (final, majority)
    assert history[0]["test_accuracy"] < final
    assert summary["compiles"] == 1
    assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "logreg"
    assert summary["final_test_accuracy"] == final


def test_cli_smoke_run_and_overrides(tmp_path, capsys):
    rc = cli_main(
        [
            "run",
            "--workdir",
            str(tmp_path),
            "--config",
            "default:smoke",
            "--no-progress",
            "--config.num_rounds=4",
            "--config.eval_every",
            "2",
            "--config.strategy=sequential",
            "--config.server.optimizer=fedadam",
            "--config.server.learning_rate=0.01",
            "--config.server.kwargs.tau=0.01",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    history = read_metrics(tmp_path)
    assert [h["round"] for h in history] == [2, 4]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["server"]["kwargs"] == {"tau": 0.01} and cfg["strategy"] == "sequential"
    # The results of a finished run are not silently replaced.
    assert cli_main(["run", "--workdir", str(tmp_path), "--config", "default:smoke"]) == 2
    assert "already holds" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.name=resnet9", "known models: .*logreg"),
        ("--config.algorithm=fedprox9", "known: (.*, )?fedavg, (.*, )?fedopt, (.*, )?fedsgd"),
        ("--config.client.optimizer=sgdd", "known: .*sgd"),
        ("--config.dataset.name=mnist9", "known: .*synthetic"),
        ("--config.strategy=fast", "known: auto, vmap, chunked, sequential"),
        ("--config.clients_per_round=31", "has 30 training clients"),
        ("--config.client.learnig_rate=0.1", "no field 'client.learnig_rate'.*learning_rate"),
        ("--config.num_rounds=ten", "bad value"),
        ("--config.client.learning_rate=-0.1", "learning_rate must be >= 0, got -0.1"),
        ("--config.server.learning_rate=-1", "learning_rate must be >= 0, got -1"),
        ("--config.chunk_size=0", "chunk_size must be >= 1"),
        ("--config.task=regression", "known tasks: classification, next_token"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, override, message):
    rc = cli_main(["run", "--workdir", str(tmp_path), "--no-progress", override])
    assert rc == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_misspelled_field_in_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.py"
    cfg.write_text(
        "from fedjax_sim.configs import default\n"
        "def get_config(variant=None):\n"
        "    c = default.get_config()\n"
        "    c.clients_per_rnd = 3\n"
        "    return c\n"
    )
    assert cli_main(["run", "--workdir", str(tmp_path / "w"), "--config", str(cfg)]) == 2
    assert "clients_per_round" in capsys.readouterr().err


def test_divergence_stops_with_the_round_and_keeps_metrics(tmp_path):
    rng = np.random.default_rng(0)
    clients = {}
    for i in range(4):
        x = rng.normal(size=(20, 3)).astype(np.float32)
        if i == 2:
            x[0, 0] = np.inf  # a corrupt example: the first local step is NaN
        clients[f"c{i}"] = {"x": x, "y": rng.integers(0, 2, 20).astype(np.int32)}
    clean = {k: {"x": np.nan_to_num(v["x"], posinf=0.0), "y": v["y"]} for k, v in clients.items()}
    data = fs.from_client_arrays(clients, clean, num_classes=2)
    config = load_config("default:smoke")
    config.clients_per_round = 1
    config.eval_every = 1
    config.num_rounds = 50
    first_bad = next(
        r for r in range(1, 51) if 2 in simulation.sample_clients(config.seed, r, 4, 1)
    )
    assert first_bad > 1  # this seed samples good clients first
    with pytest.raises(fs.TrainingDiverged, match=f"in round {first_bad};"):
        fs.simulate(config, tmp_path, federated_data=data, progress=False)
    history = read_metrics(tmp_path)
    assert [h["round"] for h in history] == list(range(1, first_bad))


def test_apply_override_types():
    config = load_config(None)
    apply_override(config, "client.learning_rate", "1")
    assert config.client.learning_rate == 1.0 and isinstance(config.client.learning_rate, float)
    apply_override(config, "dataset.kwargs.iid", "true")
    assert config.dataset.kwargs.iid is True
    with pytest.raises(KeyError, match="Did you mean"):
        apply_override(config, "seeed", "1")


def test_import_does_not_pull_tensorflow():
    code = "import sys, fedjax_sim; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "fedjax_sim.cli", "run", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--workdir" in out.stdout


def test_eval_on_a_seeded_sample_of_test_clients(tmp_path):
    config = load_config("default:smoke")
    config.num_rounds, config.eval_every, config.eval_max_clients = 2, 2, 5
    data = fs.data.synthetic(1.0, 1.0, seed=0)
    sample = simulation.eval_clients(data.test, config)
    assert sample.num_clients == 5 and sample.client_ids == sorted(sample.client_ids)
    assert simulation.eval_clients(data.test, config).client_ids == sample.client_ids
    fs.simulate(config, tmp_path, progress=False)
    # The pooled accuracy is over the sample's examples: a multiple of 1 / their count.
    acc = read_metrics(tmp_path)[-1]["test_accuracy"]
    n = sample.num_examples
    assert abs(acc * n - round(acc * n)) < 1e-6


CONFIGS = sorted(
    f.stem for f in (Path(__file__).parent.parent / "configs").glob("*.py") if f.stem != "__init__"
)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_with_its_smoke_variant(name, tmp_path):
    # Each config and its smoke variant load, use only fields the default config has, and
    # (for the built-in data) the smoke variant learns in its own rounds.
    default = load_config("default").to_dict()
    for spec in (name, f"{name}:smoke"):
        config = load_config(spec)
        unknown = [k for k in config.to_dict() if k not in default and k != "sweep"]
        assert not unknown, f"{spec}: fields {unknown} are not in configs/default.py"
    config = load_config(f"{name}:smoke")
    if config.dataset.name.startswith("synthetic") and "sweep" not in config:
        config.eval_every = config.num_rounds  # one evaluation, at the end
        config.checkpoint_every = 0
        data = fs.data.get_federated_data(
            config.dataset.name,
            seed=simulation.data_seed_of(config),
            **simulation.kwargs_of(config.dataset.kwargs),
        )
        labels = data.test.all_examples()["y"]
        majority = np.bincount(labels).max() / labels.size  # Synthetic(1, 1), seed 0: 0.478
        summary = fs.simulate(config, tmp_path / "run", federated_data=data, progress=False)
        # Better than always answering the commonest test label, and a test loss below the
        # ln(classes) of uniform predictions. Measured after the 10 smoke rounds: accuracy
        # 0.50 (fedprox) to 0.62 (fedadam, fedsgd), test loss 1.39 to 2.01 (ln 10 = 2.30).
        assert summary["final_test_accuracy"] > majority, (summary, majority)
        assert summary["final_test_loss"] < np.log(data.num_classes), summary


def test_next_token_task_trains_and_evaluates_over_real_tokens(tmp_path):
    """A sequence task through the whole driver: `task = "next_token"` with a small causal
    transformer on sequences whose next token is (token + 1) mod 7, padded with 0 after a random
    length. Token accuracy over the real tokens goes from chance (1/6) to near 1."""
    rng = np.random.default_rng(0)
    vocab, length = 8, 10

    def client(n):
        start = rng.integers(1, vocab, size=(n, 1))
        x = (start + np.arange(length)) % (vocab - 1) + 1  # ids 1..7; 0 is padding
        y = np.concatenate([x[:, 1:], x[:, :1] * 0], axis=1)  # the next token; last is pad
        keep = rng.integers(4, length, size=(n, 1))  # random real lengths
        y = np.where(np.arange(length) < keep, y, 0).astype(np.int32)
        return {"x": x.astype(np.int32), "y": y}

    data = fs.from_client_arrays(
        {f"c{i}": client(12) for i in range(6)},
        test={f"t{i}": client(8) for i in range(3)},
        num_classes=vocab,
    )
    config = fs.load_config("default:smoke")
    config.task = "next_token"
    config.model.name = "transformer"  # per position, causal (the LSTM's: tests/test_task.py)
    config.model.kwargs = {"num_layers": 1, "width": 16, "num_heads": 2}
    config.clients_per_round, config.num_rounds, config.eval_every = 3, 24, 8
    config.client.learning_rate, config.client.local_epochs, config.client.batch_size = 0.5, 2, 4
    config.checkpoint_every = 0
    out = fs.simulate(config, tmp_path, federated_data=data, progress=False)
    accuracy = [h["test_accuracy"] for h in out["history"]]
    assert accuracy[-1] > 0.9, accuracy

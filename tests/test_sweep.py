"""Sweeps: every vectorized member equals its solo run; diverged members freeze; bad axes."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import sweep
from fedjax_sim.cli import main as cli_main

# Far past float32's range once multiplied by a gradient: the first local step gives inf
# params and a NaN loss in round 1.
HUGE_LR = 3e38


def smoke(**overrides):
    config = fs.load_config("default:smoke")
    config.num_rounds = 4
    config.eval_every = 2
    config.num_devices = 1  # the sweep runs on one device; so does the solo run compared
    config.checkpoint_every = 0
    for k, v in overrides.items():
        config[k] = v
    return config


@pytest.fixture(scope="module")
def synthetic():
    return fs.data.get_federated_data("synthetic", seed=0, alpha=1.0, beta=1.0, num_clients=30)


def member_config(base, values):
    config = sweep.member_configs(base, {k: [v] for k, v in values.items()})[0][2]
    return config


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def strip_wall(records):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "train_s")} for r in records]


def assert_records_close(a, b):
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for x, y in zip(strip_wall(a), strip_wall(b), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6, err_msg=k)


def assert_equals_solo_run(tmp_path, base, member, federated_data=None, prefix="solo_"):
    """Runs ``member``'s config alone (``fs.simulate``): params and every evaluation record
    within 1e-5 of the member's. Returns the solo run's result."""
    config = member_config(base, member["values"])
    solo = fs.simulate(
        config, tmp_path / (prefix + member["label"]), federated_data=federated_data,
        progress=False,
    )  # fmt: skip
    for a, b in zip(jax.tree.leaves(solo["params"]), jax.tree.leaves(member["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert_records_close(member["history"], solo["history"])
    return solo


def test_members_equal_solo_runs_and_a_diverged_member_freezes(tmp_path, synthetic):
    base = smoke()
    axes = {"client.learning_rate": [0.01, 0.05, HUGE_LR], "seed": [0, 1]}
    out = sweep.run_sweep(base, axes, tmp_path / "sweep", federated_data=synthetic)
    members = out["members"]
    assert out["groups"] == 1
    assert [m["values"] for m in members] == [
        {"client.learning_rate": lr, "seed": s} for lr in (0.01, 0.05, HUGE_LR) for s in (0, 1)
    ]
    index = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [m["label"] for m in index["members"]] == [m["label"] for m in members]
    for m in members:
        d = tmp_path / "sweep" / m["label"]
        summary = json.loads((d / "summary.json").read_text())
        assert summary["compiles"] == 1  # one program for all six members
        config = member_config(base, m["values"])
        assert json.loads((d / "config.json").read_text()) == json.loads(config.to_json())
        solo_dir = tmp_path / ("solo_" + m["label"])
        if m["values"]["client.learning_rate"] != HUGE_LR:
            solo = fs.simulate(config, solo_dir, federated_data=synthetic, progress=False)
            assert not summary["diverged"] and summary["diverged_round"] is None
            for a, b in zip(jax.tree.leaves(solo["params"]), jax.tree.leaves(m["params"])):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
            assert_records_close(read_metrics(d / "metrics.jsonl"), solo["history"])
            assert len(solo["history"]) == 2  # rounds 2 and 4
            continue
        # The solo run stops in round 1 with nothing evaluated; the member is frozen at its
        # initial model, marked, and the others above still match their solo runs.
        with pytest.raises(fs.TrainingDiverged, match="round 1"):
            fs.simulate(config, solo_dir, federated_data=synthetic, progress=False)
        assert summary["diverged"] and summary["diverged_round"] == 1
        assert read_metrics(d / "metrics.jsonl") == read_metrics(solo_dir / "metrics.jsonl") == []
        exp = fs.build_experiment(config, synthetic)
        init = exp.model.init(jax.random.fold_in(jax.random.key(config.seed), 0))
        for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(m["params"])):
            np.testing.assert_array_equal(a, b)


def test_server_lr_and_momentum_axes_and_a_shape_axis_as_separate_programs(tmp_path, synthetic):
    base = smoke(num_rounds=2, eval_every=2)
    base.client.kwargs.momentum = 0.0
    axes = {
        "clients_per_round": [3, 5],  # changes shapes: one program per value
        "server.learning_rate": [0.5, 1.0],
        "client.kwargs.momentum": [0.0, 0.9],
    }
    out = sweep.run_sweep(base, axes, tmp_path / "s", federated_data=synthetic)
    assert out["groups"] == 2 and len(out["members"]) == 8
    # One member per group checked against its solo run (the first test covers the rest).
    for m in (out["members"][3], out["members"][6]):
        assert_equals_solo_run(tmp_path, base, m, synthetic)
        assert m["summary"]["compiles"] == 1
        assert m["summary"]["strategy_reason"] == (
            f"rule ({m['summary']['strategy']}): a sweep's auto is not measured"
        )


@pytest.mark.all_devices
def test_members_match_multi_device_solo_runs_and_fedsgd(tmp_path, synthetic):
    """The solo run splits its cohort over the 4 fake devices (padded to 12 slots), which
    reorders the aggregation sums: equal within 1e-5. FedSGD sweeps its server optimizer."""
    for base, axes in [
        (smoke(num_devices=0, num_rounds=2), {"seed": [0, 1]}),
        (smoke(algorithm="fedsgd", num_rounds=2), {"server.learning_rate": [0.1, 0.5]}),
    ]:
        out = sweep.run_sweep(base, axes, tmp_path / base.algorithm, federated_data=synthetic)
        for m in out["members"]:
            assert_equals_solo_run(tmp_path, base, m, synthetic, prefix=f"{base.algorithm}_")
    # Members of different seeds vmapped instead of mapped (the default off CPU): the same.
    base, axes = smoke(num_rounds=2), {"seed": [0, 1], "client.learning_rate": [0.01, 0.02]}
    mapped = sweep.run_sweep(base, axes, tmp_path / "map", federated_data=synthetic)
    vmapped = sweep.run_sweep(
        base, axes, tmp_path / "vmap", federated_data=synthetic, seed_strategy="vmap"
    )
    for m, v in zip(mapped["members"], vmapped["members"], strict=True):
        assert m["label"] == v["label"]
        for a, b in zip(jax.tree.leaves(m["params"]), jax.tree.leaves(v["params"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "axes, message",
    [
        ({}, "at least one axis"),
        ({"client.learning_rte": [0.1]}, "unknown config field 'client.learning_rte'"),
        ({"client.learning_rate": []}, "has no values"),
        ({"client.learning_rate": 0.1}, "must be a list"),
        ({"client.learning_rate": ["fast"]}, "takes numbers"),
        ({"seed": [0, 0.5]}, "seeds must be integers"),
        ({"seed": [1, 1]}, "repeats a value"),
        ({"data_seed": [0, -1]}, "data seeds must be integers >= 0"),
        ({"data_seed": [0, 1]}, "federated_data fixes the data"),
        ({"num_devices": [1, 2]}, "cannot be swept"),
        ({"clients_per_round": [5, 500]}, "clients_per_round=500"),
        ({"model.name": ["logreg", "nope"]}, "nope"),
        ({"algorithm": ["fedavg", "fedsgd"], "client.learning_rate": [0.1]}, "fedsgd"),
    ],
)
def test_bad_axes_are_refused_before_any_compute(tmp_path, synthetic, axes, message):
    with pytest.raises((ValueError, KeyError), match=message):
        sweep.run_sweep(smoke(), axes, tmp_path / "s", federated_data=synthetic)
    assert not (tmp_path / "s").exists()


def test_seed_axis_with_sampled_eval_clients_evaluates_like_solo_runs(synthetic, tmp_path):
    # With eval_max_clients each seed draws its own test clients, as its solo run does.
    base = smoke(eval_max_clients=5)
    out = sweep.run_sweep(
        base, {"seed": [0, 1], "data_seed": [0, 2]}, tmp_path / "sweep"
    )  # fmt: skip
    accuracies = set()
    for m in out["members"]:
        solo = assert_equals_solo_run(tmp_path, base, m)
        member = read_metrics(tmp_path / "sweep" / m["label"] / "metrics.jsonl")
        assert_records_close(solo["history"], member)
        accuracies.add(member[-1]["test_accuracy"])
    assert len(accuracies) == 4


def test_injected_optimizers_equal_plain_ones():
    params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
    grads = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray(0.25)}
    for name, kw in [("sgd", {}), ("sgd", {"momentum": 0.9}), ("adam", {}), ("fedadam", {})]:
        plain = fs.get_optimizer(name, 0.1, **kw)
        inj = fs.get_optimizer(name, 0.1, inject=True, **kw)
        sp, si, pp, pi = plain.init(params), inj.init(params), params, params
        for _ in range(3):
            up, sp = fs.optimizers.optimizer_update(plain, grads, sp, pp)
            ui, si = fs.optimizers.optimizer_update(inj, grads, si, pi)
            pp, pi = optax.apply_updates(pp, up), optax.apply_updates(pi, ui)
        for a, b in zip(jax.tree.leaves(pp), jax.tree.leaves(pi)):
            # Adam's bias correction 1 - b2**t runs on float32 arrays instead of Python
            # floats once b1, b2 are injected: a few ulps (measured 3e-6 relative).
            np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=name)
    state = fs.get_optimizer("sgd", 0.1, inject=True).init(params)
    changed = fs.optimizers.with_hyperparams(state, {"learning_rate": 0.5})
    assert float(changed.hyperparams["learning_rate"]) == 0.5
    with pytest.raises(ValueError, match="no injected hyperparameter"):
        fs.optimizers.with_hyperparams(state, {"momentum": 0.9})
    with pytest.raises(TypeError, match="inject_hyperparams"):
        fs.optimizers.with_hyperparams(optax.sgd(0.1).init(params), {"learning_rate": 0.5})


def test_state_hparams_override_the_client_optimizer():
    """FedAvg with one client and one full-batch step is one SGD step at the state's lr:
    params - 0.3 * grad (the injected default 0.01 is replaced)."""
    model = fs.get_model("logreg", num_classes=3, input_shape=(4,))
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 1, 5, 4))
    y = jnp.asarray([[[0, 1, 2, 1, 0]]], jnp.int32)
    cohort = fs.Cohort(
        batches={"x": x, "y": y},
        mask=jnp.ones((1, 1, 5), bool),
        num_examples=jnp.asarray([5.0]),
        client_ids=jnp.asarray([0], jnp.int32),
    )
    algo = fs.fedavg(
        model, fs.get_optimizer("sgd", 0.01, inject=True), executor=fs.Executor("sequential")
    )
    assert algo.hparams["client.learning_rate"] == pytest.approx(0.01)
    state = algo.init(params)
    state = state._replace(hparams={**state.hparams, "client.learning_rate": jnp.float32(0.3)})
    new, _ = jax.jit(algo.apply)(state, cohort, jax.random.key(2))

    def loss(p):  # the mean cross-entropy of the five examples, written out
        logits = model.apply(p, x[0, 0], train=False)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y[0, 0]))

    expected = jax.tree.map(lambda p, g: p - 0.3 * g, params, jax.grad(loss)(params))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert new.hparams.keys() == state.hparams.keys()
    assert float(new.hparams["client.learning_rate"]) == pytest.approx(0.3)


def test_cli_sweep(tmp_path, capsys):
    config_file = tmp_path / "sweep_config.py"
    config_file.write_text(
        "import ml_collections\n"
        "from fedjax_sim.config import load_config\n\n"
        "def get_config(variant=None):\n"
        "    config = load_config('default:smoke')\n"
        "    config.num_rounds = 2\n"
        "    config.eval_every = 2\n"
        "    config.sweep = ml_collections.ConfigDict({'seed': [0, 1]})\n"
        "    config.sweep.client = ml_collections.ConfigDict({'learning_rate': [0.01, 0.02]})\n"
        "    return config\n"
    )
    rc = cli_main(["sweep", "--config", str(config_file), "--workdir", str(tmp_path / "w")])
    assert rc == 0, capsys.readouterr().err
    index = json.loads((tmp_path / "w" / "sweep.json").read_text())
    assert len(index["members"]) == 4
    for m in index["members"]:
        assert len(read_metrics(tmp_path / "w" / m["label"] / "metrics.jsonl")) == 1
    rc = cli_main(["sweep", "--config", "default:smoke", "--workdir", str(tmp_path / "x")])
    assert rc == 2 and "no `sweep` axes" in capsys.readouterr().err


SWEEP_RESUME_CONFIG = """
import ml_collections
from fedjax_sim.config import load_config

def get_config(variant=None):
    config = load_config('default:smoke')
    config.num_rounds = 12
    config.eval_every = 2
    config.checkpoint_every = 4
    config.client.local_epochs = 20
    config.sweep = ml_collections.ConfigDict({'data_seed': [0, 1]})  # streams on two datasets
    config.sweep.client = ml_collections.ConfigDict({'learning_rate': %s})
    return config
"""


def test_sweep_sigkill_and_resume_is_bitwise_identical(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from fedjax_sim import checkpoint

    config_file = tmp_path / "sweep_config.py"
    config_file.write_text(SWEEP_RESUME_CONFIG % "[0.01, 0.02]")

    def cli(workdir, *extra):
        return [sys.executable, "-m", "fedjax_sim.cli", "sweep", "--config", str(config_file)] + [
            "--workdir",
            str(workdir),
            *extra,
        ]

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run(cli(ref_dir), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    labels = [m["label"] for m in json.loads((ref_dir / "sweep.json").read_text())["members"]]
    assert len(labels) == 4
    watched = run_dir / labels[-1] / "metrics.jsonl"

    def lines():
        try:
            return watched.read_text().count("\n")
        except FileNotFoundError:
            return 0

    victim = subprocess.Popen(cli(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill after round 6's evaluation: the last checkpoint is at round 4, so the killed sweep
    # has appended evaluations after it that the resume must drop.
    deadline = time.monotonic() + 120
    while lines() < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert victim.poll() is None, "the sweep ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert 3 <= lines() < 6
    assert not (run_dir / "sweep.json").exists()

    resumed = subprocess.run(cli(run_dir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    for label in labels:
        a = strip_wall(read_metrics(run_dir / label / "metrics.jsonl"))
        b = strip_wall(read_metrics(ref_dir / label / "metrics.jsonl"))
        assert a == b and [r["round"] for r in a] == list(range(2, 13, 2))
    group = sweep._group_dir(run_dir, 0)
    ckpt = checkpoint.Checkpointer(group)
    assert ckpt.latest_round() == 12
    ckpt.close()
    final = checkpoint.load_state(group)
    expected = checkpoint.load_state(sweep._group_dir(ref_dir, 0))
    la, lb = jax.tree.leaves(final), jax.tree.leaves(expected)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()

    # A different sweep (an axis or a base field) is refused before any compute, naming it.
    before = (run_dir / labels[0] / "metrics.jsonl").read_text()
    argv = ["sweep", "--config", str(config_file), "--workdir", str(run_dir)]
    assert cli_main(argv + ["--config.client.batch_size=7"]) == 2
    err = capsys.readouterr().err
    assert "client.batch_size: 10 -> 7" in err and "learning_rate" not in err
    config_file.write_text(SWEEP_RESUME_CONFIG % "[0.01, 0.03]")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "sweep.client.learning_rate: [0.01, 0.02] -> [0.01, 0.03]" in err
    assert (run_dir / labels[0] / "metrics.jsonl").read_text() == before
    # A workdir holding a plain run is refused too; an unwritable one with the reason.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text("")
    assert (
        cli_main(["sweep", "--config", str(config_file), "--workdir", str(tmp_path / "plain")]) == 2
    )
    assert "plain run" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli_main(["sweep", "--config", str(config_file), "--workdir", str(blocker / "w")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to workdir" in err and "a_file" in err


def test_a_member_config_json_reproduces_the_member_alone(tmp_path):
    # No federated_data anywhere: the member's config.json pins data_seed to the base seed,
    # so a solo run of it builds the sweep's data and equals the member.
    base = smoke()
    out = sweep.run_sweep(base, {"seed": [0, 3]}, tmp_path / "sweep")
    member = out["members"][1]
    saved = json.loads((tmp_path / "sweep" / member["label"] / "config.json").read_text())
    assert saved["seed"] == 3 and saved["data_seed"] == 0
    config = fs.load_config("default:smoke")
    config.update_from_flattened_dict(
        {k: v for k, v in _flatten(saved).items() if not k.startswith("dataset.kwargs")}
    )
    solo = fs.simulate(config, tmp_path / "solo", progress=False)
    for a, b in zip(jax.tree.leaves(solo["params"]), jax.tree.leaves(member["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert_records_close(
        read_metrics(tmp_path / "solo" / "metrics.jsonl"),
        read_metrics(tmp_path / "sweep" / member["label"] / "metrics.jsonl"),
    )


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, dict):
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("data_on_device", ["device", "host"])
def test_data_seed_axis_is_vectorized_and_members_equal_solo_runs(tmp_path, data_on_device):
    # Synthetic data drawn with different seeds: different examples and client sizes, so the
    # streams pad to a common step count and (on the device) share one array of all of them.
    base = smoke(data_on_device=data_on_device)
    axes = {"data_seed": [3, 4], "seed": [0, 1]}
    out = sweep.run_sweep(base, axes, tmp_path / "sweep")
    assert out["groups"] == 1
    sizes = {
        d: fs.data.get_federated_data("synthetic", seed=d, **base.dataset.kwargs).train
        for d in (3, 4)
    }
    for m in out["members"]:
        summary = m["summary"]
        assert summary["compiles"] == 1 and summary["sweep_members"] == 4
        assert summary["data_seed"] == m["values"]["data_seed"]
        if data_on_device == "device":  # distinct draws share no example
            assert summary["device_examples"] == sum(t.num_examples for t in sizes.values())
        solo = assert_equals_solo_run(tmp_path, base, m)
        assert_records_close(
            solo["history"], read_metrics(tmp_path / "sweep" / m["label"] / "metrics.jsonl")
        )
    # Each data seed trained on its own data: the same seed on another dataset differs.
    p3, p4 = (out["members"][i]["params"] for i in (0, 2))
    assert out["members"][0]["values"]["seed"] == out["members"][2]["values"]["seed"]
    assert not np.allclose(jax.tree.leaves(p3)[0], jax.tree.leaves(p4)[0])


def _write_image_tree(root, n_train=24, n_test=8):
    """A tiny CIFAR-10 JPEG tree (``cifar10_jpeg/{train,test}/<class>/<i>.jpg``)."""
    Image = pytest.importorskip("PIL.Image", reason="JPEG decoding needs Pillow")
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            cls = ["airplane", "cat", "ship"][i % 3]
            path = root / "cifar10_jpeg" / split / cls / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(path)


def test_partition_seed_axis_keeps_one_copy_of_the_examples(tmp_path):
    # Partitions of one dataset under different seeds: one program, the examples on the
    # device once, and every member equal to its solo run on its own partition.
    _write_image_tree(tmp_path / "data")
    base = smoke(data_on_device="device", clients_per_round=3)
    base.dataset.name = "cifar10_jpeg"
    base.dataset.kwargs = ml_collections.ConfigDict(
        {"data_dir": str(tmp_path / "data"), "num_clients": 6, "partition": "dirichlet",
         "partition_kwargs": {"alpha": 0.5}, "use_cache": False}
    )  # fmt: skip
    base.client.batch_size = 4
    out = sweep.run_sweep(base, {"data_seed": [0, 1, 2]}, tmp_path / "sweep")
    assert out["groups"] == 1
    partitions = set()
    for m in out["members"]:
        assert m["summary"]["device_examples"] == 24 and m["summary"]["compiles"] == 1
        assert_equals_solo_run(tmp_path, base, m)
        train = fs.data.get_federated_data(
            "cifar10_jpeg", seed=m["values"]["data_seed"], **base.dataset.kwargs
        ).train
        partitions.add(train.all_examples()["x"].tobytes())
    assert len(partitions) == 3  # three different partitions of the same 24 images


def test_shared_examples_stores_each_example_once():
    from fedjax_sim.data.packing import (
        gather_cohort,
        pack_cohort_indices,
        remap_cohort,
        shared_examples,
    )

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.integers(0, 4, 20).astype(np.int32)

    def split(order, cuts):
        parts = np.split(order, cuts)
        return fs.data.FederatedDataset(
            {f"c{i}": {"x": x[p], "y": y[p]} for i, p in enumerate(parts)}
        )

    a = split(np.arange(20), [5, 12])
    b = split(rng.permutation(20), [2, 9, 15])
    c = split(np.arange(10), [4])  # a subset: adds nothing new
    other = fs.data.FederatedDataset({"o": {"x": x[:3] + 1, "y": y[:3]}})
    pool, maps = shared_examples([a, b, c, other])
    assert len(pool["x"]) == 23
    np.testing.assert_array_equal(maps[0], np.arange(20))  # first dataset keeps its order
    for ds, row_map in zip([a, b, c, other], maps, strict=True):
        flat = ds.all_examples()
        for k in ("x", "y"):
            np.testing.assert_array_equal(pool[k][row_map], flat[k])
        indexed = pack_cohort_indices(ds, [0], batch_size=2, seed=1, round_num=1)
        want = gather_cohort(flat, indexed)
        got = gather_cohort(pool, remap_cohort(indexed, row_map))
        np.testing.assert_array_equal(got.batches["x"], want.batches["x"])
        np.testing.assert_array_equal(got.mask, want.mask)
    bad = fs.data.FederatedDataset({"o": {"x": x[:3, :2], "y": y[:3]}})
    with pytest.raises(ValueError, match="same features"):
        shared_examples([a, bad])


def test_fedprox_and_dp_axes_are_vectorized_and_equal_solo_runs(tmp_path, synthetic):
    # Proximal term, clipping norm and noise level are traced: one program for all members,
    # a member at 0 computing exactly what a run without that piece computes.
    base = smoke(weighting="uniform")
    base.dp.clip_norm = 0.05
    axes = {
        "client.proximal_mu": [0.0, 0.5],
        "dp.clip_norm": [0.0, 0.05],
        "dp.noise_multiplier": [0.0, 1.0],
    }
    # noise without clipping is refused before any compute
    with pytest.raises(ValueError, match="needs clip_norm > 0"):
        sweep.run_sweep(base, axes, tmp_path / "bad", federated_data=synthetic)
    assert not (tmp_path / "bad").exists()
    axes["dp.clip_norm"] = [0.02, 0.05]
    out = sweep.run_sweep(base, axes, tmp_path / "sweep", federated_data=synthetic)
    assert out["groups"] == 1
    finals = set()
    for m in out["members"]:
        assert m["summary"]["compiles"] == 1
        assert_equals_solo_run(tmp_path, base, m, synthetic)
        leaves = [np.ravel(a) for a in jax.tree.leaves(m["params"])]
        finals.add(tuple(np.round(np.concatenate(leaves), 5)))
    assert len(finals) == 8  # every setting changed the result


@pytest.mark.parametrize("devices", [2, 4])
def test_streams_split_over_devices_equal_the_one_device_sweep(tmp_path, synthetic, devices):
    # 3 seeds x 2 learning rates: 3 streams over 2 devices (one padded slot) or 4 devices
    # (capped at 3). Each stream runs whole on one device: results equal the 1-device sweep.
    axes = {"seed": [0, 1, 2], "client.learning_rate": [0.01, 0.02]}
    one = sweep.run_sweep(smoke(), axes, tmp_path / "one", federated_data=synthetic)
    many = sweep.run_sweep(
        smoke(num_devices=devices), axes, tmp_path / "many", federated_data=synthetic
    )
    for a, b in zip(one["members"], many["members"], strict=True):
        assert b["summary"]["devices"] == min(devices, 3) and b["summary"]["compiles"] == 1
        for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        assert_records_close(
            read_metrics(tmp_path / "one" / a["label"] / "metrics.jsonl"),
            read_metrics(tmp_path / "many" / b["label"] / "metrics.jsonl"),
        )


def test_hparams_that_shape_the_initial_state_split_into_exact_programs(tmp_path, synthetic):
    # FedAdam's tau sets v0 = tau^2 and Adagrad's initial accumulator its first state: a state
    # built with one value cannot take another, so those are not vectorized; the others are.
    config = smoke(num_rounds=2, eval_every=2)
    config.server.optimizer, config.server.learning_rate = "fedadam", 0.03
    config.client.optimizer = "adagrad"
    names = sweep.hparam_names(config)
    assert "server.kwargs.tau" not in names and "server.kwargs.b1" in names
    assert "client.kwargs.initial_accumulator_value" not in names
    assert "client.learning_rate" in names and "client.kwargs.eps" in names
    axes = {"server.kwargs.tau": [1e-3, 0.3], "server.learning_rate": [0.03, 0.1]}
    out = sweep.run_sweep(config, axes, tmp_path / "s", federated_data=synthetic)
    assert out["groups"] == 2
    for m in out["members"]:
        assert m["summary"]["sweep_members"] == 2  # the learning rates share a program
        assert_equals_solo_run(tmp_path, config, m, federated_data=synthetic)


def test_a_spec_whose_hparams_disagree_with_its_algorithm_is_refused(tmp_path, synthetic):
    from tests import toy_algorithm

    def claims_more(config):
        return {**toy_algorithm.hparams_of_config(config), "algorithm_kwargs.lr": 0.1}

    bad = fs.AlgorithmSpec(
        toy_algorithm.build, claims_more, "declares a number it ignores",
        kwargs={"beta": 0.5, "lr": 0.1},
    )  # fmt: skip
    fs.algorithms.register("zz_mismatched", bad)
    try:
        base = smoke(algorithm="zz_mismatched")
        with pytest.raises(ValueError, match="make them the same"):
            sweep.run_sweep(
                base, {"algorithm_kwargs.lr": [0.01, 0.1]}, tmp_path / "s",
                federated_data=synthetic,
            )  # fmt: skip
        assert not (tmp_path / "s").exists()  # refused before anything was written
    finally:
        del fs.algorithms.ALGORITHMS["zz_mismatched"]


def test_string_values_for_optimizer_arguments_are_refused_up_front(tmp_path, synthetic):
    with pytest.raises(ValueError, match="takes numbers; got '0.9'"):
        sweep.run_sweep(
            smoke(), {"server.kwargs.momentum": ["0.9", "0.5"]}, tmp_path / "s",
            federated_data=synthetic,
        )  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_systems_fedbuff_and_personalization_members_equal_solo_runs(tmp_path, synthetic):
    # Each seed is a stream with its own population, clock and asynchronous schedule; the
    # personalized (fine-tuned) metrics come from each member's own model and hyperparameters.
    base = smoke(algorithm="fedbuff")
    base.algorithm_kwargs.buffer_size = 5
    base.systems.speed_sigma = 0.5
    base.systems.dropout = 0.1
    base.eval.finetune_steps = 2
    axes = {"seed": [0, 1], "client.learning_rate": [0.01, 0.03]}
    out = sweep.run_sweep(base, axes, tmp_path / "s", federated_data=synthetic)
    assert out["groups"] == 1
    members = out["members"]
    for m in (members[0], members[3]):
        solo = assert_equals_solo_run(tmp_path, base, m, federated_data=synthetic)
        assert "personal_client_accuracy_p10" in solo["history"][-1]
        assert solo["history"][-1]["sim_time_s"] > 0


def test_a_round_that_fails_to_trace_is_refused_before_the_workdir_is_touched(tmp_path, synthetic):
    from tests import toy_algorithm

    def build(config, ctx):
        algo = toy_algorithm.build(config, ctx)

        def apply(state, cohort, key):
            raise ValueError("refused while tracing the round")

        return algo._replace(apply=apply)

    spec = fs.AlgorithmSpec(
        build, toy_algorithm.hparams_of_config, "fails to trace", kwargs={"beta": 0.5}
    )
    fs.algorithms.register("zz_trace_fails", spec)
    try:
        workdir = tmp_path / "s"
        workdir.mkdir()
        (workdir / "sweep.json").write_text("{}\n")  # earlier results --overwrite must keep
        with pytest.raises(ValueError, match="refused while tracing the round"):
            sweep.run_sweep(
                smoke(algorithm="zz_trace_fails"), {"client.learning_rate": [0.01, 0.1]},
                workdir, federated_data=synthetic, overwrite=True,
            )  # fmt: skip
        assert sorted(p.name for p in workdir.iterdir()) == ["sweep.json"]  # nothing moved
    finally:
        del fs.algorithms.ALGORITHMS["zz_trace_fails"]


def test_a_finished_sweep_called_again_keeps_its_summaries(tmp_path, synthetic):
    config = smoke(num_rounds=2, checkpoint_every=2)
    axes = {"client.learning_rate": [0.01, 0.1]}
    first = sweep.run_sweep(config, axes, tmp_path / "s", federated_data=synthetic)
    files = sorted((tmp_path / "s").rglob("*.json")) + sorted((tmp_path / "s").rglob("*.jsonl"))
    before = {p: p.read_bytes() for p in files}
    assert any(p.name == "summary.json" for p in before) and (tmp_path / "s/sweep.json") in before
    again = sweep.run_sweep(config, axes, tmp_path / "s", federated_data=synthetic)
    assert {p: p.read_bytes() for p in files} == before  # timings and records as written
    assert again["wall_s"] == first["wall_s"]
    for a, b in zip(first["members"], again["members"], strict=True):
        assert a["summary"] == b["summary"]
        for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()

"""The driver on real data (TFDS MNIST offline, LEAF FEMNIST), device-resident cohorts,
size buckets, and in-round image preprocessing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.cli import main as cli_main
from fedjax_sim.config import load_config
from fedjax_sim.data.packing import gather_cohort, pack_cohort_indices
from fedjax_sim.models.preprocess import random_crop_flip
from tests.conftest_data import real_data
from tests.helpers import ragged_dataset


def test_device_gather_equals_host_packing():
    ds = ragged_dataset([5, 17, 2, 9])
    kw = dict(batch_size=4, local_epochs=2, num_clients=6, seed=3, round_num=2)
    host = fs.pack_cohort(ds, [3, 0, 2], **kw)
    indexed = pack_cohort_indices(ds, [3, 0, 2], **kw)
    examples = jax.device_put(ds.all_examples())
    device = jax.jit(lambda e, c: gather_cohort(e, c, xp=jnp))(examples, indexed)
    for k in host.batches:
        np.testing.assert_array_equal(np.asarray(device.batches[k]), host.batches[k])
    np.testing.assert_array_equal(np.asarray(device.mask), host.mask)
    np.testing.assert_array_equal(
        gather_cohort(ds.all_examples(), indexed).batches["x"], host.batches["x"]
    )


def test_data_on_device_and_step_buckets_change_no_result(tmp_path):
    config = load_config("default:smoke")
    config.num_rounds = 6
    config.eval_every = 3
    runs = {}
    for name, on_device, buckets in [
        ("host", "host", 0),
        ("device", "device", 0),
        ("b4", "device", 4),
    ]:
        config.data_on_device = on_device
        config.client.step_buckets = buckets
        runs[name] = fs.simulate(config, tmp_path / name, progress=False)
    for name in ("device", "b4"):
        assert (
            runs[name]["history"][-1]["test_accuracy"]
            == runs["host"]["history"][-1]["test_accuracy"]
        )
        for a, b in zip(
            jax.tree.leaves(runs[name]["params"]), jax.tree.leaves(runs["host"]["params"])
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert runs["device"]["data_on_device"] and not runs["host"]["data_on_device"]
    assert runs["host"]["compiles"] == 1 and 1 <= runs["b4"]["compiles"] <= 4
    assert runs["b4"]["padding_waste"] < runs["host"]["padding_waste"]


def test_augmentation_uses_the_key_and_keeps_the_pixels():
    images = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1) + 1
    a = random_crop_flip(images, jax.random.key(0), pad=2)
    b = random_crop_flip(images, jax.random.key(0), pad=2)
    c = random_crop_flip(images, jax.random.key(1), pad=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Every output pixel is either padding (0) or a pixel of the same image.
    for i in range(2):
        got = set(np.asarray(a[i]).ravel().tolist()) - {0.0}
        assert got <= set(np.asarray(images[i]).ravel().tolist())
    model = fs.get_model("cnn_mcmahan", num_classes=10, input_shape=(8, 8, 3), augment=True)
    params = model.init(jax.random.key(0))
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    # Eval: uint8 is scaled to [0, 1] and nothing random happens.
    np.testing.assert_allclose(
        model.apply(params, x, train=False),
        model.apply(params, x.astype(np.float32) / 255, train=False),
        rtol=1e-5,
        atol=1e-6,
    )
    t1 = model.apply(params, x, train=True, key=jax.random.key(5))
    t2 = model.apply(params, x, train=True, key=jax.random.key(6))
    assert not np.allclose(t1, t2)
    with pytest.raises(ValueError, match="needs a key"):
        model.apply(params, x, train=True)


@pytest.mark.realdata
def test_fedavg_on_real_mnist_from_tfds_raises_accuracy(tmp_path):
    real_data("mnist/train-images-idx3-ubyte.gz")
    config = load_config("mnist_2nn_iid:smoke")
    summary = fs.simulate(config, tmp_path, progress=False)
    acc = [h["test_accuracy"] for h in summary["history"]]
    assert len(acc) == 5 and acc[-1] > acc[0] and acc[-1] > 0.3, acc  # chance is 0.1


@pytest.mark.realdata
def test_fedavg_on_real_femnist_raises_accuracy(tmp_path):
    real_data("femnist_leaf")
    config = load_config("femnist_cnn:smoke")
    config.model.name = "mlp"  # LEAF's CNN has 6.6M parameters: minutes on a 2-core CPU
    config.num_rounds, config.eval_every = 6, 3
    config.client.learning_rate = 0.1
    summary = fs.simulate(config, tmp_path, progress=False)
    acc = [h["test_accuracy"] for h in summary["history"]]
    first = fs.simulate(config.copy_and_resolve_references(), tmp_path / "zero", progress=False)
    assert acc[-1] > acc[0] > 1 / 62, acc
    assert first["history"][-1]["test_accuracy"] == acc[-1]  # deterministic


@pytest.mark.realdata
def test_data_stats_cli_counts(capsys):
    root = real_data("femnist_leaf").parent
    assert cli_main(["data-stats", "femnist_leaf", "--data_dir", str(root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train"]["num_clients"] == 105
    assert stats["train"]["num_examples"] == 14708 and stats["test"]["num_examples"] == 1685
    assert 0 <= stats["padding"]["waste_bucketed"] <= stats["padding"]["waste_single_bucket"] < 1
    real_data("mnist")
    argv = ["data-stats", "mnist", "--data_dir", str(root), "--partition", "pathological"]
    argv += ["--num_clients", "100", "--partition_kwargs", '{"shards_per_client": 2}', "--json"]
    assert cli_main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train"]["num_clients"] == 100 and stats["train"]["num_examples"] == 60000
    assert stats["train"]["size_quantiles"]["p0"] == stats["train"]["size_quantiles"]["p100"] == 600
    assert stats["test"]["num_examples"] == 10000


def test_data_stats_cli_bad_input(capsys, tmp_path):
    assert cli_main(["data-stats", "nosuchdata"]) == 2
    assert "known" in capsys.readouterr().err
    assert cli_main(["data-stats", "femnist_leaf", "--data_dir", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err
    assert cli_main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "femnist_leaf" in out and "dirichlet" in out and "synthetic" in out


@pytest.mark.realdata
def test_partition_seed_sweep_on_real_mnist_is_one_program_over_one_copy(tmp_path):
    # Three pathological partitions of real MNIST: one compiled program, the 60,000 training
    # images on the device once, and a member equal to its solo run on its own partition.
    real_data("mnist/train-images-idx3-ubyte.gz")
    from fedjax_sim import sweep

    base = load_config("mnist_2nn_pathological:smoke")
    base.num_rounds, base.eval_every = 2, 1
    out = sweep.run_sweep(base, {"data_seed": [0, 1, 2]}, tmp_path / "sweep")
    assert out["groups"] == 1
    for m in out["members"]:
        assert m["summary"]["compiles"] == 1 and m["summary"]["device_examples"] == 60000
    member = out["members"][2]
    config = sweep.member_configs(base, {"data_seed": [2]})[0][2]
    solo = fs.simulate(config, tmp_path / "solo", progress=False)
    for a, b in zip(jax.tree.leaves(solo["params"]), jax.tree.leaves(member["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    finals = {m["summary"]["final_test_accuracy"] for m in out["members"]}
    assert len(finals) == 3  # three different partitions

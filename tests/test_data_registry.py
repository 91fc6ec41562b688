"""The dataset registry: names, partitions through it, caching of natural datasets, and the
statistics behind ``fedjax-sim data-stats``."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from fedjax_sim.data import registry
from fedjax_sim.data.federated import FederatedData, FederatedDataset
from fedjax_sim.data.registry import DATASETS, PARTITIONERS, data_stats, load_federated
from tests.conftest_data import real_data

EXPECTED = {
    "mnist",
    "fashion_mnist",
    "emnist",
    "cifar10",
    "cifar10_jpeg",
    "cifar100",
    "tiny_shakespeare",
    "femnist_leaf",
    "shakespeare_leaf",
    "tff_emnist",
    "tff_stackoverflow",
    "fedjax_sqlite",
}


def test_names_and_descriptions():
    assert set(DATASETS) == EXPECTED
    assert set(PARTITIONERS) == {"iid", "dirichlet", "pathological", "quantity_skew"}
    assert all(e.description and "\n" not in e.description for e in DATASETS.values())


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'; known: cifar10, cifar100"):
        load_federated("mnsit")
    with pytest.raises(ValueError, match="unknown partition 'dirichlt'; known: dirichlet, iid"):
        load_federated("mnist", partition="dirichlt", num_clients=3, seed=0)


def test_options_that_do_not_apply_are_errors(tmp_path):
    with pytest.raises(ValueError, match="naturally federated"):
        load_federated("femnist_leaf", partition="iid", num_clients=3)
    with pytest.raises(ValueError, match="explicit seed"):
        load_federated("cifar10_jpeg", num_clients=3, data_dir=tmp_path)
    with pytest.raises(ValueError, match="num_clients"):
        load_federated("cifar10_jpeg", seed=0, data_dir=tmp_path)
    with pytest.raises(ValueError, match="train_path"):
        load_federated("fedjax_sqlite")


def _tiny_cifar_root(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="JPEG decoding needs Pillow")

    root = tmp_path / "data"
    (root / "cifar10_jpeg").mkdir(parents=True)
    with tarfile.open(root / "cifar10_jpeg" / "cifar10_jpeg_q75.tar.gz", "w:gz") as tf:
        for split, per_class in (("train", 6), ("test", 2)):
            for c, cls in enumerate(("airplane", "bird", "ship")):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), 20 * c + i, np.uint8)).save(buf, "JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tf.addfile(info, io.BytesIO(buf.getvalue()))
    return root


def test_centralized_partition_through_registry(tmp_path):
    root = _tiny_cifar_root(tmp_path)
    kw = dict(data_dir=root, cache_dir=tmp_path / "cache", seed=5, verify_checksum=False)
    dirichlet = dict(partition="dirichlet", partition_kwargs={"alpha": 0.5}, num_clients=3)
    data = load_federated("cifar10_jpeg", **dirichlet, **kw)
    assert data.num_classes == 10 and data.train.client_ids == ["c00000", "c00001", "c00002"]
    assert data.train.sizes.tolist() == [6, 6, 6] and data.test.client_ids == ["test"]
    ys = np.sort(np.concatenate([c["y"] for _, c in data.train]))
    np.testing.assert_array_equal(ys, np.repeat([0, 2, 8], 6))  # airplane, bird, ship
    same = load_federated(
        "cifar10_jpeg", partition="iid", num_clients=2, test_partition="same", **kw
    )
    assert same.test.client_ids == ["c00000", "c00001"] and same.test.sizes.tolist() == [3, 3]
    # A second load reads the decoded arrays and the partition from the cache.
    again = load_federated("cifar10_jpeg", **dirichlet, **kw)
    for i in range(3):
        np.testing.assert_array_equal(again.train.client(i)["x"], data.train.client(i)["x"])
    assert len(list((tmp_path / "cache" / "arrays").iterdir())) == 1
    assert len(list((tmp_path / "cache" / "partitions").iterdir())) == 2
    with pytest.raises(ValueError, match=r"needs partition_kwargs with \['alpha'\]"):
        load_federated("cifar10_jpeg", partition="dirichlet", num_clients=3, **kw)
    with pytest.raises(ValueError, match="takes .'alpha', 'num_classes'. .* not .'beta'."):
        load_federated("cifar10_jpeg", **{**dirichlet, "partition_kwargs": {"beta": 1}}, **kw)
    with pytest.raises(ValueError, match="cannot give each of 19 clients"):
        load_federated("cifar10_jpeg", partition="iid", num_clients=19, **kw)


@pytest.mark.realdata
def test_femnist_through_registry_is_cached(tmp_path):
    root = real_data("femnist_leaf").parent
    first = load_federated("femnist_leaf", data_dir=root, cache_dir=tmp_path)
    second = load_federated("femnist_leaf", data_dir=root, cache_dir=tmp_path)
    assert (tmp_path / "federated").is_dir()
    assert second.train.client_ids == first.train.client_ids
    assert second.train.num_examples == 14_708 and second.test.num_examples == 1_685
    np.testing.assert_array_equal(second.test.client(104)["x"], first.test.client(104)["x"])


def _toy(sizes, test_sizes=(5,)):
    def ds(sz, name):
        return FederatedDataset(
            {
                f"k{i}": {"x": np.zeros((n, 2), np.float32), "y": np.zeros(n, np.int32)}
                for i, n in enumerate(sz)
            },
            name=name,
        )

    return FederatedData(ds(sizes, "toy/train"), ds(test_sizes, "toy/test"), 3)


def test_data_stats_by_hand():
    stats = data_stats(_toy([10, 10, 100]), batch_size=10, local_epochs=1, num_buckets=2)
    json.dumps(stats)  # serializable for --json
    assert stats["train"]["num_clients"] == 3 and stats["train"]["num_examples"] == 120
    assert stats["train"]["size_quantiles"]["p50"] == 10.0
    assert stats["train"]["features"]["x"] == {"dtype": "float32", "shape": [2]}
    assert stats["test"]["num_examples"] == 5
    # Steps 1, 1, 10. One bucket: 300 slots, 120 real -> 0.6. Two buckets: no padding.
    assert stats["padding"]["waste_single_bucket"] == pytest.approx(0.6)
    assert stats["padding"]["waste_bucketed"] == pytest.approx(0.0)
    assert stats["padding"]["bucket_num_steps"] == [1, 10]
    assert stats["padding"]["clients_per_bucket"] == [2, 1]


def test_registry_module_does_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, fedjax_sim, fedjax_sim.data.registry; "
        "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'h5py', 'matplotlib') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert registry.DATASETS  # imported here too

"""The real TFDS path, proven with MNIST prepared offline from its four original files, and the
other TFDS loaders on TFDS's mock data."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedjax_sim.data import centralized
from fedjax_sim.data.files import DataFileError, DataNotFoundError, default_cache_dir
from fedjax_sim.data.registry import load_federated
from tests.conftest_data import real_data

pytest.importorskip("tensorflow_datasets", reason="the TFDS loaders need tensorflow-datasets")

# TFDS's mocking builds datasets with tf.data calls that TensorFlow logs as deprecated through
# absl (not Python warnings); nothing here is filtered. If a TF upgrade starts emitting Python
# DeprecationWarnings from inside tensorflow/, filter them narrowly here with the reason.

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="module")
def tfds_dir() -> Path:
    """TFDS's prepared-data folder: the package's default (``$FEDJAX_SIM_CACHE/tfds``, else
    ``~/.cache/fedjax_sim/tfds``), the one the registry's MNIST runs (``test_real_training``)
    read, so the suite prepares MNIST there once; workers that reach it together take turns
    on its lock (``test_data_offline`` proves that on a fresh folder of its own)."""
    return default_cache_dir() / "tfds"


@pytest.fixture(scope="module")
def mnist_arrays(tfds_dir):
    manual = real_data("mnist")
    return centralized.mnist(manual_dir=manual, tfds_data_dir=tfds_dir, download=False)


def _idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8)[header:]


@pytest.mark.realdata
@pytest.mark.slow
def test_mnist_counts_and_content_match_the_original_files(mnist_arrays):
    train, test = mnist_arrays["train"], mnist_arrays["test"]
    assert train["x"].shape == (60_000, 28, 28, 1) and test["x"].shape == (10_000, 28, 28, 1)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
    assert 0.0 <= train["x"].min() and train["x"].max() == 1.0
    # TFDS shuffles while preparing, so compare order-free summaries with the idx files read
    # directly (16-byte image header, 8-byte label header).
    manual = real_data("mnist")
    labels = _idx(manual / "train-labels-idx1-ubyte.gz", 8)
    np.testing.assert_array_equal(np.bincount(train["y"]), np.bincount(labels))
    pixels = _idx(manual / "t10k-images-idx3-ubyte.gz", 16)
    assert np.rint(test["x"] * 255).astype(np.int64).sum() == pixels.astype(np.int64).sum()


@pytest.mark.realdata
@pytest.mark.slow
def test_registry_partitions_mnist_like_mcmahan(mnist_arrays, tfds_dir, tmp_path):
    del mnist_arrays  # prepared in tfds_dir
    kwargs = dict(
        data_dir=real_data("mnist").parent,
        tfds_data_dir=tfds_dir,
        cache_dir=tmp_path,
        partition="pathological",
        num_clients=100,
        seed=0,
        download=False,
    )
    data = load_federated("mnist", **kwargs)
    assert data.num_classes == 10
    assert data.train.num_clients == 100 and set(data.train.sizes.tolist()) == {600}
    # "Most clients will only have examples of two digits": shards are label-pure except the
    # few that straddle a class border (MNIST's class sizes are not multiples of 300).
    labels_per_client = np.array([len(np.unique(c["y"])) for _, c in data.train])
    assert labels_per_client.max() <= 4 and (labels_per_client <= 2).mean() >= 0.85
    assert data.test.num_clients == 1 and data.test.num_examples == 10_000
    again = load_federated("mnist", **kwargs)  # from the cache
    for i in (0, 57, 99):
        np.testing.assert_array_equal(again.train.client(i)["x"], data.train.client(i)["x"])
    assert len(list((tmp_path / "partitions").iterdir())) == 1


@pytest.mark.realdata
def test_bad_manual_file_is_named(tmp_path):
    manual = tmp_path / "mnist"
    manual.mkdir()
    for name in MNIST_FILES:
        shutil.copy(real_data("mnist") / name, manual / name)
    broken = manual / "train-labels-idx1-ubyte.gz"
    raw = bytearray(broken.read_bytes())
    raw[-1] ^= 1
    broken.write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match="train-labels-idx1-ubyte.gz: sha256"):
        centralized.mnist(manual_dir=manual, tfds_data_dir=tmp_path / "tfds", download=False)


def test_missing_files_offline_say_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        centralized.mnist(
            manual_dir=tmp_path / "empty", tfds_data_dir=tmp_path / "tfds", download=False
        )
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "manual_dir" in msg and "download=True" in msg


def test_other_tfds_loaders_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    # Offline by default, these datasets (no files here) fail before TFDS; download=True lets
    # the loaders reach TFDS, whose download mock_data replaces with fake examples.
    kw = dict(tfds_data_dir=tmp_path, download=True)
    with tfds.testing.mock_data(num_examples=12):
        cifar = centralized.cifar10(**kw)
        assert cifar["train"]["x"].shape == (12, 32, 32, 3)
        assert cifar["train"]["x"].dtype == np.uint8 and cifar["test"]["y"].dtype == np.int32
        coarse = centralized.cifar100(label="coarse_label", **kw)
        assert coarse["train"]["y"].max() < 20
        em = centralized.emnist(config="balanced", **kw)
        assert em["train"]["x"].dtype == np.float32 and em["train"]["y"].max() < 47
        fm = centralized.fashion_mnist(**kw)
        assert fm["test"]["x"].shape == (12, 28, 28, 1)
        text = centralized.tiny_shakespeare(**kw)
        x, y = text["train"]["x"], text["train"]["y"]
        assert x.shape == (len(y), 80) and x.dtype == np.int32
        np.testing.assert_array_equal(x[1:, -1], y[:-1])  # each window ends before its target
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        centralized.emnist(config="nope")

"""TFF HDF5 and FedJAX SQLite loaders on files the tests write in those layouts, the CIFAR-10
JPEG folder (written and real), and the on-disk cache."""

from __future__ import annotations

import io
import logging
import sqlite3
import tarfile

import numpy as np
import pytest

from fedjax_sim.data import cache, federated_files
from fedjax_sim.data.centralized import CIFAR10_CLASSES, cifar10_jpeg
from fedjax_sim.data.files import DataFileError, DataNotFoundError
from tests.conftest_data import real_data

RNG = np.random.default_rng(0)


def _emnist_client(n, label):
    return {
        "pixels": RNG.uniform(0, 1, (n, 28, 28)).astype(np.float32),
        "label": np.full(n, label, np.int32),
    }


def test_tff_emnist_h5(tmp_path):
    pytest.importorskip("h5py", reason="TFF's files are HDF5: pip install h5py")
    train = {"f0000_14": _emnist_client(5, 3), "f0001_41": _emnist_client(2, 61)}
    test = {"f0000_14": _emnist_client(1, 3), "f0001_41": _emnist_client(3, 7)}
    federated_files.write_tff_h5(tmp_path / "fed_emnist_train.h5", train)
    federated_files.write_tff_h5(tmp_path / "fed_emnist_test.h5", test)
    data = federated_files.tff_emnist(tmp_path)
    assert data.num_classes == 62
    assert data.train.client_ids == ["f0000_14", "f0001_41"]
    assert data.train.sizes.tolist() == [5, 2] and data.test.sizes.tolist() == [1, 3]
    x = data.train.client(0)["x"]
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.float32
    # FedJAX's convention: x = 1 - pixels.
    np.testing.assert_allclose(x[..., 0], 1 - train["f0000_14"]["pixels"])
    assert data.train.client(1)["y"].tolist() == [61, 61]
    raw = federated_files.tff_emnist(tmp_path, invert=False, max_clients=1)
    assert raw.train.num_clients == 1
    np.testing.assert_array_equal(raw.train.client(0)["x"][..., 0], train["f0000_14"]["pixels"])


def test_tff_emnist_missing_files_say_how_to_get_them(tmp_path):
    pytest.importorskip("h5py", reason="TFF's files are HDF5: pip install h5py")
    with pytest.raises(DataNotFoundError, match="fed_emnist.tar.bz2"):
        federated_files.tff_emnist(tmp_path / "absent")
    with pytest.raises(DataNotFoundError, match="fed_emnist_digitsonly_train.h5"):
        federated_files.tff_emnist(tmp_path, only_digits=True)
    (tmp_path / "fed_emnist_train.h5").write_bytes(b"not hdf5 at all")
    (tmp_path / "fed_emnist_test.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataFileError, match="fed_emnist_train.h5: is not a readable HDF5"):
        federated_files.tff_emnist(tmp_path)


def _so_client(texts):
    n = len(texts)
    return {
        "tokens": np.array([t.encode() for t in texts], dtype=object),
        "title": np.array([b"a title"] * n, dtype=object),
        "tags": np.array([b"python|numpy"] * n, dtype=object),
        "score": np.arange(n, dtype=np.int64),
    }


def test_tff_stackoverflow_h5(tmp_path):
    pytest.importorskip("h5py", reason="TFF's files are HDF5: pip install h5py")
    train = {"00001": _so_client(["the cat sat", "the dog"]), "00002": _so_client(["cat cat"])}
    test = {"00001": _so_client(["the bird"]), "00002": _so_client(["dog"])}
    federated_files.write_tff_h5(tmp_path / "stackoverflow_train.h5", train)
    federated_files.write_tff_h5(tmp_path / "stackoverflow_test.h5", test)
    (tmp_path / "stackoverflow.word_count").write_text("the 100\ncat 50\ndog 20\nsat 1\n")
    data = federated_files.tff_stackoverflow(tmp_path, vocab_size=3, seq_len=4)
    # Ids: pad 0, the 1, cat 2, dog 3, oov 4, bos 5, eos 6 -> 3 + 1 + 3 = 7 classes.
    assert data.num_classes == 7
    c0 = data.train.client(0)
    # "the cat sat" -> bos the cat oov eos (3 words < 4: eos added), padded to 5, then shifted.
    np.testing.assert_array_equal(c0["x"][0], [5, 1, 2, 4])
    np.testing.assert_array_equal(c0["y"][0], [1, 2, 4, 6])
    np.testing.assert_array_equal(c0["x"][1], [5, 1, 3, 6])  # bos the dog eos pad
    np.testing.assert_array_equal(c0["y"][1], [1, 3, 6, 0])
    assert data.test.client(1)["x"].tolist() == [[5, 3, 6, 0]]
    # Four words fill seq_len: no eos.
    x, y = federated_files.stackoverflow_next_word([b"the the the the the"], ["the"], seq_len=4)
    assert x.tolist() == [[3, 1, 1, 1]] and y.tolist() == [[1, 1, 1, 1]]
    # Without the word-count file the vocabulary comes from the train clients' counts.
    (tmp_path / "stackoverflow.word_count").unlink()
    data = federated_files.tff_stackoverflow(tmp_path, vocab_size=2, seq_len=4)
    assert data.train.client(1)["x"].tolist() == [[4, 1, 1, 5]]  # cat(3x) = 1, the(3x) = 2


def test_fedjax_sqlite_round_trip(tmp_path):
    clients = {
        "a1": {"x": RNG.normal(size=(4, 3)).astype(np.float32), "y": np.arange(4, dtype=np.int32)},
        "b2": {"x": RNG.normal(size=(1, 3)).astype(np.float32), "y": np.array([9], np.int32)},
    }
    path = tmp_path / "train.sqlite"
    federated_files.write_fedjax_sqlite(path, clients)
    # The table is FedJAX's: (client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER).
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT client_id, num_examples FROM federated_data").fetchall()
    conn.close()
    assert rows == [(b"a1", 4), (b"b2", 1)]
    data = federated_files.fedjax_sqlite(path)
    assert data.train.client_ids == ["a1", "b2"] and data.num_classes == 10
    for i, cid in enumerate(["a1", "b2"]):
        for k in ("x", "y"):
            np.testing.assert_array_equal(data.train.client(i)[k], clients[cid][k])


def test_fedjax_sqlite_emnist_features_and_bytes(tmp_path):
    ex = _emnist_client(3, 4)
    ex["tag"] = np.array([b"p", b"q", b"r"], dtype=object)
    blob = federated_files.serialize_fedjax_examples(ex)
    back = federated_files.deserialize_fedjax_examples(blob)
    assert back["tag"].tolist() == [b"p", b"q", b"r"]
    np.testing.assert_array_equal(back["pixels"], ex["pixels"])
    path = tmp_path / "federated_emnist_train.sqlite"
    federated_files.write_fedjax_sqlite(path, {"f0": ex})
    data = federated_files.fedjax_sqlite(path, features="emnist", num_classes=62)
    np.testing.assert_allclose(data.train.client(0)["x"][..., 0], 1 - ex["pixels"])
    with pytest.raises(DataFileError, match="lacks feature"):
        federated_files.fedjax_sqlite(path)  # stored as pixels/label, not x/y
    with pytest.raises(ValueError, match="unknown features 'rgb'"):
        federated_files.fedjax_sqlite(path, features="rgb")


def test_fedjax_sqlite_bad_files_name_the_file(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00" * 512)
    with pytest.raises(DataFileError, match="junk.sqlite: is not a FedJAX SQLite file"):
        federated_files.fedjax_sqlite(junk)
    path = tmp_path / "bad_blob.sqlite"
    federated_files.write_fedjax_sqlite(path, {"c": {"x": np.zeros(2), "y": np.zeros(2, int)}})
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE federated_data SET data = ?", (b"not zlib",))
    conn.close()
    with pytest.raises(DataFileError, match="bad_blob.sqlite: client 'c': cannot decode"):
        federated_files.fedjax_sqlite(path)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 as a JPEG folder.


def _jpeg(rgb) -> bytes:
    Image = pytest.importorskip("PIL.Image", reason="JPEG decoding needs Pillow")

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_tar(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))


def test_cifar10_jpeg_labels_follow_cifar_order(tmp_path):
    files = {
        "train/truck/0001.jpg": _jpeg((200, 0, 0)),
        "train/airplane/0000.jpg": _jpeg((0, 200, 0)),
        "train/cat/0000.jpg": _jpeg((0, 0, 200)),
        "test/ship/0000.jpg": _jpeg((100, 100, 100)),
    }
    _write_tar(tmp_path / "cifar10_jpeg_q75.tar.gz", files)
    # The archive is not the known file, so its checksum fails unless told to skip the check.
    with pytest.raises(DataFileError, match="cifar10_jpeg_q75.tar.gz: sha256"):
        cifar10_jpeg(tmp_path)
    data = cifar10_jpeg(tmp_path, verify_checksum=False)
    # Sorted by class index: airplane 0, cat 3, truck 9.
    assert data["train"]["y"].tolist() == [0, 3, 9] and data["test"]["y"].tolist() == [8]
    x = data["train"]["x"]
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.uint8
    assert abs(int(x[0, 16, 16, 1]) - 200) < 8  # airplane was green (JPEG is lossy)
    # The same tree unpacked reads the same.
    for name, blob in files.items():
        (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / name).write_bytes(blob)
    tree = cifar10_jpeg(tmp_path / "tree")
    np.testing.assert_array_equal(tree["train"]["x"], x)


def test_cifar10_jpeg_bad_archives_name_the_file(tmp_path):
    _write_tar(tmp_path / "cifar10_jpeg_q75.tar.gz", {"train/moose/0.jpg": _jpeg((1, 2, 3))})
    with pytest.raises(DataFileError, match="'moose' is not a CIFAR-10 class"):
        cifar10_jpeg(tmp_path, verify_checksum=False)
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w:gz") as tf:
        for i in range(50):
            blob = _jpeg((i, i, i))
            info = tarfile.TarInfo(f"train/dog/{i:04d}.jpg")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    (tmp_path / "cifar10_jpeg_q75.tar.gz").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(DataFileError, match="cifar10_jpeg_q75.tar.gz: cannot be read"):
        cifar10_jpeg(tmp_path, verify_checksum=False)
    with pytest.raises(DataNotFoundError, match="cifar10_jpeg_q75.tar.gz"):
        cifar10_jpeg(tmp_path / "absent")


@pytest.mark.realdata
def test_real_cifar10_jpeg_counts():
    root = real_data("cifar10_jpeg/cifar10_jpeg_q75.tar.gz").parent
    data = cifar10_jpeg(root)
    assert data["train"]["x"].shape == (50_000, 32, 32, 3)
    assert data["test"]["x"].shape == (10_000, 32, 32, 3)
    assert np.bincount(data["train"]["y"]).tolist() == [5000] * 10
    assert np.bincount(data["test"]["y"]).tolist() == [1000] * 10
    assert len(CIFAR10_CLASSES) == 10


# ---------------------------------------------------------------------------------------------
# Cache.


def test_cache_hits_and_rebuilds_corrupt_files(tmp_path, caplog):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(1000), "b": np.ones((3, 4), np.float32)}

    parts = {"dataset": "toy", "seed": 3}
    first = cache.cached_arrays(tmp_path, "arrays", parts, build)
    second = cache.cached_arrays(tmp_path, "arrays", parts, build)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["a"], second["a"])
    cache.cached_arrays(tmp_path, "arrays", {**parts, "seed": 4}, build)  # another key
    assert len(calls) == 2

    (path,) = [p for p in (tmp_path / "arrays").iterdir() if cache.cache_key(parts) in p.name]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # flip a byte inside the stored arrays
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="fedjax_sim.data.cache"):
        again = cache.cached_arrays(tmp_path, "arrays", parts, build)
    assert len(calls) == 3 and "unusable" in caplog.text
    np.testing.assert_array_equal(again["a"], np.arange(1000))
    path.write_bytes(path.read_bytes()[:100])  # truncated
    cache.cached_arrays(tmp_path, "arrays", parts, build)
    assert len(calls) == 4
    assert cache.load_arrays(path, parts) is not None  # rebuilt entry is valid

"""Federated datasets in the files TFF and FedJAX publish: HDF5 (TFF) and SQLite (FedJAX).

**TFF HDF5** (``tff.simulation.datasets``, read there by ``HDF5ClientData``): one file per split
with a group ``/examples`` holding one group per client, whose datasets are that client's
features, all with the same leading dimension:

* federated EMNIST-62 (``fed_emnist_train.h5`` / ``fed_emnist_test.h5``; digits-only:
  ``fed_emnist_digitsonly_*.h5``): ``pixels`` float32 ``[n, 28, 28]`` (1.0 = background) and
  ``label`` int32 ``[n]``. 3,400 writers (3,383 in digits-only).
* Stack Overflow (``stackoverflow_train.h5``, ``stackoverflow_held_out.h5``,
  ``stackoverflow_test.h5``): byte-string datasets ``tokens`` (space-separated words),
  ``title``, ``tags`` (``|``-separated), ``type``, ``creation_date`` and int64 ``score``;
  the vocabulary file ``stackoverflow.word_count`` has one ``word count`` per line, most
  frequent first.

**FedJAX SQLite** (``fedjax.core.sqlite_federated_data.SQLiteFederatedData``): one file per
split, with the table::

    CREATE TABLE federated_data (
      client_id BLOB NOT NULL PRIMARY KEY,
      data BLOB NOT NULL,
      num_examples INTEGER NOT NULL
    );

where ``data`` is ``zlib.compress(msgpack(examples))``, ``examples`` a dict of feature name to
NumPy array, each array a msgpack extension (type 1: ``msgpack((shape, dtype name, C-order
bytes))``; type 4, byte-string arrays: ``msgpack((shape, [bytes, ...]))``), as FedJAX's
``fedjax.core.serialization.msgpack_serialize`` writes them. Clients are read in ``rowid``
order. FedJAX's EMNIST files hold ``pixels``/``label`` like TFF's; its loader feeds models
``x = 1 - pixels[..., None]``, which ``fedjax_sqlite(..., features="emnist")`` reproduces.

HDF5 needs ``h5py`` (imported on use); SQLite and msgpack ship with Python and Flax.
"""

from __future__ import annotations

import collections
import os
import sqlite3
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedData, FederatedDataset
from fedjax_sim.data.files import DataFileError, dataset_dir, require_dir, require_file

__all__ = [
    "fedjax_sqlite",
    "read_fedjax_sqlite",
    "read_tff_h5",
    "serialize_fedjax_examples",
    "deserialize_fedjax_examples",
    "stackoverflow_next_word",
    "tff_emnist",
    "tff_stackoverflow",
    "write_fedjax_sqlite",
    "write_tff_h5",
]

TFF_EMNIST_HOW_TO_GET = (
    "Download https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2 (or "
    "fed_emnist_digitsonly.tar.bz2) and unpack it there."
)
TFF_SO_HOW_TO_GET = (
    "Download https://storage.googleapis.com/tff-datasets-public/stackoverflow.tar.bz2 and "
    "stackoverflow.word_count.tar.bz2 and unpack them there."
)


def _import_h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("TFF's federated files are HDF5: pip install h5py.") from e
    return h5py


# ---------------------------------------------------------------------------------------------
# TFF HDF5.


def read_tff_h5(
    path: str | os.PathLike,
    *,
    features: Sequence[str] | None = None,
    client_ids: Sequence[str] | None = None,
    max_clients: int | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Reads TFF's ``/examples/<client_id>/<feature>`` layout.

    Args:
      path: the ``.h5`` file.
      features: features to read (default: all of the first client's).
      client_ids: read only these clients, in this order.
      max_clients: read only the first ``max_clients`` clients (in file order).

    Returns:
      ``{client_id: {feature: array}}``; byte-string features come back as ``object`` arrays
      of ``bytes``.

    Raises:
      DataFileError: not HDF5, no ``/examples`` group, or a client lacks a feature.
    """
    h5py = _import_h5py()
    path = Path(path)
    require_file(path, what="TFF HDF5", how_to_get="")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataFileError(path, f"is not a readable HDF5 file ({e}).") from e
    out = {}
    with f:
        if "examples" not in f:
            raise DataFileError(path, "has no /examples group (TFF's layout).")
        group = f["examples"]
        ids = list(client_ids) if client_ids is not None else list(group.keys())
        if max_clients is not None:
            ids = ids[:max_clients]
        for cid in ids:
            if cid not in group:
                raise DataFileError(path, f"has no client {cid!r} under /examples.")
            g = group[cid]
            names = list(features) if features is not None else sorted(g.keys())
            arrays = {}
            for name in names:
                if name not in g:
                    raise DataFileError(path, f"client {cid!r} has no feature {name!r}.")
                a = g[name][()]
                arrays[name] = np.asarray(a, dtype=object) if a.dtype.kind in "OSU" else a
            out[cid] = arrays
    return out


def write_tff_h5(path: str | os.PathLike, clients: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Writes ``clients`` in TFF's HDF5 layout (for tests and for exporting)."""
    h5py = _import_h5py()
    with h5py.File(path, "w") as f:
        ex = f.create_group("examples")
        for cid, feats in clients.items():
            g = ex.create_group(cid)
            for name, a in feats.items():
                a = np.asarray(a)
                if a.dtype.kind in "OSU":
                    g.create_dataset(
                        name,
                        data=np.array([_to_bytes(v) for v in a.reshape(-1)], dtype=object).reshape(
                            a.shape
                        ),
                        dtype=h5py.string_dtype(),
                    )
                else:
                    g.create_dataset(name, data=a)


def tff_emnist(
    data_dir: str | os.PathLike | None = None,
    *,
    only_digits: bool = False,
    invert: bool = True,
    max_clients: int | None = None,
) -> FederatedData:
    """TFF's federated EMNIST (3,400 writers, 62 classes; 10 with ``only_digits``).

    Args:
      data_dir: folder with ``fed_emnist_train.h5`` and ``fed_emnist_test.h5`` (or the
        ``digitsonly`` pair); default ``<data root>/tff_emnist``.
      only_digits: read the digits-only files.
      invert: ``x = 1 - pixels`` (ink = 1, as MNIST and as FedJAX feeds models).
      max_clients: read only the first clients of each file (for quick runs).

    Returns:
      ``FederatedData``: ``x`` float32 ``[n, 28, 28, 1]``, ``y`` int32; train and test keep the
      files' client order (TFF's test file holds the same writers).
    """
    root = Path(data_dir) if data_dir is not None else dataset_dir(None, "tff_emnist")
    stem = "fed_emnist_digitsonly" if only_digits else "fed_emnist"
    require_dir(
        root,
        what="tff_emnist",
        expected=f"{stem}_train.h5 and {stem}_test.h5",
        how_to_get=TFF_EMNIST_HOW_TO_GET,
    )
    splits = {}
    for split in ("train", "test"):
        path = require_file(
            root / f"{stem}_{split}.h5", what="tff_emnist", how_to_get=TFF_EMNIST_HOW_TO_GET
        )
        raw = read_tff_h5(path, features=("pixels", "label"), max_clients=max_clients)
        clients = {}
        for cid, d in raw.items():
            px = np.asarray(d["pixels"], np.float32)
            if px.ndim != 3 or px.shape[1:] != (28, 28):
                raise DataFileError(
                    path, f"client {cid!r}: pixels {list(px.shape)}, want [n,28,28]."
                )
            x = (1.0 - px) if invert else px
            clients[cid] = {"x": x[..., None], "y": np.asarray(d["label"], np.int32)}
        splits[split] = FederatedDataset(clients, name=f"tff_emnist/{split}")
    return FederatedData(splits["train"], splits["test"], 10 if only_digits else 62)


def _to_bytes(v) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode("utf-8")


def _read_word_counts(path: Path, vocab_size: int) -> list[str]:
    words = []
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataFileError(path, f"line {i + 1} is not 'word count': {line[:80]!r}.")
            words.append(parts[0].decode("utf-8"))
            if len(words) == vocab_size:
                break
    return words


def stackoverflow_next_word(
    tokens: Sequence[bytes | str], vocab: Sequence[str], *, seq_len: int = 20, num_oov: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """TFF's Stack Overflow next-word preprocessing, in NumPy.

    Ids: 0 pad, ``1..V`` the vocabulary, ``V+1..V+num_oov`` out-of-vocabulary buckets (by
    crc32 of the word; TF hashes with fingerprint64, the same for TFF's default single bucket),
    ``V+num_oov+1`` beginning of sentence, ``V+num_oov+2`` end of sentence. Each example's
    words are truncated to ``seq_len``; ``[bos] + ids (+ [eos] when fewer than seq_len words)``
    is padded to ``seq_len + 1``; ``x`` drops the last id and ``y`` the first.

    Returns:
      ``(x, y)`` int32 ``[n, seq_len]`` each.
    """
    index = {w: i + 1 for i, w in enumerate(vocab)}
    v = len(vocab)
    bos, eos = v + num_oov + 1, v + num_oov + 2
    ids = np.zeros((len(tokens), seq_len + 1), np.int32)
    for r, t in enumerate(tokens):
        words = (t.decode("utf-8") if isinstance(t, bytes) else str(t)).split()[:seq_len]
        row = [bos] + [index.get(w, v + 1 + (zlib.crc32(w.encode()) % num_oov)) for w in words]
        if len(words) < seq_len:
            row.append(eos)
        ids[r, : len(row)] = row
    return ids[:, :-1], ids[:, 1:]


def tff_stackoverflow(
    data_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 10000,
    seq_len: int = 20,
    num_oov: int = 1,
    test_split: str = "test",
    max_clients: int | None = None,
) -> FederatedData:
    """TFF's Stack Overflow as next-word prediction (TFF's preprocessing).

    Args:
      data_dir: folder with ``stackoverflow_train.h5``, ``stackoverflow_test.h5`` (and
        ``stackoverflow_held_out.h5``) and ``stackoverflow.word_count``; default
        ``<data root>/tff_stackoverflow``. Without the word-count file the vocabulary is the
        ``vocab_size`` most frequent words of the train clients read.
      vocab_size: words in the vocabulary (TFF: 10,000).
      seq_len: words per example (TFF: 20).
      num_oov: out-of-vocabulary buckets (TFF: 1).
      test_split: ``"test"`` or ``"held_out"``.
      max_clients: read only the first clients of each file (the full train file has 342,477
        clients and about 135M examples: far more than fits in memory as arrays).

    Returns:
      ``FederatedData`` with ``x``, ``y`` int32 ``[n, seq_len]`` and
      ``vocab_size + num_oov + 3`` classes (pad, bos, eos).
    """
    if test_split not in ("test", "held_out"):
        raise ValueError("tff_stackoverflow: test_split must be 'test' or 'held_out'.")
    root = Path(data_dir) if data_dir is not None else dataset_dir(None, "tff_stackoverflow")
    require_dir(
        root,
        what="tff_stackoverflow",
        expected="stackoverflow_train.h5, stackoverflow_test.h5, stackoverflow.word_count",
        how_to_get=TFF_SO_HOW_TO_GET,
    )
    raw = {}
    for split in ("train", test_split):
        path = require_file(
            root / f"stackoverflow_{split}.h5",
            what="tff_stackoverflow",
            how_to_get=TFF_SO_HOW_TO_GET,
        )
        raw[split] = read_tff_h5(path, features=("tokens",), max_clients=max_clients)
    wc = root / "stackoverflow.word_count"
    if wc.exists():
        vocab = _read_word_counts(wc, vocab_size)
    else:
        counts = collections.Counter()
        for d in raw["train"].values():
            for t in d["tokens"]:
                counts.update(_to_bytes(t).decode("utf-8").split())
        vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]]
    out = {}
    for split, clients in raw.items():
        fed = {}
        for cid, d in clients.items():
            x, y = stackoverflow_next_word(d["tokens"], vocab, seq_len=seq_len, num_oov=num_oov)
            fed[cid] = {"x": x, "y": y}
        out[split] = FederatedDataset(fed, name=f"tff_stackoverflow/{split}")
    return FederatedData(out["train"], out[test_split], len(vocab) + num_oov + 3)


# ---------------------------------------------------------------------------------------------
# FedJAX SQLite.

_EXT_NDARRAY = 1
_EXT_BYTES_NDARRAY = 4


def serialize_fedjax_examples(examples: Mapping[str, np.ndarray]) -> bytes:
    """``zlib(msgpack(examples))`` in FedJAX's encoding (see module docstring)."""
    import msgpack

    def default(a):
        if isinstance(a, np.ndarray) and a.dtype.kind in "OSU":
            flat = [_to_bytes(v) for v in a.reshape(-1)]
            return msgpack.ExtType(
                _EXT_BYTES_NDARRAY, msgpack.packb((a.shape, flat), use_bin_type=True)
            )
        if isinstance(a, np.ndarray):
            return msgpack.ExtType(
                _EXT_NDARRAY,
                msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True),
            )
        raise TypeError(f"cannot serialize {type(a).__name__}")

    blob = msgpack.packb(
        {k: np.asarray(v) for k, v in examples.items()}, default=default, strict_types=True
    )
    return zlib.compress(blob)


def deserialize_fedjax_examples(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of ``serialize_fedjax_examples`` (FedJAX's ``decompress_and_deserialize``)."""
    import msgpack

    def ext_hook(code, payload):
        if code == _EXT_NDARRAY:
            shape, dtype, buf = msgpack.unpackb(payload, raw=True)
            return np.frombuffer(buf, dtype=np.dtype(dtype.decode())).reshape(shape)
        if code == _EXT_BYTES_NDARRAY:
            shape, flat = msgpack.unpackb(payload, raw=True)
            return np.array(flat, dtype=object).reshape(shape)
        raise ValueError(f"unknown msgpack extension type {code}")

    return msgpack.unpackb(zlib.decompress(data), ext_hook=ext_hook, raw=False)


def write_fedjax_sqlite(
    path: str | os.PathLike, clients: Mapping[str, Mapping[str, np.ndarray]]
) -> None:
    """Writes ``clients`` as a FedJAX ``SQLiteFederatedData`` file (tests, exporting)."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
            "data BLOB NOT NULL, num_examples INTEGER NOT NULL);"
        )
        for cid, ex in clients.items():
            n = len(next(iter(ex.values())))
            conn.execute(
                "INSERT INTO federated_data VALUES (?, ?, ?)",
                (cid.encode() if isinstance(cid, str) else cid, serialize_fedjax_examples(ex), n),
            )
    conn.close()


def read_fedjax_sqlite(
    path: str | os.PathLike, *, max_clients: int | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """``{client_id: examples}`` from a FedJAX SQLite file, in ``rowid`` order.

    Raises:
      DataFileError: not SQLite, no ``federated_data`` table, an undecodable blob, or a
        ``num_examples`` that disagrees with the blob (each names the file and client).
    """
    path = Path(path)
    require_file(path, what="FedJAX SQLite", how_to_get="")
    out = {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            query = "SELECT client_id, data, num_examples FROM federated_data ORDER BY rowid"
            if max_clients is not None:
                query += f" LIMIT {int(max_clients)}"
            rows = conn.execute(query).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise DataFileError(path, f"is not a FedJAX SQLite file ({e}).") from e
    for cid, blob, n in rows:
        cid = cid.decode() if isinstance(cid, bytes) else str(cid)
        try:
            ex = deserialize_fedjax_examples(blob)
        except Exception as e:
            raise DataFileError(path, f"client {cid!r}: cannot decode its data blob ({e}).") from e
        sizes = {k: len(v) for k, v in ex.items()}
        if set(sizes.values()) != {n}:
            raise DataFileError(path, f"client {cid!r}: num_examples {n} but features {sizes}.")
        out[cid] = ex
    return out


def _emnist_features(ex: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    px = np.asarray(ex["pixels"], np.float32)
    return {"x": (1.0 - px)[..., None], "y": np.asarray(ex["label"], np.int32)}


def _xy_features(ex: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"x": np.asarray(ex["x"]), "y": np.asarray(ex["y"], np.int32)}


SQLITE_FEATURES: dict[str, Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "emnist": _emnist_features,
    "xy": _xy_features,
}


def fedjax_sqlite(
    train_path: str | os.PathLike,
    test_path: str | os.PathLike | None = None,
    *,
    features: str | Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] = "xy",
    num_classes: int | None = None,
    max_clients: int | None = None,
) -> FederatedData:
    """A federated dataset from FedJAX SQLite files (one per split).

    Args:
      train_path: the train split's file (e.g. ``federated_emnist_train.sqlite``).
      test_path: the test split's file; default: the train file.
      features: how stored examples become ``{"x", "y"}``: ``"xy"`` (stored as ``x``, ``y``),
        ``"emnist"`` (FedJAX's EMNIST: ``x = 1 - pixels[..., None]``, ``y = label``), or a
        function of the stored dict.
      num_classes: default ``max(train y) + 1``.
      max_clients: read only the first clients of each file.

    Returns:
      ``FederatedData``.
    """
    fn = SQLITE_FEATURES.get(features) if isinstance(features, str) else features
    if fn is None:
        raise ValueError(
            f"fedjax_sqlite: unknown features {features!r}; known: {', '.join(SQLITE_FEATURES)} "
            "or a function."
        )
    splits = {}
    for split, path in (("train", train_path), ("test", test_path or train_path)):
        raw = read_fedjax_sqlite(path, max_clients=max_clients)
        if not raw:
            raise DataFileError(path, "has no clients.")
        clients = {}
        for cid, ex in raw.items():
            try:
                clients[cid] = fn(ex)
            except KeyError as e:
                raise DataFileError(
                    path, f"client {cid!r} lacks feature {e} (has {sorted(ex)}); pick features=."
                ) from e
        splits[split] = FederatedDataset(clients, name=f"fedjax_sqlite/{split}")
    if num_classes is None:
        num_classes = int(max(int(np.max(c["y"], initial=0)) for _, c in splits["train"])) + 1
    return FederatedData(splits["train"], splits["test"], num_classes)

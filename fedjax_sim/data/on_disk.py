"""Client datasets on disk, read one client at a time: populations too large for memory.

A folder holds every client's examples concatenated, one raw file per feature, and an index:

    meta.json       {"format": "fedjax_sim.clients/1", "num_clients": N, "num_examples": T,
                     "features": {"x": {"dtype": "float32", "shape": [784]}, ...}}
    offsets.bin     int64 [N + 1]: client i's examples are rows offsets[i]:offsets[i + 1]
    <feature>.bin   [T, *shape] in C order

``write_clients`` streams clients into such a folder (any number, one at a time; the folder
appears whole or not at all); ``OnDiskClients`` reads a client's rows (``os.pread``) when its
cohort is packed, so a population of millions costs its index (16 bytes per client: offsets and
sizes). Not a memory map: the kernel's read-ahead around each client's few kilobytes filled the
process's memory with the file (150 MB in three rounds of 1,000 clients), reads do not.
``on_disk(path)`` (dataset name ``on_disk``) reads ``path/train`` on demand and ``path/test``
whole (evaluation scores every test client).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.population import OnDemandClients, _ClientIds

FORMAT = "fedjax_sim.clients/1"


def write_clients(path: str | os.PathLike, clients: Iterable) -> Path:
    """Writes ``clients`` (a ``FederatedDataset`` or an iterable of ``(id, {name: array})``,
    ids ignored) to the folder ``path``, one client at a time; returns the folder.

    Raises:
      FileExistsError: ``path`` exists.
      ValueError: no client, or a client whose features differ from the first's.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; write the clients to a new folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        spec, files, offsets = None, {}, [0]
        for _, arrays in clients:
            arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            this = {k: (np.dtype(v.dtype).name, list(v.shape[1:])) for k, v in arrays.items()}
            if spec is None:
                spec = this
                files = {k: (tmp / f"{k}.bin").open("wb") for k in spec}
            elif this != spec:
                raise ValueError(
                    f"client {len(offsets) - 1} has features {this}, the first {spec}; every "
                    "client needs the same names, dtypes and trailing shapes."
                )
            n = {len(v) for v in arrays.values()}
            if len(n) != 1:
                raise ValueError(f"client {len(offsets) - 1}: features of different lengths.")
            for k, v in arrays.items():
                files[k].write(v.tobytes())
            offsets.append(offsets[-1] + n.pop())
        for f in files.values():
            f.close()
        if spec is None:
            raise ValueError("write_clients got no client.")
        np.asarray(offsets, np.int64).tofile(tmp / "offsets.bin")
        meta = {
            "format": FORMAT,
            "num_clients": len(offsets) - 1,
            "num_examples": offsets[-1],
            "features": {k: {"dtype": d, "shape": s} for k, (d, s) in spec.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class OnDiskClients(OnDemandClients):
    """A ``write_clients`` folder, read a client at a time: what packing and sampling read of a
    ``FederatedDataset`` (``num_clients``, ``sizes``, ``element_spec``, ``client(i)``), with
    each client read from disk when asked for. ``all_examples()`` is refused, as for a
    generated population: the data stays on the host.

    Raises:
      FileNotFoundError / ValueError: a missing folder or file, or one whose size does not
        match the index (truncated or not this format), named with what to do.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(self.path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: {self.path} is not a folder written by "
                "fs.data.write_clients."
            )
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            n, total = int(meta["num_clients"]), int(meta["num_examples"])
            self.element_spec = {
                k: (tuple(f["shape"]), np.dtype(f["dtype"])) for k, f in meta["features"].items()
            }
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path} cannot be read ({e}); write the folder again.") from None
        self._check_size("offsets", np.dtype(np.int64), (n + 1,))
        self._offsets = np.fromfile(self.path / "offsets.bin", np.int64)
        if self._offsets[0] != 0 or self._offsets[-1] != total:
            raise ValueError(f"{self.path}/offsets.bin does not match meta.json; write it again.")
        for k, (shape, dtype) in self.element_spec.items():
            self._check_size(k, dtype, (total, *shape))
        self._files = {k: os.open(self.path / f"{k}.bin", os.O_RDONLY) for k in self.element_spec}
        weakref.finalize(self, _close, list(self._files.values()))
        self._n = n
        self.client_ids = _ClientIds(n, "c")
        self._sizes = None

    def _check_size(self, feature: str, dtype: np.dtype, shape: tuple) -> None:
        file = self.path / f"{feature}.bin"
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        got = file.stat().st_size if file.is_file() else None
        if got != want:
            what = "is missing" if got is None else f"holds {got} bytes, the index says {want}"
            raise ValueError(f"{file} {what} (truncated or damaged); write the folder again.")

    @property
    def sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = np.diff(self._offsets)
        return self._sizes

    @property
    def num_examples(self) -> int:
        return int(self._offsets[-1])

    def client(self, index: int) -> dict[str, np.ndarray]:
        index = self._check_index(index)
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        out = {}
        for k, (shape, dtype) in self.element_spec.items():
            row = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            raw = os.pread(self._files[k], (hi - lo) * row, lo * row)  # thread-safe
            out[k] = np.frombuffer(raw, dtype).reshape((hi - lo, *shape)).copy()
        return out


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def on_disk(path: str | os.PathLike, *, num_classes: int | None = None) -> FederatedData:
    """``path/train`` read on demand and ``path/test`` read whole (folders of
    ``write_clients``); ``num_classes`` defaults to the largest label of the test set + 1."""
    root = Path(path)
    train = OnDiskClients(root / "train", name=f"{root.name}/train")
    test_disk = OnDiskClients(root / "test", name=f"{root.name}/test")
    test = test_disk.subset(range(test_disk.num_clients))
    if num_classes is None:
        labels: Mapping = test.all_examples()
        num_classes = int(np.max(labels["y"], initial=0)) + 1
    return FederatedData(train, test, int(num_classes))

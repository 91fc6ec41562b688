"""An on-disk ``.npz`` cache for prepared arrays, keyed by everything that produced them.

Each entry is one ``.npz`` holding the arrays plus a JSON header with the key's parts and a
sha256 of every array, written to a temporary name and renamed into place (so a crash never
leaves a half-written entry under the real name). Reading checks the header and the digests;
an entry that cannot be read, belongs to another key or fails its digest is reported through
``logging``, deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedDataset

log = logging.getLogger(__name__)

# Bump when the layout of cached arrays changes, so old entries are ignored.
CACHE_FORMAT = 1
_HEADER = "__header__"


def cache_key(parts: Mapping) -> str:
    """A stable hex key for a JSON-serializable mapping (sorted keys, compact)."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], parts: Mapping) -> None:
    """Writes ``arrays`` and a header (``parts`` and per-array sha256) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    header = {
        "format": CACHE_FORMAT,
        "parts": json.loads(json.dumps(parts, sort_keys=True, default=str)),
        "sha256": {k: _digest(v) for k, v in arrays.items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **{_HEADER: np.array(json.dumps(header))})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_arrays(path: str | os.PathLike, parts: Mapping) -> dict[str, np.ndarray] | None:
    """The arrays stored at ``path`` for key ``parts``; None when absent or unusable.

    A present but unusable file (unreadable, truncated, another key, failed digest) is deleted
    so the caller rebuilds it.
    """
    path = Path(path)
    if not path.exists():
        return None
    want = json.loads(json.dumps(parts, sort_keys=True, default=str))
    try:
        # Opened here rather than by np.load, which can leak the handle when the zip is bad.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            header = json.loads(str(z[_HEADER]))
            arrays = {k: z[k] for k in z.files if k != _HEADER}
        if header.get("format") != CACHE_FORMAT or header.get("parts") != want:
            raise ValueError("it was written for a different key or cache format")
        digests = header["sha256"]
        if set(digests) != set(arrays):
            raise ValueError("its array names do not match its header")
        for k, a in arrays.items():
            if _digest(a) != digests[k]:
                raise ValueError(f"array {k!r} fails its sha256 check")
    except Exception as e:  # any failure to read back means: rebuild.
        log.warning("cache file %s is unusable (%s: %s); rebuilding it.", path, type(e).__name__, e)
        try:
            path.unlink()
        except OSError:
            pass
        return None
    return arrays


def cached_arrays(
    cache_dir: str | os.PathLike | None,
    kind: str,
    parts: Mapping,
    build: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """``build()``'s arrays, read from ``<cache_dir>/<kind>/<key>.npz`` when a valid copy exists.

    Args:
      cache_dir: cache root; None disables caching (``build`` always runs).
      kind: a sub-folder name grouping entries (``arrays``, ``partitions``, ...).
      parts: everything that determines the result (dataset, options, seed, ...).
      build: computes the arrays on a miss.
    """
    if cache_dir is None:
        return dict(build())
    path = Path(cache_dir) / kind / f"{cache_key(parts)}.npz"
    hit = load_arrays(path, parts)
    if hit is not None:
        log.info("cache hit %s", path)
        return hit
    arrays = dict(build())
    save_arrays(path, arrays, parts)
    return arrays


def federated_to_arrays(ds: FederatedDataset, prefix: str) -> dict[str, np.ndarray]:
    """Flattens ``ds`` into ``{prefix+feature: concatenated, prefix+'__sizes', prefix+'__ids'}``."""
    out = {f"{prefix}{k}": v for k, v in ds.all_examples().items()}
    out[f"{prefix}__sizes"] = ds.sizes.astype(np.int64)
    out[f"{prefix}__ids"] = np.array(ds.client_ids, dtype=str)
    return out


def arrays_to_federated(arrays: Mapping[str, np.ndarray], prefix: str, name: str):
    """Inverse of ``federated_to_arrays``; clients are views into the concatenated arrays."""
    sizes = arrays[f"{prefix}__sizes"]
    ids = [str(i) for i in arrays[f"{prefix}__ids"]]
    feats = {
        k[len(prefix) :]: v
        for k, v in arrays.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("__")
    }
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    clients = {
        cid: {k: v[bounds[i] : bounds[i + 1]] for k, v in feats.items()}
        for i, cid in enumerate(ids)
    }
    return FederatedDataset(clients, name=name)

"""Where real data lives on disk, and errors that name the file at fault.

Two directories matter:

* the **data directory** holds files the user already has (``FEDJAX_SIM_DATA_DIR``; default
  ``<repo root>/../shared/data``), one sub-folder per dataset (``mnist/``, ``femnist_leaf/``,
  ``shakespeare/``, ``cifar10_jpeg/``, ``tff_emnist/``, ...). It is only ever read.
* the **cache directory** holds what fedjax_sim prepares from them (``FEDJAX_SIM_CACHE``;
  default ``~/.cache/fedjax_sim``): TFDS's prepared records under ``tfds/``, decoded arrays and
  client partitions as ``.npz``. Several processes may share it (a run beside the test
  suite): TFDS preparation holds ``exclusive_lock``, and ``.npz`` entries are written to a
  temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DATA_DIR_ENV = "FEDJAX_SIM_DATA_DIR"
CACHE_DIR_ENV = "FEDJAX_SIM_CACHE"

# sha256 of the files in the shared data directory (see its README), by path relative to it.
KNOWN_SHA256 = {
    "mnist/train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "mnist/train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "mnist/t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "mnist/t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
    "shakespeare/shakespeare.txt.gz": (
        "2277de5933fd43a5c42bc4fe39e16aaea8cd1854277dcd0751910d9292f92f68"
    ),
    "cifar10_jpeg/cifar10_jpeg_q75.tar.gz": (
        "b8064bfae058ced272f37ae0d7bb675ed74e5b6071c06dfd0e4e8ff12d1cf1de"
    ),
}


class DataNotFoundError(FileNotFoundError):
    """Files a loader needs are not where it looked; the message says how to get them."""


class DataFileError(ValueError):
    """A data file exists but cannot be used (wrong checksum, truncated, malformed).

    Attributes:
      path: the file at fault.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}")


def default_data_dir() -> Path:
    """``$FEDJAX_SIM_DATA_DIR``, else ``<repo root>/../shared/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return (repo_root.parent / "shared" / "data").resolve()


def default_cache_dir() -> Path:
    """``$FEDJAX_SIM_CACHE``, else ``$XDG_CACHE_HOME/fedjax_sim`` (``~/.cache/fedjax_sim``)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "fedjax_sim"


def dataset_dir(data_dir: str | os.PathLike | None, subdir: str) -> Path:
    """``<data_dir>/<subdir>``, with ``data_dir`` defaulting to ``default_data_dir()``."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return root / subdir


def require_dir(path: Path, *, what: str, expected: str, how_to_get: str) -> Path:
    """Returns ``path`` if it is a directory, else raises ``DataNotFoundError`` explaining
    what should be there and how to get it."""
    if not path.is_dir():
        raise DataNotFoundError(
            f"{what}: no directory {path}. Expected {expected} there. {how_to_get} Point "
            f"fedjax_sim at the folder that holds it with data_dir=... or ${DATA_DIR_ENV}."
        )
    return path


def require_file(path: Path, *, what: str, how_to_get: str) -> Path:
    if not path.is_file():
        how = f"{how_to_get} " if how_to_get else ""
        raise DataNotFoundError(
            f"{what}: file {path} is missing. {how}Point fedjax_sim at the folder that holds "
            f"it with data_dir=... or ${DATA_DIR_ENV}."
        )
    return path


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, timeout: float | None = None) -> Iterator[Path]:
    """Holds an exclusive inter-process lock on the file ``path`` (created if absent).

    ``fcntl.flock`` on Linux and macOS: the kernel drops the lock when its holder exits or
    crashes, so a stale lock file never blocks anyone. Locks taken through separate ``open``
    calls exclude each other even within one process. The file is left in place (deleting it
    could let a third process lock a new file while a second still waits on the old one).

    Args:
      path: the lock file; its folder is created.
      timeout: seconds to wait for the lock; None waits as long as it takes.

    Raises:
      TimeoutError: ``timeout`` passed with another holder still holding the lock.
    """
    import fcntl  # Unix only; imported here so that the module still imports elsewhere.

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another process holds it", path)
            if timeout is None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            else:
                _poll_lock(f.fileno(), path, timeout)
        try:
            yield path
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _poll_lock(fd: int, path: Path, timeout: float) -> None:
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{path}: still locked by another process after {timeout} s."
                ) from None
            time.sleep(0.05)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raises ``DataFileError`` naming ``path`` when its sha256 is not ``expected``."""
    got = sha256_file(path)
    if got != expected:
        raise DataFileError(
            path,
            f"sha256 is {got}, expected {expected}: the file is corrupt, truncated or a "
            "different edition. Replace it with the original, or pass verify_checksum=False "
            "to use it anyway.",
        )


def verify_known_file(path: Path, relative_name: str) -> None:
    """Checks ``path`` against ``KNOWN_SHA256[relative_name]`` if that entry exists."""
    expected = KNOWN_SHA256.get(relative_name)
    if expected is not None:
        verify_sha256(path, expected)


def read_bytes_maybe_gzip(path: str | os.PathLike) -> bytes:
    """The file's bytes, gunzipped when the name ends in ``.gz``; errors name the file."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFileError(path, f"not a complete gzip file ({e}); it may be truncated.") from e


def read_json(path: str | os.PathLike):
    """Parses a ``.json`` or ``.json.gz`` file; malformed or truncated input names the file."""
    raw = read_bytes_maybe_gzip(path)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataFileError(path, f"is not UTF-8 text ({e}).") from e
    except json.JSONDecodeError as e:
        raise DataFileError(
            path, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}."
        ) from e


def read_text(path: str | os.PathLike, *, encoding: str = "utf-8") -> str:
    raw = read_bytes_maybe_gzip(path)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataFileError(path, f"is not {encoding} text ({e}).") from e

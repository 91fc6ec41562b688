"""Centralized datasets as NumPy arrays: through TFDS, or from a JPEG copy of CIFAR-10.

Every loader returns ``{split: {"x": ..., "y": ...}}`` with ``y`` int32; a partitioner from
``fedjax_sim.data.partition`` then turns a split into clients.

Image dtypes: grayscale datasets (MNIST, Fashion-MNIST, EMNIST) give ``x`` float32
``[n, 28, 28, 1]`` in ``[0, 1]``; colour datasets (CIFAR-10/100 and the JPEG copy) keep
``x`` uint8 ``[n, 32, 32, 3]`` to save memory (4x): the model scales them (``x / 255``).
``tiny_shakespeare`` gives ``x`` int32 ``[n, 80]`` character ids in LEAF's vocabulary and ``y``
the next character.

TFDS and TensorFlow are imported inside the functions that need them. TFDS prepares each
dataset once into ``tfds_data_dir`` (default ``<cache dir>/tfds``); files you already have go in
``manual_dir`` (by default ``<data_dir>/<name>``) under the names TFDS expects (for MNIST the
four original ``*-ubyte.gz`` files), and are checked against TFDS's registered sha256 before
TFDS sees them.

Offline by default: nothing is downloaded unless ``download=True``. A dataset that is neither
prepared nor in its manual folder is a one-line ``DataNotFoundError`` naming the folder and the
files it needs, raised before TensorFlow is imported. Preparation holds an exclusive file lock
(``<tfds_data_dir>/<name>.lock``), so processes sharing a cache prepare each dataset once and
the others wait, then read it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_sim.data.files import (
    DataFileError,
    DataNotFoundError,
    dataset_dir,
    default_cache_dir,
    exclusive_lock,
    require_dir,
    require_file,
    sha256_file,
    verify_known_file,
)

log = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_CLASSES",
    "TFDS_DATASETS",
    "cifar10",
    "cifar10_jpeg",
    "cifar100",
    "emnist",
    "fashion_mnist",
    "load_tfds",
    "mnist",
    "tiny_shakespeare",
]

Splits = dict[str, dict[str, np.ndarray]]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_JPEG_FILE = "cifar10_jpeg_q75.tar.gz"
_READ_BATCH = 16384
EMNIST_CONFIGS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")


class TfdsSpec(NamedTuple):
    tfds_name: str
    label_key: str | None  # None: a text dataset
    splits: tuple[str, ...]
    description: str
    # The original files TFDS takes from a manual folder (its url_infos' file names), known
    # here so that their absence is reported before TFDS is imported.
    manual_files: tuple[str, ...]


_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
TFDS_DATASETS = {
    "mnist": TfdsSpec(
        "mnist", "label", ("train", "test"), "MNIST digits, 28x28, 10 classes", _IDX_FILES
    ),
    "fashion_mnist": TfdsSpec(
        "fashion_mnist",
        "label",
        ("train", "test"),
        "Fashion-MNIST, 28x28, 10 classes",
        _IDX_FILES,
    ),
    "emnist": TfdsSpec(
        "emnist",
        "label",
        ("train", "test"),
        "EMNIST (config byclass|bymerge|balanced|...)",
        ("gzip.zip",),
    ),
    "cifar10": TfdsSpec(
        "cifar10",
        "label",
        ("train", "test"),
        "CIFAR-10, 32x32x3, 10 classes",
        ("cifar-10-binary.tar.gz",),
    ),
    "cifar100": TfdsSpec(
        "cifar100", "label", ("train", "test"), "CIFAR-100, 32x32x3", ("cifar-100-binary.tar.gz",)
    ),
    "tiny_shakespeare": TfdsSpec(
        "tiny_shakespeare",
        None,
        ("train", "test"),
        "Karpathy's Tiny Shakespeare, characters",
        ("input.txt",),
    ),
}


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this dataset is read through TensorFlow Datasets: pip install tensorflow-datasets "
            "tensorflow-cpu importlib_resources (or pip install 'fedjax_sim[data]')."
        ) from e
    return tfds


def _tfds_root(tfds_data_dir) -> Path:
    return Path(tfds_data_dir) if tfds_data_dir is not None else default_cache_dir() / "tfds"


def _one_line(e: BaseException) -> str:
    return textwrap.shorten(" ".join(str(e).split()), 400, placeholder=" ...")


def _is_network_error(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a failed connection rather than a local problem.

    requests' errors subclass OSError, so OSError alone cannot tell a download that failed from
    a file the disk refused.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for cls in type(e).__mro__:
            if cls.__module__.split(".")[0] in ("requests", "urllib3", "urllib", "socket", "ssl"):
                return True
            if any(w in cls.__name__ for w in ("Connection", "Timeout", "DownloadError")):
                return True
        e = e.__cause__ or e.__context__
    return False


def _missing_files_error(
    name: str,
    folder: Path | None,
    *,
    needs: Sequence[str],
    missing: Sequence[str],
    explicit: bool,
    tfds_dir: Path,
) -> DataNotFoundError:
    """The one-line error for an unprepared dataset whose original files are not at hand."""
    needed = ", ".join(needs) or "unknown names"
    if folder is None:
        where = f"no manual_dir given and nothing prepared in {tfds_dir} (needs {needed})"
    else:
        label = f"manual_dir {folder}" if explicit else str(folder)
        if not folder.is_dir():
            where = f"{label} is missing (needs {needed})"
        else:
            where = f"{label} lacks {', '.join(missing)} (needs {needed})"
    fix = "put the original files there"
    if not explicit:
        fix += f", point data_dir (dataset.kwargs.data_dir) at a folder holding {name}/"
    return DataNotFoundError(
        f"{name}: {where}: {fix}, or pass download=True (dataset.kwargs.download=True) to let "
        f"TFDS download them into {tfds_dir}."
    )


def _maybe_prepared(tfds_dir: Path, tfds_name: str) -> bool:
    """Whether ``tfds_dir`` holds a prepared version of ``tfds_name``, judged from the file
    layout only (``<name>[/<config>]/<version>/dataset_info.json``); TFDS has the last word."""
    root = tfds_dir / tfds_name
    return root.is_dir() and any(
        re.fullmatch(r"\d+\.\d+\.\d+", p.parent.name) for p in root.glob("*/dataset_info.json")
    )


def _require_offline_files(
    name: str,
    tfds_name: str,
    *,
    manual_dir: Path | None,
    explicit: bool,
    tfds_data_dir,
    download: bool,
) -> None:
    """Fails at once, before TFDS is imported, when an offline load cannot succeed: the dataset
    is not prepared and ``manual_dir`` lacks some of its original files."""
    if download:
        return
    tfds_dir = _tfds_root(tfds_data_dir)
    if _maybe_prepared(tfds_dir, tfds_name):
        return
    needs = TFDS_DATASETS[name].manual_files
    missing = [f for f in needs if manual_dir is None or not (manual_dir / f).is_file()]
    if missing:
        raise _missing_files_error(
            name, manual_dir, needs=needs, missing=missing, explicit=explicit, tfds_dir=tfds_dir
        )


def load_tfds(
    tfds_name: str,
    *,
    splits: Sequence[str] = ("train", "test"),
    tfds_data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[dict[str, dict[str, np.ndarray]], object]:
    """Prepares (once) and reads a TFDS dataset as whole-split NumPy arrays.

    Preparation holds an exclusive lock on ``<tfds_data_dir>/<name>.lock`` (``<name>`` without
    the config) and checks again, once it holds it, whether another process prepared the
    dataset meanwhile; if so it just reads.

    Args:
      tfds_name: TFDS name with optional config, e.g. ``"mnist"``, ``"emnist/byclass"``.
      splits: splits to read.
      tfds_data_dir: where TFDS keeps prepared data; default ``<cache dir>/tfds``.
      manual_dir: a folder holding the dataset's original files under the names TFDS
        expects; they are used instead of downloading.
      download: allow TFDS to reach the network (its prepared-data bucket, then the files'
        URLs) for what is missing. With False (the default), an unprepared dataset without its
        files in ``manual_dir`` is an error at once, with no network attempt.

    Returns:
      ``({split: {feature: array}}, builder.info)``.

    Raises:
      DataNotFoundError: the dataset is not prepared and cannot be (missing files, offline).
      DataFileError: a file in ``manual_dir`` has the wrong sha256 (names the file).
    """
    tfds = _import_tfds()
    data_dir = _tfds_root(tfds_data_dir)
    builder = tfds.builder(tfds_name, data_dir=str(data_dir))
    if not builder.is_prepared():
        manual_dir = Path(manual_dir) if manual_dir is not None else None
        _check_manual_files(builder, tfds_name, manual_dir, data_dir, download)
        with exclusive_lock(data_dir / f"{tfds_name.split('/')[0]}.lock"):
            # A fresh builder: one made before another process finished preparing lacks the
            # split sizes that TFDS reads from the prepared folder.
            builder = tfds.builder(tfds_name, data_dir=str(data_dir))
            if builder.is_prepared():
                log.info("%s was prepared by another process meanwhile; reading it", tfds_name)
            else:
                _prepare(tfds, builder, tfds_name, manual_dir, data_dir, download)
    out = {}
    for split in splits:
        # Fixed-size batches rather than batch_size=-1, which needs the split's size up front.
        chunks = list(tfds.as_numpy(builder.as_dataset(split=split).batch(_READ_BATCH)))
        if not chunks:
            raise DataFileError(data_dir, f"{tfds_name} split {split!r} is empty.")
        out[split] = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return out, builder.info


def _check_manual_files(builder, tfds_name, manual_dir, data_dir, download) -> None:
    expected = {
        info.filename: info for info in (type(builder).url_infos or {}).values() if info.filename
    }
    missing = sorted(expected)
    if manual_dir is not None:
        missing = [f for f in sorted(expected) if not (manual_dir / f).is_file()]
        for fname, info in expected.items():
            path = manual_dir / fname
            if path.is_file():
                got = sha256_file(path)
                if got != info.checksum:
                    raise DataFileError(
                        path,
                        f"sha256 is {got} but TFDS expects {info.checksum} for "
                        f"{tfds_name}: the file is corrupt, truncated or not the original.",
                    )
    if missing and not download:
        raise _missing_files_error(
            tfds_name,
            manual_dir,
            needs=sorted(expected),
            missing=missing,
            explicit=True,
            tfds_dir=data_dir,
        )


def _prepare(tfds, builder, tfds_name, manual_dir, data_dir, download) -> None:
    # Offline, TFDS must not even ask its GCS bucket for a prepared copy.
    config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir is not None else None,
        try_download_gcs=download,
    )
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as e:
        if type(e).__name__ == "NonMatchingChecksumError":
            raise DataFileError(
                manual_dir or data_dir, f"TFDS rejected a file's checksum: {_one_line(e)}"
            ) from e
        if _is_network_error(e):
            cause = f"{type(e).__name__}: {_one_line(e)}"
            raise DataNotFoundError(
                f"{tfds_name}: TFDS could not download its files ({cause}). Offline? Put the "
                "original files in a folder and pass manual_dir=<folder>."
                if download
                else f"{tfds_name}: TFDS reached for the network although download=False ({cause})."
            ) from e
        raise  # a local failure (disk full, permissions) keeps its own type and traceback


def _manual_dir(manual_dir, data_dir, name: str) -> tuple[Path, bool]:
    """``(folder holding the original files, whether the caller named it as manual_dir)``."""
    if manual_dir is not None:
        return Path(manual_dir).expanduser(), True
    return dataset_dir(data_dir, name), False


def _tfds_images(
    name: str,
    tfds_name: str,
    *,
    data_dir,
    tfds_data_dir,
    manual_dir,
    download: bool,
    label_key: str = "label",
) -> tuple[Splits, int]:
    raw, info = _load_named(name, tfds_name, data_dir, tfds_data_dir, manual_dir, download)
    out = {
        split: {"x": np.asarray(d["image"], np.uint8), "y": np.asarray(d[label_key], np.int32)}
        for split, d in raw.items()
    }
    return out, int(info.features[label_key].num_classes)


def _load_named(name, tfds_name, data_dir, tfds_data_dir, manual_dir, download):
    folder, explicit = _manual_dir(manual_dir, data_dir, name)
    _require_offline_files(
        name,
        tfds_name,
        manual_dir=folder,
        explicit=explicit,
        tfds_data_dir=tfds_data_dir,
        download=download,
    )
    return load_tfds(
        tfds_name,
        splits=TFDS_DATASETS[name].splits,
        tfds_data_dir=tfds_data_dir,
        manual_dir=folder if folder.is_dir() else None,
        download=download,
    )


def grayscale_to_float(splits: Splits) -> Splits:
    """uint8 images to float32 in ``[0, 1]``; other features unchanged."""
    return {
        s: {**d, "x": np.asarray(d["x"], np.float32) * np.float32(1 / 255)}
        for s, d in splits.items()
    }


def mnist_raw(*, data_dir=None, tfds_data_dir=None, manual_dir=None, download=False):
    """``(splits with uint8 images, num_classes)``; see ``mnist``."""
    return _tfds_images(
        "mnist",
        "mnist",
        data_dir=data_dir,
        tfds_data_dir=tfds_data_dir,
        manual_dir=manual_dir,
        download=download,
    )


def mnist(
    *,
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Splits:
    """MNIST (60,000 train / 10,000 test) through TFDS.

    Args:
      data_dir: data root (default ``$FEDJAX_SIM_DATA_DIR`` or ``<repo>/../shared/data``);
        ``<data_dir>/mnist`` is the manual folder.
      tfds_data_dir: TFDS's prepared-data folder (default ``<cache dir>/tfds``).
      manual_dir: folder with ``train-images-idx3-ubyte.gz`` and the three other original
        files (overrides ``data_dir``).
      download: let TFDS download what is neither prepared nor in the manual folder. Off by
        default: then a missing file is a ``DataNotFoundError`` naming the folder, at once.

    Returns:
      ``{"train", "test"}`` -> ``{"x": float32 [n, 28, 28, 1] in [0, 1], "y": int32 [n]}``.
    """
    return grayscale_to_float(
        mnist_raw(
            data_dir=data_dir, tfds_data_dir=tfds_data_dir, manual_dir=manual_dir, download=download
        )[0]
    )


def fashion_mnist_raw(*, data_dir=None, tfds_data_dir=None, manual_dir=None, download=False):
    return _tfds_images(
        "fashion_mnist",
        "fashion_mnist",
        data_dir=data_dir,
        tfds_data_dir=tfds_data_dir,
        manual_dir=manual_dir,
        download=download,
    )


def fashion_mnist(*, data_dir=None, tfds_data_dir=None, manual_dir=None, download=False) -> Splits:
    """Fashion-MNIST through TFDS; arguments and return as ``mnist``."""
    return grayscale_to_float(
        fashion_mnist_raw(
            data_dir=data_dir, tfds_data_dir=tfds_data_dir, manual_dir=manual_dir, download=download
        )[0]
    )


def emnist_raw(
    *, config="byclass", data_dir=None, tfds_data_dir=None, manual_dir=None, download=False
):
    if config not in EMNIST_CONFIGS:
        raise ValueError(f"emnist: unknown config {config!r}; known: {', '.join(EMNIST_CONFIGS)}.")
    return _tfds_images(
        "emnist",
        f"emnist/{config}",
        data_dir=data_dir,
        tfds_data_dir=tfds_data_dir,
        manual_dir=manual_dir,
        download=download,
    )


def emnist(
    *, config: str = "byclass", data_dir=None, tfds_data_dir=None, manual_dir=None, download=False
) -> Splits:
    """EMNIST through TFDS (``config``: byclass 62 classes, bymerge/balanced 47, letters 37
    (labels 1..26 used), digits/mnist 10). Images are as TFDS stores them. Manual file:
    ``gzip.zip`` from NIST. Other arguments and return as ``mnist``."""
    return grayscale_to_float(
        emnist_raw(
            config=config,
            data_dir=data_dir,
            tfds_data_dir=tfds_data_dir,
            manual_dir=manual_dir,
            download=download,
        )[0]
    )


def cifar10(*, data_dir=None, tfds_data_dir=None, manual_dir=None, download=False) -> Splits:
    """CIFAR-10 through TFDS (manual file ``cifar-10-binary.tar.gz``).

    Returns:
      ``{"train", "test"}`` -> ``{"x": uint8 [n, 32, 32, 3], "y": int32 [n]}``.
    """
    return _tfds_images(
        "cifar10",
        "cifar10",
        data_dir=data_dir,
        tfds_data_dir=tfds_data_dir,
        manual_dir=manual_dir,
        download=download,
    )[0]


def cifar100(
    *, label: str = "label", data_dir=None, tfds_data_dir=None, manual_dir=None, download=False
) -> Splits:
    """CIFAR-100 through TFDS (manual file ``cifar-100-binary.tar.gz``); ``label`` is
    ``"label"`` (100 fine classes) or ``"coarse_label"`` (20). Return as ``cifar10``."""
    if label not in ("label", "coarse_label"):
        raise ValueError(f"cifar100: label must be 'label' or 'coarse_label', got {label!r}.")
    return _tfds_images(
        "cifar100",
        "cifar100",
        data_dir=data_dir,
        tfds_data_dir=tfds_data_dir,
        manual_dir=manual_dir,
        download=download,
        label_key=label,
    )[0]


def tiny_shakespeare(
    *,
    seq_len: int = 80,
    data_dir=None,
    tfds_data_dir=None,
    manual_dir=None,
    download=False,
) -> Splits:
    """Karpathy's Tiny Shakespeare through TFDS (manual file ``input.txt``), as next-character
    samples over LEAF's 80-symbol vocabulary (so models for ``shakespeare_leaf`` apply).

    Each split's text becomes one sample per character: ``x`` the ``seq_len`` characters before
    it (left-padded with spaces), ``y`` the character. Characters outside the vocabulary map to
    the space id.

    Returns:
      ``{"train", "test"}`` -> ``{"x": int32 [n, seq_len], "y": int32 [n]}`` (``x`` a view).
    """
    from fedjax_sim.data.leaf import _windows_joined

    raw, _ = _load_named(
        "tiny_shakespeare", "tiny_shakespeare", data_dir, tfds_data_dir, manual_dir, download
    )
    out = {}
    for split, d in raw.items():
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in d["text"]]
        x, y = _windows_joined("".join(texts), seq_len)
        out[split] = {"x": x, "y": y}
    return out


# ---------------------------------------------------------------------------------------------
# CIFAR-10 as a folder of JPEGs inside a tar.

CIFAR10_JPEG_HOW_TO_GET = (
    f"Expected {CIFAR10_JPEG_FILE}, a tar.gz of train|test/<class>/NNNN.jpg with the ten "
    "CIFAR-10 class names as folders (see shared/data/README.md), or that tree unpacked."
)
_JPEG_NAME = re.compile(r"^(?:\./)?(train|test)/([^/]+)/([^/]+\.jpe?g)$", re.IGNORECASE)


def cifar10_jpeg(
    data_dir: str | os.PathLike | None = None, *, verify_checksum: bool = True
) -> Splits:
    """CIFAR-10 from a JPEG image folder (``train|test/<class>/NNNN.jpg``), tarred or unpacked.

    Labels follow CIFAR-10's class order (airplane=0 ... truck=9), not the folder listing.
    Images are decoded with Pillow straight from the archive (nothing is unpacked to disk), in
    the order (split, class, file name). The JPEG copy is lossy: accuracy on it is close to,
    not equal to, real CIFAR-10's.

    Args:
      data_dir: folder holding ``cifar10_jpeg_q75.tar.gz`` or ``train/`` and ``test/``;
        default ``<data root>/cifar10_jpeg``.
      verify_checksum: check the archive's sha256 when it is the known file.

    Returns:
      ``{"train", "test"}`` -> ``{"x": uint8 [n, 32, 32, 3], "y": int32 [n]}``.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(data_dir) if data_dir is not None else dataset_dir(None, "cifar10_jpeg")
    require_dir(
        root,
        what="cifar10_jpeg",
        expected=f"{CIFAR10_JPEG_FILE} or train/ and test/",
        how_to_get=CIFAR10_JPEG_HOW_TO_GET,
    )
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    items: dict[str, list[tuple[int, str, bytes]]] = {"train": [], "test": []}

    def add(name: str, data_fn, where: Path):
        m = _JPEG_NAME.match(name)
        if not m:
            return
        split, cls, fname = m.group(1).lower(), m.group(2), m.group(3)
        if cls not in index:
            raise DataFileError(
                where, f"{name}: class folder {cls!r} is not a CIFAR-10 class {CIFAR10_CLASSES}."
            )
        items[split].append((index[cls], fname, data_fn()))

    tar_path = root / CIFAR10_JPEG_FILE
    if tar_path.exists() or not (root / "train").is_dir():
        require_file(tar_path, what="cifar10_jpeg", how_to_get=CIFAR10_JPEG_HOW_TO_GET)
        if verify_checksum:
            verify_known_file(tar_path, f"cifar10_jpeg/{CIFAR10_JPEG_FILE}")
        try:
            with tarfile.open(tar_path, "r:*") as tf:
                for member in tf:
                    if member.isfile():
                        add(member.name, lambda m=member: tf.extractfile(m).read(), tar_path)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataFileError(
                tar_path,
                f"cannot be read as a tar archive ({type(e).__name__}: {e}); it may be "
                "truncated or corrupt.",
            ) from e
        where = tar_path
    else:
        for p in sorted(root.glob("*/*/*")):
            add(p.relative_to(root).as_posix(), p.read_bytes, p)
        where = root

    out = {}
    for split in ("train", "test"):
        entries = sorted(items[split], key=lambda t: (t[0], t[1]))
        if not entries:
            raise DataFileError(where, f"holds no {split}/<class>/*.jpg images.")
        x = np.empty((len(entries), 32, 32, 3), np.uint8)
        for i, (_, fname, blob) in enumerate(entries):
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    a = np.asarray(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as e:
                raise DataFileError(where, f"{split}/{fname}: not a readable JPEG ({e}).") from e
            if a.shape != (32, 32, 3):
                raise DataFileError(where, f"{split}/{fname}: shape {a.shape}, expected 32x32x3.")
            x[i] = a
        y = np.array([c for c, _, _ in entries], np.int32)
        out[split] = {"x": x, "y": y}
    return out

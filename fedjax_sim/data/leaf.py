"""Naturally federated data in LEAF's format: FEMNIST and Shakespeare.

LEAF (Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018;
https://github.com/TalwalkarLab/leaf) stores each split as JSON files with keys ``users``
(client ids), ``num_samples`` and ``user_data`` (``{user: {"x": [...], "y": [...]}}``), and
optionally ``hierarchies``; plain or gzipped. Train and test shards pair by name
(``..._train_9.json`` with ``..._test_9.json``).

Shakespeare is built here from the raw Project Gutenberg text with a port of LEAF's
``preprocess_shakespeare.py`` (itself from the TFF/FedAvg preprocessing); see
``shakespeare_leaf`` and the section below for what matches LEAF and what does not.

Comparison with LEAF's published Shakespeare (for the README)
---------------------------------------------------------------
Measured on ``shakespeare/shakespeare.txt.gz`` (Project Gutenberg Etext #100, January 1994):

* Plays: 36, every play in the file (parsing starts after THE SONNETS; A LOVER'S COMPLAINT,
  the one other "by William Shakespeare" heading, has fewer than two roles and is dropped).
  Speaking roles (play, character): 1,302 before the line filter; 157 have 2 lines or fewer
  and are dropped, leaving **1,145 clients** before any minimum-size filter.
  LEAF publishes **1,129** users and 4,226,158 samples; McMahan et al. 2017 report 1,146
  clients.
* Samples with LEAF's own windowing (``windowing="line"``: every line padded on the left with
  80 spaces, one sample per character plus the newline): **4,331,316** (LEAF: 4,226,158),
  3,895,543 train / 435,773 test. With ``windowing="joined"`` (the default: a client's lines
  joined by single spaces, runs of spaces collapsed): **4,315,499**, 3,882,436 train /
  433,063 test.
* Why they differ (an explanation, not checked by running LEAF here, which needs the
  network): LEAF's ``get_data.sh`` downloads Gutenberg's current ``100-0.txt``, a later
  edition with a different layout, while this file is the January 1994 edition, the one whose
  line numbers the parser hard-codes (it stops at line 124,195, in A Lover's Complaint, after
  the last play). The parser also upper-cases character names (LEAF's later fix for names
  spelled two ways, e.g. ``SIR Toby`` and ``SIR TOBY``); without that step this file gives
  1,147 clients.
* A minimum size filter (``min_samples``, on train + test samples) keeps, with
  ``windowing="joined"``: 1,137 clients at 64, 1,106 at 100, 620 at 1,000 (``"line"``:
  1,137, 1,110, 621).
* Train/test: LEAF splits each user's samples at random (90/10 by default), so test windows
  overlap train windows character for character. Here each client's lines are split before
  windowing, in order, at the line boundary closest to ``train_fraction`` of its samples
  (at least one line each side), so no test window shares text with a train window.
* Vocabulary: LEAF's 80 symbols ``"\\n !\\"&'(),-.0123456789:;>?A-Z[]a-z}"``; the newline is
  id 0 (the string without it, often quoted, has 79 characters). LEAF maps unknown characters
  with ``str.find`` to -1, which list or NumPy indexing silently turns into the last class
  (``}``); here they map to the space id (1). The 1994 text has no character outside the
  vocabulary in any spoken line, so this choice changes nothing on it.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedData, FederatedDataset
from fedjax_sim.data.files import (
    DataFileError,
    DataNotFoundError,
    dataset_dir,
    read_json,
    read_text,
    require_dir,
    require_file,
    verify_known_file,
)

__all__ = [
    "LEAF_CHARS",
    "encode_chars",
    "femnist_leaf",
    "load_leaf_split",
    "parse_shakespeare",
    "shakespeare_clients",
    "shakespeare_from_text",
    "shakespeare_leaf",
]

FEMNIST_CLASSES = 62
FEMNIST_HOW_TO_GET = (
    "Build it with LEAF (github.com/TalwalkarLab/leaf, data/femnist: ./preprocess.sh -s niid "
    "--sf 0.05 -k 0 -t sample) and copy data/femnist/data/train and data/test here."
)
SHAKESPEARE_FILE = "shakespeare.txt.gz"
SHAKESPEARE_HOW_TO_GET = (
    "It is Project Gutenberg Etext #100 (The Complete Works of William Shakespeare, January "
    "1994 edition), gzip-compressed, saved as shakespeare.txt.gz."
)


# ---------------------------------------------------------------------------------------------
# LEAF JSON.


def load_leaf_split(directory: str | os.PathLike) -> dict[str, dict]:
    """Reads every LEAF JSON shard (``*.json``, ``*.json.gz``) in ``directory``.

    Returns:
      ``{shard key: {user: {"x": list, "y": list}}}`` with shards in natural order of their
      shard number and users in file order; the shard key is the file name with ``train`` /
      ``test`` and the extension removed, so train and test shards pair by key.

    Raises:
      DataNotFoundError: no shards in ``directory``.
      DataFileError: a shard is malformed (names the file).
    """
    directory = Path(directory)
    files = sorted(
        (p for p in directory.iterdir() if p.name.endswith((".json", ".json.gz"))),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise DataNotFoundError(f"no LEAF .json or .json.gz shards in {directory}.")
    out = {}
    for path in files:
        data = read_json(path)
        if not isinstance(data, dict) or not {"users", "user_data"} <= set(data):
            raise DataFileError(path, "is not a LEAF shard: it needs keys 'users' and 'user_data'.")
        users, user_data = data["users"], data["user_data"]
        num_samples = data.get("num_samples", [None] * len(users))
        if len(num_samples) != len(users):
            raise DataFileError(path, "'users' and 'num_samples' have different lengths.")
        shard = {}
        for u, ns in zip(users, num_samples):
            if u not in user_data:
                raise DataFileError(path, f"user {u!r} is listed but has no entry in user_data.")
            ud = user_data[u]
            if not isinstance(ud, dict) or "x" not in ud or "y" not in ud:
                raise DataFileError(path, f"user {u!r} needs 'x' and 'y' lists.")
            if len(ud["x"]) != len(ud["y"]) or (ns is not None and ns != len(ud["y"])):
                raise DataFileError(
                    path,
                    f"user {u!r} has {len(ud['x'])} x, {len(ud['y'])} y and num_samples {ns}.",
                )
            shard[u] = ud
        out[_shard_key(path.name)] = shard
    return out


def femnist_leaf(
    data_dir: str | os.PathLike | None = None, *, invert: bool = True
) -> FederatedData:
    """FEMNIST as LEAF prepares it: one client per writer, 62 classes.

    Args:
      data_dir: the folder with ``train/`` and ``test/`` LEAF shards; defaults to
        ``<data root>/femnist_leaf``.
      invert: LEAF's pixels are 1.0 for background and 0.0 for ink; True flips them
        (``1 - x``) to MNIST's convention (ink = 1), as FedJAX does for TFF's EMNIST.

    Returns:
      ``FederatedData`` with the same clients (writers) in ``train`` and ``test``, in shard order;
      ``x`` float32 ``[n, 28, 28, 1]`` in ``[0, 1]``, ``y`` int32 in ``0..61``.
    """
    root = Path(data_dir) if data_dir is not None else dataset_dir(None, "femnist_leaf")
    what = "femnist_leaf"
    require_dir(
        root, what=what, expected="train/ and test/ LEAF JSON shards", how_to_get=FEMNIST_HOW_TO_GET
    )
    for split in ("train", "test"):
        require_dir(
            root / split, what=what, expected=f"LEAF {split} shards", how_to_get=FEMNIST_HOW_TO_GET
        )
    train = load_leaf_split(root / "train")
    test = load_leaf_split(root / "test")
    if set(train) != set(test):
        raise DataFileError(
            root,
            f"train and test shards do not pair: only in train {sorted(set(train) - set(test))},"
            f" only in test {sorted(set(test) - set(train))}.",
        )
    tr, te = {}, {}
    for key in train:
        if list(train[key]) != list(test[key]):
            raise DataFileError(
                root / "test", f"shard {key!r} lists other users than its train shard."
            )
        for u in train[key]:
            if u in tr:
                raise DataFileError(root / "train", f"writer {u!r} appears in two shards.")
            tr[u] = _femnist_arrays(train[key][u], invert, root / "train", u)
            te[u] = _femnist_arrays(test[key][u], invert, root / "test", u)
    return FederatedData(
        FederatedDataset(tr, name="femnist_leaf/train"),
        FederatedDataset(te, name="femnist_leaf/test"),
        FEMNIST_CLASSES,
    )


def _femnist_arrays(ud: Mapping, invert: bool, where: Path, user: str) -> dict[str, np.ndarray]:
    x = np.asarray(ud["x"], dtype=np.float32)
    y = np.asarray(ud["y"], dtype=np.int32)
    if x.ndim != 2 or x.shape[1] != 784:
        raise DataFileError(
            where, f"writer {user!r}: x has shape {list(x.shape)}, expected [n, 784]."
        )
    if y.size and (y.min() < 0 or y.max() >= FEMNIST_CLASSES):
        raise DataFileError(where, f"writer {user!r}: labels outside 0..61.")
    x = x.reshape(-1, 28, 28, 1)
    return {"x": (1.0 - x) if invert else x, "y": y}


def _shard_key(name: str) -> str:
    stem = re.sub(r"\.json(\.gz)?$", "", name)
    return re.sub(r"_(train|test)_", "_", re.sub(r"_(train|test)$", "", stem))


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------
# Shakespeare: a port of LEAF's preprocess_shakespeare.py (parsing plays and characters).

# A character's first line: two spaces, a name, a period, a space; continuations: 4 spaces.
_CHARACTER_RE = re.compile(r"^  ([a-zA-Z][a-zA-Z ]*)\. (.*)")
_CONT_RE = re.compile(r"^    (.*)")
# The Comedy of Errors is not indented in this edition.
_COE_CHARACTER_RE = re.compile(r"^([a-zA-Z][a-zA-Z ]*)\. (.*)")
_COE_CONT_RE = re.compile(r"^(.*)")
# Line numbers (after the first line is dropped) where the plays end and the sonnets end, in
# the 1994 edition.
_END_OF_PLAYS = 124195
_END_OF_SONNETS = 2646

LEAF_CHARS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
assert len(LEAF_CHARS) == 80
_SPACE_ID = LEAF_CHARS.index(" ")
_CHAR_TABLE = np.full(256, _SPACE_ID, np.int32)
for _i, _c in enumerate(LEAF_CHARS):
    _CHAR_TABLE[ord(_c)] = _i


def encode_chars(text: str) -> np.ndarray:
    """``int32`` ids in LEAF's 80-symbol vocabulary; any other character maps to the space id."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    return np.where(codes < 256, _CHAR_TABLE[np.minimum(codes, 255)], _SPACE_ID).astype(np.int32)


def parse_shakespeare(text: str) -> tuple[list[tuple[str, dict[str, list[str]]]], list[str]]:
    """Splits the Complete Works into plays and each play's characters' lines (LEAF's rules).

    A port of ``_split_into_plays`` in LEAF's ``preprocess_shakespeare.py``:

    * the first line is dropped; everything before 5 lines above the second
      ``by William Shakespeare`` is skipped (contents, sonnets);
    * each ``by William Shakespeare`` starts a play whose title is the first non-blank line
      2..7 lines above it;
    * ``  NAME. text`` starts a character's line (names upper-cased, since the text spells some
      several ways), ``    text`` continues it; in THE COMEDY OF ERRORS, whose lines are not
      indented, any ``NAME. text`` starts one (except ``ACT ...``), any line continues, and a
      line starting with ``<`` ends the speech;
    * parsing stops at line 124195; plays with one character or fewer are dropped.

    Args:
      text: the whole file.

    Returns:
      ``(plays, discarded)``: ``plays`` is a list of ``(title, {character: [line, ...]})``;
      ``discarded`` the numbered lines after the sonnets that no rule consumed.
    """
    plays: list[tuple[str, dict[str, list[str]]]] = []
    discarded: list[str] = []
    slines = text.splitlines(True)[1:]
    author_count = 0
    start_i = 0
    for i, line in enumerate(slines):
        if "by William Shakespeare" in line:
            author_count += 1
        if author_count == 2:
            start_i = i - 5
            break
    slines = slines[start_i:]

    current = None
    characters: dict[str, list[str]] = collections.defaultdict(list)
    comedy_of_errors = False
    for i, line in enumerate(slines):
        if i > _END_OF_PLAYS - start_i:
            break
        if "by William Shakespeare" in line:
            current = None
            characters = collections.defaultdict(list)
            title = ""
            for back in (2, 3, 4, 5, 6, 7):
                if i - back >= 0 and (slines[i - back].strip() or back == 7):
                    title = slines[i - back]
                    break
            title = title.strip()
            if not title:
                raise ValueError(f"Shakespeare: no title 2 to 7 lines above line {i}.")
            comedy_of_errors = title == "THE COMEDY OF ERRORS"
            plays.append((title, characters))
            continue
        match = (_COE_CHARACTER_RE if comedy_of_errors else _CHARACTER_RE).match(line)
        if match:
            character, snippet = match.group(1).upper(), match.group(2)
            if not (comedy_of_errors and character.startswith("ACT ")):
                characters[character].append(snippet)
                current = character
            else:
                current = None
            continue
        if current:
            match = (_COE_CONT_RE if comedy_of_errors else _CONT_RE).match(line)
            if match:
                if comedy_of_errors and match.group(1).startswith("<"):
                    current = None
                else:
                    characters[current].append(match.group(1))
                continue
        stripped = line.strip()
        if stripped and i > _END_OF_SONNETS:
            discarded.append(f"{i}:{stripped}")
    return [p for p in plays if len(p[1]) > 1], discarded


def _user_name(play: str, character: str) -> str:
    return re.sub(r"\W+", "_", (play + "_" + character).replace(" ", "_"))


PLAYS = ("all", "pretrain", "held_out")


def select_plays(plays: list, which: str, held_out_plays: int) -> list:
    """``plays`` (``parse_shakespeare``'s, in file order) or a part of them: ``held_out`` is the
    last ``held_out_plays`` of them, ``pretrain`` the others (a base pre-trained centrally on
    the ``pretrain`` plays, then federated over the speaking roles of the ``held_out`` ones,
    never sees their text)."""
    if which not in PLAYS:
        raise ValueError(f"shakespeare: plays must be one of {', '.join(PLAYS)}, got {which!r}.")
    if which == "all":
        return plays
    if not 0 < held_out_plays < len(plays):
        raise ValueError(
            f"shakespeare: held_out_plays must be in 1..{len(plays) - 1} (the text has "
            f"{len(plays)} plays), got {held_out_plays}."
        )
    cut = len(plays) - held_out_plays
    return plays[cut:] if which == "held_out" else plays[:cut]


def shakespeare_pretraining_text(text: str, held_out_plays: int) -> str:
    """Every line of the ``pretrain`` plays (``select_plays``), each character's lines joined
    with spaces as a client's are, the characters one after another."""
    plays = select_plays(parse_shakespeare(text)[0], "pretrain", held_out_plays)
    return " ".join(_joined(lines) for _, characters in plays for lines in characters.values())


def shakespeare_clients(
    text: str, *, plays: str = "all", held_out_plays: int = 10
) -> dict[str, list[str]]:
    """LEAF's users: ``{play_character: [line, ...]}`` for characters with more than 2 lines.

    Users are named as LEAF names them (``play + "_" + character`` with non-word characters
    replaced by ``_``); a name produced twice gets the lines of both, as LEAF's per-user files
    would. Plays keep file order; characters keep first-appearance order. ``plays`` and
    ``held_out_plays`` choose the plays (``select_plays``).
    """
    plays_ = select_plays(parse_shakespeare(text)[0], plays, held_out_plays)
    users: dict[str, list[str]] = {}
    for play, characters in plays_:
        for character, lines in characters.items():
            if len(lines) <= 2:
                continue
            users.setdefault(_user_name(play, character), []).extend(lines)
    return users


_MULTISPACE = re.compile(r"   *")  # LEAF's rule: two or more spaces become one.


def _line_samples(lines: list[str]) -> list[str]:
    return [_MULTISPACE.sub(" ", ln + "\n") for ln in lines]


def _joined(lines: list[str]) -> str:
    return _MULTISPACE.sub(" ", " ".join(lines))


def _windows_joined(text: str, seq_len: int):
    ids = encode_chars(text)
    padded = np.concatenate([np.full(seq_len, _SPACE_ID, np.int32), ids])
    # Views into ``padded``: no copy of the [n, seq_len] windows is ever made here.
    x = np.lib.stride_tricks.sliding_window_view(padded, seq_len)[: len(ids)]
    return x, padded[seq_len:]


def windows_per_position(text: str, seq_len: int) -> dict[str, np.ndarray]:
    """``text`` cut into consecutive windows for next-token training at every position:
    ``x`` ``[n, seq_len]`` the characters, ``y`` the character after each, ``y_mask`` False
    on the padding after the text's last target (each character but the first is a target
    once)."""
    ids = encode_chars(text)
    n = max(-(-(len(ids) - 1) // seq_len), 0)
    padded = np.full(n * seq_len + 1, _SPACE_ID, np.int32)
    padded[: len(ids)] = ids[: len(padded)]
    real = np.arange(n * seq_len) < len(ids) - 1
    return {
        "x": padded[:-1].reshape(n, seq_len),
        "y": padded[1:].reshape(n, seq_len),
        "y_mask": real.reshape(n, seq_len),
    }


def _windows_lines(lines: list[str], seq_len: int):
    xs, ys = [], []
    for s in lines:
        x, y = _windows_joined(s, seq_len)
        xs.append(x)
        ys.append(y)
    if not xs:
        return np.zeros((0, seq_len), np.int32), np.zeros((0,), np.int32)
    return np.concatenate(xs), np.concatenate(ys)


def shakespeare_from_text(
    text: str,
    *,
    seq_len: int = 80,
    train_fraction: float = 0.9,
    min_samples: int = 0,
    windowing: str = "joined",
    name: str = "shakespeare_leaf",
    plays: str = "all",
    held_out_plays: int = 10,
    per_position: bool = False,
) -> FederatedData:
    """Next-character prediction clients from the Complete Works' text (see module docstring).

    Args:
      text: the Complete Works (or a play in the same layout, for tests).
      seq_len: characters of context per sample (LEAF: 80).
      train_fraction: share of each client's samples that go to train (LEAF's default 0.9),
        rounded to a line boundary; every client keeps at least one line in each split.
      min_samples: drop clients with fewer samples (train + test) than this. (LEAF's
        ``-k`` keeps users with strictly more than k samples: LEAF's ``-k k`` is
        ``min_samples=k + 1``.)
      windowing: ``"joined"``: a client's lines (per split) are joined with spaces (newlines
        become spaces) and every character is a target, with ``seq_len`` spaces of left
        padding, so contexts run across lines. ``"line"``: LEAF's exact sampling, each line
        padded with ``seq_len`` spaces and ending in a newline target, contexts never cross
        lines. "line" materializes its windows (about 1.4 GB for the full text); "joined"
        holds views.
      name: dataset label.
      plays, held_out_plays: which plays' roles are clients (``select_plays``: ``all``, or the
        ``held_out`` plays a base pre-trained on the others has not seen).
      per_position: every character a target in consecutive windows
        (``windows_per_position``: ``y`` ``[n, seq_len]`` with a ``y_mask``, for a
        transformer or a per-position LSTM and ``task = "next_token"``) instead of one target
        per sliding window; ``windowing`` must then be ``joined``.

    Returns:
      ``FederatedData`` (80 classes) with the same clients in train and test; ``x`` int32
      ``[n, seq_len]`` character ids, ``y`` int32 ``[n]`` the next character's id (or ``[n,
      seq_len]`` with ``y_mask``, ``per_position``).
    """
    if per_position and windowing != "joined":
        raise ValueError(
            "shakespeare: per_position windows join each client's lines; use windowing='joined'."
        )
    if windowing not in ("joined", "line"):
        raise ValueError(f"shakespeare: windowing must be 'joined' or 'line', got {windowing!r}.")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"shakespeare: train_fraction must be in (0, 1), got {train_fraction!r}.")
    if seq_len < 1:
        raise ValueError(f"shakespeare: seq_len must be >= 1, got {seq_len!r}.")
    users = shakespeare_clients(text, plays=plays, held_out_plays=held_out_plays)
    if not users:
        raise ValueError(f"{name}: no play with at least two characters was found in the text.")
    train, test = {}, {}
    for user, lines in users.items():
        per_line = np.array([len(s) for s in _line_samples(lines)], np.int64)
        cum = np.cumsum(per_line)
        # k train lines: the line boundary whose sample count is closest to the target.
        target = train_fraction * cum[-1]
        k = int(np.argmin(np.abs(cum[:-1] - target))) + 1
        if per_position:
            train[user] = windows_per_position(_joined(lines[:k]), seq_len)
            test[user] = windows_per_position(_joined(lines[k:]), seq_len)
            if int(train[user]["y_mask"].sum() + test[user]["y_mask"].sum()) < min_samples:
                del train[user], test[user]
            continue
        if windowing == "joined":
            tr = _windows_joined(_joined(lines[:k]), seq_len)
            te = _windows_joined(_joined(lines[k:]), seq_len)
        else:
            tr = _windows_lines(_line_samples(lines[:k]), seq_len)
            te = _windows_lines(_line_samples(lines[k:]), seq_len)
        if len(tr[1]) + len(te[1]) < min_samples:
            continue
        train[user] = {"x": tr[0], "y": tr[1]}
        test[user] = {"x": te[0], "y": te[1]}
    if not train:
        raise ValueError(f"{name}: no client has min_samples={min_samples} samples.")
    return FederatedData(
        FederatedDataset(train, name=f"{name}/train"),
        FederatedDataset(test, name=f"{name}/test"),
        len(LEAF_CHARS),
    )


def shakespeare_leaf(
    data_dir: str | os.PathLike | None = None,
    *,
    seq_len: int = 80,
    train_fraction: float = 0.9,
    min_samples: int = 0,
    windowing: str = "joined",
    verify_checksum: bool = True,
    plays: str = "all",
    held_out_plays: int = 10,
    per_position: bool = False,
) -> FederatedData:
    """LEAF's Shakespeare: one client per (play, speaking role), next-character prediction.

    Args:
      data_dir: the folder with ``shakespeare.txt.gz`` (or ``.txt``); defaults to
        ``<data root>/shakespeare``.
      seq_len, train_fraction, min_samples, windowing, plays, held_out_plays,
        per_position: see ``shakespeare_from_text``.
      verify_checksum: check the sha256 of the known 1994 edition.

    Returns:
      ``FederatedData`` as ``shakespeare_from_text`` returns it.
    """
    return shakespeare_from_text(
        shakespeare_text(data_dir, verify_checksum=verify_checksum),
        seq_len=seq_len,
        train_fraction=train_fraction,
        min_samples=min_samples,
        windowing=windowing,
        plays=plays,
        held_out_plays=held_out_plays,
        per_position=per_position,
    )


def shakespeare_text(
    data_dir: str | os.PathLike | None = None, *, verify_checksum: bool = True
) -> str:
    """The Complete Works' text from ``data_dir`` (default ``<data root>/shakespeare``), its
    checksum verified."""
    root = Path(data_dir) if data_dir is not None else dataset_dir(None, "shakespeare")
    require_dir(
        root, what="shakespeare_leaf", expected=SHAKESPEARE_FILE, how_to_get=SHAKESPEARE_HOW_TO_GET
    )
    path = root / SHAKESPEARE_FILE
    if not path.exists() and (root / "shakespeare.txt").exists():
        path = root / "shakespeare.txt"
    require_file(path, what="shakespeare_leaf", how_to_get=SHAKESPEARE_HOW_TO_GET)
    if verify_checksum and path.name == SHAKESPEARE_FILE:
        verify_known_file(path, f"shakespeare/{SHAKESPEARE_FILE}")
    return read_text(path, encoding="latin-1")

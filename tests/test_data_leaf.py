"""LEAF's JSON format, FEMNIST and Shakespeare (LEAF's parsing rules on a hand-written play,
and the real files' counts)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from fedjax_sim.data import leaf
from fedjax_sim.data.files import DataFileError, DataNotFoundError, read_text
from tests.conftest_data import real_data

# A miniature Complete Works in the 1994 edition's layout: a header line (dropped), the
# sonnets (skipped: parsing starts 5 lines above the second "by William Shakespeare"), an
# indented play, THE COMEDY OF ERRORS without indentation, and a play with one character.
PLAYS = """\
header line that the parser drops
THE SONNETS

by William Shakespeare

  From fairest creatures we desire increase,
filler

THE TEST PLAY

by William Shakespeare

  ALICE. Hello there,
    my friend.
  BOB. Good day.
  ALICE. Second line.
  Carol. Only one line.
  BOB. Hmm.
  Alice. Fourth
  BOB. Third.
    continues here
A stage direction that no rule consumes.
  DAVE. one
  DAVE. two

THE COMEDY OF ERRORS

by William Shakespeare

ACT I. SCENE 1.
DROMIO. Line one
more of dromio
<<a line in angle brackets ends the speech>>
stray line
ANTIPHOLUS. a
b
c
ACT II. SCENE 2.
Dromio. again
<<END>>

SOLO PLAY

by William Shakespeare

  HAMLET. one
  HAMLET. two
  HAMLET. three
"""


def test_parse_follows_leaf_rules():
    plays, discarded = leaf.parse_shakespeare(PLAYS)
    titles = [t for t, _ in plays]
    # SOLO PLAY has one character and is dropped; the sonnets are never a play.
    assert titles == ["THE TEST PLAY", "THE COMEDY OF ERRORS"]
    test_play, coe = plays[0][1], plays[1][1]
    # Names are upper-cased, so "Alice" joins "ALICE"; 4-space lines continue a speech.
    assert test_play["ALICE"] == ["Hello there,", "my friend.", "Second line.", "Fourth"]
    assert test_play["BOB"] == ["Good day.", "Hmm.", "Third.", "continues here"]
    assert test_play["CAROL"] == ["Only one line."]
    assert test_play["DAVE"] == ["one", "two"]
    # Comedy of Errors: any "NAME. text" starts a speech except "ACT ...", any line continues
    # it, and a line starting with "<" ends it (so "stray line" belongs to nobody).
    assert coe["DROMIO"] == ["Line one", "more of dromio", "again"]
    assert coe["ANTIPHOLUS"] == ["a", "b", "c"]
    spoken = [ln for c in (test_play, coe) for lines in c.values() for ln in lines]
    assert not any("stage direction" in ln or "stray" in ln for ln in spoken)
    # LEAF only records unconsumed lines past line 2646 (after the sonnets).
    assert discarded == []


def test_clients_drop_characters_with_two_lines_or_fewer():
    users = leaf.shakespeare_clients(PLAYS)
    # CAROL (1 line) and DAVE (2 lines) are dropped; names are play_character with non-word
    # characters replaced by "_".
    assert list(users) == [
        "THE_TEST_PLAY_ALICE",
        "THE_TEST_PLAY_BOB",
        "THE_COMEDY_OF_ERRORS_DROMIO",
        "THE_COMEDY_OF_ERRORS_ANTIPHOLUS",
    ]


def _decode(ids) -> str:
    return "".join(leaf.LEAF_CHARS[i] for i in ids)


def test_joined_windows_and_split_before_windowing():
    data = leaf.shakespeare_from_text(PLAYS, train_fraction=0.5)
    assert data.num_classes == 80 and data.train.client_ids == data.test.client_ids
    alice = data.train.client_ids.index("THE_TEST_PLAY_ALICE")
    tr, te = data.train.client(alice), data.test.client(alice)
    # Per-line samples 13, 11, 13, 7 (text + newline): cumulative 13, 24, 37; half of 44 is
    # 22, closest boundary 24 -> 2 train lines. Lines are joined by a space (newline -> space).
    train_text, test_text = "Hello there, my friend.", "Second line. Fourth"
    assert len(tr["y"]) == len(train_text) and len(te["y"]) == len(test_text)
    assert _decode(tr["y"]) == train_text and _decode(te["y"]) == test_text
    assert tr["x"].shape == (23, 80) and tr["x"].dtype == np.int32
    # Sample i: the 80 characters before character i, left-padded with spaces.
    assert _decode(tr["x"][0]) == " " * 80
    assert _decode(tr["x"][-1]) == " " * (80 - 22) + train_text[:-1]
    # The test windows start from padding again: none contains train text.
    assert _decode(te["x"][0]) == " " * 80
    assert _decode(te["x"][-1]).strip() == test_text[:-1]


def test_line_windowing_is_leafs():
    data = leaf.shakespeare_from_text(PLAYS, train_fraction=0.5, windowing="line")
    alice = data.train.client_ids.index("THE_TEST_PLAY_ALICE")
    tr = data.train.client(alice)
    # LEAF: each line + "\n" padded with 80 spaces, one sample per character: 13 + 11.
    assert len(tr["y"]) == 24
    assert _decode(tr["y"]) == "Hello there,\nmy friend.\n"
    assert _decode(tr["x"][13]) == " " * 80  # the second line starts from padding again
    assert leaf.LEAF_CHARS[0] == "\n" and len(leaf.LEAF_CHARS) == 80


def test_min_samples_and_bad_options():
    data = leaf.shakespeare_from_text(PLAYS, min_samples=40)
    # Joined samples (train + test) at train_fraction 0.9: ALICE "Hello there, my friend.
    # Second line." + "Fourth" = 36 + 6 = 42; BOB "Good day. Hmm. Third." + "continues here" =
    # 21 + 14 = 35; DROMIO 23 + 5 = 28; ANTIPHOLUS "a b" + "c" = 3 + 1 = 4.
    sizes = leaf.shakespeare_from_text(PLAYS)
    assert (sizes.train.sizes + sizes.test.sizes).tolist() == [42, 35, 28, 4]
    assert data.train.client_ids == ["THE_TEST_PLAY_ALICE"]
    with pytest.raises(ValueError, match="no client has min_samples"):
        leaf.shakespeare_from_text(PLAYS, min_samples=10_000)
    with pytest.raises(ValueError, match="windowing"):
        leaf.shakespeare_from_text(PLAYS, windowing="words")


def test_unknown_characters_map_to_space():
    assert leaf.encode_chars("a|é\u20ac").tolist() == [leaf.LEAF_CHARS.index("a")] + [1, 1, 1]


def test_per_position_windows_make_every_character_after_the_first_one_target():
    got = leaf.windows_per_position("abcdefgh", 3)  # 7 targets: windows of 3, 3 and 1
    ids = leaf.encode_chars("abcdefgh")
    space = leaf.encode_chars(" ")[0]
    np.testing.assert_array_equal(got["x"], [ids[0:3], ids[3:6], [ids[6], ids[7], space]])
    np.testing.assert_array_equal(got["y"], [ids[1:4], ids[4:7], [ids[7], space, space]])
    np.testing.assert_array_equal(got["y_mask"], [[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    exact = leaf.windows_per_position("abcd", 3)  # 3 targets fill one window
    assert exact["x"].shape == (1, 3) and exact["y_mask"].all()
    assert leaf.windows_per_position("a", 3)["x"].shape == (0, 3)  # no target at all


def test_held_out_plays_and_the_pretraining_text_split_the_plays():
    plays, _ = leaf.parse_shakespeare(PLAYS)
    assert [t for t, _ in leaf.select_plays(plays, "held_out", 1)] == ["THE COMEDY OF ERRORS"]
    assert [t for t, _ in leaf.select_plays(plays, "pretrain", 1)] == ["THE TEST PLAY"]
    held = leaf.shakespeare_clients(PLAYS, plays="held_out", held_out_plays=1)
    assert sorted(held) == ["THE_COMEDY_OF_ERRORS_ANTIPHOLUS", "THE_COMEDY_OF_ERRORS_DROMIO"]
    text = leaf.shakespeare_pretraining_text(PLAYS, 1)
    # Every line of the pretraining play (characters with few lines too), none of the other.
    assert "Hello there, my friend." in text and "Only one line." in text and "one two" in text
    assert "Line one" not in text and "again" not in text
    data = leaf.shakespeare_from_text(
        PLAYS, seq_len=4, plays="held_out", held_out_plays=1, per_position=True
    )
    assert data.train.client_ids == [
        "THE_COMEDY_OF_ERRORS_DROMIO",
        "THE_COMEDY_OF_ERRORS_ANTIPHOLUS",
    ]
    assert set(data.train.element_spec) == {"x", "y", "y_mask"}
    for bad, match in (
        ({"plays": "some"}, "plays must be one of"),
        ({"plays": "held_out", "held_out_plays": 2}, r"held_out_plays must be in 1..1"),
        ({"per_position": True, "windowing": "line"}, "use windowing='joined'"),
    ):
        with pytest.raises(ValueError, match=match):
            leaf.shakespeare_from_text(PLAYS, **bad)


@pytest.mark.realdata
def test_real_held_out_plays_for_federated_fine_tuning():
    text = leaf.shakespeare_text(real_data("shakespeare/shakespeare.txt.gz").parent)
    data = leaf.shakespeare_from_text(
        text, seq_len=64, plays="held_out", held_out_plays=10, per_position=True
    )
    # The last 10 of the 36 plays (KING RICHARD III ... THE WINTER'S TALE): 301 speaking roles.
    assert data.train.num_clients == data.test.num_clients == 301
    assert data.train.num_examples == 16_359
    assert int(data.train.all_examples()["y_mask"].sum()) == 1_037_499
    everyone = set(leaf.shakespeare_clients(text))
    held = set(data.train.client_ids)
    pretrain = set(leaf.shakespeare_clients(text, plays="pretrain", held_out_plays=10))
    assert held | pretrain == everyone and not held & pretrain
    assert len(leaf.shakespeare_pretraining_text(text, 10)) == 3_168_796


@pytest.mark.realdata
def test_real_shakespeare_counts():
    root = real_data("shakespeare/shakespeare.txt.gz").parent
    data = leaf.shakespeare_leaf(root)
    # See fedjax_sim/data/leaf.py: 1,145 clients from this edition (LEAF publishes 1,129).
    assert data.train.num_clients == data.test.num_clients == 1145
    assert data.train.num_examples == 3_882_436 and data.test.num_examples == 433_063
    assert data.test.sizes.min() >= 1
    sizes = data.train.sizes + data.test.sizes
    assert int((sizes >= 64).sum()) == 1137
    filtered = leaf.shakespeare_leaf(root, min_samples=64)
    assert filtered.train.num_clients == 1137
    # LEAF's own sample count ("line" windowing) without materializing 1.4 GB of windows.
    text = read_text(root / "shakespeare.txt.gz", encoding="latin-1")
    users = leaf.shakespeare_clients(text)
    assert sum(len(s) for lines in users.values() for s in leaf._line_samples(lines)) == 4_331_316


@pytest.mark.realdata
def test_real_femnist_counts():
    root = real_data("femnist_leaf")
    data = leaf.femnist_leaf(root)
    assert data.train.num_clients == data.test.num_clients == 105
    assert data.train.client_ids == data.test.client_ids
    assert data.train.num_examples == 14_708 and data.test.num_examples == 1_685
    assert data.num_classes == 62
    x, y = data.train.client(0)["x"], data.train.client(0)["y"]
    assert x.shape[1:] == (28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Inverted to MNIST's convention: the background (most pixels) is 0.
    assert np.median(x) == 0.0
    all_y = np.concatenate([c["y"] for _, c in data.train])
    assert all_y.min() >= 0 and all_y.max() <= 61


def _write_leaf(directory, users, name, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(
        {
            "users": list(users),
            "num_samples": [len(v["y"]) for v in users.values()],
            "user_data": users,
        }
    ).encode()
    path = directory / (name + (".json.gz" if gz else ".json"))
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def _user(n, label):
    return {"x": [[0.5] * 784] * n, "y": [label] * n}


def test_leaf_shards_pair_by_index(tmp_path):
    _write_leaf(tmp_path / "train", {"w1": _user(3, 1), "w2": _user(2, 5)}, "all_data_0_train_9")
    _write_leaf(tmp_path / "test", {"w1": _user(1, 1), "w2": _user(1, 5)}, "all_data_0_test_9")
    _write_leaf(tmp_path / "train", {"w3": _user(4, 61)}, "all_data_10_train_9", gz=False)
    _write_leaf(tmp_path / "test", {"w3": _user(2, 61)}, "all_data_10_test_9", gz=False)
    data = leaf.femnist_leaf(tmp_path)
    assert data.train.client_ids == ["w1", "w2", "w3"]  # shard 0 before shard 10
    assert data.train.sizes.tolist() == [3, 2, 4] and data.test.sizes.tolist() == [1, 1, 2]
    np.testing.assert_allclose(data.train.client(0)["x"], 0.5)


def test_malformed_json_names_the_file(tmp_path):
    _write_leaf(tmp_path / "train", {"w1": _user(3, 1)}, "all_data_0_train_9")
    bad = tmp_path / "test" / "all_data_0_test_9.json"
    bad.parent.mkdir()
    bad.write_text('{"users": ["w1"], "user_data": {')
    with pytest.raises(DataFileError, match="all_data_0_test_9.json: malformed JSON"):
        leaf.femnist_leaf(tmp_path)
    bad.unlink()
    truncated = tmp_path / "test" / "all_data_0_test_9.json.gz"
    truncated.write_bytes(gzip.compress(b'{"users": []}' * 100)[:30])
    with pytest.raises(DataFileError, match="all_data_0_test_9.json.gz.*truncated"):
        leaf.femnist_leaf(tmp_path)


def test_missing_directory_says_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        leaf.femnist_leaf(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "LEAF" in msg and "FEDJAX_SIM_DATA_DIR" in msg
    with pytest.raises(DataNotFoundError, match="shakespeare.txt.gz"):
        leaf.shakespeare_leaf(tmp_path)


def test_wrong_checksum_names_the_file(tmp_path):
    (tmp_path / "shakespeare.txt.gz").write_bytes(gzip.compress(PLAYS.encode()))
    with pytest.raises(DataFileError, match="shakespeare.txt.gz: sha256"):
        leaf.shakespeare_leaf(tmp_path)
    data = leaf.shakespeare_leaf(tmp_path, verify_checksum=False)
    assert data.train.num_clients == 4

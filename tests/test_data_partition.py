"""Partition recipes (invariants, reproducibility, the papers' definitions), their statistics,
size bucketing and padding waste."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from fedjax_sim.data import bucketing
from fedjax_sim.data.partition import (
    dirichlet_partition,
    format_stats,
    iid_partition,
    partition_stats,
    pathological_partition,
    quantity_skew_partition,
    save_stats,
)

RNG = np.random.default_rng(1234)
LABELS = RNG.integers(0, 10, 6000).astype(np.int32)  # ~600 per class
PARTITIONERS = {
    "iid": lambda y, seed: iid_partition(y, num_clients=37, seed=seed),
    "dirichlet": lambda y, seed: dirichlet_partition(y, num_clients=37, alpha=0.3, seed=seed),
    "pathological": lambda y, seed: pathological_partition(
        y, num_clients=30, shards_per_client=2, seed=seed
    ),
    "quantity_skew": lambda y, seed: quantity_skew_partition(
        y, num_clients=37, sigma=1.5, seed=seed
    ),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_example_in_exactly_one_client(name):
    parts = PARTITIONERS[name](LABELS, 0)
    flat = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(LABELS)))
    assert all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_seed_reproduces_and_changes_split(name):
    a, b, c = (PARTITIONERS[name](LABELS, s) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in iid_partition(LABELS, num_clients=37, seed=0)]
    # 6000 = 37 * 162 + 6: six clients of 163, 31 of 162.
    assert sorted(sizes) == [162] * 31 + [163] * 6


def test_dirichlet_equal_sizes_and_label_skew_shrinks_with_alpha():
    tv = []
    for alpha in (0.05, 0.5, 5.0, 50.0, 5000.0):
        parts = dirichlet_partition(LABELS, num_clients=20, alpha=alpha, seed=3)
        assert [len(p) for p in parts] == [300] * 20  # 6000 / 20
        tv.append(partition_stats(parts, LABELS, 10)["label_tv_from_global_mean"])
    # Mean total-variation distance of client label histograms from the pooled one falls
    # monotonically toward the sampling noise of 300 draws as alpha grows.
    assert all(a > b for a, b in zip(tv, tv[1:])), tv
    assert tv[0] > 0.7 and tv[-1] < 0.1


def test_dirichlet_small_alpha_gives_few_classes_per_client():
    parts = dirichlet_partition(LABELS, num_clients=20, alpha=0.01, seed=0)
    stats = partition_stats(parts, LABELS, 10)
    # Dir(0.001, ...) puts nearly all mass on one class; a client mixes classes only when its
    # class runs out, so the early clients (before classes run out) hold almost one class.
    hist = np.array(stats["label_histograms"])
    assert np.all(hist[:5].max(axis=1) >= 0.95 * 300)


def test_dirichlet_exhausted_class_is_renormalized_away():
    # Two classes of 10 and 2 examples, 3 clients of 4: whatever the draws, the two examples
    # of class 1 run out and later draws come from class 0 only; every example is used.
    y = np.array([0] * 10 + [1] * 2, np.int32)
    for seed in range(20):
        parts = dirichlet_partition(y, num_clients=3, alpha=0.1, seed=seed)
        assert [len(p) for p in parts] == [4, 4, 4]
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(12))


def test_pathological_matches_mcmahan_shards():
    # 6000 labels, 30 clients x 2 shards = 60 shards of 100 consecutive examples of the
    # label-sorted order.
    parts = pathological_partition(LABELS, num_clients=30, shards_per_client=2, seed=0)
    order = np.argsort(LABELS, kind="stable")
    shards = {tuple(np.sort(s)) for s in order.reshape(60, 100)}
    for p in parts:
        assert len(p) == 200
        # each client's examples are the union of exactly two shards
        pieces = [s for s in shards if set(s) <= set(p.tolist())]
        assert len(pieces) == 2
    labels_per_client = [len(np.unique(LABELS[p])) for p in parts]
    assert np.mean(labels_per_client) <= 3  # shards are label-pure except at class borders


def test_pathological_mnist_shape():
    y = np.repeat(np.arange(10, dtype=np.int32), 6000)  # MNIST's 60,000
    parts = pathological_partition(y, num_clients=100, shards_per_client=2, seed=0)
    assert len(parts) == 100 and {len(p) for p in parts} == {600}  # 2 shards of 300
    assert max(len(np.unique(y[p])) for p in parts) <= 2


def test_quantity_skew_sizes_are_lognormal_and_sum_to_n():
    parts = quantity_skew_partition(LABELS, num_clients=100, sigma=1.0, min_size=5, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 6000 and sizes.min() >= 5
    # log sizes spread with sigma about 1 (min_size shifts the small ones up a little)
    assert 0.6 < np.std(np.log(sizes)) < 1.3
    eq = quantity_skew_partition(LABELS, num_clients=100, sigma=0.0, seed=0)
    assert {len(p) for p in eq} == {60}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: iid_partition(LABELS[:5], num_clients=6, seed=0), "only 5 examples"),
        (
            lambda: dirichlet_partition(LABELS[:5], num_clients=6, alpha=1.0, seed=0),
            "only 5 examples",
        ),
        (lambda: dirichlet_partition(LABELS, num_clients=3, alpha=0.0, seed=0), "alpha"),
        (
            lambda: pathological_partition(LABELS[:1001], num_clients=10, seed=0),
            "do not split into 20 equal shards",
        ),
        (
            lambda: pathological_partition(LABELS, num_clients=10, num_shards=30, seed=0),
            "need 20 shards",
        ),
        (
            lambda: quantity_skew_partition(LABELS[:50], num_clients=10, min_size=6, seed=0),
            "more than the 50",
        ),
        (lambda: iid_partition(LABELS, num_clients=3, seed=-1), "seed"),
    ],
)
def test_unsatisfiable_partitions_say_why(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_stats_print_and_save(tmp_path):
    pytest.importorskip("matplotlib", reason="the statistics plot needs matplotlib")
    parts = dirichlet_partition(LABELS, num_clients=8, alpha=0.5, seed=0)
    stats = partition_stats(parts, LABELS, 10)
    assert stats["client_sizes"] == [750] * 8
    assert np.array(stats["label_histograms"]).sum(axis=1).tolist() == [750] * 8
    text = format_stats(stats, max_clients=3)
    assert "clients: 8" in text and "c00000" in text and "5 more" in text
    paths = save_stats(stats, tmp_path / "stats")
    assert json.loads(paths["json"].read_text())["num_examples"] == 6000
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Bucketing and padding waste.


def test_padding_waste_by_hand():
    # batch 10, 1 epoch: sizes 10, 10, 100 -> steps 1, 1, 10.
    # One bucket pads all to 10 steps: slots 3 * 100 = 300, real 120 -> waste 180/300 = 0.6.
    sizes = [10, 10, 100]
    assert bucketing.padding_waste(sizes, batch_size=10, local_epochs=1) == pytest.approx(0.6)
    # Two buckets {1 step: 2 clients}, {10 steps: 1}: slots 2*10 + 100 = 120 -> waste 0.
    assert bucketing.padding_waste(
        sizes, batch_size=10, local_epochs=1, num_buckets=2
    ) == pytest.approx(0.0)
    # Partial batches: size 15, batch 10, 2 epochs -> 4 steps, 40 slots, 30 real: waste 0.25.
    assert bucketing.padding_waste([15], batch_size=10, local_epochs=2) == pytest.approx(0.25)
    # Capped at 3 steps: real = 1 full epoch (15) + 1 step of the next (10) = 25 of 30.
    assert bucketing.padding_waste(
        [15], batch_size=10, local_epochs=2, max_local_steps=3
    ) == pytest.approx(1 - 25 / 30)


def test_bucketing_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(10):
        sizes = rng.integers(1, 300, 15)
        steps = 2 * (-(-sizes // 16))
        values = np.unique(steps)
        for k in (1, 2, 3):
            got = bucketing.bucket_by_size(sizes, batch_size=16, local_epochs=2, num_buckets=k)
            padded = (got.num_steps[got.bucket_of] - steps).sum()
            assert np.all(got.num_steps[got.bucket_of] >= steps)
            best = min(
                sum((g[-1] - steps[(steps >= g[0]) & (steps <= g[-1])]).sum() for g in groups)
                for cuts in itertools.combinations(range(1, len(values)), min(k, len(values)) - 1)
                for groups in [np.split(values, cuts)]
            )
            assert padded == best


def test_bucketing_reduces_waste_on_skewed_sizes():
    sizes = np.random.default_rng(0).lognormal(4, 1.5, 2000).astype(int) + 1
    report = bucketing.padding_report(sizes, batch_size=20, local_epochs=1)
    waste = [report["buckets"][b]["waste"] for b in ("1", "2", "4", "8")]
    assert all(a > b for a, b in zip(waste, waste[1:]))
    assert waste[0] > 0.9 and waste[-1] < 0.4
    assert sum(report["buckets"]["4"]["clients_per_bucket"]) == 2000

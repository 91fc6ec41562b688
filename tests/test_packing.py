import numpy as np
import pytest

from fedjax_sim.data import pack_cohort, pack_eval
from fedjax_sim.data.packing import max_local_steps_of, num_local_steps
from tests.helpers import ragged_dataset


def test_step_counts_and_masks():
    ds = ragged_dataset([7, 3, 12])
    # ceil(7/4)=2, ceil(3/4)=1, ceil(12/4)=3 steps per epoch; 2 epochs -> 4, 2, 6.
    np.testing.assert_array_equal(
        num_local_steps(ds.sizes, batch_size=4, local_epochs=2), [4, 2, 6]
    )
    assert max_local_steps_of(ds, batch_size=4, local_epochs=2) == 6
    c = pack_cohort(ds, [0, 2], batch_size=4, local_epochs=2, seed=0, round_num=1)
    assert c.batches["x"].shape == (2, 6, 4, 5)
    assert c.mask.shape == (2, 6, 4)
    np.testing.assert_array_equal(c.num_examples, [7, 12])
    np.testing.assert_array_equal(c.client_ids, [0, 2])
    # Client 0: each epoch is 4 + 3 real examples, then two empty steps.
    np.testing.assert_array_equal(c.mask[0].sum(-1), [4, 3, 4, 3, 0, 0])
    np.testing.assert_array_equal(c.mask[1].sum(-1), [4, 4, 4, 4, 4, 4])
    # Padding is zero.
    assert np.all(c.batches["x"][0][~c.mask[0]] == 0)


def test_each_epoch_is_a_permutation_and_shuffles_differ():
    ds = ragged_dataset([10])
    x = ds.client(0)["x"]
    c = pack_cohort(ds, [0], batch_size=3, local_epochs=2, seed=0, round_num=1)
    seen = c.batches["x"][0][c.mask[0]]  # 20 rows, two epochs of 10
    for epoch in (seen[:10], seen[10:]):
        order = [int(np.flatnonzero((x == row).all(1))[0]) for row in epoch]
        assert sorted(order) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])
    c2 = pack_cohort(ds, [0], batch_size=3, local_epochs=2, seed=0, round_num=2)
    assert not np.array_equal(c.batches["x"], c2.batches["x"])


def test_shuffle_independent_of_cohort_order_and_padding():
    ds = ragged_dataset([5, 9, 4])
    a = pack_cohort(ds, [0, 1, 2], batch_size=2, seed=3, round_num=7)
    b = pack_cohort(ds, [2, 0, 1], batch_size=2, num_clients=5, seed=3, round_num=7)
    for row_a, row_b in [(0, 1), (1, 2), (2, 0)]:
        np.testing.assert_array_equal(a.batches["x"][row_a], b.batches["x"][row_b])
    # Padded clients: no examples, weight 0, out-of-range id.
    assert not b.mask[3:].any()
    np.testing.assert_array_equal(b.num_examples[3:], [0, 0])
    np.testing.assert_array_equal(b.client_ids[3:], [3, 3])


def test_step_cap():
    ds = ragged_dataset([50])
    c = pack_cohort(ds, [0], batch_size=5, local_epochs=3, max_local_steps=4, seed=0, round_num=0)
    assert c.mask.shape == (1, 4, 5) and c.mask.all()


def test_bad_cohorts():
    ds = ragged_dataset([5, 5])
    with pytest.raises(ValueError, match="repeat"):
        pack_cohort(ds, [0, 0], batch_size=2, seed=0, round_num=0)
    with pytest.raises(ValueError, match="outside"):
        pack_cohort(ds, [2], batch_size=2, seed=0, round_num=0)
    with pytest.raises(ValueError, match="needs"):
        pack_cohort(ds, [0], batch_size=1, num_steps=2, seed=0, round_num=0)


def test_pack_eval_covers_every_example_once():
    ds = ragged_dataset([3, 4, 6])
    arrays, mask, owner = pack_eval(ds, batch_size=4)
    assert arrays["x"].shape == (4, 4, 5)
    assert mask.sum() == 13
    np.testing.assert_array_equal(np.bincount(owner[mask]), [3, 4, 6])
    np.testing.assert_array_equal(arrays["x"][mask], ds.all_examples()["x"])

"""Tests for FedProx's Synthetic(alpha, beta) generator against its definition."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fedjax_sim.data.synthetic import synthetic, synthetic_iid


@functools.cache
def _data(alpha, beta, iid=False, seed=0, **kwargs):
    return synthetic(alpha, beta, iid=iid, seed=seed, **kwargs)


def _client_examples(data, k):
    """All n_k examples of client k (train then test; order is irrelevant to moments)."""
    tr, te = data.train.client(k), data.test.client(k)
    return np.concatenate([tr["x"], te["x"]]), np.concatenate([tr["y"], te["y"]])


def _replay_feature_means(seed, num_clients, dim, beta):
    """Replays the stream up to the v_k: n_k, u_k, B_k, then v_k ~ N(B_k, 1) per client."""
    rs = np.random.RandomState(seed)
    rs.lognormal(4, 2, num_clients)
    rs.normal(0, 1, num_clients)  # u_k; its scale does not change how many draws it takes.
    shift = rs.normal(0, beta, num_clients)
    return np.stack([rs.normal(shift[k], 1, dim) for k in range(num_clients)])


def _fedprox_reference(alpha, beta, iid, num_clients, dim, num_classes, seed):
    """A transcription of FedProx's generate_synthetic + split (one sample at a time), with
    their random.shuffle swapped for a permutation from the same RandomState."""
    rs = np.random.RandomState(seed)

    def softmax(z):
        return np.exp(z) / np.sum(np.exp(z))

    samples_per_user = rs.lognormal(4, 2, num_clients).astype(int) + 50
    mean_w = rs.normal(0, alpha, num_clients)
    mean_b = mean_w
    b_shift = rs.normal(0, beta, num_clients)
    mean_x = np.zeros((num_clients, dim))
    diagonal = np.zeros(dim)
    for j in range(dim):
        diagonal[j] = np.power(j + 1, -1.2)
    cov_x = np.diag(diagonal)
    for i in range(num_clients):
        mean_x[i] = np.ones(dim) * b_shift[i] if iid else rs.normal(b_shift[i], 1, dim)
    if iid:
        w_global = rs.normal(0, 1, (dim, num_classes))
        b_global = rs.normal(0, 1, num_classes)
    xs, ys = [], []
    for i in range(num_clients):
        w = rs.normal(mean_w[i], 1, (dim, num_classes))
        b = rs.normal(mean_b[i], 1, num_classes)
        if iid:
            w, b = w_global, b_global
        xx = rs.multivariate_normal(mean_x[i], cov_x, samples_per_user[i])
        yy = np.zeros(samples_per_user[i])
        for j in range(samples_per_user[i]):
            yy[j] = np.argmax(softmax(np.dot(xx[j], w) + b))
        xs.append(xx)
        ys.append(yy)
    train, test = [], []
    for i in range(num_clients):
        order = rs.permutation(len(ys[i]))
        train_len = int(0.9 * len(ys[i]))
        x, y = xs[i][order], ys[i][order]
        train.append((x[:train_len], y[:train_len]))
        test.append((x[train_len:], y[train_len:]))
    return train, test


@pytest.mark.parametrize("iid", [False, True])
def test_matches_fedprox_script_draw_for_draw(iid):
    # Small dims keep the per-sample reference loop fast; seed 1 gives n_k up to 1839 (4 users).
    kwargs = dict(num_clients=4, dim=7, num_classes=3, seed=1)
    data = synthetic(0.5, 0.7, iid=iid, **kwargs)
    ref_train, ref_test = _fedprox_reference(0.5, 0.7, iid, **kwargs)
    for ds, ref in ((data.train, ref_train), (data.test, ref_test)):
        for k, (x_ref, y_ref) in enumerate(ref):
            got = ds.client(k)
            np.testing.assert_array_equal(got["x"], x_ref.astype(np.float32))
            np.testing.assert_array_equal(got["y"], y_ref.astype(np.int32))


def test_sizes_replay_lognormal_and_split_90_10():
    data = _data(1.0, 1.0, seed=3)
    expected = np.random.RandomState(3).lognormal(4, 2, 30).astype(int) + 50
    assert np.all(expected >= 50)
    np.testing.assert_array_equal(data.train.sizes + data.test.sizes, expected)
    np.testing.assert_array_equal(data.train.sizes, [int(0.9 * n) for n in expected])
    assert np.all(data.test.sizes >= 5)  # n_k >= 50 leaves at least 50 - int(45.0) = 5.


def test_client_ids_shapes_dtypes_labels_and_names():
    data = _data(1.0, 1.0)
    ids = [f"f_{k:05d}" for k in range(30)]
    assert data.train.client_ids == ids == data.test.client_ids == sorted(ids)
    assert data.num_classes == 10
    assert data.train.name == "synthetic(1,1)/train"
    assert data.test.name == "synthetic(1,1)/test"
    for ds in (data.train, data.test):
        assert ds.element_spec == {"x": ((60,), np.dtype(np.float32)), "y": ((), np.int32)}
        y = ds.all_examples()["y"]
        assert y.min() >= 0 and y.max() < 10
    assert synthetic_iid(seed=0).train.name == "synthetic_iid/train"


def test_feature_covariance_is_diagonal_power_law():
    data = _data(1.0, 1.0)
    sizes = data.train.sizes + data.test.sizes
    k = int(np.argmax(sizes))
    x, _ = _client_examples(data, k)
    x = x.astype(np.float64)
    n = x.shape[0]
    assert n == sizes[k] > 5000  # seed 0: the largest device has 5162 examples.
    target = np.arange(1, 61) ** -1.2
    # For Gaussian data the unbiased sample variance has relative std sqrt(2 / (n - 1))
    # (about 0.020 at n = 5162), so 5 sigma is a ~10% band; one dimension failing by chance
    # has probability ~6e-7, so ~3e-5 for all 60.
    rel_err = np.abs(x.var(axis=0, ddof=1) / target - 1)
    assert np.all(rel_err < 5 * np.sqrt(2 / (n - 1))), rel_err.max()
    # Off-diagonal: a sample correlation of independent coordinates has std ~1/sqrt(n).
    corr = np.corrcoef(x, rowvar=False)
    off = corr[~np.eye(60, dtype=bool)]
    assert np.all(np.abs(off) < 5 / np.sqrt(n)), np.abs(off).max()


def test_client_feature_mean_is_replayed_v_k():
    data = _data(1.0, 1.0)
    v = _replay_feature_means(seed=0, num_clients=30, dim=60, beta=1.0)
    sizes = data.train.sizes + data.test.sizes
    sigma2 = np.arange(1, 61) ** -1.2
    for k in np.argsort(sizes)[-3:]:  # the three largest devices
        x, _ = _client_examples(data, k)
        n = x.shape[0]
        # The sample mean of dim j has std sqrt(Sigma_jj / n); allow 5 of them per coordinate.
        err = np.abs(x.astype(np.float64).mean(axis=0) - v[k])
        assert np.all(err < 5 * np.sqrt(sigma2 / n)), (k, err.max())


def test_spread_of_client_means_grows_with_beta():
    def spread(beta):
        data = _data(0.0, beta)
        grand_means = [_client_examples(data, k)[0].mean() for k in range(30)]
        return np.std(grand_means)

    s0, s1 = spread(0.0), spread(1.0)
    # Averaging v_k ~ N(B_k, 1) over 60 dims gives grand means ~ N(B_k, 1/60) (plus sampling noise
    # of at most ~sqrt(1/50)/60 = 0.002): their spread is ~1/sqrt(60) = 0.13 at beta = 0 and
    # ~sqrt(1 + 1/60) = 1.01 at beta = 1. A std over 30 clients is within ~13% per sigma.
    assert 0.5 / np.sqrt(60) < s0 < 1.5 / np.sqrt(60), s0
    assert 0.5 < s1 < 1.5, s1
    assert s1 > 3 * s0


def test_iid_labels_come_from_one_replayed_model():
    seed, dim, num_classes = 5, 60, 10
    data = synthetic_iid(seed=seed)
    # Replay: 30 n_k, 30 u_k (scale 0), 30 B_k (scale 0), no v_k draws for IID, then W, b.
    rs = np.random.RandomState(seed)
    rs.lognormal(4, 2, 30)
    rs.normal(0, 0, 30)
    rs.normal(0, 0, 30)
    w = rs.normal(0, 1, (dim, num_classes))
    b = rs.normal(0, 1, num_classes)
    for ds in (data.train, data.test):
        for _, arrays in ds:
            logits = arrays["x"].astype(np.float64) @ w + b
            mismatch = arrays["y"] != np.argmax(logits, axis=1)
            # Labels were computed from the float64 features before the float32 cast; that cast
            # moves a logit by ~|x||W| * 6e-8 < 1e-4, so only near-ties may disagree.
            top2 = np.sort(logits, axis=1)[:, -2:]
            assert np.all(top2[mismatch, 1] - top2[mismatch, 0] < 1e-4)
            assert mismatch.sum() <= 1
    # IID features are N(0, Sigma) everywhere (v_k = B_k * ones = 0).
    x = data.train.all_examples()["x"].astype(np.float64)
    assert np.all(np.abs(x.mean(axis=0)) < 5 * np.sqrt(np.arange(1, 61) ** -1.2 / x.shape[0]))
    # The convenience is exactly synthetic(0, 0, iid=True).
    other = synthetic(0, 0, iid=True, seed=seed)
    for k in range(30):
        np.testing.assert_array_equal(other.train.client(k)["y"], data.train.client(k)["y"])


def test_same_seed_same_arrays_different_seed_different():
    a, b, c = _data(1.0, 1.0, seed=0), synthetic(1.0, 1.0, seed=0), _data(1.0, 1.0, seed=3)
    for ds_a, ds_b in ((a.train, b.train), (a.test, b.test)):
        for (_, xa), (_, xb) in zip(ds_a, ds_b, strict=True):
            np.testing.assert_array_equal(xa["x"], xb["x"])
            np.testing.assert_array_equal(xa["y"], xb["y"])
    assert not np.array_equal(a.train.sizes, c.train.sizes)
    n = min(a.train.sizes[0], c.train.sizes[0])
    assert not np.array_equal(a.train.client(0)["x"][:n], c.train.client(0)["x"][:n])


def test_zero_alpha_beta_non_iid_still_heterogeneous():
    data = _data(0.0, 0.0)
    iid = synthetic_iid(seed=0)
    # Same sizes (the first draw is shared) but non-IID v_k ~ N(0, 1) are not zero.
    np.testing.assert_array_equal(data.train.sizes, iid.train.sizes)
    v = _replay_feature_means(seed=0, num_clients=30, dim=60, beta=0.0)
    k = int(np.argmax(data.train.sizes))
    x, y = _client_examples(data, k)
    assert np.all(np.abs(x.mean(axis=0) - v[k]) < 5 * np.sqrt(np.arange(1, 61) ** -1.2 / len(x)))
    assert np.all(np.isfinite(x)) and y.min() >= 0 and y.max() < 10
    assert data.train.name == "synthetic(0,0)/train"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=-1.0, beta=1.0), "alpha"),
        (dict(alpha=1.0, beta=-0.5), "beta"),
        (dict(alpha=float("nan"), beta=1.0), "alpha"),
        (dict(alpha=1.0, beta=1.0, num_clients=0), "num_clients"),
        (dict(alpha=1.0, beta=1.0, dim=0), "dim"),
        (dict(alpha=1.0, beta=1.0, num_classes=1), "num_classes"),
        (dict(alpha=1.0, beta=1.0, seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        synthetic(**kwargs)

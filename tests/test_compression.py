"""Update compression: unbiasedness, top-k, error feedback, majority vote, bit counts."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.aggregators import compression as C
from fedjax_sim.aggregators.transforms import ClientContext

KEY = jax.random.key(7)
DRAWS = 2000


def assert_unbiased(compress, x):
    keys = jax.random.split(KEY, DRAWS)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: compress(x, k)))(keys), np.float64)
    se = draws.std(axis=0) / np.sqrt(DRAWS)
    # Five standard errors per coordinate (plus float slack for deterministic coordinates).
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - np.asarray(x)), 5 * se + 1e-6)
    return draws


X = jax.random.normal(jax.random.key(1), (24,))


@pytest.mark.parametrize("levels", [1, 2, 8])
def test_qsgd_unbiased_and_on_grid(levels):
    draws = assert_unbiased(partial(C.stochastic_quantize, levels=levels), X)
    norm = float(jnp.linalg.norm(X))
    scaled = np.abs(draws) / norm * levels  # integers in [0, s]
    np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-4)
    assert scaled.max() <= levels + 1e-4


@pytest.mark.parametrize("bits", [1, 3])
def test_uniform_quantize_unbiased(bits):
    draws = assert_unbiased(partial(C.uniform_quantize, bits=bits), X)
    lo, hi = float(X.min()), float(X.max())
    assert draws.min() >= lo - 1e-5 and draws.max() <= hi + 1e-5
    assert len(np.unique(np.round(draws, 4))) <= 2**bits


def test_random_k_unbiased_when_scaled():
    assert_unbiased(partial(C.random_k, ratio=0.25, unbiased=True), X)
    out = np.asarray(jax.jit(partial(C.random_k, ratio=0.25))(X, KEY))
    kept = np.flatnonzero(out)
    assert len(kept) == 6  # round(0.25 * 24)
    np.testing.assert_array_equal(out[kept], np.asarray(X)[kept])


def test_zero_and_constant_vectors():
    zeros = jnp.zeros(5)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(partial(C.stochastic_quantize, levels=4))(zeros, KEY)), 0.0
    )
    const = jnp.full((5,), 0.7)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(partial(C.uniform_quantize, bits=4))(const, KEY)), np.float32(0.7)
    )


def test_top_k_keeps_the_largest_magnitudes():
    x = jnp.array([0.1, -5.0, 2.0, 0.0, -3.0, 4.0, 1.0, -0.5])
    out = np.asarray(C.top_k(x, 0.375))  # k = round(3.0) = 3: -5, 4, -3
    np.testing.assert_array_equal(out, [0, -5.0, 0, 0, -3.0, 4.0, 0, 0])
    # Over a pytree the k largest are chosen globally, across leaves.
    tree = {"a": jnp.array([[9.0, 0.1]]), "b": jnp.array([-0.2, -8.0, 0.3]).astype(jnp.bfloat16)}
    out = C.top_k(tree, 0.4)  # d = 5, k = 2: 9 and -8
    np.testing.assert_array_equal(np.asarray(out["a"]), [[9.0, 0.0]])
    assert out["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["b"], np.float32), [0.0, -8.0, 0.0])
    # A tiny ratio still keeps one coordinate.
    assert np.count_nonzero(np.asarray(C.top_k(x, 1e-6))) == 1


def test_error_feedback_by_hand():
    ef = jax.jit(C.with_error_feedback(lambda u, k: C.top_k(u, 1 / 3)))  # top-1 of 3
    inputs = [jnp.array([3.0, 1.0, -2.0]), jnp.array([0.0, 2.0, 1.0]), jnp.array([1.0, -1.0, 4.0])]
    # step 1: corrected [3, 1, -2] -> send [3, 0, 0], residual [0, 1, -2]
    # step 2: corrected [0, 3, -1] -> send [0, 3, 0], residual [0, 0, -1]
    # step 3: corrected [1, -1, 3] -> send [0, 0, 3], residual [1, -1, 0]
    expected_sent = [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    expected_residual = [[0, 1, -2], [0, 0, -1], [1, -1, 0]]
    residual = jnp.zeros(3)
    sent_total = jnp.zeros(3)
    for g, want_sent, want_res in zip(inputs, expected_sent, expected_residual, strict=True):
        sent, residual = ef(g, residual, KEY)
        np.testing.assert_array_equal(np.asarray(sent), want_sent)
        np.testing.assert_array_equal(np.asarray(residual), want_res)
        sent_total = sent_total + sent
    # Everything sent plus what is still owed equals everything given.
    np.testing.assert_allclose(np.asarray(sent_total + residual), np.asarray(sum(inputs)))


def test_error_feedback_conserves_mass_with_random_compressor():
    ef = jax.jit(C.with_error_feedback(partial(C.stochastic_quantize, levels=2)))
    tree = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(2)}
    residual = tree
    total_in = total_out = tree
    for step in range(3):
        g = jax.tree.map(lambda a, s=step: jax.random.normal(jax.random.key(s), a.shape), tree)
        sent, residual = ef(g, residual, jax.random.fold_in(KEY, step))
        total_in = jax.tree.map(jnp.add, total_in, g)
        total_out = jax.tree.map(jnp.add, total_out, sent)
    for a, b, r in zip(*map(jax.tree.leaves, (total_in, total_out, residual)), strict=True):
        np.testing.assert_allclose(np.asarray(b + r), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_sign_and_majority_vote_by_hand():
    np.testing.assert_array_equal(
        np.asarray(C.sign_compress(jnp.array([-2.0, 0.0, 3.0]))), [-1, 1, 1]
    )
    signs = jnp.array(
        [
            [1, 1, -1, 1, -1],
            [1, -1, -1, 1, -1],
            [1, 1, 1, -1, -1],
            [-1, -1, 1, 1, 1],
            [-1, -1, -1, -1, -1],  # padding: would break every tie towards -1
        ],
        jnp.float32,
    )
    weights = jnp.array([0.5, 3.0, 1.0, 1.0, 0.0])
    # real sums: [2, 0, 0, 2, -2] -> [1, 0, 0, 1, -1] (ties -> 0; one vote per client)
    np.testing.assert_array_equal(np.asarray(C.majority_vote(signs, weights)), [1, 0, 0, 1, -1])
    tree = C.majority_vote({"s": signs.reshape(5, 1, 5)}, weights)
    np.testing.assert_array_equal(np.asarray(tree["s"]), [[1, 0, 0, 1, -1]])


def test_bits_by_hand():
    assert C.bits_qsgd(100, 3) == 32 + 100 * (2 + 1)  # ceil(log2 4) = 2
    assert C.bits_qsgd(100, 4) == 32 + 100 * (3 + 1)  # ceil(log2 5) = 3
    assert C.bits_per_update("qsgd", 100, levels=1) == 32 + 100 * 2
    assert C.bits_per_update("top_k", 1000, ratio=0.01) == 10 * (32 + 10)  # ceil(log2 1000)=10
    assert C.bits_per_update("top_k", 1024, ratio=0.01) == 10 * (32 + 10)  # log2 1024 = 10
    assert C.bits_per_update("top_k", 1025, ratio=0.01) == 10 * (32 + 11)
    assert C.bits_per_update("random_k", 1000, ratio=0.01) == 10 * 32 + 64
    assert C.bits_per_update("uniform", 100, bits=4) == 64 + 400
    assert C.bits_per_update("sign", 1000) == 1000
    assert C.bits_per_update("none", 1000) == 32000


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match=r"compression ratio must be in \(0, 1\]"):
        C.top_k(X, ratio)
    with pytest.raises(ValueError, match="compression ratio"):
        C.random_k(X, KEY, ratio)
    with pytest.raises(ValueError, match="compression ratio"):
        C.bits_per_update("top_k", 10, ratio=ratio)
    with pytest.raises(ValueError, match="compression ratio"):
        C.compressor("random_k", ratio=ratio)


def test_bad_levels_bits_and_names_raise():
    with pytest.raises(ValueError, match="levels"):
        C.stochastic_quantize(X, KEY, 0)
    for bits in (0, 33):
        with pytest.raises(ValueError, match="bits"):
            C.uniform_quantize(X, KEY, bits)
    with pytest.raises(ValueError, match="known: none, qsgd, random_k, sign, top_k, uniform"):
        C.bits_per_update("zip", 10)


def test_compress_updates_transform():
    transform = C.compress_updates("top_k", ratio=0.5)
    ctx = ClientContext(client_id=jnp.int32(0), weight=jnp.float32(1.0), key=KEY, hparams={})
    out = jax.jit(transform.client)({"w": jnp.array([1.0, -3.0, 2.0, 0.5])}, ctx)
    np.testing.assert_array_equal(np.asarray(out["w"]), [0.0, -3.0, 2.0, 0.0])


def test_majority_vote_aggregator_round_moves_each_coordinate_by_the_vote():
    """A config round with sign uploads and ``aggregator="majority_vote"``: the server's SGD
    step moves every coordinate by exactly ``-lr * vote``, the vote recomputed here from the
    clients' own local updates (each trained alone with the plain mean's round)."""
    import fedjax_sim as fs
    from fedjax_sim.data.packing import pack_cohort

    def build(aggregator, compression_method):
        config = fs.load_config("default:smoke")
        config.num_devices, config.strategy, config.checkpoint_every = 1, "sequential", 0
        config.client.local_epochs, config.client.max_local_steps = 1, 2
        config.aggregator, config.compression.method = aggregator, compression_method
        config.server.learning_rate = 0.01
        return fs.build_experiment(config)

    exp = build("majority_vote", "sign")
    train = exp.data.train
    ids = [0, 3, 5, 8, 11]
    cohort = pack_cohort(
        train,
        ids,
        batch_size=10,
        max_local_steps=2,
        num_steps=2,
        num_clients=exp.cohort_slots,
        seed=0,
        round_num=1,
    )
    params = exp.model.init(jax.random.key(0))
    key = jax.random.key(1)
    new = jax.jit(exp.algorithm.apply)(exp.algorithm.init(params), cohort, key)[0].params
    # Each client's own update: the plain mean over a one-client cohort at server lr 1.
    solo = build("mean", "none")
    solo_apply = jax.jit(solo.algorithm.apply)
    votes = 0
    for c in ids:
        one = pack_cohort(
            train,
            [c],
            batch_size=10,
            max_local_steps=2,
            num_steps=2,
            num_clients=1,
            seed=0,
            round_num=1,
        )
        moved = solo_apply(solo.algorithm.init(params), one, key)[0].params
        # mean over one client at server lr 0.01: moved = params - 0.01 * update
        update = jax.tree.map(lambda p, m: (p - m) / 0.01, params, moved)
        votes = jax.tree.map(
            lambda v, u: v + C.sign_compress(u),
            votes or jax.tree.map(jnp.zeros_like, update),
            update,
        )
    for p, n, v in zip(*map(jax.tree.leaves, (params, new, votes)), strict=True):
        np.testing.assert_allclose(np.asarray(p - n), 0.01 * np.sign(np.asarray(v)), atol=1e-6)
    assert "majority_vote" in fs.aggregators.registry()

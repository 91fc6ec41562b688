"""Simulated secure aggregation: exact unmasking, dropouts, padding, uniformity, error, bytes."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedjax_sim.aggregators import secure

KEY = jax.random.key(42)

# Jitted once per static configuration: eager op-by-op dispatch would dominate the runtime.
mask = jax.jit(secure.mask_updates, static_argnums=(3, 4))
unmask = jax.jit(secure.unmask_sum, static_argnums=(4, 5))


@partial(
    jax.jit,
    static_argnames=("clip_range", "bits", "modulus_bits", "neighbors", "mean", "simulate_masks"),
)
def secure_sum(x, weights, key, **kwargs):
    return secure.secure_sum(x, weights, key, **kwargs)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def quantized_cohort(n, d, bits=8, clip=1.0, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = 0.4 * jax.random.normal(k1, (n, d))
    q = jax.vmap(lambda a, k: secure.quantize(a, k, clip, bits))(x, jax.random.split(k2, n))
    return x, q


def plain_sum(q, include):
    return np.sum(np.where(np.asarray(include)[:, None], np.asarray(q, np.uint64), 0), axis=0)


# Ids deliberately unsorted and non-contiguous, so nothing relies on ids matching positions.
IDS = jnp.array([12, 3, 40, 7, 0, 25, 9, 31, 18], jnp.int32)


@pytest.mark.parametrize("neighbors,modulus_bits", [(None, 32), (3, 20)])
def test_unmasked_sum_equals_quantized_sum_exactly(neighbors, modulus_bits):
    _, q = quantized_cohort(9, 2**14)
    real = jnp.array([1, 1, 1, 1, 1, 1, 1, 1, 0], bool)  # the last one is padding
    masked = mask(q, IDS, KEY, modulus_bits, neighbors, real=real)
    assert masked.dtype == jnp.uint32
    assert int(jnp.max(masked)) < 2**modulus_bits
    np.testing.assert_array_equal(np.asarray(masked[-1]), 0)  # padding sends nothing
    assert not np.array_equal(np.asarray(masked[:-1]), np.asarray(q[:-1]))  # masks were added
    for survived in (real, jnp.array([1, 0, 1, 1, 0, 1, 1, 1, 1], bool)):
        total = unmask(masked, IDS, survived, KEY, modulus_bits, neighbors, real=real)
        # 8 clients * 255 < 2^20: the modular sum is the true sum, compared as integers.
        np.testing.assert_array_equal(np.asarray(total), plain_sum(q, survived & real))


@pytest.mark.parametrize("neighbors,modulus_bits", [(None, 32), (3, 20)])
def test_masks_do_not_depend_on_cohort_order(neighbors, modulus_bits):
    _, q = quantized_cohort(9, 2**14)  # the shapes above: the compilations are reused
    perm = jnp.array([4, 8, 0, 2, 6, 1, 3, 7, 5])
    real = jnp.ones(9, bool)
    masked = mask(q, IDS, KEY, modulus_bits, neighbors, real=real)
    masked_perm = mask(q[perm], IDS[perm], KEY, modulus_bits, neighbors, real=real)
    np.testing.assert_array_equal(np.asarray(masked_perm), np.asarray(masked[perm]))


def test_secagg_plus_graph_degrees():
    # Harary-style ring: k/2 neighbors per side, plus the diametric partner for odd k and even n,
    # plus one more per side for odd k and odd n; never more than n - 1.
    assert secure.graph_degree(10, None) == 9
    assert secure.graph_degree(10, 4) == 4
    assert secure.graph_degree(10, 3) == 3
    assert secure.graph_degree(9, 3) == 4
    assert secure.graph_degree(5, 10) == 4
    assert secure.graph_degree(1, None) == 0


def chi_square_top_bits(words, word_bits):
    top = np.asarray(words, np.uint64) >> (word_bits - 8)
    counts = np.bincount(top.astype(np.int64), minlength=256)
    return scipy_stats.chisquare(counts).pvalue


@pytest.mark.parametrize("neighbors,modulus_bits", [(None, 32), (3, 20)])
def test_masked_update_looks_uniform(neighbors, modulus_bits):
    _, q = quantized_cohort(9, 2**14)  # the shapes above: the compilations are reused
    masked = mask(q, IDS, KEY, modulus_bits, neighbors, real=jnp.ones(9, bool))
    p_masked = chi_square_top_bits(masked[0], modulus_bits)
    # The raw quantized words live in [0, 255]: their top 8 bits are all zero.
    p_plain = chi_square_top_bits(q[0], modulus_bits)
    print(f"chi-square p-values (m=2^{modulus_bits}, neighbors={neighbors}):", p_masked, p_plain)
    assert p_masked > 1e-3
    assert p_plain < 1e-100
    # And the low 8 bits of the masked word too (the quantized level's own bits).
    low = np.asarray(masked[0]) & 255
    assert scipy_stats.chisquare(np.bincount(low, minlength=256)).pvalue > 1e-3


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_quantization_error_below_grid_step(bits):
    x, _ = quantized_cohort(8, 5000)
    x = x.at[0, :10].set(3.0)  # a few clipped coordinates
    # Without the masks, which change nothing (bit-identity is tested below) but compile time.
    mean, stats = secure_sum(x, jnp.ones(8), KEY, clip_range=1.0, bits=bits, simulate_masks=False)
    step = secure.quantization_step(1.0, bits)
    exact = np.mean(np.clip(np.asarray(x), -1.0, 1.0), axis=0)
    err = np.abs(np.asarray(mean) - exact)
    print(f"bits={bits}: step={step:.3g} max err={err.max():.3g} ({err.max() / step:.3f} steps)")
    # Each client's stochastic rounding error is below one step, so the mean's is too.
    assert err.max() < step
    assert float(stats["quantization_error"]) == pytest.approx(err.max(), rel=1e-3, abs=1e-6)
    clipped = np.mean(np.abs(np.asarray(x)) > 1.0)
    assert float(stats["clipped_fraction"]) == pytest.approx(clipped, rel=1e-5)
    # Unbiased rounding: the error averages out over coordinates.
    assert abs(np.mean(np.asarray(mean) - exact)) < 0.05 * step


def test_single_quantize_round_trip():
    x = jnp.linspace(-1.5, 1.5, 1001)
    q = secure.quantize(x, KEY, 1.0, 6)
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(jax.jit(secure.quantize, static_argnums=(2, 3))(x, KEY, 1.0, 6))
    )
    assert q.dtype == jnp.uint32 and int(q.max()) <= 63
    back = secure.dequantize(q, 1, 1.0, 6)
    assert float(jnp.max(jnp.abs(back - jnp.clip(x, -1.0, 1.0)))) < secure.quantization_step(1.0, 6)


def test_dequantize_large_totals():
    # uint32 -> float32 above 2^31 (a sign bit in int32) must decode as unsigned.
    total = jnp.array([2**32 - 1, 2**31, 0], jnp.uint32)
    out = secure.dequantize(total, 65537, 1.0, 16)
    step = 2.0 / 65535
    expected = np.array([2**32 - 1, 2**31, 0], np.float64) * step - 65537
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=0.02)


def test_dropouts_and_padding_recover_the_survivors_mean():
    x, _ = quantized_cohort(10, 800)
    weights = jnp.array([3.0, 1.0, 0.0, 2.0, 5.0, 1.0, 1.0, 0.0, 2.0, 1.0])  # 2 padded
    survived = jnp.array([1, 1, 1, 1, 0, 1, 0, 1, 1, 1], bool)  # 2 real ones drop
    garbage = x.at[2].set(100.0).at[7].set(-7.0)
    zeroed = x.at[2].set(0.0).at[7].set(0.0)
    ids = jnp.array([10, 11, 99, 12, 13, 14, 15, 98, 16, 17])
    kwargs = dict(clip_range=1.0, bits=16, survived=survived, client_ids=ids)
    masked_mean, stats = secure_sum(garbage, weights, KEY, neighbors=4, **kwargs)
    masked_zeroed, _ = secure_sum(zeroed, weights, KEY, neighbors=4, **kwargs)
    plain_mean, _ = secure_sum(garbage, weights, KEY, simulate_masks=False, **kwargs)
    # Masks cancel exactly, padded clients send nothing and hold no masks: bit-identical.
    np.testing.assert_array_equal(np.asarray(masked_mean), np.asarray(plain_mean))
    np.testing.assert_array_equal(np.asarray(masked_mean), np.asarray(masked_zeroed))
    assert int(stats["num_survivors"]) == 6 and int(stats["num_dropped"]) == 2
    kept = np.asarray(survived) & (np.asarray(weights) > 0)
    clipped = np.clip(np.asarray(x)[kept], -1.0, 1.0)
    err = np.max(np.abs(np.asarray(masked_mean) - clipped.mean(axis=0)))
    assert err < secure.quantization_step(1.0, 16)


def test_overflow_check_raises():
    secure.check_capacity(1, 8, 8)  # 255 < 256
    with pytest.raises(ValueError, match="overflow.*bits.*modulus_bits"):
        secure.check_capacity(2, 8, 8)  # 510 >= 256
    x = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="3 clients"):
        # 3 * 65535 = 196605 >= 2^17
        secure.secure_sum(x, jnp.ones(3), KEY, clip_range=1.0, bits=16, modulus_bits=17)
    with pytest.raises(ValueError, match="bits"):
        secure.quantize(x, KEY, 1.0, 25)
    with pytest.raises(ValueError, match="modulus_bits"):
        secure.secure_mean(1.0, 8, modulus_bits=33)
    with pytest.raises(ValueError, match="neighbors"):
        secure.secure_mean(1.0, 8, neighbors=0)


def test_aggregator_jits_and_excludes_padding():
    agg = secure.secure_mean(1.0, 12, neighbors=3, dropout_rate=0.5)
    updates = {"w": 0.3 * jax.random.normal(KEY, (6, 4, 5)), "b": jnp.ones((6, 3), jnp.bfloat16)}
    weights = jnp.array([2.0, 1.0, 4.0, 0.0, 3.0, 0.0])
    out, state = jax.jit(agg.apply)(agg.init(None), updates, weights, KEY)
    assert state == ()
    assert out["b"].dtype == jnp.bfloat16 and out["w"].shape == (4, 5)
    # The uniform (not weighted) mean of the real clients that survived (the key decides who):
    # it matches one subset of the real clients, never one with a padded client.
    w, real = np.asarray(updates["w"]), np.asarray(weights) > 0
    gaps = [np.max(np.abs(np.asarray(out["w"]) - w[m].mean(axis=0))) for m in _subsets(real)]
    assert min(gaps) < secure.quantization_step(1.0, 12)


def _subsets(mask):
    idx = np.flatnonzero(mask)
    for bitsel in range(1, 2 ** len(idx)):
        m = np.zeros_like(mask)
        m[idx[[(bitsel >> j) & 1 == 1 for j in range(len(idx))]]] = True
        yield m


def test_secagg_bytes_by_hand():
    # SecAgg, d=1000, n=10, 32-bit words: p=9 partners.
    # up = 2*32 (keys) + 3*9*32 (shares) + 1000*32/8 = 64 + 864 + 4000 = 4928
    # down = 2*9*32 (keys) + 2*9*32 (shares) = 1152
    b = secure.secagg_bytes(1000, 10, 32)
    assert (b["up"], b["down"], b["masked_input"], b["partners"]) == (4928, 1152, 4000, 9)
    # SecAgg+, d=1e5, n=100, 20-bit words, 4 neighbors:
    # up = 64 + 3*4*32 + 100000*20/8 = 64 + 384 + 250000 = 250448; down = 8*32 + 8*32 = 512
    b = secure.secagg_bytes(100_000, 100, 20, neighbors=4)
    assert (b["up"], b["down"], b["partners"]) == (250448, 512, 4)
    # 7-bit words pack: ceil(3 * 7 / 8) = 3 bytes.
    assert secure.secagg_bytes(3, 2, 7)["masked_input"] == 3

"""Robust aggregators and poisoning attacks against independent NumPy references (written from
the papers' definitions, in float64), hand-made examples, and invariants: padded clients
(weight 0, filled with garbage) change nothing, cohort order does not matter, jit equals no-jit.
"""

import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.aggregators import attacks, robust

COHORT = 9
REAL = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)  # 7 real clients, 2 padded


def make_updates(seed=0, cohort=COHORT):
    """A two-leaf update pytree, its [cohort, 10] flat NumPy view (leaf "a" then "b", the order
    ravel_pytree uses for dict keys), and weights with zeros at the padded rows, whose updates
    are garbage (1e30 and NaN) that must never reach the aggregate."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(size=(cohort, 10)).astype(np.float32)
    flat[~REAL[:cohort]] = 1e30
    flat[np.flatnonzero(~REAL[:cohort])[-1], 3] = np.nan
    weights = np.where(REAL[:cohort], rng.uniform(1.0, 5.0, size=cohort), 0.0).astype(np.float32)
    updates = {"a": jnp.asarray(flat[:, :6].reshape(cohort, 3, 2)), "b": jnp.asarray(flat[:, 6:])}
    return updates, flat.astype(np.float64), jnp.asarray(weights)


def flat_of(tree):
    return np.concatenate([np.asarray(tree["a"]).reshape(-1), np.asarray(tree["b"]).reshape(-1)])


@functools.lru_cache
def _compiled(agg):
    # One jitted apply per aggregator, so repeated calls with the same shapes compile once.
    return jax.jit(agg.apply)


def apply(agg, updates, weights, state=None, jit=True):
    """``agg.apply`` on a fresh state (or ``state``), compiled unless ``jit`` is False."""
    state = agg.init({"a": updates["a"][0], "b": updates["b"][0]}) if state is None else state
    fn = _compiled(agg) if jit else agg.apply
    return fn(state, updates, weights, jax.random.key(0))


# --- NumPy references, from the papers ---------------------------------------------------------


def np_trimmed_mean(x, beta):
    n = len(x)
    k = math.floor(beta * n)
    return np.sort(x, axis=0)[k : n - k].mean(axis=0)


def np_krum_scores(x, f):
    n = len(x)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return np.array(scores)


def np_multi_krum(x, f, m):
    return x[np.argsort(np_krum_scores(x, f), kind="stable")[:m]].mean(axis=0)


def np_weiszfeld(x, w, nu, iters):
    alpha = w / w.sum()
    v = alpha @ x
    for _ in range(iters):
        beta = alpha / np.maximum(nu, np.linalg.norm(x - v, axis=1))
        v = beta @ x / beta.sum()
    return v


def np_clip(z, tau):
    norm = np.linalg.norm(z)
    return z if norm <= tau else z * tau / norm


def np_norm_bounding(x, w, m):
    return sum(wi * np_clip(xi, m) for xi, wi in zip(x, w)) / w.sum()


def np_centered_clipping(x, v, tau, iters):
    for _ in range(iters):
        v = v + np.mean([np_clip(xi - v, tau) for xi in x], axis=0)
    return v


# --- Each aggregator against its reference ----------------------------------------------------


REFERENCES = {
    "trimmed_mean": (
        lambda: robust.trimmed_mean(trim_fraction=0.2),
        lambda x, w: np_trimmed_mean(x, 0.2),  # n = 7: floor(1.4) = 1 dropped at each end
    ),
    "trimmed_mean_0": (
        lambda: robust.trimmed_mean(trim_fraction=0.0),
        lambda x, w: x.mean(axis=0),  # no trimming: the unweighted mean
    ),
    "krum": (
        lambda: robust.krum(num_byzantine=2),
        lambda x, w: np_multi_krum(x, 2, 1),
    ),
    "multi_krum": (
        lambda: robust.multi_krum(num_byzantine=2, num_selected=3),
        lambda x, w: np_multi_krum(x, 2, 3),
    ),
    "geometric_median": (
        lambda: robust.geometric_median(max_iters=500, eps=1e-6, ftol=0.0),
        lambda x, w: np_weiszfeld(x, w, 1e-6, 2000),  # run to convergence
    ),
    "norm_bounding": (
        lambda: robust.norm_bounding(max_norm=3.0),  # rows have norm ~ sqrt(10): some clipped
        lambda x, w: np_norm_bounding(x, w, 3.0),
    ),
    "centered_clipping": (
        lambda: robust.centered_clipping(clip_radius=2.5, iters=3),
        lambda x, w: np_centered_clipping(x, np.zeros(10), 2.5, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_numpy_reference_and_ignores_padding(name):
    make, reference = REFERENCES[name]
    updates, flat, weights = make_updates()
    expected = reference(flat[REAL], np.asarray(weights, np.float64)[REAL])
    agg = make()
    aggregate, _ = apply(agg, updates, weights)
    np.testing.assert_allclose(flat_of(aggregate), expected, rtol=1e-5, atol=1e-5)
    # jit equals no-jit.
    eager, _ = apply(agg, updates, weights, jit=False)
    np.testing.assert_allclose(flat_of(eager), flat_of(aggregate), rtol=1e-5, atol=1e-6)
    assert aggregate["a"].shape == (3, 2) and aggregate["a"].dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_cohort_order_does_not_matter(name):
    updates, _, weights = make_updates(seed=1)
    perm = np.random.default_rng(2).permutation(COHORT)
    permuted = jax.tree.map(lambda u: u[perm], updates)
    agg = REFERENCES[name][0]()
    a, _ = apply(agg, updates, weights)
    b, _ = apply(agg, permuted, weights[perm])
    np.testing.assert_allclose(flat_of(a), flat_of(b), rtol=1e-5, atol=1e-6)


def test_registry_lists_every_robust_aggregator():
    assert set(robust.ROBUST_AGGREGATORS) == {
        "trimmed_mean",
        "krum",
        "multi_krum",
        "geometric_median",
        "norm_bounding",
        "centered_clipping",
    }


# --- Hand-made cases ---------------------------------------------------------------------------


def test_trimmed_mean_by_hand():
    # One coordinate, real values 1, 2, 3, 4, 100 (n = 5), beta = 0.2: floor(1.0) = 1 dropped
    # at each end (1 and 100), mean of 2, 3, 4 = 3. The padded -1e30 must not count.
    u = jnp.array([[1.0], [100.0], [-1e30], [3.0], [2.0], [4.0]])
    w = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    out, _ = apply(robust.trimmed_mean(trim_fraction=0.2), {"a": u, "b": u}, w)
    np.testing.assert_allclose(out["a"], [3.0], rtol=1e-6)


def test_trimmed_mean_floor_in_float64():
    # 0.35 * 20 = 7 exactly in float64 but 6.9999998 in float32: 7 values trimmed at each end.
    x = np.arange(20, dtype=np.float32)[:, None]
    out, _ = apply(robust.trimmed_mean(trim_fraction=0.35), {"a": x, "b": x}, jnp.ones(20))
    np.testing.assert_allclose(out["a"], [np.mean(np.arange(7, 13))], rtol=1e-6)


KRUM_POINTS = np.array(
    [
        [1.0, 1.0],  # the honest centre
        [1.1, 1.0],
        [0.9, 1.0],
        [1.0, 1.1],
        [10.0, 10.0],  # outliers
        [-10.0, 10.0],
        [1.0, 1.1],  # padded copies of client 3: if counted, client 3 would score lowest
        [1.0, 1.1],
    ],
    np.float32,
)
KRUM_WEIGHTS = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])


def test_krum_scores_by_hand():
    # n = 6 real, f = 1: each client sums its n - f - 2 = 3 smallest squared distances.
    # centre: 0.01 + 0.01 + 0.01; (1.1, 1): 0.01 + 0.02 + 0.04; (0.9, 1): the same;
    # (1, 1.1): 0.01 + 0.02 + 0.02; (10, 10): 160.21 + 160.21 + 162;
    # (-10, 10): 199.81 + 200.21 + 202.
    scores = robust.krum_scores(jnp.asarray(KRUM_POINTS), KRUM_WEIGHTS > 0, 1)
    expected = [0.03, 0.07, 0.07, 0.05, 482.42, 602.02]
    np.testing.assert_allclose(scores[:6], expected, rtol=1e-4)
    assert np.all(np.isinf(scores[6:]))


def test_krum_picks_the_honest_centre():
    u = {"a": jnp.asarray(KRUM_POINTS[:, :1]), "b": jnp.asarray(KRUM_POINTS[:, 1])}
    out, _ = apply(robust.krum(num_byzantine=1), u, KRUM_WEIGHTS)
    np.testing.assert_allclose(flat_of(out), [1.0, 1.0])
    # Multi-Krum with m = 2: the centre and (1, 1.1), the two lowest scores.
    out, _ = apply(robust.multi_krum(num_byzantine=1, num_selected=2), u, KRUM_WEIGHTS)
    np.testing.assert_allclose(flat_of(out), [1.0, 1.05], rtol=1e-6)


def test_krum_bound():
    with pytest.raises(ValueError, match="n > 2f \\+ 2; got n=4, f=1"):
        robust.check_krum_bound(4, 1)
    robust.check_krum_bound(5, 1)
    updates, _, weights = make_updates()
    with pytest.raises(ValueError, match="raise clients_per_round"):
        apply(robust.krum(num_byzantine=4), updates, weights)  # 9 <= 2 * 4 + 2


def test_geometric_median_resists_an_outlier():
    # Four points on the unit circle and one at (1000, 0): the mean moves 200 away, the
    # geometric median stays within the circle, and matches NumPy's Weiszfeld.
    pts = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [1000, 0]], np.float32)
    w = np.ones(5, np.float32)
    out, _ = apply(
        robust.geometric_median(max_iters=200, ftol=0.0),
        {"a": jnp.asarray(pts[:, :1]), "b": jnp.asarray(pts[:, 1])},
        jnp.asarray(w),
    )
    got = flat_of(out)
    assert np.linalg.norm(got) < 1.0
    np.testing.assert_allclose(got, np_weiszfeld(pts.astype(np.float64), w, 1e-6, 1000), atol=1e-5)


def test_geometric_median_stops_early_with_tolerance():
    # The default stops once an iteration lowers the objective by at most 1e-6 of it: the
    # objective is then near its minimum, though the iterate is only ~sqrt(1e-6) close.
    updates, flat, weights = make_updates()
    out, _ = apply(robust.geometric_median(), updates, weights)
    x, w = flat[REAL], np.asarray(weights, np.float64)[REAL]
    ref = np_weiszfeld(x, w, 1e-6, 2000)

    def objective(v):
        return float(w @ np.linalg.norm(x - v, axis=1))

    assert objective(flat_of(out)) <= objective(ref) * (1 + 1e-5)
    np.testing.assert_allclose(flat_of(out), ref, atol=3e-3)


def test_centered_clipping_huge_radius_is_the_mean_and_state_carries():
    updates, flat, weights = make_updates()
    agg = robust.centered_clipping(clip_radius=1e6)
    out, state = apply(agg, updates, weights)
    np.testing.assert_allclose(flat_of(out), flat[REAL].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat_of(state), flat_of(out))
    # Second round with a small radius starts from the first round's aggregate.
    updates2, flat2, _ = make_updates(seed=3)
    small = robust.centered_clipping(clip_radius=0.5, iters=2)
    out2, state2 = small.apply(state, updates2, weights, jax.random.key(0))
    expected = np_centered_clipping(flat2[REAL], flat[REAL].mean(axis=0), 0.5, 2)
    np.testing.assert_allclose(flat_of(out2), expected, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(state2) == jax.tree.structure(state)


def test_no_real_clients():
    updates, _, weights = make_updates()
    zero = jnp.zeros_like(weights)
    for name, factory in robust.ROBUST_AGGREGATORS.items():
        kwargs = {
            "krum": {"num_byzantine": 1},
            "multi_krum": {"num_byzantine": 1, "num_selected": 2},
            "norm_bounding": {"max_norm": 1.0},
            "centered_clipping": {"clip_radius": 1.0},
        }.get(name, {})
        out, _ = apply(factory(**kwargs), updates, zero)
        np.testing.assert_array_equal(flat_of(out), np.zeros(10), err_msg=name)


@pytest.mark.parametrize(
    "factory, kwargs, match",
    [
        (robust.trimmed_mean, {"trim_fraction": 0.5}, "trim_fraction"),
        (robust.trimmed_mean, {"trim_fraction": -0.1}, "trim_fraction"),
        (robust.multi_krum, {"num_byzantine": 1, "num_selected": 0}, "num_selected"),
        (robust.krum, {"num_byzantine": -1}, "num_byzantine"),
        (robust.geometric_median, {"max_iters": 0}, "max_iters"),
        (robust.geometric_median, {"eps": 0.0}, "eps"),
        (robust.norm_bounding, {"max_norm": -1.0}, "max_norm"),
        (robust.centered_clipping, {"clip_radius": 0.0}, "clip_radius"),
        (robust.centered_clipping, {"clip_radius": 1.0, "iters": 0}, "iters"),
        (attacks.sign_flip, {"scale": -1.0}, "scale"),
        (attacks.gaussian, {"std": -1.0}, "std"),
        (attacks.ipm, {"epsilon": -0.1}, "epsilon"),
    ],
)
def test_bad_hyperparameters(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


# --- Attacks -----------------------------------------------------------------------------------

# Five clients, one coordinate per leaf; client 1 and 3 malicious, client 4 padded (and marked
# malicious, which must change nothing).
ATTACK_U = {"a": jnp.array([[1.0], [2.0], [3.0], [4.0], [50.0]]), "b": jnp.array([0.0, 1, 0, 1, 9])}
ATTACK_MAL = jnp.array([False, True, False, True, True])
ATTACK_W = jnp.array([1.0, 2.0, 1.0, 1.0, 0.0])


def run_attack(attack, key=0):
    return jax.jit(attack)(ATTACK_U, ATTACK_MAL, ATTACK_W, jax.random.key(key))


def test_sign_flip_and_scaling():
    out = run_attack(attacks.sign_flip(scale=2.0))
    np.testing.assert_allclose(out["a"][:, 0], [1, -4, 3, -8, 50])
    np.testing.assert_allclose(out["b"], [0, -2, 0, -2, 9])
    out = run_attack(attacks.scaling(factor=10.0))
    np.testing.assert_allclose(out["a"][:, 0], [1, 20, 3, 40, 50])


def test_ipm():
    # Honest real clients 0 and 2: mean a = (1 + 3) / 2 = 2, b = 0; epsilon 0.5 -> -1 and 0.
    out = run_attack(attacks.ipm(epsilon=0.5))
    np.testing.assert_allclose(out["a"][:, 0], [1, -1, 3, -1, 50])
    np.testing.assert_allclose(out["b"], [0, 0, 0, 0, 9])


def test_alie_with_fixed_z():
    # Real clients 0-3: a = 1, 2, 3, 4: mean 2.5, population std sqrt(1.25); b = 0, 1, 0, 1:
    # mean 0.5, std 0.5. z = 1.5: a -> 2.5 - 1.5 * 1.1180340, b -> 0.5 - 0.75 = -0.25.
    out = run_attack(attacks.alie(z=1.5))
    a_mal = 2.5 - 1.5 * math.sqrt(1.25)
    np.testing.assert_allclose(out["a"][:, 0], [1, a_mal, 3, a_mal, 50], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0, -0.25, 0, -0.25, 9], rtol=1e-6)


@pytest.mark.parametrize("n, f", [(4, 2), (5, 2), (10, 2), (50, 24), (20, 1)])
def test_alie_z_max(n, f):
    # Baruch et al.: s = floor(n / 2 + 1) - f, z = Phi^-1((n - s) / n) (s at least 1).
    s = max(math.floor(n / 2 + 1) - f, 1)
    expected = statistics.NormalDist().inv_cdf((n - s) / n)
    np.testing.assert_allclose(attacks.alie_z(n, f), expected, rtol=1e-5)


def test_alie_default_z():
    # n = 4 real, f = 2 attacking: s = 3 - 2 = 1, z = Phi^-1(3 / 4) = 0.6744898.
    z = statistics.NormalDist().inv_cdf(0.75)
    out = run_attack(attacks.alie())
    np.testing.assert_allclose(out["a"][1, 0], 2.5 - z * math.sqrt(1.25), rtol=1e-5)


def test_gaussian_attack():
    u = {"w": jnp.zeros((4, 20000)) + 7.0}
    mal = jnp.array([True, False, True, True])
    w = jnp.array([1.0, 1.0, 1.0, 0.0])
    out = jax.jit(attacks.gaussian(std=2.0))(u, mal, w, jax.random.key(1))
    np.testing.assert_array_equal(out["w"][1], 7.0)
    np.testing.assert_array_equal(out["w"][3], 7.0)  # padded: untouched
    for row in (0, 2):
        assert abs(float(jnp.std(out["w"][row])) - 2.0) < 0.05
        assert abs(float(jnp.mean(out["w"][row]))) < 0.05
    assert not np.allclose(out["w"][0], out["w"][2])


def test_attacks_registry():
    assert set(attacks.ATTACKS) == {"sign_flip", "scaling", "gaussian", "alie", "ipm"}


def test_malicious_clients_fixed_and_about_the_fraction():
    key = jax.random.key(42)
    ids = jnp.arange(10000)
    draw = jax.jit(attacks.malicious_clients)
    mask = draw(key, ids, 0.2)
    assert mask.dtype == jnp.bool_
    # Binomial(10000, 0.2) / 10000 has std 0.004.
    assert abs(float(jnp.mean(mask)) - 0.2) < 0.015
    np.testing.assert_array_equal(draw(key, ids, 0.2), mask)
    # A cohort sees its members' population flags, whatever its order.
    cohort = jnp.array([17, 3, 9999, 5000])
    np.testing.assert_array_equal(draw(key, cohort, 0.2), mask[cohort])
    assert not np.array_equal(draw(jax.random.key(7), ids, 0.2), mask)
    assert not draw(key, ids, 0.0).any()
    assert draw(key, ids, 1.0).all()
    with pytest.raises(ValueError, match="fraction"):
        attacks.malicious_clients(key, ids, 1.5)


# --- Data poisoning ----------------------------------------------------------------------------


def test_flip_labels():
    y = jnp.array([[0, 1], [9, 4]], jnp.int32)
    out = jax.jit(attacks.flip_labels, static_argnums=1)(y, 10)
    np.testing.assert_array_equal(out, [[9, 8], [0, 5]])
    assert out.dtype == jnp.int32


@pytest.mark.parametrize("channels", [None, 3])
def test_add_backdoor(channels):
    shape = (2, 4, 6, 6) + ((channels,) if channels else ())
    x = jnp.zeros(shape)
    y = jnp.array([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32)
    xs, ys = jax.jit(lambda x, y: attacks.add_backdoor(x, y, target_label=7, pattern_size=2))(x, y)
    np.testing.assert_array_equal(ys, 7)
    corner = np.zeros((6, 6), bool)
    corner[-2:, -2:] = True
    if channels:
        corner = np.repeat(corner[:, :, None], channels, axis=2)
    np.testing.assert_array_equal(np.asarray(xs), np.broadcast_to(corner, shape).astype(np.float32))
    # Only the masked examples are poisoned.
    poison = jnp.array([[True, False, False, False], [False, False, False, True]])
    xs, ys = attacks.add_backdoor(x, y, target_label=7, pattern_size=2, poison_mask=poison)
    np.testing.assert_array_equal(ys, [[7, 1, 2, 3], [4, 5, 6, 7]])
    assert float(xs[0, 0].sum()) == corner.sum() and float(xs[0, 1].sum()) == 0.0


def test_backdoor_success():
    # True labels 0, 1, 2, 2 with target 2: the last two are not counted. Of the first two,
    # example 0 is predicted 2 (a hit) and example 1 predicted 1: success 1 / 2.
    logits = jnp.array([[0.0, 0, 5], [0, 5, 0], [0, 0, 5], [5, 0, 0]])
    y = jnp.array([0, 1, 2, 2])
    np.testing.assert_allclose(jax.jit(attacks.backdoor_success)(logits, y, 2), 0.5)
    # Masking out example 1 leaves one counted example, a hit.
    mask = jnp.array([True, False, True, True])
    np.testing.assert_allclose(attacks.backdoor_success(logits, y, 2, mask), 1.0)

"""Robust aggregators and attacks wired into FedAvg and the config, and adaptive clipping
(Andrew et al. 2021) as a transform: checked against hand computations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators
from fedjax_sim.aggregators.adversary import adversary
from fedjax_sim.aggregators.transforms import ClientContext, ServerContext
from fedjax_sim.data import FederatedDataset, pack_cohort
from fedjax_sim.privacy import adaptive
from tests.helpers import linear_model, ragged_dataset, tree_allclose

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))


def _round(algo, cohort):
    state, _ = jax.jit(algo.apply)(algo.init(PARAMS), cohort, jax.random.key(1))
    return state.params


def _cohort(ds, ids=(0, 1, 2, 3)):
    return pack_cohort(ds, list(ids), batch_size=2, seed=0, round_num=0, num_clients=len(ids) + 1)


def test_registry_builds_every_aggregator_by_name_with_kwargs():
    names = aggregators.registry()
    for name in ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
                 "norm_bounding", "centered_clipping", "secure"):  # fmt: skip
        assert name in names
    # The kwargs reach the factory. Scalar updates 0, 1, 2, 4, 100 from n = 5 clients: Krum
    # scores each by its squared distances to its n - f - 2 nearest others. f = 1 (2 nearest):
    # 0: 1 + 4 = 5, 1: 1 + 1 = 2, 2: 1 + 4 = 5, 4: 4 + 9 = 13, 100: 96^2 + 98^2, so client 1's
    # update is the aggregate. f = 0 (3 nearest): 0: 1 + 4 + 16 = 21, 1: 1 + 1 + 9 = 11,
    # 2: 1 + 4 + 4 = 9, 4: 4 + 9 + 16 = 29, so client 2's.
    updates = {"w": jnp.array([[0.0], [1.0], [2.0], [4.0], [100.0]])}
    weights = jnp.ones(5)
    for f, expected in ((1, 1.0), (0, 2.0)):
        krum = aggregators.get_aggregator("krum", num_byzantine=f)
        state = krum.init({"w": jnp.zeros(1)})
        out, _ = krum.apply(state, updates, weights, jax.random.key(0))
        np.testing.assert_array_equal(out["w"], [expected])
    with pytest.raises(ValueError, match="known: .*centered_clipping.*krum"):
        aggregators.get_aggregator("krum2")
    with pytest.raises(ValueError, match="bad aggregator_kwargs"):
        aggregators.get_aggregator("krum", f=1)


def test_no_malicious_clients_change_nothing():
    ds = ragged_dataset([4, 6, 5, 3])
    kw = dict(executor=fs.Executor("vmap"))
    plain = fs.fedavg(MODEL, optax.sgd(0.1), **kw)
    adv = adversary("sign_flip", seed=0, num_classes=3)
    attacked = fs.fedavg(MODEL, optax.sgd(0.1), adversary=adv, attack_fraction=0.0, **kw)
    tree_allclose(_round(attacked, _cohort(ds)), _round(plain, _cohort(ds)), rtol=1e-6)


def test_all_clients_sign_flipping_reverses_the_fedavg_step():
    # Every update u_i -> -u_i, so the mean delta flips: new = p + (p - fedavg_new) = 2p - f.
    ds = ragged_dataset([4, 6, 5, 3])
    kw = dict(executor=fs.Executor("sequential"))
    plain = _round(fs.fedavg(MODEL, optax.sgd(0.1), **kw), _cohort(ds))
    adv = adversary("sign_flip", seed=0, num_classes=3)
    algo = fs.fedavg(MODEL, optax.sgd(0.1), adversary=adv, attack_fraction=1.0, **kw)
    expect = jax.tree.map(lambda p, f: 2 * p - f, PARAMS, plain)
    tree_allclose(_round(algo, _cohort(ds)), expect, rtol=1e-5, atol=1e-6)


def test_label_flipping_clients_train_on_flipped_labels():
    ds = ragged_dataset([4, 6, 5, 3])
    flipped = FederatedDataset({cid: {"x": c["x"], "y": 2 - c["y"]} for cid, c in ds})
    adv = adversary("label_flip", seed=0, num_classes=3)
    for strategy in ("vmap", "sequential"):
        kw = dict(executor=fs.Executor(strategy))
        algo = fs.fedavg(MODEL, optax.sgd(0.1), adversary=adv, attack_fraction=1.0, **kw)
        ref = _round(fs.fedavg(MODEL, optax.sgd(0.1), **kw), _cohort(flipped))
        tree_allclose(_round(algo, _cohort(ds)), ref, rtol=1e-6, atol=1e-7)


def test_config_attack_and_robust_aggregator_run_end_to_end(tmp_path):
    config = fs.load_config("default:smoke")
    config.num_rounds, config.eval_every, config.checkpoint_every = 2, 2, 0
    config.client.local_epochs = 1
    config.aggregator = "trimmed_mean"
    config.aggregator_kwargs = ml_collections.ConfigDict({"trim_fraction": 0.2})
    config.attack.name, config.attack.fraction = "scaling", 0.2
    config.attack.kwargs = ml_collections.ConfigDict({"factor": 10.0})
    out = fs.simulate(config, tmp_path / "run", progress=False)
    assert np.isfinite(out["final_test_loss"])
    config.attack.name = "teleport"
    with pytest.raises(ValueError, match="known: alie, backdoor, gaussian, ipm, label_flip"):
        fs.build_experiment(config)
    config.attack.name, config.attack.fraction = "scaling", 1.5
    with pytest.raises(ValueError, match=r"attack.fraction must be in \[0, 1\]"):
        fs.build_experiment(config)


# ----------------------------------------------------------------------- adaptive clipping


def _hp(z=0.0, gamma=0.5, eta=0.2, sigma_b=0.0):
    return {
        "dp.noise_multiplier": jnp.float32(z),
        "dp.target_quantile": jnp.float32(gamma),
        "dp.clip_learning_rate": jnp.float32(eta),
        "dp.clipped_count_stddev": jnp.float32(sigma_b),
    }


def _adaptive_round(t, state, updates, key, hp):
    """One round of the transform by hand: client stages, a uniform mean, the server stage."""
    n = updates.shape[0]
    outs = [
        t.client({"w": updates[i]}, ClientContext(jnp.int32(i), jnp.float32(1), key, hp, state))
        for i in range(n)
    ]
    mean = jax.tree.map(lambda *a: sum(a) / n, *outs)
    ctx = ServerContext(key, hp, jnp.arange(n), jnp.ones(n), jnp.float32(n))
    return t.server(mean, state, ctx)


def test_adaptive_clip_norm_converges_to_the_target_quantile():
    # Update norms uniform on [0, 2]: the 0.3 quantile is 0.6, the median 1.0.
    t = adaptive.adaptive_clipping(0.1)
    step = jax.jit(lambda s, u, k, hp: _adaptive_round(t, s, u, k, hp))
    rng = np.random.default_rng(0)
    for gamma, quantile in ((0.5, 1.0), (0.3, 0.6)):
        state = t.init(None)
        clips = []
        for r in range(300):
            norms = rng.uniform(0, 2, size=50)
            dirs = rng.standard_normal((50, 4))
            u = jnp.asarray(dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * norms[:, None])
            _, state = step(state, u.astype(jnp.float32), jax.random.key(r), _hp(gamma=gamma))
            clips.append(float(state.clip_norm))
        # The geometric update's fixed point: fraction within C = gamma, i.e. C = 2 gamma.
        assert abs(np.mean(clips[-100:]) - quantile) < 0.08, (gamma, np.mean(clips[-100:]))


def test_adaptive_noise_std_and_update_match_the_formulas():
    # Zero updates with C = 2: the release is pure noise of std z_delta C / m, with
    # z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 = (1 - 1/4)^-1/2 for z = 1, sigma_b = 1.
    t = adaptive.adaptive_clipping(2.0)
    state = t.init(None)
    n, d = 10, 20000
    out, new = _adaptive_round(
        t, state, jnp.zeros((n, d), jnp.float32), jax.random.key(3), _hp(z=1.0, sigma_b=1.0)
    )
    z_delta = (1.0 - 0.25) ** -0.5
    assert np.std(np.asarray(out["w"])) == pytest.approx(z_delta * 2.0 / n, rel=0.03)
    # Without noise: every zero update is within C, b = 1, C <- 2 exp(-0.2 (1 - 0.5)).
    _, new = _adaptive_round(t, state, jnp.zeros((n, 3)), jax.random.key(3), _hp())
    assert float(new.clip_norm) == pytest.approx(2.0 * np.exp(-0.1), rel=1e-6)


def test_adaptive_fedavg_without_noise_clips_to_the_current_norm():
    ds = ragged_dataset([4, 6, 5, 3])
    settings = {"target_quantile": 0.5, "clip_learning_rate": 0.0, "clipped_count_stddev": 0.0}
    kw = dict(weighting="uniform", executor=fs.Executor("vmap"))
    algo = fs.fedavg(MODEL, optax.sgd(0.1), clip_norm=0.05, adaptive_clipping=settings, **kw)
    ref = fs.fedavg(MODEL, optax.sgd(0.1), clip_norm=0.05, **kw)  # fixed clipping at 0.05
    tree_allclose(_round(algo, _cohort(ds)), _round(ref, _cohort(ds)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"target_quantile": 1.5}, r"target_quantile must be in \(0, 1\)"),
        ({"clipped_count_stddev": 0.1}, "leaves no privacy budget"),
    ],
)
def test_bad_adaptive_settings_are_refused(fields, match):
    settings = {"target_quantile": 0.5, "clip_learning_rate": 0.2, "clipped_count_stddev": 1.0}
    with pytest.raises(ValueError, match=match):
        fs.fedavg(
            MODEL,
            optax.sgd(0.1),
            clip_norm=0.1,
            noise_multiplier=1.0,
            weighting="uniform",
            adaptive_clipping={**settings, **fields},
        )


def test_malicious_fraction_and_clip_quantile_sweeps_are_vectorized(tmp_path):
    config = fs.load_config("default:smoke")
    config.num_rounds, config.eval_every, config.checkpoint_every = 2, 2, 0
    config.client.local_epochs = 1
    config.attack.name = "sign_flip"
    config.weighting = "uniform"
    config.dp.clip_norm, config.dp.adaptive = 0.5, True
    axes = {"attack.fraction": [0.0, 0.5], "dp.target_quantile": [0.3, 0.7]}
    out = fs.run_sweep(config, axes, tmp_path / "sweep")
    assert out["groups"] == 1 and len(out["members"]) == 4
    accs = {m["label"]: m["summary"]["final_test_accuracy"] for m in out["members"]}
    assert len(set(accs.values())) > 1  # the members really differ

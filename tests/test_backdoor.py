"""The pixel-pattern backdoor as a config attack: who is poisoned, the attack success rate
(ASR) against NumPy, its records in metrics.jsonl and summary.json, and the refused inputs."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.aggregators import attacks
from fedjax_sim.aggregators.adversary import Backdoor, adversary
from fedjax_sim.data import FederatedDataset, pack_cohort, pack_eval
from fedjax_sim.data.packing import pack_cohort_indices
from fedjax_sim.driver.evaluation import backdoor_evaluator
from tests.helpers import linear_model, tree_allclose

SIZE, CLASSES = 8, 4


def image_clients(num_clients, n, seed=0, prefix="c"):
    """8x8x1 images whose class c is a bright band in rows 2c, 2c + 1, columns 0-4: the
    bottom-right corner, where the trigger goes, is noise in every class."""
    rng = np.random.default_rng(seed)
    clients = {}
    for i in range(num_clients):
        y = rng.integers(0, CLASSES, n).astype(np.int32)
        x = rng.normal(0.0, 0.3, (n, SIZE, SIZE, 1)).astype(np.float32)
        for j, c in enumerate(y):
            x[j, 2 * c : 2 * c + 2, :5, 0] += 1.0
        clients[f"{prefix}{i}"] = {"x": x, "y": y}
    return clients


def image_data(num_clients=20, n=24):
    return fs.data.from_client_arrays(
        image_clients(num_clients, n),
        image_clients(5, n, seed=1, prefix="t"),
        num_classes=CLASSES,
        name="images",
    )


def stamp_np(x, y, bd: Backdoor, chosen):
    """``bd``'s trigger and target on the ``chosen`` examples, in NumPy."""
    x, y = x.copy(), y.copy()
    x[chosen, -bd.pattern_size :, -bd.pattern_size :, :] = bd.value
    y[chosen] = bd.target_label
    return x, y


def client_data(cohort):
    return {
        "batches": dict(cohort.batches),
        "mask": cohort.mask,
        "num_examples": cohort.num_examples,
        "client_id": cohort.client_ids,
    }


def test_backdoor_poisons_exactly_the_malicious_clients_chosen_examples():
    # Clients of 6 and 3 examples in batches of 4: real examples per batch 4, 2 (and 3).
    # poison_fraction 0.5 poisons the first ceil(0.5 n) real ones of each: 2, 1 (and 2).
    ds = FederatedDataset(
        {
            f"c{i}": {k: v[: 6 if i % 2 else 3] for k, v in c.items()}
            for i, c in enumerate(image_clients(8, 6).values())
        }
    )
    ids = list(range(8))
    cohort = pack_cohort(ds, ids, batch_size=4, seed=0, round_num=1)
    bd = Backdoor(target_label=1, pattern_size=2, value=5.0, poison_fraction=0.5)
    adv = adversary("backdoor", seed=3, num_classes=CLASSES, **bd._asdict())
    malicious = np.asarray(adv.malicious(jnp.asarray(cohort.client_ids), 0.5))
    assert 0 < malicious.sum() < len(ids)  # both kinds of client in the cohort

    poisoned = jax.jit(jax.vmap(lambda d: adv.poison(d, 0.5)))(client_data(cohort))
    x, y, mask = cohort.batches["x"], cohort.batches["y"], cohort.mask
    chosen = np.zeros_like(mask)
    for row in np.flatnonzero(malicious):
        for step in range(mask.shape[1]):
            real = np.flatnonzero(mask[row, step])
            chosen[row, step, real[: -(-len(real) // 2)]] = True
    assert chosen.sum() == sum(3 if i % 2 else 2 for i in np.flatnonzero(malicious))
    want_x, want_y = stamp_np(x, y, bd, chosen)
    np.testing.assert_array_equal(poisoned["batches"]["x"], want_x)
    np.testing.assert_array_equal(poisoned["batches"]["y"], want_y)
    np.testing.assert_array_equal(poisoned["mask"], mask)

    # A lazy cohort (indices into examples kept on the device) is poisoned the same way.
    indexed = pack_cohort_indices(ds, ids, batch_size=4, seed=0, round_num=1)
    examples = jax.tree.map(jnp.asarray, ds.all_examples())

    def lazy(d):
        return adv.poison({**d, "examples": examples}, 0.5)

    out = jax.jit(jax.vmap(lazy))(client_data(indexed))
    assert "examples" not in out
    np.testing.assert_array_equal(out["batches"]["x"], want_x)
    np.testing.assert_array_equal(out["batches"]["y"], want_y)


def _linear_images():
    model = linear_model(dim=SIZE * SIZE, num_classes=CLASSES)
    return model._replace(input_shape=(SIZE, SIZE, 1))


def test_all_backdoored_clients_train_on_backdoored_data_and_boost_scales_their_step():
    # FedAvg with every client malicious equals FedAvg on the stamped, relabelled data; with
    # boost b (server lr 1) the step is b times that: new = p + b (f - p).
    ds = FederatedDataset(image_clients(4, 5))
    bd = Backdoor(target_label=2, pattern_size=3, value=1.0)
    stamped = {}
    for cid, c in ds:
        sx, sy = stamp_np(c["x"], c["y"], bd, np.ones(len(c["y"]), bool))
        stamped[cid] = {"x": sx, "y": sy}
    model = _linear_images()
    params = model.init(jax.random.key(0))

    def one_round(algo, data):
        cohort = pack_cohort(data, [0, 1, 2, 3], batch_size=2, seed=0, round_num=0)
        state, _ = jax.jit(algo.apply)(algo.init(params), cohort, jax.random.key(1))
        return state.params

    ref = one_round(fs.fedavg(model, optax.sgd(0.1)), FederatedDataset(stamped))
    for strategy in ("vmap", "sequential"):
        kw = dict(executor=fs.Executor(strategy))
        adv = adversary("backdoor", seed=0, num_classes=CLASSES, **bd._asdict())
        algo = fs.fedavg(model, optax.sgd(0.1), adversary=adv, attack_fraction=1.0, **kw)
        tree_allclose(one_round(algo, ds), ref, rtol=1e-6, atol=1e-7)
    boosted = adversary("backdoor", seed=0, num_classes=CLASSES, **bd._replace(boost=3.0)._asdict())
    algo = fs.fedavg(model, optax.sgd(0.1), adversary=boosted, attack_fraction=1.0)
    expect = jax.tree.map(lambda p, f: p + 3.0 * (f - p), params, ref)
    tree_allclose(one_round(algo, ds), expect, rtol=1e-5, atol=1e-6)


def test_backdoor_success_equals_numpy_on_a_hand_made_case():
    # Targets 1. Examples (true, predicted): (0, 1) hit, (2, 1) hit, (3, 0) miss, (1, 1) not
    # counted (already the target), (0, 1) masked out: ASR = 2 / 3.
    logits = jnp.asarray(
        [[0, 5, 0, 0], [0, 3, 1, 0], [4, 0, 0, 0], [0, 2, 0, 0], [0, 9, 0, 0]], jnp.float32
    )
    y = jnp.asarray([0, 2, 3, 1, 0], jnp.int32)
    mask = jnp.asarray([True, True, True, True, False])
    hits, counted = attacks.backdoor_counts(logits, y, 1, mask)
    assert (float(hits), float(counted)) == (2.0, 3.0)
    assert float(attacks.backdoor_success(logits, y, 1, mask)) == pytest.approx(2 / 3, rel=1e-6)

    # The evaluator's pass (trigger stamped on every test image, padding masked) against
    # NumPy: a linear model on the flattened images, 11 examples in padded batches of 4.
    model = _linear_images()
    params = model.init(jax.random.key(2))
    test = FederatedDataset(image_clients(2, 11, seed=5))
    bd = Backdoor(target_label=3, pattern_size=4, value=2.0)
    arrays, pad_mask, _ = pack_eval(test, batch_size=4)
    hits, counted = jax.jit(backdoor_evaluator(fs.core.task.classification_task(model), bd))(
        params, arrays, pad_mask
    )
    flat = test.all_examples()
    x, _ = stamp_np(flat["x"], flat["y"], bd, np.ones(len(flat["y"]), bool))
    pred = np.argmax(x.reshape(len(x), -1) @ np.asarray(params["w"]) + np.asarray(params["b"]), -1)
    others = flat["y"] != 3
    assert float(counted) == others.sum()
    assert float(hits) == np.sum(others & (pred == 3))


def _config(fraction, **kwargs):
    config = fs.load_config("default:smoke")
    config.num_rounds, config.eval_every, config.checkpoint_every = 10, 5, 0
    config.clients_per_round = 10
    config.client.local_epochs, config.client.learning_rate, config.client.batch_size = 1, 0.1, 8
    config.attack.name, config.attack.fraction = "backdoor", fraction
    config.attack.kwargs = ml_collections.ConfigDict(
        {"target_label": 1, "poison_fraction": 0.5, **kwargs}
    )
    return config


def test_backdoor_run_records_backdoor_success(tmp_path):
    config = _config(0.3)
    config.num_rounds = 4
    config.eval_every = 2
    data = image_data()
    out = fs.simulate(config, tmp_path / "run", federated_data=data, progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [2, 4]
    # A share of the triggered test images whose label is not the target (1): k / n for a
    # whole k in 0..n.
    n = int(np.sum(data.test.all_examples()["y"] != 1))
    for r in records:
        k = r["backdoor_success"] * n
        assert 0 <= round(k) <= n and abs(k - round(k)) < 1e-6 * n, (k, n)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_backdoor_success"] == records[-1]["backdoor_success"]
    assert out["final_backdoor_success"] == records[-1]["backdoor_success"]
    assert "backdoor success" in fs.simulation.format_summary(out)

    config.attack.name, config.attack.kwargs = "sign_flip", ml_collections.ConfigDict()
    out = fs.simulate(config, tmp_path / "plain", federated_data=image_data(), progress=False)
    assert "backdoor_success" not in out["history"][-1] and "final_backdoor_success" not in out


def test_backdoor_works_where_no_attack_does_not(tmp_path):
    # One vectorized sweep: 30% malicious clients against none, on the same data and cohorts.
    # Measured: ASR 0.54 vs 0.00, both members at test accuracy 1.0.
    out = fs.run_sweep(
        _config(0.0), {"attack.fraction": [0.0, 0.3]}, tmp_path, federated_data=image_data()
    )
    assert out["groups"] == 1
    by_fraction = {m["values"]["attack.fraction"]: m["summary"] for m in out["members"]}
    clean, attacked = by_fraction[0.0], by_fraction[0.3]
    assert attacked["final_backdoor_success"] > clean["final_backdoor_success"] + 0.3, (
        clean["final_backdoor_success"],
        attacked["final_backdoor_success"],
    )
    assert attacked["final_test_accuracy"] > 0.9  # the backdoor leaves the main task alone


@pytest.mark.parametrize(
    "change, match",
    [
        ({"task": "next_token"}, "needs task = 'classification'"),
        ({"dataset": "synthetic"}, r"images \[H, W\] or \[H, W, C\].*\(60,\)"),
        ({"target_label": 4}, r"target_label=4 is not a class.*choose 0..3"),
        ({"target_label": -1}, "target_label must be a class index >= 0"),
        ({"pattern_size": 9}, r"pattern_size=9 is larger than the 8x8 images; choose 1..8"),
        ({"poison_fraction": 0.0}, r"poison_fraction must be in \(0, 1\]"),
        ({"pattern": 3}, r"unknown attack.kwargs \['pattern'\]; known: target_label"),
    ],
)
def test_bad_backdoor_settings_are_refused_before_any_round(tmp_path, change, match):
    config = _config(0.3)
    data = image_data(num_clients=12, n=4)
    if "task" in change:
        config.task = change.pop("task")
    if "dataset" in change:
        change.pop("dataset")
        data = None  # the config's own dataset: Synthetic(1, 1), x of 60 features
    config.attack.kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        fs.simulate(config, tmp_path / "run", federated_data=data, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_adversary_refuses_a_target_outside_the_models_classes():
    with pytest.raises(ValueError, match=r"target_label=5 is not a class.*choose 0..2"):
        adversary("backdoor", seed=0, num_classes=3, target_label=5)

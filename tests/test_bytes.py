"""Bytes accounting: every record counts what the reporting clients downloaded (what the
algorithm sends: the model, SCAFFOLD's control variate too, FedPer's body only) and uploaded
(the update, compressed or SecAgg-masked, plus what the algorithm sends beside it), by hand."""

import json
import math

import pytest

import fedjax_sim as fs
from fedjax_sim.aggregators import compression, secure

PARAMS = 60 * 10 + 10  # default:smoke's logreg on 60 features, 10 classes
MODEL_BYTES = 4 * PARAMS


def _config(**fields):
    config = fs.load_config("default:smoke")
    config.num_rounds, config.eval_every, config.checkpoint_every = 4, 2, 0
    config.client.local_epochs = 1
    for k, v in fields.items():
        node = config
        *groups, leaf = k.split("__")
        for g in groups:
            node = node[g]
        node[leaf] = v
    return config


@pytest.mark.parametrize(
    "method, kwargs",
    [("none", {}), ("qsgd", {"levels": 16}), ("top_k", {"ratio": 0.1}), ("sign", {})],
)
def test_records_count_bytes_down_and_up(tmp_path, method, kwargs):
    config = _config(compression__method=method)
    config.compression.kwargs = fs.load_config("default").compression.kwargs
    for k, v in kwargs.items():
        config.compression.kwargs[k] = v
    fs.simulate(config, tmp_path / "run", progress=False)
    recs = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    up = (
        MODEL_BYTES
        if method == "none"
        else math.ceil(compression.bits_per_update(method, PARAMS, **kwargs) / 8)
    )
    if method == "qsgd":  # 32 bits of norm + 610 x (ceil(log2 17) = 5 level bits + 1 sign)
        assert up == math.ceil((32 + 610 * 6) / 8) == 462
    for rec in recs:  # 10 clients report each round (no systems effects)
        assert rec["bytes_down"] == rec["round"] * 10 * MODEL_BYTES
        assert rec["bytes_up"] == rec["round"] * 10 * up


def test_dropped_clients_send_nothing(tmp_path):
    config = _config(systems__dropout=0.5)
    fs.simulate(config, tmp_path / "run", progress=False)
    recs = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sent = recs[-1]["bytes_up"] // MODEL_BYTES
    assert recs[-1]["bytes_up"] % MODEL_BYTES == 0 and 0 < sent < 40  # 4 rounds of 10, ~half


def test_secure_aggregation_uploads_its_masked_vector_and_protocol_messages():
    config = _config(aggregator="secure")
    config.aggregator_kwargs = fs.load_config("default").aggregator_kwargs
    config.aggregator_kwargs.clip_range, config.aggregator_kwargs.bits = 1.0, 8
    config.aggregator_kwargs.modulus_bits = 24
    config.aggregator_kwargs.neighbors = 4
    expect = secure.secagg_bytes(PARAMS, 10, 24, 4)["up"]
    # 2 keys + 3 shares per partner (4 of them) of 32 bytes, and the 24-bit masked vector.
    assert expect == 2 * 32 + 3 * 4 * 32 + math.ceil(PARAMS * 24 / 8)
    assert fs.build_experiment(config).upload_bytes == expect


def test_compression_shortens_the_simulated_upload():
    plain = _config(systems__bandwidth_up=1000.0)
    packed = _config(systems__bandwidth_up=1000.0, compression__method="sign")
    a = fs.build_experiment(plain)
    b = fs.build_experiment(packed)
    assert a.upload_bytes == MODEL_BYTES and b.upload_bytes == math.ceil(PARAMS / 8)


def test_error_feedback_keeps_what_top_k_dropped_as_the_clients_residual():
    import jax
    import optax

    from fedjax_sim.data import pack_cohort
    from tests.helpers import linear_model, ragged_dataset, tree_allclose

    model = linear_model()
    params = model.init(jax.random.key(0))
    ds = ragged_dataset([4, 6, 5])
    kw = dict(weighting="uniform", executor=fs.Executor("sequential"))

    def delta_of(client):  # one client alone, server lr 1: new = params - delta
        cohort = pack_cohort(ds, [client], batch_size=2, seed=0, round_num=0)
        algo = fs.fedavg(model, optax.sgd(0.1), **kw)
        new, _ = algo.apply(algo.init(params), cohort, jax.random.key(1))
        return jax.tree.map(lambda p, n: p - n, params, new.params)

    top = lambda u, key: compression.top_k(u, 0.5)  # noqa: E731
    algo = fs.fedavg(model, optax.sgd(0.1), error_feedback=top, num_clients=4, **kw)
    cohort = pack_cohort(ds, [0, 1, 2], batch_size=2, seed=0, round_num=0, num_clients=4)
    state, _ = algo.apply(algo.init(params), cohort, jax.random.key(1))
    sent = []
    for c in range(3):
        d = delta_of(c)
        kept = compression.top_k(d, 0.5)
        sent.append(kept)
        row = jax.tree.map(lambda a, c=c: a[c], state.aggregator_state[2])  # the residuals
        tree_allclose(row, jax.tree.map(lambda a, b: a - b, d, kept), rtol=1e-5, atol=1e-7)
    untouched = jax.tree.map(lambda a: a[3], state.aggregator_state[2])  # never sampled: zero
    assert all(not a.any() for a in jax.tree.leaves(untouched))
    mean_sent = jax.tree.map(lambda *a: sum(a) / 3, *sent)
    tree_allclose(
        state.params, jax.tree.map(lambda p, m: p - m, params, mean_sent), rtol=1e-5, atol=1e-7
    )
    with pytest.raises(ValueError, match="error feedback needs num_clients"):
        fs.fedavg(model, optax.sgd(0.1), error_feedback=top, **kw)


def test_each_algorithm_counts_what_its_clients_receive_and_send(tmp_path):
    # By hand, on default:smoke's logreg (PARAMS float32 numbers) and, for FedPer/FedRep, the
    # mlp their config switches to (60-200-200-10; the head is the last layer).
    body = (60 * 200 + 200) + (200 * 200 + 200)
    sgd_state = 4 + 4  # optax.sgd injected: its step count (int32) and learning rate (float32)
    expected = {  # algorithm: (down, up) in bytes per client and round
        "fedavg": (MODEL_BYTES, MODEL_BYTES),
        "scaffold": (2 * MODEL_BYTES, 2 * MODEL_BYTES),  # model + c down; delta + c_i delta up
        "fednova": (MODEL_BYTES, MODEL_BYTES + 2 * 4),  # + tau_eff's two terms
        "feddyn": (MODEL_BYTES, MODEL_BYTES + 4),  # + the participant count
        "mime": (2 * MODEL_BYTES + sgd_state, 2 * MODEL_BYTES),  # x, s, c; gradient, delta
        "mimelite": (MODEL_BYTES + sgd_state, 2 * MODEL_BYTES + 4),  # x, s; delta, grad, w
        "fedper": (4 * body, 4 * body),  # the body only
        "fedrep": (4 * body, 4 * body),
    }
    for algorithm, (down, up) in expected.items():
        config = _config()
        fs.algorithms.switch_algorithm(config, algorithm)
        exp = fs.build_experiment(config)
        assert (exp.model_bytes, exp.upload_bytes) == (down, up), algorithm
    # The records count them per reporting client: SCAFFOLD's doubled traffic.
    config = _config(num_rounds=2, eval_every=2)
    fs.algorithms.switch_algorithm(config, "scaffold")
    fs.simulate(config, tmp_path, progress=False)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    clients = 2 * config.clients_per_round
    assert (record["bytes_down"], record["bytes_up"]) == (clients * 2 * MODEL_BYTES,) * 2


def test_the_built_pipeline_prices_the_upload_from_its_own_components():
    import jax
    import jax.numpy as jnp

    from fedjax_sim.aggregators.pipeline import build_pipeline

    update = {
        "w": jax.ShapeDtypeStruct((30, 10), jnp.float32),
        "b": jax.ShapeDtypeStruct((10,), jnp.bfloat16),
    }
    d = 310
    plain = build_pipeline()
    assert plain.upload_bytes(update, 10) == 300 * 4 + 10 * 2  # the update's own dtypes
    signs = build_pipeline(transforms=(compression.compress_updates("sign"),))
    assert signs.upload_bytes(update, 10) == math.ceil(d / 8)
    top = compression.compressor("top_k", ratio=0.1)
    feedback = build_pipeline(error_feedback=top, num_clients=5)
    assert feedback.upload_bytes(update, 10) == math.ceil(31 * (32 + 9) / 8)  # k (value, index)
    masked = build_pipeline(weighting="uniform", aggregator=secure.secure_mean(1.0, 8))
    assert masked.upload_bytes(update, 7) == secure.secagg_bytes(d, 7, 32)["up"]
    # A compressor of the user's own without a bit count: the update's bytes, never a guess.
    own = build_pipeline(error_feedback=lambda u, key: u, num_clients=5)
    assert own.upload_bytes(update, 10) == plain.upload_bytes(update, 10)

"""The decoder-only transformer and its LoRA adapters, against independent references: a NumPy
GPT-2 forward pass on a checkpoint written here in Hugging Face's safetensors layout, merged
weights against the adapter path, and the frozen base through federated training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

import fedjax_sim as fs
from fedjax_sim.core.task import next_token_task
from fedjax_sim.core.types import Cohort
from fedjax_sim.models import lora
from fedjax_sim.models.transformer import parse_targets, rotary, transformer
from tests.conftest_data import real_data
from tests.helpers import token_data

VOCAB, CONTEXT, WIDTH, HEADS, LAYERS = 13, 8, 16, 2, 2


def _gpt2_tensors(seed=0):
    """A tiny GPT-2 checkpoint's tensors, as Hugging Face names them (with the prefix and the
    buffers a saved GPT2LMHeadModel has)."""
    rng = np.random.default_rng(seed)

    def w(*shape, s=0.3):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    t = {"transformer.wte.weight": w(VOCAB, WIDTH), "transformer.wpe.weight": w(CONTEXT, WIDTH)}
    for i in range(LAYERS):
        h = f"transformer.h.{i}"
        t.update({
            f"{h}.ln_1.weight": 1 + w(WIDTH, s=0.1), f"{h}.ln_1.bias": w(WIDTH, s=0.1),
            f"{h}.attn.c_attn.weight": w(WIDTH, 3 * WIDTH), f"{h}.attn.c_attn.bias": w(3 * WIDTH),
            f"{h}.attn.c_proj.weight": w(WIDTH, WIDTH), f"{h}.attn.c_proj.bias": w(WIDTH),
            f"{h}.attn.bias": np.tril(np.ones((1, 1, CONTEXT, CONTEXT), np.float32)),
            f"{h}.ln_2.weight": 1 + w(WIDTH, s=0.1), f"{h}.ln_2.bias": w(WIDTH, s=0.1),
            f"{h}.mlp.c_fc.weight": w(WIDTH, 4 * WIDTH), f"{h}.mlp.c_fc.bias": w(4 * WIDTH),
            f"{h}.mlp.c_proj.weight": w(4 * WIDTH, WIDTH), f"{h}.mlp.c_proj.bias": w(WIDTH),
        })  # fmt: skip
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = 1 + w(WIDTH, s=0.1), w(WIDTH)
    t["lm_head.weight"] = t["transformer.wte.weight"]
    return t


def _gpt2_numpy(t, ids):
    """GPT-2's forward pass in float64 NumPy, written from the paper's description."""
    t = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in t.items()}

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * t[f"{p}.weight"] + t[f"{p}.bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def heads(y):
        b, s, _ = y.shape
        return y.reshape(b, s, HEADS, WIDTH // HEADS).transpose(0, 2, 1, 3)

    n = ids.shape[1]
    x = t["wte.weight"][ids] + t["wpe.weight"][:n]
    for i in range(LAYERS):
        h = f"h.{i}"
        qkv = ln(x, f"{h}.ln_1") @ t[f"{h}.attn.c_attn.weight"] + t[f"{h}.attn.c_attn.bias"]
        q, k, v = (heads(a) for a in np.split(qkv, 3, axis=-1))
        att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(WIDTH // HEADS)
        att = np.where(np.tril(np.ones((n, n), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True)) @ v
        y = y.transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + y @ t[f"{h}.attn.c_proj.weight"] + t[f"{h}.attn.c_proj.bias"]
        m = gelu(ln(x, f"{h}.ln_2") @ t[f"{h}.mlp.c_fc.weight"] + t[f"{h}.mlp.c_fc.bias"])
        x = x + m @ t[f"{h}.mlp.c_proj.weight"] + t[f"{h}.mlp.c_proj.bias"]
    return ln(x, "ln_f") @ t["wte.weight"].T


def _ids(seed=1, batch=3, length=CONTEXT):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _model(**kw):
    kw = {"num_layers": LAYERS, "width": WIDTH, "num_heads": HEADS, **kw}
    return transformer(num_classes=VOCAB, input_shape=(CONTEXT,), **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "model.safetensors"
    tensors = _gpt2_tensors()
    save_file(tensors, str(path))
    return path, tensors


def test_a_gpt2_checkpoint_gives_gpt2s_logits(checkpoint):
    path, tensors = checkpoint
    base, sizes = lora.read_gpt2(path)
    assert sizes == {"num_classes": VOCAB, "context": CONTEXT, "num_layers": LAYERS, "width": WIDTH}
    ids = _ids()
    got = _model().apply(base, ids, train=False)
    np.testing.assert_allclose(got, _gpt2_numpy(tensors, ids), rtol=1e-5, atol=1e-5)


def test_write_gpt2_is_read_gpt2s_inverse(checkpoint, tmp_path):
    base, _ = lora.read_gpt2(checkpoint[0])
    lora.write_gpt2(tmp_path / "again.safetensors", base)
    again, _ = lora.read_gpt2(tmp_path / "again.safetensors")
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_that_does_not_fit_is_refused(checkpoint, tmp_path):
    base, _ = lora.read_gpt2(checkpoint[0])
    wide = _model(width=2 * WIDTH, lora_rank=2)
    with pytest.raises(ValueError, match=r"has shape .* build the model with the checkpoint"):
        lora.adapters_only(wide, base)
    with pytest.raises(FileNotFoundError, match="no GPT-2 checkpoint"):
        lora.read_gpt2(tmp_path / "absent.safetensors")
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        lora.read_gpt2(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lora.adapters_only(_model(), base)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_no_position_sees_a_later_token(positions):
    model = _model(positions=positions)
    params = model.init(jax.random.key(0))
    ids = _ids()
    changed = ids.copy()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    a, b = model.apply(params, ids, train=False), model.apply(params, changed, train=False)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_rotary_scores_depend_on_the_offset_only():
    q, k = jax.random.normal(jax.random.key(0), (2, 6, 1, 8))
    pos = jnp.arange(6)

    def scores(shift):
        return jnp.einsum("qhd,khd->qk", rotary(q, pos + shift), rotary(k, pos + shift))

    np.testing.assert_allclose(scores(0), scores(37), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(  # a rotation keeps each pair's norm
        jnp.linalg.norm(rotary(q, pos), axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-6
    )


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_fresh_adapters_leave_the_base_bitwise_unchanged(positions):
    plain = _model(positions=positions)
    base = plain.init(jax.random.key(3))
    adapted = lora.adapters_only(
        _model(positions=positions, lora_rank=4, lora_targets="attention,mlp"), base
    )
    adapters = adapted.init(jax.random.key(4))
    flat = traverse_util.flatten_dict(adapters)
    assert {k[-1] for k in flat} == {"lora_a", "lora_b"} and len(flat) == 2 * 6 * LAYERS
    assert all(not np.any(v) for k, v in flat.items() if k[-1] == "lora_b")
    assert all(np.any(v) for k, v in flat.items() if k[-1] == "lora_a")
    ids = _ids()
    np.testing.assert_array_equal(
        adapted.apply(adapters, ids, train=False), plain.apply(base, ids, train=False)
    )


@pytest.mark.parametrize("targets", ["q,v", "attention,mlp", "mlp_out"])
def test_merged_weights_give_the_adapter_paths_logits(targets):
    rank, alpha = 4, 8.0
    model = _model(lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    params = model.init(jax.random.key(5))
    # Nonzero B, as after training.
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: (
            0.2 * jax.random.normal(jax.random.key(len(path)), v.shape)
            if path[-1].key == "lora_b"
            else v
        ),
        params,
    )
    ids = _ids()
    merged = lora.merged(params, alpha / rank)
    assert not any(k[-1].startswith("lora") for k in traverse_util.flatten_dict(merged))
    adapter_path = model.apply(params, ids, train=False)
    np.testing.assert_allclose(
        _model().apply(merged, ids, train=False), adapter_path, rtol=1e-5, atol=1e-5
    )
    # The adapters do change the model.
    assert not np.allclose(adapter_path, _model().apply(lora.split(params)[1], ids, train=False))


def test_lora_dropout_needs_a_key_and_is_off_at_evaluation():
    model = _model(lora_rank=2, lora_dropout=0.5)
    params = model.init(jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(  # nonzero B: the adapters matter
        lambda path, v: v + 0.5 if path[-1].key == "lora_b" else v, params
    )
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        model.apply(params, _ids(), train=True)
    evaluation = model.apply(params, _ids(), train=False)
    no_dropout = _model(lora_rank=2).apply(params, _ids(), train=False)
    np.testing.assert_array_equal(evaluation, no_dropout)
    trained = model.apply(params, _ids(), train=True, key=jax.random.key(1))
    assert not np.allclose(trained, evaluation)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown LoRA target 'qq'"):
        parse_targets("q,qq")
    assert parse_targets(["attention", "q", "mlp"]) == ("q", "k", "v", "o", "mlp_in", "mlp_out")
    with pytest.raises(ValueError, match="must split into 3 heads"):
        _model(num_heads=3)
    with pytest.raises(ValueError, match="unknown positions"):
        _model(positions="alibi")
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        _model(lora_rank=-1)
    with pytest.raises(ValueError, match="with B frozen A gets no gradient"):
        lora.adapters_only(
            _model(lora_rank=2), _model().init(jax.random.key(0)), trainable=("lora_a",)
        )
    get = fs.models.get_model
    with pytest.raises(ValueError, match="LoRA options without lora_rank > 0 change nothing"):
        get("transformer", num_classes=VOCAB, input_shape=(8,), lora_trainable="b")
    with pytest.raises(ValueError, match="over LEAF's 80 symbols; the data have 13 classes"):
        get("transformer", num_classes=VOCAB, input_shape=(8,), base="shakespeare:5")


def test_a_checkpoint_needs_its_head_count(checkpoint):
    with pytest.raises(
        ValueError, match="does not store its head count; give model.kwargs.num_heads"
    ):
        fs.models.get_model(
            "transformer", num_classes=VOCAB, input_shape=(8,), base=str(checkpoint[0]),
            num_layers=LAYERS, width=WIDTH,
        )  # fmt: skip


def test_a_recipe_base_refuses_clients_it_was_trained_on():
    config = fs.load_config("shakespeare_lora:smoke")
    config.dataset.kwargs.plays = "all"
    with pytest.raises(ValueError, match=r"pre-trained on every Shakespeare play but the last 10"):
        fs.simulation.check_config_values(config)
    config.dataset.kwargs.plays, config.dataset.kwargs.held_out_plays = "held_out", 5
    with pytest.raises(ValueError, match=r"held_out_plays=10\)"):
        fs.simulation.check_config_values(config)


def _lm_cohort(num_clients=4, steps=2, batch=2, seed=0):
    """Each client's sequences: a repeated phrase of its own (learnable next tokens)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((num_clients, steps, batch, CONTEXT + 1), np.int32)
    for c in range(num_clients):
        phrase = rng.integers(1, VOCAB, 3)
        x[c] = np.resize(phrase, CONTEXT + 1)
    return Cohort(
        batches={"x": jnp.asarray(x[..., :-1]), "y": jnp.asarray(x[..., 1:])},
        mask=jnp.ones((num_clients, steps, batch), bool),
        num_examples=jnp.full((num_clients,), float(steps * batch)),
        client_ids=jnp.arange(num_clients, dtype=jnp.int32),
    )


def test_federated_training_moves_the_adapters_only():
    base = _model().init(jax.random.key(0))
    base_copy = jax.tree.map(np.array, base)
    model = lora.adapters_only(_model(lora_rank=4, lora_targets="attention,mlp"), base)
    task = next_token_task(model, pad_id=-1)
    algo = fs.algorithms.fedavg(task, optax.sgd(0.1))
    state = algo.init(model.init(jax.random.key(1)))
    start = jax.tree.map(np.array, state.params)
    cohort = _lm_cohort()
    loss = []
    for r in range(3):
        state, metrics = jax.jit(algo.apply)(state, cohort, jax.random.key(r))
        loss.append(float(metrics["train_loss"]))
    assert loss[-1] < loss[0]
    # The federated parameters are the adapters; both factors moved (B from zero).
    assert jax.tree.structure(state.params) == jax.tree.structure(start)
    flat = traverse_util.flatten_dict(state.params)
    assert all(not np.array_equal(v, traverse_util.flatten_dict(start)[k]) for k, v in flat.items())
    # The base is untouched.
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(base_copy), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_registrys_transformer_starts_from_a_checkpoint(checkpoint):
    path, tensors = checkpoint
    sizes = {"num_layers": LAYERS, "width": WIDTH, "num_heads": HEADS}
    ids = _ids(length=6)
    want = _gpt2_numpy(tensors, ids)  # the checkpoint's first 6 positions
    full = fs.models.get_model(
        "transformer", num_classes=VOCAB, input_shape=(6,), base=str(path), **sizes
    )
    start = full.init(jax.random.key(0))  # full fine-tuning starts from the checkpoint
    np.testing.assert_allclose(full.apply(start, ids, train=False), want, rtol=1e-5, atol=1e-5)
    adapted = fs.models.get_model(
        "transformer", num_classes=VOCAB, input_shape=(6,), base=str(path), lora_rank=2, **sizes
    )
    adapters = adapted.init(jax.random.key(0))
    assert {k[-1] for k in traverse_util.flatten_dict(adapters)} == {"lora_a", "lora_b"}
    np.testing.assert_allclose(
        adapted.apply(adapters, ids, train=False), want, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="has 8 positions, the model's context is 9"):
        fs.models.get_model(
            "transformer", num_classes=VOCAB, input_shape=(9,), base=str(path), **sizes
        )
    # No checkpoint: a random base of the seed, the same for every build.
    a, b = (
        fs.models.get_model(
            "transformer", num_classes=VOCAB, input_shape=(6,), lora_rank=2, **sizes
        )
        for _ in range(2)
    )
    np.testing.assert_array_equal(
        a.apply(adapters, ids, train=False), b.apply(adapters, ids, train=False)
    )


def test_averaging_factors_leaves_a_gap_that_stacking_and_a_frozen_a_close():
    rng = np.random.default_rng(0)
    n, d_in, d_out, r = 4, 12, 9, 2
    a = rng.standard_normal((n, d_in, r)).astype(np.float32)
    b = rng.standard_normal((n, r, d_out)).astype(np.float32)
    w = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    exact = np.einsum("n,nij,njk->ik", w / w.sum(), a.astype(np.float64), b)
    mean_a, mean_b = (np.tensordot(w / w.sum(), f, 1) for f in (a, b))
    gap = np.abs(mean_a @ mean_b - exact).max()
    assert gap > 0.3 * np.abs(exact).max()  # FedAvg of the factors is not the mean product
    big_a, big_b = lora.stacked(jnp.asarray(a), jnp.asarray(b), jnp.asarray(w))
    assert big_a.shape == (d_in, n * r) and big_b.shape == (n * r, d_out)
    np.testing.assert_allclose(big_a @ big_b, exact, rtol=1e-6, atol=1e-6)
    # The mean product has rank <= n r: an SVD of that rank gives it back.
    ra, rb = lora.refactor(jnp.asarray(exact, jnp.float32), n * r)
    np.testing.assert_allclose(ra @ rb, exact, rtol=1e-5, atol=1e-5)
    # A shared, frozen A (FFA-LoRA): the mean of the B is the mean product.
    np.testing.assert_allclose(
        a[0] @ mean_b, np.einsum("n,ij,njk->ik", w / w.sum(), a[0], b), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("method", ["fedavg", "ffa", "flora"])
def test_ffa_lora_and_flora_rounds_average_the_products_exactly(method, checkpoint):
    """One round (server SGD at 1) over four equal clients, against the four clients' rounds
    alone: with A frozen (FFA-LoRA) and with FLoRA's merged products the global product is the
    mean of the clients' products; FedAvg of both factors misses it."""
    small = {"num_layers": LAYERS, "width": WIDTH, "num_heads": HEADS, "lora_rank": 2}
    small.update(lora_alpha=2.0, base=str(checkpoint[0]))  # a base whose gradients are not tiny
    model = fs.models.get_model(
        "transformer",
        num_classes=VOCAB,
        input_shape=(CONTEXT,),
        lora_trainable="b" if method == "ffa" else "ab",
        **small,
    )
    task = next_token_task(model, pad_id=-1)
    if method == "flora":
        algo = fs.algorithms.flora(task, optax.sgd(0.5))
    else:
        algo = fs.algorithms.fedavg(task, optax.sgd(0.5))
    state = algo.init(model.init(jax.random.key(1)))
    # Start from nonzero products, as after earlier rounds (FLoRA's are in its deltas).
    moved = lambda path, v: v + 0.3 if method != "flora" or path[-1].key == lora.DELTA else v
    state = state._replace(params=jax.tree_util.tree_map_with_path(moved, state.params))
    cohort = _lm_cohort()
    key = jax.random.key(7)
    step = jax.jit(algo.apply)
    new, _ = step(state, cohort, key)
    clients = [
        step(state, jax.tree.map(lambda v, i=i: v[i : i + 1], cohort), key)[0].params
        for i in range(4)
    ]
    full = fs.models.get_model("transformer", num_classes=VOCAB, input_shape=(CONTEXT,), **small)

    def product_of(params):  # the weights' whole change, unscaled: A B (+ FLoRA's deltas)
        if method == "ffa":
            frozen_a = lora.split(lora.split(full.init(jax.random.key(0)))[0], ("lora_b",))[1]
            params = lora.combine(params, frozen_a)
        flat = traverse_util.flatten_dict(params)
        return {
            k[:-1]: v @ flat[(*k[:-1], "lora_b")] + flat.get((*k[:-1], lora.DELTA), 0.0)
            for k, v in flat.items()
            if k[-1] == "lora_a"
        }

    before, got = product_of(state.params), product_of(new.params)
    each = [product_of(c) for c in clients]
    gap = 0.0
    for k, v in got.items():
        mean = np.mean([e[k] for e in each], axis=0)
        gap = max(gap, float(np.abs(v - mean).max()))
        assert float(np.abs(mean - before[k]).max()) > 1e-3  # local training did move them
        if method == "flora":  # each client's change is one rank-2 product; their mean is not
            changes = [np.asarray(e[k] - before[k], np.float64) for e in each]
            assert all(np.linalg.matrix_rank(c, tol=1e-6) <= 2 for c in changes)
            assert np.linalg.matrix_rank(np.mean(changes, axis=0), tol=1e-6) > 2
    print(f"{method}: |global product - mean of the clients' products| {gap:.2e}")
    if method == "fedavg":
        assert gap > 1e-4
    else:
        assert gap < 1e-6
    if method == "flora":  # the global model is the base with the deltas merged
        scale = small["lora_alpha"] / small["lora_rank"]
        whole = lora.merged(lora.combine(new.params, model.frozen.value), scale)
        ids = _ids()
        np.testing.assert_allclose(
            model.apply(new.params, ids, train=False),
            _model().apply(whole, ids, train=False),
            rtol=1e-5,
            atol=1e-5,
        )


def test_a_lora_run_counts_the_base_once_per_client_and_the_adapters_every_round(tmp_path):
    config = fs.load_config("default:smoke")
    config.task = "next_token"
    config.model.name = "transformer"
    config.model.kwargs = {"num_layers": 1, "width": 8, "num_heads": 2, "lora_rank": 2}
    config.clients_per_round, config.num_rounds, config.eval_every = 2, 4, 1
    config.client.local_epochs, config.client.batch_size, config.checkpoint_every = 1, 3, 0
    config.systems.bandwidth_down = 1e4  # bytes/s: the clock charges the downloads
    data = token_data()
    exp = fs.build_experiment(config, data)
    adapters = exp.model.init(jax.random.key(0))
    adapter_bytes = sum(a.size * 4 for a in jax.tree.leaves(adapters))
    base = lora.split(_model(num_layers=1, width=8).init(jax.random.key(0)))[1]
    assert exp.model.frozen_bytes == sum(a.size * 4 for a in jax.tree.leaves(base)) > 0
    assert exp.model_bytes == exp.upload_bytes == adapter_bytes
    fs.simulate(config, tmp_path, federated_data=data, progress=False)
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Which clients took part by each round: the driver's own sampler, replayed.
    seen, clock = set(), 0.0
    for rec in records:
        r = rec["round"]
        ids = set(fs.driver.cohorts.sample_clients(config.seed, r, 6, 2).tolist())
        # The slowest client: the adapters (and the base, the first time) at 1e4 B/s, then
        # its 6 examples at 100 per second.
        first = bool(ids - seen)
        clock += (adapter_bytes + first * exp.model.frozen_bytes) / 1e4 + 6 / 100
        seen |= ids
        assert rec["bytes_up"] == r * 2 * adapter_bytes
        assert rec["bytes_down"] == r * 2 * adapter_bytes + len(seen) * exp.model.frozen_bytes
        assert rec["sim_time_s"] == pytest.approx(clock, abs=0.01)
    assert 2 < len(seen)  # later rounds brought clients that had not had the base yet


def test_the_cohort_source_keeps_who_has_the_base_across_a_resume():
    config = fs.load_config("default:smoke")
    config.clients_per_round = 2
    train = token_data().train
    source = lambda: fs.driver.cohorts.CohortSource(  # noqa: E731
        config, {0: train}, [(0, 0)], slots=2, max_steps=2, model_bytes=10, once_bytes=1000
    )
    straight = source()
    for r in range(1, 5):
        straight.cohorts(r)
    resumed = source()
    for r in (1, 2):
        resumed.cohorts(r)
    saved = json.loads(json.dumps(resumed.bookkeeping()))  # as a checkpoint stores it
    again = source()
    again.restore(saved)
    for r in (3, 4):
        again.cohorts(r)
    assert again.bytes == straight.bytes and straight.bytes[0][0] > 4 * 2 * 10 + 2 * 1000


@pytest.mark.realdata
def test_the_shakespeare_lora_smoke_config_fine_tunes_adapters_of_a_pretrained_base(tmp_path):
    """configs/shakespeare_lora.py:smoke on the real text: the base pre-trained on 26 plays
    (cached), the adapters federated over roles of the 10 held-out plays."""
    real_data("shakespeare/shakespeare.txt.gz")
    config = fs.load_config("shakespeare_lora:smoke")
    exp = fs.build_experiment(config)
    assert exp.data.train.num_clients == 301 and exp.model.name == "transformer+lora"
    params = exp.model.init(jax.random.key(0))
    assert {k[-1] for k in traverse_util.flatten_dict(params)} == {"lora_a", "lora_b"}
    summary = fs.simulate(config, tmp_path, progress=False)
    # Far better than uniform guessing over the 80 characters (ln 80 = 4.38).
    assert summary["final_test_loss"] < 3.5 and summary["final_test_accuracy"] > 0.1, summary
    # Four clients a round; each new one downloads the base once (the driver's sampler).
    n = exp.data.train.num_clients
    seen = {int(c) for r in (1, 2, 3) for c in fs.driver.cohorts.sample_clients(0, r, n, 4)}
    assert summary["bytes_up"] == 3 * 4 * exp.upload_bytes
    assert summary["bytes_down"] == 3 * 4 * exp.model_bytes + len(seen) * exp.model.frozen_bytes


def test_a_pretrained_base_is_trained_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from fedjax_sim import pretrain
    from fedjax_sim.core.task import mean_loss_fn
    from fedjax_sim.data import leaf
    from tests.test_data_leaf import PLAYS

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "shakespeare.txt").write_text(PLAYS, encoding="latin-1")
    arch = {"input_shape": (8,), "num_layers": 1, "width": 16, "num_heads": 2}
    kw = {"arch": arch, "held_out_plays": 1, "data_dir": tmp_path / "text", "progress": False}
    base = pretrain.shakespeare_base(steps=40, cache_dir=tmp_path / "cache", **kw)
    (entry,) = (tmp_path / "cache").iterdir()

    def no_training(*args):
        raise AssertionError("trained again")

    monkeypatch.setattr(pretrain, "_train", no_training)
    again = pretrain.shakespeare_base(steps=40, cache_dir=tmp_path / "cache", **kw)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    # It learned the pre-training text (the held-out play's lines are not in it).
    model = transformer(num_classes=80, **arch)
    windows = leaf.windows_per_position(leaf.shakespeare_pretraining_text(PLAYS, 1), 8)
    loss = mean_loss_fn(next_token_task(model), train=False)
    mask = np.ones(len(windows["x"]), bool)
    random_loss = loss(model.init(jax.random.key(0)), windows, mask, None)[0]
    assert float(loss(base, windows, mask, None)[0]) < 0.8 * float(random_loss)
    assert entry.name.startswith("shakespeare-") and entry.suffix == ".npz"
    # Another number of steps is another base (trained, not read from the cache).
    monkeypatch.undo()
    pretrain.shakespeare_base(steps=41, cache_dir=tmp_path / "cache", **kw)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # Bad recipes are refused before any training.
    for bad in ("shakespeare:0", "shakespeare:ten", "shakespeare:5:1:2"):
        with pytest.raises(ValueError, match="STEPS"):
            pretrain.recipe_base(bad, arch)


def _embedded_kib(program_text: str) -> float:
    """KiB of array constants of at least 1 KiB written into a lowered program."""
    import re

    found = re.findall(r'dense<"0x([0-9A-Fa-f]+)">', program_text)
    return sum(len(h) // 2 for h in found if len(h) >= 2048) / 1024


def test_the_driver_programs_take_the_base_as_an_argument_not_a_constant():
    """A closed-over base is written into the compiled program (and compiled, and cached, as
    text); the driver's round and evaluation programs take it as an argument instead."""
    from fedjax_sim.driver.programs import SoloProgram
    from fedjax_sim.metrics import make_evaluator

    config = fs.load_config("default:smoke")
    config.task, config.model.name = "next_token", "transformer"
    config.model.kwargs = {"num_layers": 1, "width": 32, "num_heads": 2, "lora_rank": 2}
    config.clients_per_round = 2
    exp = fs.build_experiment(config, token_data())
    base_kib = exp.model.frozen_bytes / 1024
    assert base_kib > 40
    program = SoloProgram(exp.algorithm, exp.model, 0, exp.mesh, None)
    states, alive = program.init()
    cohort = _lm_cohort(num_clients=2)
    args = (states, alive, cohort, jnp.asarray(1, jnp.int32))
    assert _embedded_kib(program._round.lower(*args).as_text()) < 1
    # The same round as a plain jit: the base is in the program (the check can fail).
    plain = jax.jit(lambda s, c: exp.algorithm.apply(s, c, jax.random.key(0)))
    assert _embedded_kib(plain.lower(states, cohort).as_text()) > 0.9 * base_kib
    params = exp.model.init(jax.random.key(0))
    arrays = {k: v[0] for k, v in cohort.batches.items()}
    mask, owner = cohort.mask[0], jnp.zeros(cohort.mask[0].shape, jnp.int32)
    evaluate = make_evaluator(exp.task, 1)
    assert _embedded_kib(evaluate.lower(params, arrays, mask, owner).as_text()) < 1
    # Run: the same numbers as the plain jit of the same function (the base embedded).
    got = evaluate(params, arrays, mask, owner)
    want = jax.jit(evaluate.__wrapped__)(params, arrays, mask, owner)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_flora_refuses_what_it_cannot_merge_before_any_compute(monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded")

    monkeypatch.setattr(fs.data, "get_federated_data", no_data)
    config = fs.load_config("shakespeare_lora:smoke")
    config.algorithm = "flora"
    config.model.kwargs.lora_trainable = "b"
    with pytest.raises(ValueError, match="got lora_rank=8, lora_trainable='b'"):
        fs.build_experiment(config)
    config.model.kwargs.lora_trainable = "ab"
    config.compression.method = "sign"
    with pytest.raises(fs.features.UnsupportedError, match="'flora' does not support compression"):
        fs.build_experiment(config)
    # A model whose parameters are not LoRA factors, and one that ignores the merged deltas.
    with pytest.raises(ValueError, match="must be lora_a and lora_b leaves"):
        fs.algorithms.flora(_model(), optax.sgd(0.1))
    inner = _model(lora_rank=2)
    honest = lora.adapters_only(inner, lora.split(inner.init(jax.random.key(0)))[1])
    fs.algorithms.flora(honest, optax.sgd(0.1))  # transformer's projections add the deltas
    deaf = honest._replace(
        apply=lambda p, x, **kw: honest.apply(lora.split(p)[0], x, **kw)  # drops lora_delta
    )
    with pytest.raises(ValueError, match="ignores the merged products"):
        fs.algorithms.flora(deaf, optax.sgd(0.1))


def test_a_flora_round_merges_the_product_a_client_trains_by_hand(checkpoint):
    """One client, server SGD at 1: the new deltas are the old plus the product of adapters
    trained here by a plain loop (fresh from the client's key, SGD on the next-token loss over
    base + deltas); DP noise never reaches the global adapters."""
    from fedjax_sim.core.keys import ADAPTERS_SALT

    small = {"num_layers": LAYERS, "width": WIDTH, "num_heads": HEADS, "lora_rank": 2}
    model = fs.models.get_model(
        "transformer", num_classes=VOCAB, input_shape=(CONTEXT,), base=str(checkpoint[0]), **small
    )
    algo = fs.algorithms.flora(next_token_task(model, pad_id=-1), optax.sgd(0.5))
    state = algo.init(model.init(jax.random.key(1)))
    moved = lambda path, v: v + 0.05 if path[-1].key == lora.DELTA else v
    state = state._replace(params=jax.tree_util.tree_map_with_path(moved, state.params))
    cohort = jax.tree.map(lambda v: v[2:3], _lm_cohort())  # client 2 alone
    key = jax.random.key(5)
    new, _ = jax.jit(algo.apply)(state, cohort, key)

    adapters, deltas = lora.split(state.params)
    ckey = jax.random.fold_in(key, 2)
    trained = model.init(jax.random.fold_in(ckey, ADAPTERS_SALT))

    def loss(p, x, y):
        logits = model.apply(lora.combine(p, deltas), x, train=True, key=None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    for step in range(cohort.mask.shape[1]):
        x, y = cohort.batches["x"][0, step], cohort.batches["y"][0, step]
        grads = jax.grad(loss)(trained, x, y)
        trained = jax.tree.map(lambda p, g: p - 0.5 * g, trained, grads)
    want = jax.tree.map(lambda d, p: d + p, deltas, lora.products(trained))
    got = lora.split(new.params)[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    change = [float(np.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, (got, deltas)))]
    assert max(change) > 1e-3  # the client's product is not negligible
    _assert_same(lora.split(new.params)[0], adapters)
    # With DP the noise covers every coordinate of the aggregate, the adapters' too: the
    # global adapters stay as they were, the deltas carry the noise.
    noisy = fs.algorithms.flora(
        next_token_task(model, pad_id=-1),
        optax.sgd(0.5),
        weighting="uniform",
        pipeline=fs.aggregators.pipeline.build_pipeline(
            weighting="uniform", clip_norm=0.5, noise_multiplier=1.0
        ),
    )
    after, _ = jax.jit(noisy.apply)(noisy.init(adapters), _lm_cohort(), key)
    _assert_same(lora.split(after.params)[0], adapters)


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

"""Tasks: classification keeps its numbers bitwise; next-token scores only real tokens."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.core.task import (
    TASK_NAMES,
    TASKS,
    Task,
    as_task,
    classification_task,
    get_task,
    mean_loss_fn,
    next_token_task,
)
from fedjax_sim.core.types import Model
from fedjax_sim.metrics import make_evaluator, summarize_eval
from fedjax_sim.models import get_model
from tests.helpers import linear_model


def embed_dense_model(vocab: int = 5, dim: int = 4, seq_len: int = 6) -> Model:
    """Per-position next-token model written by hand: logits[b, t] = E[x[b, t]] @ W + b.

    Position (b, t)'s logits depend on the input token x[b, t] only, so changing the input at
    one position changes that position's logits and no other.
    """

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "embed": 0.5 * jax.random.normal(k1, (vocab, dim)),
            "w": 0.5 * jax.random.normal(k2, (dim, vocab)),
            "b": jnp.zeros((vocab,), jnp.float32),
        }

    def apply(params, x, *, train, key=None):
        del train, key
        return params["embed"][x] @ params["w"] + params["b"]

    return Model(init, apply, optax.softmax_cross_entropy_with_integer_labels, "ed", (seq_len,))


def logits_model(shape) -> Model:
    """Logits are the input times one learned scale (1 at init): hand-made logits go in as x."""

    def apply(params, x, *, train, key=None):
        del train, key
        return params["scale"] * x

    return Model(
        lambda key: {"scale": jnp.ones((), jnp.float32)},
        apply,
        optax.softmax_cross_entropy_with_integer_labels,
        "logits",
        tuple(shape),
    )


def reference_token_loss(logits, y, real):
    """Plain-loop float64 cross-entropy over the real tokens: (sum, count)."""
    logits, y, real = np.asarray(logits, np.float64), np.asarray(y), np.asarray(real)
    total, count = 0.0, 0
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            if real[b, t]:
                row = logits[b, t]
                total += math.log(np.sum(np.exp(row - row.max()))) + row.max() - row[y[b, t]]
                count += 1
    return total, count


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Four sequences of six tokens; pad id 0.
Y = np.array(
    [
        [1, 2, 3, 4, 0, 0],  # 4 real
        [2, 2, 0, 0, 0, 0],  # 2 real
        [3, 1, 4, 2, 1, 3],  # 6 tokens, but the example is masked: 0 real
        [0, 4, 1, 0, 0, 0],  # a pad id anywhere is padding: t=1, 2 real
    ],
    np.int32,
)
MASK = np.array([True, True, False, True])
REAL = (Y != 0) & MASK[:, None]  # 4 + 2 + 0 + 2 = 8 real tokens


def token_batch(seed=0):
    x = np.random.default_rng(seed).integers(0, 5, size=Y.shape).astype(np.int32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(Y)}


# ---- classification ----------------------------------------------------------------------


def masked_mean_loss(model, *, train=True):
    """``core.client.masked_mean_loss`` as it was before tasks (copied), the bitwise reference."""

    def loss_fn(params, batch, mask, key):
        logits = model.apply(params, batch["x"], train=train, key=key)
        per_example = model.loss(logits, batch["y"])
        mask = mask.astype(per_example.dtype)
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss_fn


@pytest.mark.parametrize("jit", [False, True])
def test_classification_mean_loss_is_masked_mean_loss_bitwise(jit):
    model = linear_model(dim=5, num_classes=3)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 5)).astype(np.float32)),
        "y": jnp.asarray(rng.integers(0, 3, size=8).astype(np.int32)),
    }
    mask = jnp.asarray([True, False, True, True, False, True, True, False])
    old = jax.value_and_grad(masked_mean_loss(model))
    new = jax.value_and_grad(mean_loss_fn(classification_task(model)), has_aux=True)
    if jit:
        old, new = jax.jit(old), jax.jit(new)
    want_loss, want_grads = old(params, batch, mask, None)
    (loss, weight), grads = new(params, batch, mask, None)
    np.testing.assert_array_equal(loss, want_loss)
    assert_trees_equal(grads, want_grads)
    assert weight.dtype == jnp.float32 and float(weight) == 5.0  # 8 examples, 3 masked
    # A bare Model is taken as classification.
    (loss2, _), grads2 = jax.value_and_grad(mean_loss_fn(model), has_aux=True)(
        params, batch, mask, None
    )
    np.testing.assert_array_equal(loss2, want_loss)
    assert_trees_equal(grads2, want_grads)


def test_classification_all_masked_batch_has_zero_loss_and_weight():
    model = linear_model()
    params = model.init(jax.random.key(0))
    batch = {"x": jnp.ones((3, 5), jnp.float32), "y": jnp.zeros((3,), jnp.int32)}
    loss, weight = mean_loss_fn(model)(params, batch, jnp.zeros((3,), bool), None)
    assert float(loss) == 0.0 and float(weight) == 0.0  # 0 / max(0, 1)


def previous_evaluator(model, num_clients):
    """The evaluator as it was before tasks (copied), the bitwise reference."""

    def evaluate(params, arrays, mask, owner):
        def body(carry, inp):
            correct, count, loss_sum = carry
            batch, m, o = inp
            logits = model.apply(params, batch["x"], train=False, key=None)
            loss = model.loss(logits, batch["y"])
            hit = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(jnp.float32)
            mf = m.astype(jnp.float32)
            correct = correct.at[o].add(hit * mf)
            count = count.at[o].add(mf)
            loss_sum = loss_sum.at[o].add(jnp.where(m, loss, 0.0))
            return (correct, count, loss_sum), None

        zeros = jnp.zeros((num_clients,), jnp.float32)
        return jax.lax.scan(body, (zeros, zeros, zeros), (arrays, mask, owner))[0]

    return jax.jit(evaluate)


def test_classification_evaluator_gives_the_previous_numbers_bitwise():
    model = linear_model(dim=5, num_classes=3)
    params = model.init(jax.random.key(2))
    rng = np.random.default_rng(3)
    arrays = {
        "x": jnp.asarray(rng.normal(size=(3, 6, 5)).astype(np.float32)),
        "y": jnp.asarray(rng.integers(0, 3, size=(3, 6)).astype(np.int32)),
    }
    mask = jnp.asarray(rng.random((3, 6)) < 0.7)
    owner = jnp.asarray(rng.integers(0, 4, size=(3, 6)).astype(np.int32))
    want = previous_evaluator(model, 4)(params, arrays, mask, owner)
    for model_or_task in (model, classification_task(model)):
        got = make_evaluator(model_or_task, 4)(params, arrays, mask, owner)
        for g, w in zip(got, want):
            assert g.dtype == jnp.float32 and g.shape == (4,)
            np.testing.assert_array_equal(g, w)
    assert summarize_eval(*got) == summarize_eval(*want)


# ---- next_token: loss --------------------------------------------------------------------


def test_next_token_loss_is_cross_entropy_over_real_tokens_only():
    model = embed_dense_model()
    params = model.init(jax.random.key(0))
    batch = token_batch()
    task = next_token_task(model)
    loss_sum, weight = task.loss(params, batch, jnp.asarray(MASK), None, train=True)
    logits = model.apply(params, batch["x"], train=False)
    want_sum, want_count = reference_token_loss(logits, Y, REAL)
    assert want_count == 8
    assert loss_sum.dtype == jnp.float32 and weight.dtype == jnp.float32
    assert float(weight) == 8.0
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-6)
    mean, weight2 = mean_loss_fn(task)(params, batch, jnp.asarray(MASK), None)
    np.testing.assert_allclose(float(mean), want_sum / 8, rtol=1e-6)
    assert float(weight2) == 8.0
    jitted = jax.jit(mean_loss_fn(task))(params, batch, jnp.asarray(MASK), None)
    np.testing.assert_allclose(float(jitted[0]), float(mean), rtol=1e-6)


def test_next_token_gradient_is_the_gradient_over_real_tokens():
    model = embed_dense_model()
    params = model.init(jax.random.key(0))
    batch = token_batch()
    b_idx, t_idx = np.nonzero(REAL)  # the 8 real (example, position) pairs

    def reference(p):  # gathers the real tokens explicitly, no masks involved
        logits = model.apply(p, batch["x"], train=False)[b_idx, t_idx]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, Y[b_idx, t_idx]))

    want_loss, want_grads = jax.value_and_grad(reference)(params)
    (loss, _), grads = jax.value_and_grad(mean_loss_fn(next_token_task(model)), has_aux=True)(
        params, batch, jnp.asarray(MASK), None
    )
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_padding_and_masked_examples_change_neither_loss_nor_gradient():
    model = embed_dense_model()
    params = model.init(jax.random.key(0))
    batch = token_batch()
    rng = np.random.default_rng(7)
    # Other input tokens wherever the token is not real: different logits exactly there.
    x = np.asarray(batch["x"])
    other = np.where(REAL, x, (x + rng.integers(1, 5, size=x.shape)) % 5).astype(np.int32)
    assert (other != x).sum() == (~REAL).sum()
    # The masked example's labels may be anything, pad ids included.
    y = Y.copy()
    y[2] = [0, 4, 4, 0, 2, 2]
    perturbed = {"x": jnp.asarray(other), "y": jnp.asarray(y)}
    grad_fn = jax.jit(jax.value_and_grad(mean_loss_fn(next_token_task(model)), has_aux=True))
    (loss_a, w_a), grads_a = grad_fn(params, batch, jnp.asarray(MASK), None)
    (loss_b, w_b), grads_b = grad_fn(params, perturbed, jnp.asarray(MASK), None)
    # Padding enters as exact zeros (where, not a product), so equality is exact.
    np.testing.assert_array_equal(loss_a, loss_b)
    np.testing.assert_array_equal(w_a, w_b)
    assert_trees_equal(grads_a, grads_b)


def test_padded_logits_get_no_gradient_and_large_values_there_change_nothing():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4, 6, 5)).astype(np.float32)
    model = logits_model((6, 5))
    params = model.init(None)
    task = next_token_task(model)

    def loss_of_logits(x):
        return mean_loss_fn(task)(params, {"x": x, "y": jnp.asarray(Y)}, jnp.asarray(MASK), None)

    (loss, _), dx = jax.value_and_grad(loss_of_logits, has_aux=True)(jnp.asarray(logits))
    assert np.all(np.asarray(dx)[~REAL] == 0.0)
    # Real tokens: d mean / d logits = (softmax - onehot) / 8.
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    onehot = np.eye(5, dtype=np.float32)[Y]
    np.testing.assert_allclose(np.asarray(dx)[REAL], ((p - onehot) / 8)[REAL], atol=1e-7)
    noisy = np.where(REAL[..., None], logits, 1e4 * rng.normal(size=logits.shape))
    (loss2, _), dx2 = jax.value_and_grad(loss_of_logits, has_aux=True)(
        jnp.asarray(noisy.astype(np.float32))
    )
    np.testing.assert_array_equal(loss, loss2)
    np.testing.assert_array_equal(dx, dx2)


def test_y_mask_overrides_pad_detection():
    model = logits_model((6, 5))
    params = model.init(None)
    logits = np.random.default_rng(5).normal(size=(4, 6, 5)).astype(np.float32)
    y_mask = np.array(
        [
            [1, 1, 1, 1, 1, 1],  # the pad ids at t=4, 5 are real tokens here: 6 real
            [1, 0, 0, 0, 0, 0],  # y=2 at t=1 is not: 1 real
            [1, 1, 1, 1, 1, 1],  # masked example: 0 real whatever y_mask says
            [0, 0, 0, 0, 0, 0],  # no real token
        ],
        bool,
    )
    real = y_mask & MASK[:, None]  # 6 + 1 + 0 + 0 = 7
    batch = {"x": jnp.asarray(logits), "y": jnp.asarray(Y), "y_mask": jnp.asarray(y_mask)}
    loss_sum, weight = next_token_task(model).loss(
        params, batch, jnp.asarray(MASK), None, train=False
    )
    want_sum, want_count = reference_token_loss(logits, Y, real)
    assert want_count == 7 and float(weight) == 7.0
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-6)
    # With a y_mask, labels under padding may be out of range (-1 here): still finite.
    y = np.where(real, Y, -1).astype(np.int32)
    batch = {"x": jnp.asarray(logits), "y": jnp.asarray(y), "y_mask": jnp.asarray(y_mask)}
    (mean, _), dx = jax.value_and_grad(
        lambda x: mean_loss_fn(next_token_task(model))(
            params, {**batch, "x": x}, jnp.asarray(MASK), None
        ),
        has_aux=True,
    )(jnp.asarray(logits))
    np.testing.assert_allclose(float(mean), want_sum / 7, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(dx))) and np.all(np.asarray(dx)[~real] == 0.0)


def test_pad_id_is_an_option():
    model = embed_dense_model()
    params = model.init(jax.random.key(0))
    # pad_id=2: Y has 2s at (0,1), (1,0), (1,1), (2,3); the masked example stays out.
    # Real: row 0 has 5 non-2 tokens, row 1 has 4, row 3 has 6: 15.
    _, weight = get_task("next_token", model, pad_id=2).loss(
        params, token_batch(), jnp.asarray(MASK), None, train=False
    )
    assert float(weight) == 15.0


def test_next_token_rejects_one_prediction_per_example():
    model = linear_model(dim=6, num_classes=5)  # logits [B, 5] for labels [B, 6]
    params = model.init(jax.random.key(0))
    batch = {"x": jnp.ones((4, 6), jnp.float32), "y": jnp.asarray(Y)}
    with pytest.raises(ValueError, match="one row of logits per label position"):
        next_token_task(model).loss(params, batch, jnp.asarray(MASK), None, train=False)


# ---- next_token: evaluation --------------------------------------------------------------


def test_next_token_evaluate_by_hand():
    model = logits_model((4, 4))
    params = model.init(None)
    logits = np.zeros((3, 4, 4), np.float32)
    logits[0] = [[0, 2, 1, 0], [0, 0, 3, 1], [0, 1, 0, 4], [5, 0, 0, 0]]  # argmax 1, 2, 3, 0
    logits[1] = [[0, 0, 0, 2], [0, 1, 0, 0], [9, 0, 0, 0], [9, 0, 0, 0]]  # argmax 3, 1, -, -
    logits[2] = logits[0]
    y = np.array([[1, 3, 3, 0], [3, 2, 0, 0], [1, 2, 3, 0]], np.int32)
    mask = np.array([True, True, False])
    correct, count, loss_sum = next_token_task(model).evaluate(
        params, {"x": jnp.asarray(logits), "y": jnp.asarray(y)}, jnp.asarray(mask)
    )
    # Example 0: t0 1==1 hit, t1 2!=3, t2 3==3 hit, t3 pad -> 2 of 3.
    # Example 1: t0 3==3 hit, t1 1!=2, t2 and t3 pad -> 1 of 2. Example 2 is masked.
    np.testing.assert_array_equal(correct, [2.0, 1.0, 0.0])
    np.testing.assert_array_equal(count, [3.0, 2.0, 0.0])
    assert correct.dtype == count.dtype == loss_sum.dtype == jnp.float32
    # Example 0, t0: -log softmax([0, 2, 1, 0])[1] = log(1 + e^2 + e + 1) - 2 = 0.4938;
    # t1 (label 3, logit 1): log(2 + e^3 + e) - 1 = 2.2110; t2: log(2 + e + e^4) - 4 = 0.0829.
    # Example 1, t0: log(3 + e^2) - 2 = 0.3408; t1 (label 2, logit 0): log(3 + e) = 1.7437.
    lse = lambda r: math.log(sum(math.exp(v) for v in r))
    want0 = (lse([0, 2, 1, 0]) - 2) + (lse([0, 0, 3, 1]) - 1) + (lse([0, 1, 0, 4]) - 4)
    want1 = (lse([0, 0, 0, 2]) - 2) + (lse([0, 1, 0, 0]) - 0)
    np.testing.assert_allclose(loss_sum, [want0, want1, 0.0], rtol=1e-6)
    np.testing.assert_allclose(loss_sum[:2], [0.4938 + 2.2110 + 0.0829, 0.3408 + 1.7437], atol=2e-4)


def test_evaluator_gives_token_accuracy_over_clients():
    # logits = 3 * onehot(pred): a hit costs log(e^3 + 3) - 3, a miss log(e^3 + 3).
    pred = np.array(
        [
            [[1, 2, 1, 1], [2, 1, 0, 0], [3, 3, 3, 3]],
            [[3, 1, 2, 2], [2, 2, 1, 0], [1, 2, 3, 1]],
        ],
        np.int32,
    )
    y = np.array(
        [
            [[1, 2, 3, 0], [2, 2, 0, 0], [3, 3, 3, 3]],
            [[3, 1, 0, 0], [1, 1, 1, 0], [1, 2, 3, 1]],
        ],
        np.int32,
    )
    mask = np.array([[True, True, True], [True, True, False]])
    owner = np.array([[0, 1, 2], [0, 2, 1]], np.int32)
    # step 0: client 0 real 3 hits 2 (t0, t1); client 1 real 2 hits 1; client 2 real 4 hits 4.
    # step 1: client 0 real 2 hits 2; client 2 real 3 hits 1 (t2); client 1's example masked.
    # Client 0: 4/5, client 1: 1/2, client 2: 5/7; pooled 10/14.
    arrays = {"x": jnp.asarray(3.0 * np.eye(4, dtype=np.float32)[pred]), "y": jnp.asarray(y)}
    model = logits_model((4, 4))
    evaluate = make_evaluator(next_token_task(model), 3)
    correct, count, loss_sum = evaluate(
        model.init(None), arrays, jnp.asarray(mask), jnp.asarray(owner)
    )
    np.testing.assert_array_equal(correct, [4.0, 1.0, 5.0])
    np.testing.assert_array_equal(count, [5.0, 2.0, 7.0])
    c = math.log(math.exp(3) + 3)
    np.testing.assert_allclose(loss_sum, [5 * c - 12, 2 * c - 3, 7 * c - 15], rtol=1e-6)
    ev = summarize_eval(correct, count, loss_sum)
    assert ev["test_accuracy"] == pytest.approx(10 / 14, rel=1e-12)
    assert ev["test_loss"] == pytest.approx(c - 30 / 14, rel=1e-6)  # (14 c - 3 * 10) / 14
    assert ev["client_accuracy_mean"] == pytest.approx((4 / 5 + 1 / 2 + 5 / 7) / 3, rel=1e-12)


# ---- next_token: training ----------------------------------------------------------------


def test_sgd_on_mean_loss_learns_next_tokens():
    vocab, seq_len, n = 6, 8, 32
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocab, size=(n, seq_len)).astype(np.int32)
    y = (x % (vocab - 1) + 1).astype(np.int32)  # the next token is a fixed map of this one
    lengths = rng.integers(3, seq_len + 1, size=n)
    pad = np.arange(seq_len)[None] >= lengths[:, None]
    x, y = np.where(pad, 0, x), np.where(pad, 0, y)
    mask = jnp.asarray(rng.random(n) < 0.8)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    model = embed_dense_model(vocab=vocab, dim=8, seq_len=seq_len)
    task = next_token_task(model)
    grad_fn = jax.jit(jax.value_and_grad(mean_loss_fn(task), has_aux=True))
    params = model.init(jax.random.key(1))
    (first, weight), _ = grad_fn(params, batch, mask, None)
    assert float(weight) == float(np.sum(~pad & np.asarray(mask)[:, None]))
    for _ in range(150):
        (loss, _), grads = grad_fn(params, batch, mask, None)
        params = jax.tree.map(lambda p, g: p - 1.0 * g, params, grads)
    (last, _), _ = grad_fn(params, batch, mask, None)
    assert float(first) > 1.0  # about log 6 = 1.79 at init
    assert float(last) < 0.1 * float(first)
    sums = make_evaluator(task, 1)(
        params,
        jax.tree.map(lambda a: a[None], batch),
        mask[None],
        jnp.zeros((1, n), jnp.int32),
    )
    assert summarize_eval(*sums)["test_accuracy"] == 1.0


def test_lstm_per_position_predicts_after_every_prefix():
    default = get_model("lstm_shakespeare", num_classes=80, input_shape=(12,))
    per_pos = get_model("lstm_shakespeare", num_classes=80, input_shape=(12,), per_position=True)
    params = jax.jit(default.init)(jax.random.key(0))
    shapes = jax.eval_shape(per_pos.init, jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)  # same parameters
    x = jax.random.randint(jax.random.key(1), (2, 12), 0, 80, dtype=jnp.int32)
    logits = jax.jit(lambda p, x: per_pos.apply(p, x, train=False))(params, x)
    assert logits.shape == (2, 12, 80) and logits.dtype == jnp.float32
    last = jax.jit(lambda p, x: default.apply(p, x, train=False))(params, x)
    np.testing.assert_allclose(logits[:, -1], last, atol=1e-5)
    # Causal: position 4's logits are the last-step logits of the first five characters.
    short = get_model("lstm_shakespeare", num_classes=80, input_shape=(5,))
    prefix = jax.jit(lambda p, x: short.apply(p, x, train=False))(params, x[:, :5])
    np.testing.assert_allclose(logits[:, 4], prefix, atol=1e-5)
    y = jnp.concatenate([x[:, 1:], jnp.zeros((2, 1), jnp.int32)], axis=1)  # shifted, padded
    (loss, weight), grads = jax.jit(
        jax.value_and_grad(mean_loss_fn(next_token_task(per_pos)), has_aux=True)
    )(params, {"x": x, "y": y}, jnp.ones((2,), bool), None)
    assert float(weight) == float(jnp.sum(y != 0)) and np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


# ---- registry ----------------------------------------------------------------------------


def test_get_task_and_as_task():
    model = linear_model()
    assert TASK_NAMES == ("classification", "next_token") and set(TASKS) == set(TASK_NAMES)
    with pytest.raises(ValueError, match="known tasks: classification, next_token"):
        get_task("regression", model)
    assert get_task("classification", model).name == "classification"
    assert get_task("next_token", model).name == "next_token"
    task = as_task(model)
    assert isinstance(task, Task) and task.name == "classification" and task.model is model
    nt = next_token_task(model)
    assert as_task(nt) is nt
    with pytest.raises(TypeError, match="Model or a Task"):
        as_task("linear")

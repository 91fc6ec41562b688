"""models.rewrite.fast_gradients: any model's convolutions and max-pools get the loop-friendly
custom VJPs, whatever the model is written in; the same values, gradients to float rounding."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fedjax_sim as fs
from fedjax_sim.core.client import local_train
from fedjax_sim.core.task import mean_loss_fn
from fedjax_sim.models.rewrite import fast_gradients
from tests.test_models import _PlainEmnistCNN

NHWC = ("NHWC", "HWIO", "NHWC")
SLOW = {"conv_general_dilated", "reduce_window_max", "select_and_scatter_add"}


def _primitives(closed) -> collections.Counter:
    """Every primitive in a jaxpr and the jaxprs inside it (jit calls, custom rules)."""
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for v in eqn.params.values():
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(closed.jaxpr)
    return counts


def _top_level(fn, *args) -> collections.Counter:
    return collections.Counter(e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns)


def _lax_cnn():
    """A model written by hand with lax only: a stride-1 conv, a 2x2 max-pool inside a jitted
    helper, a stride-2 conv (not covered) and a dense layer."""

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "w1": 0.3 * jax.random.normal(k1, (3, 3, 1, 8)),
            "w2": 0.3 * jax.random.normal(k2, (3, 3, 8, 8)),
            "dense": 0.1 * jax.random.normal(k3, (2 * 2 * 8, 10)),
        }

    @jax.jit
    def pool(y):
        return lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def apply(params, x, *, train, key=None):
        del train, key
        y = lax.conv_general_dilated(x, params["w1"], (1, 1), "SAME", dimension_numbers=NHWC)
        y = pool(jax.nn.relu(y))  # [b, 5, 5, 8]
        y = lax.conv_general_dilated(y, params["w2"], (2, 2), "VALID", dimension_numbers=NHWC)
        return jax.nn.relu(y).reshape((y.shape[0], -1)) @ params["dense"]

    return fs.Model(init, apply, fs.models.softmax_cross_entropy, "lax_cnn", (10, 10, 1))


def _batch(shape, classes, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape), dtype=np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def test_a_hand_written_lax_model_gets_the_fast_gradients_with_the_same_values():
    model = _lax_cnn()
    params = model.init(jax.random.key(0))
    batch, mask, key = _batch((10, 10, 1), 10), jnp.ones((6,), bool), jax.random.key(1)
    plain = fs.core.task.as_task(model)

    def slow(p):
        loss_sum, weight = plain.loss(p, batch, mask, key, train=True)
        return loss_sum / weight

    fast = lambda p: mean_loss_fn(model)(p, batch, mask, key)[0]  # noqa: E731
    # The same forward operations: the loss is bitwise the same.
    assert np.asarray(fast(params)).tobytes() == np.asarray(slow(params)).tobytes()
    got, want = jax.grad(fast)(params), jax.grad(slow)(params)
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(want[name])).max() > 1e-4  # a real gradient
    # The stride-1 conv and the pool (inside a jitted helper, inlined) became the custom-VJP
    # ones; the stride-2 conv, which they do not cover, stayed lax's.
    top = _top_level(fast, params)
    assert top["custom_vjp_call"] == 2 and top["conv_general_dilated"] == 1
    assert "reduce_window_max" not in top
    assert _top_level(slow, params)["conv_general_dilated"] == 2


def test_a_flax_module_applied_without_model_from_linen_trains_like_the_built_in():
    # cnn_emnist's network in plain flax.linen, applied directly (not through
    # model_from_linen): local training's gradient program holds none of the loop-hostile
    # primitives the built-in avoids, and trains the same params.
    shape = (28, 28, 1)
    built_in = fs.get_model("cnn_emnist", num_classes=62, input_shape=shape)

    def direct(p, x, *, train, key=None):
        rngs = {"dropout": key} if train else {}
        return _PlainEmnistCNN().apply({"params": p}, x, train=train, rngs=rngs)

    user = built_in._replace(apply=direct, name="user_cnn")
    params = built_in.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batches = {
        "x": jnp.asarray(rng.random((2, 4, *shape), dtype=np.float32)),
        "y": jnp.asarray(rng.integers(0, 62, (2, 4)), jnp.int32),
    }
    mask = jnp.ones((2, 4), bool)

    def train(model):
        return lambda p: local_train(
            p, batches, mask, jax.random.key(3), loss_fn=mean_loss_fn(model),
            optimizer=optax.sgd(0.1),
        ).params  # fmt: skip

    counts = _primitives(jax.make_jaxpr(train(user))(params))
    built_in_counts = _primitives(jax.make_jaxpr(train(built_in))(params))
    for name in SLOW:
        assert counts[name] == built_in_counts[name], name
    assert "select_and_scatter_add" not in counts and "reduce_window_max" not in counts
    got, want = jax.jit(train(user))(params), jax.jit(train(built_in))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_functions_with_nothing_to_rewrite_are_called_as_they_are():
    # No convolution or covered pool: the function itself runs (no re-evaluated jaxpr), and
    # mean_loss_fn does not even look for one in a model without 4-D parameters.
    def pooled(x):  # 3x3 windows: not covered
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "VALID").sum()

    x = jnp.asarray(np.random.default_rng(0).random((2, 6, 6, 3), dtype=np.float32))
    assert str(jax.make_jaxpr(fast_gradients(pooled))(x)) == str(jax.make_jaxpr(pooled)(x))
    # It looks once per argument shapes: later calls trace the function only to run it.
    traces = []
    counted = fast_gradients(lambda x: traces.append(1) or pooled(x))
    for _ in range(3):
        jax.make_jaxpr(lambda x: counted(x))(x)  # a new outer function: make_jaxpr caches
    assert len(traces) == 4  # looking and running, then running twice
    mlp = fs.get_model("mlp", num_classes=10, input_shape=(28, 28, 1))
    params = mlp.init(jax.random.key(0))
    batch, mask = _batch((28, 28, 1), 10), jnp.ones((6,), bool)
    task = fs.core.task.as_task(mlp)
    ours = jax.make_jaxpr(lambda p: mean_loss_fn(mlp)(p, batch, mask, None))(params)
    theirs = jax.make_jaxpr(
        lambda p: (lambda s, w: (s / jnp.maximum(w, 1.0), w))(
            *task.loss(p, batch, mask, None, train=True)
        )
    )(params)
    assert str(ours) == str(theirs)


def test_what_the_loss_closes_over_is_read_afresh_in_every_trace():
    # A LoRA-style conv model over a frozen base (fs.models.adapters_only): the base is a
    # program argument (frozen.jit binds it), which the loss reads through its closure. Every
    # trace must see its own: a cached jaxpr held the first program's tracer (a leak in the
    # second program) or the first eager call's arrays (the bound value ignored).
    from fedjax_sim.core import frozen as frozen_lib
    from fedjax_sim.models.lora import adapters_only

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "conv": {
                "kernel": 0.3 * jax.random.normal(k1, (3, 3, 1, 4)),
                "lora_a": 0.1 * jax.random.normal(k2, (3, 3, 1, 2)),
                "lora_b": jnp.zeros((1, 1, 2, 4)),
            },
            "dense": {"kernel": 0.1 * jax.random.normal(k3, (6 * 6 * 4, 10))},
        }

    def apply(p, x, *, train, key=None):
        del train, key
        c, conv = (
            p["conv"],
            lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC),
        )
        y = conv(x, c["kernel"]) + conv(conv(x, c["lora_a"]), c["lora_b"])
        return jax.nn.relu(y).reshape((y.shape[0], -1)) @ p["dense"]["kernel"]

    base = fs.Model(init, apply, fs.models.softmax_cross_entropy, "conv_lora", (6, 6, 1))
    model = adapters_only(base, init(jax.random.key(0)))
    params = model.init(jax.random.key(1))
    loss_fn = mean_loss_fn(model)
    batch, mask = _batch((6, 6, 1), 10, n=4), jnp.ones((4,), bool)
    eager = loss_fn(params, batch, mask, None)[0]
    zeroed = jax.tree.map(jnp.zeros_like, model.frozen.value)
    with model.frozen.bound(zeroed):
        assert not np.allclose(loss_fn(params, batch, mask, None)[0], eager)
    for steps in (2, 3):  # two programs, two traces of the same loss function
        batches = {k: jnp.stack([v] * steps) for k, v in batch.items()}
        masks = jnp.ones((steps, 4), bool)
        train = frozen_lib.jit(
            lambda p, b, m: (
                local_train(
                    p, b, m, jax.random.key(3), loss_fn=loss_fn, optimizer=optax.sgd(0.1)
                ).params
            ),
            model.frozen,
        )
        assert not train.trace(params, batches, masks).jaxpr.consts  # the base: an argument
        jax.block_until_ready(train(params, batches, masks))


def test_channels_first_layers_are_computed_channels_last_with_the_same_values():
    # Equinox's and PyTorch-style models: NCHW/OIHW convolutions and pools over dims 2 and 3,
    # computed in NHWC and transposed back (the values to float rounding, the pool's exact).
    nchw = ("NCHW", "OIHW", "NCHW")

    def loss(params, x):
        y = lax.conv_general_dilated(x, params["w1"], (1, 1), "SAME", dimension_numbers=nchw)
        y = lax.reduce_window(
            jax.nn.relu(y), -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID"
        )
        y = lax.conv_general_dilated(y, params["w2"], (1, 1), "VALID", dimension_numbers=nchw)
        return jnp.sum(jnp.tanh(y) ** 2)

    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(0.3 * rng.standard_normal((8, 3, 3, 3)), jnp.float32),
        "w2": jnp.asarray(0.3 * rng.standard_normal((4, 8, 3, 3)), jnp.float32),
    }
    x = jnp.asarray(rng.random((2, 3, 9, 9), dtype=np.float32))
    fast = fast_gradients(loss)
    top = _top_level(fast, params, x)
    assert top["custom_vjp_call"] == 3 and not SLOW & set(top)
    np.testing.assert_allclose(fast(params, x), loss(params, x), rtol=1e-6)
    got, want = jax.grad(fast)(params, x), jax.grad(loss)(params, x)
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(want[name])).max() > 1e-3

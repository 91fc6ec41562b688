"""Tests of fedjax_sim.models: the loop-friendly convolution and the model registry."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fedjax_sim as fs
import fedjax_sim.models as models_module
import fedjax_sim.models.cnn as cnn_module
from fedjax_sim.models import MODEL_NAMES, count_params, get_model
from fedjax_sim.models.conv import conv2d, conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")
TOL = dict(rtol=1e-5, atol=1e-5)


def reference_conv(x, w, padding):
    if not isinstance(padding, str):
        # Explicit pads go in through jnp.pad: lax's own input gradient of a convolution padded
        # by more than k - 1 returns garbage on XLA:CPU (its transposed pads turn negative).
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
        padding = "VALID"
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)


def loss_of(conv_fn, padding):
    # A non-linear scalar so that the cotangent reaching the convolution is not constant.
    return lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, padding)))


def random_operands(seed, x_shape, w_shape):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)


# x [N, H, W, C], w [kh, kw, C, O], padding: odd sizes, non-square and even kernels, 1x1, and
# explicit pads wider than k - 1 (which make the input-gradient pads negative).
CONV_CASES = [
    ((2, 7, 9, 3), (3, 5, 3, 4), "SAME"),
    ((2, 7, 9, 3), (3, 5, 3, 4), "VALID"),
    ((3, 6, 5, 1), (5, 5, 1, 2), "SAME"),
    ((1, 8, 8, 2), (1, 1, 2, 3), "VALID"),
    ((2, 5, 6, 2), (4, 2, 2, 3), "SAME"),
    ((1, 6, 6, 2), (2, 2, 2, 3), ((2, 0), (1, 3))),
    ((2, 6, 6, 1), (3, 3, 1, 9), "VALID"),
    ((2, 6, 5, 1), (3, 3, 1, 16), "SAME"),
]


@pytest.mark.parametrize("x_shape,w_shape,padding", CONV_CASES)
def test_conv2d_value_and_gradients_match_lax(x_shape, w_shape, padding):
    x, w = random_operands(0, x_shape, w_shape)
    np.testing.assert_allclose(conv2d(x, w, padding), reference_conv(x, w, padding), **TOL)
    got = jax.jit(jax.grad(loss_of(conv2d, padding), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss_of(reference_conv, padding), argnums=(0, 1)))(x, w)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, **TOL)


# The kernel gradient's matmul in both orientations (models/conv.py's _rows_product): kh kw C
# > O (transposed, behind a barrier), < O and == O (direct).
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("w_shape", [(3, 3, 2, 4), (2, 2, 2, 16), (2, 2, 2, 8)])
def test_conv2d_under_jit_and_vmap_over_clients(padding, w_shape):
    # Per-client inputs and per-client kernels, as when clients train their own weights.
    x, w = random_operands(1, (3, 2, 7, 6, 2), (3, *w_shape))
    grad_fast = jax.jit(jax.vmap(jax.grad(loss_of(conv2d, padding), argnums=(0, 1))))
    got = grad_fast(x, w)
    ref = jax.grad(loss_of(reference_conv, padding), argnums=(0, 1))
    for c in range(3):
        want = ref(x[c], w[c])
        np.testing.assert_allclose(got[0][c], want[0], **TOL)
        np.testing.assert_allclose(got[1][c], want[1], **TOL)
    np.testing.assert_allclose(
        jax.vmap(lambda a, b: conv2d(a, b, padding))(x, w),
        jnp.stack([reference_conv(x[c], w[c], padding) for c in range(3)]),
        **TOL,
    )


def test_conv2d_gradients_inside_scan():
    # Three steps of gradient descent on the kernel inside lax.scan (the slow case of
    # jax-ml/jax#12868), against the same loop with lax's own convolution.
    xs, w0 = random_operands(2, (3, 4, 9, 7, 2), (3, 3, 2, 5))

    def descend(conv_fn):
        def step(w, x):
            gx, gw = jax.grad(loss_of(conv_fn, "SAME"), argnums=(0, 1))(x, w)
            return w - 0.01 * gw, jnp.sum(gx)

        return jax.jit(lambda w: lax.scan(step, w, xs))(w0)

    (w_fast, gx_fast), (w_ref, gx_ref) = descend(conv2d), descend(reference_conv)
    np.testing.assert_allclose(w_fast, w_ref, **TOL)
    np.testing.assert_allclose(gx_fast, gx_ref, **TOL)


def test_drop_in_for_flax_conv():
    x = jax.random.normal(jax.random.key(3), (2, 9, 8, 3))
    fast = nn.Conv(4, (3, 3), padding="SAME", conv_general_dilated=conv_general_dilated)
    plain = nn.Conv(4, (3, 3), padding="SAME")
    params = plain.init(jax.random.key(4), x)
    np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), **TOL)
    g_fast = jax.grad(lambda p: jnp.sum(fast.apply(p, x) ** 2))(params)
    g_plain = jax.grad(lambda p: jnp.sum(plain.apply(p, x) ** 2))(params)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window_strides=(2, 2)), "window_strides"),
        (dict(rhs_dilation=(2, 2)), "rhs_dilation"),
        (dict(lhs_dilation=(1, 2)), "lhs_dilation"),
        (dict(feature_group_count=2), "feature_group_count"),
        (dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), "dimension_numbers"),
        (dict(dimension_numbers=None), "dimension_numbers"),
    ],
)
def test_unsupported_convolutions_raise(kwargs, match):
    x, w = jnp.zeros((1, 6, 6, 2)), jnp.zeros((3, 3, 2, 2))
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC) | kwargs
    with pytest.raises(ValueError, match=match):
        conv_general_dilated(x, w, **args)


# (num_classes, input_shape, parameter count by hand):
SPECS = {
    # 784*10 + 10
    "logreg": (10, (28, 28, 1), 7_850),
    # 784*200+200 + 200*200+200 + 200*10+10 = 157000 + 40200 + 2010
    "mlp": (10, (28, 28, 1), 199_210),
    # conv 5*5*1*32+32 = 832; conv 5*5*32*64+64 = 51264; 28 -> 14 -> 7, 7*7*64 = 3136;
    # 3136*512+512 = 1606144; 512*10+10 = 5130
    "cnn_mcmahan": (10, (28, 28, 1), 1_663_370),
    # conv 3*3*1*32+32 = 320; conv 3*3*32*64+64 = 18496; 28 -> 26 -> 24 -> pool 12,
    # 12*12*64 = 9216; 9216*128+128 = 1179776; 128*62+62 = 7998
    "cnn_emnist": (62, (28, 28, 1), 1_206_590),
    # 832 + 51264 + 3136*2048+2048 = 6424576 + 2048*62+62 = 127038
    "cnn_femnist": (62, (28, 28, 1), 6_603_710),
    # embed 80*8 = 640; LSTM(8->256) 4*(8*256 + 256*256 + 256) = 271360;
    # LSTM(256->256) 4*(256*256 + 256*256 + 256) = 525312; 256*80+80 = 20560
    "lstm_shakespeare": (80, (80,), 817_872),
    # convs without bias, GroupNorm 2*channels. stem 3*3*3*64 + 128 = 1856;
    # stage1 2 * (2*3*3*64*64 + 2*128) = 147968;
    # stage2 (3*3*64*128 + 3*3*128*128 + 2*256 + 64*128 + 256) + (2*3*3*128*128 + 512)
    #   = 230144 + 295424 = 525568;
    # stage3 (3*3*128*256 + 3*3*256*256 + 1024 + 128*256 + 512) + (2*3*3*256*256 + 1024)
    #   = 919040 + 1180672 = 2099712;
    # stage4 (3*3*256*512 + 3*3*512*512 + 2048 + 256*512 + 1024) + (2*3*3*512*512 + 2048)
    #   = 3673088 + 4720640 = 8393728; dense 512*10+10 = 5130
    "resnet18_gn": (10, (32, 32, 3), 11_173_962),
    # wte and wpe 2 x 80*64; per block 2 LayerNorms 2*128, q, k, v, o 4*(64*64 + 64), the MLP
    # 64*256 + 256 + 256*64 + 64 = 49,984; two blocks, ln_f 128; the head is wte's.
    "transformer": (80, (80,), 2 * 80 * 64 + 2 * 49_984 + 128),
}


def make(name):
    num_classes, input_shape, _ = SPECS[name]
    return get_model(name, num_classes=num_classes, input_shape=input_shape)


@functools.cache
def model_and_params(name):
    # Initialized once per model for the whole file: initialization dominates test time.
    model = make(name)
    return model, jax.jit(model.init)(jax.random.key(0))


def example_input(name, batch, seed=0):
    num_classes, input_shape, _ = SPECS[name]
    key = jax.random.key(seed)
    if name == "lstm_shakespeare":
        return jax.random.randint(key, (batch, *input_shape), 0, num_classes, dtype=jnp.int32)
    return jax.random.uniform(key, (batch, *input_shape))


def test_registry_covers_all_models():
    assert set(MODEL_NAMES) == set(SPECS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count(name):
    model = make(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert count_params(shapes) == SPECS[name][2]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    assert model.name == name and model.input_shape == SPECS[name][1]


# resnet18_gn: its own test; transformer: per-position logits (tests/test_transformer_lora.py).
@pytest.mark.parametrize(
    "name", [n for n in MODEL_NAMES if n not in ("resnet18_gn", "transformer")]
)
def test_output_shape_jit_and_loss(name):
    model, params = model_and_params(name)
    num_classes = SPECS[name][0]
    assert isinstance(params, dict)
    x = example_input(name, 3)
    logits = model.apply(params, x, train=False)
    assert logits.shape == (3, num_classes) and logits.dtype == jnp.float32
    jitted = jax.jit(lambda p, x: model.apply(p, x, train=False))(params, x)
    np.testing.assert_allclose(jitted, logits, **TOL)
    y = jnp.array([0, 1, num_classes - 1], jnp.int32)
    loss = model.loss(logits, y)
    assert loss.shape == (3,)
    want = -jax.nn.log_softmax(logits)[jnp.arange(3), y]
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)


def test_resnet18_gn_forward():
    model = make("resnet18_gn")
    params = jax.jit(model.init)(jax.random.key(0))
    logits = jax.jit(lambda p, x: model.apply(p, x, train=False))(
        params, example_input("resnet18_gn", 2)
    )
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_resnet18_gn_num_groups_is_an_option():
    model = get_model("resnet18_gn", num_classes=10, input_shape=(32, 32, 3), num_groups=32)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert count_params(shapes) == SPECS["resnet18_gn"][2]


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn_mcmahan"])
def test_images_with_or_without_channel_axis(name):
    model, params = model_and_params(name)
    x = example_input(name, 2)  # [2, 28, 28, 1]
    np.testing.assert_array_equal(
        model.apply(params, x[..., 0], train=False), model.apply(params, x, train=False)
    )


def test_lstm_predicts_from_the_last_step():
    model, params = model_and_params("lstm_shakespeare")
    x = example_input("lstm_shakespeare", 2)
    # A causal model's last output depends on the last character.
    changed = x.at[:, -1].set((x[:, -1] + 1) % 80)
    apply = jax.jit(lambda p, x: model.apply(p, x, train=False))
    a, b = apply(params, x), apply(params, changed)
    assert not np.allclose(a, b)


def test_dropout_follows_the_key():
    model, params = model_and_params("cnn_emnist")
    x = example_input("cnn_emnist", 4)
    apply = jax.jit(model.apply, static_argnames="train")
    k1, k2 = jax.random.key(1), jax.random.key(2)
    train_1 = apply(params, x, train=True, key=k1)
    np.testing.assert_array_equal(apply(params, x, train=True, key=k1), train_1)
    assert not np.allclose(apply(params, x, train=True, key=k2), train_1)
    eval_none = model.apply(params, x, train=False, key=None)
    np.testing.assert_array_equal(model.apply(params, x, train=False, key=k1), eval_none)
    np.testing.assert_array_equal(model.apply(params, x, train=False, key=k2), eval_none)
    assert not np.allclose(train_1, eval_none)


def test_dropout_without_key_is_an_error():
    model, params = model_and_params("cnn_emnist")
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        model.apply(params, example_input("cnn_emnist", 1), train=True, key=None)


def test_models_without_dropout_accept_train_without_key():
    model, params = model_and_params("mlp")
    x = example_input("mlp", 2)
    np.testing.assert_array_equal(
        model.apply(params, x, train=True), model.apply(params, x, train=False)
    )


def test_model_gradients_with_fast_conv_equal_plain_flax_conv(monkeypatch):
    # cnn_emnist's training gradient (dropout on) inside a 2-step scan, with the fast conv and
    # with plain flax Conv layers swapped in.
    def plain_conv(features, kernel_size, *, strides=1, padding="SAME", use_bias=True, name=None):
        return nn.Conv(
            features, (kernel_size, kernel_size), padding=padding, use_bias=use_bias, name=name
        )

    x = example_input("cnn_emnist", 6).reshape(2, 3, 28, 28, 1)
    y = jnp.array([[0, 5, 61], [7, 1, 2]], jnp.int32)

    _, params = model_and_params("cnn_emnist")

    def scan_grads():
        model = make("cnn_emnist")

        def step(carry, batch):
            xb, yb, i = batch
            loss = lambda p: jnp.mean(
                model.loss(model.apply(p, xb, train=True, key=jax.random.key(i)), yb)
            )
            return carry, jax.grad(loss)(params)

        return jax.jit(lambda: lax.scan(step, 0, (x, y, jnp.arange(2)))[1])()

    fast = scan_grads()
    monkeypatch.setattr(cnn_module, "conv", plain_conv)
    plain = scan_grads()
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'vgg'") as info:
        get_model("vgg", num_classes=10, input_shape=(28, 28, 1))
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.fixture
def registry(monkeypatch):
    """Models registered in a test leave the process-wide registry as it was."""
    monkeypatch.setattr(models_module, "_REGISTRY", dict(models_module._REGISTRY))


class Affine(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def affine(*, num_classes, input_shape, scale=1.0):
    model = fs.model_from_linen(Affine(num_classes), name="affine", input_shape=input_shape)
    return model._replace(apply=lambda p, x, **kw: scale * model.apply(p, x, **kw))


def test_a_registered_model_is_built_with_get_models_arguments(registry):
    fs.models.register("affine", affine)
    fs.models.register("affine", affine)  # the same builder again is a no-op
    model = get_model("affine", num_classes=3, input_shape=(2, 2), scale=2.0)
    params = model.init(jax.random.key(0))
    assert params["Dense_0"]["kernel"].shape == (4, 3)  # input_shape (2, 2) flattened
    x = jnp.ones((5, 2, 2))
    plain = get_model("affine", num_classes=3, input_shape=(2, 2))  # scale defaults to 1
    np.testing.assert_allclose(
        model.apply(params, x, train=False), 2.0 * plain.apply(params, x, train=False), **TOL
    )


def test_register_refuses_a_taken_name(registry):
    fs.models.register("affine", affine)
    for name in ("affine", "logreg"):  # a registered one, a built-in one
        with pytest.raises(ValueError, match=f"a model named '{name}' is already registered"):
            fs.models.register(name, lambda **kw: affine(**kw))
    assert get_model("affine", num_classes=2, input_shape=(3,)).name == "affine"
    assert get_model("logreg", num_classes=2, input_shape=(3,)).name == "logreg"


def test_register_refuses_wrong_types(registry):
    built = affine(num_classes=3, input_shape=(4,))  # a Model, not its builder
    with pytest.raises(TypeError, match=r"register\('affine', ...\) needs a builder .*got Model"):
        fs.models.register("affine", built)
    with pytest.raises(TypeError, match="needs a non-empty str name, got 3"):
        fs.models.register(3, affine)
    with pytest.raises(TypeError, match="needs a non-empty str name"):
        fs.models.register("", affine)
    # A builder returning a Flax module instead of a Model fails when it is built.
    fs.models.register("bare_module", lambda *, num_classes, input_shape: Affine(num_classes))
    with pytest.raises(TypeError, match="'bare_module': its builder returned Affine, not a Model"):
        get_model("bare_module", num_classes=3, input_shape=(4,))
    assert "bare_module" in fs.models._REGISTRY and "affine" not in fs.models._REGISTRY


def test_unknown_model_lists_registered_names(registry, monkeypatch, tmp_path):
    fs.models.register("affine", affine)
    with pytest.raises(ValueError, match="unknown model 'vgg'; known models: logreg, .*, affine"):
        get_model("vgg", num_classes=10, input_shape=(28, 28, 1))
    # fs.simulate refuses it before any data loads and before the workdir is made.
    monkeypatch.setattr(
        fs.simulation.data, "get_federated_data", lambda *a, **k: pytest.fail("data loaded")
    )
    config = fs.load_config("default:smoke")
    config.model.name = "vgg"
    with pytest.raises(ValueError, match="unknown model 'vgg'.*affine"):
        fs.simulate(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_count_params_of_a_small_tree():
    # 2*3 + 4 = 10
    assert count_params({"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(4)}}) == 10


class _PlainEmnistCNN(nn.Module):
    """cnn_emnist's network as a user writes it: flax.linen layers only."""

    strides: int = 1

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=self.strides, padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(0.25, deterministic=not train)(x)
        x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(62)(x)


def test_a_plain_flax_cnn_runs_the_built_in_models_program():
    """model_from_linen gives a user's nn.Conv layers the loop-friendly convolution: the same
    logits, and a gradient program identical to the built-in cnn_emnist's (so the same speed);
    without it (the module applied directly) the program is lax's, which runs 15x slower
    inside a round's loop on XLA:CPU (scripts/bench.py's cnn_emnist_linen row)."""
    shape = (28, 28, 1)
    user = models_module.model_from_linen(
        _PlainEmnistCNN(), name="user_cnn", input_shape=shape, has_dropout=True
    )
    built_in = get_model("cnn_emnist", num_classes=62, input_shape=shape)
    params = built_in.init(jax.random.key(0))
    assert jax.tree.structure(user.init(jax.random.key(0))) == jax.tree.structure(params)
    x = np.random.default_rng(0).random((3, *shape), np.float32)
    key = jax.random.key(1)

    def grad_program(apply):
        loss = lambda p: apply(p, x, train=True, key=key).sum()  # noqa: E731
        return jax.make_jaxpr(jax.grad(loss))(params)

    np.testing.assert_array_equal(
        user.apply(params, x, train=True, key=key), built_in.apply(params, x, train=True, key=key)
    )
    assert str(grad_program(user.apply)) == str(grad_program(built_in.apply))

    def direct(p, x, *, train, key):
        return _PlainEmnistCNN().apply({"params": p}, x, train=train, rngs={"dropout": key})

    assert str(grad_program(direct)) != str(grad_program(built_in.apply))
    # A layer the fast convolution does not cover (stride 2) keeps lax's, with the same values.
    strided = models_module.model_from_linen(
        _PlainEmnistCNN(strides=2), name="strided", input_shape=shape, has_dropout=True
    )
    p2 = strided.init(jax.random.key(0))
    np.testing.assert_array_equal(
        strided.apply(p2, x, train=False),
        _PlainEmnistCNN(strides=2).apply({"params": p2}, x, train=False),
    )
    g_fast, g_plain = (
        jax.grad(lambda p, f=f: f(p, x, train=False, key=None).sum())(p2)
        for f in (
            strided.apply,
            lambda p, x, train, key: _PlainEmnistCNN(strides=2).apply(
                {"params": p}, x, train=train
            ),
        )
    )
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_max_pool_2x2_equals_flax_max_pool_values_and_gradients():
    # Ties (values on a grid, relu zeros) send the gradient to each window's first maximum in
    # row-major order, as lax's select-and-scatter does; an odd last row/column is dropped.
    from fedjax_sim.models import pool

    rng = np.random.default_rng(0)
    for shape in [(2, 8, 8, 3), (3, 7, 9, 5)]:
        x = jnp.asarray(np.maximum(np.round(rng.normal(size=shape) * 2) / 2, 0), jnp.float32)
        y_ref, vjp_ref = jax.vjp(lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)), x)
        y, vjp = jax.vjp(pool.max_pool_2x2, x)
        g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
        assert int(jnp.sum(vjp(jnp.ones_like(g))[0] != 0)) <= g.size  # one position per window
    # Other windows, strides or paddings keep Flax's own pooling.
    x = jnp.asarray(rng.random((2, 9, 9, 3)), jnp.float32)
    for window, strides, padding in [((3, 3), (3, 3), "VALID"), ((2, 2), (1, 1), "VALID"),
                                     ((2, 2), (2, 2), "SAME")]:  # fmt: skip
        np.testing.assert_array_equal(
            pool.max_pool_or_lax(x, window, strides, padding),
            nn.max_pool(x, window, strides=strides, padding=padding),
        )
    with models_module.fast_convs():
        assert nn.max_pool is pool.max_pool_or_lax
        with models_module.fast_convs():  # nested: the outer one restores
            pass
        assert nn.max_pool is pool.max_pool_or_lax
    assert nn.max_pool is pool.LAX_MAX_POOL and nn.pooling.max_pool is pool.LAX_MAX_POOL

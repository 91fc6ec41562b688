"""FedPer (Arivazhagan et al. 2019) and FedRep (Collins et al. 2021, Algorithm 1): NumPy
references on a tiny two-layer model, the head choice, heads of unsampled clients, the
first round as FedAvg, personalize under jit and vmap, and refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import sweep
from fedjax_sim.algorithms.fedrep import HEAD_EPOCHS
from fedjax_sim.algorithms.heads import choose_head, layer_order
from fedjax_sim.data import pack_cohort
from fedjax_sim.data.packing import limit_local_steps, pack_cohort_indices
from fedjax_sim.models import model_from_linen
from tests.helpers import ragged_dataset, tree_allclose

SIZES = [5, 9, 3, 7, 6]
LR = 0.3


def two_layer_model(dim=5, hidden=4, classes=3):
    """``tanh(x W1 + b1) W2 + b2`` written by hand; layers ``hidden`` (body), ``out`` (head)."""

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "hidden": {
                "w": 0.5 * jax.random.normal(k1, (dim, hidden)),
                "b": 0.1 * jax.random.normal(k2, (hidden,)),
            },
            "out": {"w": 0.5 * jax.random.normal(k3, (hidden, classes)), "b": jnp.zeros(classes)},
        }

    def apply(params, x, *, train, key=None):
        del train, key
        h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["hidden"]["w"] + params["hidden"]["b"])
        return h @ params["out"]["w"] + params["out"]["b"]

    def loss(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return fs.Model(init, apply, loss, "two_layer", (dim,))


MODEL = two_layer_model()
PARAMS = MODEL.init(jax.random.key(0))


def grads_by_hand(p, x, y):
    """Backprop of the mean softmax cross-entropy (NumPy, float64):
    G = (softmax(z) - onehot) / n; dW2 = h^T G, db2 = sum G; da = G W2^T (1 - h^2);
    dW1 = x^T da, db1 = sum da."""
    h = np.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
    z = h @ p["out"]["w"] + p["out"]["b"]
    e = np.exp(z - z.max(-1, keepdims=True))
    g = e / e.sum(-1, keepdims=True)
    g[np.arange(len(y)), y] -= 1.0
    g /= len(y)
    da = (g @ p["out"]["w"].T) * (1.0 - h**2)
    return {
        "hidden": {"w": x.T @ da, "b": da.sum(0)},
        "out": {"w": h.T @ g, "b": g.sum(0)},
    }


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _sgd(p, g, keys):
    """One SGD step on the layers ``keys`` only (the others frozen)."""
    return {k: jax.tree.map(lambda a, b: a - LR * b, p[k], g[k]) if k in keys else p[k] for k in p}


def by_hand(cohorts, rounds, *, num_clients, head_epochs=None):
    """FedPer (``head_epochs=None``): each sampled client trains body and head jointly from
    (global body, its head) for its real steps. FedRep: first ``head_epochs * tau_k`` head
    steps with the body frozen, step j on the client's packed batch j mod tau_k, then tau_k
    body steps with the head frozen. Both: the server takes the size-weighted mean of the
    bodies; the reported head is the size-weighted mean of the round's new heads."""
    glob = _np(PARAMS)
    heads = [_np(PARAMS["out"]) for _ in range(num_clients)]  # every head starts at w^0's
    for cohort, ids in zip(cohorts, rounds):
        bodies, new_heads, sizes = [], [], []
        for row, k in enumerate(ids):
            mask = np.asarray(cohort.mask[row])
            real = [s for s in range(mask.shape[0]) if mask[s].any()]
            batch = lambda s, row=row, mask=mask: (
                np.asarray(cohort.batches["x"][row, s][mask[s]], np.float64),
                np.asarray(cohort.batches["y"][row, s][mask[s]]),
            )
            p = {"hidden": glob["hidden"], "out": heads[k]}
            if head_epochs is None:
                for s in real:
                    p = _sgd(p, grads_by_hand(p, *batch(s)), ("hidden", "out"))
            else:
                for j in range(head_epochs * len(real)):
                    p = _sgd(p, grads_by_hand(p, *batch(real[j % len(real)])), ("out",))
                for s in real:
                    p = _sgd(p, grads_by_hand(p, *batch(s)), ("hidden",))
            heads[k] = p["out"]
            bodies.append(p["hidden"])
            new_heads.append(p["out"])
            sizes.append(float(cohort.num_examples[row]))
        mean = lambda trees: jax.tree.map(
            lambda *a: sum(s * x for s, x in zip(sizes, a)) / sum(sizes), *trees
        )
        glob = {"hidden": mean(bodies), "out": mean(new_heads)}
    return glob, heads


ROUNDS = [[0, 1, 2, 3], [1, 3], [2, 0, 1]]  # client 4 is never sampled


def _cohorts(ds, rounds, *, batch_size, epochs, stragglers=None):
    steps = fs.data.max_local_steps_of(ds, batch_size=batch_size, local_epochs=epochs)
    out = []
    for r, ids in enumerate(rounds):
        c = pack_cohort(
            ds,
            ids,
            batch_size=batch_size,
            local_epochs=epochs,
            num_steps=steps,
            num_clients=4,
            seed=0,
            round_num=r,
        )
        budget = [(stragglers or {}).get(r, {}).get(k, steps) for k in ids]
        out.append(limit_local_steps(c, budget + [steps] * (4 - len(ids))))
    return out


def _train(algo, cohorts, state=None):
    step = jax.jit(algo.apply)
    state = algo.init(PARAMS) if state is None else state
    for r, c in enumerate(cohorts):
        state, _ = step(state, c, jax.random.key(r))
    assert step._cache_size() == 1
    return state


def _row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _check(state, algo, glob, heads):
    tree_allclose(state.params, glob, rtol=1e-5, atol=1e-6)
    for k, h in enumerate(heads):
        tree_allclose(_row(state.client_states, k), {"out": h}, rtol=1e-5, atol=1e-6)
    # personalize: the global body under each asked client's own head, jitted, in order.
    ids = [4, 1, 3]
    got = jax.jit(algo.personalize)(state, jnp.array(ids, jnp.int32))
    for row, k in enumerate(ids):
        tree_allclose(_row(got, row), {"hidden": glob["hidden"], "out": heads[k]}, 1e-5, 1e-6)


@pytest.mark.parametrize("strategy", ["sequential", "vmap"])
def test_fedper_matches_the_paper_by_hand(strategy):
    # Ragged clients, full batches (batch 9 >= every client), 2 epochs = 2 steps each; client
    # 1 straggles in round 1 (1 step); a padded slot in rounds 1 and 2.
    ds = ragged_dataset(SIZES)
    stragglers = {1: {1: 1}}
    cohorts = _cohorts(ds, ROUNDS, batch_size=9, epochs=2, stragglers=stragglers)
    algo = fs.fedper(MODEL, optax.sgd(LR), num_clients=5, executor=fs.Executor(strategy))
    state = _train(algo, cohorts)
    _check(state, algo, *by_hand(cohorts, ROUNDS, num_clients=5))
    # Client 4 never took part: its head is bitwise the initial one.
    for a, b in zip(jax.tree.leaves(_row(state.client_states, 4)), jax.tree.leaves(PARAMS["out"])):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("batch_size, head_epochs", [(9, 3), (3, 2)])
def test_fedrep_matches_algorithm_1_by_hand(batch_size, head_epochs):
    # Full batches, then mini-batches of 3 (ragged step counts 2, 3, 1, 3, 2: the head cycles
    # over each client's own real steps), with a straggler.
    ds = ragged_dataset(SIZES)
    stragglers = {2: {0: 1}}
    epochs = 2 if batch_size == 9 else 1
    cohorts = _cohorts(ds, ROUNDS, batch_size=batch_size, epochs=epochs, stragglers=stragglers)
    algo = fs.fedrep(MODEL, optax.sgd(LR), num_clients=5, head_epochs=head_epochs)
    state = _train(algo, cohorts)
    _check(state, algo, *by_hand(cohorts, ROUNDS, num_clients=5, head_epochs=head_epochs))
    for a, b in zip(jax.tree.leaves(_row(state.client_states, 4)), jax.tree.leaves(PARAMS["out"])):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert float(state.hparams[HEAD_EPOCHS]) == head_epochs


def test_lazy_cohorts_train_the_same():
    # A lazy cohort (indices into the shared examples, each step gathers its batch): FedRep's
    # own head loop sees the same batches as with the packed cohort (FedPer's and the body's
    # loops are local_train's).
    ds = ragged_dataset(SIZES)
    eager = _cohorts(ds, ROUNDS[:2], batch_size=3, epochs=1)
    lazy = [
        pack_cohort_indices(
            ds, ids, batch_size=3, num_steps=c.num_steps, num_clients=4, seed=0, round_num=r
        )._replace(examples=ds.all_examples())
        for r, (ids, c) in enumerate(zip(ROUNDS, eager))
    ]
    make = lambda: fs.fedrep(MODEL, optax.sgd(LR), num_clients=5, head_epochs=2)
    assert make().lazy_examples
    # (Two builds: jit's compile cache is per function, and each cohort kind traces once.)
    tree_allclose(_train(make(), lazy), _train(make(), eager), rtol=1e-6, atol=1e-7)


def test_fedper_first_round_is_fedavg():
    # Every head starts at the initial model's, so in round 1 each client trains FedAvg's
    # model: the new body is FedAvg's and the reported (size-weighted mean) head is too.
    ds = ragged_dataset(SIZES)
    (cohort,) = _cohorts(ds, ROUNDS[:1], batch_size=3, epochs=1)
    per = fs.fedper(MODEL, optax.sgd(LR), num_clients=5)
    avg = fs.fedavg(MODEL, optax.sgd(LR))
    a, _ = jax.jit(per.apply)(per.init(PARAMS), cohort, jax.random.key(1))
    b, _ = jax.jit(avg.apply)(avg.init(PARAMS), cohort, jax.random.key(1))
    tree_allclose(a.params, b.params, rtol=1e-6, atol=1e-7)


def test_personalize_under_vmap_over_a_stacked_state():
    # A sweep over head_epochs: members vmapped in one program (their head loops differ in
    # length), each equal to its solo run; personalize vmapped over the stacked state.
    ds = ragged_dataset(SIZES)
    cohorts = _cohorts(ds, ROUNDS[:2], batch_size=3, epochs=1)
    algo = fs.fedrep(MODEL, optax.sgd(LR), num_clients=5, head_epochs=1)
    s0 = algo.init(PARAMS)
    members = [s0, s0._replace(hparams={**s0.hparams, HEAD_EPOCHS: jnp.float32(3.0)})]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    vstep = jax.jit(jax.vmap(algo.apply, in_axes=(0, None, None)))
    for r, c in enumerate(cohorts):
        stacked, _ = vstep(stacked, c, jax.random.key(r))
    ids = jnp.array([3, 1, 4], jnp.int32)
    both = jax.jit(jax.vmap(algo.personalize, in_axes=(0, None)))(stacked, ids)
    for m, solo in enumerate(_train(algo, cohorts, s) for s in members):
        tree_allclose(_row(stacked.params, m), solo.params, rtol=1e-5, atol=1e-6)
        tree_allclose(_row(both, m), algo.personalize(solo, ids), rtol=1e-5, atol=1e-6)
    assert not np.allclose(both["out"]["w"][0, 0], both["out"]["w"][1, 0])


class DeepMLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        for _ in range(11):
            x = nn.Dense(2)(x)
        return x


def test_head_is_the_last_layers_in_model_order():
    # Creation order, not key order: Dense_10 comes after Dense_9 (sorted keys put it
    # after Dense_1), and the LSTM's Dense_0 head after its cells (sorted: before).
    deep = model_from_linen(DeepMLP(), name="deep", input_shape=(3,))
    assert layer_order(deep)[-2:] == ("Dense_9", "Dense_10")
    assert choose_head(deep, 2, algorithm="fedper").head == ("Dense_9", "Dense_10")
    lstm = fs.get_model("lstm_shakespeare", num_classes=10, input_shape=(8,))
    split = choose_head(lstm, 1, algorithm="fedrep")
    assert split.head == ("Dense_0",)
    assert split.body == ("Embed_0", "OptimizedLSTMCell_0", "OptimizedLSTMCell_1")
    body, head = split.split(jax.eval_shape(lstm.init, jax.random.key(0)))
    assert set(body) == set(split.body) and set(head) == {"Dense_0"}
    assert set(split.merge(body, head)) == set(split.body + split.head)


def test_bad_input_is_refused():
    logreg = fs.get_model("logreg", num_classes=3, input_shape=(5,))
    for factory in (fs.fedper, fs.fedrep):
        with pytest.raises(ValueError, match=r"no shared body.*--config.model.name=mlp"):
            factory(logreg, optax.sgd(0.1), num_clients=5)
        with pytest.raises(ValueError, match="no shared body"):
            factory(MODEL, optax.sgd(0.1), num_clients=5, head_layers=2)
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match="head_layers must be a positive integer"):
                factory(MODEL, optax.sgd(0.1), num_clients=5, head_layers=bad)
        with pytest.raises(ValueError, match="params do not match the model's layers"):
            factory(MODEL, optax.sgd(0.1), num_clients=5).init({**PARAMS, "extra": {}})
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="head_epochs must be an integer >= 1"):
            fs.fedrep(MODEL, optax.sgd(0.1), num_clients=5, head_epochs=bad)
    with pytest.raises(ValueError, match="unknown weighting"):
        fs.fedper(MODEL, optax.sgd(0.1), num_clients=5, weighting="size")

    # From a config: the kwargs each reads, settings they do not implement.
    ctx = fs.BuildContext(fs.classification_task(MODEL), fs.Executor(), num_clients=5)
    for name in ("fedper", "fedrep"):
        spec = fs.algorithms.get_spec(name)
        config = fs.load_config("default:smoke")
        config.algorithm = name
        config.algorithm_kwargs.head_layers = 1
        algo = spec.build(config, ctx)
        assert set(algo.hparams) == set(spec.hparams(config))
        config.algorithm_kwargs.head_epoch = 3
        with pytest.raises(ValueError, match=r"takes no algorithm_kwargs.head_epoch\b"):
            fs.algorithms.build(config, ctx)
        for field, value, match in [
            ("client.proximal_mu", 0.1, "does not support proximal_term"),
            ("dp.clip_norm", 1.0, r"does not support dp .*DP-FedAvg"),
        ]:
            config = fs.load_config("default:smoke")
            config.algorithm = name
            sweep._set(config, field, value)
            with pytest.raises(ValueError, match=match):
                fs.algorithms.build(config, ctx)
        # head_epochs (FedRep) is a vectorized sweep axis; head_layers shapes the state.
        assert sweep.is_vector_axis(HEAD_EPOCHS, config) == (name == "fedrep")
        assert not sweep.is_vector_axis("algorithm_kwargs.head_layers", config)

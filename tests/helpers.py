"""Small shared fixtures for the core tests: toy models and data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.core.types import Model
from fedjax_sim.data import FederatedDataset


def linear_model(dim: int = 5, num_classes: int = 3) -> Model:
    """Multinomial logistic regression written by hand (an independent reference)."""

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "w": 0.1 * jax.random.normal(k1, (dim, num_classes)),
            "b": 0.1 * jax.random.normal(k2, (num_classes,)),
        }

    def apply(params, x, *, train, key=None):
        del train, key
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]

    def loss(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return Model(init, apply, loss, "linear", (dim,))


def ragged_dataset(sizes, dim: int = 5, num_classes: int = 3, seed: int = 0) -> FederatedDataset:
    rng = np.random.default_rng(seed)
    clients = {}
    w = rng.normal(size=(dim, num_classes))
    for i, n in enumerate(sizes):
        x = rng.normal(size=(n, dim)).astype(np.float32) + rng.normal(size=dim).astype(np.float32)
        y = np.argmax(x @ w + rng.normal(scale=0.5, size=(n, num_classes)), -1).astype(np.int32)
        clients[f"c{i}"] = {"x": x, "y": y}
    return FederatedDataset(clients)


def tree_allclose(a, b, rtol=1e-6, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def mean_loss(model, params, x, y):
    return jnp.mean(model.loss(model.apply(params, x, train=False), y))


def train_clients_by_hand(params, cohort, grad_fn, lr):
    """Every client row of ``cohort`` trained alone in Python: plain SGD over its real steps,
    with ``grad_fn(p, x, y)`` the gradient of its objective on a batch. Returns the models."""
    finals = []
    for row in range(cohort.mask.shape[0]):
        p = params
        for s in range(cohort.mask.shape[1]):
            m = cohort.mask[row, s]
            if not m.any():
                continue
            g = grad_fn(p, cohort.batches["x"][row, s][m], cohort.batches["y"][row, s][m])
            p = jax.tree.map(lambda a, b: a - lr * b, p, g)
        finals.append(p)
    return finals


def three_step_cohort(exp, client_ids, round_num: int):
    """The cohort of ``client_ids`` in round ``round_num`` for an experiment's own data and
    batch size, capped at 3 local steps (the small rounds the registry-wide tests run)."""
    from fedjax_sim.data import pack_cohort

    return pack_cohort(
        exp.data.train,
        client_ids,
        batch_size=exp.config.client.batch_size,
        max_local_steps=3,
        num_steps=3,
        num_clients=exp.cohort_slots,
        seed=0,
        round_num=round_num,
    )


# The tiny language-model setting the registry-wide tests run a LoRA model in.
TOKEN_VOCAB, TOKEN_CONTEXT = 13, 8


def token_data(num_clients: int = 6, n: int = 6, seed: int = 0):
    """Federated next-token data: each client's sequences count up (mod the vocabulary) from
    starts of its own; two test clients."""
    import fedjax_sim as fs

    rng = np.random.default_rng(seed)

    def client():
        start = rng.integers(1, TOKEN_VOCAB, size=(n, 1))
        seq = (start + np.arange(TOKEN_CONTEXT + 1)) % (TOKEN_VOCAB - 1) + 1
        return {"x": seq[:, :-1].astype(np.int32), "y": seq[:, 1:].astype(np.int32)}

    return fs.from_client_arrays(
        {f"c{i}": client() for i in range(num_clients)},
        test={f"t{i}": client() for i in range(2)},
        num_classes=TOKEN_VOCAB,
    )


def with_lora_model(config, num_layers: int = 1):
    """``config`` (in place) training the rank-2 adapters of a one-block transformer of width
    8 over a random frozen base, on next tokens (``token_data``)."""
    config.task = "next_token"
    config.model.name = "transformer"
    config.model.kwargs = {"num_layers": num_layers, "width": 8, "num_heads": 2, "lora_rank": 2}
    return config


def build_experiment(config):
    """``fs.build_experiment``, on ``token_data`` for a transformer config."""
    import fedjax_sim as fs

    lm = config.model.name == "transformer"
    return fs.build_experiment(config, token_data(num_clients=8) if lm else None)

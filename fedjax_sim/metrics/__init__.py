"""Evaluation of a global model on federated test data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_sim.core.types import Model


def make_evaluator(model: Model, num_clients: int):
    """A jitted ``(params, arrays, mask, owner) -> sums`` over packed evaluation batches.

    Returns per-client correct counts, example counts and loss sums in one pass, so both the
    pooled metrics and the per-client distribution come from the same numbers.
    """

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
        (correct, count, loss_sum), _ = lax.scan(body, (zeros, zeros, zeros), (arrays, mask, owner))
        return correct, count, loss_sum

    return jax.jit(evaluate)


def summarize_eval(correct, count, loss_sum) -> dict:
    """Pooled accuracy/loss and the distribution of per-client accuracy (host side)."""
    correct, count, loss_sum = (np.asarray(a, np.float64) for a in (correct, count, loss_sum))
    total = count.sum()
    has = count > 0
    per_client = correct[has] / count[has]
    return {
        "test_accuracy": float(correct.sum() / total),
        "test_loss": float(loss_sum.sum() / total),
        "client_accuracy_mean": float(per_client.mean()),
        "client_accuracy_p10": float(np.percentile(per_client, 10)),
        "client_accuracy_p50": float(np.percentile(per_client, 50)),
        "client_accuracy_p90": float(np.percentile(per_client, 90)),
    }

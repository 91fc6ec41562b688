"""Evaluation on federated test data: of a global model, or of one model per client."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_sim.core.frozen import jit as frozen_jit
from fedjax_sim.core.task import Task, as_task
from fedjax_sim.core.types import Model


def make_evaluator(model_or_task: Model | Task, num_clients: int):
    """A jitted ``(params, arrays, mask, owner) -> sums`` over packed evaluation batches.

    Returns per-client correct counts, unit counts and loss sums in one pass, so both the
    pooled metrics and the per-client distribution come from the same numbers. A unit is what
    the task scores: an example for a bare model (classification), a real token for
    ``next_token_task``.

    Args:
      model_or_task: a :class:`~fedjax_sim.core.task.Task`, or a model (classification).
      num_clients: the length of the per-client sums.

    Returns:
      ``evaluate(params, arrays, mask, owner)``: ``arrays`` are ``[steps, batch, ...]``
      batches, ``mask`` and ``owner`` (the client index of each example) ``[steps, batch]``;
      it returns ``(correct, count, loss_sum)``, each ``[num_clients]`` float32.
    """
    task = as_task(model_or_task)

    def evaluate(params, arrays, mask, owner):
        def body(carry, inp):
            correct, count, loss_sum = carry
            batch, m, o = inp
            hit, units, loss = task.evaluate(params, batch, m)
            correct = correct.at[o].add(hit)
            count = count.at[o].add(units)
            loss_sum = loss_sum.at[o].add(loss)
            return (correct, count, loss_sum), None

        zeros = jnp.zeros((num_clients,), jnp.float32)
        (correct, count, loss_sum), _ = lax.scan(body, (zeros, zeros, zeros), (arrays, mask, owner))
        return correct, count, loss_sum

    return frozen_jit(evaluate, task.model.frozen)


def make_client_evaluator(model_or_task: Model | Task):
    """A jitted ``(client_params, batches, mask) -> sums``: each client's examples scored by its
    own model (personalized models, fine-tuned copies), one client at a time (``lax.map``).

    Args:
      model_or_task: a :class:`~fedjax_sim.core.task.Task`, or a model (classification).

    Returns:
      ``evaluate(client_params, batches, mask)``: ``client_params`` has a leading
      ``[clients]`` axis, ``batches`` are ``[clients, steps, batch, ...]`` and ``mask``
      ``[clients, steps, batch]`` (``pack_cohort`` of the test clients with one epoch); it
      returns ``(correct, count, loss_sum)``, each ``[clients]`` float32, as
      ``make_evaluator`` does (``summarize_eval`` takes them).
    """
    task = as_task(model_or_task)

    def one_client(args):
        params, batches, mask = args

        def body(carry, inp):
            batch, m = inp
            hit, units, loss = task.evaluate(params, batch, m)
            return jax.tree.map(lambda c, x: c + jnp.sum(x), carry, (hit, units, loss)), None

        zero = jnp.zeros((), jnp.float32)
        sums, _ = lax.scan(body, (zero, zero, zero), (batches, mask))
        return sums

    return frozen_jit(
        lambda client_params, batches, mask: lax.map(one_client, (client_params, batches, mask)),
        task.model.frozen,
    )


def summarize_eval(correct, count, loss_sum) -> dict:
    """Pooled accuracy/loss and the distribution of per-client accuracy (host side).

    Pooled over units (examples, or real tokens for next-token tasks): ``test_accuracy`` is
    all hits over all units, ``test_loss`` the mean loss per unit.
    """
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

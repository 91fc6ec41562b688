"""What a model learns: its training loss and evaluation metrics, as pure functions.

A :class:`Task` pairs a :class:`~fedjax_sim.core.types.Model` with how its outputs are scored,
so the same training and evaluation code serves classification (one label per example) and
next-token prediction (one label per position, with padding tokens):

    from fedjax_sim.core.task import mean_loss_fn, next_token_task

    task = next_token_task(model, pad_id=0)
    loss_fn = mean_loss_fn(task)         # what local training differentiates
    (loss, weight), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, mask, key)

Losses are returned as a sum over real *units* and their count, never as a mean, so callers can
pool them exactly across steps, clients and devices. A unit is an example (classification) or a
real token (next-token prediction).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.core.types import Array, Model, Params, PRNGKey
from fedjax_sim.models.rewrite import fast_gradients

# (params, batch, mask, key, *, train) -> (loss_sum, weight), float32 scalars
TaskLoss = Callable[..., tuple[Array, Array]]
# (params, batch, mask) -> (correct, count, loss_sum), each [batch] float32
TaskEvaluate = Callable[[Params, dict, Array], tuple[Array, Array, Array]]
# (params, batch, mask, key) -> (mean loss over real units, weight)
MeanLossFn = Callable[[Params, dict, Array, PRNGKey | None], tuple[Array, Array]]


class Task(NamedTuple):
    """What is learned: the loss and the evaluation metrics of a model, as pure functions.

    Attributes:
      model: the model whose ``apply`` produces the logits.
      loss: ``(params, batch, mask, key, *, train: bool) -> (loss_sum, weight)``: the sum of
        per-unit losses over the real units of the batch and their count (float32 scalars).
        ``mask`` is the ``[batch]`` bool example mask; ``key`` a PRNG key or ``None``
        (dropout, used when ``train`` is True).
      evaluate: ``(params, batch, mask) -> (correct, count, loss_sum)``, each ``[batch]``
        float32: per-example sums over that example's real units (0 for masked examples).
      name: registry name (a key of :data:`TASKS`).
    """

    model: Model
    loss: TaskLoss
    evaluate: TaskEvaluate
    name: str


def classification_task(model: Model) -> Task:
    """One label per example: loss ``model.loss(logits, y)``, correct ``argmax == y``.

    The mean of ``loss`` (via :func:`mean_loss_fn`) is bitwise the
    ``fedjax_sim.core.client.masked_mean_loss`` of the model, and ``evaluate`` gives the
    numbers the evaluator always gave.

    Args:
      model: logits ``[batch, classes]`` from ``apply``; labels ``batch["y"]`` are ``[batch]``.

    Returns:
      The task; a unit is an example.
    """

    def loss(params, batch, mask, key, *, train):
        logits = model.apply(params, batch["x"], train=train, key=key)
        per_example = model.loss(logits, batch["y"])
        m = mask.astype(per_example.dtype)
        return jnp.sum(per_example * m), jnp.sum(m)

    def evaluate(params, batch, mask):
        logits = model.apply(params, batch["x"], train=False, key=None)
        per_example = model.loss(logits, batch["y"])
        hit = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(jnp.float32)
        m = mask.astype(jnp.float32)
        # where, not a product: a padded example's loss may be inf or NaN.
        loss_sum = jnp.where(mask, per_example, 0.0).astype(jnp.float32)
        return hit * m, m, loss_sum

    return Task(model=model, loss=loss, evaluate=evaluate, name="classification")


def next_token_task(model: Model, *, pad_id: int = 0) -> Task:
    """One label per position (language modelling: Stack Overflow, Shakespeare).

    ``apply`` gives logits ``[batch, T, vocab]`` for labels ``batch["y"]`` ``[batch, T]``.
    A token is real when its example is real (``mask``) and, if the batch has a
    ``"y_mask"`` (``[batch, T]``), where it is True, else where ``y != pad_id``. Every real
    token is one unit: the loss is the softmax cross-entropy per real token, so examples
    weigh by their length, and accuracy is over tokens (as TFF's Stack Overflow next-word
    task counts it, without special-casing out-of-vocabulary or end-of-sentence ids).

    Args:
      model: a model with per-position logits (e.g. ``lstm_shakespeare(per_position=True)``).
      pad_id: the label id of padding, used when the batch has no ``"y_mask"``.

    Returns:
      The task; a unit is a real token.
    """
    pad_id = int(pad_id)

    def tokens(params, batch, mask, *, train, key):
        logits = model.apply(params, batch["x"], train=train, key=key)
        y = batch["y"]
        if logits.shape[:-1] != y.shape:
            raise ValueError(
                f"next_token_task: logits {logits.shape} do not match labels {y.shape}; "
                "the model must give one row of logits per label position"
            )
        real = batch["y_mask"].astype(bool) if "y_mask" in batch else y != pad_id
        real = real & mask.reshape(mask.shape + (1,) * (y.ndim - mask.ndim)).astype(bool)
        # Labels under padding may be anything (-1, out of range): score a valid id there and
        # drop it with where, so padding never reaches the loss or its gradient.
        labels = jnp.where(real, y, 0).astype(jnp.int32)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        per_token = jnp.where(real, per_token, 0.0).astype(jnp.float32)
        return logits, labels, real, per_token

    def loss(params, batch, mask, key, *, train):
        _, _, real, per_token = tokens(params, batch, mask, train=train, key=key)
        return jnp.sum(per_token), jnp.sum(real.astype(jnp.float32))

    def evaluate(params, batch, mask):
        logits, labels, real, per_token = tokens(params, batch, mask, train=False, key=None)
        hit = (jnp.argmax(logits, axis=-1) == labels) & real
        axes = tuple(range(1, labels.ndim))
        return (
            jnp.sum(hit.astype(jnp.float32), axis=axes),
            jnp.sum(real.astype(jnp.float32), axis=axes),
            jnp.sum(per_token, axis=axes),
        )

    return Task(model=model, loss=loss, evaluate=evaluate, name="next_token")


TASKS: dict[str, Callable[..., Task]] = {
    "classification": classification_task,
    "next_token": next_token_task,
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str, model: Model, **kwargs: Any) -> Task:
    """Builds a registered task by name.

    Args:
      name: one of :data:`TASK_NAMES`.
      model: the model the task scores.
      **kwargs: options of that task's factory (``pad_id`` of ``next_token``).

    Returns:
      The task.

    Raises:
      ValueError: for an unknown name; the message lists the known ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    return TASKS[name](model, **kwargs)


def as_task(model_or_task: Model | Task) -> Task:
    """A :class:`Task` as is; a bare :class:`Model` as its :func:`classification_task`."""
    if isinstance(model_or_task, Task):
        return model_or_task
    if isinstance(model_or_task, Model):
        return classification_task(model_or_task)
    raise TypeError(f"expected a Model or a Task, got {type(model_or_task).__name__}")


def mean_loss_fn(task: Model | Task, *, train: bool = True) -> MeanLossFn:
    """The mean loss over a batch's real units, what local training differentiates.

    Args:
      task: a :class:`Task` (or a :class:`Model`, taken as classification).
      train: passed to the model (dropout on or off).

    Returns:
      ``(params, batch, mask, key) -> (loss_sum / max(weight, 1), weight)``, to use with
      ``jax.value_and_grad(..., has_aux=True)``; ``weight`` is the number of real units.
      For a model with 4-D parameters (convolution kernels), the loss is traced through
      ``models.rewrite.fast_gradients``: however the model is written, its stride-1 2-D
      convolutions and 2x2 max-pools get loop-friendly gradients (the same values; reverse
      mode only: ``jax.jvp``/``jax.jacfwd`` of such a loss raise, as of any custom VJP).
    """
    task = as_task(task)
    loss = functools.partial(task.loss, train=train)
    fast = fast_gradients(loss)

    def loss_fn(params, batch, mask, key):
        convolutional = any(getattr(p, "ndim", 0) == 4 for p in jax.tree.leaves(params))
        loss_sum, weight = (fast if convolutional else loss)(params, batch, mask, key)
        return loss_sum / jnp.maximum(weight, 1.0), weight

    return loss_fn

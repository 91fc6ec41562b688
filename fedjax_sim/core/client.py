"""Pure pieces of client work: masked losses and the local training loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_sim.core.types import Array, Params, PRNGKey, PyTree
from fedjax_sim.optimizers import optimizer_update

# (params, batch, mask, key) -> (mean loss over the batch's real units, their count); see
# ``core.task.mean_loss_fn``.
LossFn = Callable[[Params, dict, Array, PRNGKey], tuple[Array, Array]]


def gather_batch(examples: dict, index, mask, xp=jnp) -> dict:
    """``examples`` rows at ``index`` (any shape), zeros where ``mask`` is False.

    ``xp``: ``jax.numpy`` inside a compiled round, ``numpy`` on the host.
    """
    safe = xp.where(mask, index, 0)
    out = {}
    for k, a in examples.items():
        taken = xp.take(a, safe, axis=0)
        keep = mask.reshape(mask.shape + (1,) * (a.ndim - 1))
        out[k] = xp.where(keep, taken, xp.zeros((), a.dtype))
    return out


def step_batch(batches: dict, mask: Array, i, examples: dict | None = None) -> dict:
    """Local step ``i``'s batch: sliced from ``batches``, or, for a lazy cohort (``examples``
    given, ``batches = {"index": ...}``), gathered from the shared examples."""
    if examples is None:
        return jax.tree.map(lambda a: a[i], batches)
    return gather_batch(examples, batches["index"][i], mask[i])


def num_real_steps(mask: Array) -> Array:
    """Steps with at least one real example (packing puts them first)."""
    return jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.int32)


class LocalResult(NamedTuple):
    params: Params
    opt_state: PyTree
    loss_sum: Array  # sum over real units (examples or tokens) of the pre-step loss
    num_seen: Array  # real units seen


def local_train(
    params: Params,
    batches: dict,
    mask: Array,
    key: PRNGKey,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    grad_transform: Callable[[Params, Params], Params] | None = None,
    opt_state: PyTree | None = None,
    num_steps: Array | None = None,
    static_loop: bool = False,
    unroll: bool = False,
    examples: dict | None = None,
) -> LocalResult:
    """Runs a client's local steps; padded steps are skipped, not zero-stepped.

    A zero gradient is a no-op only for plain SGD (momentum or Adam would still move), so the
    loop runs exactly the client's real steps: ``lax.fori_loop`` up to its own step count.

    Args:
      params: starting parameters.
      batches: dict of ``[steps, batch, ...]`` arrays.
      mask: ``[steps, batch]`` example mask.
      key: the client's key for this round; step ``i`` uses ``fold_in(key, i)``.
      loss_fn: ``(params, batch, mask, key) -> (mean loss, number of real units)``
        (``core.task.mean_loss_fn``).
      optimizer: the client optimizer.
      grad_transform: optional ``(grads, params) -> grads`` (proximal terms, control variates).
      opt_state: optional starting optimizer state (default: ``optimizer.init(params)``).
      num_steps: optional step count (default: the real steps of ``mask``; stragglers pass less).
      static_loop: scan over every packed step and skip the padded ones with ``lax.cond``
        instead of looping to the client's own step count. Under ``vmap`` a dynamic loop
        becomes a batched while loop that selects the whole state every step (on CPU 16x
        slower for 1000 logistic-regression clients); a static scan slices its batches for
        free. Sequential execution wants the dynamic loop, which never visits padding.
      unroll: fully unroll the static loop (for a few local steps: saves the loop overhead).
      examples: the shared examples of a lazy cohort (``Cohort.examples``); ``batches`` is
        then ``{"index": [steps, batch]}`` and each step gathers its batch.

    Returns:
      A ``LocalResult``.
    """
    if opt_state is None:
        opt_state = optimizer.init(params)
    # Under shard_map, fresh optimizer counters must vary per device like the data.
    opt_state = match_vma(opt_state, mask)
    if num_steps is None:
        num_steps = num_real_steps(mask)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(i, carry):
        p, s, loss_sum, seen = carry
        batch = step_batch(batches, mask, i, examples)
        m = mask[i]
        (loss, n), grads = grad_fn(p, batch, m, jax.random.fold_in(key, i))
        if grad_transform is not None:
            grads = grad_transform(grads, p)
        updates, s = optimizer_update(optimizer, grads, s, p)
        p = optax.apply_updates(p, updates)
        return p, s, loss_sum + loss * n, seen + n

    zero = match_vma(jnp.zeros((), jnp.float32), mask)
    init = (params, opt_state, zero, zero)
    if not static_loop:
        return LocalResult(*lax.fori_loop(0, num_steps, body, init))

    def scan_body(carry, i):
        if unroll:  # a select is cheaper than a branch for a few unrolled steps
            new = body(i, carry)
            carry = jax.tree.map(lambda n, o: jnp.where(i < num_steps, n, o), new, carry)
        else:
            carry = lax.cond(i < num_steps, lambda c: body(i, c), lambda c: c, carry)
        return carry, None

    steps = match_vma(jnp.arange(mask.shape[0], dtype=jnp.int32), mask)
    return LocalResult(*lax.scan(scan_body, init, steps, unroll=unroll)[0])


def match_vma(tree: PyTree, like: Array) -> PyTree:
    """Marks ``tree`` as varying over the mesh axes ``like`` varies over (inside ``shard_map``).

    Loop carries must keep their type, so a zero that starts a sum of per-device values must
    already vary over the devices' axis; outside ``shard_map`` this is the identity.
    """
    vma = _varying_axes(like)
    if not vma:
        return tree

    def cast(a):
        missing = tuple(ax for ax in vma if ax not in _varying_axes(a))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def _varying_axes(x) -> tuple[str, ...]:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    vma = manual.varying if manual is not None else getattr(aval, "vma", ())
    return tuple(sorted(vma or ()))


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x - y, a, b)

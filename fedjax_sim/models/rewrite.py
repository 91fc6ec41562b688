"""Fast gradients for any model: its convolutions and max-pools rewritten where they are traced.

``model_from_linen`` gives a Flax Linen model the loop-friendly convolution and max-pool of the
built-in models (``conv.fast_convs``) by intercepting the layers. A model written any other way
(a hand-written ``fs.Model`` calling ``lax.conv_general_dilated``, a Linen module applied
without ``model_from_linen``, an NNX model) reaches XLA:CPU's naive convolution gradients inside
the round's loops (jax-ml/jax#12868: 10x slower per round for the EMNIST CNN) and
``reduce_window``'s slow max-pool gradient; so would Equinox's, whose NCHW convolutions this
does not cover. :func:`fast_gradients` works below the framework: it traces the function to a
jaxpr and evaluates that jaxpr with each covered ``conv_general_dilated`` (stride 1, undilated,
ungrouped, NHWC/HWIO) computed by ``conv.conv2d`` and each 2x2, stride-2, unpadded
``reduce_window_max`` by ``pool.max_pool_2x2``: the same values (the same forward operations),
the gradients of their custom VJPs (equal to float32 rounding, and bitwise for the pool). Nested
``jit`` calls holding such layers are inlined so they are reached too; everything else is bound
as traced, so layers inside ``jax.checkpoint``, ``scan``, ``cond`` or custom derivative rules
keep lax's (slow) gradients, with the same values. ``core.task.mean_loss_fn`` applies it to the
training loss of every model with 4-D parameters. What it cannot give: forward-mode derivatives
(``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) of the rewritten loss, as of any custom-VJP
function (reverse mode and ``jax.linearize`` work); and layer names in profiles of the rewritten
layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from fedjax_sim.models.conv import _unsupported, conv2d
from fedjax_sim.models.pool import max_pool_2x2

_POOL = {
    "window_dimensions": (1, 2, 2, 1),
    "window_strides": (1, 2, 2, 1),
    "padding": ((0, 0),) * 4,
    "base_dilation": (1, 1, 1, 1),
    "window_dilation": (1, 1, 1, 1),
}


def _conv_covered(eqn, lhs, rhs) -> bool:
    """Whether ``conv.conv2d`` computes this ``conv_general_dilated`` (arrays or avals)."""
    p = eqn.params
    if p.get("out_sharding") is not None or any(v < 0 for pair in p["padding"] for v in pair):
        return False
    return not _unsupported(
        lhs, rhs, p["window_strides"], lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"], dimension_numbers=p["dimension_numbers"],
        feature_group_count=p["feature_group_count"], batch_group_count=p["batch_group_count"],
        preferred_element_type=p["preferred_element_type"],
    )  # fmt: skip


def _pool_covered(eqn, x) -> bool:
    """Whether ``pool.max_pool_2x2`` computes this ``reduce_window_max`` (array or aval)."""
    return x.ndim == 4 and all(eqn.params[k] == v for k, v in _POOL.items())


def _fast_conv(eqn, lhs, rhs):
    return conv2d(
        lhs, rhs, tuple(map(tuple, eqn.params["padding"])), precision=eqn.params["precision"]
    )


def _fast_pool(eqn, x):
    del eqn
    return max_pool_2x2(x)


# primitive -> (whether an equation is covered, what computes it instead)
_REWRITES = {
    lax.conv_general_dilated_p: (_conv_covered, _fast_conv),
    lax.reduce_window_max_p: (_pool_covered, _fast_pool),
}
_INLINED = "jit"  # nested jit calls: inlined where they hold a covered equation


def _covered(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a jit call inside it) holds an equation worth rewriting."""
    for eqn in jaxpr.eqns:
        rule = _REWRITES.get(eqn.primitive)
        if rule is not None and rule[0](eqn, *(v.aval for v in eqn.invars)):
            return True
        if _inlined(eqn) is not None:
            return True
    return False


def _inlined(eqn):
    """The closed jaxpr of a jit call holding a covered equation (to inline), else None."""
    inner = eqn.params.get("jaxpr") if eqn.primitive.name == _INLINED else None
    return inner if inner is not None and _covered(inner.jaxpr) else None


def _evaluate(jaxpr, consts, args) -> list[Any]:
    """``jax.core.eval_jaxpr`` with the rewrites applied and jit calls inlined."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        out = None
        rule = _REWRITES.get(eqn.primitive)
        if rule is not None and rule[0](eqn, *invals):
            out = [rule[1](eqn, *invals)]
        elif (inner := _inlined(eqn)) is not None:
            out = _evaluate(inner.jaxpr, inner.consts, invals)
        if out is None:
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            out = out if eqn.primitive.multiple_results else [out]
        for var, val in zip(eqn.outvars, out, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def fast_gradients(fn: Callable) -> Callable:
    """``fn`` with its covered convolutions and 2x2 max-pools computed by the loop-friendly
    custom-VJP versions (see the module docstring): the same values, fast gradients inside
    ``lax`` loops on XLA:CPU. ``fn`` takes and returns pytrees of arrays; a function with
    nothing to rewrite is called as is (one extra trace to find that out, once per argument
    structure and shapes: remembered, since a wrong memory could only cost speed)."""
    nothing_to_rewrite: set = set()

    def wrapped(*args):
        leaves, tree = jax.tree.flatten(args)
        shapes_in = (tree, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
        if shapes_in in nothing_to_rewrite:
            return fn(*args)
        # A fresh function each call: make_jaxpr caches by the function's identity and the
        # arguments' shapes, and a cached jaxpr would hold the values ``fn`` closed over when
        # it was first traced (a frozen base from another program's trace, say).
        closed, shapes = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(*args)
        if not _covered(closed.jaxpr):
            nothing_to_rewrite.add(shapes_in)
            return fn(*args)
        flat = _evaluate(closed.jaxpr, closed.consts, leaves)
        return jax.tree.unflatten(jax.tree.structure(shapes), flat)

    return wrapped

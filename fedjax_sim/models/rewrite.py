"""Fast gradients for any model: its convolutions and max-pools rewritten where they are traced.

``model_from_linen`` gives a Flax Linen model the loop-friendly convolution and max-pool of the
built-in models (``conv.fast_convs``) by intercepting the layers. A model written any other way
(a hand-written ``fs.Model`` calling ``lax.conv_general_dilated``, a Linen module applied
without ``model_from_linen``, an NNX or Equinox model) reaches XLA:CPU's naive convolution
gradients inside the round's loops (jax-ml/jax#12868: 10x slower per round for the EMNIST CNN)
and ``reduce_window``'s slow max-pool gradient. :func:`fast_gradients` works below the
framework: it traces the function to a jaxpr and evaluates that jaxpr with each covered
``conv_general_dilated`` (2-D, stride 1, undilated, ungrouped, any layout) computed by
``conv.conv2d`` and each 2x2, stride-2, unpadded ``reduce_window_max`` over two dims of a 4-D
array by ``pool.max_pool_2x2``, channels-first operands (NCHW/OIHW) transposed to channels-last
and back: the same values (bitwise for NHWC layers and every pool; to float32 rounding for a
channels-first convolution, computed in another layout), the gradients of their custom VJPs
(equal to float32 rounding, and bitwise for the pool). Nested ``jit`` calls holding such layers
are inlined so they are reached too; everything else is bound as traced, so layers inside
``jax.checkpoint``, ``scan``, ``cond`` or custom derivative rules keep lax's (slow) gradients,
with the same values. ``core.task.mean_loss_fn`` applies it to the training loss of every model
with 4-D parameters. What it cannot give: forward-mode derivatives (``jax.jvp``, ``jax.jacfwd``,
``jax.hessian``) of the rewritten loss, as of any custom-VJP function (reverse mode and
``jax.linearize`` work); and layer names in profiles of the rewritten layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from fedjax_sim.models.conv import conv2d
from fedjax_sim.models.pool import max_pool_2x2


def _conv_covered(eqn, lhs, rhs) -> bool:
    """Whether ``conv.conv2d`` computes this ``conv_general_dilated`` (arrays or avals): a 2-D,
    stride-1, undilated, ungrouped convolution in any layout, without negative padding."""
    p = eqn.params
    ones = (*p["window_strides"], *p["lhs_dilation"], *p["rhs_dilation"])
    return (
        lhs.ndim == 4
        and rhs.ndim == 4
        and all(v == 1 for v in ones)
        and p["feature_group_count"] == 1
        and p["batch_group_count"] == 1
        and p["preferred_element_type"] is None
        and p.get("out_sharding") is None
        and all(v >= 0 for pair in p["padding"] for v in pair)
    )


def _pool_dims(eqn, x) -> tuple[int, int] | None:
    """The two dims of a 2x2, stride-2, unpadded, undilated ``reduce_window_max`` over a 4-D
    array (``(1, 2)`` for NHWC, ``(2, 3)`` for NCHW), else None."""
    p = eqn.params
    dims = tuple(i for i, w in enumerate(p["window_dimensions"]) if w != 1)
    plain = (
        x.ndim == 4
        and len(dims) == 2
        and all(p["window_dimensions"][i] == p["window_strides"][i] == 2 for i in dims)
        and all(p["window_strides"][i] == 1 for i in range(4) if i not in dims)
        and all(v == 0 for pair in p["padding"] for v in pair)
        and all(v == 1 for v in (*p["base_dilation"], *p["window_dilation"]))
    )
    return dims if plain else None


def _pool_covered(eqn, x) -> bool:
    """Whether ``pool.max_pool_2x2`` computes this ``reduce_window_max`` (array or aval)."""
    return _pool_dims(eqn, x) is not None


def _fast_conv(eqn, lhs, rhs):
    """``conv.conv2d`` in NHWC/HWIO, the operands and result transposed from and to the
    equation's layout (NCHW/OIHW, say) where it differs."""
    spec = eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = spec.lhs_spec, spec.rhs_spec, spec.out_spec
    x = _transposed(lhs, (lhs_spec[0], lhs_spec[2], lhs_spec[3], lhs_spec[1]))
    w = _transposed(rhs, (rhs_spec[2], rhs_spec[3], rhs_spec[1], rhs_spec[0]))
    padding = tuple(map(tuple, eqn.params["padding"]))  # in the spatial order of the specs
    y = conv2d(x, w, padding, precision=eqn.params["precision"])  # [N, H, W, O]
    return _transposed_back(y, (out_spec[0], out_spec[2], out_spec[3], out_spec[1]))


def _transposed(a, perm: tuple[int, ...]):
    return a if perm == tuple(range(a.ndim)) else jnp.transpose(a, perm)


def _transposed_back(a, perm: tuple[int, ...]):
    """The array whose ``_transposed(., perm)`` is ``a``."""
    return _transposed(a, tuple(int(i) for i in np.argsort(perm)))


def _fast_pool(eqn, x):
    """``pool.max_pool_2x2`` over the window's two dims, moved to 1 and 2 and back."""
    a, b = _pool_dims(eqn, x)
    rest = [i for i in range(4) if i not in (a, b)]
    perm = (rest[0], a, b, rest[1])
    return _transposed_back(max_pool_2x2(_transposed(x, perm)), perm)


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

"""2x2 max-pooling whose gradient stays cheap inside a round's loop on XLA:CPU.

``flax.linen.max_pool`` is ``lax.reduce_window``; its gradient under ``jax.grad`` is a
variadic reduce-window that carries the window's four iota indices beside the values, then a
gather and a scatter. In a profile of a ``cnn_emnist`` round on the 2-core CPU (docs/
performance.md, "Where a CNN round's time goes") that machinery took about a quarter of the
round's op time. :func:`max_pool_2x2` computes the same values as a reshape and a max, and the
same gradient (to the first maximum of each window in row-major order, as lax's
select-and-scatter sends it) with a custom VJP of a few elementwise operations. One exception:
a window holding a NaN gets no gradient here (lax sends it somewhere in the window); such a
step's loss is NaN already, which the driver reports as divergence.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

LAX_MAX_POOL = nn.pooling.max_pool  # Flax's own, whatever fast_convs() swaps in meanwhile


def _windows(x: jax.Array) -> jax.Array:
    """``[b, h, w, c]`` -> ``[b, h // 2, 2, w // 2, 2, c]`` (an odd last row or column is
    dropped, as VALID pooling drops it)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """``flax.linen.max_pool(x, (2, 2), strides=(2, 2))`` (VALID) for NHWC ``x``: the same
    values, and the same gradient (each window's first maximum in row-major order gets it)."""
    return jnp.max(_windows(x), axis=(2, 4))


def _fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _bwd(res, g):
    x, y = res
    win = _windows(x)
    taken = jnp.zeros(y.shape, bool)
    rows = []
    for i in (0, 1):
        cols = []
        for j in (0, 1):
            first = (win[:, :, i, :, j] == y) & ~taken
            taken = taken | first
            cols.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
        rows.append(jnp.stack(cols, axis=3))  # [b, h2, w2, 2(j), c]
    grad = jnp.stack(rows, axis=2)  # [b, h2, 2(i), w2, 2(j), c]
    b, h, w, c = x.shape
    grad = grad.reshape(b, h // 2 * 2, w // 2 * 2, c)
    if grad.shape != x.shape:
        grad = jnp.pad(grad, ((0, 0), (0, h - grad.shape[1]), (0, w - grad.shape[2]), (0, 0)))
    return (grad,)


max_pool_2x2.defvjp(_fwd, _bwd)


def max_pool_or_lax(inputs, window_shape, strides=None, padding="VALID"):
    """``flax.linen.max_pool(inputs, window_shape, strides, padding)``, through
    :func:`max_pool_2x2` where that covers the call (2x2 windows, stride 2, VALID, NHWC): the
    same values and gradients either way."""
    covered = (
        tuple(window_shape) == (2, 2)
        and strides is not None
        and tuple(strides) == (2, 2)
        and padding == "VALID"
        and inputs.ndim == 4
    )
    if covered:
        return max_pool_2x2(inputs)
    return LAX_MAX_POOL(inputs, window_shape, strides=strides, padding=padding)

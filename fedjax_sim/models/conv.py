"""A stride-1 2-D convolution whose gradients stay fast inside loops on XLA:CPU.

Inside a ``lax.scan`` / ``while`` body, XLA:CPU keeps the convolutions that autodiff emits for
the input and kernel gradients in non-canonical layouts and falls back to a naive kernel,
20-60x slower than outside a loop (jax-ml/jax#12868). :func:`conv2d` has a custom VJP that
computes the forward pass and both gradients with ``lax.conv_general_dilated`` in the
canonical NHWC/HWIO layout, with explicit transposes of the operands, which restores full
speed and gives the same values.

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` that Flax's
``linen.Conv(conv_general_dilated=...)`` accepts; :func:`conv` builds such a layer (plain lax
convolution for strided layers, which the custom VJP does not cover). :func:`fast_convs` gives
every plain ``linen.Conv`` of a user's model the same (:func:`conv_or_lax`: the custom VJP
where it covers the layer, lax elsewhere); ``models.model_from_linen`` applies models in it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(lhs: Array, rhs: Array, padding: Padding, precision: Any) -> Array:
    return lax.conv_general_dilated(
        lhs, rhs, (1, 1), padding, dimension_numbers=_NHWC, precision=precision
    )


def _rows_product(a: Array, b: Array, precision: Any) -> Array:
    """``a^T b`` for ``a`` ``[K, M]`` and ``b`` ``[K, N]``: both operands contracted over their
    rows, as the kernel gradient's patches and output gradient are.

    XLA:CPU's single-threaded matmul runs such a product about twice as fast when its result
    has at least as many columns as rows (one core, ``K`` = 4,608: ``[288, 64]`` 3.0 ms
    against 1.7 ms for ``[64, 288]``; ``K`` = 5,408: ``[32, 9]`` 0.36 against 0.17 ms for
    ``[9, 32]``; with two threads the orientations were within 10%), and the round's
    per-core devices run it on one thread. So the wide orientation is computed and transposed
    (the kernel's values: 18,432 for the 32 -> 64 conv); the barrier keeps XLA from folding
    that transpose back into the matmul, which it otherwise does. A whole ``cnn_emnist`` SGD
    step on one core (batch 8): 14.5-15.4 -> 12.5-13.3 ms. Measured on XLA:CPU only; the
    choice is made on every backend (on a GPU the transpose of the kernel is negligible).
    """
    rows = (((0,), (0,)), ((), ()))
    if a.shape[1] <= b.shape[1]:
        return lax.dot_general(a, b, rows, precision=precision)
    if isinstance(precision, (tuple, list)):  # (lhs, rhs): the operands swap below
        precision = tuple(precision)[::-1]
    return lax.optimization_barrier(lax.dot_general(b, a, rows, precision=precision)).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x: Array, w: Array, padding: Padding, precision: Any) -> Array:
    return _conv(x, w, padding, precision)


def _conv2d_fwd(x, w, padding, precision):
    return _conv(x, w, padding, precision), (x, w)


def _conv2d_bwd(padding, precision, res, dy):
    x, w = res
    kh, kw = w.shape[0], w.shape[1]
    (ph_lo, ph_hi), (pw_lo, pw_hi) = padding
    # Input gradient: full correlation of dy with the spatially flipped kernel, I and O swapped.
    # Pads wider than k - 1 make these pads negative; XLA:CPU mishandles negative conv padding
    # (wrong values), so pad by at least zero and crop the surplus rows/columns instead.
    w_flip = w[::-1, ::-1].transpose(0, 1, 3, 2)  # [kh, kw, O, I]
    dx_pad = ((kh - 1 - ph_lo, kh - 1 - ph_hi), (kw - 1 - pw_lo, kw - 1 - pw_hi))
    dx = _conv(dy, w_flip, tuple((max(lo, 0), max(hi, 0)) for lo, hi in dx_pad), precision)
    top, left = max(-dx_pad[0][0], 0), max(-dx_pad[1][0], 0)
    dx = dx[:, top : top + x.shape[1], left : left + x.shape[2], :]
    # Kernel gradient as one matmul over the input's patches (im2col): patches [N Ho Wo,
    # kh kw C] contracted with dy [N Ho Wo, O] over their rows. As a convolution with the
    # batch contracted (x read as [C, H, W, N]) it ran 3.8x slower for a client batch of 8
    # (scripts/profile_cnn.py).
    xp = jnp.pad(x, ((0, 0), (ph_lo, ph_hi), (pw_lo, pw_hi), (0, 0)))
    ho, wo, c, o = dy.shape[1], dy.shape[2], x.shape[3], dy.shape[3]
    patches = jnp.concatenate(
        [xp[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    dw = _rows_product(patches.reshape(-1, kh * kw * c), dy.reshape(-1, o), precision)
    dw = dw.reshape(kh, kw, c, o)  # [kh, kw, I, O]
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def resolve_padding(
    padding: str | Sequence[tuple[int, int]],
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
) -> Padding:
    """Explicit ``((top, bottom), (left, right))`` pads of a stride-1 2-D convolution.

    Args:
      padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or two ``(lo, hi)`` pairs.
      input_hw: spatial size of the input, ``(H, W)``.
      kernel_hw: spatial size of the kernel, ``(kh, kw)``.

    Returns:
      Two ``(lo, hi)`` pairs of non-negative Python ints.
    """
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(tuple(input_hw), tuple(kernel_hw), (1, 1), padding)
    else:
        pads = [tuple(p) for p in padding]
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        raise ValueError(f"expected padding for 2 spatial dimensions, got {padding!r}")
    (a, b), (c, d) = pads
    resolved = ((int(a), int(b)), (int(c), int(d)))
    if min(a, b, c, d) < 0:
        raise ValueError(f"negative padding {resolved} is not supported")
    return resolved


def conv2d(
    x: Array,
    w: Array,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    *,
    precision: Any = None,
) -> Array:
    """Stride-1 2-D convolution with a loop-friendly custom VJP.

    Args:
      x: input ``[N, H, W, C]``.
      w: kernel ``[kh, kw, C, O]``.
      padding: ``'SAME'``, ``'VALID'`` or ``((top, bottom), (left, right))``.
      precision: passed to ``lax.conv_general_dilated``.

    Returns:
      ``[N, Ho, Wo, O]``, equal to ``lax.conv_general_dilated`` with NHWC/HWIO dimension numbers;
      its input and kernel gradients are also computed in the canonical layout.
    """
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(
            f"conv2d expects x [N,H,W,C] and w [kh,kw,C,O], got shapes {x.shape} and {w.shape}"
        )
    if x.shape[3] != w.shape[2]:
        raise ValueError(
            f"conv2d: input has {x.shape[3]} channels but the kernel expects {w.shape[2]} "
            "(grouped convolutions are not supported)"
        )
    pads = resolve_padding(padding, x.shape[1:3], w.shape[0:2])
    return _conv2d(x, w, pads, precision)


def _all_ones(value: int | Sequence[int] | None) -> bool:
    if value is None:
        return True
    if isinstance(value, int):
        return value == 1
    return all(v == 1 for v in value)


def _unsupported(
    lhs, rhs, window_strides, *, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
    feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None,
) -> list[str]:  # fmt: skip
    """Why :func:`conv2d` does not cover a ``lax.conv_general_dilated`` call (``[]``: it does)."""
    unsupported = []
    if lhs.ndim != 4 or rhs.ndim != 4:
        unsupported.append(
            f"only 2-D convolutions (lhs/rhs of rank 4), got ranks {lhs.ndim}/{rhs.ndim}"
        )
    if not _all_ones(window_strides):
        unsupported.append(f"window_strides={tuple(window_strides)} (only stride 1)")
    if not _all_ones(lhs_dilation):
        unsupported.append(f"lhs_dilation={tuple(lhs_dilation)} (only 1)")
    if not _all_ones(rhs_dilation):
        unsupported.append(f"rhs_dilation={tuple(rhs_dilation)} (only 1)")
    if feature_group_count != 1:
        unsupported.append(f"feature_group_count={feature_group_count} (only 1)")
    if batch_group_count != 1:
        unsupported.append(f"batch_group_count={batch_group_count} (only 1)")
    if preferred_element_type is not None:
        unsupported.append(f"preferred_element_type={preferred_element_type} (only None)")
    if not unsupported:
        if dimension_numbers is None:
            unsupported.append("dimension_numbers=None (lax default NCHW); pass NHWC/HWIO/NHWC")
        else:
            want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
            got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            if got != want:
                unsupported.append(f"dimension_numbers={dimension_numbers} (only NHWC/HWIO/NHWC)")
    return unsupported


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """Drop-in for ``lax.conv_general_dilated`` covering the stride-1 NHWC/HWIO 2-D case.

    Use as ``flax.linen.Conv(..., conv_general_dilated=conv_general_dilated)``. Anything
    outside that case (strides, dilations, groups, other layouts, ``preferred_element_type``)
    raises ``ValueError`` rather than silently taking the slow path; use plain
    ``lax.conv_general_dilated`` for those layers.

    Returns:
      The same value as ``lax.conv_general_dilated``; gradients via :func:`conv2d`.
    """
    unsupported = _unsupported(
        lhs, rhs, window_strides, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, preferred_element_type=preferred_element_type,
    )  # fmt: skip
    if unsupported:
        raise ValueError(
            "fedjax_sim.models.conv.conv_general_dilated supports only stride-1, undilated, "
            "ungrouped NHWC/HWIO 2-D convolutions; unsupported: "
            + "; ".join(unsupported)
            + ". Use lax.conv_general_dilated for this layer."
        )
    return conv2d(lhs, rhs, padding, precision=precision)


def conv_or_lax(lhs: Array, rhs: Array, window_strides, padding, **kwargs) -> Array:
    """``lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)``, through
    :func:`conv2d` where that covers the call (the stride-1 NHWC/HWIO 2-D case): the same
    value either way, fast gradients in loops where covered."""
    negative = not isinstance(padding, str) and any(p < 0 for pair in padding for p in pair)
    if negative or _unsupported(lhs, rhs, window_strides, **kwargs):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    return conv2d(lhs, rhs, padding, precision=kwargs.get("precision"))


def _use_conv_or_lax(next_fun, args, kwargs, context):
    module = context.module
    plain = (
        context.method_name == "__call__"
        and isinstance(module, nn.Conv)
        and module.conv_general_dilated is None
        and module.conv_general_dilated_cls is None
    )
    if not plain:
        return next_fun(*args, **kwargs)
    # Flax modules are frozen dataclasses; the layer reads the field when called.
    object.__setattr__(module, "conv_general_dilated", conv_or_lax)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "conv_general_dilated", None)


@contextlib.contextmanager
def fast_convs():
    """Within it, every ``flax.linen.Conv`` called that uses lax's convolution (it names no
    ``conv_general_dilated`` of its own) computes through :func:`conv_or_lax`, and
    ``flax.linen.max_pool`` (looked up as ``nn.max_pool`` when called) through
    ``pool.max_pool_or_lax``: a user's plain Flax CNN gets the loop-friendly gradients the
    built-in models have. ``models.model_from_linen``'s ``apply`` runs inside it. The pooling
    swap is process-wide while it lasts: Flax code tracing in another thread meanwhile gets the
    same values and reverse-mode gradients, but the custom VJP has no forward-mode rule
    (``jax.jvp`` of ``nn.max_pool`` there fails)."""
    from fedjax_sim.models import pool

    swapped = [m for m in (nn, nn.pooling) if m.max_pool is pool.LAX_MAX_POOL]
    for m in swapped:
        m.max_pool = pool.max_pool_or_lax
    try:
        with nn.intercept_methods(_use_conv_or_lax):
            yield
    finally:
        for m in swapped:
            m.max_pool = pool.LAX_MAX_POOL


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    use_bias: bool = True,
    name: str | None = None,
) -> nn.Conv:
    """A ``flax.linen.Conv`` that uses :func:`conv_general_dilated` when its stride is 1.

    Call inside a ``@nn.compact`` method. Strided layers use plain ``lax.conv_general_dilated``.

    Args:
      features: output channels.
      kernel_size: ``k`` or ``(kh, kw)``.
      strides: ``s`` or ``(sh, sw)``.
      padding: ``'SAME'``, ``'VALID'`` or ``((top, bottom), (left, right))``.
      use_bias: whether to add a bias.
      name: optional submodule name.

    Returns:
      The Flax module (float32 parameters and computation).
    """
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    if isinstance(strides, int):
        strides = (strides, strides)
    fast = _all_ones(strides)
    return nn.Conv(
        features,
        tuple(kernel_size),
        strides=tuple(strides),
        padding=padding,
        use_bias=use_bias,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        conv_general_dilated=conv_general_dilated if fast else None,
        name=name,
    )

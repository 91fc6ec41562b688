"""Update compression: quantization, sparsification, error feedback and signSGD, per client.

Every compressor is a pure, jittable function of one client's update (any pytree, treated as
one flat vector via ``ravel_pytree``) and, where it is random, an explicit key; it returns the
*decoded* update (what the server reconstructs) in the update's structure and dtypes, which is
what a simulation needs. The bits a client would send are counted separately
(``bits_per_update``), with the simple encodings documented per method.

* ``stochastic_quantize``: QSGD (Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via
  Gradient Quantization and Encoding"), unbiased.
* ``uniform_quantize``: ``2^bits`` levels between the vector's min and max, stochastic
  rounding, unbiased.
* ``top_k`` / ``random_k``: sparsification (Stich et al. 2018, "Sparsified SGD with Memory").
* ``with_error_feedback``: EF-SGD (Stich et al. 2018; Karimireddy et al. 2019, "Error Feedback
  Fixes SignSGD and other Gradient Compression Schemes").
* ``sign_compress`` / ``majority_vote``: signSGD with majority vote (Bernstein et al. 2018,
  "signSGD: Compressed Optimisation for Non-Convex Problems").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_sim.aggregators.base import Aggregator
from fedjax_sim.aggregators.transforms import AggregationTransform, client_map
from fedjax_sim.core.types import Array, PRNGKey, PyTree

ErrorFeedback = Callable[[PyTree, PyTree, PRNGKey], tuple[PyTree, PyTree]]

FLOAT_BITS = 32
SEED_BITS = 64  # a PRNG seed from which the server regenerates random-k's indices


class Compressor(NamedTuple):
    """A compressor and what it costs: called as ``compressor(update, key) -> decoded update``;
    ``bits(d)`` is what one client sends for a ``d``-number update (``bits_per_update``), the
    number the run's bytes report (``Pipeline.upload_bytes``)."""

    apply: Callable[[PyTree, PRNGKey], PyTree]
    bits: Callable[[int], int]

    def __call__(self, update: PyTree, key: PRNGKey) -> PyTree:
        return self.apply(update, key)


def _validate_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"compression ratio must be in (0, 1], got {ratio}.")


def _validate_levels(levels: int) -> None:
    if not (isinstance(levels, int) and levels >= 1):
        raise ValueError(f"quantization levels must be an integer >= 1, got {levels}.")


def _validate_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 32):
        raise ValueError(f"quantization bits must be an integer in [1, 32], got {bits}.")


def _flat(x: PyTree):
    """``x`` as one float32 vector, and the function that restores its structure and dtypes."""
    v, unravel_f32 = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), x))

    def unravel(flat):
        return jax.tree.map(lambda a, ref: a.astype(jnp.asarray(ref).dtype), unravel_f32(flat), x)

    return v, unravel


def _stochastic_round(t: Array, key: PRNGKey) -> Array:
    # floor(t) + Bernoulli(t - floor(t)): E = t.
    low = jnp.floor(t)
    up = jax.random.uniform(key, t.shape, jnp.float32) < t - low
    return low + up.astype(jnp.float32)


def num_kept(d: int, ratio: float) -> int:
    """``k = max(1, round(ratio * d))`` (Python's ``round``), the sparsifiers' static size."""
    _validate_ratio(ratio)
    return max(1, int(round(ratio * d)))


def stochastic_quantize(x: PyTree, key: PRNGKey, levels: int) -> PyTree:
    """QSGD's ``Q_s`` (Alistarh et al. 2017, Section 3.1), unbiased.

    ``Q_s(v)_i = ||v||_2 * sign(v_i) * xi_i / s`` where ``xi_i`` is ``|v_i| / ||v||_2 * s``
    rounded stochastically to an integer in ``[0, s]``: ``E[Q_s(v)] = v``.

    Args:
      x: a client's update (pytree).
      key: PRNG key of the rounding.
      levels: ``s >= 1``.

    Returns:
      The decoded quantized update, ``x``'s structure and dtypes (zeros for a zero update).
    """
    _validate_levels(levels)
    v, unravel = _flat(x)
    norm = jnp.linalg.norm(v)
    safe = jnp.where(norm > 0, norm, 1.0)
    xi = _stochastic_round(jnp.abs(v) / safe * levels, key)
    return unravel(norm * jnp.sign(v) * xi / levels)


def bits_qsgd(d: int, levels: int) -> int:
    """QSGD's bits with a plain fixed-width code: 32 for the norm plus, per coordinate,
    ``ceil(log2(levels + 1))`` for the level in ``[0, s]`` and 1 sign bit (no Elias coding)."""
    _validate_levels(levels)
    return FLOAT_BITS + d * (math.ceil(math.log2(levels + 1)) + 1)


def uniform_quantize(x: PyTree, key: PRNGKey, bits: int) -> PyTree:
    """``2^bits`` evenly spaced levels between the vector's min and max, stochastic rounding.

    Unbiased given the min and max (sent as two float32). Above 24 bits the grid is finer than
    float32 resolves, so the result is then (nearly) ``x`` itself.

    Args:
      x: a client's update (pytree).
      key: PRNG key of the rounding.
      bits: ``1 <= bits <= 32``.

    Returns:
      The decoded quantized update, ``x``'s structure and dtypes (``x`` when it is constant).
    """
    _validate_bits(bits)
    v, unravel = _flat(x)
    lo, hi = jnp.min(v), jnp.max(v)
    span = hi - lo
    top = float(2**bits - 1)
    step = jnp.where(span > 0, span / top, 1.0)
    q = jnp.clip(_stochastic_round((v - lo) / step, key), 0.0, top)
    return unravel(jnp.where(span > 0, lo + q * step, v))


def bits_uniform(d: int, bits: int) -> int:
    """Uniform quantization's bits: the min and max (2 x 32) plus ``bits`` per coordinate."""
    _validate_bits(bits)
    return 2 * FLOAT_BITS + d * bits


def top_k(x: PyTree, ratio: float) -> PyTree:
    """Keeps the ``k = max(1, round(ratio * d))`` largest-magnitude coordinates of the whole
    update (all leaves together), zeroing the rest; ties go to the lower flat index.

    Args:
      x: a client's update (pytree).
      ratio: kept fraction, in ``(0, 1]``.

    Returns:
      The sparsified update, ``x``'s structure and dtypes.
    """
    v, unravel = _flat(x)
    k = num_kept(v.shape[0], ratio)
    _, idx = jax.lax.top_k(jnp.abs(v), k)
    return unravel(jnp.zeros_like(v).at[idx].set(v[idx]))


def random_k(x: PyTree, key: PRNGKey, ratio: float, unbiased: bool = False) -> PyTree:
    """Keeps ``k = max(1, round(ratio * d))`` coordinates drawn uniformly without replacement.

    Args:
      x: a client's update (pytree).
      key: PRNG key of the draw (the server regenerates the indices from its seed).
      ratio: kept fraction, in ``(0, 1]``.
      unbiased: scale the kept values by ``d / k`` so that ``E[random_k(x)] = x``.

    Returns:
      The sparsified update, ``x``'s structure and dtypes.
    """
    v, unravel = _flat(x)
    d = v.shape[0]
    k = num_kept(d, ratio)
    idx = jax.random.choice(key, d, (k,), replace=False)
    kept = v[idx] * (d / k) if unbiased else v[idx]
    return unravel(jnp.zeros_like(v).at[idx].set(kept))


def bits_top_k(d: int, ratio: float) -> int:
    """Top-k's bits: ``k`` float32 values plus ``k`` indices of ``ceil(log2 d)`` bits."""
    return num_kept(d, ratio) * (FLOAT_BITS + _index_bits(d))


def bits_random_k(d: int, ratio: float) -> int:
    """Random-k's bits: ``k`` float32 values plus a 64-bit seed for the indices."""
    return num_kept(d, ratio) * FLOAT_BITS + SEED_BITS


def _index_bits(d: int) -> int:
    return (d - 1).bit_length()  # ceil(log2 d), exactly, for d >= 1


def with_error_feedback(compress_fn: Callable[[PyTree, PRNGKey], PyTree]) -> ErrorFeedback:
    """EF-SGD's error feedback around a compressor (Stich et al. 2018; Karimireddy et al. 2019,
    Algorithm 2).

    ``corrected = update + residual``, ``compressed = C(corrected)``, ``new_residual =
    corrected - compressed``: what compression dropped is sent in later rounds, so the sum of
    everything sent plus the final residual equals the sum of the updates. The residual is
    per-client state the driver keeps (start from ``jax.tree.map(jnp.zeros_like, params)``).

    Args:
      compress_fn: ``(update, key) -> compressed`` (wrap keyless ones: ``lambda u, k:
        top_k(u, 0.1)``).

    Returns:
      ``(update, residual, key) -> (compressed, new_residual)``.
    """

    def compress(update, residual, key):
        corrected = jax.tree.map(jnp.add, update, residual)
        compressed = compress_fn(corrected, key)
        return compressed, jax.tree.map(jnp.subtract, corrected, compressed)

    return compress


def sign_compress(x: PyTree) -> PyTree:
    """signSGD's compressor (Bernstein et al. 2018, Algorithm 1): ``+1`` where ``x >= 0``, else
    ``-1`` (one bit per coordinate, so 0 is sent as ``+1``), in ``x``'s structure and dtypes."""
    return jax.tree.map(lambda a: jnp.where(a >= 0, 1, -1).astype(a.dtype), x)


def majority_vote(signs: PyTree, weights: Array) -> PyTree:
    """signSGD with majority vote (Bernstein et al. 2018, Algorithm 3): the sign of the sum of
    the real clients' (``weights > 0``) signs, one vote each; a tie gives 0.

    Args:
      signs: pytree of stacked client signs (leading axis = clients), from ``sign_compress``.
      weights: ``[clients]``; padded clients (weight 0) do not vote.

    Returns:
      ``signs``' structure without the client axis, entries in ``{-1, 0, 1}``.
    """
    real = weights > 0

    def vote(s):
        r = real.reshape((-1,) + (1,) * (s.ndim - 1))
        total = jnp.sum(jnp.where(r, jnp.sign(s).astype(jnp.int32), 0), axis=0)
        return jnp.sign(total).astype(s.dtype)

    return jax.tree.map(vote, signs)


def majority_vote_aggregator():
    """``majority_vote`` as an ``Aggregator`` (config ``aggregator = "majority_vote"``): the
    server's step direction is the coordinate-wise vote of the clients' update signs (use it
    with ``compression.method = "sign"``, so each client uploads one bit per coordinate, and a
    small server learning rate: every coordinate moves by the full server rate)."""

    def apply(state, updates, weights, key):
        del key
        return majority_vote(updates, weights), state

    return Aggregator(init=lambda params: (), apply=apply)


def bits_per_update(method: str, d: int, **params) -> int:
    """Bits one client sends for a ``d``-parameter update compressed with ``method``.

    Methods and their parameters: ``none`` (32 per coordinate), ``qsgd`` (``levels``),
    ``uniform`` (``bits``), ``top_k`` (``ratio``), ``random_k`` (``ratio``), ``sign`` (1 per
    coordinate). See ``bits_qsgd``, ``bits_uniform``, ``bits_top_k`` and ``bits_random_k``.

    Raises:
      ValueError: for an unknown method (listing the known ones) or bad parameters.
    """
    counters = {
        "none": lambda: FLOAT_BITS * d,
        "qsgd": lambda: bits_qsgd(d, params["levels"]),
        "uniform": lambda: bits_uniform(d, params["bits"]),
        "top_k": lambda: bits_top_k(d, params["ratio"]),
        "random_k": lambda: bits_random_k(d, params["ratio"]),
        "sign": lambda: d,
    }
    if method not in counters:
        raise ValueError(f"unknown compression {method!r}; known: {', '.join(sorted(counters))}.")
    _check_required(method, params)
    return counters[method]()


def compressor(method: str, **params) -> Compressor:
    """The ``Compressor`` named ``method`` (as in ``bits_per_update``; ``random_k`` also takes
    ``unbiased``), with its parameters validated now and its bit count."""
    builders = {
        "none": lambda: lambda x, key: x,
        "qsgd": lambda: _checked(
            _validate_levels, params["levels"], lambda x, k: stochastic_quantize(x, k, **params)
        ),
        "uniform": lambda: _checked(
            _validate_bits, params["bits"], lambda x, k: uniform_quantize(x, k, **params)
        ),
        "top_k": lambda: _checked(
            _validate_ratio, params["ratio"], lambda x, k: top_k(x, params["ratio"])
        ),
        "random_k": lambda: _checked(
            _validate_ratio, params["ratio"], lambda x, k: random_k(x, k, **params)
        ),
        "sign": lambda: lambda x, key: sign_compress(x),
    }
    if method not in builders:
        raise ValueError(f"unknown compression {method!r}; known: {', '.join(sorted(builders))}.")
    _check_required(method, params)
    return Compressor(builders[method](), lambda d: bits_per_update(method, d, **params))


REQUIRED = {"qsgd": "levels", "uniform": "bits", "top_k": "ratio", "random_k": "ratio"}


def _check_required(method: str, params) -> None:
    need = REQUIRED.get(method)
    if need is not None and need not in params:
        raise ValueError(
            f"compression {method!r} needs its parameter {need!r}: set "
            f"compression.kwargs.{need} (got {sorted(params) or 'none'})."
        )


def _checked(validate, value, fn):
    validate(value)
    return fn


def compress_updates(method: str, **params) -> AggregationTransform:
    """A client-stage ``AggregationTransform`` applying ``compressor(method, **params)`` to each
    client's update with its update key (stateless: no error feedback, whose residuals are
    per-client state for the driver to keep); its ``upload_bits`` are the compressor's."""
    compress = compressor(method, **params)
    return client_map(compress)._replace(upload_bits=compress.bits)

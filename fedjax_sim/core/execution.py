"""Client execution strategies: how a round maps per-client work over the cohort.

Every strategy runs inside the one compiled round and gives the same result up to float
summation order:

- ``vmap``: all clients at once (``jax.vmap``).
- ``chunked``: ``jax.vmap`` over chunks of ``chunk_size`` clients, ``lax.scan`` over chunks.
- ``sequential``: ``lax.map`` over clients, one at a time.
- ``auto``: picks one of the above for the platform, model and cohort size from the table
  measured by ``scripts/bench.py`` (see ``resolve_strategy``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim.core.client import match_vma
from fedjax_sim.core.types import PyTree

STRATEGIES = ("auto", "vmap", "chunked", "sequential")


def has_convolution(params: PyTree) -> bool:
    """True when some parameter is a 4-D (convolution) kernel."""
    return any(getattr(leaf, "ndim", 0) == 4 for leaf in jax.tree.leaves(params))


def resolve_strategy(
    strategy: str,
    *,
    params: PyTree,
    num_clients: int,
    platform: str | None = None,
) -> str:
    """Turns ``auto`` into a concrete strategy; checks the name otherwise.

    Args:
      strategy: a name from ``STRATEGIES``.
      params: the model params (``auto`` looks for convolution kernels).
      num_clients: the cohort size.
      platform: ``cpu``, ``gpu``, ``tpu``; default: JAX's default backend.

    The ``auto`` rule comes from measurements (``scripts/bench.py``, README "Performance",
    and ../shared/PERF_NOTES.md):

    - CPU: ``sequential``. On the 2-core CPU it was the fastest strategy for every model and
      cohort measured (logistic regression, the 2NN and the EMNIST CNN; 10 to 1000 clients):
      vmapped per-client convolutions become grouped convolutions, vmapped dense layers become
      batched small matmuls over ``clients x params`` of memory, and in ragged cohorts every
      vmapped client runs the longest client's local loop (FedAvg on Synthetic(1,1): 173
      ms/round sequential, 525 ms/round vmapped).
    - GPU/TPU: ``vmap``, expected to fill the accelerator (not yet measured on one: run
      ``scripts/bench.py`` there and pass ``strategy`` explicitly if it disagrees).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown client strategy {strategy!r}; known: {', '.join(STRATEGIES)}.")
    if strategy != "auto":
        return strategy
    platform = platform or jax.default_backend()
    return "sequential" if platform == "cpu" else "vmap"


def map_clients(
    fn: Callable[[PyTree], PyTree],
    per_client: PyTree,
    *,
    strategy: str,
    chunk_size: int = 10,
    reduce_sum: bool = False,
) -> PyTree:
    """Applies ``fn`` to every client's slice of ``per_client`` (leading axis = clients).

    Args:
      fn: per-client function; closes over anything shared (server params, broadcasts).
        With ``reduce_sum`` it returns ``(to_sum, to_stack)``.
      per_client: pytree whose leaves have the cohort on axis 0.
      strategy: ``vmap``, ``chunked`` or ``sequential`` (resolve ``auto`` first).
      chunk_size: clients per chunk for ``chunked``.
      reduce_sum: sum the first output over clients inside the loop instead of stacking it.
        Stacking model-sized outputs for a large cohort in a scan costs superlinear time and
        ``clients x params`` memory; a running sum costs neither.

    Returns:
      ``fn``'s outputs stacked over clients, or ``(sum over clients, stacked)``.
    """
    if strategy not in STRATEGIES or strategy == "auto":
        raise ValueError(
            f"unknown client strategy {strategy!r}; known: {', '.join(STRATEGIES[1:])} "
            "(resolve 'auto' with resolve_strategy first)."
        )
    if strategy == "chunked" and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if not reduce_sum:
        if strategy == "vmap":
            return jax.vmap(fn)(per_client)
        if strategy == "sequential":
            return lax.map(fn, per_client)
        return lax.map(fn, per_client, batch_size=chunk_size)

    if strategy == "vmap":
        summed, stacked = jax.vmap(fn)(per_client)
        return jax.tree.map(lambda a: jnp.sum(a, axis=0), summed), stacked

    first = jax.tree.map(lambda a: a[0], per_client)
    sum_shape = jax.eval_shape(fn, first)[0]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shape)
    # Inside shard_map the running sum varies per device like the inputs do.
    zeros = match_vma(zeros, jax.tree.leaves(per_client)[0])
    add = lambda a, b: jax.tree.map(jnp.add, a, b)

    if strategy == "sequential":

        def body(total, x):
            summed, stacked = fn(x)
            return add(total, summed), stacked

        return lax.scan(body, zeros, per_client)

    # chunked: pad the cohort to whole chunks by repeating client 0, and mask the repeats out.
    num = jax.tree.leaves(per_client)[0].shape[0]
    k = min(chunk_size, num)
    chunks = -(-num // k)
    pad = chunks * k - num
    valid = jnp.arange(chunks * k) < num

    def to_chunks(a):
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)])
        return a.reshape((chunks, k) + a.shape[1:])

    def body(total, xs):
        inputs, ok = xs
        summed, stacked = jax.vmap(fn)(inputs)
        summed = jax.tree.map(
            lambda a: jnp.sum(jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0), 0),
            summed,
        )
        return add(total, summed), stacked

    total, stacked = lax.scan(
        body, zeros, (jax.tree.map(to_chunks, per_client), valid.reshape(chunks, k))
    )
    stacked = jax.tree.map(lambda a: a.reshape((chunks * k,) + a.shape[2:])[:num], stacked)
    return total, stacked

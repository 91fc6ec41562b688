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
from jax import lax

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
    step_fill: float = 1.0,
) -> str:
    """Turns ``auto`` into a concrete strategy; checks the name otherwise.

    Args:
      strategy: a name from ``STRATEGIES``.
      params: the model params (``auto`` looks for convolution kernels).
      num_clients: the cohort size.
      platform: ``cpu``, ``gpu``, ``tpu``; default: JAX's default backend.
      step_fill: mean real local steps over padded local steps across clients (1.0 when all
        clients have the same amount of data). Under ``vmap`` every client runs the cohort's
        longest local loop; ``sequential`` runs each client's own step count.

    The ``auto`` rule comes from measurements (``scripts/bench.py``, README "Performance",
    and ../shared/PERF_NOTES.md):

    - CPU: vmapped per-client convolutions become grouped convolutions, 3-25x slower than a
      sequential map, so convolutional models run ``sequential``. So do ragged cohorts
      (``step_fill < 0.5``): FedAvg on Synthetic(1,1) ran 173 ms/round sequential against
      525 ms/round vmapped. Uniform dense cohorts: ``vmap`` up to 16 clients, ``chunked``
      beyond (a vmapped batch of small matmuls loses throughput as it grows).
    - GPU/TPU: ``vmap`` fills the accelerator.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown client strategy {strategy!r}; known: {', '.join(STRATEGIES)}.")
    if strategy != "auto":
        return strategy
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return "vmap"
    if has_convolution(params) or step_fill < 0.5:
        return "sequential"
    return "vmap" if num_clients <= 16 else "chunked"


def map_clients(
    fn: Callable[[PyTree], PyTree],
    per_client: PyTree,
    *,
    strategy: str,
    chunk_size: int = 10,
) -> PyTree:
    """Applies ``fn`` to every client's slice of ``per_client`` (leading axis = clients).

    Args:
      fn: per-client function; closes over anything shared (server params, broadcasts).
      per_client: pytree whose leaves have the cohort on axis 0.
      strategy: ``vmap``, ``chunked`` or ``sequential`` (resolve ``auto`` first).
      chunk_size: clients per chunk for ``chunked``.

    Returns:
      ``fn``'s outputs stacked over clients.
    """
    if strategy == "vmap":
        return jax.vmap(fn)(per_client)
    if strategy == "sequential":
        return lax.map(fn, per_client)
    if strategy == "chunked":
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        return lax.map(fn, per_client, batch_size=chunk_size)
    raise ValueError(
        f"unknown client strategy {strategy!r}; known: {', '.join(STRATEGIES)} "
        "(resolve 'auto' with resolve_strategy first)."
    )

"""The generic federated round: per-client keys and state, execution, state scatter."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedjax_sim.core.execution import map_clients, resolve_strategy
from fedjax_sim.core.types import ClientOutput, Cohort, PRNGKey, PyTree

# (client_data, client_state, key) -> ClientOutput, where client_data is a dict with
# 'batches' [steps, batch, ...], 'mask' [steps, batch], 'num_examples' [] and 'client_id' [].
# Salts for keys that must not collide with per-client keys fold_in(round_key, client_id).
AGGREGATE_SALT = 2**31 - 1
UPDATE_SALT = 2**31 - 2

ClientFn = Callable[[dict, PyTree, PRNGKey], ClientOutput]


def client_keys(key: PRNGKey, client_ids: jax.Array) -> jax.Array:
    """Per-client keys ``fold_in(round_key, client_id)``: independent of cohort order."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(client_ids)


def gather_client_states(client_states: PyTree, client_ids: jax.Array) -> PyTree:
    """Rows of per-client state for the cohort; padded (out-of-range) ids read zeros."""
    return jax.tree.map(
        lambda s: jnp.take(s, client_ids, axis=0, mode="fill", fill_value=0), client_states
    )


def scatter_client_states(
    client_states: PyTree, client_ids: jax.Array, new_states: PyTree
) -> PyTree:
    """Writes the cohort's new per-client state back; padded ids are dropped."""
    return jax.tree.map(
        lambda s, n: s.at[client_ids].set(n.astype(s.dtype), mode="drop"),
        client_states,
        new_states,
    )


def run_clients(
    client_fn: ClientFn,
    cohort: Cohort,
    key: PRNGKey,
    *,
    strategy: str,
    chunk_size: int,
    params_for_auto: PyTree,
    client_states: PyTree = (),
    sum_weighted_updates: bool = False,
) -> tuple[ClientOutput, PyTree]:
    """Runs ``client_fn`` for every cohort member with the chosen execution strategy.

    Args:
      client_fn: the per-client work; closes over the broadcast (server params etc.).
      cohort: the packed cohort.
      key: the round key; client ``c`` gets ``fold_in(key, c)``.
      strategy: execution strategy name (``auto`` allowed).
      chunk_size: clients per chunk for ``chunked``.
      params_for_auto: the model params, for ``auto``'s choice.
      client_states: persistent per-client state with a leading ``[num_clients]`` axis, or
        ``()``.
      sum_weighted_updates: instead of stacking every client's update, accumulate
        ``(sum_c weight_c * update_c, sum_c weight_c)`` inside the client loop; the returned
        ``outputs.update`` is that pair. Linear aggregators (the weighted mean) need no more,
        and large cohorts then cost no ``clients x params`` memory.

    Returns:
      ``(outputs stacked over the cohort, updated client_states)``.
    """
    strategy = resolve_strategy(strategy, params=params_for_auto, num_clients=cohort.num_clients)
    per_client = (
        {
            "batches": dict(cohort.batches),
            "mask": cohort.mask,
            "num_examples": cohort.num_examples,
            "client_id": cohort.client_ids,
        },
        gather_client_states(client_states, cohort.client_ids),
        client_keys(key, cohort.client_ids),
    )
    if sum_weighted_updates:

        def fn(args):
            out = client_fn(*args)
            w = out.weight
            weighted = jax.tree.map(lambda u: u * w.astype(u.dtype), out.update)
            return (weighted, w), out._replace(update=())

        sums, outputs = map_clients(
            fn, per_client, strategy=strategy, chunk_size=chunk_size, reduce_sum=True
        )
        outputs = outputs._replace(update=sums)
    else:
        outputs = map_clients(
            lambda args: client_fn(*args), per_client, strategy=strategy, chunk_size=chunk_size
        )
    new_states = scatter_client_states(client_states, cohort.client_ids, outputs.client_state)
    return outputs, new_states


def weighted_client_metrics(outputs: ClientOutput) -> dict:
    """Round metrics: example-weighted mean train loss and totals over real clients."""
    m = outputs.metrics
    seen = m["num_seen"]
    loss = jnp.sum(m["loss_sum"]) / jnp.maximum(jnp.sum(seen), 1.0)
    real = outputs.weight > 0
    return {
        "train_loss": loss,
        "num_clients": jnp.sum(real).astype(jnp.int32),
        "num_examples_seen": jnp.sum(seen),
    }

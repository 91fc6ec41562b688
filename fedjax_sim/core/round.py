"""The generic federated round: per-client keys and state, execution, state scatter."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from fedjax_sim.core.execution import map_clients, resolve_strategy
from fedjax_sim.core.types import ClientOutput, Cohort, PRNGKey, PyTree

CLIENT_AXIS = "clients"

# (broadcast, client_data, client_state, key) -> ClientOutput, where client_data is a dict
# with 'batches' [steps, batch, ...], 'mask' [steps, batch], 'num_examples' [], 'client_id' [].
# Salts for keys that must not collide with per-client keys fold_in(round_key, client_id).
AGGREGATE_SALT = 2**31 - 1
UPDATE_SALT = 2**31 - 2
NOISE_SALT = 2**31 - 3

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


def client_mesh(num_devices: int | None = None) -> jax.sharding.Mesh | None:
    """A 1-D mesh named ``clients`` over the first ``num_devices`` local devices.

    ``None`` or 0 takes every local device; a single device gives ``None`` (no sharding).
    On CPU, ``jax.config.update("jax_num_cpu_devices", os.cpu_count())`` before JAX starts
    gives one device per core: a sequential round then runs one client loop per core.
    """
    devices = jax.local_devices()
    n = len(devices) if not num_devices else num_devices
    if n > len(devices):
        raise ValueError(f"asked for {n} devices but JAX sees {len(devices)}: {devices}.")
    if n <= 1:
        return None
    return jax.sharding.Mesh(np.array(devices[:n]), (CLIENT_AXIS,))


def replicate(tree: PyTree, mesh: jax.sharding.Mesh | None) -> PyTree:
    """Places ``tree`` replicated on ``mesh``'s devices (a no-op without a mesh).

    A round under a mesh returns its state replicated; starting from the same placement
    keeps the compiled round to one compilation.
    """
    if mesh is None:
        return tree
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, P()))


def run_clients(
    client_fn: ClientFn,
    cohort: Cohort,
    key: PRNGKey,
    *,
    broadcast: PyTree,
    strategy: str,
    chunk_size: int,
    client_states: PyTree = (),
    sum_weighted_updates: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ClientOutput, PyTree]:
    """Runs ``client_fn`` for every cohort member with the chosen execution strategy.

    Args:
      client_fn: ``(broadcast, client_data, client_state, key) -> ClientOutput``.
      cohort: the packed cohort.
      key: the round key; client ``c`` gets ``fold_in(key, c)``.
      broadcast: what the server sends every client (its params, control variates...).
        Pass it here rather than closing over it: under a device mesh it must be marked as
        varying per device, or gradients with respect to it are summed across devices.
      strategy: execution strategy name (``auto`` allowed; decided from ``broadcast``).
      chunk_size: clients per chunk for ``chunked``.
      client_states: persistent per-client state with a leading ``[num_clients]`` axis, or
        ``()``.
      sum_weighted_updates: instead of stacking every client's update, accumulate
        ``(sum_c weight_c * update_c, sum_c weight_c)`` inside the client loop; the returned
        ``outputs.update`` is that pair. Linear aggregators (the weighted mean) need no more,
        and large cohorts then cost no ``clients x params`` memory.
      mesh: optional 1-D device mesh (axis ``clients``, see ``client_mesh``): the cohort is
        split over its devices, each runs ``strategy`` over its share, sums are ``psum``-ed.
        The cohort size must divide by the device count.

    Returns:
      ``(outputs stacked over the cohort, updated client_states)``.
    """
    strategy = resolve_strategy(strategy, params=broadcast, num_clients=cohort.num_clients)
    if cohort.examples is not None:
        # A lazy cohort: every client reads the shared examples as data["examples"].
        examples, inner = cohort.examples, client_fn

        def client_fn(shared, data, client_state, ckey):
            return inner(shared, {**data, "examples": examples}, client_state, ckey)

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

    def run(shared, inputs):
        if sum_weighted_updates:

            def fn(args):
                out = client_fn(shared, *args)
                w = out.weight
                weighted = jax.tree.map(lambda u: u * w.astype(u.dtype), out.update)
                return (weighted, w), out._replace(update=())

            sums, outputs = map_clients(
                fn, inputs, strategy=strategy, chunk_size=chunk_size, reduce_sum=True
            )
            return sums, outputs
        outputs = map_clients(
            lambda args: client_fn(shared, *args),
            inputs,
            strategy=strategy,
            chunk_size=chunk_size,
        )
        return (), outputs

    if mesh is None or mesh.size == 1:
        sums, outputs = run(broadcast, per_client)
    else:
        n = mesh.size
        if cohort.num_clients % n:
            raise ValueError(
                f"a cohort of {cohort.num_clients} clients does not split over {n} devices; "
                f"pad it to a multiple of {n} (pack_cohort(..., num_clients=...))."
            )

        def sharded(shared, inputs):
            # Replicated inputs must be marked varying before per-client gradients, or JAX
            # sums the gradients across devices (../shared/PERF_NOTES.md).
            shared = jax.tree.map(lambda a: lax.pcast(a, CLIENT_AXIS, to="varying"), shared)
            sums, outputs = run(shared, inputs)
            return jax.tree.map(lambda a: lax.psum(a, CLIENT_AXIS), sums), outputs

        sums, outputs = jax.shard_map(
            sharded,
            mesh=mesh,
            in_specs=(P(), P(CLIENT_AXIS)),
            out_specs=(P(), P(CLIENT_AXIS)),
        )(broadcast, per_client)
    if sum_weighted_updates:
        outputs = outputs._replace(update=sums)
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

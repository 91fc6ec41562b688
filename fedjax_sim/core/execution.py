"""Client execution strategies: how a round maps per-client work over the cohort.

Every strategy runs inside the one compiled round and gives the same result up to float
summation order:

- ``vmap``: all clients at once (``jax.vmap``).
- ``chunked``: ``jax.vmap`` over chunks of ``chunk_size`` clients, ``lax.scan`` over chunks.
- ``sequential``: ``lax.map`` over clients, one at a time.
- ``auto``: picks one of the above for the platform (see ``resolve_strategy``).

An ``Executor`` (strategy, chunk size, device mesh) is the one place an algorithm learns how its
clients run: the driver builds it and passes it to the algorithm's builder. ``Executor.run``
maps a client function over the cohort with per-client keys and per-client state, optionally
splitting the cohort over a mesh of devices with ``shard_map``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from fedjax_sim.core.client import match_vma
from fedjax_sim.core.keys import client_keys
from fedjax_sim.core.types import ClientOutput, Cohort, PRNGKey, PyTree

STRATEGIES = ("auto", "vmap", "chunked", "sequential")
CLIENT_AXIS = "clients"

# (broadcast, client_data, client_state, key) -> ClientOutput, where client_data is a dict
# with 'batches' [steps, batch, ...], 'mask' [steps, batch], 'num_examples' [], 'client_id' []
# (and 'examples', the shared examples, for a lazy cohort; 'info', the client's entries of
# ``Cohort.info``, when the driver's schedule adds them).
ClientFn = Callable[[PyTree, dict, PyTree, PRNGKey], ClientOutput]


def resolve_strategy(strategy: str, platform: str | None = None) -> str:
    """Turns ``auto`` into a concrete strategy; checks the name otherwise.

    Args:
      strategy: a name from ``STRATEGIES``.
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


def gather_client_states(client_states: PyTree, client_ids: jax.Array) -> PyTree:
    """Rows of per-client state for the cohort; padded (out-of-range) ids read zeros."""
    return jax.tree.map(
        lambda s: jnp.take(s, client_ids, axis=0, mode="fill", fill_value=0), client_states
    )


def read_client_state(client_states: PyTree, client_id: jax.Array) -> PyTree:
    """One client's row of per-client state; a padded (out-of-range) id reads zeros."""

    def row(s):
        num = s.shape[0]
        at = jnp.clip(client_id, 0, num - 1).astype(jnp.int32)
        r = lax.dynamic_index_in_dim(s, at, keepdims=False)
        return jnp.where((client_id >= 0) & (client_id < num), r, jnp.zeros_like(r))

    return jax.tree.map(row, client_states)


def scatter_client_states(
    client_states: PyTree, client_ids: jax.Array, new_states: PyTree
) -> PyTree:
    """Writes the cohort's new per-client state back; padded ids are dropped."""
    return jax.tree.map(
        lambda s, n: s.at[client_ids].set(n.astype(s.dtype), mode="drop"),
        client_states,
        new_states,
    )


def default_num_devices() -> int:
    """What ``num_devices=0`` (or ``None``) means wherever a count of devices is asked for:
    every device (of every process in a multi-process run). (The test suite makes it 1 for
    tests that do not ask for more.)"""
    return len(jax.devices())


def client_mesh(num_devices: int | None = None) -> jax.sharding.Mesh | None:
    """A 1-D mesh named ``clients`` over the first ``num_devices`` devices (every process's,
    in a multi-process run: ``fedjax_sim.distributed``).

    ``None`` or 0 takes every device; a single device gives ``None`` (no sharding).
    On CPU, ``jax.config.update("jax_num_cpu_devices", os.cpu_count())`` before JAX starts
    gives one device per core: a sequential round then runs one client loop per core.
    """
    devices = jax.devices()
    n = num_devices or default_num_devices()
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
    if jax.process_count() > 1 and not any(
        isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree)
    ):  # every process holds the same values: each places its devices' copies
        from fedjax_sim import distributed

        return distributed.to_global(distributed.host_value(tree), mesh, sharded=False)
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, P()))


class Executor(NamedTuple):
    """How a round runs its clients: the strategy, the chunk size and the device mesh.

    The driver builds one (``fs.Executor("sequential", mesh=fs.client_mesh())``) and hands it
    to the algorithm; no algorithm chooses its own.

    Attributes:
      strategy: ``auto``, ``vmap``, ``chunked`` or ``sequential`` (see ``STRATEGIES``).
      chunk_size: clients per chunk for ``chunked``.
      mesh: optional 1-D device mesh (axis ``clients``, see ``client_mesh``): the cohort is
        split over its devices, each runs ``strategy`` over its share, sums are ``psum``-ed.
    """

    strategy: str = "auto"
    chunk_size: int = 10
    mesh: jax.sharding.Mesh | None = None

    def resolved(self) -> str:
        """The concrete strategy (``auto`` decided for the platform)."""
        return resolve_strategy(self.strategy)

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def check(self) -> Executor:
        """Validates the fields (at build time, before any compute)."""
        resolve_strategy(self.strategy)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")
        return self

    def run(
        self,
        client_fn: ClientFn,
        cohort: Cohort,
        key: PRNGKey,
        *,
        broadcast: PyTree,
        client_states: PyTree = (),
        hparams: PyTree = (),
        sum_weighted_updates: bool = False,
    ) -> tuple[ClientOutput, PyTree]:
        """Runs ``client_fn`` for every cohort member.

        Args:
          client_fn: ``(broadcast, client_data, client_state, key) -> ClientOutput``.
          cohort: the packed cohort.
          key: the round key; client ``c`` gets ``fold_in(key, c)``.
          broadcast: what the server sends every client (its params, control variates...).
            Pass it here rather than closing over it: under a device mesh it must be marked
            as varying per device, or gradients with respect to it are summed across devices.
          client_states: persistent per-client state with a leading ``[num_clients]`` axis,
            or ``()``.
          hparams: the round's hyperparameters (``state.hparams``); every client reads them
            as ``data["hparams"]`` (passed like ``broadcast``, so they are marked per device
            too: a value closed over inside ``shard_map`` would not be).
          sum_weighted_updates: instead of stacking every client's update, accumulate
            ``(sum_c weight_c * update_c, sum_c weight_c)`` inside the client loop; the
            returned ``outputs.update`` is that pair. Linear aggregators (the weighted mean)
            need no more, and large cohorts then cost no ``clients x params`` memory.

        Returns:
          ``(outputs stacked over the cohort, updated client_states)``; ``outputs.extras``
          is the clients' ``extras`` summed over the cohort (inside the loop where the
          updates are summed).
        """
        strategy = self.resolved()
        if cohort.examples is not None:
            # A lazy cohort: every client reads the shared examples as data["examples"].
            examples, inner = cohort.examples, client_fn

            def client_fn(shared, data, client_state, ckey):
                return inner(shared, {**data, "examples": examples}, client_state, ckey)

        data = {
            "batches": dict(cohort.batches),
            "mask": cohort.mask,
            "num_examples": cohort.num_examples,
            "client_id": cohort.client_ids,
            **({} if cohort.info is None else {"info": dict(cohort.info)}),
        }
        mesh = self.mesh
        if (
            strategy == "sequential"
            and (mesh is None or mesh.size == 1)
            and jax.tree.leaves(client_states)
        ):
            return self._run_in_place(
                client_fn, data, cohort.table_rows, key, broadcast, client_states, hparams,
                sum_weighted_updates,
            )  # fmt: skip
        # Each client reads its own row of the state table inside the loop: no
        # ``cohort x state`` block is gathered before it (a pass over that much memory).
        per_client = (data, client_keys(key, cohort.client_ids), cohort.table_rows)

        def run(shared_and_hparams, inputs, table):
            shared, hp = shared_and_hparams

            def one(data, ckey, row):
                client_state = read_client_state(table, row)
                return client_fn(shared, {**data, "hparams": hp}, client_state, ckey)

            if sum_weighted_updates:

                def fn(args):
                    out = one(*args)
                    w = out.weight
                    weighted = jax.tree.map(lambda u: u * w.astype(u.dtype), out.update)
                    return ((weighted, w), out.extras), out._replace(update=(), extras=())

                return map_clients(
                    fn, inputs, strategy=strategy, chunk_size=self.chunk_size, reduce_sum=True
                )
            outputs = map_clients(
                lambda args: one(*args),
                inputs,
                strategy=strategy,
                chunk_size=self.chunk_size,
            )
            return (), outputs

        if mesh is None or mesh.size == 1:
            sums, outputs = run((broadcast, hparams), per_client, client_states)
        else:
            n = mesh.size
            if cohort.num_clients % n:
                raise ValueError(
                    f"a cohort of {cohort.num_clients} clients does not split over {n} devices; "
                    f"pad it to a multiple of {n} (pack_cohort(..., num_clients=...))."
                )

            def sharded(shared, inputs, table):
                # Replicated inputs must be marked varying before per-client gradients, or JAX
                # sums the gradients across devices (../shared/PERF_NOTES.md). The state table
                # is only read (at per-device row indices), never differentiated.
                shared = jax.tree.map(lambda a: lax.pcast(a, CLIENT_AXIS, to="varying"), shared)
                sums, outputs = run(shared, inputs, table)
                return jax.tree.map(lambda a: lax.psum(a, CLIENT_AXIS), sums), outputs

            sums, outputs = jax.shard_map(
                sharded,
                mesh=mesh,
                in_specs=(P(), P(CLIENT_AXIS), P()),
                out_specs=(P(), P(CLIENT_AXIS)),
            )((broadcast, hparams), per_client, client_states)
        if sum_weighted_updates:
            sums, extras = sums
            outputs = outputs._replace(update=sums, extras=extras)
        else:
            outputs = outputs._replace(extras=jax.tree.map(lambda a: a.sum(0), outputs.extras))
        new_states = scatter_client_states(client_states, cohort.table_rows, outputs.client_state)
        return outputs, new_states

    def _run_in_place(
        self, client_fn, data, rows, key, broadcast, client_states, hparams, sum_weighted_updates
    ):
        """``run`` for the sequential strategy on one device with per-client state: the state
        table rides in the client loop's carry, each client reads its row and its new row is
        written in place. Gathering the cohort's rows into a block, stacking the new rows out
        of the loop and scattering them back each cost a pass over ``cohort x state`` of
        memory (SCAFFOLD's control variates, ``scripts/bench.py --algorithms``). Cohort
        members are distinct clients, so each reads its own row before any write to it.

        A client's new row is written at the start of the next client's iteration, not in its
        own: XLA's CPU backend copies the whole table every iteration when the old row is
        still used (SCAFFOLD's ``c_i+ - c_i``) after the in-place write (measured on a
        ``[100, 210k]`` table: 2.3 s a loop written directly, 0.034 s deferred).
        """
        per_client = (data, client_keys(key, data["client_id"]), rows)
        num = jax.tree.leaves(client_states)[0].shape[0]
        write = lambda table, rows, at: jax.tree.map(
            lambda t, r: lax.dynamic_update_index_in_dim(t, r.astype(t.dtype), at, 0),
            table,
            rows,
        )
        read = lambda table, at: jax.tree.map(
            lambda t: lax.dynamic_index_in_dim(t, at, keepdims=False), table
        )

        def one(carry, args):
            table, pending, pending_at = carry
            table = write(table, pending, pending_at)
            d, ckey, cid = args
            # A padded (out-of-range) row reads zeros and writes its clamped row back unchanged.
            valid = (cid >= 0) & (cid < num)
            at = jnp.clip(cid, 0, num - 1).astype(jnp.int32)
            old = read(table, at)
            mine = jax.tree.map(lambda r: jnp.where(valid, r, jnp.zeros_like(r)), old)
            out = client_fn(broadcast, {**d, "hparams": hparams}, mine, ckey)
            rows = jax.tree.map(
                lambda r, n: jnp.where(valid, n.astype(r.dtype), r), old, out.client_state
            )
            return (table, rows, at), out._replace(client_state=())

        def summed(out):
            w = out.weight
            return (jax.tree.map(lambda u: u * w.astype(u.dtype), out.update), w), out.extras

        def body(carry, args):
            total, inner = carry
            inner, out = one(inner, args)
            total = jax.tree.map(jnp.add, total, summed(out))
            return (total, inner), out._replace(update=(), extras=())

        start = (client_states, read(client_states, jnp.int32(0)), jnp.int32(0))
        if sum_weighted_updates:
            first = jax.tree.map(lambda a: a[0], per_client)
            sum_shape = jax.eval_shape(lambda a: summed(one(start, a)[1]), first)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shape)
            (sums, (table, pending, at)), outputs = lax.scan(body, (zeros, start), per_client)
            outputs = outputs._replace(update=sums[0], extras=sums[1])
        else:
            (table, pending, at), outputs = lax.scan(one, start, per_client)
            outputs = outputs._replace(extras=jax.tree.map(lambda a: a.sum(0), outputs.extras))
        return outputs, write(table, pending, at)

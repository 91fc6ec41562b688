"""Per-client state of huge populations, kept on the host for the clients sampled so far.

An algorithm's per-client state (SCAFFOLD's control variates, FedDyn's gradient memory, the
error-feedback residuals of a compressed pipeline) is a table with one row per client of the
population, ``[num_clients, ...]`` per leaf, read and written inside the compiled round by each
client's row. For a million clients that table would not fit, and almost all of its rows would
never be touched. With ``client_states = "host"`` the round's state holds only the cohort's
rows (``[slots, ...]``; ``Cohort.state_rows`` points each client at its row) and the driver
keeps a sparse table on the host: a row for each client that has reported, a client never
sampled reads the table's initial row. Results are the same as with the whole table on the
device (a test checks it bitwise).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from fedjax_sim.core.execution import replicate
from fedjax_sim.core.types import Cohort, PyTree

CLIENT_STATES = ("auto", "device", "host")
# ``auto`` keeps the whole table on the device while it takes at most this many bytes.
DEVICE_TABLE_BUDGET = 1 << 30


def client_tables(state) -> tuple[PyTree, PyTree]:
    """The per-client tables of an algorithm's state: ``(state.client_states, the pipeline's
    error-feedback residuals)`` (``()`` where there are none); each leaf ``[rows, ...]``."""
    own = getattr(state, "client_states", ())
    aggregator = getattr(state, "aggregator_state", None)
    residuals = aggregator[2] if isinstance(aggregator, tuple) and len(aggregator) == 3 else ()
    return own, residuals


def with_client_tables(state, tables: tuple[PyTree, PyTree]):
    """``state`` with its per-client tables replaced (the inverse of ``client_tables``)."""
    own, residuals = tables
    if jax.tree.leaves(own):
        state = state._replace(client_states=own)
    if jax.tree.leaves(residuals):
        agg, transforms, _ = state.aggregator_state
        state = state._replace(aggregator_state=(agg, transforms, residuals))
    return state


def table_bytes(state_shapes, num_clients: int) -> int:
    """Bytes of the whole ``[num_clients, ...]`` tables of a state (shapes from
    ``jax.eval_shape(algorithm.init, ...)``)."""
    leaves = jax.tree.leaves(client_tables(state_shapes))
    return sum(num_clients * int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in leaves)


def on_host(setting: str, state_shapes, num_clients: int, *, on_demand: bool) -> bool:
    """Whether a run keeps per-client state on the host: ``host``, or ``auto`` when the whole
    tables would take more than 1 GiB or the population is generated on demand."""
    if setting not in CLIENT_STATES:
        raise ValueError(f"unknown client_states {setting!r}; known: {', '.join(CLIENT_STATES)}.")
    if not jax.tree.leaves(client_tables(state_shapes)):
        return False  # no per-client state: nothing to keep
    if setting == "auto":
        return on_demand or table_bytes(state_shapes, num_clients) > DEVICE_TABLE_BUDGET
    return setting == "host"


def shrink_tables(state, rows: int):
    """``state`` with every per-client table cut to its first ``rows`` rows (under ``jit`` the
    whole table is never made: XLA slices the broadcast that fills it)."""
    own, residuals = client_tables(state)
    cut = lambda t: jax.tree.map(lambda a: a[:rows], t)
    return with_client_tables(state, (cut(own), cut(residuals)))


class HostClientStates:
    """The sparse host table: a row per client that has reported, in order of first report.

    Args:
      initial: the per-client tables of the initial state (``[slots, ...]`` leaves, every row
        the same): what a client never sampled reads.
      num_clients: the population (client ids at or above it are padding).
      mesh: the mesh the round's state is replicated on (or ``None``).
    """

    def __init__(self, initial: tuple[PyTree, PyTree], num_clients: int, mesh):
        host = jax.device_get(initial)
        self.num_clients, self.mesh = int(num_clients), mesh
        self.initial_row = jax.tree.map(lambda a: np.asarray(a[0]), host)
        if not all(np.array_equal(a, a[:1].repeat(len(a), 0)) for a in jax.tree.leaves(host)):
            raise ValueError(
                "client_states='host' needs every client's initial per-client state to be "
                "the same (a client never sampled reads it); set client_states='device'."
            )
        self.index: dict[int, int] = {}
        # Rows in order of first report; room doubles when full (no copy of them every round).
        self.rows = self._room()
        self._pending = None  # (client ids, the round's tables on the device), not yet read

    @property
    def count(self) -> int:
        return len(self.index)

    def prepare(self, state, cohort: Cohort):
        """The round's ``(state, cohort)``: the cohort's rows in the state's tables, and
        ``state_rows`` pointing each client at its row (padding: out of range)."""
        self.flush()
        ids = np.asarray(cohort.client_ids, np.int64)
        slots = len(ids)  # may grow (a large Poisson draw): the round then compiles again
        real = ids < self.num_clients
        where = np.array([self.index.get(int(i), -1) for i in ids], np.int64)
        known = where >= 0

        def gather(stored, initial):
            out = np.broadcast_to(initial, (slots, *initial.shape)).copy()
            out[known] = stored[where[known]]
            return out

        tables = jax.tree.map(gather, self.rows, self.initial_row)
        placed = jax.device_put(tables) if self.mesh is None else replicate(tables, self.mesh)
        state = with_client_tables(state, placed)
        state_rows = np.where(real, np.arange(slots), slots).astype(np.int32)
        return state, cohort._replace(state_rows=state_rows)

    def finish(self, state, cohort: Cohort) -> None:
        """Notes the round's new rows (read from the device when next needed: the next
        round's ``prepare``, or a checkpoint)."""
        self._pending = (np.asarray(cohort.client_ids, np.int64), client_tables(state))

    def flush(self) -> None:
        """Writes the last round's new rows of its real clients into the table."""
        if self._pending is None:
            return
        ids, tables = self._pending
        self._pending = None
        tables = jax.device_get(tables)
        real = np.flatnonzero(ids < self.num_clients)
        new = [int(ids[p]) for p in real if int(ids[p]) not in self.index]
        start = self.count
        self.index.update({cid: start + k for k, cid in enumerate(new)})
        room = len(jax.tree.leaves(self.rows)[0])
        if self.count > room:
            grown = max(self.count, 2 * room)
            self.rows = jax.tree.map(
                lambda s: np.concatenate([s, np.empty((grown - len(s), *s.shape[1:]), s.dtype)]),
                self.rows,
            )
        at = np.array([self.index[int(ids[p])] for p in real], np.int64)

        def scatter(stored, round_rows):
            stored[at] = round_rows[real]
            return stored

        self.rows = jax.tree.map(scatter, self.rows, tables)

    def tree(self) -> dict[str, Any]:
        """What a checkpoint keeps: the ids in row order and the rows (one filler row, id -1,
        while no client has reported: a checkpoint holds no empty arrays)."""
        self.flush()
        ids = np.fromiter(self.index, np.int64, count=self.count)
        rows = jax.tree.map(lambda s: s[: self.count], self.rows)
        if not self.count:
            ids = np.full((1,), -1, np.int64)
            rows = jax.tree.map(lambda r: r[None], self.initial_row)
        return {"ids": ids, "rows": rows}

    def target(self, count: int) -> dict[str, Any]:
        """The shapes of a checkpoint's ``tree()`` holding ``count`` clients."""
        n = max(int(count), 1)
        return {
            "ids": np.zeros((n,), np.int64),
            "rows": jax.tree.map(lambda r: np.zeros((n, *r.shape), r.dtype), self.initial_row),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        ids = np.asarray(saved["ids"], np.int64)
        keep = ids >= 0
        self._pending = None
        self.index = {int(c): k for k, c in enumerate(ids[keep])}
        self.rows = jax.tree.map(lambda a: np.array(a)[keep], saved["rows"])
        if not self.count:  # room for the first reports
            self.rows = self._room()

    def _room(self, rows: int = 16) -> PyTree:
        """Empty tables of ``rows`` rows, for the first reports."""
        return jax.tree.map(lambda r: np.empty((rows, *r.shape), r.dtype), self.initial_row)

"""Multi-process runs on JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program (the same config, the same command): each samples the
same cohorts from the seed, the clients are split over one ``clients`` mesh spanning every
process's devices, each process feeds the rows of the cohort that its own devices train
(``jax.make_array_from_process_local_data``), and the aggregation is one collective inside the
compiled round. The server state is replicated on every device; each process evaluates it on
its own devices. Process 0 writes the run's files; every process writes its shards of a
checkpoint (Orbax's multi-host save) into the shared workdir.

Start one process per host (or several on one host, each with its own devices):

    fedjax-sim run --workdir W --coordinator HOST:PORT --num-processes N --process-id I

or ``--distributed`` to let JAX read the cluster's environment (SLURM's ``srun``, Open MPI,
``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``).
"""

from __future__ import annotations

import os

import jax
import numpy as np


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the run's processes (``jax.distributed.initialize``) before JAX starts its backend.

    Args:
      coordinator: ``HOST:PORT`` of process 0 (default: ``JAX_COORDINATOR_ADDRESS`` or the
        cluster's environment).
      num_processes, process_id: this run's process count and this process's index (default:
        ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` or the cluster's environment).
    """
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if (num_processes is None) != (process_id is None):
        raise ValueError("--num-processes and --process-id go together (or neither).")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id must be in 0..{num_processes - 1} for --num-processes "
            f"{num_processes}, got {process_id}."
        )
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing in a single process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_global(tree, mesh, sharded: bool):
    """Host arrays every process holds whole, as global arrays on ``mesh``: split over its
    ``clients`` axis (``sharded``: each process gives only its devices' rows) or replicated.
    The identity in a single process."""
    if not is_multiprocess() or mesh is None:
        return tree
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    spec = P(mesh.axis_names[0]) if sharded else P()
    sharding = NamedSharding(mesh, spec)

    def one(a):
        a = np.asarray(a)
        if not sharded:
            return jax.make_array_from_process_local_data(sharding, a, a.shape)
        rows = local_rows(mesh, a.shape[0])
        return jax.make_array_from_process_local_data(sharding, a[rows], a.shape)

    return jax.tree.map(one, tree)


def local_rows(mesh, num_rows: int) -> slice:
    """The rows of a ``num_rows`` array split over ``mesh``'s first axis that this process's
    devices hold (a contiguous block: the mesh orders devices by process)."""
    devices = list(mesh.devices.flat)
    per = num_rows // len(devices)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    if not mine or mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError("this process's devices are not contiguous in the clients mesh.")
    return slice(mine[0] * per, (mine[-1] + 1) * per)


def share_of(mesh):
    """``slots -> rows``: the rows of a cohort of ``slots`` clients this process feeds (only
    they are gathered), or ``None`` in a single process."""
    if not is_multiprocess() or mesh is None:
        return None
    return lambda slots: local_rows(mesh, slots)


def host_value(tree):
    """A replicated global array's value on this host (NumPy), whatever the process count."""
    return jax.tree.map(np.asarray, jax.device_get(tree))

"""Compiled round programs: one member (a plain run) or many (a vectorized sweep group).

Both give the driver loop the same interface: ``init()``, ``step(states, alive, cohorts,
round)``, the members' params for evaluation, a checkpoint tree and its placement. A program's
members are ``alive`` until their training loss (or, vectorized, their params) stops being
finite; a dead member of a vectorized program keeps its state from before (frozen).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_sim import data, distributed
from fedjax_sim.core import execution
from fedjax_sim.core.execution import replicate
from fedjax_sim.core.frozen import jit as frozen_jit
from fedjax_sim.core.keys import INIT_SALT, round_key
from fedjax_sim.core.types import Cohort, FederatedAlgorithm, Model, PyTree
from fedjax_sim.driver import client_states

STREAM_AXIS = "streams"  # the mesh axis a sweep's streams are split over


def with_examples(algorithm: FederatedAlgorithm, indexed: Cohort, examples) -> Cohort:
    """The cohort ``algorithm`` trains on from an index cohort and the device's examples: lazy
    (each local step gathers its batch) when it accepts that, else gathered whole."""
    if algorithm.lazy_examples:
        return indexed._replace(examples=examples)
    return data.packing.gather_cohort(examples, indexed, xp=jnp)


def initial_state(algorithm: FederatedAlgorithm, model: Model, root, hparams=None) -> PyTree:
    """A member's state at round 0: the model from ``fold_in(root, INIT_SALT)``, with its
    ``hparams`` (default: the algorithm's built-in values)."""
    state = algorithm.init(model.init(jax.random.fold_in(root, INIT_SALT)))
    if hparams is not None:
        state = state._replace(hparams=dict(hparams))
    return state


def round_metrics(metrics: dict, batched: bool = False) -> dict:
    """The round's metrics the run records (``metrics.jsonl``, TensorBoard): every scalar
    number the algorithm and its aggregation pipeline report (per member where ``batched``),
    as float32; ``train_loss`` is required."""
    if "train_loss" not in metrics:
        raise ValueError(
            f"an algorithm's round must report 'train_loss'; it reported {sorted(metrics)}."
        )
    ndim = 1 if batched else 0
    return {
        k: jnp.asarray(v, jnp.float32)
        for k, v in metrics.items()
        if jnp.ndim(v) == ndim and jnp.issubdtype(jnp.asarray(v).dtype, jnp.number)
    }


class _Program:
    """What both programs share: placement of a checkpoint tree, the members' params, the
    device count and the number of compilations of the round (``self._round``)."""

    mesh = None

    def place(self, tree):
        return replicate((tree["states"], tree["alive"]), self.mesh)

    @property
    def client_states_at(self) -> str:
        """``"host"``, ``"device"`` or ``"none"``: where the members' per-client tables live."""
        if getattr(self, "store", None) is not None:
            return "host"
        tables = client_states.client_tables(jax.eval_shape(self.init)[0])
        return "device" if jax.tree.leaves(tables) else "none"

    def checkpoint(self, states, alive) -> tuple[dict, dict]:
        """``(tree, meta)`` a checkpoint saves of the members (``place`` restores the tree)."""
        return {"states": states, "alive": alive}, {}

    def checkpoint_target(self, states, alive, meta: dict) -> dict:
        """The structure and shapes of ``checkpoint``'s tree, given the checkpoint's meta."""
        del meta
        return {"states": states, "alive": alive}

    def params(self, states):
        """The members' params, as this process's copy in a multi-process run (evaluation runs
        on each process's own devices)."""
        if distributed.is_multiprocess():
            return distributed.host_value(states.params)
        return states.params

    def member_state(self, states, m: int):
        """Member ``m``'s state (a vectorized program's states are stacked over members)."""
        return jax.tree.map(lambda a: a[m], states) if self.vectorized else states

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def step(self, states, alive, cohorts: list[Cohort], r: int):
        return self._round(states, alive, *self._round_args(cohorts, r))

    def check(self, cohorts: list[Cohort], r: int) -> None:
        """Traces round ``r`` on the abstract initial state and examples (nothing is compiled,
        run or placed on a device, and the round call reuses the trace): a setting the
        algorithm refuses while tracing fails here, before a run writes anything."""
        states, alive = self._abstract(jax.eval_shape(self.init))
        self._round.trace(states, alive, *self._round_args(cohorts, r, abstract=True))

    def _abstract(self, tree):
        """``tree``'s shapes and dtypes, placed as the round gets its arrays (replicated on
        the mesh, if any), so the round call reuses the trace."""
        sharding = None if self.mesh is None else NamedSharding(self.mesh, P())
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree
        )

    def _device_examples(self, abstract: bool = False) -> tuple:
        """The source's examples as the round takes them (``()`` when cohorts carry their
        own): placed on the program's devices at the first round, not when it is built, so a
        sweep can build (and check) every group's program before it trains the first."""
        if self._host_examples is None:
            return ()
        if abstract:
            return (self._abstract(self._host_examples),)
        if self._examples is None:
            self._examples = (replicate(jax.device_put(self._host_examples), self.mesh),)
        return self._examples

    @property
    def compiles(self) -> int:
        return self._round._cache_size()

    def share_examples(self, other: _Program) -> None:
        """Takes ``other``'s examples once it has placed them (same source and mesh), so two
        programs of one run hold one copy on the device."""
        if other._host_examples is self._host_examples and other.mesh == self.mesh:
            self._examples = other._examples


class SoloProgram(_Program):
    """One member, no vmap: ``jit(algorithm.apply)`` with the cohort split over ``mesh``."""

    num_members = 1
    vectorized = False
    member_streams = (0,)  # each member's stream (index into the source's streams)

    def __init__(self, algorithm, model, seed: int, mesh, examples, host_states=None):
        self.algorithm, self.model, self.mesh = algorithm, model, mesh
        self.root = jax.random.key(seed)
        self._host_examples, self._examples = examples, None
        # ``(cohort slots, population)``: per-client state kept on the host for the clients
        # sampled so far (``driver.client_states``), the round's tables holding the cohort's.
        self.host_states = host_states
        self.store = None

        def solo_round(state, alive, cohort, r, *examples):
            if examples:  # only the indices travelled; gather the examples here
                cohort = with_examples(algorithm, cohort, examples[0])
            state, metrics = algorithm.apply(state, cohort, round_key(self.root, r))
            metrics = round_metrics(metrics)
            finite = jnp.isfinite(metrics["train_loss"])
            return state, alive & finite[None], {k: v[None] for k, v in metrics.items()}

        # A model's frozen parameters (a LoRA base) are an argument, never a constant. In a
        # multi-process run the state comes back replicated, so each process can read it.
        out = {}
        if mesh is not None:
            out["out_shardings"] = NamedSharding(mesh, P())
        self._round = frozen_jit(solo_round, model.frozen, mesh=mesh, donate_argnums=0, **out)

    def init(self):
        if self.host_states is None:
            state = initial_state(self.algorithm, self.model, self.root)
        else:
            slots, population = self.host_states
            state = jax.jit(
                lambda root: client_states.shrink_tables(
                    initial_state(self.algorithm, self.model, root), slots
                )
            )(self.root)
            tables = client_states.client_tables(state)
            if not isinstance(jax.tree.leaves(tables)[0], jax.core.Tracer):  # not eval_shape
                self.store = client_states.HostClientStates(tables, population, self.mesh)
        return self.place({"states": state, "alive": jnp.ones((1,), bool)})

    def step(self, states, alive, cohorts: list[Cohort], r: int):
        if self.store is None:
            return super().step(states, alive, cohorts, r)
        states, cohort = self.store.prepare(states, cohorts[0])
        states, alive, metrics = super().step(states, alive, [cohort], r)
        self.store.finish(states, cohort)
        return states, alive, metrics

    def checkpoint(self, states, alive) -> tuple[dict, dict]:
        tree, meta = super().checkpoint(states, alive)
        if self.store is not None:
            tree["client_states"] = self.store.tree()
            meta["client_states_count"] = self.store.count
        return tree, meta

    def checkpoint_target(self, states, alive, meta: dict) -> dict:
        target = super().checkpoint_target(states, alive, meta)
        if self.store is not None:
            target["client_states"] = self.store.target(meta.get("client_states_count", 0))
        return target

    def place(self, tree):
        if self.store is not None and "client_states" in tree:
            self.store.restore(tree["client_states"])
        return super().place(tree)

    def _round_args(self, cohorts: list[Cohort], r: int, abstract: bool = False) -> tuple:
        (cohort,) = cohorts
        if self.host_states is not None and cohort.state_rows is None:  # tracing: rows made up
            cohort = cohort._replace(state_rows=np.arange(cohort.num_clients, dtype=np.int32))
        if not abstract:  # a multi-process run: a global array this process gives its rows of
            cohort = distributed.to_global(cohort, self.mesh, sharded=True)
        return (cohort, jnp.asarray(r, jnp.int32), *self._device_examples(abstract))


class VectorProgram(_Program):
    """Many members in one compiled program, ``jit(vmap(apply))`` over members.

    Members are sorted by stream (a (seed, data seed) pair): the members of one stream share
    every cohort and key, so they are vmapped with the cohort unbatched, and each client's
    local loop keeps one step count for all of them (a batched loop bound would run every
    member to the longest and select the whole state each step). The streams run one after
    another (``lax.map``) or vmapped (``seed_strategy``), split over ``num_devices`` devices
    with ``shard_map`` (a share that does not divide evenly is padded with copies of stream 0
    whose results are dropped). Member states stay replicated between rounds, so the round
    compiles once.
    """

    vectorized = True

    def __init__(
        self,
        algorithm: FederatedAlgorithm,
        model: Model,
        member_streams: list[tuple[int, int]],
        member_hparams: list[Mapping[str, float]],
        *,
        examples,
        num_devices: int,
        seed_strategy: str,
    ):
        self.algorithm, self.model = algorithm, model
        self.num_members = m_count = len(member_streams)
        streams = list(dict.fromkeys(member_streams))
        per_stream = m_count // len(streams)
        if [streams[i // per_stream] for i in range(m_count)] != member_streams:
            raise AssertionError(f"members are not a stream-major grid: {member_streams}")
        self.streams = streams
        self.member_streams = [streams.index(ms) for ms in member_streams]
        self.roots = jax.vmap(jax.random.key)(
            jnp.asarray([s for s, _ in member_streams], jnp.uint32)
        )
        names = sorted(algorithm.hparams)
        self.hparams = {
            k: jnp.asarray([float(h[k]) for h in member_hparams], jnp.float32) for k in names
        }
        n_dev = max(1, min(num_devices or execution.default_num_devices(), len(streams)))
        n_dev = min(n_dev, len(jax.local_devices()))
        self.mesh = None
        if n_dev > 1:
            self.mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:n_dev]), (STREAM_AXIS,))
        pad = self.pad = -len(streams) % n_dev
        padded_seeds = [s for s, _ in streams] + [streams[0][0]] * pad
        stream_roots = jax.vmap(jax.random.key)(jnp.asarray(padded_seeds, jnp.uint32))
        mesh = self.mesh
        # Replicated on the streams' devices once, not copied there every round.
        self.stream_roots = replicate(stream_roots, mesh)
        if seed_strategy == "auto":
            seed_strategy = "sequential" if jax.default_backend() == "cpu" else "vmap"
        self._host_examples, self._examples = examples, None

        def run_streams(args, r, examples):
            def one_stream(a):
                st, cohort, root = a
                if examples:
                    cohort = with_examples(algorithm, cohort, examples[0])
                key = round_key(root, r)
                return jax.vmap(algorithm.apply, in_axes=(0, None, None))(st, cohort, key)

            if seed_strategy == "vmap":
                return jax.vmap(one_stream)(args)
            return jax.lax.map(one_stream, args)

        def sweep_round(states, alive, cohorts, stream_roots, r, *examples):
            by_stream = jax.tree.map(lambda a: a.reshape((-1, per_stream) + a.shape[1:]), states)
            if pad:
                by_stream = jax.tree.map(
                    lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]), by_stream
                )
            args = (by_stream, cohorts, stream_roots)
            if mesh is None:
                new, metrics = run_streams(args, r, examples)
            else:
                new, metrics = jax.shard_map(
                    run_streams,
                    mesh=mesh,
                    in_specs=(P(STREAM_AXIS), P(), P()),
                    out_specs=P(STREAM_AXIS),
                )(args, r, examples)
            n_streams = len(streams)
            new, metrics = jax.tree.map(lambda a: a[:n_streams], (new, metrics))
            new, metrics = jax.tree.map(
                lambda a: a.reshape((m_count,) + a.shape[2:]), (new, metrics)
            )
            metrics = round_metrics(metrics, batched=True)
            finite = jnp.isfinite(metrics["train_loss"])
            for leaf in jax.tree.leaves(new.params):
                finite &= jnp.all(jnp.isfinite(leaf.reshape(m_count, -1)), axis=1)
            ok = alive & finite

            def keep(n, o):
                return jnp.where(ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

            return jax.tree.map(keep, new, states), ok, metrics

        # On a mesh, member states live replicated between rounds (one compiled program: the
        # first round's inputs look like every later round's).
        out_shardings = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}
        self._round = frozen_jit(
            sweep_round, model.frozen, mesh=mesh, donate_argnums=0, **out_shardings
        )

    def init(self):
        def init_member(root, hp):
            return initial_state(self.algorithm, self.model, root, hp)

        states = jax.jit(jax.vmap(init_member))(self.roots, self.hparams)
        return self.place({"states": states, "alive": jnp.ones((self.num_members,), bool)})

    def _round_args(self, cohorts: list[Cohort], r: int, abstract: bool = False) -> tuple:
        stacked = jax.tree.map(lambda *a: np.stack(a), *cohorts, *cohorts[:1] * self.pad)
        args = (stacked, self.stream_roots, jnp.asarray(r, jnp.int32))
        return args + self._device_examples(abstract)

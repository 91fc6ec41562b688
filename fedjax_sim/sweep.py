"""Hyperparameter sweeps: many members of a grid trained by one compiled program.

``run_sweep(base_config, {"client.learning_rate": [0.01, 0.1], "seed": [0, 1]}, workdir)``
trains the grid product of the axes. Axes that change no shape (``VECTOR_AXES``: the seed, the
data seed, the client and server learning rates and numeric optimizer arguments) are
vectorized: one ``jax.jit(jax.vmap(round))`` trains every member at once, with the
hyperparameters as traced arrays (optimizers built with ``optax.inject_hyperparams``; the
client's in ``ServerState.client_hparams``, the server's in its optimizer state). Any other
axis (model, cohort size, batch size, ...) splits the grid into groups run one after another,
each group vectorized over its own members.

Each member writes ``WORKDIR/<label>/`` with ``config.json``, ``metrics.jsonl`` and
``summary.json`` as ``fs.simulate`` would for the member's config, and its results equal a solo
``fs.simulate(member_config)`` within float reordering (1e-5). A ``seed`` axis varies the
initial model, the client sampling and the local shuffles, never the dataset: members get the
base config's data seed (pinned in their ``config.json``). A ``data_seed`` axis varies the
dataset (its generation or partition): each data seed's dataset is built once, and with data on
the device all of them share one example array holding each distinct example once (partitions
of one dataset cost one copy), each member's cohorts gathered from it in the compiled round.
With ``federated_data`` given, every member trains on it (no ``data_seed`` axis then).

A member whose training loss or parameters become NaN/inf in a round keeps its state from
before that round (frozen) and is marked diverged in its summary with that round; its
``metrics.jsonl`` keeps the evaluations before it, as the solo run's would. The others go on.

Sweeps resume like runs: with the base config's ``checkpoint_every`` > 0, each group (compiled
program) saves its stacked member states and every member's bookkeeping to
``WORKDIR/checkpoints/group<i>/checkpoints/<round>/`` at its start, every ``checkpoint_every``
rounds and at its end (keeping ``checkpoint_keep``). Rerunning the same sweep (same base config
and axes, recorded in ``WORKDIR/sweep_spec.json``) resumes each group from its newest checkpoint,
rewriting each member's ``metrics.jsonl`` from it; a finished group runs no rounds. A workdir
holding a plain run or a different sweep is refused before any compute, naming the fields that
differ, unless ``overwrite``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_sim import checkpoint, data, optimizers
from fedjax_sim.core.round import replicate
from fedjax_sim.metrics import make_evaluator, summarize_eval
from fedjax_sim.simulation import (
    ALGORITHM_FIELDS,
    DEVICE_DATA_BUDGET,
    RunLog,
    _kwargs,
    algorithm_numbers,
    build_experiment,
    data_on_device,
    data_seed_of,
    eval_clients,
    make_algorithm,
    packing_of,
    sample_clients,
    step_bucketer,
    with_examples,
)

# Fields a vectorized sweep traces; ``client.kwargs.*`` and ``server.kwargs.*`` (numeric
# optimizer arguments such as ``momentum`` or ``b1``) are vectorized too.
VECTOR_AXES = (
    "seed",
    "data_seed",
    "client.learning_rate",
    "server.learning_rate",
    *ALGORITHM_FIELDS.values(),  # proximal_mu, clip_norm, noise_multiplier
)
_VECTOR_PREFIXES = ("client.kwargs.", "server.kwargs.")
# Fields that may not be swept: they name the sweep or only the driver's bookkeeping.
_FIXED = ("sweep", "num_devices", "cpu_devices", "checkpoint_every", "checkpoint_keep")
_NEW_KEYS_OK = ("client.kwargs.", "server.kwargs.", "model.kwargs.", "dataset.kwargs.")
SPEC_FILE = "sweep_spec.json"
STREAM_AXIS = "streams"  # the mesh axis a sweep's streams are split over


def is_vector_axis(path: str) -> bool:
    """Whether sweeping ``path`` keeps every shape, so members share one compiled program."""
    return path in VECTOR_AXES or path.startswith(_VECTOR_PREFIXES)


def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _set(config, path: str, value) -> None:
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
        node[last] = value


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _has(config, path: str) -> bool:
    try:
        _get(config, path)
    except (KeyError, AttributeError):
        return False
    return True


def check_axes(base_config: ml_collections.ConfigDict, axes: dict[str, list]) -> None:
    """Refuses bad axes before any compute: unknown fields, empty or non-list values,
    non-numeric vectorized values, and combinations the vectorized path cannot reproduce."""
    if not axes:
        raise ValueError("a sweep needs at least one axis (field path -> list of values).")
    for path, values in axes.items():
        if not isinstance(values, list | tuple):
            raise ValueError(f"sweep axis {path!r} must be a list of values, got {values!r}.")
        if not values:
            raise ValueError(f"sweep axis {path!r} has no values.")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"sweep axis {path!r} repeats a value: {list(values)}.")
        if path.split(".")[0] in _FIXED:
            raise ValueError(f"{path!r} cannot be swept (it configures the run, not a member).")
        if not _has(base_config, path) and not any(path.startswith(p) for p in _NEW_KEYS_OK):
            raise ValueError(
                f"unknown config field {path!r} in the sweep axes; sweepable fields are the "
                "config's (e.g. seed, data_seed, client.learning_rate, server.learning_rate, "
                "client.kwargs.momentum, client.proximal_mu, dp.clip_norm, model.name, "
                "clients_per_round)."
            )
        if is_vector_axis(path):
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise ValueError(
                        f"sweep axis {path!r} is vectorized and takes numbers; got {v!r}."
                    )
            if path == "seed" and not all(isinstance(v, int) for v in values):
                raise ValueError(f"seeds must be integers, got {list(values)}.")
            if path == "data_seed" and not all(isinstance(v, int) and v >= 0 for v in values):
                raise ValueError(f"data seeds must be integers >= 0, got {list(values)}.")
    algos = axes.get("algorithm", [base_config.algorithm])
    if "fedsgd" in algos and any(p.startswith("client.") and is_vector_axis(p) for p in axes):
        raise ValueError("fedsgd has no client optimizer; sweep server.* or seed instead.")


def axes_from_config(node, prefix: str = "") -> dict[str, list]:
    """The axes of a config's ``sweep`` field: nested (``sweep.client.learning_rate = [...]``)
    or dotted keys, flattened to ``{"client.learning_rate": [...]}``."""
    if isinstance(node, ml_collections.ConfigDict):
        node = node.to_dict()
    axes: dict[str, list] = {}
    for key, value in dict(node or {}).items():
        if isinstance(value, dict):
            axes.update(axes_from_config(value, f"{prefix}{key}."))
        else:
            axes[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return axes


def member_label(values: dict[str, Any]) -> str:
    """Directory name of a member: ``client.learning_rate=0.1_seed=0``."""
    return "_".join(f"{k}={v}" for k, v in values.items())


def member_configs(
    base_config: ml_collections.ConfigDict, axes: dict[str, list]
) -> list[tuple[str, dict[str, Any], ml_collections.ConfigDict]]:
    """The grid product of ``axes`` as ``(label, axis values, config)``, first axis slowest."""
    check_axes(base_config, axes)
    base = copy.deepcopy(base_config)
    if "sweep" in base:
        with base.unlocked():
            del base["sweep"]
    out = []
    names = list(axes)
    for combo in itertools.product(*(axes[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        config = copy.deepcopy(base)
        # A seed axis varies the model init, sampling and shuffles, not the data: pin the data
        # seed so each member's config.json reproduces it alone (fs.simulate(member_config)).
        if "data_seed" not in values:
            _set(config, "data_seed", data_seed_of(base))
        for path, v in values.items():
            _set(config, path, v)
        out.append((member_label(values), values, config))
    return out


def _group_key(config, axes) -> str:
    return json.dumps(
        {p: _get(config, p) for p in axes if not is_vector_axis(p)}, sort_keys=True, default=str
    )


def run_sweep(
    base_config: ml_collections.ConfigDict,
    axes: dict[str, list],
    workdir: str | Path,
    *,
    federated_data: data.FederatedData | None = None,
    progress: bool = False,
    overwrite: bool = False,
    seed_strategy: str = "auto",
) -> dict[str, Any]:
    """Trains every member of the grid ``axes`` over ``base_config``.

    Args:
      base_config: the experiment config the axes modify (its ``sweep`` field, if any, is
        ignored). Its ``num_devices`` (0: every local device) splits the streams (distinct
        seed and data seed pairs) over devices, each member's clients staying on one. Its
        ``checkpoint_every``/``checkpoint_keep`` checkpoint each group; a rerun of the same
        sweep resumes from them.
      axes: field path -> list of values, e.g. ``{"client.learning_rate": [0.01, 0.1],
        "seed": [0, 1]}``.
      workdir: output directory; member ``label`` writes ``workdir/label/``.
      federated_data: data to use instead of the config's dataset (for every group).
      progress: print one line per group and evaluation.
      overwrite: replace earlier results (and checkpoints) in ``workdir``.
      seed_strategy: how members with different seeds (different cohorts) run inside the
        one program: ``sequential`` (``lax.map``; members sharing a seed are vmapped),
        ``vmap``, or ``auto`` (sequential on CPU, where vmapping ragged local loops over
        different cohorts cost more than it saved: 16 members of the default config took
        2.1 s/round vmapped against 0.12 s/round for one), vmap elsewhere.

    Returns:
      ``{"members": [{"label", "values", "summary", "history", "params"}], "groups",
      "wall_s"}``; ``workdir/sweep.json`` holds the same without params and histories.
    """
    t0 = time.perf_counter()
    if seed_strategy not in ("auto", "sequential", "vmap"):
        raise ValueError(f"unknown seed_strategy {seed_strategy!r}; known: auto, sequential, vmap.")
    members = member_configs(base_config, axes)
    if federated_data is not None and "data_seed" in axes:
        raise ValueError(
            "a data_seed axis varies the dataset the config names, but federated_data fixes "
            "the data; drop one of them."
        )
    workdir = Path(workdir)
    created = [p for p in (workdir, *workdir.parents) if not p.exists()]
    checkpoint.check_writable(workdir)
    every = int(base_config.get("checkpoint_every", 0) or 0)
    keep = int(base_config.get("checkpoint_keep", 3) or 3)
    spec = _sweep_spec(base_config, axes)
    spec_path = workdir / SPEC_FILE
    if overwrite:
        checkpoint.remove_checkpoints(workdir)
        spec_path.unlink(missing_ok=True)
    else:
        if (workdir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"{workdir} holds the results of a plain run ({workdir / 'metrics.jsonl'}), not "
                "a sweep; choose another workdir or pass overwrite=True (--overwrite)."
            )
        if spec_path.exists():
            _check_same_sweep(json.loads(spec_path.read_text()), spec, workdir)
    groups: dict[str, list[int]] = {}
    for i, (_, _, config) in enumerate(members):
        groups.setdefault(_group_key(config, axes), []).append(i)
    group_dirs = {key: _group_dir(workdir, gi) for gi, key in enumerate(groups)}
    resumable = {
        key: not overwrite and checkpoint.has_checkpoint(d) for key, d in group_dirs.items()
    }
    for key, idx in groups.items():
        for i in idx:
            path = workdir / members[i][0] / "metrics.jsonl"
            if path.exists() and not overwrite and not resumable[key]:
                raise FileExistsError(
                    f"{path} already holds the results of a run; choose another workdir or "
                    "pass overwrite=True (--overwrite) to replace them."
                )
    # Build every group's data (one dataset per data seed) and validate it before any
    # training (bad cohort sizes, unknown models...).
    group_data = {}
    try:
        for key, idx in groups.items():
            config = members[idx[0]][2]
            per_seed = {}
            for d in sorted({data_seed_of(members[i][2]) for i in idx}):
                fd = federated_data
                if fd is None:
                    fd = data.get_federated_data(
                        config.dataset.name, seed=d, **_kwargs(config.dataset.kwargs)
                    )
                exp = build_experiment(_one_device(config), fd)
                per_seed[d] = fd
            group_data[key] = per_seed
            for i in idx:  # each member's own algorithm settings (e.g. noise without clipping)
                make_algorithm(members[i][2], exp.model, strategy=exp.strategy, mesh=None)
    except Exception:
        for p in created:  # leave no empty workdir behind a refused sweep
            try:
                p.rmdir()
            except OSError:
                break
        raise
    checkpoint.write_lines_atomically(spec_path, [json.dumps(spec, indent=2)])
    results: list[dict[str, Any] | None] = [None] * len(members)
    for gi, (key, idx) in enumerate(groups.items()):
        if progress:
            print(f"fedjax-sim sweep: group {gi + 1}/{len(groups)}: {len(idx)} member(s)")
        out = _run_group(
            [members[i] for i in idx],
            workdir,
            group_data[key],
            progress=progress,
            seed_strategy=seed_strategy,
            ckpt_dir=group_dirs[key] if every > 0 or resumable[key] else None,
            every=every,
            keep=keep,
            spec=spec,
        )
        for i, res in zip(idx, out, strict=True):
            results[i] = res
    wall = time.perf_counter() - t0
    index = {
        "axes": {k: list(v) for k, v in axes.items()},
        "groups": len(groups),
        "wall_s": round(wall, 3),
        "members": [{"label": r["label"], **r["summary"]} for r in results],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sweep.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"members": results, "groups": len(groups), "wall_s": round(wall, 3)}


def _sweep_spec(base_config, axes) -> dict[str, Any]:
    """What identifies a sweep: the base config (without ``sweep``) and the axes, as JSON."""
    base = checkpoint.config_dict(base_config)
    base.pop("sweep", None)
    return json.loads(json.dumps({"base": base, "axes": {k: list(v) for k, v in axes.items()}}))


def _check_same_sweep(stored: dict[str, Any], spec: dict[str, Any], workdir: Path) -> None:
    """Refuses to resume the sweep ``stored`` with ``spec``, naming every field that differs.

    As for runs, ``num_rounds`` may grow and the checkpointing fields may change.
    """
    old, new = dict(stored.get("base", {})), dict(spec["base"])
    for key in ("checkpoint_every", "checkpoint_keep"):
        old.pop(key, None)
        new.pop(key, None)
    old_rounds, new_rounds = old.pop("num_rounds", None), new.pop("num_rounds", None)
    diffs = checkpoint.config_differences(old, new)
    if not isinstance(new_rounds, int) or new_rounds < (old_rounds or 0):
        diffs.append(f"num_rounds: {old_rounds} -> {new_rounds} (num_rounds may only grow)")
    old_axes, new_axes = stored.get("axes", {}), spec["axes"]
    diffs += [f"sweep.{d}" for d in checkpoint.config_differences(old_axes, new_axes)]
    if list(old_axes) != list(new_axes) and set(old_axes) == set(new_axes):
        diffs.append(f"sweep axes order: {list(old_axes)} -> {list(new_axes)}")
    if diffs:
        raise checkpoint.ConfigMismatchError(
            f"{workdir} already holds a different sweep; these fields differ (stored -> now):\n  "
            + "\n  ".join(diffs)
            + "\nRun the stored sweep to resume it, pass --overwrite to start afresh, or "
            "choose another --workdir."
        )


def _group_dir(workdir: Path, index: int) -> Path:
    """Where group ``index`` keeps its checkpoints (``Checkpointer`` adds ``checkpoints/``)."""
    return workdir / checkpoint.CHECKPOINT_DIR / f"group{index}"


def _one_device(config):
    config = copy.deepcopy(config)
    config.num_devices = 1
    return config


def _numbers(config, prefix: str) -> dict[str, float]:
    """Numeric (non-bool) optimizer arguments of ``config.<prefix>`` plus its learning rate."""
    spec = config[prefix]
    out = {"learning_rate": float(spec.learning_rate)}
    for k, v in _kwargs(spec.kwargs).items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _run_group(members, workdir: Path, datasets, **kwargs):
    # Stream-major order: members sharing a (seed, data seed) stream, and so every cohort,
    # are contiguous.
    streams = [_stream(c) for _, _, c in members]
    order = sorted(range(len(members)), key=lambda i: streams.index(streams[i]))
    results = _run_streams([members[i] for i in order], workdir, datasets, **kwargs)
    out: list[Any] = [None] * len(members)
    for j, i in enumerate(order):
        out[i] = results[j]
    return out


def _stream(config) -> tuple[int, int]:
    """What fixes a member's cohorts and keys: its seed and its data seed."""
    return int(config.seed), data_seed_of(config)


def _run_streams(
    members,
    workdir: Path,
    datasets: dict[int, data.FederatedData],
    *,
    progress: bool,
    seed_strategy: str,
    ckpt_dir: Path | None = None,
    every: int = 0,
    keep: int = 3,
    spec: dict[str, Any] | None = None,
):
    """One program for members that differ only in vectorized axes, sorted by stream.

    A stream is a (seed, data seed) pair. Members sharing one share every cohort and key:
    they are vmapped with the cohort unbatched, so each client's local loop keeps one step
    count for all of them (a batched loop bound would run every member to the longest and
    select the whole state each step). The streams run one after another (``lax.map``) or
    vmapped (``seed_strategy``), each on the data of its data seed (``datasets``): with data
    on the device, every data seed's examples sit in one shared array (identical examples
    once), and each stream's cohort indices point into it.
    """
    t_start = time.perf_counter()
    configs = [c for _, _, c in members]
    config = _one_device(configs[0])
    data_seeds = sorted({data_seed_of(c) for c in configs})
    exps = {d: build_experiment(config, datasets[d]) for d in data_seeds}
    exp = exps[data_seeds[0]]
    _check_same_shapes(exps)
    model = exp.model
    trains = {d: e.data.train for d, e in exps.items()}
    # Members evaluate on the test clients of their data seed: all of them, or (with
    # eval_max_clients) the sample their seed draws, as their solo runs would.
    member_eval = [(data_seed_of(c), int(c.seed) if c.eval_max_clients else -1) for c in configs]
    tests = {
        k: eval_clients(exps[k[0]].data.test, configs[member_eval.index(k)])
        for k in dict.fromkeys(member_eval)
    }
    m_count = len(members)
    fedsgd = config.algorithm == "fedsgd"

    algorithm = make_algorithm(config, model, strategy=exp.strategy, mesh=None, inject=True)

    server_hp = {
        k: jnp.asarray([_numbers(c, "server")[k] for c in configs], jnp.float32)
        for k in _numbers(config, "server")
    }
    client_hp = (
        {}
        if fedsgd
        else {
            k: jnp.asarray([_numbers(c, "client")[k] for c in configs], jnp.float32)
            for k in _numbers(config, "client")
        }
    )
    # FedProx's and DP-FedAvg's numbers, traced where some member uses them.
    extras = [algorithm_numbers(c) for c in configs]
    for k in ALGORITHM_FIELDS:
        if any(e[k] for e in extras):
            client_hp[k] = jnp.asarray([e[k] for e in extras], jnp.float32)
    member_streams = [_stream(c) for c in configs]
    streams = list(dict.fromkeys(member_streams))
    per_stream = m_count // len(streams)
    if [streams[i // per_stream] for i in range(m_count)] != member_streams:
        raise AssertionError(f"members are not a stream-major grid: {member_streams}")
    member_data = [d for _, d in member_streams]
    roots = jax.vmap(jax.random.key)(jnp.asarray([s for s, _ in member_streams], jnp.uint32))
    # The streams split over devices (``num_devices``; 0: every local device), never more
    # devices than streams; a share that does not divide evenly is padded with copies of
    # stream 0 whose results are dropped.
    wanted = int(configs[0].get("num_devices", 0) or 0) or len(jax.local_devices())
    n_dev = max(1, min(wanted, len(streams), len(jax.local_devices())))
    mesh = None
    if n_dev > 1:
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:n_dev]), (STREAM_AXIS,))
    pad = -len(streams) % n_dev
    padded_seeds = [s for s, _ in streams] + [streams[0][0]] * pad
    stream_roots = jax.vmap(jax.random.key)(jnp.asarray(padded_seeds, jnp.uint32))
    if seed_strategy == "auto":
        seed_strategy = "sequential" if jax.default_backend() == "cpu" else "vmap"

    def init_member(root, chp, shp):
        state = algorithm.init(model.init(jax.random.fold_in(root, 0)))
        return state._replace(
            opt_state=optimizers.with_hyperparams(state.opt_state, shp), client_hparams=chp
        )

    states = jax.jit(jax.vmap(init_member))(roots, client_hp, server_hp)
    alive = jnp.ones((m_count,), bool)

    on_device = data_on_device(config.data_on_device, trains[data_seeds[0]])
    row_maps: dict[int, np.ndarray] = {}
    device_examples = 0
    if on_device:
        if len(data_seeds) == 1:
            pool = trains[data_seeds[0]].all_examples()
        else:  # every data seed's examples in one array, each distinct example once
            pool, maps = data.packing.shared_examples([trains[d] for d in data_seeds])
            row_maps = dict(zip(data_seeds, maps, strict=True))
            if config.data_on_device == "auto" and _nbytes(pool) > DEVICE_DATA_BUDGET:
                on_device, pool, row_maps = False, None, {}
    examples = (jax.device_put(pool),) if on_device else ()
    if on_device:
        device_examples = len(next(iter(pool.values())))

    def run_streams(args, r, examples):
        def one_stream(a):
            st, cohort, root = a
            if examples:
                cohort = with_examples(algorithm, cohort, examples[0])
            key = jax.random.fold_in(root, r)
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
        new, metrics = jax.tree.map(lambda a: a.reshape((m_count,) + a.shape[2:]), (new, metrics))
        finite = jnp.isfinite(metrics["train_loss"])
        for leaf in jax.tree.leaves(new.params):
            finite &= jnp.all(jnp.isfinite(leaf.reshape(m_count, -1)), axis=1)
        ok = alive & finite

        def keep(n, o):
            return jnp.where(ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

        return jax.tree.map(keep, new, states), ok, metrics["train_loss"]

    # On a mesh, member states live replicated between rounds (one compiled program: the
    # first round's inputs look like every later round's).
    out_shardings = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}
    round_fn = jax.jit(sweep_round, donate_argnums=0, **out_shardings)
    states, alive = replicate((states, alive), mesh)
    # One evaluator per set of test clients, vmapped over the members evaluated on it.
    evaluators = {
        k: jax.jit(jax.vmap(make_evaluator(model, t.num_clients), (0, None, None, None)))
        for k, t in tests.items()
    }
    eval_arrays = {
        k: data.pack_eval(t, batch_size=config.eval_batch_size) for k, t in tests.items()
    }
    eval_members = {
        k: np.asarray([m for m in range(m_count) if member_eval[m] == k]) for k in tests
    }
    max_steps = max(e.num_steps for e in exps.values())
    bucket_steps = {d: step_bucketer(config, trains[d], max_steps) for d in data_seeds}

    labels = [label for label, _, _ in members]
    ckpt, meta = None, None
    if ckpt_dir is not None:
        ckpt = checkpoint.Checkpointer(ckpt_dir, keep=keep)
        latest = ckpt.latest_round()
        if latest is not None:
            meta = ckpt.restore_meta(latest)
            if meta.get("labels") != labels:
                raise checkpoint.ConfigMismatchError(
                    f"{ckpt.directory} holds a checkpoint of members {meta.get('labels')}, "
                    f"not {labels}; pass --overwrite to start afresh."
                )
    logs = []
    for (label, _, _), cfg in zip(members, configs, strict=True):
        d = workdir / label
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(cfg.to_json(indent=2) + "\n")
        logs.append(RunLog(d))
    diverged: list[int | None] = [None] * m_count
    pending: list[tuple[int, jax.Array, jax.Array]] = []
    real_slots = total_slots = 0
    wall_before = 0.0
    start = 0
    if meta is not None:
        start = int(meta["round"])
        restored = ckpt.restore_state(start, {"states": states, "alive": alive})
        states, alive = replicate((restored["states"], restored["alive"]), mesh)
        logs = [RunLog(log.workdir, h) for log, h in zip(logs, meta["histories"], strict=True)]
        diverged = meta["diverged"]
        pending = [
            (rr, jnp.asarray(lo, jnp.float32), jnp.asarray(al, bool))
            for rr, lo, al in meta["pending"]
        ]
        real_slots, total_slots = meta["real_slots"], meta["total_slots"]
        wall_before = meta["wall_s"]
        if progress:
            print(f"  resuming {m_count} member(s) after round {start}")
    t_start -= wall_before

    def save_checkpoint(r: int) -> None:
        ckpt.save(
            r,
            {"states": states, "alive": alive},
            {
                "sweep": spec,
                "labels": labels,
                "round": r,
                "histories": [log.history for log in logs],
                "diverged": diverged,
                "pending": [
                    [rr, np.asarray(lo).tolist(), np.asarray(al).tolist()] for rr, lo, al in pending
                ],
                "real_slots": real_slots,
                "total_slots": total_slots,
                "wall_s": time.perf_counter() - t_start,
            },
        )

    if meta is None and ckpt is not None:
        save_checkpoint(0)  # from here on a killed sweep resumes instead of being refused
    for log in logs:  # a resumed member drops evaluations appended after the checkpoint
        log.start()
    slots = config.clients_per_round
    pack_kw = dict(**packing_of(config), num_clients=slots)
    pack = data.packing.pack_cohort_indices if on_device else data.pack_cohort
    for r in range(start + 1, config.num_rounds + 1):
        ids = [sample_clients(s, r, trains[d].num_clients, slots) for s, d in streams]
        steps = max(bucket_steps[d](i) for (_, d), i in zip(streams, ids, strict=True))
        cohorts = []
        for (s, d), i in zip(streams, ids, strict=True):
            c = pack(trains[d], i, num_steps=steps, seed=s, round_num=r, **pack_kw)
            cohorts.append(data.packing.remap_cohort(c, row_maps[d]) if row_maps else c)
            real_slots += int(c.mask.sum())
            total_slots += c.mask.size
        stacked = jax.tree.map(lambda *a: np.stack(a), *cohorts, *cohorts[:1] * pad)
        states, alive, losses = round_fn(
            states, alive, stacked, stream_roots, jnp.asarray(r, jnp.int32), *examples
        )
        pending.append((r, losses, alive))
        if r % config.eval_every and r != config.num_rounds:
            if ckpt is not None and every > 0 and r % every == 0:
                save_checkpoint(r)
            continue
        # One host sync per evaluation, as in simulate.
        rounds = [rr for rr, _, _ in pending]
        loss_rows = np.asarray(jnp.stack([lo for _, lo, _ in pending]), np.float64)
        alive_rows = np.asarray(jnp.stack([al for _, _, al in pending]))
        for m in range(m_count):
            if diverged[m] is None and not alive_rows[:, m].all():
                diverged[m] = rounds[int(np.argmin(alive_rows[:, m]))]
        evals = _evaluate(states.params, evaluators, eval_arrays, eval_members, m_count)
        elapsed = time.perf_counter() - t_start
        newly_dead = []
        for m in range(m_count):
            if diverged[m] is not None:
                continue
            ev = summarize_eval(*evals[m])
            if not math.isfinite(ev["test_loss"]):
                diverged[m] = r
                newly_dead.append(m)
                continue
            logs[m].record(r, loss_rows[:, m].mean(), ev, elapsed)
        if newly_dead:
            alive = alive.at[jnp.asarray(newly_dead)].set(False)
        pending.clear()
        if progress:
            live = [
                log.history[-1]["test_accuracy"]
                for log in logs
                if log.history and log.history[-1]["round"] == r
            ]
            best = max(live) if live else float("nan")
            print(
                f"  round {r}: {m_count - sum(d is not None for d in diverged)}/{m_count} "
                f"members alive, best test accuracy {best:.4f}"
            )
        if ckpt is not None and ((every > 0 and r % every == 0) or r == config.num_rounds):
            save_checkpoint(r)
    if ckpt is not None:
        ckpt.close()

    wall = time.perf_counter() - t_start
    results = []
    params = jax.device_get(states.params)
    for m, (label, values, _) in enumerate(members):
        summary = logs[m].summary(
            config,
            wall,
            strategy=exp.strategy,
            devices=n_dev,
            compiles=round_fn._cache_size(),
            data_on_device=on_device,
            padding_waste=round(1 - real_slots / max(total_slots, 1), 4),
            sweep_members=m_count,
            sweep_values=values,
            data_seed=member_data[m],
            device_examples=device_examples,
            diverged=diverged[m] is not None,
            diverged_round=diverged[m],
        )
        logs[m].write_tensorboard()
        results.append(
            {
                "label": label,
                "values": values,
                "summary": summary,
                "history": logs[m].history,
                "params": jax.tree.map(lambda a, m=m: a[m], params),
            }
        )
    return results


def _evaluate(params, evaluators, eval_arrays, eval_members, m_count):
    """Every member's evaluation sums, from its own test clients (``eval_members`` maps each
    set of test clients to the members evaluated on it)."""
    out: list[Any] = [None] * m_count
    for k, idx in eval_members.items():
        sub = params if len(idx) == m_count else jax.tree.map(lambda a, i=idx: a[i], params)
        sums = jax.device_get(evaluators[k](sub, *eval_arrays[k]))
        for j, m in enumerate(idx):
            out[m] = tuple(a[j] for a in sums)
    return out


def _check_same_shapes(exps) -> None:
    """Data seeds vectorized together must give models and cohorts of the same shapes."""
    (d0, e0), *rest = exps.items()
    for d, e in rest:
        if (
            e.data.train.element_spec != e0.data.train.element_spec
            or e.data.num_classes != e0.data.num_classes
        ):
            raise ValueError(
                f"data_seed {d} gives features {e.data.train.element_spec} and "
                f"{e.data.num_classes} classes but data_seed {d0} gives "
                f"{e0.data.train.element_spec} and {e0.data.num_classes}; a data_seed axis "
                "needs datasets of the same shapes."
            )


def _nbytes(arrays) -> int:
    return sum(int(a.nbytes) for a in arrays.values())

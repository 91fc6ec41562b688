"""Hyperparameter sweeps: many members of a grid trained by one compiled program.

``run_sweep(base_config, {"client.learning_rate": [0.01, 0.1], "seed": [0, 1]}, workdir)``
trains the grid product of the axes. Axes that change no shape are vectorized: the seed, the
data seed, and every hyperparameter the algorithm declares (``AlgorithmSpec.hparams``: for
FedAvg/FedOpt the client and server learning rates, numeric optimizer arguments, FedProx's mu,
the DP clip norm and noise multiplier). One ``jax.jit(jax.vmap(round))`` trains every member
at once, each member's numbers in its ``state.hparams``. Any other axis (model, cohort size,
batch size, ...) splits the grid into groups run one after another, each group vectorized over
its own members. The round loop is the driver's (``driver.run_loop``), as for a plain run.

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

import contextlib
import copy
import itertools
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections

from fedjax_sim import algorithms, checkpoint, data, distributed
from fedjax_sim.driver import privacy
from fedjax_sim.driver.cohorts import eval_clients
from fedjax_sim.driver.loop import Resume, execution_summary, run_loop
from fedjax_sim.driver.programs import VectorProgram
from fedjax_sim.driver.runlog import RunLog
from fedjax_sim.simulation import (
    build_algorithm,
    build_experiment,
    cohort_source,
    data_seed_of,
    kwargs_of,
    make_evaluator,
)

SEED_AXES = ("seed", "data_seed")  # vectorized for every algorithm
# Fields that may not be swept: they name the sweep or only the driver's bookkeeping.
_FIXED = ("sweep", "num_devices", "cpu_devices", "checkpoint_every", "checkpoint_keep")
SPEC_FILE = "sweep_spec.json"


def hparam_names(config) -> set[str]:
    """The hyperparameters of the algorithm ``config`` names (its vectorized axes)."""
    return set(algorithms.get_spec(config.algorithm).hparams(config))


def is_vector_axis(path: str, config) -> bool:
    """Whether sweeping ``path`` keeps every shape for ``config``'s algorithm, so members share
    one compiled program."""
    return path in SEED_AXES or path in hparam_names(config)


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
    with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
        node[last] = value


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
        if not _has(base_config, path) and not _new_key_ok(path):
            raise ValueError(
                f"unknown config field {path!r} in the sweep axes; sweepable fields are the "
                "config's (e.g. seed, data_seed, client.learning_rate, server.learning_rate, "
                "client.kwargs.momentum, client.proximal_mu, dp.clip_norm, model.name, "
                "clients_per_round)."
            )
        base_value = _get(base_config, path) if _has(base_config, path) else None
        numeric = _is_number(base_value) or path.startswith(("client.kwargs.", "server.kwargs."))
        bad = [v for v in values if not (_is_number(v) or isinstance(v, bool))]
        if numeric and bad:  # optimizer arguments and numeric fields take numbers
            raise ValueError(f"sweep axis {path!r} takes numbers; got {bad[0]!r}.")
        if path in SEED_AXES:
            if path == "seed" and not all(isinstance(v, int) for v in values):
                raise ValueError(f"seeds must be integers, got {list(values)}.")
            if path == "data_seed" and not all(isinstance(v, int) and v >= 0 for v in values):
                raise ValueError(f"data seeds must be integers >= 0, got {list(values)}.")


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _new_key_ok(path: str) -> bool:
    """Fields inside a ``kwargs`` group (arguments passed through) may be new."""
    parts = path.split(".")
    return len(parts) >= 2 and parts[-2] in ("kwargs", "algorithm_kwargs")


def _check_member(config, axes) -> None:
    """Refuses, before any compute, a member whose vectorized values are not numbers, and an
    axis that is some algorithm's hyperparameter but not this member's: its values would
    train identical members (e.g. a client learning rate for FedSGD)."""
    own = hparam_names(config)
    for path in axes:
        if (path in own or path in SEED_AXES) and not _is_number(v := _get(config, path)):
            raise ValueError(f"sweep axis {path!r} is vectorized and takes numbers; got {v!r}.")
    others = set()
    for spec in algorithms.ALGORITHMS.values():
        try:
            others |= set(spec.hparams(config))
        except Exception:  # a config another (registered) algorithm cannot read
            continue
    unused = sorted(p for p in axes if p in others and p not in own)
    if unused:
        raise ValueError(
            f"algorithm {config.algorithm!r} does not use {', '.join(unused)}; its "
            f"hyperparameters are {', '.join(sorted(own)) or '(none)'} (sweep those or seed)."
        )


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
        _check_member(config, axes)
        out.append((member_label(values), values, config))
    return out


def _group_key(config, axes) -> str:
    return json.dumps(
        {p: _get(config, p) for p in axes if not is_vector_axis(p, config)},
        sort_keys=True,
        default=str,
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
      overwrite: start afresh: once the grid is checked, the earlier results in ``workdir``
        move to ``workdir/previous/``.
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
    if distributed.is_multiprocess():
        raise ValueError(
            "a sweep runs in one process: run its members as separate multi-process runs "
            "(fedjax-sim run), or one sweep per host."
        )
    members = member_configs(base_config, axes)
    if federated_data is not None and "data_seed" in axes:
        raise ValueError(
            "a data_seed axis varies the dataset the config names, but federated_data fixes "
            "the data; drop one of them."
        )
    workdir = Path(workdir)
    created = checkpoint.check_writable(workdir)
    every = int(base_config.get("checkpoint_every", 0) or 0)
    keep = int(base_config.get("checkpoint_keep", 3) or 3)
    spec = _sweep_spec(base_config, axes)
    spec_path = workdir / SPEC_FILE
    if not overwrite:
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
    # Build every group's data (one dataset per data seed) and experiments, and validate
    # every member's settings before any training (bad cohort sizes, unknown models, noise
    # without clipping...).
    prepared: dict[str, _Group] = {}
    try:
        for key, idx in groups.items():
            config = _group_config([members[i][2] for i in idx])
            exps = {}
            for d in sorted({data_seed_of(members[i][2]) for i in idx}):
                fd = federated_data
                if fd is None:
                    fd = data.get_federated_data(
                        config.dataset.name, seed=d, **kwargs_of(config.dataset.kwargs)
                    )
                exps[d] = build_experiment(config, fd, num_devices=1, sweep=True)
            _check_same_shapes(exps)
            exp = next(iter(exps.values()))
            for i in idx:
                config = members[i][2]
                algo = build_algorithm(config, exp.task, exp.executor, exp.data.train.num_clients)
                declared = set(algorithms.get_spec(config.algorithm).hparams(config))
                if set(algo.hparams) != declared:  # a sweep would silently drop the others
                    raise ValueError(
                        f"algorithm {config.algorithm!r}: its AlgorithmSpec.hparams names "
                        f"{sorted(declared)} but the algorithm it builds keeps "
                        f"{sorted(algo.hparams)} in state.hparams; make them the same."
                    )
            members_of = [members[i] for i in idx]
            prepared[key] = _prepare_group(members_of, exps, seed_strategy=seed_strategy)
    except Exception:
        checkpoint.remove_created(created)  # leave no empty workdir behind a refused sweep
        raise
    if overwrite:  # the grid is checked: the earlier results move aside, nothing is lost
        previous = checkpoint.set_aside(workdir)
        if previous is not None and progress:
            print(f"fedjax-sim sweep: moved the earlier results to {previous}")
    checkpoint.write_lines_atomically(spec_path, [json.dumps(spec, indent=2)])
    results: list[dict[str, Any] | None] = [None] * len(members)
    all_finished = True
    for gi, (key, idx) in enumerate(groups.items()):
        if progress:
            print(f"fedjax-sim sweep: group {gi + 1}/{len(groups)}: {len(idx)} member(s)")
        out, finished = _train_group(
            prepared.pop(key),  # dropped once trained: its device examples go with it
            workdir,
            progress=progress,
            ckpt_dir=group_dirs[key] if every > 0 or resumable[key] else None,
            every=every,
            keep=keep,
            spec=spec,
        )
        all_finished &= finished
        for i, res in zip(idx, out, strict=True):
            results[i] = res
    index_path = workdir / "sweep.json"
    if all_finished and index_path.exists():  # a finished sweep called again: as written
        index = json.loads(index_path.read_text())
        return {"members": results, "groups": len(groups), "wall_s": index["wall_s"]}
    wall = time.perf_counter() - t0
    index = {
        "axes": {k: list(v) for k, v in axes.items()},
        "groups": len(groups),
        "wall_s": round(wall, 3),
        "members": [{"label": r["label"], **r["summary"]} for r in results],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    index_path.write_text(json.dumps(index, indent=2) + "\n")
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
    for key in checkpoint.RESUMABLE_FIELDS:
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
            f"{workdir} already holds a different sweep; these fields differ (stored -> now): "
            + "; ".join(diffs)
            + ". Run the stored sweep to resume it, pass --overwrite to start afresh, or "
            "choose another --workdir."
        )


def _group_dir(workdir: Path, index: int) -> Path:
    """Where group ``index`` keeps its checkpoints (``Checkpointer`` adds ``checkpoints/``)."""
    return workdir / checkpoint.CHECKPOINT_DIR / f"group{index}"


def _group_config(configs):
    """The config a group's algorithm is built from: the first member's, with every
    hyperparameter that is 0 there set to another member's nonzero value, so a piece that a
    built-in 0 leaves out (FedProx's term, clipping, noise) is in the program when any member
    uses it; each member's own values are in its ``state.hparams``."""
    config = copy.deepcopy(configs[0])
    spec = algorithms.get_spec(config.algorithm)
    values = [spec.hparams(c) for c in configs]
    for k, v in values[0].items():
        nonzero = [h[k] for h in values[1:] if h[k]]
        if not v and nonzero:
            _set(config, k, nonzero[0])
    return config


class _Group(NamedTuple):
    """A group ready to train: its members in stream-major order (``order[j]`` is the
    position in the group of the ``j``-th), their program, source, evaluator and accountants,
    and the rounds they train (``dp.target_epsilon`` may stop them early)."""

    members: list
    order: list[int]
    exp: Any
    source: Any
    program: VectorProgram
    evaluator: Any
    accountants: list
    num_rounds: int


def _prepare_group(members, exps: dict, *, seed_strategy: str) -> _Group:
    """Builds a group's program and checks it (a trace of round 1: nothing compiled, run or
    placed on a device) before the sweep touches its workdir."""
    # Stream-major order: members sharing a (seed, data seed) stream, and so every cohort,
    # are contiguous.
    streams = [_stream(c) for _, _, c in members]
    order = sorted(range(len(members)), key=lambda i: streams.index(streams[i]))
    members = [members[i] for i in order]
    configs = [c for _, _, c in members]
    config = configs[0]
    exp = exps[min(exps)]
    algo_spec = algorithms.get_spec(config.algorithm)
    member_streams = [_stream(c) for c in configs]
    source = cohort_source(
        exp,
        {d: e.data.train for d, e in exps.items()},
        list(dict.fromkeys(member_streams)),
        max(e.num_steps for e in exps.values()),
    )
    program = VectorProgram(
        exp.algorithm,
        exp.model,
        member_streams,
        [algo_spec.hparams(c) for c in configs],
        examples=source.examples,
        num_devices=int(config.get("num_devices", 0) or 0),
        seed_strategy=seed_strategy,
    )
    # Members evaluate on the test clients of their data seed: all of them, or (with
    # eval_max_clients) the sample their seed draws, as their solo runs would.
    member_eval = [(data_seed_of(c), int(c.seed) if c.eval_max_clients else -1) for c in configs]
    keys = list(dict.fromkeys(member_eval))
    tests = {k: eval_clients(exps[k[0]].data.test, configs[member_eval.index(k)]) for k in keys}
    trains = {k: exps[k[0]].data.train for k in keys}
    evaluator = make_evaluator(
        exp, tests, trains, member_eval, vectorized=True, data_seeds={k: k[0] for k in keys}
    )
    population = exp.data.train.num_clients
    accountants = [privacy.accountant_of(c, population) for c in configs]
    limits = {
        privacy.rounds_within_budget(c, a, config.num_rounds)
        for c, a in zip(configs, accountants, strict=True)
    }
    if len(limits) > 1:
        raise ValueError(
            f"dp.target_epsilon stops these sweep members after different rounds "
            f"({sorted(limits)}); one program trains them together: sweep the noise "
            "multiplier without a target, or run each member alone."
        )
    program.check(source.preview(1), 1)
    return _Group(members, order, exp, source, program, evaluator, accountants, limits.pop())


def _stream(config) -> tuple[int, int]:
    """What fixes a member's cohorts and keys: its seed and its data seed."""
    return int(config.seed), data_seed_of(config)


def _train_group(
    group: _Group,
    workdir: Path,
    *,
    progress: bool,
    ckpt_dir: Path | None = None,
    every: int = 0,
    keep: int = 3,
    spec: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Trains a prepared group with the driver loop; returns its members' results in the
    group's order and whether it had finished before (a rerun: nothing trained, the members'
    summaries stay as written)."""
    t_start = time.perf_counter()
    members, program, source, num_rounds = (
        group.members,
        group.program,
        group.source,
        group.num_rounds,
    )
    config = members[0][2]
    labels = [label for label, _, _ in members]
    resume = Resume(ckpt_dir, every=every, keep=keep, identity={"sweep": spec, "labels": labels})
    if resume.meta is not None and resume.meta.get("labels") != labels:
        resume.close()
        raise checkpoint.ConfigMismatchError(
            f"{resume.ckpt.directory} holds a checkpoint of members {resume.meta.get('labels')}, "
            f"not {labels}; pass --overwrite to start afresh."
        )
    logs = []
    for (label, _, cfg), acct in zip(members, group.accountants, strict=True):
        d = workdir / label
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(cfg.to_json(indent=2) + "\n")
        logs.append(RunLog(d, accountant=acct))
    out = run_loop(
        program,
        source,
        group.evaluator,
        logs,
        resume,
        num_rounds=num_rounds,
        eval_every=config.eval_every,
        raise_on_divergence=False,
        divergence_factor=float(config.get("divergence_factor", 0.0)),
        progress=progress,
        wall_start=t_start,
    )
    finished = (
        resume.round is not None
        and resume.round >= num_rounds
        and all((workdir / label / "summary.json").exists() for label in labels)
    )
    results: list[Any] = [None] * len(members)
    params = jax.device_get(out.states.params)
    for m, (label, values, cfg) in enumerate(members):
        if finished:  # a finished group called again: its summaries (timings) stay as written
            summary = json.loads((workdir / label / "summary.json").read_text())
        else:
            summary = logs[m].summary(
                num_rounds,
                out.wall_s,
                **execution_summary(group.exp.strategy, program, source),
                strategy_reason=(
                    "configured"
                    if cfg.strategy != "auto"
                    else f"rule ({group.exp.strategy}): a sweep's auto is not measured"
                ),
                sweep_members=program.num_members,
                sweep_values=values,
                data_seed=data_seed_of(cfg),
                device_examples=source.num_device_examples,
                diverged=out.diverged[m] is not None,
                diverged_round=out.diverged[m],
            )
        results[group.order[m]] = {
            "label": label,
            "values": values,
            "summary": summary,
            "history": logs[m].history,
            "params": jax.tree.map(lambda a, m=m: a[m], params),
        }
    return results, finished


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

"""``simulate(config, workdir)``: config -> registries -> the driver loop, for one run.

``build_experiment`` turns a config into data, model, task, executor and algorithm (through the
registries; nothing runs). ``simulate`` checks the workdir and any checkpoint, then hands the
parts to ``driver.run_loop`` with a ``SoloProgram``: one member, no vmap.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from fedjax_sim import algorithms, checkpoint, data, distributed, features, models, pretrain
from fedjax_sim.aggregators.adversary import Backdoor, backdoor_settings, check_backdoor
from fedjax_sim.algorithms.base import AsyncSettings, BuildContext
from fedjax_sim.core import execution
from fedjax_sim.core.execution import Executor, client_mesh
from fedjax_sim.core.task import Task, get_task
from fedjax_sim.core.types import FederatedAlgorithm, Model, tree_bytes
from fedjax_sim.driver import autotune, client_states, privacy
from fedjax_sim.driver.cohorts import (
    CohortSource,
    data_on_device,
    eval_clients,
    packing_of,
    sample_clients,
)
from fedjax_sim.driver.evaluation import Evaluator, Personalization
from fedjax_sim.driver.loop import Resume, TrainingDiverged, execution_summary, run_loop
from fedjax_sim.driver.programs import SoloProgram
from fedjax_sim.driver.runlog import RunLog
from fedjax_sim.driver.systems import cohort_capacity, systems_of
from fedjax_sim.optimizers import optimizer_from_config

__all__ = [
    "Experiment",
    "TrainingDiverged",
    "backdoor_of",
    "build_algorithm",
    "build_experiment",
    "data_on_device",
    "data_seed_of",
    "format_summary",
    "packing_of",
    "sample_clients",
    "simulate",
]


class Experiment(NamedTuple):
    """Everything a run is built from."""

    config: ml_collections.ConfigDict
    data: data.FederatedData
    model: Model
    task: Task
    algorithm: FederatedAlgorithm
    num_steps: int  # local steps of the longest client
    executor: Executor  # strategy (resolved), chunk size, the mesh the cohort is split over
    cohort_slots: int  # clients per packed cohort (a multiple of the device count)
    model_bytes: int  # bytes one client downloads a round (AlgorithmSpec.messages: the model)
    async_settings: AsyncSettings | None  # an asynchronous algorithm's buffer (FedBuff)
    upload_bytes: int | None = None  # one client's upload (compressed / masked, extras beside)
    host_states: bool = False  # per-client state kept on the host (driver.client_states)

    @property
    def strategy(self) -> str:
        return self.executor.strategy

    @property
    def mesh(self):
        return self.executor.mesh


# Where a plain run records how its ``auto`` strategy was decided (a resume reuses it).
STRATEGY_FILE = "strategy.json"
# Config fields that change no compiled round, left out of ``auto``'s cache key (as is the
# client learning rate): a sweep of separate runs over them measures once.
AUTO_KEY_IGNORED = (
    "num_rounds", "eval_every", "seed", "data_seed", "checkpoint_every", "checkpoint_keep",
    "divergence_factor", "strategy", "eval_batch_size",
)  # fmt: skip


def with_strategy(exp: Experiment, strategy: str) -> Experiment:
    """``exp`` with its executor's strategy set to ``strategy`` and the algorithm rebuilt
    (``exp`` itself where that is its strategy already)."""
    if strategy == exp.executor.strategy:
        return exp
    executor = exp.executor._replace(strategy=strategy).check()
    n = exp.data.train.num_clients
    pipeline = features.pipeline_of(exp.config, exp.task, n)
    algorithm = build_algorithm(exp.config, exp.task, executor, n, pipeline)
    return exp._replace(executor=executor, algorithm=algorithm)


def auto_strategy(
    exp: Experiment, source: CohortSource, resumed: Path | None
) -> tuple[Experiment, autotune.Choice, SoloProgram]:
    """A plain run's client strategy and its program: the config's strategy, or for ``auto``
    the fastest measured on the first round's cohort (``driver.autotune``, cached on disk; a
    measured winner's program is returned compiled), or, resuming the run in ``resumed``, the
    one it started with (so a resumed run stays bitwise the same)."""
    config = exp.config

    def program_of(e: Experiment) -> SoloProgram:
        host = (e.cohort_slots, e.data.train.num_clients) if e.host_states else None
        return SoloProgram(e.algorithm, e.model, config.seed, e.mesh, source.examples, host)

    if config.strategy != "auto":
        return exp, autotune.Choice(exp.strategy, "configured"), program_of(exp)
    recorded = resumed / STRATEGY_FILE if resumed is not None else None
    if recorded is not None and not recorded.exists():  # a run from before strategy.json
        why = f"resumed with the rule's strategy, as a run without {STRATEGY_FILE} started"
        return exp, autotune.Choice(exp.strategy, why), program_of(exp)
    if recorded is not None:
        try:
            strategy = json.loads(recorded.read_text())["strategy"]
            execution.resolve_strategy(strategy)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{recorded} is unreadable ({e}); set strategy explicitly to resume this run."
            ) from e
        why = f"resumed with the strategy the run started with ({recorded.name})"
        exp = with_strategy(exp, strategy)
        return exp, autotune.Choice(strategy, why), program_of(exp)
    if exp.async_settings is not None:  # a round is a buffer of FedBuff's updates
        why = f"rule ({exp.strategy}): asynchronous rounds"
        return exp, autotune.Choice(exp.strategy, why), program_of(exp)
    cohorts = source.preview(1)
    best: dict[str, tuple[Experiment, SoloProgram, float]] = {}  # the fastest so far only

    def time_round(strategy: str, give_up: float) -> float:
        e = with_strategy(exp, strategy)
        program = program_of(e)
        if best:  # the examples already on the device, not a copy per candidate
            program.share_examples(next(iter(best.values()))[1])

        def prepare():
            return program.init()

        def run(states, alive):
            jax.block_until_ready(program.step(states, alive, cohorts, 1))

        seconds = autotune.best_of(run, prepare, autotune.GIVE_UP * give_up)
        if seconds < give_up:
            best.clear()
            best[strategy] = (e, program, seconds)
        return seconds

    per_device = -(-exp.cohort_slots // exp.executor.num_devices)
    choice = autotune.choose(
        auto_key_fields(exp, cohorts[0]),
        autotune.candidates(per_device, exp.executor.chunk_size),
        time_round,
    )
    if choice.strategy in best:  # compiled while measured: the run reuses it
        exp, program, _ = best[choice.strategy]
        return exp, choice, program
    exp = with_strategy(exp, choice.strategy)
    return exp, choice, program_of(exp)


def auto_key_fields(exp: Experiment, cohort) -> dict[str, Any]:
    """What of a run shapes its compiled round, for ``auto``'s cache key (the machine and the
    code are added by ``autotune.cache_key``): the config but ``AUTO_KEY_IGNORED`` and the
    client learning rate, the parameter and cohort shapes, the device count."""
    config = exp.config

    def shapes(tree):
        return jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", tree)

    fields = {k: v for k, v in config.to_dict().items() if k not in AUTO_KEY_IGNORED}
    fields["client"] = {k: v for k, v in kwargs_of(config.client).items() if k != "learning_rate"}
    fields["params"] = shapes(jax.eval_shape(exp.model.init, jax.random.key(0)))
    fields["cohort"] = shapes(cohort)
    fields["mesh"] = exp.executor.num_devices
    return fields


def kwargs_of(node) -> dict[str, Any]:
    return dict(node.to_dict()) if node is not None else {}


def build_algorithm(config, task: Task, executor: Executor, num_clients: int, pipeline=None):
    """The algorithm ``config.algorithm`` names, built by its registry entry over ``pipeline``
    (default: the one the config switches on, ``features.pipeline_of``)."""
    ctx = BuildContext(task=task, executor=executor, num_clients=num_clients, pipeline=pipeline)
    return algorithms.build(config, ctx)


def build_experiment(
    config: ml_collections.ConfigDict,
    federated_data: data.FederatedData | None = None,
    *,
    num_devices: int | None = None,
    sweep: bool = False,
) -> Experiment:
    """Validates ``config`` and builds data, model, task and algorithm from it (no training).

    Args:
      config: an experiment config (see ``configs/default.py``).
      federated_data: use this data instead of the dataset the config names.
      num_devices: devices to split the cohort over (default: the config's ``num_devices``,
        0 meaning every device); a sweep passes 1 (it splits members instead).
      sweep: building a sweep's group (per-client state stays on the device).

    Returns:
      An ``Experiment``.
    """
    check_config_values(config)
    spec = algorithms.get_spec(config.algorithm)  # an unknown name fails before any data loads
    algorithms.check_support(config)  # so does a feature the algorithm does not take
    models.get_builder(config.model.name)  # so does an unknown model
    systems = systems_of(config)  # so do bad sampling / systems settings
    async_settings = spec.async_schedule(config) if spec.async_schedule is not None else None
    finetune_steps_of(config)
    backdoor = backdoor_of(config)  # bad attack.kwargs or a non-classification task fail here
    if federated_data is None:
        federated_data = data.get_federated_data(
            config.dataset.name, seed=data_seed_of(config), **kwargs_of(config.dataset.kwargs)
        )
    train = federated_data.train
    if not 1 <= config.clients_per_round <= train.num_clients:
        raise ValueError(
            f"clients_per_round={config.clients_per_round} but the dataset has "
            f"{train.num_clients} training clients; choose 1..{train.num_clients}."
        )
    model = models.get_model(
        config.model.name,
        num_classes=federated_data.num_classes,
        input_shape=tuple(train.element_spec["x"][0]),
        **kwargs_of(config.model.kwargs),
    )
    task = get_task(config.get("task", "classification"), model)
    if backdoor is not None:
        check_backdoor(
            backdoor,
            task=task.name,
            input_shape=tuple(train.element_spec["x"][0]),
            num_classes=int(federated_data.num_classes),
        )
    num_steps = data.max_local_steps_of(train, **packing_of(config))
    if async_settings is not None:
        capacity = async_settings.buffer_size  # a round is one buffer of updates
    else:
        capacity = cohort_capacity(systems, train.num_clients, config.clients_per_round)
    # Never more devices than clients in a cohort (each device would idle on padding).
    wanted = config.num_devices if num_devices is None else num_devices
    wanted = wanted or execution.default_num_devices()
    mesh = client_mesh(min(wanted, capacity))
    if distributed.is_multiprocess() and (mesh is None or mesh.size != jax.device_count()):
        n = jax.device_count()
        raise ValueError(
            f"a multi-process run splits every cohort over all {n} devices of its "
            f"{jax.process_count()} processes: set num_devices to 0 and clients_per_round >= {n}."
        )
    executor = Executor(config.strategy, config.chunk_size, mesh).check()
    executor = executor._replace(strategy=executor.resolved())  # the summary says which ran
    pipeline = features.pipeline_of(config, task, train.num_clients)
    algorithm = build_algorithm(config, task, executor, train.num_clients, pipeline)
    n_dev = executor.num_devices
    slots = -(-capacity // n_dev) * n_dev
    # What a client receives and sends, as the algorithm declares it, priced by the pipeline
    # that was built: the bytes the records count and the simulated clock transfers.
    messages = spec.messages(config, task, jax.eval_shape(model.init, jax.random.key(0)))
    upload = pipeline.upload_bytes(messages.update, int(config.clients_per_round))
    host_states = client_states_on_host(config, algorithm, model, train, sweep=sweep)
    return Experiment(
        config, federated_data, model, task, algorithm, num_steps, executor, slots,
        tree_bytes(messages.down), async_settings, upload + tree_bytes(messages.extras),
        host_states,
    )  # fmt: skip


def client_states_on_host(
    config, algorithm: FederatedAlgorithm, model: Model, train, *, sweep: bool = False
) -> bool:
    """Whether the run keeps per-client state on the host (``config.client_states``; see
    ``driver.client_states``): ``auto`` keeps it on the device where the host cannot (a
    personalizing algorithm, a sweep), ``host`` there is refused."""
    shapes = jax.eval_shape(lambda k: algorithm.init(model.init(k)), jax.random.key(0))
    setting = str(config.get("client_states", "auto"))
    host = client_states.on_host(
        setting, shapes, train.num_clients, on_demand=getattr(train, "on_demand", False)
    )
    if not host or not (sweep or algorithm.personalize is not None):
        return host
    if setting == "auto":
        return False
    size = f"{client_states.table_bytes(shapes, train.num_clients) / 2**20:.0f} MiB"
    if sweep:
        raise ValueError(
            "a sweep keeps its members' per-client state whole on the device: set "
            f"client_states='device' (the table takes {size} per member) or run the members "
            "as separate runs."
        )
    raise ValueError(
        f"{config.algorithm} evaluates personal models read from its per-client table, which "
        f"a run keeps whole on the device: set client_states='device' (the table takes {size})."
    )


def backdoor_of(config) -> Backdoor | None:
    """The backdoor of a config with ``attack.name = "backdoor"`` (its ``attack.kwargs``,
    checked, and its task checked to be classification), else ``None``."""
    group = config.get("attack")
    if group is None or group.name != "backdoor":
        return None
    bd = backdoor_settings(**group.kwargs.to_dict())
    check_backdoor(bd, task=config.get("task", "classification"))
    return bd


def finetune_steps_of(config) -> int:
    """``eval.finetune_steps`` (0 where a config has no ``eval`` group), checked."""
    group = config.get("eval")
    steps = int(group.get("finetune_steps", 0)) if group is not None else 0
    if steps < 0:
        raise ValueError(f"eval.finetune_steps must be >= 0, got {steps}.")
    return steps


def cohort_source(exp: Experiment, trains: dict, streams: list[tuple[int, int]], max_steps: int):
    """The cohort source of a run (one stream) or a sweep group (several) of ``exp``'s kind."""
    return CohortSource(
        exp.config,
        trains,
        streams,
        slots=exp.cohort_slots,
        max_steps=max_steps,
        model_bytes=exp.model_bytes,
        upload_bytes=exp.upload_bytes,
        slot_multiple=exp.executor.num_devices,
        async_settings=exp.async_settings,
        once_bytes=exp.model.frozen_bytes,
        share_of=distributed.share_of(exp.mesh),
    )


def make_evaluator(
    exp: Experiment,
    tests: dict,
    trains: dict,
    member_sets: list,
    *,
    vectorized: bool,
    data_seeds: dict | None = None,
) -> Evaluator:
    """The evaluator of ``exp``'s members: ``tests`` and ``trains`` (the training clients
    whose data fine-tunes personalized models) keyed like ``member_sets``' entries; with
    personalization where the config or the algorithm asks for it (fine-tuning shuffled by
    each test set's data seed, ``data_seeds``, default the config's)."""
    config = exp.config
    personalization = Personalization(
        finetune_steps=finetune_steps_of(config),
        optimizer=optimizer_from_config(config.client),
        batch_size=config.client.batch_size,
        seed=data_seed_of(config),
        personalize=exp.algorithm.personalize,
        strategy=exp.executor.resolved(),
    )
    return Evaluator(
        exp.task,
        tests,
        member_sets,
        batch_size=config.eval_batch_size,
        vectorized=vectorized,
        train_sets=trains,
        personalization=personalization,
        finetune_seeds=data_seeds,
        backdoor=backdoor_of(config),
    )


def data_seed_of(config: ml_collections.ConfigDict) -> int:
    """The seed of the dataset: ``data_seed`` when set (>= 0), else ``seed``."""
    data_seed = int(config.get("data_seed", -1))
    return data_seed if data_seed >= 0 else int(config.seed)


def check_config_values(config: ml_collections.ConfigDict) -> None:
    """Refuses numbers out of range (before any data loads), one line each saying what to do."""
    c = config.client

    def integer(name: str, value, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")

    for name, value in (
        ("num_rounds", config.num_rounds),
        ("eval_every", config.eval_every),
        ("clients_per_round", config.clients_per_round),
        ("client.batch_size", c.batch_size),
        ("client.local_epochs", c.get("local_epochs", 1)),
        ("eval_batch_size", config.get("eval_batch_size", 1)),
        ("checkpoint_keep", config.get("checkpoint_keep", 1)),
    ):
        integer(name, value, 1)
    for name, value in (
        ("seed", config.seed),
        ("client.max_local_steps", c.get("max_local_steps", 0) or 0),
        ("checkpoint_every", config.get("checkpoint_every", 0) or 0),
        ("eval_max_clients", config.get("eval_max_clients", 0) or 0),
        ("num_devices", config.get("num_devices", 0) or 0),
    ):
        integer(name, value, 0)
    pretrain.check_recipe_data(config)
    factor = config.get("divergence_factor", 0.0)
    if not (isinstance(factor, (int, float)) and (factor == 0 or 1 < factor < math.inf)):
        raise ValueError(
            f"divergence_factor must be 0 (stop only on NaN/inf) or a finite number > 1, got "
            f"{factor!r}."
        )


def simulate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    federated_data: data.FederatedData | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Runs a federated simulation and writes ``config.json`` and ``metrics.jsonl``.

    Everything is checked before ``workdir`` is touched: the config's values, the data, the
    model, the algorithm and a trace of the round. With ``config.checkpoint_every`` > 0 the
    run saves a checkpoint (``workdir/checkpoints``) at the start, every ``checkpoint_every``
    rounds and at the end; a later call on the same ``workdir`` resumes from the newest
    readable one (an unreadable one is named and set aside in ``checkpoints_unreadable/``)
    and ends with bitwise the same state and the same ``metrics.jsonl`` (except ``wall_s``
    and ``train_s``) as a run never interrupted. A checkpoint of a different config is refused
    (``checkpoint.ConfigMismatchError``, naming the fields); ``num_rounds`` may grow. A
    finished run called again returns its results and leaves its ``summary.json`` as it was.

    Args:
      config: the experiment config.
      workdir: output directory (created if needed; refused before any work if unwritable).
      federated_data: optional data to use instead of the config's dataset.
      progress: show a progress bar.
      overwrite: start afresh: once the new run is checked, the earlier results in
        ``workdir`` move to ``workdir/previous/`` (replacing an older ``previous/``).

    Returns:
      The summary dict (also written to ``workdir/summary.json``), with ``params`` (the final
      global model) and ``history`` (the evaluation records).

    Raises:
      TrainingDiverged: the loss became NaN/inf or passed ``divergence_factor`` times the
        initial model's test loss; ``metrics.jsonl`` keeps the evaluations before it.
      RunInterrupted: Ctrl-C (a ``KeyboardInterrupt``), saying where a rerun resumes.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)
    check_config_values(config)
    autotune.mode()  # a bad FEDJAX_SIM_AUTO fails here, before any data loads
    created = checkpoint.check_writable(workdir)
    log = RunLog(workdir)
    every = int(config.get("checkpoint_every", 0) or 0)
    config_data = checkpoint.config_dict(config)
    resume = None
    try:
        resumable = not overwrite and checkpoint.has_checkpoint(workdir)
        resume = Resume(
            workdir if every > 0 or resumable else None,
            every=every,
            keep=int(config.get("checkpoint_keep", 3) or 3),
            identity={"config": config_data},
            read=not overwrite,
        )
        if resume.meta is not None:
            checkpoint.check_resumable(
                resume.meta["config"], config_data, resume.meta["round"], workdir
            )
        elif log.metrics_path.exists() and not overwrite:
            raise FileExistsError(
                f"{log.metrics_path} already holds the results of a run; choose another "
                "--workdir or pass --overwrite to replace them (they move to previous/)."
            )
        exp = build_experiment(config, federated_data)
        accountant = privacy.accountant_of(config, exp.data.train.num_clients)
        last_round = privacy.rounds_within_budget(config, accountant, config.num_rounds)
        log.accountant = accountant
        source = cohort_source(
            exp,
            {data_seed_of(config): exp.data.train},
            [(int(config.seed), data_seed_of(config))],
            exp.num_steps,
        )
        exp, choice, program = auto_strategy(
            exp, source, workdir if resume.meta is not None else None
        )
        evaluator = make_evaluator(
            exp,
            {0: eval_clients(exp.data.test, config)},
            {0: exp.data.train},
            [0],
            vectorized=False,
        )
        done = resume.meta["round"] if resume.meta is not None else 0
        if done < last_round:
            program.check(source.preview(done + 1), done + 1)
    except BaseException:
        if resume is not None:
            resume.close()
        checkpoint.remove_created(created)
        raise
    if distributed.is_primary():  # the others wait below
        if overwrite:
            previous = checkpoint.set_aside(workdir)
            if previous is not None:
                print(f"fedjax-sim: moved the earlier results to {previous}", file=sys.stderr)
        (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")
        (workdir / STRATEGY_FILE).write_text(json.dumps(choice._asdict(), indent=1) + "\n")
    distributed.barrier("fedjax_sim:workdir_ready")
    stop = {}
    if last_round < config.num_rounds:
        target = privacy.dp_group(config)["target_epsilon"]
        print(
            f"fedjax-sim: stopping after round {last_round} of {config.num_rounds}: round "
            f"{last_round + 1} would spend epsilon {accountant.epsilon(last_round + 1):.4f} > "
            f"dp.target_epsilon={target}",
            file=sys.stderr,
        )
        stop = {"stopped_by": "dp.target_epsilon", "planned_rounds": config.num_rounds}
    out = run_loop(
        program,
        source,
        evaluator,
        [log],
        resume,
        num_rounds=last_round,
        eval_every=config.eval_every,
        raise_on_divergence=True,
        divergence_factor=float(config.get("divergence_factor", 0.0)),
        progress=progress,
        wall_start=t_start,
    )
    summary_path = workdir / "summary.json"
    if resume.round is not None and resume.round >= last_round and summary_path.exists():
        # A finished run called again: nothing trained, its summary (timings) stays as written.
        summary = json.loads(summary_path.read_text())
    else:
        summary = log.summary(
            last_round,
            out.wall_s,
            **execution_summary(exp.strategy, program, source),
            strategy_reason=choice.reason,
            **stop,
        )
    return {**summary, "params": out.states.params, "history": log.history}


def format_summary(summary: dict[str, Any]) -> str:
    return (
        f"done: {summary['rounds']} rounds in {summary['wall_s']:.1f} s "
        + (f"({summary['train_s']:.1f} s training, " if "train_s" in summary else "(")
        + f"{summary['rounds_per_s']:.1f} rounds/s, strategy {summary['strategy']} on "
        f"{summary['devices']} device(s))\n"
        f"  test accuracy {summary['final_test_accuracy']:.4f} (best "
        f"{summary['best_test_accuracy']:.4f} at round {summary['best_round']}), "
        f"test loss {summary['final_test_loss']:.4f}, "
        f"p10 client accuracy {summary['client_accuracy_p10']:.4f}"
        + (
            f"\n  personalized accuracy {summary['final_personal_test_accuracy']:.4f} (per "
            f"client: mean {summary['final_personal_client_accuracy_mean']:.4f}, p10 "
            f"{summary['final_personal_client_accuracy_p10']:.4f}, p50 "
            f"{summary['final_personal_client_accuracy_p50']:.4f}, p90 "
            f"{summary['final_personal_client_accuracy_p90']:.4f})"
            if "final_personal_test_accuracy" in summary
            else ""
        )
        + (
            f"\n  backdoor success {summary['final_backdoor_success']:.4f}"
            if summary.get("final_backdoor_success") is not None
            else ""
        )
        + (
            f"\n  privacy: epsilon {summary['epsilon']:.4f} at delta {summary['delta']:g}"
            if "epsilon" in summary
            else ""
        )
    )

"""The simulation driver: the only impure module (files, clocks, logs, host syncs).

``simulate(config, workdir)`` builds the dataset, model and algorithm a config names, then
runs the round loop: sample a cohort on the host, pack it, run the compiled round, evaluate
every ``eval_every`` rounds and append one JSON line per evaluation to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_sim import aggregators, algorithms, checkpoint, data, models, optimizers
from fedjax_sim.core.execution import resolve_strategy
from fedjax_sim.core.round import client_mesh, replicate
from fedjax_sim.core.types import FederatedAlgorithm, Model
from fedjax_sim.metrics import make_evaluator, summarize_eval
from fedjax_sim.report import write_tensorboard


class TrainingDiverged(RuntimeError):
    """The training loss or the evaluated model became NaN or infinite."""


class RunLog:
    """One run's evaluation records: its ``metrics.jsonl``, TensorBoard events and summary.

    The driver and every sweep member keep one, so their files have one format.
    """

    def __init__(self, workdir: Path, history: list[dict[str, Any]] | None = None):
        self.workdir = Path(workdir)
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = list(history or [])

    def start(self) -> None:
        """Writes ``metrics.jsonl`` holding ``history``: empty for a fresh run; for a resumed
        one, the records up to its checkpoint (a killed run may have appended more)."""
        checkpoint.write_lines_atomically(self.metrics_path, [json.dumps(h) for h in self.history])

    def record(self, r: int, train_loss: float, ev: dict[str, float], wall_s: float) -> dict:
        """Appends round ``r``'s evaluation to the history and ``metrics.jsonl``."""
        rec = {"round": r, "train_loss": float(train_loss), **ev, "wall_s": round(wall_s, 3)}
        self.history.append(rec)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def write_tensorboard(self) -> None:
        if self.history:
            write_tensorboard(self.workdir)

    def summary(self, config, wall_s: float, **extra) -> dict[str, Any]:
        """The final summary (also written to ``summary.json``): last and best records, speed
        and ``extra`` (strategy, devices, ...)."""
        best = max(self.history, key=lambda h: h["test_accuracy"]) if self.history else {}
        last = self.history[-1] if self.history else {}
        out = {
            "rounds": config.num_rounds,
            "final_test_accuracy": last.get("test_accuracy"),
            "final_test_loss": last.get("test_loss"),
            "final_train_loss": last.get("train_loss"),
            "best_test_accuracy": best.get("test_accuracy"),
            "best_round": best.get("round"),
            "client_accuracy_p10": last.get("client_accuracy_p10"),
            "wall_s": round(wall_s, 3),
            "rounds_per_s": round(config.num_rounds / wall_s, 2),
            **extra,
        }
        (self.workdir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        return out


def packing_of(config) -> dict[str, Any]:
    """The local-work arguments of ``pack_cohort`` a config sets."""
    return dict(
        batch_size=config.client.batch_size,
        local_epochs=config.client.local_epochs,
        max_local_steps=config.client.max_local_steps or None,
    )


class Experiment(NamedTuple):
    """Everything a run is built from."""

    config: ml_collections.ConfigDict
    data: data.FederatedData
    model: Model
    algorithm: FederatedAlgorithm
    num_steps: int
    strategy: str  # the concrete client execution strategy
    mesh: jax.sharding.Mesh | None  # devices the cohort is split over
    cohort_slots: int  # clients per packed cohort (a multiple of the device count)


def _kwargs(node) -> dict[str, Any]:
    return dict(node.to_dict()) if node is not None else {}


def build_optimizer(spec: ml_collections.ConfigDict, *, inject: bool = False):
    return optimizers.get_optimizer(
        spec.optimizer, spec.learning_rate, inject=inject, **_kwargs(spec.kwargs)
    )


def make_algorithm(
    config: ml_collections.ConfigDict,
    model: Model,
    *,
    strategy: str,
    mesh: jax.sharding.Mesh | None,
    inject: bool = False,
) -> FederatedAlgorithm:
    """The algorithm ``config`` names; ``inject`` makes its hyperparameters traced arrays."""
    common = dict(
        weighting=config.weighting,
        aggregator=aggregators.get_aggregator(config.aggregator),
        strategy=strategy,
        chunk_size=config.chunk_size,
        mesh=mesh,
    )
    server_opt = build_optimizer(config.server, inject=inject)
    extras = algorithm_numbers(config)
    if config.algorithm == "fedsgd":
        used = sorted(k for k, v in extras.items() if v)
        if used:
            raise ValueError(
                f"fedsgd takes no {', '.join(used)} (FedProx and DP-FedAvg are fedavg/fedopt "
                "options); set them to 0 or use algorithm='fedavg'."
            )
        return algorithms.fedsgd(model, server_opt, **common)
    return algorithms.fedopt(
        model, build_optimizer(config.client, inject=inject), server_opt, **common, **extras
    )


# Where the algorithm's own numbers live in a config (``fedopt``'s keyword -> field path).
ALGORITHM_FIELDS = {
    "proximal_mu": "client.proximal_mu",
    "clip_norm": "dp.clip_norm",
    "noise_multiplier": "dp.noise_multiplier",
}


def algorithm_numbers(config: ml_collections.ConfigDict) -> dict[str, float]:
    """FedProx's ``proximal_mu`` and DP-FedAvg's ``clip_norm`` and ``noise_multiplier`` of
    ``config`` (0 where the config has no such field)."""
    out = {}
    for name, path in ALGORITHM_FIELDS.items():
        node = config
        for part in path.split("."):
            node = node.get(part, 0.0) if isinstance(node, ml_collections.ConfigDict) else 0.0
        out[name] = float(node)
    return out


def build_experiment(
    config: ml_collections.ConfigDict, federated_data: data.FederatedData | None = None
) -> Experiment:
    """Validates ``config`` and builds data, model and algorithm from it (no training).

    Args:
      config: an experiment config (see ``configs/default.py``).
      federated_data: use this data instead of the dataset the config names.

    Returns:
      An ``Experiment``.
    """
    algorithms.check_algorithm_name(config.algorithm)
    if federated_data is None:
        federated_data = data.get_federated_data(
            config.dataset.name, seed=data_seed_of(config), **_kwargs(config.dataset.kwargs)
        )
    train = federated_data.train
    if not 1 <= config.clients_per_round <= train.num_clients:
        raise ValueError(
            f"clients_per_round={config.clients_per_round} but the dataset has "
            f"{train.num_clients} training clients; choose 1..{train.num_clients}."
        )
    if config.num_rounds < 1 or config.eval_every < 1:
        raise ValueError("num_rounds and eval_every must be >= 1.")
    input_shape = train.element_spec["x"][0]
    model = models.get_model(
        config.model.name,
        num_classes=federated_data.num_classes,
        input_shape=tuple(input_shape),
        **_kwargs(config.model.kwargs),
    )
    num_steps = data.max_local_steps_of(
        train,
        batch_size=config.client.batch_size,
        local_epochs=config.client.local_epochs,
        max_local_steps=config.client.max_local_steps or None,
    )
    # Resolved here so the summary can say which strategy ran.
    strategy = resolve_strategy(
        config.strategy,
        params=jax.eval_shape(model.init, jax.random.key(0)),
        num_clients=config.clients_per_round,
    )
    # Never more devices than clients in a cohort (each device would idle on padding).
    wanted = config.num_devices or len(jax.local_devices())
    mesh = client_mesh(min(wanted, config.clients_per_round))
    n_dev = 1 if mesh is None else mesh.size
    algorithm = make_algorithm(config, model, strategy=strategy, mesh=mesh)
    slots = -(-config.clients_per_round // n_dev) * n_dev
    return Experiment(config, federated_data, model, algorithm, num_steps, strategy, mesh, slots)


def data_seed_of(config: ml_collections.ConfigDict) -> int:
    """The seed of the dataset: ``data_seed`` when set (>= 0), else ``seed``."""
    data_seed = int(config.get("data_seed", -1))
    return data_seed if data_seed >= 0 else int(config.seed)


def sample_clients(seed: int, round_num: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Uniform sampling without replacement, a pure function of (seed, round)."""
    rng = np.random.default_rng([seed, 0, round_num])
    return rng.choice(num_clients, size=cohort_size, replace=False)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="round", dynamic_ncols=True, file=sys.stderr)


def simulate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    federated_data: data.FederatedData | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Runs a federated simulation and writes ``config.json`` and ``metrics.jsonl``.

    With ``config.checkpoint_every`` > 0 the run saves a checkpoint (``workdir/checkpoints``)
    at the start, every ``checkpoint_every`` rounds and at the end; a later call on the same
    ``workdir`` resumes from the latest one and ends with bitwise the same state and the same
    ``metrics.jsonl`` (except ``wall_s``) as a run never interrupted. A checkpoint of a
    different config is refused (``checkpoint.ConfigMismatchError``, naming the fields);
    ``num_rounds`` may grow.

    Args:
      config: the experiment config.
      workdir: output directory (created if needed; refused before any work if unwritable).
      federated_data: optional data to use instead of the config's dataset.
      progress: show a progress bar.
      overwrite: replace the results (and checkpoints) of an earlier run in ``workdir``.

    Returns:
      The summary dict (also written to ``workdir/summary.json``), with ``params`` (the final
      global model) and ``history`` (the evaluation records).

    Raises:
      TrainingDiverged: the loss became NaN/inf; ``metrics.jsonl`` keeps the evaluations
        before it.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)
    metrics_path = workdir / "metrics.jsonl"
    checkpoint.check_writable(workdir)
    every = int(config.get("checkpoint_every", 0) or 0)
    keep = int(config.get("checkpoint_keep", 3) or 3)
    config_data = checkpoint.config_dict(config)
    ckpt, meta = None, None
    if overwrite:
        metrics_path.unlink(missing_ok=True)
        checkpoint.remove_checkpoints(workdir)
    elif checkpoint.has_checkpoint(workdir):
        ckpt = checkpoint.Checkpointer(workdir, keep=keep)
        latest = ckpt.latest_round()
        if latest is not None:
            meta = ckpt.restore_meta(latest)
            checkpoint.check_resumable(meta["config"], config_data, meta["round"], workdir)
    if meta is None and metrics_path.exists():
        raise FileExistsError(
            f"{metrics_path} already holds the results of a run; choose another --workdir or "
            "pass --overwrite to replace them."
        )
    exp = build_experiment(config, federated_data)

    train, test = exp.data.train, eval_clients(exp.data.test, config)
    root = jax.random.key(config.seed)
    params = exp.model.init(jax.random.fold_in(root, 0))
    state = replicate(exp.algorithm.init(params), exp.mesh)
    if ckpt is None and every > 0:
        ckpt = checkpoint.Checkpointer(workdir, keep=keep)
    log = RunLog(workdir)
    pending_losses: list[tuple[int, jax.Array]] = []
    real_slots = total_slots = 0
    wall_before = 0.0  # seconds spent before the checkpoint resumed from
    if meta is not None:
        start = meta["round"]
        state = replicate(ckpt.restore_state(start, state), exp.mesh)
        log = RunLog(workdir, meta["history"])
        pending_losses = [(rr, jnp.asarray(loss, jnp.float32)) for rr, loss in meta["pending"]]
        real_slots, total_slots = meta["real_slots"], meta["total_slots"]
        wall_before = meta["wall_s"]
        print(f"fedjax-sim: resuming {workdir} after round {start}", file=sys.stderr)
    else:
        start = 0

    def elapsed() -> float:
        return wall_before + time.perf_counter() - t_start

    def save_checkpoint(r: int) -> None:
        losses = [[rr, float(loss)] for rr, loss in pending_losses]  # a host sync
        ckpt.save(
            r,
            state,
            {
                "config": config_data,
                "round": r,
                "history": log.history,
                "pending": losses,
                "real_slots": real_slots,
                "total_slots": total_slots,
                "wall_s": elapsed(),
            },
        )

    if meta is None and ckpt is not None:
        save_checkpoint(0)  # from here on a killed run resumes instead of being refused
    (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")
    log.start()
    on_device = data_on_device(config.data_on_device, train)
    if on_device:
        device_examples = replicate(jax.device_put(train.all_examples()), exp.mesh)

        def gather_and_apply(state, indexed, key, examples):
            return exp.algorithm.apply(state, with_examples(exp.algorithm, indexed, examples), key)

        round_fn = jax.jit(gather_and_apply, donate_argnums=0)
    else:
        round_fn = jax.jit(exp.algorithm.apply, donate_argnums=0)
    bucket_steps = step_bucketer(config, train, exp.num_steps)
    evaluator = make_evaluator(exp.model, test.num_clients)
    eval_device = jax.local_devices()[0]
    eval_arrays = jax.device_put(
        data.pack_eval(test, batch_size=config.eval_batch_size), eval_device
    )

    bar = _progress(config.num_rounds, progress)
    if bar is not None:
        bar.update(start)
    try:
        for r in range(start + 1, config.num_rounds + 1):
            ids = sample_clients(config.seed, r, train.num_clients, config.clients_per_round)
            pack = dict(
                **packing_of(config),
                num_steps=bucket_steps(ids),
                num_clients=exp.cohort_slots,
                seed=config.seed,
                round_num=r,
            )
            if on_device:  # only the indices travel; the round gathers the examples
                cohort = data.packing.pack_cohort_indices(train, ids, **pack)
                args = (device_examples,)
            else:
                cohort = data.pack_cohort(train, ids, **pack)
                args = ()
            real_slots += int(cohort.mask.sum())
            total_slots += cohort.mask.size
            state, round_metrics = round_fn(state, cohort, jax.random.fold_in(root, r), *args)
            pending_losses.append((r, round_metrics["train_loss"]))
            if bar is not None:
                bar.update(1)
            if r % config.eval_every == 0 or r == config.num_rounds:
                # One host sync per evaluation, not per round.
                rounds = [rr for rr, _ in pending_losses]
                losses = np.asarray(jnp.stack([loss for _, loss in pending_losses]), np.float64)
                bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
                if bad:
                    raise TrainingDiverged(
                        f"the training loss became {losses[bad[0]]} in round {rounds[bad[0]]}; "
                        f"{metrics_path} keeps the evaluations before it. Lower the client or "
                        "server learning rate, or clip updates."
                    )
                eval_params = jax.device_put(state.params, eval_device)
                ev = summarize_eval(*evaluator(eval_params, *eval_arrays))
                if not math.isfinite(ev["test_loss"]):
                    raise TrainingDiverged(
                        f"the evaluated test loss is {ev['test_loss']} after round {r}; "
                        f"{metrics_path} keeps the evaluations before it. Lower the learning rates."
                    )
                record = log.record(r, losses.mean(), ev, elapsed())
                pending_losses.clear()
                log.write_tensorboard()  # beside metrics.jsonl (no TensorFlow needed)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{record['train_loss']:.4f}", acc=f"{record['test_accuracy']:.4f}"
                    )
            if ckpt is not None and ((every > 0 and r % every == 0) or r == config.num_rounds):
                save_checkpoint(r)
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()

    summary = log.summary(
        config,
        elapsed(),
        strategy=exp.strategy,
        devices=1 if exp.mesh is None else exp.mesh.size,
        compiles=round_fn._cache_size(),
        data_on_device=on_device,
        padding_waste=round(1 - real_slots / max(total_slots, 1), 4),
    )
    return {**summary, "params": state.params, "history": log.history}


def with_examples(algorithm: FederatedAlgorithm, indexed, examples):
    """The cohort ``algorithm`` trains on from an index cohort and the device's examples: lazy
    (each local step gathers its batch) when it accepts that, else gathered whole."""
    if algorithm.lazy_examples:
        return indexed._replace(examples=examples)
    return data.packing.gather_cohort(examples, indexed, xp=jnp)


def eval_clients(test: data.FederatedDataset, config) -> data.FederatedDataset:
    """The test clients evaluated: all, or a fixed seeded sample of ``eval_max_clients``."""
    k = config.eval_max_clients
    if not k or k >= test.num_clients:
        return test
    rng = np.random.default_rng([config.seed, 2])
    return test.subset(sorted(rng.choice(test.num_clients, size=k, replace=False)))


def data_on_device(setting: str, train: data.FederatedDataset) -> bool:
    """Whether the training examples live on the device (``auto``: when they take <= 1 GiB)."""
    if setting not in ("auto", "device", "host"):
        raise ValueError(f"unknown data_on_device {setting!r}; known: auto, device, host.")
    if setting == "auto":
        nbytes = sum(
            train.num_examples * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for shape, dtype in train.element_spec.values()
        )
        return nbytes <= DEVICE_DATA_BUDGET
    return setting == "device"


DEVICE_DATA_BUDGET = 1 << 30


def step_bucketer(config, train: data.FederatedDataset, max_steps: int):
    """``ids -> num_steps`` for a cohort: one fixed size, or ``client.step_buckets`` sizes.

    With buckets, a cohort is padded to the smallest bucket that holds its longest client:
    less padding for ragged datasets, one compiled round per bucket used.
    """
    kw = packing_of(config)
    if config.client.step_buckets <= 1:
        return lambda ids: max_steps
    from fedjax_sim.data.bucketing import bucket_by_size

    bounds = bucket_by_size(train.sizes, num_buckets=config.client.step_buckets, **kw).num_steps
    steps = data.packing.num_local_steps(train.sizes, **kw)

    def for_cohort(ids):
        need = int(steps[np.asarray(ids)].max())
        return int(bounds[np.searchsorted(bounds, need)])

    return for_cohort


def format_summary(summary: dict[str, Any]) -> str:
    return (
        f"done: {summary['rounds']} rounds in {summary['wall_s']:.1f} s "
        f"({summary['rounds_per_s']:.1f} rounds/s, strategy {summary['strategy']} on "
        f"{summary['devices']} device(s))\n"
        f"  test accuracy {summary['final_test_accuracy']:.4f} (best "
        f"{summary['best_test_accuracy']:.4f} at round {summary['best_round']}), "
        f"test loss {summary['final_test_loss']:.4f}, "
        f"p10 client accuracy {summary['client_accuracy_p10']:.4f}"
    )

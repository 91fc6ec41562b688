"""The one round loop every run and sweep goes through.

Per round: the cohort source samples and packs each stream's cohort, the program runs the
compiled round for every member, and the train losses stay on the device. Every
``eval_every`` rounds (one host sync): members whose loss stopped being finite are diverged,
the evaluator scores the others and their run logs record it. Every ``checkpoint_every``
rounds (and at the start and the end) ``Resume`` saves the states with the bookkeeping, from
which a killed run resumes bitwise.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import checkpoint
from fedjax_sim.driver.cohorts import CohortSource
from fedjax_sim.driver.evaluation import Evaluator
from fedjax_sim.driver.runlog import RunLog


class TrainingDiverged(RuntimeError):
    """The training loss or the evaluated model became NaN or infinite."""


# Bumped when the checkpoint's tree or meta changes shape; older checkpoints are refused.
CHECKPOINT_FORMAT = 3


class Resume:
    """A run's checkpoints: the newest one's bookkeeping (``meta``), saving and restoring.

    Nothing is created on disk until the first save (a run refused before its first round
    leaves no ``checkpoints/`` folder behind).

    Args:
      directory: where ``checkpoints/`` lives, or ``None`` (no checkpoints).
      every: checkpoint every this many rounds (0: only at the start and the end, and only
        when ``directory`` is given).
      keep: checkpoints kept.
      identity: what the meta must carry to be resumed by the same run (its config, or a
        sweep's spec and member labels).
    """

    def __init__(self, directory, *, every: int, keep: int, identity: dict[str, Any]):
        self.directory, self.every, self.keep = directory, every, keep
        self.identity = {"format": CHECKPOINT_FORMAT, **identity}
        self.ckpt = self.round = self.meta = None
        if directory is not None and checkpoint.has_checkpoint(directory):
            self.ckpt = checkpoint.Checkpointer(directory, keep=keep)
            self.round = self.ckpt.latest_round()
            if self.round is not None:
                self.meta = self.ckpt.restore_meta(self.round)
                if self.meta.get("format") != CHECKPOINT_FORMAT:
                    where = self.ckpt.directory
                    self.close()
                    raise checkpoint.ConfigMismatchError(
                        f"{where} holds a checkpoint in format {self.meta.get('format', 1)} "
                        f"(an older fedjax_sim); this version resumes format "
                        f"{CHECKPOINT_FORMAT}. Pass --overwrite to start afresh, or choose "
                        "another --workdir."
                    )

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def due(self, r: int, num_rounds: int) -> bool:
        return self.enabled and ((self.every > 0 and r % self.every == 0) or r == num_rounds)

    def save(self, r: int, tree, meta: dict[str, Any]) -> None:
        if self.ckpt is None:
            self.ckpt = checkpoint.Checkpointer(self.directory, keep=self.keep)
        self.ckpt.save(r, tree, {**self.identity, "round": r, **meta})

    def restore(self, target):
        return self.ckpt.restore_state(self.round, target)

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None


class LoopResult(NamedTuple):
    states: Any
    alive: Any
    diverged: list[int | None]  # per member: the round it diverged in, or None
    wall_s: float


def execution_summary(strategy: str, program, source: CohortSource) -> dict[str, Any]:
    """How a run ran, for its ``summary.json``: the client strategy, devices, compilations of
    the round, whether the examples lived on the device, and the padding waste."""
    return {
        "strategy": strategy,
        "devices": program.num_devices,
        "compiles": program.compiles,
        "data_on_device": source.on_device,
        "padding_waste": source.padding_waste,
    }


class _Progress:
    """A progress bar (a plain run) or a line per evaluation (a sweep group)."""

    def __init__(self, enabled: bool, num_rounds: int, num_members: int, start: int, bar: bool):
        self.bar = None
        if enabled and bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=num_rounds, unit="round", dynamic_ncols=True, file=sys.stderr)
            self.bar.update(start)
        self.lines = enabled and not bar
        if self.lines and start:
            print(f"  resuming {num_members} member(s) after round {start}")

    def round_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def evaluated(self, r: int, records: list[dict | None], alive: int, total: int) -> None:
        live = [rec["test_accuracy"] for rec in records if rec is not None]
        if self.bar is not None and live:
            self.bar.set_postfix(loss=f"{records[0]['train_loss']:.4f}", acc=f"{live[0]:.4f}")
        if self.lines:
            best = max(live) if live else float("nan")
            print(f"  round {r}: {alive}/{total} members alive, best test accuracy {best:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_loop(
    program,
    source: CohortSource,
    evaluator: Evaluator,
    logs: list[RunLog],
    resume: Resume,
    *,
    num_rounds: int,
    eval_every: int,
    raise_on_divergence: bool,
    progress: bool = False,
    wall_start: float | None = None,
) -> LoopResult:
    """Trains ``program``'s members from round 0 (or ``resume``'s checkpoint) to ``num_rounds``.

    Args:
      program: a ``SoloProgram`` or ``VectorProgram``.
      source: the cohort source (its streams are the program's).
      evaluator: scores members' global models.
      logs: one ``RunLog`` per member.
      resume: checkpoints; its ``meta`` (if any) must already be checked against this run.
      num_rounds: the last round.
      eval_every: evaluation period (the last round is always evaluated).
      raise_on_divergence: raise ``TrainingDiverged`` (a plain run) instead of freezing the
        member and going on (a sweep); either way ``metrics.jsonl`` keeps the evaluations
        before it.
      progress: a bar (a plain run) or a line per evaluation (a sweep group).
      wall_start: ``time.perf_counter()`` at the run's start (default: now).

    Returns:
      A ``LoopResult``.
    """
    t_start = time.perf_counter() if wall_start is None else wall_start
    try:
        return _train(
            program, source, evaluator, logs, resume, num_rounds=num_rounds,
            eval_every=eval_every, raise_=raise_on_divergence, progress=progress,
            t_start=t_start,
        )  # fmt: skip
    finally:
        resume.close()
        for log in logs:
            log.close()


def _train(program, source, evaluator, logs, resume, *, num_rounds, eval_every, raise_,
           progress, t_start):  # fmt: skip
    m_count = program.num_members
    states, alive = program.init()
    diverged: list[int | None] = [None] * m_count
    pending: list[tuple[int, jax.Array, jax.Array]] = []
    start = 0
    meta = resume.meta
    if meta is not None:
        start = int(meta["round"])
        states, alive = program.place(resume.restore({"states": states, "alive": alive}))
        for log, history in zip(logs, meta["histories"], strict=True):
            log.history = list(history)
        diverged = list(meta["diverged"])
        pending = [
            (rr, jnp.asarray(lo, jnp.float32), jnp.asarray(al, bool))
            for rr, lo, al in meta["pending"]
        ]
        source.restore(meta["source"])
        t_start -= meta["wall_s"]
        if m_count == 1:
            print(f"fedjax-sim: resuming {logs[0].workdir} after round {start}", file=sys.stderr)

    def save(r: int) -> None:
        resume.save(
            r,
            {"states": states, "alive": alive},
            {
                "histories": [log.history for log in logs],
                "diverged": diverged,
                "pending": [  # a host sync, only when saving
                    [rr, np.asarray(lo).tolist(), np.asarray(al).tolist()] for rr, lo, al in pending
                ],
                "source": source.bookkeeping(),
                "wall_s": time.perf_counter() - t_start,
            },
        )

    if meta is None and resume.enabled:
        save(0)  # from here on a killed run resumes instead of being refused
    for log in logs:  # a resumed member drops evaluations appended after the checkpoint
        log.start(resumed_round=start if meta is not None else None)
    bar = _Progress(progress, num_rounds, m_count, start, bar=not program.vectorized)
    try:
        for r in range(start + 1, num_rounds + 1):
            states, alive, losses = program.step(states, alive, source.cohorts(r), r)
            pending.append((r, losses, alive))
            bar.round_done()
            if r % eval_every == 0 or r == num_rounds:
                alive = _evaluate(
                    r, program, states, alive, pending, evaluator, logs, diverged, raise_,
                    time.perf_counter() - t_start, bar, source,
                )  # fmt: skip
                pending.clear()
            if resume.due(r, num_rounds):
                save(r)
    finally:
        bar.close()
    return LoopResult(states, alive, diverged, time.perf_counter() - t_start)


def _evaluate(
    r, program, states, alive, pending, evaluator, logs, diverged, raise_, wall, bar, source
):
    """The evaluation of round ``r``: one host sync for the pending train losses."""
    m_count = program.num_members
    rounds = [rr for rr, _, _ in pending]
    loss_rows = np.asarray(jnp.stack([lo for _, lo, _ in pending]), np.float64)
    alive_rows = np.asarray(jnp.stack([al for _, _, al in pending]))
    for m in range(m_count):
        if diverged[m] is None and not alive_rows[:, m].all():
            i = int(np.argmin(alive_rows[:, m]))
            diverged[m] = rounds[i]
            if raise_:
                raise TrainingDiverged(
                    f"the training loss became {loss_rows[i, m]} in round {rounds[i]}; "
                    f"{logs[m].metrics_path} keeps the evaluations before it. Lower the client "
                    "or server learning rate, or clip updates."
                )
    evals = evaluator(program.params(states))
    personal = evaluator.personal(program, states)
    records: list[dict | None] = [None] * m_count
    newly_dead = []
    for m in range(m_count):
        if diverged[m] is not None:
            continue
        ev = evals[m]
        if not math.isfinite(ev["test_loss"]):
            if raise_:
                raise TrainingDiverged(
                    f"the evaluated test loss is {ev['test_loss']} after round {r}; "
                    f"{logs[m].metrics_path} keeps the evaluations before it. Lower the "
                    "learning rates."
                )
            diverged[m] = r
            newly_dead.append(m)
            continue
        ev = {**ev, **personal[m], **source.extras(program.member_streams[m])}
        records[m] = logs[m].record(r, loss_rows[:, m].mean(), ev, wall)
    if newly_dead:
        alive = alive.at[jnp.asarray(newly_dead)].set(False)
    bar.evaluated(r, records, m_count - sum(d is not None for d in diverged), m_count)
    return alive

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
import signal
import sys
import threading
import time
from pathlib import Path
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
CHECKPOINT_FORMAT = 4  # 4: aggregator_state holds the error-feedback residuals


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: which round had finished and which checkpoint a rerun of the
    same command resumes from (``None``: no checkpoint was saved)."""

    def __init__(self, round_done: int, num_rounds: int, checkpoint_round, checkpoint_dir):
        super().__init__(round_done, num_rounds, checkpoint_round, checkpoint_dir)
        self.round_done, self.num_rounds = round_done, num_rounds
        self.checkpoint_round, self.checkpoint_dir = checkpoint_round, checkpoint_dir

    def __str__(self) -> str:
        head = f"interrupted after round {self.round_done} of {self.num_rounds}"
        if self.checkpoint_round is None:
            return (
                f"{head}; no checkpoint was saved (checkpoint_every=0), so it cannot resume: "
                "rerun with --overwrite to start again (set --config.checkpoint_every=N to make "
                "runs resumable)"
            )
        where = Path(self.checkpoint_dir) / str(self.checkpoint_round)
        return (
            f"{head}; rerun the same command to resume from the checkpoint of round "
            f"{self.checkpoint_round} ({where})"
        )


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}"


class Resume:
    """A run's checkpoints: the newest readable one's bookkeeping (``meta``), saving and
    restoring.

    Nothing is created on disk until the first save (a run refused before its first round
    leaves no ``checkpoints/`` folder behind). A checkpoint that cannot be read (its meta,
    its arrays, or arrays that differ from the digest saved with them) is named on stderr,
    moved to ``WORKDIR/checkpoints_unreadable/`` and the next older one is used; when none is
    left, ``checkpoint.CheckpointError`` says what to do.

    Args:
      directory: where ``checkpoints/`` lives, or ``None`` (no checkpoints).
      every: checkpoint every this many rounds (0: only at the start and the end, and only
        when ``directory`` is given).
      keep: checkpoints kept.
      identity: what the meta must carry to be resumed by the same run (its config, or a
        sweep's spec and member labels).
      read: resume from the checkpoints found (``False``: ``--overwrite``, which sets them
        aside before the first save).
    """

    def __init__(
        self, directory, *, every: int, keep: int, identity: dict[str, Any], read: bool = True
    ):
        self.directory, self.every, self.keep = directory, every, keep
        self.identity = {"format": CHECKPOINT_FORMAT, **identity}
        self.ckpt = self.round = self.meta = None
        self.saved_round = None  # the newest checkpoint on disk
        if read and directory is not None and checkpoint.has_checkpoint(directory):
            self.ckpt = checkpoint.Checkpointer(directory, keep=keep)
            try:
                self._read_newest()
            except BaseException:
                self.close()
                raise

    def _read_newest(self) -> None:
        """``round`` and ``meta`` of the newest checkpoint whose meta can be read."""
        for r in self.ckpt.rounds():
            try:
                self.ckpt.verify(r)
                meta = self.ckpt.restore_meta(r)
                if not isinstance(meta, dict) or not isinstance(meta.get("round"), int):
                    raise ValueError("its meta is not a fedjax_sim checkpoint's bookkeeping")
            except Exception as e:  # any failure to read makes it unusable
                self._set_unreadable(r, e)
                continue
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise checkpoint.ConfigMismatchError(
                    f"{self.ckpt.directory} holds a checkpoint in format "
                    f"{meta.get('format', 1)} (an older fedjax_sim); this version resumes "
                    f"format {CHECKPOINT_FORMAT}. Pass --overwrite to start afresh, or choose "
                    "another --workdir."
                )
            self.round = self.saved_round = r
            self.meta = meta
            return
        raise checkpoint.CheckpointError(
            f"no checkpoint in {self.ckpt.directory} can be read (moved to "
            f"{self.ckpt.directory.parent / checkpoint.UNREADABLE_DIR}); pass --overwrite to "
            "start afresh (the earlier results move to previous/), or choose another --workdir."
        )

    def _set_unreadable(self, r: int, e: BaseException) -> None:
        where = self.ckpt.directory / str(r)
        dest = self.ckpt.set_unreadable(r)
        print(
            f"fedjax-sim: checkpoint {where} cannot be read ({_one_line(e)}); moved to {dest}, "
            "trying the next older one",
            file=sys.stderr,
        )

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def due(self, r: int, num_rounds: int) -> bool:
        return self.enabled and ((self.every > 0 and r % self.every == 0) or r == num_rounds)

    def save(self, r: int, tree, meta: dict[str, Any]) -> None:
        if self.ckpt is None:
            self.ckpt = checkpoint.Checkpointer(self.directory, keep=self.keep)
        digest = checkpoint.tree_digest(tree)
        self.ckpt.save(r, tree, {**self.identity, "round": r, **meta, "digest": digest})
        self.saved_round = r

    def restore(self, target_of):
        """The newest readable checkpoint's tree with the structure and placement of
        ``target_of(meta)``; ``round`` and ``meta`` are that checkpoint's (older than at
        construction if the newest one's arrays could not be read)."""
        while True:
            try:
                tree = self.ckpt.restore_state(self.round, target_of(self.meta))
                digest = self.meta.get("digest")
                if digest is not None and checkpoint.tree_digest(tree) != digest:
                    raise ValueError("its arrays differ from the digest saved with them")
                return tree
            except Exception as e:  # any failure to read makes it unusable
                self._set_unreadable(self.round, e)
                self.round = self.meta = self.saved_round = None
                self._read_newest()

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
        # Where per-client state lived: the whole table on the device, or the rows of the
        # clients sampled so far on the host (driver.client_states); none without any.
        "client_states": program.client_states_at,
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
        live = [rec for rec in records if rec is not None]
        if self.bar is not None and live:
            rec = live[0]
            # The train loss is the mean over the rounds since the last evaluation of the
            # clients' local-step losses; the accuracy is the global model's on the test set.
            post = {
                "train_loss": f"{rec['train_loss']:.4f}",
                "test_acc": f"{rec['test_accuracy']:.4f}",
            }
            if "epsilon" in rec:
                post["eps"] = f"{rec['epsilon']:.3f}"
            self.bar.set_postfix(post)
        if self.lines:
            best = max((rec["test_accuracy"] for rec in live), default=float("nan"))
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
    divergence_factor: float = 0.0,
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
      divergence_factor: a member also diverges when a round's training loss or its test
        loss exceeds this many times the test loss of its initial model (0: only NaN/inf).
      progress: a bar (a plain run) or a line per evaluation (a sweep group).
      wall_start: ``time.perf_counter()`` at the run's start (default: now).

    Returns:
      A ``LoopResult``.

    Raises:
      RunInterrupted: Ctrl-C; says the last finished round and the checkpoint to resume from.
    """
    t_start = time.perf_counter() if wall_start is None else wall_start
    source.last_round = num_rounds  # nothing is prepared ahead past the last round
    try:
        return _train(
            program, source, evaluator, logs, resume, num_rounds=num_rounds,
            eval_every=eval_every, raise_=raise_on_divergence, factor=divergence_factor,
            progress=progress, t_start=t_start,
        )  # fmt: skip
    finally:
        resume.close()
        for log in logs:
            log.close()


def _train(program, source, evaluator, logs, resume, *, num_rounds, eval_every, raise_,
           factor, progress, t_start):  # fmt: skip
    m_count = program.num_members
    states, alive = program.init()
    initial_params = program.params(states)  # the divergence reference (a function of the seed)
    diverged: list[int | None] = [None] * m_count
    pending: list[tuple[int, dict[str, jax.Array], jax.Array]] = []  # (round, metrics, alive)
    start = 0
    held = 0.0  # seconds in evaluations and checkpoint writes: wall_s - train_s
    if resume.meta is not None:
        restored = resume.restore(lambda meta: program.checkpoint_target(states, alive, meta))
        meta = resume.meta  # the checkpoint restored (an older one if the newest was unreadable)
        start = int(meta["round"])
        states, alive = program.place(restored)
        for log, history in zip(logs, meta["histories"], strict=True):
            log.history = list(history)
        diverged = list(meta["diverged"])
        pending = [
            (rr, _restored_metrics(mt), jnp.asarray(al, bool)) for rr, mt, al in meta["pending"]
        ]
        source.restore(meta["source"])
        t_start -= meta["wall_s"]
        # A checkpoint written before train_s existed: no train_s after resuming from it.
        held = meta.get("held_s")
        if m_count == 1:
            print(f"fedjax-sim: resuming {logs[0].workdir} after round {start}", file=sys.stderr)
    resumed = resume.meta is not None

    def save(r: int, since: float) -> None:
        """Checkpoint after round ``r``; ``since``: when the evaluation and saving began (the
        held time so far includes it)."""
        now = time.perf_counter()
        tree, program_meta = program.checkpoint(states, alive)
        resume.save(
            r,
            tree,
            {
                **program_meta,
                "histories": [log.history for log in logs],
                "diverged": diverged,
                "pending": [  # a host sync, only when saving
                    [rr, {k: np.asarray(v).tolist() for k, v in m.items()}, np.asarray(a).tolist()]
                    for rr, m, a in pending
                ],
                "source": source.bookkeeping(),
                "wall_s": now - t_start,
                "held_s": None if held is None else held + (now - since),
            },
        )

    t_held = time.perf_counter()
    if not resumed and resume.enabled:
        save(0, t_held)  # from here on a killed run resumes instead of being refused
    for log in logs:  # a resumed member drops evaluations appended after the checkpoint
        log.start(resumed_round=start if resumed else None)
    if start >= num_rounds and resumed:  # a finished run, rerun: nothing trained, no new time
        return LoopResult(states, alive, diverged, float(resume.meta["wall_s"]))
    limits = [math.inf] * m_count
    if factor > 0:
        for m, ev in enumerate(evaluator(initial_params)):
            if ev["test_loss"] > 0:
                limits[m] = factor * ev["test_loss"]
    del initial_params
    if held is not None:
        held += time.perf_counter() - t_held
    bar = _Progress(progress, num_rounds, m_count, start, bar=not program.vectorized)
    done = start
    ctrl_c = _DeferredInterrupt()
    try:
        with ctrl_c:
            for r in range(start + 1, num_rounds + 1):
                states, alive, metrics = program.step(states, alive, source.cohorts(r), r)
                pending.append((r, metrics, alive))
                done = r  # trained (its evaluation and checkpoint may still be to come)
                bar.round_done()
                evaluate = r % eval_every == 0 or r == num_rounds
                if evaluate or resume.due(r, num_rounds):
                    jax.block_until_ready(states)  # the rounds so far are done: time them
                    t_held = time.perf_counter()
                    if evaluate:
                        wall = t_held - t_start
                        train = None if held is None else wall - held
                        alive = _evaluate(
                            r, program, states, alive, pending, evaluator, logs, diverged,
                            raise_, limits, (wall, train), bar, source,
                        )  # fmt: skip
                        pending.clear()
                    if resume.due(r, num_rounds):
                        save(r, t_held)
                    if held is not None:
                        held += time.perf_counter() - t_held
                ctrl_c.check()  # Ctrl-C stops here, after the round's evaluation and checkpoint
    except KeyboardInterrupt:
        where = resume.ckpt.directory if resume.ckpt is not None else None
        raise RunInterrupted(done, num_rounds, resume.saved_round, where) from None
    finally:
        bar.close()
    return LoopResult(states, alive, diverged, time.perf_counter() - t_start)


class _DeferredInterrupt:
    """Ctrl-C while training stops at the next round boundary, after that round's evaluation
    and checkpoint (a ``KeyboardInterrupt`` raised inside a C extension can surface as a
    ``SystemError`` instead); a second Ctrl-C stops at once. Installed only where the default
    handler is (the main thread of a process that did not ignore SIGINT)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # the next Ctrl-C interrupts at once

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _restored_metrics(saved) -> dict[str, jax.Array]:
    """A pending round's metrics from a checkpoint's meta (a bare list: an older checkpoint's
    train losses)."""
    if not isinstance(saved, dict):
        saved = {"train_loss": saved}
    return {k: jnp.asarray(v, jnp.float32) for k, v in saved.items()}


def _evaluate(
    r, program, states, alive, pending, evaluator, logs, diverged, raise_, limits, times, bar,
    source,
):  # fmt: skip
    """The evaluation of round ``r``: one host sync for the pending rounds' metrics, each
    recorded as its mean over the rounds since the previous evaluation; ``times`` is
    ``(wall_s, train_s)`` so far."""
    m_count = program.num_members
    rounds = [rr for rr, _, _ in pending]
    metrics, alive_rows = jax.device_get(
        ([mt for _, mt, _ in pending], jnp.stack([al for _, _, al in pending]))
    )
    rows = {k: np.asarray([mt[k] for mt in metrics], np.float64) for k in metrics[0]}
    loss_rows = rows["train_loss"]
    newly_dead = []
    for m in range(m_count):
        if diverged[m] is not None:
            continue
        if not alive_rows[:, m].all():
            i = int(np.argmin(alive_rows[:, m]))
            diverged[m] = rounds[i]
            if raise_:
                raise TrainingDiverged(
                    f"the training loss became {loss_rows[i, m]} in round {rounds[i]}; "
                    f"{logs[m].metrics_path} keeps the evaluations before it. Lower the client "
                    "or server learning rate, or clip updates."
                )
        elif (loss_rows[:, m] > limits[m]).any():
            i = int(np.argmax(loss_rows[:, m] > limits[m]))
            _exploded(m, f"the training loss {loss_rows[i, m]:.4g} in round {rounds[i]}",
                      rounds[i], limits, diverged, newly_dead, logs, raise_)  # fmt: skip
    evals = evaluator(program.params(states))
    personal = evaluator.personal(program, states)
    records: list[dict | None] = [None] * m_count
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
        if ev["test_loss"] > limits[m]:
            _exploded(m, f"the test loss {ev['test_loss']:.4g} after round {r}", r, limits,
                      diverged, newly_dead, logs, raise_)  # fmt: skip
            continue
        ev = {**ev, **personal[m], **source.extras(program.member_streams[m])}
        train = {k: float(v[:, m].mean()) for k, v in rows.items()}
        records[m] = logs[m].record(r, train, ev, *times)
    if newly_dead:
        alive = alive.at[jnp.asarray(newly_dead)].set(False)
    bar.evaluated(r, records, m_count - sum(d is not None for d in diverged), m_count)
    return alive


def _exploded(m, what, r, limits, diverged, newly_dead, logs, raise_) -> None:
    """Member ``m``'s loss passed ``divergence_factor`` times its initial test loss."""
    if raise_:
        raise TrainingDiverged(
            f"{what} is over {limits[m]:.4g} (divergence_factor times the initial model's "
            f"test loss); {logs[m].metrics_path} keeps the evaluations before it. Lower the "
            "client or server learning rate, clip updates, or raise divergence_factor "
            "(0 stops only on NaN/inf)."
        )
    diverged[m] = r
    newly_dead.append(m)

"""A run's evaluation scalars as a TensorBoard event file, appended one evaluation at a time.

The events are encoded by ``tensorboardX`` (its protobufs and TFRecord CRC); neither
TensorFlow nor TensorBoard is needed. ``tensorboardX`` is imported when a log is opened, not
when this module is: its package import tries ``torch`` (and other optional backends), which
must not slow down or bloat ``import fedjax_sim``.

Records are written synchronously: once ``write`` returns, the event is in the file, where a
running ``tensorboard --logdir`` sees it. (tensorboardX's ``SummaryWriter`` queues events for a
background thread, and its ``flush`` does not wait for that queue, so a reader may not see the
latest evaluation; this module therefore appends each event itself in tensorboardX's
``RecordWriter`` framing, opening the file only for that write (a sweep holds no file handle
per member), with the same ``brain.Event:2`` header and ``purge_step`` marker as
``SummaryWriter``, the marker written twice: see ``TensorBoardLog``.)
"""

from __future__ import annotations

import numbers
import operator
import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

# Fields of a metrics record that are not scalars to plot: the step itself and the clock.
TB_SKIP = ("round", "wall_s", "train_s")
# Ends the name of every event file written here (``write_tensorboard`` removes them by it).
TB_SUFFIX = ".fedjax_sim"
_PREFIX = "events.out.tfevents."
_STAMP = re.compile(re.escape(_PREFIX) + r"(\d+)")


def event_files(workdir: str | Path) -> list[Path]:
    """The event files this module wrote in ``workdir``, in the order TensorBoard reads them."""
    return sorted(Path(workdir).glob(f"{_PREFIX}*{TB_SUFFIX}"))


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The fields of ``record`` that become TensorBoard scalars: every real number (not a bool)
    except ``round`` (the step), ``wall_s`` and ``train_s``."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in TB_SKIP and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def _new_path(workdir: Path) -> Path:
    # TensorBoard reads a folder's event files in name order, and a purge marker only discards
    # events read before it; so a new file must sort after every existing one, even one
    # created in the same second (or stamped by a clock that ran ahead).
    latest = max(
        (int(m.group(1)) for p in workdir.glob(_PREFIX + "*") if (m := _STAMP.match(p.name))),
        default=-1,
    )
    stamp = max(int(time.time()), latest + 1)
    return workdir / f"{_PREFIX}{stamp:010d}.{socket.gethostname()}{TB_SUFFIX}"


class TensorBoardLog:
    """Appends one run's evaluation scalars to a TensorBoard event file in ``workdir``,
    incrementally (one event per ``write``; nothing is rewritten).

    ``purge_step``: when resuming from a checkpoint after round ``R``, pass ``R + 1``: the new
    file starts with ``SessionLog.START`` events at that step (the marker tensorboardX's
    ``SummaryWriter(purge_step=...)`` writes), so TensorBoard discards the events an earlier
    (killed) run wrote for rounds ``>= R + 1``. Each log opens a new file (``path``), named
    to be read after the folder's existing ones.

    Usable as a context manager; ``close`` is idempotent.
    """

    def __init__(self, workdir: str | Path, *, purge_step: int | None = None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import masked_crc32c
        from tensorboardX.summary import scalar

        self._event, self._summary, self._scalar = Event, Summary, scalar
        self._crc = masked_crc32c

        if purge_step is not None:
            if isinstance(purge_step, bool):
                raise TypeError(f"purge_step must be an int, not {purge_step!r}")
            purge_step = operator.index(purge_step)
            if purge_step < 0:
                raise ValueError(f"purge_step must be >= 0, got {purge_step}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.purge_step = purge_step
        self.path = _new_path(self.workdir)
        self._open = True
        now = time.time()
        self._write_event(Event(wall_time=now, file_version="brain.Event:2"))
        if purge_step is not None:
            # Twice: TensorBoard's Python loader (``--load_fast=false``, and where its data
            # server is unavailable) takes a run's first START for the session's start and
            # purges only at later ones, so the one marker SummaryWriter writes purges nothing
            # there; the data server and the legacy EventAccumulator purge at each START, and
            # a second purge at the same step changes nothing.
            start = SessionLog(status=SessionLog.START)
            for _ in range(2):
                self._write_event(Event(wall_time=now, step=purge_step, session_log=start))

    def _write_event(self, event) -> None:
        # One TFRecord (length, its masked CRC-32C, data, its masked CRC-32C: tensorboardX's
        # RecordWriter framing), appended with the file open only for this write: a sweep of
        # thousands of members holds no file handle per member between evaluations.
        data = event.SerializeToString()
        header = struct.pack("Q", len(data))
        record = header + struct.pack("I", self._crc(header)) + data
        with open(self.path, "ab") as f:
            f.write(record + struct.pack("I", self._crc(data)))
            f.flush()
            os.fsync(f.fileno())

    def write(self, record: dict[str, Any], *, wall_time: float | None = None) -> None:
        """Appends ``record`` (a ``metrics.jsonl`` line: ``{"round": 10, "train_loss": 0.5,
        "test_accuracy": 0.9, ..., "wall_s": 1.2}``) as one event at step ``record["round"]``
        holding a scalar per numeric field but ``round``, ``wall_s`` and ``train_s``; the file
        is flushed, so readers see it at once. ``wall_time``: the event's time (default: now)."""
        if not self._open:
            raise ValueError(f"{self.path}: the TensorBoard log is closed.")
        step = record.get("round")
        if isinstance(step, bool) or not isinstance(step, numbers.Real):
            raise ValueError(f"a metrics record needs a numeric 'round' (the step): {record!r}")
        values = [v for tag, x in scalars(record).items() for v in self._scalar(tag, x).value]
        event = self._event(
            wall_time=time.time() if wall_time is None else float(wall_time),
            step=int(step),
            summary=self._summary(value=values),
        )
        self._write_event(event)

    def close(self) -> None:
        self._open = False

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

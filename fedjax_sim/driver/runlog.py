"""One run's (or sweep member's) outputs: ``metrics.jsonl``, TensorBoard events, summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedjax_sim import checkpoint, distributed

# Personalized fields of the last evaluation that the summary repeats (as final_<name>).
PERSONAL_SUMMARY = (
    "personal_test_accuracy",
    "personal_client_accuracy_mean",
    "personal_client_accuracy_p10",
    "personal_client_accuracy_p50",
    "personal_client_accuracy_p90",
)

# Fields of the last evaluation that the summary repeats as final_<name> (a backdoor attack's).
ATTACK_SUMMARY = ("backdoor_success",)

# Fields of the last evaluation that the summary repeats under their own names.
LAST_SUMMARY = (
    "train_s",
    "sim_time_s",
    "bytes_down",
    "bytes_up",
    "async_discarded",
    "async_dropped",
    "epsilon",
    "delta",
)


class RunLog:
    """Evaluation records of one member: ``metrics.jsonl``, TensorBoard events and summary.

    Every run and sweep member keeps one, so their files have one format. TensorBoard events
    are appended at each evaluation (``metrics.tensorboard.TensorBoardLog``); a resumed run
    marks the rounds after its checkpoint as purged, so events a killed run wrote past it
    are dropped by TensorBoard as they are from ``metrics.jsonl``.
    """

    def __init__(
        self, workdir: Path, history: list[dict[str, Any]] | None = None, *, accountant=None
    ):
        self.workdir = Path(workdir)
        # A privacy.accounting.Accountant: each record gets the epsilon spent up to its round.
        self.accountant = accountant
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = list(history or [])
        self._tb = None
        # In a multi-process run process 0 writes the files; the others keep the history.
        self.writes = distributed.is_primary()

    def start(self, resumed_round: int | None = None) -> None:
        """Writes ``metrics.jsonl`` holding ``history``: empty for a fresh run; for a resumed
        one, the records up to its checkpoint (a killed run may have appended more)."""
        if not self.writes:
            return
        checkpoint.write_lines_atomically(self.metrics_path, [json.dumps(h) for h in self.history])
        from fedjax_sim.metrics.tensorboard import TensorBoardLog, event_files

        if resumed_round is None:  # a fresh run (or --overwrite): no events of an earlier one
            for old in event_files(self.workdir):
                old.unlink()
        purge = None if resumed_round is None else resumed_round + 1
        self._tb = TensorBoardLog(self.workdir, purge_step=purge)

    def record(
        self,
        r: int,
        train: dict[str, float],
        ev: dict[str, float],
        wall_s: float,
        train_s: float | None = None,
    ) -> dict:
        """Appends round ``r``'s evaluation to the history, ``metrics.jsonl`` and TensorBoard.

        ``train`` holds the round metrics of the algorithm and its aggregation pipeline
        (``train_loss`` and whatever else they report), ``ev`` the evaluation's; ``wall_s``
        the run's seconds so far, ``train_s`` those spent training (sampling, packing and
        the rounds, the first round's compilation included; not evaluations or checkpoint
        writes)."""
        from fedjax_sim.driver.privacy import privacy_fields

        clash = sorted(set(train) & set(ev))
        if clash:
            raise ValueError(f"round metrics {clash} clash with evaluation fields; rename them.")
        rec = {
            "round": r,
            "train_loss": float(train["train_loss"]),
            **{k: float(v) for k, v in train.items() if k != "train_loss"},
            **ev,
            **privacy_fields(self.accountant, r),
            "wall_s": round(wall_s, 3),
            **({} if train_s is None else {"train_s": round(train_s, 3)}),
        }
        self.history.append(rec)
        if not self.writes:
            return rec
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            self._tb.write(rec)
        return rec

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def summary(self, num_rounds: int, wall_s: float, **extra) -> dict[str, Any]:
        """The final summary (also written to ``summary.json``): last and best records, speed
        and ``extra`` (strategy, devices, ...)."""
        best = max(self.history, key=lambda h: h["test_accuracy"]) if self.history else {}
        last = self.history[-1] if self.history else {}
        out = {
            "rounds": num_rounds,
            "final_test_accuracy": last.get("test_accuracy"),
            "final_test_loss": last.get("test_loss"),
            "final_train_loss": last.get("train_loss"),
            "best_test_accuracy": best.get("test_accuracy"),
            "best_round": best.get("round"),
            "client_accuracy_p10": last.get("client_accuracy_p10"),
            **{f"final_{k}": last[k] for k in PERSONAL_SUMMARY if k in last},
            **{f"final_{k}": last[k] for k in ATTACK_SUMMARY if k in last},
            **{k: last[k] for k in LAST_SUMMARY if k in last},
            "wall_s": round(wall_s, 3),
            "rounds_per_s": round(num_rounds / wall_s, 2),
            **extra,
        }
        if self.writes:
            (self.workdir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        return out

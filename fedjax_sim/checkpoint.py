"""Checkpoints for exact resume: Orbax saves of the algorithm state plus the driver's progress.

A checkpoint (``WORKDIR/checkpoints/<round>/``) holds two items, written together and
atomically (Orbax writes a temporary directory and renames it when complete):

- ``state``: ``{"states": ..., "alive": ...}``, the members' algorithm states
  (``algorithm.init(params)``'s pytree: server params, optimizer state, aggregator state,
  hyperparameters, per-client state, round counter; stacked over a sweep group's members)
  and which members are still alive, bitwise.
- ``meta``: JSON with the run's identity (its config, or a sweep's spec and member labels),
  the last completed round, each member's evaluation records so far (``metrics.jsonl``'s
  lines), the train losses of rounds since the last evaluation, the diverged rounds, the
  padding counters and the elapsed wall time (``driver.loop.Resume`` writes it).

The driver's randomness is a pure function of ``(seed, round)`` (client sampling, packing
shuffles, ``fold_in(key(seed), round)``), so no PRNG state needs saving.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_collections

CHECKPOINT_DIR = "checkpoints"
# Checkpoints that could not be read are moved here (kept for inspection, never resumed).
UNREADABLE_DIR = "checkpoints_unreadable"
# ``--overwrite`` moves an earlier run's results here (replacing an older ``previous/``).
PREVIOUS_DIR = "previous"

# Fields that cannot change the results of the rounds already run.
RESUMABLE_FIELDS = ("checkpoint_every", "checkpoint_keep", "divergence_factor")


# sha256 of every file of a checkpoint, written beside Orbax's items once the save landed.
MANIFEST = "fedjax_files.json"


def _file_digests(step: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for p in sorted(step.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"):
            h = hashlib.sha256()
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[str(p.relative_to(step))] = h.hexdigest()
    return out


class ConfigMismatchError(ValueError):
    """A checkpoint was written by a run with a different config."""


class CheckpointError(ValueError):
    """No checkpoint of a workdir can be read (each unreadable one was set aside)."""


def tree_digest(tree) -> str:
    """sha256 of a pytree's structure, dtypes, shapes and bytes (a checkpoint's own check:
    Orbax reads some corrupted chunks back as wrong numbers without an error)."""
    import hashlib

    import jax
    import numpy as np

    h = hashlib.sha256()
    leaves, treedef = jax.tree.flatten(jax.device_get(tree))
    h.update(str(treedef).encode())
    for leaf in leaves:
        a = np.asarray(leaf)
        if a.dtype.kind == "V":  # PRNG key data: hash the raw key words
            a = np.asarray(jax.random.key_data(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def set_aside(workdir: Path) -> Path | None:
    """Moves everything in ``workdir`` (an earlier run's results) into ``workdir/previous/``,
    replacing an older ``previous/``; returns it (``None`` when there was nothing to move).

    ``--overwrite`` calls this only once the new run is known to start (config, data, model
    and a trace of its round checked), so a refused run loses nothing.
    """
    workdir = Path(workdir)
    entries = [p for p in workdir.iterdir() if p.name != PREVIOUS_DIR] if workdir.is_dir() else []
    if not entries:
        return None
    previous = workdir / PREVIOUS_DIR
    if previous.exists():
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
    staging = Path(tempfile.mkdtemp(prefix=".previous_", dir=workdir))
    for p in entries:
        os.replace(p, staging / p.name)
    os.replace(staging, previous)
    return previous


def check_writable(workdir: Path) -> list[Path]:
    """Creates ``workdir`` and writes a probe file there; raises ValueError with the reason.
    Returns the directories it created, innermost first (for ``remove_created``)."""
    workdir = Path(workdir)
    created = [p for p in (workdir, *workdir.parents) if not p.exists()]
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=workdir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            reason += " (a file is in the way of the directory)"
        raise ValueError(f"cannot write to workdir {str(workdir)!r}: {reason}.") from None
    return created


def remove_created(created: list[Path]) -> None:
    """Removes the directories ``check_writable`` created for a run refused before it wrote
    anything (innermost first; stops at one that is not empty)."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            break


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (as ``config.json`` stores it)."""
    return json.loads(config.to_json())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not tree and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: tree}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``['client.learning_rate: 0.01 -> 0.1', ...]`` for every field that differs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va == vb and type(va) is type(vb):
            continue
        fmt = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
        out.append(f"{key}: {fmt(va)} -> {fmt(vb)}")
    return out


def check_resumable(stored: dict[str, Any], config: dict[str, Any], round_done: int, where):
    """Refuses to resume a checkpoint of ``stored`` config with ``config``, naming each field.

    ``num_rounds`` may grow (a run can be extended) but not fall below the rounds done;
    checkpointing fields may change.
    """
    old, new = dict(stored), dict(config)
    for key in RESUMABLE_FIELDS:
        old.pop(key, None)
        new.pop(key, None)
    diffs = config_differences(
        {k: v for k, v in old.items() if k != "num_rounds"},
        {k: v for k, v in new.items() if k != "num_rounds"},
    )
    if new.get("num_rounds", 0) < round_done:
        diffs.append(
            f"num_rounds: {old.get('num_rounds')} -> {new.get('num_rounds')} (the checkpoint "
            f"is at round {round_done}; num_rounds may only grow)"
        )
    if diffs:
        raise ConfigMismatchError(
            f"{where} already holds a checkpoint of a run with a different config; these "
            "fields differ (checkpoint -> now): "
            + "; ".join(diffs)
            + ". Run with the checkpoint's config to resume, pass --overwrite to start afresh, "
            "or choose another --workdir."
        )


class Checkpointer:
    """Saves and restores ``(state, meta)`` under ``workdir/checkpoints`` with Orbax."""

    def __init__(self, workdir: Path, *, keep: int = 3):
        import orbax.checkpoint as ocp

        from fedjax_sim import distributed  # imports JAX: not at this module's import

        self._ocp, self._distributed = ocp, distributed
        self.directory = (Path(workdir) / CHECKPOINT_DIR).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(1, keep),
                create=True,
                cleanup_tmp_directories=True,  # leftovers of a save killed midway
                enable_async_checkpointing=False,  # a save has landed when save() returns
            ),
        )

    def latest_round(self) -> int | None:
        return self.manager.latest_step()

    def rounds(self) -> list[int]:
        """The rounds of the finished checkpoints, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def set_unreadable(self, round_num: int) -> Path:
        """Moves checkpoint ``round_num`` to ``WORKDIR/checkpoints_unreadable/`` (kept for
        inspection, out of the manager's sight) and returns where it went."""
        dest = self.directory.parent / UNREADABLE_DIR / str(round_num)
        distributed = self._distributed
        if distributed.is_primary():  # every process finds it unreadable; one moves it
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(self.directory / str(round_num), dest)
        distributed.barrier(f"fedjax_sim:unreadable_{round_num}")
        self.manager.reload()
        return dest

    def save(self, round_num: int, state, meta: dict[str, Any]) -> None:
        ocp = self._ocp
        self.manager.save(
            round_num,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        distributed = self._distributed
        if distributed.is_primary():  # one manifest of every process's files
            step = self.directory / str(round_num)
            write_lines_atomically(step / MANIFEST, [json.dumps(_file_digests(step))])
        distributed.barrier(f"fedjax_sim:saved_{round_num}")

    def verify(self, round_num: int) -> None:
        """Raises ValueError naming a file of checkpoint ``round_num`` that is missing or
        differs from its sha256 at save (checked before Orbax reads it: a damaged file made
        Orbax's background reads fail noisily after the restore had already failed). A
        checkpoint killed before its manifest was written is left to Orbax and the digest."""
        step = self.directory / str(round_num)
        try:
            saved = json.loads((step / MANIFEST).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise ValueError(f"its file manifest cannot be read ({e})") from None
        now = _file_digests(step)
        for name, digest in sorted(saved.items()):
            if now.get(name) != digest:
                what = "is missing" if name not in now else "differs from its sha256 at save"
                raise ValueError(f"{name} {what} (corrupted or truncated)")

    def restore_meta(self, round_num: int) -> dict[str, Any]:
        ocp = self._ocp
        out = self.manager.restore(round_num, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore_state(self, round_num: int, target):
        """The saved state with ``target``'s pytree structure, dtypes and shardings."""
        ocp = self._ocp
        out = self.manager.restore(
            round_num, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return out["state"]

    def close(self) -> None:
        self.manager.close()


def has_checkpoint(workdir: Path) -> bool:
    """Whether ``workdir/checkpoints`` holds a finished checkpoint (cheap: no Orbax import)."""
    d = Path(workdir) / CHECKPOINT_DIR
    return d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir())


def load_state(workdir: str | Path, round_num: int | None = None):
    """The saved state of ``workdir``'s latest (or given) checkpoint, as saved (numpy leaves),
    whatever devices saved it.

    Without a target the pytree comes back as nested dicts/lists, not ``ServerState``.
    """
    ckpt = Checkpointer(Path(workdir))
    try:
        step = ckpt.latest_round() if round_num is None else round_num
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
        import jax
        import numpy as np

        # Onto this process's first device, whatever mesh saved it (a run sharded over 4
        # devices reads back in a one-device process; Orbax alone refuses the topology).
        ocp, device = ckpt._ocp, jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = ocp.StandardCheckpointHandler().metadata(ckpt.directory / str(step) / "state")
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved
        )
        out = ckpt.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return jax.tree.map(np.asarray, out["state"])
    finally:
        ckpt.close()


def write_lines_atomically(path: Path, lines: list[str]) -> None:
    """Replaces ``path`` with ``lines`` (each newline-terminated) via a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

"""``strategy = "auto"`` decided by a measurement, once per platform, model and cohort shape.

A plain run with ``strategy = "auto"`` times the first round's cohort under each candidate
strategy (``sequential``, ``vmap``, and ``chunked`` where a device holds more clients than a
chunk), each compiled and run once untimed, then timed up to ``REPEATS`` times (the best
counts; a candidate already ``GIVE_UP`` times slower than the best so far stops there; one
that fails, e.g. out of memory, is skipped and named), and trains with the fastest. Only the
round is timed, not building its initial state. The choice is cached on disk, keyed by the
machine (platform, device kind and count, the CPU's model), the JAX version, a digest of
fedjax_sim's own source, the config (all of it but the fields that change no program: round
counts, seeds, the client learning rate, checkpointing and evaluation settings), the model's
parameter shapes and the cohort's array shapes; so it is made once per key, a GPU or TPU never
seen gets its own, and a code change measures again. The run's ``summary.json`` says what ran
and why (``strategy_reason``). Measuring holds the candidates' compiled programs one at a time
beside the best so far; a candidate that the process cannot survive (the kernel's out-of-memory
killer) cannot be skipped: set ``strategy`` explicitly then.

``FEDJAX_SIM_AUTO=rule`` skips the measurement and uses ``execution.resolve_strategy``'s fixed
rule (CPU: sequential, else vmap); ``FEDJAX_SIM_AUTO_CACHE`` moves the cache (default
``~/.cache/fedjax_sim/auto``). A cache entry that cannot be read is measured again.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax

from fedjax_sim import distributed
from fedjax_sim.core import execution

MODE_ENV, CACHE_ENV = "FEDJAX_SIM_AUTO", "FEDJAX_SIM_AUTO_CACHE"
MODES = ("measure", "rule")
REPEATS = 2
GIVE_UP = 3.0


class Choice(NamedTuple):
    strategy: str
    reason: str  # one line, for summary.json and the done line
    seconds: Mapping[str, float] | None = None  # per candidate, when measured


def mode() -> str:
    """``measure`` (the default) or ``rule``, from ``FEDJAX_SIM_AUTO``."""
    value = os.environ.get(MODE_ENV, "measure") or "measure"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}; choose one of {', '.join(MODES)}.")
    return value


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "fedjax_sim" / "auto"
    return Path(os.environ.get(CACHE_ENV) or default)


def candidates(clients_per_device: int, chunk_size: int) -> list[str]:
    """The strategies worth timing: ``chunked`` only where it differs from ``vmap``."""
    out = ["sequential", "vmap"]
    if clients_per_device > chunk_size:
        out.append("chunked")
    return out


def rule(platform: str | None = None) -> Choice:
    strategy = execution.resolve_strategy("auto", platform)
    platform = platform or jax.default_backend()
    return Choice(strategy, f"rule ({MODE_ENV}=rule): {strategy} on {platform}")


def cache_key(fields: Mapping[str, Any]) -> str:
    """A digest of ``fields`` (JSON-able), the machine, JAX's version and fedjax_sim's code."""
    device = jax.devices()[0]
    full = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "cpu": (_cpu_model(), os.cpu_count()),
        "jax": jax.__version__,
        "fedjax_sim": source_digest(),
        **fields,
    }
    text = json.dumps(full, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.cache
def source_digest() -> str:
    """A digest of fedjax_sim's own ``.py`` files: cached choices die with the code."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def choose(
    fields: Mapping[str, Any],
    strategies: list[str],
    time_round: Callable[[str, float], float],
) -> Choice:
    """The cached choice for ``fields``, or a new measurement: ``time_round(strategy, best)``
    gives a strategy's best round seconds (``best``: the fastest so far, to give up against);
    the fastest wins and is cached. A candidate that raises is skipped (all failing raises)."""
    if mode() == "rule":
        return rule()
    if distributed.is_multiprocess():  # each process would time its own: they must agree
        strategy = execution.resolve_strategy("auto")
        return Choice(strategy, f"rule: {strategy}; a multi-process run does not measure")
    path = cache_dir() / f"{cache_key(fields)}.json"
    try:
        entry = json.loads(path.read_text())
        strategy, seconds = entry["strategy"], entry["seconds"]
        if strategy in strategies:
            return Choice(strategy, describe(strategy, seconds, entry.get("measured")), seconds)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no entry, or one that cannot be read: measure
    seconds, failed = {}, {}
    for s in strategies:
        try:
            seconds[s] = float(time_round(s, min(seconds.values(), default=float("inf"))))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the others still run
            failed[s] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    if not seconds:
        raise RuntimeError(
            f"strategy auto: every candidate failed ({failed}); set strategy explicitly."
        )
    strategy = min(seconds, key=seconds.get)
    measured = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = {"strategy": strategy, "seconds": seconds, "measured": measured, "fields": fields}
    if failed:
        entry["failed"] = failed
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{time.monotonic_ns()}")
        tmp.write_text(json.dumps(entry, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache costs a measurement next time, nothing else
    return Choice(strategy, describe(strategy, seconds, None, failed), seconds)


def describe(strategy: str, seconds: Mapping[str, float], cached: str | None, failed=None) -> str:
    times = ", ".join(f"{s} {t * 1e3:.1f} ms" for s, t in sorted(seconds.items(), key=_second))
    times += "".join(f", {s} failed" for s in failed or {})
    when = f" (cached, measured {cached})" if cached else ""
    return f"measured: {strategy} fastest per round ({times}){when}"


def _second(item):
    return item[1]


def best_of(
    run: Callable[..., Any],
    prepare: Callable[[], tuple],
    give_up_after: float = float("inf"),
    repeats: int = REPEATS,
) -> float:
    """Seconds of ``run(*prepare())`` (``run`` blocks until its result is ready; ``prepare``
    is not timed): once untimed (the compile), then the best of up to ``repeats``, stopping
    once a time passes ``give_up_after``."""
    run(*prepare())
    best = float("inf")
    for _ in range(repeats):
        args = prepare()
        t0 = time.perf_counter()
        run(*args)
        best = min(best, time.perf_counter() - t0)
        if best > give_up_after:
            break
    return best

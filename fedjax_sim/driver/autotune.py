"""``strategy = "auto"`` decided by a measurement, once per platform, model and cohort shape.

A plain run with ``strategy = "auto"`` times the first round's cohort under each candidate
strategy (``sequential``, ``vmap``, and ``chunked`` where a device holds more clients than a
chunk), each compiled and run once untimed, then timed ``REPEATS`` times (the best counts),
and trains with the fastest. The choice is cached on disk, keyed by everything that shapes the
round's program (platform, device kind and count, JAX and fedjax_sim versions, the algorithm,
the model's parameter shapes, the cohort's array shapes, the chunk size, the aggregation
settings), so the measurement is made once per such key and a new GPU or TPU gets its own.
The run's ``summary.json`` says what ran and why (``strategy_reason``).

``FEDJAX_SIM_AUTO=rule`` skips the measurement and uses ``execution.resolve_strategy``'s fixed
rule (CPU: sequential, else vmap); ``FEDJAX_SIM_AUTO_CACHE`` moves the cache (default
``~/.cache/fedjax_sim/auto``). A cache entry that cannot be read is measured again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax

from fedjax_sim.core import execution

MODE_ENV, CACHE_ENV = "FEDJAX_SIM_AUTO", "FEDJAX_SIM_AUTO_CACHE"
MODES = ("measure", "rule")
REPEATS = 2


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
    """A digest of ``fields`` (JSON-able) and the machine's platform, devices and versions."""
    import fedjax_sim

    device = jax.devices()[0]
    full = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "fedjax_sim": getattr(fedjax_sim, "__version__", "?"),
        **fields,
    }
    text = json.dumps(full, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def choose(
    fields: Mapping[str, Any],
    strategies: list[str],
    time_round: Callable[[str], float],
) -> Choice:
    """The cached choice for ``fields``, or a new measurement: ``time_round(strategy)`` gives
    a strategy's best round seconds (compiled beforehand); the fastest wins and is cached."""
    if mode() == "rule":
        return rule()
    path = cache_dir() / f"{cache_key(fields)}.json"
    try:
        entry = json.loads(path.read_text())
        strategy, seconds = entry["strategy"], entry["seconds"]
        if strategy in strategies:
            return Choice(strategy, describe(strategy, seconds, entry.get("measured")), seconds)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no entry, or one that cannot be read: measure
    seconds = {s: float(time_round(s)) for s in strategies}
    strategy = min(seconds, key=seconds.get)
    measured = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = {"strategy": strategy, "seconds": seconds, "measured": measured, "fields": fields}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache costs a measurement next time, nothing else
    return Choice(strategy, describe(strategy, seconds, None), seconds)


def describe(strategy: str, seconds: Mapping[str, float], cached: str | None) -> str:
    times = ", ".join(f"{s} {t * 1e3:.1f} ms" for s, t in sorted(seconds.items(), key=_second))
    when = f" (cached, measured {cached})" if cached else ""
    return f"measured: {strategy} fastest per round ({times}){when}"


def _second(item):
    return item[1]


def best_of(run: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Seconds of ``run()`` (which blocks until its result is ready): once untimed (the
    compile), then the best of ``repeats``."""
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best

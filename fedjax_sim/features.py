"""The cross-cutting features a config can switch on, and the one check of which algorithm
takes which.

Every ``AlgorithmSpec`` declares the features its build honours (``supports``) and the
``algorithm_kwargs`` it reads with their defaults (``kwargs``). ``check_support`` runs before
any data loads (``simulation.build_experiment`` and every sweep member's build): a feature the
config switches on that the algorithm does not take, or an ``algorithm_kwargs`` key it does not
read, is refused in one line naming the algorithm, the feature and what to do. No algorithm
refuses or ignores a feature anywhere else.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

from fedjax_sim.aggregators.adversary import DATA_ATTACKS


class Feature(NamedTuple):
    """A row of the support table: what it is and the config fields that switch it on."""

    description: str
    fields: str


FEATURES: dict[str, Feature] = {
    "robust_aggregation": Feature(
        "a non-mean aggregator (median, trimmed mean, Krum, ...)", "aggregator"
    ),
    "secure_aggregation": Feature("simulated secure aggregation", "aggregator='secure'"),
    "dp": Feature("clipping and Gaussian noise (DP-FedAvg)", "dp.clip_norm, dp.noise_multiplier"),
    "adaptive_clipping": Feature("adaptive clipping (Andrew et al.)", "dp.adaptive"),
    "compression": Feature("compressed uploads", "compression.method"),
    "error_feedback": Feature("compression with error feedback", "compression.error_feedback"),
    "update_attack": Feature("model-poisoning clients", "attack.name (sign_flip, ...)"),
    "data_attack": Feature("data-poisoning clients", "attack.name (label_flip, backdoor)"),
    "proximal_term": Feature("FedProx's proximal term", "client.proximal_mu"),
}


class UnsupportedError(ValueError):
    """A config asks an algorithm for something it does not implement."""


def features_of(config) -> dict[str, str]:
    """``{feature: "field=value, ..."}`` for every feature ``config`` switches on."""
    out = {}
    aggregator = str(config.get("aggregator", "mean"))
    if aggregator == "secure":
        out["secure_aggregation"] = "aggregator='secure'"
    elif aggregator != "mean":
        out["robust_aggregation"] = f"aggregator={aggregator!r}"
    dp = config.get("dp")
    if dp is not None:
        if dp.get("adaptive", False):
            out["adaptive_clipping"] = "dp.adaptive=True"
        else:
            set_ = [f"dp.{k}={dp[k]}" for k in ("clip_norm", "noise_multiplier") if dp.get(k)]
            if set_:
                out["dp"] = ", ".join(set_)
    group = config.get("compression")
    if group is not None and str(group.method) != "none":
        if group.get("error_feedback", False):
            out["error_feedback"] = f"compression.method={group.method!r}, error_feedback=True"
        else:
            out["compression"] = f"compression.method={group.method!r}"
    attack = config.get("attack")
    if attack is not None and str(attack.name) != "none":
        kind = "data_attack" if attack.name in DATA_ATTACKS else "update_attack"
        out[kind] = f"attack.name={attack.name!r}"
    mu = float(config.client.get("proximal_mu", 0.0) or 0.0)
    if mu:
        out["proximal_term"] = f"client.proximal_mu={mu}"
    return out


def supporting(feature: str, specs) -> list[str]:
    """The names in ``specs`` (``{name: AlgorithmSpec}``) whose algorithm takes ``feature``."""
    return sorted(name for name, spec in specs.items() if feature in spec.supports)


def check_support(config, name: str, spec, specs) -> None:
    """Refuses, in one line, a feature ``config`` switches on that algorithm ``name`` (its
    ``spec``) does not take, and ``algorithm_kwargs`` it does not read or of the wrong type.

    Args:
      config: the experiment config.
      name: the algorithm's registry name.
      spec: its ``AlgorithmSpec``.
      specs: every registered spec, to name the algorithms that do take a feature.
    """
    for feature, where in features_of(config).items():
        if feature not in spec.supports:
            others = supporting(feature, specs)
            raise UnsupportedError(
                f"algorithm {name!r} does not support {feature} ({where}): "
                f"{FEATURES[feature].description} is not built into its round. Switch it off "
                f"or use an algorithm that takes it: {', '.join(others) or '(none)'}."
            )
    check_kwargs(config.get("algorithm_kwargs"), name, spec.kwargs)


def check_kwargs(given, name: str, declared: dict[str, Any]) -> None:
    """Refuses ``algorithm_kwargs`` keys ``name`` does not declare (with the nearest declared
    name) and values of another type than the declared default's."""
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
    for key, value in given.items():
        if key not in declared:
            close = difflib.get_close_matches(key, list(declared), n=1) or [
                d for d in sorted(declared) if key.lower() in d or d in key.lower()
            ]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            takes = ", ".join(sorted(declared)) or "none"
            raise UnsupportedError(
                f"algorithm {name!r} takes no algorithm_kwargs.{key}{hint}; it takes: {takes}."
            )
        _check_type(f"algorithm_kwargs.{key}", value, declared[key], name)


def _check_type(path: str, value, default, name: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = number and float(value) == int(value)
    elif isinstance(default, float):
        ok = number
    else:
        ok = True
    if not ok:
        raise UnsupportedError(
            f"algorithm {name!r}: {path} must be a {type(default).__name__} (default "
            f"{default!r}), got {value!r}."
        )


def support_table(specs) -> str:
    """The README's algorithm x feature table (Markdown), from the specs."""
    names = list(FEATURES)
    head = "| algorithm | " + " | ".join(names) + " |"
    rule = "|---" * (len(names) + 1) + "|"
    rows = [
        f"| {algo} | " + " | ".join("yes" if f in spec.supports else "-" for f in names) + " |"
        for algo, spec in sorted(specs.items())
    ]
    return "\n".join([head, rule, *rows])

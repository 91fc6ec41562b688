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

import jax

from fedjax_sim import aggregators
from fedjax_sim.aggregators.adversary import DATA_ATTACKS, FRACTION, Adversary, check_fraction
from fedjax_sim.aggregators.adversary import adversary as make_adversary
from fedjax_sim.aggregators.compression import Compressor, compress_updates, compressor
from fedjax_sim.aggregators.pipeline import Pipeline, build_pipeline
from fedjax_sim.aggregators.transforms import AggregationTransform
from fedjax_sim.privacy import CLIP_NORM, NOISE_MULTIPLIER


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


# ---------------------------------------------------------------- the pipeline of a config


def pipeline_of(config, task, num_clients: int) -> Pipeline:
    """The aggregation pipeline ``config`` switches on (``aggregators.pipeline``), built once
    by the framework (``fs.algorithms.build``) and handed to the algorithm's build.

    Args:
      config: the experiment config (``aggregator``, ``dp``, ``compression``, ``attack``).
      task: the model's task (an attack's label count).
      num_clients: the training population (the expected cohort under Poisson sampling,
        the rows of error feedback's residual table).
    """
    attack = attack_of(config)
    return build_pipeline(
        dp_numbers=_takes_dp(config),
        weighting=config.weighting,
        aggregator=aggregator_of(config),
        transforms=compression_transforms(config),
        # The config's own numbers, so an algorithm without DP refuses them (never drops them).
        **_dp_numbers_of(config),
        expected_clients=expected_clients_of(config, num_clients),
        adaptive_clipping=adaptive_of(config),
        adversary=adversary_of(config, task),
        attack_fraction=attack[1] if attack else 0.0,
        error_feedback=error_feedback_of(config),
        num_clients=num_clients,
    )


def pipeline_hparams_of_config(config) -> dict[str, float]:
    """The numbers ``pipeline_of(config)``'s pipeline keeps in ``state.hparams`` (the DP
    numbers only for an algorithm that takes DP)."""
    adaptive, attack = adaptive_of(config), attack_of(config)
    dp = _dp_numbers_of(config)
    return {
        **(
            {CLIP_NORM: dp["clip_norm"], NOISE_MULTIPLIER: dp["noise_multiplier"]}
            if _takes_dp(config)
            else {}
        ),
        **({FRACTION: attack[1]} if attack else {}),
        **{f"dp.{k}": v for k, v in (adaptive or {}).items()},
    }


def _dp_numbers_of(config) -> dict[str, float]:
    """``{"clip_norm", "noise_multiplier"}`` of ``config.dp`` (0 where it has none)."""
    dp = config.get("dp")
    return {k: float(dp[k]) if dp is not None else 0.0 for k in ("clip_norm", "noise_multiplier")}


def compression_transforms(config) -> tuple[AggregationTransform, ...]:
    """The upload compression of ``config.compression`` as a client-stage transform (none
    with error feedback: ``error_feedback_of``)."""
    group = config.get("compression")
    if group is None or group.method == "none" or group.get("error_feedback", False):
        return ()
    return (compress_updates(str(group.method), **group.kwargs.to_dict()),)


def error_feedback_of(config) -> Compressor | None:
    """The compressor of ``config.compression`` with ``error_feedback``, else ``None``."""
    group = config.get("compression")
    if group is None or group.method == "none" or not group.get("error_feedback", False):
        return None
    return compressor(str(group.method), **group.kwargs.to_dict())


def _takes_dp(config) -> bool:
    """Whether ``config.algorithm`` (registered) takes DP."""
    from fedjax_sim import algorithms  # the registry imports this module

    return "dp" in algorithms.get_spec(str(config.algorithm)).supports


def aggregator_of(config) -> aggregators.Aggregator:
    """``config.aggregator`` built with ``config.aggregator_kwargs``."""
    kwargs = config.get("aggregator_kwargs")
    return aggregators.get_aggregator(config.aggregator, **(kwargs.to_dict() if kwargs else {}))


def attack_of(config) -> tuple[str, float] | None:
    """``(attack name, fraction)`` of a config with an attack, else ``None``."""
    group = config.get("attack")
    if group is None or group.name == "none":
        return None
    return group.name, check_fraction(float(group.fraction))


def adversary_of(config, task) -> Adversary | None:
    """The config's malicious clients, drawn from its data seed (see ``aggregators.adversary``)."""
    attack = attack_of(config)
    if attack is None:
        return None
    seed = int(config.get("data_seed", -1))
    seed = int(config.seed) if seed < 0 else seed
    model = task.model
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.numpy.zeros((1, *model.input_shape), jax.numpy.float32)
    logits = jax.eval_shape(lambda p: model.apply(p, x, train=False, key=None), shapes)
    num_classes = int(logits.shape[-1])  # label flipping maps y to num_classes - 1 - y
    return make_adversary(
        attack[0], seed=seed, num_classes=num_classes, **config.attack.kwargs.to_dict()
    )


def adaptive_of(config) -> dict[str, float] | None:
    """The adaptive clipping settings of a config with ``dp.adaptive``, else ``None``."""
    dp = config.get("dp")
    if dp is None or not dp.get("adaptive", False):
        return None
    stddev = float(dp.get("clipped_count_stddev", 0.0))
    if stddev == 0:  # Andrew et al.: the expected cohort over 20
        stddev = float(config.clients_per_round) / 20
    return {
        "target_quantile": float(dp.target_quantile),
        "clip_learning_rate": float(dp.clip_learning_rate),
        "clipped_count_stddev": stddev,
    }


def expected_clients_of(config, num_clients: int) -> float | None:
    """``q N`` for a noised config under Poisson sampling (``fedopt``'s ``expected_clients``)."""
    sampling = config.get("sampling")
    if sampling is None or sampling.scheme != "poisson" or not config.dp.noise_multiplier:
        return None
    return float(sampling.rate or config.clients_per_round / num_clients) * num_clients


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

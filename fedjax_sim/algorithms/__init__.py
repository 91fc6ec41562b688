"""Federated algorithms, each one file plus one line in ``ALGORITHMS``.

A file defines a factory for the Python API (``fedopt(model, client_opt, server_opt, ...)``)
and ``SPEC = AlgorithmSpec(build, hparams)`` for configs (``config.algorithm = NAME``); see
``algorithms/base.py`` for the protocol and README "Architecture" for a walk-through.
"""

from fedjax_sim import features
from fedjax_sim.algorithms import adaptive as _adaptive
from fedjax_sim.algorithms import ditto as _ditto
from fedjax_sim.algorithms import fedavg as _fedavg
from fedjax_sim.algorithms import fedbuff as _fedbuff
from fedjax_sim.algorithms import feddyn as _feddyn
from fedjax_sim.algorithms import fednova as _fednova
from fedjax_sim.algorithms import fedper as _fedper
from fedjax_sim.algorithms import fedrep as _fedrep
from fedjax_sim.algorithms import fedsgd as _fedsgd
from fedjax_sim.algorithms import flora as _flora
from fedjax_sim.algorithms import mime as _mime
from fedjax_sim.algorithms import scaffold as _scaffold
from fedjax_sim.algorithms.adaptive import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_sim.algorithms.base import AlgorithmSpec, BuildContext, ServerState
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.fedavg import fedavg, fedopt
from fedjax_sim.algorithms.fedbuff import fedbuff
from fedjax_sim.algorithms.feddyn import feddyn
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedper import fedper
from fedjax_sim.algorithms.fedrep import fedrep
from fedjax_sim.algorithms.fedsgd import fedsgd
from fedjax_sim.algorithms.flora import flora
from fedjax_sim.algorithms.mime import mime, mimelite
from fedjax_sim.algorithms.scaffold import scaffold

ALGORITHMS: dict[str, AlgorithmSpec] = {
    "ditto": _ditto.SPEC,
    "fedadagrad": _adaptive.FEDADAGRAD_SPEC,
    "fedadam": _adaptive.FEDADAM_SPEC,
    "fedavg": _fedavg.SPEC,
    "fedavgm": _adaptive.FEDAVGM_SPEC,
    "fedbuff": _fedbuff.SPEC,
    "feddyn": _feddyn.SPEC,
    "fednova": _fednova.SPEC,
    "fedper": _fedper.SPEC,
    "fedrep": _fedrep.SPEC,
    "fedopt": _fedavg.SPEC,
    "fedsgd": _fedsgd.SPEC,
    "fedyogi": _adaptive.FEDYOGI_SPEC,
    "flora": _flora.SPEC,
    "mime": _mime.SPEC,
    "mimelite": _mime.LITE_SPEC,
    "scaffold": _scaffold.SPEC,
}
# The algorithms this package defines (``register`` adds others to ``ALGORITHMS``).
BUILT_IN: tuple[str, ...] = tuple(ALGORITHMS)


def register(name: str, spec: AlgorithmSpec) -> None:
    """Adds an algorithm under ``name`` (from user code or a config file); names are unique."""
    if not isinstance(spec, AlgorithmSpec):
        raise TypeError(f"register({name!r}, ...) needs an AlgorithmSpec, got {type(spec)}.")
    if name in ALGORITHMS and ALGORITHMS[name] is not spec:
        raise ValueError(f"an algorithm named {name!r} is already registered.")
    ALGORITHMS[name] = spec


def get_spec(name: str) -> AlgorithmSpec:
    """The registry entry of ``name``; an unknown name lists the known ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}.")
    return ALGORITHMS[name]


def check_support(config) -> None:
    """Refuses, before any compute, a feature ``config`` switches on that its algorithm does
    not build into the round, and ``algorithm_kwargs`` it does not read
    (``fedjax_sim.features.check_support``: the one place that does)."""
    name = str(config.algorithm)
    spec = get_spec(name)
    features.check_support(config, name, spec, ALGORITHMS)
    if spec.check is not None:
        spec.check(config)


def build(config, ctx: BuildContext):
    """The ``FederatedAlgorithm`` ``config.algorithm`` names, built by its registry entry
    after ``check_support``: the way every driver path builds one from a config."""
    check_support(config)
    if ctx.pipeline is None:
        ctx = ctx._replace(pipeline=features.pipeline_of(config, ctx.task, ctx.num_clients))
    return get_spec(str(config.algorithm)).build(config, ctx)


def switch_algorithm(config, name: str) -> dict:
    """Sets ``config.algorithm = name`` and the settings ``name``'s spec needs
    (``AlgorithmSpec.config_defaults``), in place: what ``--config.algorithm=NAME`` does before
    the command line's other overrides (which then win).

    Args:
      config: an experiment config (``configs/default.py``'s fields).
      name: a registered algorithm name.

    Returns:
      ``{field path: (old value, new value)}`` for each field the defaults changed.
    """
    spec = get_spec(name)
    config.algorithm = name
    changed = {}
    for dotted, value in (spec.config_defaults(config) if spec.config_defaults else {}).items():
        *groups, leaf = dotted.split(".")
        node = config
        for g in groups:
            node = node[g]
        if leaf not in node:
            raise KeyError(f"algorithm {name!r} sets config field {dotted!r}, which is absent.")
        if node[leaf] != value:
            changed[dotted] = (node[leaf], value)
            node[leaf] = value
    return changed


__all__ = [
    "ALGORITHMS",
    "BUILT_IN",
    "AlgorithmSpec",
    "BuildContext",
    "ServerState",
    "build",
    "check_support",
    "ditto",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedbuff",
    "fedavgm",
    "feddyn",
    "fednova",
    "fedopt",
    "fedper",
    "fedrep",
    "fedsgd",
    "fedyogi",
    "flora",
    "get_spec",
    "mime",
    "mimelite",
    "register",
    "scaffold",
    "switch_algorithm",
]

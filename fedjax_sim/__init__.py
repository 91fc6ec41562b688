"""fedjax_sim: a vectorized, jit-compiled federated-learning simulator on JAX.

import fedjax_sim as fs
algo = fs.algorithms.fedopt(model, optax.sgd(0.01), fs.optimizers.fedadam(0.03))
state = algo.init(params)
state, metrics = algo.apply(state, cohort, key)

The pure core is ``fs.core`` (types, keys, tasks, client training, the ``Executor``); algorithms
are ``fs.algorithms`` (one file each, registered by name); ``fs.aggregators`` and
``fs.privacy`` hold the aggregation transforms; ``fs.driver`` is the one round loop that
``fs.simulate`` and ``fs.run_sweep`` call.
"""

from fedjax_sim import (
    aggregators,
    algorithms,
    core,
    data,
    driver,
    features,
    models,
    optimizers,
    privacy,
)
from fedjax_sim.aggregators import Aggregator, coordinate_median, weighted_mean
from fedjax_sim.aggregators.transforms import AggregationTransform, chain
from fedjax_sim.algorithms import (
    AlgorithmSpec,
    BuildContext,
    ServerState,
    ditto,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedbuff,
    feddyn,
    fednova,
    fedopt,
    fedper,
    fedrep,
    fedsgd,
    fedyogi,
    mime,
    mimelite,
    scaffold,
)
from fedjax_sim.config import load_config
from fedjax_sim.core.execution import (
    STRATEGIES,
    Executor,
    client_mesh,
    map_clients,
    replicate,
    resolve_strategy,
)
from fedjax_sim.core.task import Task, classification_task, get_task, next_token_task
from fedjax_sim.core.types import ClientOutput, Cohort, FederatedAlgorithm, Model
from fedjax_sim.data import FederatedData, FederatedDataset, from_client_arrays, pack_cohort
from fedjax_sim.driver import TrainingDiverged
from fedjax_sim.models import get_model, model_from_linen
from fedjax_sim.optimizers import get_optimizer
from fedjax_sim.simulation import build_experiment, simulate
from fedjax_sim.sweep import run_sweep

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "AggregationTransform",
    "Aggregator",
    "AlgorithmSpec",
    "BuildContext",
    "ClientOutput",
    "Cohort",
    "Executor",
    "FederatedAlgorithm",
    "FederatedData",
    "FederatedDataset",
    "Model",
    "ServerState",
    "Task",
    "TrainingDiverged",
    "aggregators",
    "algorithms",
    "features",
    "build_experiment",
    "chain",
    "classification_task",
    "client_mesh",
    "coordinate_median",
    "core",
    "data",
    "ditto",
    "driver",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedbuff",
    "feddyn",
    "fednova",
    "fedopt",
    "fedper",
    "fedrep",
    "fedsgd",
    "fedyogi",
    "from_client_arrays",
    "get_model",
    "get_optimizer",
    "get_task",
    "load_config",
    "map_clients",
    "mime",
    "mimelite",
    "model_from_linen",
    "models",
    "next_token_task",
    "optimizers",
    "pack_cohort",
    "privacy",
    "replicate",
    "resolve_strategy",
    "run_sweep",
    "scaffold",
    "simulate",
    "weighted_mean",
]

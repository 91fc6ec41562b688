"""fedjax_sim: a vectorized, jit-compiled federated-learning simulator on JAX.

import fedjax_sim as fs
algo = fs.algorithms.fedopt(model, optax.sgd(0.01), fs.optimizers.fedadam(0.03))
state = algo.init(params)
state, metrics = algo.apply(state, cohort, key)
"""

from fedjax_sim import aggregators, algorithms, data, models, optimizers
from fedjax_sim.aggregators import Aggregator, coordinate_median, weighted_mean
from fedjax_sim.algorithms import ServerState, fedavg, fedopt, fedsgd
from fedjax_sim.config import load_config
from fedjax_sim.core.execution import STRATEGIES, map_clients, resolve_strategy
from fedjax_sim.core.round import client_mesh, run_clients
from fedjax_sim.core.types import ClientOutput, Cohort, FederatedAlgorithm, Model
from fedjax_sim.data import FederatedData, FederatedDataset, from_client_arrays, pack_cohort
from fedjax_sim.models import get_model
from fedjax_sim.optimizers import get_optimizer
from fedjax_sim.simulation import TrainingDiverged, build_experiment, simulate
from fedjax_sim.sweep import run_sweep

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "Aggregator",
    "ClientOutput",
    "Cohort",
    "FederatedAlgorithm",
    "FederatedData",
    "FederatedDataset",
    "Model",
    "ServerState",
    "TrainingDiverged",
    "aggregators",
    "algorithms",
    "build_experiment",
    "client_mesh",
    "coordinate_median",
    "data",
    "fedavg",
    "fedopt",
    "fedsgd",
    "from_client_arrays",
    "get_model",
    "get_optimizer",
    "load_config",
    "map_clients",
    "models",
    "optimizers",
    "pack_cohort",
    "resolve_strategy",
    "run_clients",
    "run_sweep",
    "simulate",
    "weighted_mean",
]

"""Cross-device FedAvg on a synthetic population of a million clients generated on demand.

Each round samples 1,000 of 10**6 clients; every client's data is a pure function of the seed
and its id (``fs.data.SyntheticPopulation``), generated when its cohort is packed, so memory
does not grow with the population (``scripts/bench_population.py`` measures it):

    fedjax-sim run --workdir /tmp/population --config population

Expected: test accuracy (100 held-out clients) 0.904 after 20 rounds (measured on a 2-core CPU:
15 s, about 0.6 s per round, most of it generating the 1,000 sampled clients). Variant
``smoke`` samples 50 of 10**5 clients for 5 rounds; ``scaffold`` runs SCAFFOLD, whose control
variates are kept only for clients that have been sampled (``client_states = "host"``).
"""

import ml_collections
from fedjax_sim.configs import default


def get_config(variant: str | None = None):
    config = default.get_config()
    config.dataset.name = "population"
    config.dataset.kwargs = ml_collections.ConfigDict(
        {
            "num_clients": 1_000_000,
            "test_clients": 100,
            "dim": 20,
            "num_classes": 10,
            "min_examples": 10,
            "max_examples": 50,
            "shift": 1.0,
        }
    )
    config.num_rounds = 20
    config.clients_per_round = 1000
    config.eval_every = 5
    config.client.learning_rate = 0.3
    config.client.batch_size = 10
    config.client.local_epochs = 1
    config.checkpoint_every = 5
    if variant in ("scaffold", "smoke_scaffold"):
        config.algorithm = "scaffold"
    if variant in ("smoke", "smoke_scaffold"):
        config.dataset.kwargs.num_clients = 100_000
        config.clients_per_round = 50
        config.num_rounds = 5
    elif variant not in (None, "scaffold"):
        raise ValueError(f"unknown variant {variant!r}; known: smoke, scaffold, smoke_scaffold.")
    return config

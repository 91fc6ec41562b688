"""FedAvg, MNIST 2NN (784-200-200-10), IID split over 100 clients (McMahan et al. 2017).

    fedjax-sim run --workdir /tmp/mnist_2nn_iid --config configs/mnist_2nn_iid.py

MNIST comes through TFDS; offline, ../shared/data/mnist holds the original files, which TFDS
takes as a manual download. C = 0.1 (10 clients a round), E = 1, B = 10, client lr 0.05.
Expected: about 0.97 test accuracy after 100 rounds. ``:smoke`` runs 5 short rounds.
"""

import ml_collections
from fedjax_sim.configs import default


def mnist_config(variant, *, model: str, partition: str, partition_kwargs=None):
    config = default.get_config(None)
    config.dataset.name = "mnist"
    config.dataset.kwargs = ml_collections.ConfigDict(
        {
            "partition": partition,
            "num_clients": 100,
            "partition_kwargs": ml_collections.ConfigDict(partition_kwargs or {}),
        }
    )
    config.model.name = model
    config.num_rounds = 100
    config.clients_per_round = 10
    config.eval_every = 5
    config.client.learning_rate = 0.05
    config.client.batch_size = 10
    config.client.local_epochs = 1
    if variant == "smoke":
        config.num_rounds = 5
        config.eval_every = 1
        config.client.batch_size = 20
        config.client.max_local_steps = 5
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; known: smoke.")
    return config


def get_config(variant=None):
    return mnist_config(variant, model="mlp", partition="iid")

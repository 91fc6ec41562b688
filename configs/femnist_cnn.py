"""FedAvg, LEAF FEMNIST (105 natural writer clients here, 62 classes), LEAF's CNN.

    fedjax-sim run --workdir /tmp/femnist --config configs/femnist_cnn.py

LEAF's settings: 10 clients a round, batch 10, 1 local epoch, client SGD lr 0.06 (Caldas et
al. 2018 used 0.004 with minibatch SGD over more local steps; 0.06 is FedAvg's tuned value).
"""

import ml_collections
from fedjax_sim.configs import default


def get_config(variant=None):
    config = default.get_config(None)
    config.dataset.name = "femnist_leaf"
    config.dataset.kwargs = ml_collections.ConfigDict()
    config.model.name = "cnn_femnist"
    config.num_rounds = 200
    config.clients_per_round = 10
    config.eval_every = 10
    config.client.learning_rate = 0.06
    config.client.batch_size = 10
    config.client.local_epochs = 1
    if variant == "smoke":
        config.num_rounds = 4
        config.eval_every = 2
        config.client.batch_size = 20
        config.client.max_local_steps = 4
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; known: smoke.")
    return config

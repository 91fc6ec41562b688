"""FedAvg, LEAF Shakespeare (clients = speaking roles), LEAF's 2x256 character LSTM.

    fedjax-sim run --workdir /tmp/shakespeare --config configs/shakespeare_lstm.py

80-character windows predict the next character; clients with fewer than 64 samples are
dropped (LEAF's usual minimum). 10 clients a round, batch 10, 1 local epoch capped at 50
steps, client SGD lr 0.8 (LEAF's value for this model).
"""

import ml_collections
from fedjax_sim.configs import default


def get_config(variant=None):
    config = default.get_config(None)
    config.dataset.name = "shakespeare_leaf"
    config.dataset.kwargs = ml_collections.ConfigDict({"min_samples": 64})
    config.model.name = "lstm_shakespeare"
    config.num_rounds = 200
    config.clients_per_round = 10
    config.eval_every = 20
    config.eval_batch_size = 1024
    # 433,063 test windows through the LSTM take minutes on a CPU: a fixed sample of roles.
    config.eval_max_clients = 100
    config.client.learning_rate = 0.8
    config.client.batch_size = 10
    config.client.local_epochs = 1
    config.client.max_local_steps = 50
    if variant == "smoke":
        config.num_rounds = 2
        config.eval_every = 1
        config.client.max_local_steps = 2
        config.eval_max_clients = 4
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; known: smoke.")
    return config

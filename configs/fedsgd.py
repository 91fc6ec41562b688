"""FedSGD on Synthetic(1, 1): one full-batch gradient per client per round, server SGD lr 0.1.

fedjax-sim run --workdir /tmp/fedsgd --config configs/fedsgd.py
"""

from fedjax_sim.configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    config.algorithm = "fedsgd"
    config.client.local_epochs = 1
    config.client.batch_size = 100
    config.server.learning_rate = 0.1
    return config

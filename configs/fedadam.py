"""FedAdam (Reddi et al. 2021, Algorithm 2) on Synthetic(1, 1): the default with a FedAdam server.

    fedjax-sim run --workdir /tmp/fedadam --config configs/fedadam.py

Client SGD lr 0.01, batch 10, 1 local epoch; server lr 0.03, b1 0.9, b2 0.99, tau 1e-3.
"""

from fedjax_sim.configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    config.algorithm = "fedopt"
    config.client.local_epochs = 1 if variant != "smoke" else 1
    config.server.optimizer = "fedadam"
    config.server.learning_rate = 0.03
    config.server.kwargs = {"b1": 0.9, "b2": 0.99, "tau": 1e-3}
    return config

"""FedAvg, CIFAR-10 (the JPEG copy), Dirichlet(alpha) label skew (Hsu et al. 2019), ResNet-18-GN.

    fedjax-sim run --workdir /tmp/cifar_a01 --config configs/cifar10_dirichlet.py
    fedjax-sim run --workdir /tmp/cifar_a1 --config configs/cifar10_dirichlet.py:alpha1

``alpha`` 0.1 (default) or 1.0 (variant ``alpha1``); 100 clients, 10 a round, batch 20,
1 local epoch, client SGD lr 0.05 with random crops and flips inside the round. ``:smoke``
(and ``:alpha1_smoke``) runs 2 rounds of 2 local steps.
"""

import ml_collections
from fedjax_sim.configs import default


def get_config(variant=None):
    variant = variant or ""
    config = default.get_config(None)
    config.dataset.name = "cifar10_jpeg"
    alpha = 1.0 if variant.startswith("alpha1") else 0.1
    config.dataset.kwargs = ml_collections.ConfigDict(
        {
            "partition": "dirichlet",
            "num_clients": 100,
            "partition_kwargs": ml_collections.ConfigDict({"alpha": alpha}),
        }
    )
    config.model.name = "resnet18_gn"
    config.model.kwargs = ml_collections.ConfigDict({"augment": True})
    config.num_rounds = 500
    config.clients_per_round = 10
    config.eval_every = 25
    config.eval_batch_size = 500
    config.client.learning_rate = 0.05
    config.client.batch_size = 20
    config.client.local_epochs = 1
    if variant.endswith("smoke"):
        config.num_rounds = 2
        config.eval_every = 1
        config.client.max_local_steps = 2
        config.model.name = "cnn_mcmahan"  # ResNet-18 takes minutes per round on a CPU
        config.model.kwargs = ml_collections.ConfigDict({"augment": True})
    elif variant not in ("", "alpha1"):
        raise ValueError(f"unknown variant {variant!r}; known: smoke, alpha1, alpha1_smoke.")
    return config

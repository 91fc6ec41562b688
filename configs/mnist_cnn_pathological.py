"""FedAvg, MNIST CNN of McMahan et al. 2017, pathological non-IID (2 label shards per client).

    fedjax-sim run --workdir /tmp/mnist_cnn_patho --config configs/mnist_cnn_pathological.py
    fedjax-sim run --workdir /tmp/smoke --config configs/mnist_cnn_pathological.py:smoke

The smoke variant (5 rounds of at most 5 local steps of 20 examples) trains from
TFDS-prepared real MNIST offline; accuracy rises from about 0.1 (see README, "Data").
"""

from fedjax_sim.configs.mnist_2nn_iid import mnist_config


def get_config(variant=None):
    return mnist_config(
        variant,
        model="cnn_mcmahan",
        partition="pathological",
        partition_kwargs={"shards_per_client": 2},
    )

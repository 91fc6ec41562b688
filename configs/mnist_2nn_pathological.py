"""FedAvg, MNIST 2NN, McMahan et al. 2017's pathological non-IID split.

Sort by label, 200 shards of 300, 2 shards per client (100 clients, mostly 2 digits each).

    fedjax-sim run --workdir /tmp/mnist_2nn_patho --config configs/mnist_2nn_pathological.py
"""

from fedjax_sim.configs.mnist_2nn_iid import mnist_config


def get_config(variant=None):
    return mnist_config(
        variant, model="mlp", partition="pathological", partition_kwargs={"shards_per_client": 2}
    )

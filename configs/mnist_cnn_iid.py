"""FedAvg, MNIST CNN of McMahan et al. 2017 (1,663,370 parameters), IID over 100 clients.

fedjax-sim run --workdir /tmp/mnist_cnn_iid --config configs/mnist_cnn_iid.py
"""

from fedjax_sim.configs.mnist_2nn_iid import mnist_config


def get_config(variant=None):
    return mnist_config(variant, model="cnn_mcmahan", partition="iid")

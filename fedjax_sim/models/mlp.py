"""The 2NN multilayer perceptron of McMahan et al. 2017."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_sim.core.types import Model
from fedjax_sim.models.base import model_from_linen


class MLP(nn.Module):
    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dtype=jnp.float32, param_dtype=jnp.float32)(x))
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)(x)


def mlp(*, num_classes: int, input_shape: tuple[int, ...]) -> Model:
    """The "2NN" of McMahan et al. 2017 (Communication-Efficient Learning of Deep Networks
    from Decentralized Data): Dense 200, ReLU, Dense 200, ReLU, Dense ``num_classes``.

    Args:
      num_classes: number of classes.
      input_shape: shape of one example; flattened (784-200-200-10 for MNIST).

    Returns:
      The model.
    """
    return model_from_linen(
        MLP(hidden=(200, 200), num_classes=num_classes), name="mlp", input_shape=input_shape
    )

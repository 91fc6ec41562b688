"""Multinomial logistic regression."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fedjax_sim.core.types import Model
from fedjax_sim.models.base import model_from_linen


class LogisticRegression(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)(x)


def logreg(*, num_classes: int, input_shape: tuple[int, ...]) -> Model:
    """Multinomial logistic regression: one dense layer on the flattened input.

    Args:
      num_classes: number of classes.
      input_shape: shape of one example (any rank).

    Returns:
      The model; ``prod(input_shape) * num_classes + num_classes`` parameters.
    """
    return model_from_linen(LogisticRegression(num_classes), name="logreg", input_shape=input_shape)

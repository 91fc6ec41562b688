"""Small image CNNs from the federated-learning literature.

Every convolution is stride 1 and uses :func:`fedjax_sim.models.conv.conv`, every 2x2
max-pool :func:`fedjax_sim.models.pool.max_pool_2x2` (fast gradients inside ``lax.scan`` on
XLA:CPU).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fedjax_sim.core.types import Model
from fedjax_sim.models.base import model_from_linen
from fedjax_sim.models.conv import conv
from fedjax_sim.models.pool import max_pool_2x2


def _dense(features: int) -> nn.Dense:
    return nn.Dense(features, dtype=jnp.float32, param_dtype=jnp.float32)


def _max_pool(x):
    return max_pool_2x2(x)  # nn.max_pool(x, (2, 2), strides=(2, 2)), cheap gradients in loops


class TwoConvCNN(nn.Module):
    """5x5 conv, 2x2 pool, 5x5 conv, 2x2 pool, one hidden dense layer (McMahan / LEAF)."""

    num_classes: int
    hidden: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = _max_pool(nn.relu(conv(32, 5, padding="SAME")(x)))
        x = _max_pool(nn.relu(conv(64, 5, padding="SAME")(x)))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_dense(self.hidden)(x))
        return _dense(self.num_classes)(x)


class EmnistCNN(nn.Module):
    """The EMNIST CNN of Reddi et al. 2021 (Adaptive Federated Optimization)."""

    num_classes: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.relu(conv(32, 3, padding="VALID")(x))
        x = nn.relu(conv(64, 3, padding="VALID")(x))
        x = _max_pool(x)
        x = nn.Dropout(0.25, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_dense(128)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return _dense(self.num_classes)(x)


def cnn_mcmahan(*, num_classes: int, input_shape: tuple[int, ...]) -> Model:
    """The CNN of McMahan et al. 2017 (Communication-Efficient Learning of Deep Networks from
    Decentralized Data): 5x5 conv 32 SAME, ReLU, 2x2 max-pool, 5x5 conv 64 SAME, ReLU, 2x2
    max-pool, Dense 512, ReLU, Dense ``num_classes``.

    Args:
      num_classes: number of classes.
      input_shape: one image ``(H, W, C)``, e.g. ``(28, 28, 1)`` (1,663,370 parameters with 10
        classes).

    Returns:
      The model.
    """
    return model_from_linen(
        TwoConvCNN(num_classes=num_classes, hidden=512),
        name="cnn_mcmahan",
        input_shape=input_shape,
    )


def cnn_femnist(*, num_classes: int, input_shape: tuple[int, ...]) -> Model:
    """The LEAF FEMNIST CNN (Caldas et al. 2018, LEAF: A Benchmark for Federated Settings):
    5x5 conv 32 SAME, ReLU, 2x2 max-pool, 5x5 conv 64 SAME, ReLU, 2x2 max-pool, Dense 2048,
    ReLU, Dense ``num_classes`` (62).

    Args:
      num_classes: number of classes.
      input_shape: one image ``(H, W, C)``, e.g. ``(28, 28, 1)``.

    Returns:
      The model.
    """
    return model_from_linen(
        TwoConvCNN(num_classes=num_classes, hidden=2048),
        name="cnn_femnist",
        input_shape=input_shape,
    )


def cnn_emnist(*, num_classes: int, input_shape: tuple[int, ...]) -> Model:
    """The EMNIST CNN of Reddi et al. 2021 (Adaptive Federated Optimization): 3x3 conv 32
    VALID, ReLU, 3x3 conv 64 VALID, ReLU, 2x2 max-pool, dropout 0.25, Dense 128, ReLU,
    dropout 0.5, Dense ``num_classes`` (62).

    Args:
      num_classes: number of classes.
      input_shape: one image ``(H, W, C)``, e.g. ``(28, 28, 1)``.

    Returns:
      The model; ``apply(..., train=True)`` needs a ``key`` for dropout.
    """
    return model_from_linen(
        EmnistCNN(num_classes=num_classes),
        name="cnn_emnist",
        input_shape=input_shape,
        has_dropout=True,
    )

"""ResNet-18 with GroupNorm for CIFAR."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fedjax_sim.core.types import Model
from fedjax_sim.models.base import model_from_linen
from fedjax_sim.models.conv import conv


class BasicBlock(nn.Module):
    features: int
    strides: int
    num_groups: int

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.GroupNorm(self.num_groups, dtype=jnp.float32, param_dtype=jnp.float32)
        # Strided layers pad like PyTorch's ResNet (1 on each side); conv() uses plain lax for
        # them and the fast custom-VJP convolution for the stride-1 ones.
        pad = ((1, 1), (1, 1))
        y = conv(self.features, 3, strides=self.strides, padding=pad, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = conv(self.features, 3, padding=pad, use_bias=False)(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, strides=self.strides, padding="VALID", use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    num_classes: int
    num_groups: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        x = conv(64, 3, padding=((1, 1), (1, 1)), use_bias=False)(x)
        x = nn.relu(nn.GroupNorm(self.num_groups, dtype=jnp.float32, param_dtype=jnp.float32)(x))
        for stage, features in enumerate((64, 128, 256, 512)):
            for block in range(2):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(features, strides, self.num_groups)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)(x)


def resnet18_gn(*, num_classes: int, input_shape: tuple[int, ...], num_groups: int = 2) -> Model:
    """ResNet-18 for 32x32 images with GroupNorm instead of BatchNorm (Hsieh et al. 2020, The
    Non-IID Data Quagmire; Reddi et al. 2021, Adaptive Federated Optimization).

    A 3x3 stem convolution with 64 channels, four stages of two basic blocks (64, 128, 256,
    512 channels; stride 2 with a 1x1 projection shortcut at the start of stages 2-4), global
    average pooling and a dense layer. No dropout, no batch statistics.

    Args:
      num_classes: number of classes.
      input_shape: one image ``(H, W, C)``, e.g. ``(32, 32, 3)``.
      num_groups: GroupNorm groups per layer (2 in the papers above).

    Returns:
      The model (11,173,962 parameters for CIFAR-10).
    """
    return model_from_linen(
        ResNet18(num_classes=num_classes, num_groups=num_groups),
        name="resnet18_gn",
        input_shape=input_shape,
    )

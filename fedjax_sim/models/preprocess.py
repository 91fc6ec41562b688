"""Image preprocessing and augmentation that run inside the compiled round.

``with_image_preprocessing(model, augment=True)`` wraps a model so that ``apply`` scales
uint8 images to [0, 1] and, when training, draws a random crop (zero padding of 4, as for
CIFAR in He et al. 2016) and a horizontal flip per example from the step's key: the client's
own key, so augmentation is deterministic given the seed and independent of the strategy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim.core.keys import AUGMENT_SALT  # apart from dropout draws on the same step key
from fedjax_sim.core.types import Array, Model, PRNGKey


def to_float_images(x: Array) -> Array:
    """uint8 pixels -> float32 in [0, 1]; float inputs pass through as float32."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


def random_crop_flip(images: Array, key: PRNGKey, *, pad: int = 4) -> Array:
    """Per-example random ``pad``-pixel-shifted crop and horizontal flip of ``[B, H, W, C]``."""
    b, h, w, c = images.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    dy = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
    dx = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k_f, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, y, x, f):
        crop = lax.dynamic_slice(img, (y, x, jnp.zeros_like(y)), (h, w, c))
        return jnp.where(f, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, dy, dx, flip)


def with_image_preprocessing(model: Model, *, augment: bool = False, pad: int = 4) -> Model:
    """Wraps ``model``: uint8 -> [0, 1] always; random crop + flip when training.

    Args:
      model: a model over images shaped ``model.input_shape`` (``H, W, C``).
      augment: draw a crop and flip per example from the step key in ``train`` mode.
      pad: the crop's zero padding.

    Returns:
      The wrapped model (same params, same loss).
    """
    if augment and len(model.input_shape) != 3:
        raise ValueError(
            f"{model.name}: augmentation needs images shaped (H, W, C), got input_shape "
            f"{model.input_shape}."
        )

    def apply(params, x, *, train: bool, key: PRNGKey | None = None):
        x = to_float_images(jnp.asarray(x))
        if augment and train:
            if key is None:
                raise ValueError(f"{model.name}: training with augmentation needs a key.")
            x = x.reshape((-1, *model.input_shape))
            x = random_crop_flip(x, jax.random.fold_in(key, AUGMENT_SALT), pad=pad)
        return model.apply(params, x, train=train, key=key)

    return model._replace(apply=apply)

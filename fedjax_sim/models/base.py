"""Turning a Flax Linen module into a :class:`fedjax_sim.core.types.Model`."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_sim.core.types import Array, Model, Params, PRNGKey
from fedjax_sim.models.conv import fast_convs


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example cross-entropy ``[batch]`` of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def model_from_linen(
    module: nn.Module,
    *,
    name: str,
    input_shape: tuple[int, ...],
    input_dtype: jnp.dtype = jnp.float32,
    has_dropout: bool = False,
) -> Model:
    """Wraps a Linen module called as ``module(x, train=...)`` into a pure :class:`Model`.

    ``apply`` reshapes ``x`` to ``[-1, *input_shape]`` (so ``[B, 28, 28]`` and ``[B, 28, 28, 1]``
    both work), casts it to ``input_dtype``, and feeds ``key`` to dropout as the ``'dropout'``
    stream.

    Args:
      module: the Linen module.
      name: registry name.
      input_shape: shape of one example.
      input_dtype: dtype the input is cast to (``int32`` for token ids).
      has_dropout: whether ``apply(..., train=True)`` needs a key.

    Returns:
      The model; ``init(key)`` returns the plain ``params`` dict.
    """
    input_shape = tuple(int(d) for d in input_shape)

    def prepare(x):
        x = jnp.asarray(x)
        if x.size % max(math.prod(input_shape), 1) != 0:
            raise ValueError(
                f"{name}: input of shape {x.shape} does not split into examples of shape "
                f"{input_shape}"
            )
        return x.reshape((-1, *input_shape)).astype(input_dtype)

    def init(key: PRNGKey) -> Params:
        x = jnp.zeros((1, *input_shape), input_dtype)
        return module.init(key, x, train=False)["params"]

    def apply(params: Params, x: Array, *, train: bool, key: PRNGKey | None = None) -> Array:
        rngs = {}
        if train and has_dropout:
            if key is None:
                raise ValueError(
                    f"{name}: apply(..., train=True) needs a PRNG `key` for dropout; pass "
                    "key=... or use train=False"
                )
            rngs = {"dropout": key}
        with fast_convs():  # plain nn.Conv layers get the loop-friendly convolution
            return module.apply({"params": params}, prepare(x), train=train, rngs=rngs)

    return Model(
        init=init,
        apply=apply,
        loss=softmax_cross_entropy,
        name=name,
        input_shape=input_shape,
    )


def count_params(params: Params) -> int:
    """Total number of scalars in a params pytree."""
    return sum(int(p.size) for p in jax.tree.leaves(params))

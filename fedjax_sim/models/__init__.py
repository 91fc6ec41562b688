"""Model registry: ``get_model(name, num_classes=..., input_shape=...)``; user models join it
with ``register(name, builder)``.

Every model is a :class:`fedjax_sim.core.types.Model` (pure ``init``/``apply`` plus a
per-example cross-entropy loss); stride-1 convolutions use the loop-friendly convolution of
:mod:`fedjax_sim.models.conv`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedjax_sim.core.types import Model
from fedjax_sim.models.base import count_params, model_from_linen, softmax_cross_entropy
from fedjax_sim.models.cnn import cnn_emnist, cnn_femnist, cnn_mcmahan
from fedjax_sim.models.conv import conv, conv2d, conv_general_dilated, conv_or_lax, fast_convs
from fedjax_sim.models.linear import logreg
from fedjax_sim.models.lora import adapters_only, transformer_model
from fedjax_sim.models.mlp import mlp
from fedjax_sim.models.preprocess import with_image_preprocessing
from fedjax_sim.models.resnet import resnet18_gn
from fedjax_sim.models.rewrite import fast_gradients
from fedjax_sim.models.rnn import lstm_shakespeare

_REGISTRY: dict[str, Callable[..., Model]] = {
    "logreg": logreg,
    "mlp": mlp,
    "cnn_mcmahan": cnn_mcmahan,
    "cnn_emnist": cnn_emnist,
    "cnn_femnist": cnn_femnist,
    "lstm_shakespeare": lstm_shakespeare,
    "resnet18_gn": resnet18_gn,
    "transformer": transformer_model,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)  # the built-in models


def register(name: str, builder: Callable[..., Model]) -> None:
    """Adds a model under ``name`` (from user code or a config file); names are unique.

    Args:
      name: the name ``get_model`` and ``config.model.name`` take.
      builder: called as ``builder(num_classes=..., input_shape=..., **model_kwargs)`` (the
        config's ``model.kwargs``), like the built-in factories; returns a :class:`Model`,
        e.g. from :func:`model_from_linen`.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register(name, ...) needs a non-empty str name, got {name!r}.")
    if not callable(builder):
        raise TypeError(
            f"register({name!r}, ...) needs a builder (num_classes=, input_shape=, **kwargs) "
            f"-> Model, got {type(builder).__name__}."
        )
    if name in _REGISTRY and _REGISTRY[name] is not builder:
        raise ValueError(f"a model named {name!r} is already registered.")
    _REGISTRY[name] = builder


def get_builder(name: str) -> Callable[..., Model]:
    """The registry entry of ``name``; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def get_model(
    name: str, *, num_classes: int, input_shape: tuple[int, ...], **model_kwargs: Any
) -> Model:
    """Builds a registered model by name.

    Args:
      name: one of :data:`MODEL_NAMES` or a name added with :func:`register`.
      num_classes: number of classes (the vocabulary size for ``lstm_shakespeare``).
      input_shape: shape of one example's ``x``.
      **model_kwargs: extra options of that model's factory (e.g. ``num_groups`` of
        ``resnet18_gn``), and ``augment=True`` for a random crop and flip per example
        (images only; see ``fedjax_sim.models.preprocess``). Image models always scale
        uint8 inputs to [0, 1].

    Returns:
      The model.

    Raises:
      ValueError: for an unknown name; the message lists the known ones.
      TypeError: the builder returned something other than a :class:`Model`.
    """
    builder = get_builder(name)
    augment = bool(model_kwargs.pop("augment", False))
    model = builder(num_classes=num_classes, input_shape=tuple(input_shape), **model_kwargs)
    if not isinstance(model, Model):
        raise TypeError(
            f"model {name!r}: its builder returned {type(model).__name__}, not a Model "
            "(wrap a Flax module with fs.model_from_linen)."
        )
    if len(model.input_shape) == 3:  # images: uint8 scaling, optional crop + flip
        model = with_image_preprocessing(model, augment=augment)
    elif augment:
        raise ValueError(f"model {name!r} takes no images; augment=True needs (H, W, C) input.")
    return model


__all__ = [
    "MODEL_NAMES",
    "adapters_only",
    "cnn_emnist",
    "cnn_femnist",
    "cnn_mcmahan",
    "conv",
    "conv2d",
    "conv_general_dilated",
    "conv_or_lax",
    "count_params",
    "fast_convs",
    "fast_gradients",
    "get_builder",
    "get_model",
    "logreg",
    "lstm_shakespeare",
    "mlp",
    "model_from_linen",
    "register",
    "resnet18_gn",
    "softmax_cross_entropy",
    "transformer_model",
]

"""Optimizers by name: Optax's, plus the exact server updates of Reddi et al. 2021.

``get_optimizer("adam", 0.01, b1=0.9)`` calls ``optax.adam(learning_rate=0.01, b1=0.9)``.
``momentum`` is ``optax.sgd`` with momentum (0.9 unless given): FedAvgM as a server optimizer.

``fedadam``, ``fedyogi`` and ``fedadagrad`` follow Algorithm 2 of Reddi et al. 2021,
"Adaptive Federated Optimization", to the letter: no bias correction, ``m_{-1} = 0``,
``v_{-1} = tau**2`` and ``x += lr * m / (sqrt(v) + tau)`` on the mean client delta. Optax's
``adam``/``yogi``/``adagrad`` differ: Adam and Yogi correct the moment bias and Adagrad starts
its accumulator at 0.1.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

_OPTAX_NAMES = (
    "adabelief",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "amsgrad",
    "lamb",
    "lars",
    "lion",
    "nadam",
    "noisy_sgd",
    "novograd",
    "radam",
    "rmsprop",
    "sgd",
    "sm3",
    "yogi",
)


class ReddiState(NamedTuple):
    m: optax.Updates
    v: optax.Updates


def _reddi(kind: str, learning_rate: float, b1: float, b2: float, tau: float):
    def init(params):
        return ReddiState(
            m=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(lambda p: jnp.full_like(p, tau**2), params),
        )

    def update(updates, state, params=None):
        del params
        # ``updates`` is the pseudo-gradient g = -Delta (server minus mean client params).
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
        if kind == "adam":
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.v, updates)
        elif kind == "yogi":
            v = jax.tree.map(
                lambda v, g: v - (1 - b2) * g * g * jnp.sign(v - g * g), state.v, updates
            )
        else:  # adagrad
            v = jax.tree.map(lambda v, g: v + g * g, state.v, updates)
        out = jax.tree.map(lambda m, v: -learning_rate * m / (jnp.sqrt(v) + tau), m, v)
        return out, ReddiState(m=m, v=v)

    return optax.GradientTransformation(init, update)


def fedadam(learning_rate: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3):
    """FedAdam's server update, Reddi et al. 2021, Algorithm 2 (no bias correction)."""
    return _reddi("adam", learning_rate, b1, b2, tau)


def fedyogi(learning_rate: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3):
    """FedYogi's server update, Reddi et al. 2021, Algorithm 2."""
    return _reddi("yogi", learning_rate, b1, b2, tau)


def fedadagrad(learning_rate: float, tau: float = 1e-3):
    """FedAdagrad's server update, Reddi et al. 2021, Algorithm 2 (``b1 = 0``)."""
    return _reddi("adagrad", learning_rate, 0.0, 0.0, tau)


def _momentum(learning_rate: float, momentum: float = 0.9, nesterov: bool = False):
    return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


_EXTRA = {
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedadagrad": fedadagrad,
    "momentum": _momentum,
}

OPTIMIZER_NAMES = tuple(sorted(_OPTAX_NAMES + tuple(_EXTRA)))


def optimizer_update(optimizer: optax.GradientTransformation, grads, state, params):
    """``optimizer.update`` under standard dtype promotion.

    Some Optax transforms mix Python floats with int32 step counts (Adam's bias correction),
    which ``jax_numpy_dtype_promotion='strict'`` rejects; our own code stays strict.
    """
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.update(grads, state, params)


def get_optimizer(
    name: str, learning_rate: float, *, inject: bool = False, **kwargs
) -> optax.GradientTransformation:
    """Builds an optimizer by name.

    Args:
      name: an Optax optimizer (``sgd``, ``adam``, ``yogi``, ``adagrad``, ...), ``momentum``,
        or one of Reddi et al.'s exact server updates ``fedadam``, ``fedyogi``,
        ``fedadagrad``.
      learning_rate: the step size.
      inject: wrap the factory in ``optax.inject_hyperparams``: its numeric arguments
        (``learning_rate``, ``momentum``, ``b1``, ...) then live in the optimizer state's
        ``hyperparams`` as arrays, so they can be traced, vmapped over (sweeps) or replaced
        (``with_hyperparams``) without recompiling.
      **kwargs: further arguments of that optimizer (``momentum``, ``b1``, ``eps``, ...).

    Returns:
      An ``optax.GradientTransformation``.
    """
    if name in _EXTRA:
        factory = _EXTRA[name]
    elif name in _OPTAX_NAMES:
        factory = getattr(optax, name)
    else:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZER_NAMES)}.")
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"optimizer {name!r} takes no argument(s) {unknown}; it takes "
            f"{', '.join(p for p in accepted if p != 'learning_rate')}."
        )
    if inject:
        # Optimizer states hold float32 hyperparameters whatever the params' dtype, so that
        # a member's value does not change the state's dtype.
        return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
            learning_rate=learning_rate, **kwargs
        )
    return factory(learning_rate=learning_rate, **kwargs)


def _is_injected(opt_state) -> bool:
    # optax.InjectHyperparamsState or InjectStatefulHyperparamsState (optax >= 0.2.3).
    return isinstance(getattr(opt_state, "hyperparams", None), dict) and hasattr(
        opt_state, "_replace"
    )


def injected_hyperparams(opt_state) -> dict | None:
    """The ``hyperparams`` dict of an ``optax.inject_hyperparams`` state (None if not one)."""
    if _is_injected(opt_state):
        return dict(opt_state.hyperparams)
    return None


def with_hyperparams(opt_state, values) -> optax.OptState:
    """``opt_state`` (from an ``inject_hyperparams`` optimizer) with ``values`` replacing some
    of its hyperparameters; names it does not have are an error."""
    if not _is_injected(opt_state):
        raise TypeError(
            "hyperparameters can only be set on the state of an optimizer built with "
            "optax.inject_hyperparams (get_optimizer(..., inject=True)); got "
            f"{type(opt_state).__name__}."
        )
    unknown = sorted(set(values) - set(opt_state.hyperparams))
    if unknown:
        raise ValueError(
            f"the optimizer has no injected hyperparameter(s) {unknown}; it has "
            f"{', '.join(sorted(opt_state.hyperparams))}."
        )
    hyper = dict(opt_state.hyperparams)
    for k, v in values.items():
        old = hyper[k]
        hyper[k] = jnp.broadcast_to(jnp.asarray(v, old.dtype), old.shape)
    return opt_state._replace(hyperparams=hyper)


def optimizer_from_config(spec) -> optax.GradientTransformation:
    """The optimizer a config group names (``config.client`` or ``config.server``: fields
    ``optimizer``, ``learning_rate``, ``kwargs``), with its numbers injected (sweepable)."""
    if spec.learning_rate < 0:
        raise ValueError(
            f"learning_rate must be >= 0, got {spec.learning_rate}; a negative step size "
            "ascends the loss."
        )
    kwargs = dict(spec.kwargs.to_dict()) if spec.get("kwargs") is not None else {}
    return get_optimizer(spec.optimizer, spec.learning_rate, inject=True, **kwargs)

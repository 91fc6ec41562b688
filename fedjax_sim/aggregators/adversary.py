"""Malicious clients in a round: which clients are malicious, and what they do.

A fixed fraction of the population is malicious (``attacks.malicious_clients``, drawn from the
data seed: who is malicious is a property of the population, like its data, so every member
of a seed sweep faces the same adversaries). A malicious client either poisons its data
before training (``label_flip``: ``y -> num_classes - 1 - y``) or replaces its update after
training with a model-poisoning attack on the cohort's stacked updates (``sign_flip``,
``scaling``, ``gaussian``, ``alie``, ``ipm``: ``aggregators.attacks``); the aggregator
(``mean``, ``median`` or a robust one) then sees the attacked updates. The fraction is the
hyperparameter ``attack.fraction`` (sweepable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators import attacks
from fedjax_sim.core.types import Array, PRNGKey, PyTree

FRACTION = "attack.fraction"
ADVERSARY_SALT = 2**31 - 6  # folded into key(data seed): the malicious set
ATTACK_SALT = 2**31 - 7  # folded into the round key: a model-poisoning attack's randomness
DATA_ATTACKS = ("label_flip",)


class Adversary(NamedTuple):
    """Attributes:
    seed: the data seed the malicious set is drawn from.
    update_attack: replaces malicious clients' rows of the stacked updates, or ``None``.
    data_attack: ``(client data, malicious) -> client data`` before training, or ``None``.
    """

    seed: int
    update_attack: attacks.Attack | None = None
    data_attack: Callable[[dict, Array], dict] | None = None

    def malicious(self, client_ids: Array, fraction) -> Array:
        key = jax.random.fold_in(jax.random.key(self.seed), ADVERSARY_SALT)
        return attacks.malicious_clients(key, client_ids, fraction)

    def attack_updates(self, updates: PyTree, client_ids, weights, fraction, key: PRNGKey):
        if self.update_attack is None:
            return updates
        mask = self.malicious(client_ids, fraction)
        return self.update_attack(updates, mask, weights, jax.random.fold_in(key, ATTACK_SALT))

    def poison(self, data: dict, fraction) -> dict:
        if self.data_attack is None:
            return data
        malicious = self.malicious(data["client_id"][None], fraction)[0]
        return self.data_attack(data, malicious)


def label_flip(num_classes: int) -> Callable[[dict, Array], dict]:
    """Label flipping for a malicious client: its labels (in its packed batches, or in the
    shared examples a lazy cohort gathers from) become ``num_classes - 1 - y``."""

    def poison(data, malicious):
        def flip(y):
            return jnp.where(malicious, attacks.flip_labels(y, num_classes), y)

        if "examples" in data:
            return {**data, "examples": {**data["examples"], "y": flip(data["examples"]["y"])}}
        return {**data, "batches": {**data["batches"], "y": flip(data["batches"]["y"])}}

    return poison


def adversary(name: str, *, seed: int, num_classes: int, **kwargs) -> Adversary:
    """The adversary ``name`` (``attacks.ATTACKS`` or ``label_flip``) with its arguments."""
    known = sorted([*attacks.ATTACKS, *DATA_ATTACKS])
    if name == "label_flip":
        if kwargs:
            raise ValueError(f"attack label_flip takes no attack.kwargs, got {sorted(kwargs)}.")
        return Adversary(seed, data_attack=label_flip(num_classes))
    if name not in attacks.ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(known)}.")
    try:
        return Adversary(seed, update_attack=attacks.ATTACKS[name](**kwargs))
    except TypeError as err:
        raise ValueError(f"attack {name!r}: bad attack.kwargs {kwargs}: {err}") from err


def check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"attack.fraction must be in [0, 1], got {fraction}.")
    return float(fraction)

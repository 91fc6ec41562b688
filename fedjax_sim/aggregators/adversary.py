"""Malicious clients in a round: which clients are malicious, and what they do.

A fixed fraction of the population is malicious (``attacks.malicious_clients``, drawn from the
data seed: who is malicious is a property of the population, like its data, so every member
of a seed sweep faces the same adversaries). A malicious client either poisons its data
before training (``label_flip``: ``y -> num_classes - 1 - y``; ``backdoor``: a pixel
pattern stamped on its images, relabelled as the target class, optionally with its update
boosted as in model replacement) or replaces its update after training with a
model-poisoning attack on the cohort's stacked updates (``sign_flip``, ``scaling``,
``gaussian``, ``alie``, ``ipm``: ``aggregators.attacks``); the aggregator (``mean``,
``median`` or a robust one) then sees the attacked updates. The fraction is the
hyperparameter ``attack.fraction`` (sweepable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators import attacks
from fedjax_sim.core.client import gather_batch
from fedjax_sim.core.keys import ADVERSARY_SALT, ATTACK_SALT
from fedjax_sim.core.types import Array, PRNGKey, PyTree

FRACTION = "attack.fraction"
DATA_ATTACKS = ("label_flip", "backdoor")


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


class Backdoor(NamedTuple):
    """A pixel-pattern backdoor (``attacks.add_backdoor``: BadNets, Gu et al. 2017; in
    federated learning Bagdasaryan et al. 2020), the ``attack.kwargs`` of ``backdoor``.

    Attributes:
      target_label: the class the trigger should make the model predict.
      pattern_size: the side in pixels of the square stamped in each image's bottom-right
        corner.
      value: the stamped pixel value.
      poison_fraction: in ``(0, 1]``: of each local batch of a malicious client, the first
        ``ceil(poison_fraction * real examples)`` are poisoned, the rest stay clean (batches
        are reshuffled every round, so different examples each round).
      boost: each malicious client's update is multiplied by this (1: not boosted; the
        cohort size over the server learning rate replaces the global model, as in
        Bagdasaryan et al.'s model replacement; ``attacks.scaling``).
    """

    target_label: int = 0
    pattern_size: int = 3
    value: float = 1.0
    poison_fraction: float = 1.0
    boost: float = 1.0

    def stamp(self, x: Array, y: Array, poison_mask: Array | None = None) -> tuple[Array, Array]:
        """``(x, y)`` with the trigger stamped and the target label (where ``poison_mask``)."""
        return attacks.add_backdoor(
            x, y, self.target_label, self.pattern_size, self.value, poison_mask=poison_mask
        )


def backdoor_settings(**kwargs) -> Backdoor:
    """``Backdoor`` from ``attack.kwargs``, checked (what needs the data: ``check_backdoor``)."""
    known = Backdoor._fields
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(
            f"attack backdoor: unknown attack.kwargs {unknown}; known: {', '.join(known)}."
        )
    bd = Backdoor(**kwargs)
    label, size = bd.target_label, bd.pattern_size
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(
            f"attack backdoor: attack.kwargs.target_label must be a class index >= 0, got "
            f"{label!r}."
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(
            f"attack backdoor: attack.kwargs.pattern_size must be an int >= 1 (pixels), got "
            f"{size!r}."
        )
    if not 0.0 < float(bd.poison_fraction) <= 1.0:
        raise ValueError(
            f"attack backdoor: attack.kwargs.poison_fraction must be in (0, 1], got "
            f"{bd.poison_fraction}."
        )
    return bd._replace(
        value=float(bd.value), poison_fraction=float(bd.poison_fraction), boost=float(bd.boost)
    )


def check_backdoor(
    bd: Backdoor, *, task: str, input_shape: tuple | None = None, num_classes: int | None = None
) -> None:
    """Refuses a backdoor the run cannot stamp or score: a task other than classification,
    inputs that are not images ``[H, W]`` or ``[H, W, C]``, a pattern larger than the image,
    a target outside the classes (the last three when ``input_shape`` / ``num_classes`` are
    given: a config's task is known before its data loads)."""
    if task != "classification":
        raise ValueError(
            f"attack backdoor stamps a pixel pattern on images and scores one label per "
            f"example; it needs task = 'classification', got {task!r}. Use label_flip or a "
            "model-poisoning attack (sign_flip, scaling, ...) for this task."
        )
    if input_shape is not None:
        if len(input_shape) not in (2, 3):
            raise ValueError(
                f"attack backdoor stamps a pixel pattern on images [H, W] or [H, W, C], but "
                f"this dataset's examples x are {tuple(input_shape)}; use an image dataset "
                "(mnist, cifar10, ...) or another attack."
            )
        height, width = input_shape[:2]
        if bd.pattern_size > min(height, width):
            raise ValueError(
                f"attack backdoor: attack.kwargs.pattern_size={bd.pattern_size} is larger than "
                f"the {height}x{width} images; choose 1..{min(height, width)}."
            )
    if num_classes is not None and not 0 <= bd.target_label < num_classes:
        raise ValueError(
            f"attack backdoor: attack.kwargs.target_label={bd.target_label} is not a class of "
            f"this dataset; choose 0..{num_classes - 1}."
        )


def poisoned_examples(mask: Array, fraction: float) -> Array:
    """Of each batch (last axis of ``mask``), the first ``ceil(fraction * real examples)`` real
    ones, in batch order."""
    rank = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    real = jnp.sum(mask.astype(jnp.int32), axis=-1, keepdims=True)
    return mask & (rank.astype(jnp.float32) < fraction * real.astype(jnp.float32))


def backdoor(bd: Backdoor) -> Callable[[dict, Array], dict]:
    """The backdoor for a malicious client: ``bd.poison_fraction`` of the real examples of each
    of its batches stamped with the trigger and relabelled ``bd.target_label``."""

    def poison(data, malicious):
        batches = data["batches"]
        if "examples" in data:
            # A lazy cohort: gather this client's batches (what an eager cohort holds) and
            # stamp those; stamping the shared examples would copy all of them per client.
            batches = gather_batch(data["examples"], batches["index"], data["mask"])
            data = {k: v for k, v in data.items() if k != "examples"}
        chosen = malicious & poisoned_examples(data["mask"], bd.poison_fraction)
        x, y = bd.stamp(batches["x"], batches["y"], poison_mask=chosen)
        return {**data, "batches": {**batches, "x": x, "y": y}}

    return poison


def adversary(name: str, *, seed: int, num_classes: int, **kwargs) -> Adversary:
    """The adversary ``name`` (``attacks.ATTACKS``, ``label_flip`` or ``backdoor``: ``Backdoor``
    gives its ``kwargs``) with its arguments."""
    known = sorted([*attacks.ATTACKS, *DATA_ATTACKS])
    if name == "label_flip":
        if kwargs:
            raise ValueError(f"attack label_flip takes no attack.kwargs, got {sorted(kwargs)}.")
        return Adversary(seed, data_attack=label_flip(num_classes))
    if name == "backdoor":
        bd = backdoor_settings(**kwargs)
        check_backdoor(bd, task="classification", num_classes=num_classes)
        boost = None if bd.boost == 1.0 else attacks.scaling(bd.boost)
        return Adversary(seed, update_attack=boost, data_attack=backdoor(bd))
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

"""Poisoning attacks for robustness experiments, pure and jittable.

Model poisoning: an ``Attack`` is a function ``attack(updates, malicious_mask, weights, key) ->
updates`` on the cohort's stacked client updates (leading axis = clients) that replaces the rows
of the malicious clients (``malicious_mask`` True and weight > 0) and leaves every other row,
padded ones included, exactly as it was. Attacks that need statistics of the cohort (ALIE, IPM)
compute them over real clients only. Factories close over the attack's hyperparameters and are
listed in ``ATTACKS``; ``malicious_clients`` fixes which clients of the population are malicious.

Data poisoning works on a client's batch instead: ``flip_labels``, ``add_backdoor``, and
``backdoor_success`` to measure a backdoor's effect.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from fedjax_sim.core.types import Array, PRNGKey, PyTree

__all__ = [
    "ATTACKS",
    "Attack",
    "add_backdoor",
    "alie",
    "alie_z",
    "backdoor_counts",
    "backdoor_success",
    "flip_labels",
    "gaussian",
    "ipm",
    "malicious_clients",
    "scaling",
    "sign_flip",
]

Attack = Callable[[PyTree, Array, Array, PRNGKey], PyTree]


def _rows(mask: Array, u: Array) -> Array:
    return mask.reshape((-1,) + (1,) * (u.ndim - 1))


def _replace(updates: PyTree, attacking: Array, malicious_rows: PyTree) -> PyTree:
    """``updates`` with the ``attacking`` rows taken from ``malicious_rows`` (same structure;
    leaves either stacked like ``updates`` or one row broadcast to every client)."""
    return jax.tree.map(
        lambda u, m: jnp.where(
            _rows(attacking, u), jnp.broadcast_to(m, u.shape).astype(u.dtype), u
        ),
        updates,
        malicious_rows,
    )


def _masked_mean(u: Array, mask: Array) -> Array:
    count = jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1).astype(u.dtype)
    return jnp.sum(jnp.where(_rows(mask, u), u, jnp.zeros((), u.dtype)), axis=0) / count


def _attacking(malicious_mask: Array, weights: Array) -> Array:
    # A padded row is nobody's update: attacking it would only move values that never count.
    return malicious_mask & (weights > 0)


# --- Model poisoning -------------------------------------------------------------------------


def sign_flip(scale: float = 1.0) -> Attack:
    """Sign flipping: each malicious client sends ``-scale * u`` instead of its update ``u``
    (a standard baseline, e.g. in Karimireddy et al. 2021, "Learning from History for
    Byzantine Robust Optimization").

    Args:
      scale: ``>= 0``, the flipped update's magnitude relative to the honest one.

    Returns:
      An ``Attack``.
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0; got {scale}.")

    def attack(updates, malicious_mask, weights, key):
        del key
        flipped = jax.tree.map(lambda u: -scale * u, updates)
        return _replace(updates, _attacking(malicious_mask, weights), flipped)

    return attack


def scaling(factor: float) -> Attack:
    """Scaling (model replacement, Bagdasaryan et al. 2020, "How To Backdoor Federated
    Learning"): each malicious client sends ``factor * u``, so its (usually backdoored) update
    survives averaging with the honest ones.

    Args:
      factor: the boost, typically the cohort size.

    Returns:
      An ``Attack``.
    """

    def attack(updates, malicious_mask, weights, key):
        del key
        boosted = jax.tree.map(lambda u: factor * u, updates)
        return _replace(updates, _attacking(malicious_mask, weights), boosted)

    return attack


def gaussian(std: float) -> Attack:
    """Gaussian noise: each malicious client sends i.i.d. ``N(0, std^2)`` coordinates instead of
    its update (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", their Gaussian Byzantine workers).

    Args:
      std: ``>= 0``, the noise's standard deviation.

    Returns:
      An ``Attack`` drawing the noise from its ``key``.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0; got {std}.")

    def attack(updates, malicious_mask, weights, key):
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(key, len(leaves))
        noise = [
            (std * jax.random.normal(k, u.shape, jnp.float32)).astype(u.dtype)
            for u, k in zip(leaves, keys, strict=True)
        ]
        return _replace(updates, _attacking(malicious_mask, weights), treedef.unflatten(noise))

    return attack


def alie_z(num_clients: Array, num_malicious: Array) -> Array:
    """A Little Is Enough's ``z_max`` (Baruch, Baruch and Goldberg 2019): with
    ``s = floor(n / 2 + 1) - f`` the supporters the attackers need, ``z = Phi^-1((n - s) / n)``.

    ``s`` is kept at least 1 (more attackers than the formula admits), and ``z`` is 0 when
    there are no real clients.

    Args:
      num_clients: ``n``, the number of real clients (int, may be traced).
      num_malicious: ``f``, the number of malicious ones among them.

    Returns:
      ``z`` as a float32 scalar.
    """
    n = jnp.asarray(num_clients, jnp.int32)
    s = jnp.maximum(n // 2 + 1 - jnp.asarray(num_malicious, jnp.int32), 1)
    n_f = jnp.maximum(n, 1).astype(jnp.float32)
    z = ndtri((n_f - s.astype(jnp.float32)) / n_f)
    return jnp.where(n > 0, z, jnp.zeros((), jnp.float32))


def alie(z: float | None = None) -> Attack:
    """A Little Is Enough (Baruch, Baruch and Goldberg 2019, "A Little Is Enough:
    Circumventing Defenses For Distributed Learning"): every malicious client sends
    ``mu - z * sigma``, with ``mu`` and ``sigma`` the per-coordinate mean and (population)
    standard deviation of all real clients' true updates, malicious ones included (the
    attackers know their own honest updates, and in simulation the rest too).

    Args:
      z: the shift in standard deviations; ``None`` uses the paper's ``z_max`` for this
        round's numbers of real and malicious clients (``alie_z``).

    Returns:
      An ``Attack``.
    """

    def attack(updates, malicious_mask, weights, key):
        del key
        real = weights > 0
        attacking = _attacking(malicious_mask, weights)
        if z is None:
            shift = alie_z(jnp.sum(real.astype(jnp.int32)), jnp.sum(attacking.astype(jnp.int32)))
        else:
            shift = jnp.asarray(z, jnp.float32)

        def malicious_row(u):
            mu = _masked_mean(u, real)
            var = _masked_mean(jnp.square(u - mu), real)
            return mu - shift.astype(u.dtype) * jnp.sqrt(var)

        return _replace(updates, attacking, jax.tree.map(malicious_row, updates))

    return attack


def ipm(epsilon: float) -> Attack:
    """Inner product manipulation (Xie, Koyejo and Gupta 2020, "Fall of Empires: Breaking
    Byzantine-tolerant SGD by Inner Product Manipulation"): every malicious client sends
    ``-epsilon`` times the unweighted mean of the honest (real, non-malicious) clients' updates,
    so a small ``epsilon`` (0.1) slips past robust rules and a large one (100) overwhelms means.

    Args:
      epsilon: ``>= 0``.

    Returns:
      An ``Attack``; the malicious rows are zero when no client is honest.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}.")

    def attack(updates, malicious_mask, weights, key):
        del key
        attacking = _attacking(malicious_mask, weights)
        honest = (weights > 0) & ~malicious_mask
        rows = jax.tree.map(lambda u: -epsilon * _masked_mean(u, honest), updates)
        return _replace(updates, attacking, rows)

    return attack


ATTACKS: dict[str, Callable[..., Attack]] = {
    "sign_flip": sign_flip,
    "scaling": scaling,
    "gaussian": gaussian,
    "alie": alie,
    "ipm": ipm,
}


def malicious_clients(key: PRNGKey, client_ids: Array, fraction: float | Array) -> Array:
    """Which clients of the population are malicious: client ``c`` is iff
    ``uniform(fold_in(key, c)) < fraction``, so the same clients are malicious in every round,
    whatever the cohort's order, and about ``fraction`` of the population is.

    Args:
      key: the key fixing the malicious set (derive it from the run's root key with a salt of
        its own, so it does not collide with the round keys).
      client_ids: ``[clients]`` int ids (the cohort's, or ``arange(num_clients)``).
      fraction: in ``[0, 1]``; may be traced.

    Returns:
      ``[clients]`` bool. Padded cohort entries get a value too; attacks ignore it (weight 0).
    """
    if isinstance(fraction, (int, float)) and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}.")
    draws = jax.vmap(lambda c: jax.random.uniform(jax.random.fold_in(key, c)))(client_ids)
    return draws < fraction


# --- Data poisoning --------------------------------------------------------------------------


def flip_labels(y: Array, num_classes: int) -> Array:
    """Label flipping (as in Fang et al. 2020, "Local Model Poisoning Attacks to
    Byzantine-Robust Federated Learning"): class ``y`` becomes ``num_classes - 1 - y``.

    Args:
      y: int labels, any shape.
      num_classes: the number of classes.

    Returns:
      The flipped labels, same shape and dtype.
    """
    return (num_classes - 1 - y).astype(y.dtype)


def add_backdoor(
    x: Array,
    y: Array,
    target_label: int,
    pattern_size: int = 3,
    value: float = 1.0,
    poison_mask: Array | None = None,
) -> tuple[Array, Array]:
    """A pixel-pattern backdoor (Gu, Dolan-Gavitt and Garg 2017, "BadNets"; in federated
    learning Bagdasaryan et al. 2020): a ``pattern_size`` square of ``value`` stamped in each
    image's bottom-right corner, and its label set to ``target_label``.

    Args:
      x: images ``[..., H, W, C]`` or ``[..., H, W]``, whose leading axes are ``y``'s (this
        tells the two layouts apart).
      y: int labels ``[...]``.
      target_label: the class the backdoor should trigger.
      pattern_size: the square's side in pixels, ``>= 1``.
      value: the stamped pixel value.
      poison_mask: optional bool ``[...]``, True for the examples to poison (default all);
        the others are returned unchanged.

    Returns:
      ``(x, y)`` with the chosen examples stamped and relabelled.
    """
    if pattern_size < 1:
        raise ValueError(f"pattern_size must be >= 1; got {pattern_size}.")
    image_axes = x.ndim - y.ndim
    if image_axes not in (2, 3):
        raise ValueError(
            f"x must be [..., H, W] or [..., H, W, C] over y's shape {y.shape}; got {x.shape}."
        )
    if image_axes == 2:
        stamped = x.at[..., -pattern_size:, -pattern_size:].set(value)
    else:
        stamped = x.at[..., -pattern_size:, -pattern_size:, :].set(value)
    relabelled = jnp.full_like(y, target_label)
    if poison_mask is None:
        return stamped, relabelled
    mask_x = poison_mask.reshape(poison_mask.shape + (1,) * image_axes)
    return jnp.where(mask_x, stamped, x), jnp.where(poison_mask, relabelled, y)


def backdoor_counts(
    logits: Array, y_true: Array, target_label: int, mask: Array | None = None
) -> tuple[Array, Array]:
    """The sums behind ``backdoor_success``, to pool over batches: ``(hits, counted)``, the
    counted examples (true class not the target, ``mask`` True) and those of them predicted as
    the target, as float32 scalars."""
    counted = y_true != target_label
    if mask is not None:
        counted = counted & mask
    hit = counted & (jnp.argmax(logits, axis=-1) == target_label)
    return jnp.sum(hit.astype(jnp.float32)), jnp.sum(counted.astype(jnp.float32))


def backdoor_success(
    logits: Array, y_true: Array, target_label: int, mask: Array | None = None
) -> Array:
    """The backdoor's attack success rate: of the (backdoored) examples whose true class is not
    the target, the fraction the model predicts as the target.

    Args:
      logits: ``[..., num_classes]`` the model's outputs on backdoored inputs.
      y_true: ``[...]`` the examples' true labels (before relabelling).
      target_label: the backdoor's target class.
      mask: optional bool ``[...]``, False for padding examples.

    Returns:
      A float32 scalar in ``[0, 1]``; 0 when no counted example is outside the target class.
    """
    hits, total = backdoor_counts(logits, y_true, target_label, mask)
    return hits / jnp.maximum(total, 1.0)

"""Simulated secure aggregation: SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") and SecAgg+ (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead"), in pure, jittable JAX.

The pipeline a round goes through:

1. ``quantize``: each client clips every coordinate to ``[-clip_range, clip_range]`` and rounds
   it stochastically (unbiasedly) onto a grid of ``2^bits`` levels, giving integers in
   ``[0, 2^bits - 1]`` (an offset encoding: level 0 is ``-clip_range``).
2. ``mask_updates``: each client adds, for every partner ``j`` in its masking graph, the pairwise
   mask ``PRG(seed_ij)`` over ``Z_m`` (``m = 2^modulus_bits``) when its id is below ``j``'s and
   subtracts it otherwise, so that the masks cancel in the sum. A single masked vector is uniform
   over ``Z_m^d``. ``seed_ij = fold_in(fold_in(key, min(id_i, id_j)), max(id_i, id_j))``
   stands for the Diffie-Hellman agreed secret of the pair (symmetric by construction).
3. ``unmask_sum``: the server adds the survivors' masked vectors. For a client that dropped
   after the masking step the survivors' masks shared with it no longer cancel; in the protocol
   the survivors send the server their Shamir shares of the dropped client's key-agreement
   secret, the server reconstructs its pairwise seeds and removes those masks. Here the server
   simply recomputes the masks from the seeds (no Shamir sharing is simulated), so the unmasked
   sum equals the plain quantized sum of the survivors exactly.
4. ``dequantize``: the integer sum of ``n`` quantized vectors is decoded back to a float sum.

Why ``uint32`` with ``m = 2^k`` (``k <= 32``): JAX has no int64 unless x64 is on, and unsigned
32-bit addition wraps modulo ``2^32`` for free, so every sum is already reduced modulo ``2^32``;
since ``2^k`` divides ``2^32``, a final ``& (2^k - 1)`` reduces it modulo ``2^k``. A general
(non power of two) modulus would need a reduction after each addition and products wider than
32 bits. The sum of ``n`` values in ``[0, 2^bits - 1]`` must stay below ``m`` so that the
modular sum is the true sum: ``n * (2^bits - 1) < 2^modulus_bits`` (``check_capacity``).

Not simulated: the self masks ``b_i`` of the double-masking scheme (which protect a client whose
masked vector arrives after it was declared dropped), the consistency checks and signatures of
the actively secure variant, and any cryptography. The masking graph of SecAgg+ (``neighbors``)
is a Harary-style ring over a random permutation of the cohort (Bell et al. 2020, Section 3).

SecAgg sums integer vectors, so the aggregate is the *uniform* mean over the real (surviving)
clients; a weighted mean needs each client to pre-scale its update by its weight (and the server
to divide by the total weight, which it learns separately), which this module does not do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_sim.aggregators.base import Aggregator
from fedjax_sim.core.keys import GRAPH_SALT
from fedjax_sim.core.types import Array, PRNGKey, PyTree

# Folded into the masking key for the SecAgg+ graph's random permutation; client ids (the
# first fold of a pair seed) are dataset indices far below it.
# float32 has a 24-bit significand: grid positions beyond 2^24 are not exact integers, so the
# stochastic rounding would no longer be unbiased.
MAX_BITS = 24
# Sizes for the byte accounting (``secagg_bytes``): a 256-bit elliptic-curve public key and a
# Shamir share of a 256-bit secret, as in the 256-bit key agreement of Bonawitz et al. (2017,
# Section 7). Authenticated-encryption overhead and client ids are not counted.
PUBLIC_KEY_BYTES = 32
SHARE_BYTES = 32


def _validate(clip_range: float, bits: int, modulus_bits: int | None = None) -> None:
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}.")
    if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
        raise ValueError(
            f"bits must be an integer in [1, {MAX_BITS}] (float32 grid positions), got {bits}."
        )
    if modulus_bits is not None:
        _validate_modulus(modulus_bits)


def _validate_modulus(modulus_bits: int) -> None:
    if not (isinstance(modulus_bits, int) and 1 <= modulus_bits <= 32):
        raise ValueError(
            f"modulus_bits must be an integer in [1, 32] (uint32), got {modulus_bits}."
        )


def _modulus_mask(modulus_bits: int) -> Array:
    return jnp.uint32(2**modulus_bits - 1)


def check_capacity(num_clients: int, bits: int, modulus_bits: int) -> None:
    """Raises ``ValueError`` unless ``num_clients * (2^bits - 1) < 2^modulus_bits``.

    Past that bound the sum of the quantized updates wraps around modulo ``2^modulus_bits`` and
    decodes to garbage.
    """
    total = num_clients * (2**bits - 1)
    if total >= 2**modulus_bits:
        raise ValueError(
            f"secure aggregation would overflow: {num_clients} clients * (2^{bits} - 1) levels = "
            f"{total} >= 2^{modulus_bits} (the modulus); lower `bits`, raise `modulus_bits` (at "
            "most 32), or aggregate fewer clients per cohort."
        )


def quantization_step(clip_range: float, bits: int) -> float:
    """The grid step ``2 * clip_range / (2^bits - 1)``: a client's rounding error is below it."""
    return 2.0 * clip_range / (2**bits - 1)


def quantize(x: Array, key: PRNGKey, clip_range: float, bits: int) -> Array:
    """Clips ``x`` to ``[-clip_range, clip_range]`` and rounds it stochastically onto ``2^bits``
    levels.

    Stochastic rounding (``floor(t + u)``, ``u ~ U[0, 1)``) is unbiased: ``E[q] = t``, so the
    decoded value's expectation is the clipped ``x`` (Bonawitz et al. 2017, Section 2; the
    quantizer of Kairouz et al. 2021's distributed discrete Gaussian without the rotation).

    Args:
      x: float array, any shape.
      key: PRNG key of this client's rounding.
      clip_range: positive; coordinates beyond it are clipped.
      bits: grid resolution, ``1 <= bits <= 24``.

    Returns:
      ``uint32`` array of ``x``'s shape with values in ``[0, 2^bits - 1]``; level ``q`` stands
      for ``-clip_range + q * quantization_step(clip_range, bits)``.
    """
    _validate(clip_range, bits)
    top = float(2**bits - 1)
    x = jnp.clip(jnp.asarray(x, jnp.float32), -clip_range, clip_range)
    t = jnp.clip((x + clip_range) * (top / (2.0 * clip_range)), 0.0, top)
    low = jnp.floor(t)
    up = (jax.random.uniform(key, t.shape, jnp.float32) < t - low).astype(jnp.float32)
    return jnp.minimum(low + up, top).astype(jnp.uint32)


def dequantize(total: Array, num_clients, clip_range: float, bits: int) -> Array:
    """Decodes the integer sum of ``num_clients`` quantized vectors into the float sum.

    ``sum_i x_i ~= total * step - num_clients * clip_range``. In float32 the decoded sum carries
    a rounding error of about ``2^-24 * num_clients * clip_range``, below the grid step while
    ``num_clients * 2^bits`` is well below ``2^24``.

    Args:
      total: ``uint32`` array, the (unmasked) sum.
      num_clients: how many quantized vectors were summed (may be traced).
      clip_range: as in ``quantize``.
      bits: as in ``quantize``.

    Returns:
      float32 array of ``total``'s shape.
    """
    _validate(clip_range, bits)
    step = quantization_step(clip_range, bits)
    return total.astype(jnp.float32) * step - jnp.asarray(num_clients, jnp.float32) * clip_range


# The masking graph: client i sits at position pos[i] of a ring over the real clients (a random
# permutation, padded clients after them); its partners sit at pos[i] + delta (mod n_real) for
# the valid deltas. Scanning over deltas costs O(degree * n * d) PRG words, not O(n^2 d).


def _graph_degree_slots(num_slots_complete: int, n_real, neighbors: int | None):
    """The ring offsets at which a client's partners sit, and which of them are in use, for
    ``n_real`` real clients (possibly traced).

    Returns ``(deltas, valid)``, each of a static length ``[slots]``; distinct valid deltas
    name distinct partners, and ``delta`` is valid exactly when ``n_real - delta`` is, so the
    graph is undirected."""
    if neighbors is None:
        deltas = jnp.arange(1, num_slots_complete + 1, dtype=jnp.int32)
        return deltas, deltas < n_real
    k = neighbors
    h_max = (k + 1) // 2
    odd_k = k % 2 == 1
    n_odd = n_real % 2 == 1
    # Harary graph H_{k,n}: k/2 ring neighbors on each side; for odd k add the diametric
    # partner when n is even, and one more ring neighbor per side when n is odd (degree k + 1,
    # so every client keeps at least k partners).
    h_eff = k // 2 + jnp.where(odd_k & n_odd, 1, 0)
    offsets = jnp.arange(1, h_max + 1, dtype=jnp.int32)
    first_valid = (offsets <= h_eff) & (offsets <= n_real - 1)
    second = n_real - offsets
    second_valid = (offsets <= h_eff) & (second > h_eff)
    deltas = [offsets, second]
    valid = [first_valid, second_valid]
    if odd_k:
        diametric = jnp.reshape(n_real // 2, (1,)).astype(jnp.int32)
        deltas.append(diametric)
        valid.append(jnp.reshape(~n_odd & (n_real // 2 > h_eff), (1,)))
    return jnp.concatenate(deltas), jnp.concatenate(valid)


def graph_degree(num_clients: int, neighbors: int | None) -> int:
    """How many masking partners each of ``num_clients`` clients has: ``num_clients - 1`` for
    the complete graph (SecAgg), about ``neighbors`` for SecAgg+ (``neighbors + 1`` for odd
    ``neighbors`` and odd ``num_clients``, at most ``num_clients - 1``)."""
    _validate_neighbors(neighbors)
    if num_clients <= 1:
        return 0
    if neighbors is None or neighbors >= num_clients - 1:
        return num_clients - 1
    _, valid = _graph_degree_slots(num_clients - 1, jnp.int32(num_clients), neighbors)
    return int(jnp.sum(valid))


def _validate_neighbors(neighbors: int | None) -> None:
    if neighbors is not None and not (isinstance(neighbors, int) and neighbors >= 1):
        raise ValueError(
            f"neighbors must be None (complete graph) or an int >= 1, got {neighbors}."
        )


def _ring_positions(client_ids: Array, members: Array, key: PRNGKey, shuffle: bool):
    n = client_ids.shape[0]
    if shuffle:
        graph_key = jax.random.fold_in(key, GRAPH_SALT)
        # Priorities from the client ids, so the graph does not depend on the cohort order.
        draw = lambda i: jax.random.uniform(jax.random.fold_in(graph_key, i))
        priority = jax.vmap(draw)(client_ids)
    else:
        # The complete graph is the same whatever the ring's order.
        priority = jnp.zeros((n,), jnp.float32)
    priority = jnp.where(members, priority, 2.0 + jnp.arange(n, dtype=jnp.float32))
    order = jnp.argsort(priority)
    pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return order, pos


def _pairwise_masks(
    client_ids: Array,
    members: Array,
    selections: tuple[tuple[Array, Array], ...],
    key: PRNGKey,
    dim: int,
    modulus_bits: int,
    neighbors: int | None,
) -> tuple[Array, ...]:
    """One ``[clients, dim]`` array per ``(rows, partners)`` selection: row ``i`` is
    ``sum_j +-PRG(seed_ij)`` over ``i``'s graph partners ``j`` with ``partners[j]``, zero where
    not ``rows[i]``. ``members`` (the real clients) define the graph. Every selection shares
    one pass over the PRG (the expensive part)."""
    n = client_ids.shape[0]
    client_ids = client_ids.astype(jnp.int32)
    mod_mask = _modulus_mask(modulus_bits)
    zeros = tuple(jnp.zeros((n, dim), jnp.uint32) for _ in selections)
    if n <= 1:
        return zeros
    n_real = jnp.sum(members.astype(jnp.int32))
    if neighbors is not None and neighbors >= n - 1:
        neighbors = None  # the ring of that degree is the complete graph
    deltas, valid = _graph_degree_slots(n - 1, n_real, neighbors)
    order, pos = _ring_positions(client_ids, members, key, shuffle=neighbors is not None)
    ring = jnp.maximum(n_real, 1)

    def pair_mask(a, b):
        lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
        seed = jax.random.fold_in(jax.random.fold_in(key, lo), hi)
        return jax.random.bits(seed, (dim,), jnp.uint32) & mod_mask

    def body(accs, slot):
        delta, ok = slot
        partner = order[(pos + delta) % ring]
        partner_id = client_ids[partner]
        masks = jax.vmap(pair_mask)(client_ids, partner_id)
        # Adding for the lower id and subtracting for the higher makes each pair cancel;
        # uint32 subtraction wraps modulo 2^32.
        signed = jnp.where((client_ids < partner_id)[:, None], masks, jnp.uint32(0) - masks)
        new = []
        for acc, (rows, partners) in zip(accs, selections, strict=True):
            use = ok & rows & partners[partner] & members
            new.append(acc + jnp.where(use[:, None], signed, jnp.uint32(0)))
        return tuple(new), None

    accs, _ = jax.lax.scan(body, zeros, (deltas, valid))
    return tuple(acc & mod_mask for acc in accs)


def _add_masks(quantized: Array, masks: Array, real: Array, modulus_bits: int) -> Array:
    masked = (quantized.astype(jnp.uint32) + masks) & _modulus_mask(modulus_bits)
    return jnp.where(real[:, None], masked, jnp.uint32(0))


def _unmask(masked, survived, correction, modulus_bits):
    total = jnp.sum(jnp.where(survived[:, None], masked, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
    return (total - correction) & _modulus_mask(modulus_bits)


def mask_updates(
    quantized: Array,
    client_ids: Array,
    key: PRNGKey,
    modulus_bits: int = 32,
    neighbors: int | None = None,
    *,
    real: Array | None = None,
) -> Array:
    """Each client's quantized update plus its pairwise masks, modulo ``2^modulus_bits``.

    Client ``i`` adds ``PRG(seed_ij)`` for each partner ``j`` with a larger id and subtracts it
    for a smaller one (Bonawitz et al. 2017, Section 4), with ``seed_ij =
    fold_in(fold_in(key, min_id), max_id)``. The partners are every other real client
    (``neighbors=None``, SecAgg) or its ``neighbors`` ring neighbors on a random Harary graph
    (SecAgg+, Bell et al. 2020), drawn from ``key`` and the ids, so cohort order does not matter.

    Args:
      quantized: ``[clients, d]`` ``uint32`` from ``quantize``.
      client_ids: ``[clients]`` distinct integer ids of the real clients.
      key: the round's masking key, shared by ``mask_updates`` and ``unmask_sum``.
      modulus_bits: ``m = 2^modulus_bits``, at most 32.
      neighbors: ``None`` for the complete graph, else the SecAgg+ degree.
      real: ``[clients]`` bool, False for padded clients (they send zeros and hold no masks);
        all True when omitted.

    Returns:
      ``[clients, d]`` ``uint32`` masked vectors in ``[0, 2^modulus_bits)``; zero rows for
      padded clients.
    """
    _validate_modulus(modulus_bits)
    _validate_neighbors(neighbors)
    n, dim = quantized.shape
    real = jnp.ones((n,), bool) if real is None else real.astype(bool)
    (masks,) = _pairwise_masks(client_ids, real, ((real, real),), key, dim, modulus_bits, neighbors)
    return _add_masks(quantized, masks, real, modulus_bits)


def unmask_sum(
    masked: Array,
    client_ids: Array,
    survived: Array,
    key: PRNGKey,
    modulus_bits: int = 32,
    neighbors: int | None = None,
    *,
    real: Array | None = None,
) -> Array:
    """The server's unmasking: the survivors' quantized sum, exactly, modulo ``2^modulus_bits``.

    The survivors' masked vectors are summed; masks between two survivors cancel. Those between a
    survivor and a client that dropped after masking do not: the server reconstructs the dropped
    clients' seeds (in the protocol from the survivors' Shamir shares of their key-agreement
    secrets; here recomputed from ``key``) and subtracts them (Bonawitz et al. 2017, Section 4).

    Args:
      masked: ``[clients, d]`` from ``mask_updates``.
      client_ids: as given to ``mask_updates``.
      survived: ``[clients]`` bool, False for clients whose masked vector never arrived.
      key: as given to ``mask_updates``.
      modulus_bits: as given to ``mask_updates``.
      neighbors: as given to ``mask_updates``.
      real: as given to ``mask_updates`` (padded clients never count as survivors).

    Returns:
      ``[d]`` ``uint32``, the sum of the survivors' quantized vectors modulo ``2^modulus_bits``.
    """
    _validate_modulus(modulus_bits)
    _validate_neighbors(neighbors)
    n, dim = masked.shape
    real = jnp.ones((n,), bool) if real is None else real.astype(bool)
    survived = survived.astype(bool) & real
    dropped = real & ~survived

    def leftover(_):
        (masks,) = _pairwise_masks(
            client_ids, real, ((survived, dropped),), key, dim, modulus_bits, neighbors
        )
        return jnp.sum(masks, axis=0, dtype=jnp.uint32)

    # Without dropouts every mask cancels: skip the O(degree * n * d) recomputation.
    correction = jax.lax.cond(
        jnp.any(dropped), leftover, lambda _: jnp.zeros((dim,), jnp.uint32), None
    )
    return _unmask(masked, survived, correction, modulus_bits)


def secure_sum(
    updates: PyTree,
    weights: Array,
    key: PRNGKey,
    *,
    clip_range: float,
    bits: int,
    modulus_bits: int = 32,
    survived: Array | None = None,
    neighbors: int | None = None,
    client_ids: Array | None = None,
    mean: bool = True,
    simulate_masks: bool = True,
) -> tuple[PyTree, dict[str, Array]]:
    """Quantize, mask, drop, unmask and decode a cohort's updates: the secure aggregate.

    Args:
      updates: pytree of stacked client updates (leading axis = clients).
      weights: ``[clients]``; only ``weights > 0`` matters (real clients), the aggregate is
        uniform over them (SecAgg sums integers; see the module docstring).
      key: the aggregation key; split into the rounding key (folded with each client's id) and
        the masking key.
      clip_range: per-coordinate clipping bound of ``quantize``.
      bits: ``quantize``'s resolution.
      modulus_bits: ``m = 2^modulus_bits``; ``clients * (2^bits - 1) < m`` is checked.
      survived: ``[clients]`` bool, the clients whose masked vector arrived (default: all real).
      neighbors: ``None`` for SecAgg's complete graph, else SecAgg+'s degree.
      client_ids: ``[clients]`` distinct ids (default: cohort positions); with real ids the
        rounding is independent of cohort order.
      mean: the mean over the survivors (default) or their sum.
      simulate_masks: False skips the masking and unmasking, whose result is bit-identical
        (the masks cancel exactly); True exercises them (and their cost).

    Returns:
      ``(aggregate, stats)``: the aggregate pytree (the updates' structure and dtypes without
      the client axis; zeros when nobody survived) and float32/int32 scalars
      ``num_survivors``, ``num_dropped``, ``clipped_fraction`` (of the survivors'
      coordinates), ``quantization_step`` and ``quantization_error`` (max abs difference to
      the exact aggregate of the survivors' clipped updates).

    Raises:
      ValueError: when the true sum could overflow the modulus, or on bad parameters.
    """
    _validate(clip_range, bits, modulus_bits)
    leaves = jax.tree.leaves(updates)
    n = leaves[0].shape[0]
    check_capacity(n, bits, modulus_bits)
    updates32 = jax.tree.map(lambda u: u.astype(jnp.float32), updates)
    flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates32)
    _, unravel = ravel_pytree(jax.tree.map(lambda u: u[0], updates32))
    real = weights > 0
    survived = real if survived is None else survived.astype(bool) & real
    ids = jnp.arange(n, dtype=jnp.int32) if client_ids is None else client_ids.astype(jnp.int32)

    round_key, mask_key = jax.random.split(key)
    client_keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids)
    quantized = jax.vmap(lambda x, k: quantize(x, k, clip_range, bits))(flat, client_keys)
    quantized = jnp.where(real[:, None], quantized, jnp.uint32(0))
    if simulate_masks:
        _validate_neighbors(neighbors)
        # mask_updates then unmask_sum, with one PRG pass serving both the clients' masks and
        # the server's reconstruction of the masks shared with dropped clients.
        dropped = real & ~survived
        masks, leftover = _pairwise_masks(
            ids,
            real,
            ((real, real), (survived, dropped)),
            mask_key,
            flat.shape[1],
            modulus_bits,
            neighbors,
        )
        masked = _add_masks(quantized, masks, real, modulus_bits)
        correction = jnp.sum(leftover, axis=0, dtype=jnp.uint32)
        total = _unmask(masked, survived, correction, modulus_bits)
    else:
        kept = jnp.where(survived[:, None], quantized, jnp.uint32(0))
        total = jnp.sum(kept, axis=0, dtype=jnp.uint32) & _modulus_mask(modulus_bits)

    num_survivors = jnp.sum(survived.astype(jnp.int32))
    summed = dequantize(total, num_survivors, clip_range, bits)
    clipped = jnp.clip(flat, -clip_range, clip_range)
    exact = jnp.sum(jnp.where(survived[:, None], clipped, 0.0), axis=0)
    if mean:
        count = jnp.maximum(num_survivors, 1).astype(jnp.float32)
        scale = jnp.where(num_survivors > 0, 1.0 / count, 0.0)
        summed, exact = summed * scale, exact * scale
    summed = jnp.where(num_survivors > 0, summed, 0.0)

    outside = jnp.abs(flat) > clip_range
    coords = jnp.maximum(num_survivors, 1).astype(jnp.float32) * flat.shape[1]
    stats = {
        "num_survivors": num_survivors,
        "num_dropped": jnp.sum((real & ~survived).astype(jnp.int32)),
        "clipped_fraction": jnp.sum(outside & survived[:, None]).astype(jnp.float32) / coords,
        "quantization_step": jnp.float32(quantization_step(clip_range, bits)),
        "quantization_error": jnp.max(jnp.abs(summed - exact), initial=0.0),
    }
    aggregate = unravel(summed)
    aggregate = jax.tree.map(lambda a, u: a.astype(u.dtype), aggregate, updates)
    return aggregate, stats


def secure_mean(
    clip_range: float,
    bits: int,
    *,
    modulus_bits: int = 32,
    neighbors: int | None = None,
    dropout_rate: float = 0.0,
    simulate_masks: bool = True,
) -> Aggregator:
    """An ``Aggregator``: the uniform mean of the real clients' updates through ``secure_sum``.

    Padded clients (weight 0) contribute nothing and hold no masks; the real clients count
    equally whatever their weight (SecAgg sums integer vectors). The interface carries no
    client ids, so cohort positions stand in for them.

    Args:
      clip_range: per-coordinate clipping bound before quantization.
      bits: quantization resolution (``2^bits`` levels).
      modulus_bits: ``m = 2^modulus_bits`` (at most 32); the cohort size times ``2^bits - 1``
        must stay below ``m`` (checked when the aggregator is first applied).
      neighbors: ``None`` for SecAgg (complete graph), else SecAgg+'s graph degree.
      dropout_rate: each real client independently drops after masking with this probability
        (drawn from the aggregation key); the server recovers the survivors' mean.
      simulate_masks: as in ``secure_sum``.

    Returns:
      ``Aggregator`` with empty state (no ``from_sums``: quantization needs every update).
    """
    _validate(clip_range, bits, modulus_bits)
    _validate_neighbors(neighbors)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")

    def apply(state, updates, weights, key):
        drop_key, key = jax.random.split(key)
        survived = None
        if dropout_rate > 0:
            survived = jax.random.uniform(drop_key, weights.shape) >= dropout_rate
        aggregate, _ = secure_sum(
            updates,
            weights,
            key,
            clip_range=clip_range,
            bits=bits,
            modulus_bits=modulus_bits,
            survived=survived,
            neighbors=neighbors,
            simulate_masks=simulate_masks,
        )
        return aggregate, state

    def upload_bytes(d, cohort_size):
        return secagg_bytes(d, cohort_size, modulus_bits, neighbors)["up"]

    return Aggregator(init=lambda params: (), apply=apply, upload_bytes=upload_bytes)


def secagg_bytes(
    num_params: int,
    cohort_size: int,
    bits_modulus: int,
    neighbors: int | None = None,
    *,
    public_key_bytes: int = PUBLIC_KEY_BYTES,
    share_bytes: int = SHARE_BYTES,
) -> dict[str, int]:
    """Bytes one client sends and receives in a SecAgg (or SecAgg+) round.

    Following the messages of the protocol's rounds (Bonawitz et al. 2017, Section 4 and its
    O(n + m) client-communication analysis, Section 7.1), with ``p`` masking partners
    (``cohort_size - 1``, or SecAgg+'s graph degree, Bell et al. 2020):

    * AdvertiseKeys: up 2 public keys; down the partners' ``2p`` public keys.
    * ShareKeys: up ``p`` encrypted messages of 2 Shamir shares each (of the key-agreement
      secret and the self-mask seed); down the ``2p`` shares the partners made for this client.
    * MaskedInputCollection: up the masked vector, ``ceil(num_params * bits_modulus / 8)``.
    * Unmasking: up one share per partner (of a survivor's self-mask seed or a dropped
      client's secret), ``p`` shares.

    So ``up = 2K + 3pS + ceil(d * b / 8)`` and ``down = 2pK + 2pS`` with ``K`` =
    ``public_key_bytes`` (32: a 256-bit elliptic-curve key) and ``S`` = ``share_bytes`` (32: a
    share of a 256-bit secret). Encryption overhead, ids, signatures and the model broadcast
    are not counted.

    Args:
      num_params: ``d``, the update's length.
      cohort_size: clients in the round.
      bits_modulus: ``modulus_bits`` of the masked words.
      neighbors: ``None`` (SecAgg) or the SecAgg+ degree.
      public_key_bytes: ``K``.
      share_bytes: ``S``.

    Returns:
      dict with ``up``, ``down`` (totals per client), ``masked_input``, ``key_agreement`` (up
      and down), ``shares`` (up and down) and ``partners``.
    """
    _validate_modulus(bits_modulus)
    p = graph_degree(cohort_size, neighbors)
    masked_input = math.ceil(num_params * bits_modulus / 8)
    keys_up, keys_down = 2 * public_key_bytes, 2 * p * public_key_bytes
    shares_up, shares_down = 3 * p * share_bytes, 2 * p * share_bytes
    return {
        "up": keys_up + shares_up + masked_input,
        "down": keys_down + shares_down,
        "masked_input": masked_input,
        "key_agreement": keys_up + keys_down,
        "shares": shares_up + shares_down,
        "partners": p,
    }

"""Every source of randomness in one place: PRNG salts and the host-side stream tags.

The root key is ``jax.random.key(config.seed)``. The model starts from ``fold_in(root,
INIT_SALT)``; round ``r`` uses ``fold_in(root, r)`` (rounds count from 1, so they never meet
``INIT_SALT = 0``); client ``c`` in that round ``fold_in(round_key, c)``, whatever strategy,
device count or cohort order runs it. Keys that must not collide with a client's fold in one of
the salts below: client ids are dataset indices far below them. Host-side (NumPy) streams are
seeded with ``[seed, TAG, ...]``, one tag per purpose.
"""

from __future__ import annotations

import jax

from fedjax_sim.core.types import PRNGKey

INIT_SALT = 0  # fold_in(root, 0): the initial model

# Salts folded into a round key (after the client ids' range).
AGGREGATE_SALT = 2**31 - 1  # the aggregator's key
NOISE_SALT = 2**31 - 3  # Gaussian noise on the aggregate (DP-FedAvg)
# Salts folded into a client's key.
UPDATE_SALT = 2**31 - 2  # per-client update transforms (compression, masking, ...)
AUGMENT_SALT = 2**31 - 4  # data augmentation inside a local step (random crop and flip)
EF_SALT = 2**31 - 9  # a client's error-feedback compressor (fold_in(client key, EF_SALT))
ADAPTERS_SALT = 2**31 - 11  # FLoRA: a client's fresh LoRA adapters each round
# Salts folded into the root key.
FINETUNE_SALT = 2**31 - 5  # fine-tuning at evaluation (personalization); clients fold their id
# Salts of the aggregation pipeline's components.
ADVERSARY_SALT = 2**31 - 6  # folded into key(data seed): the malicious set
ATTACK_SALT = 2**31 - 7  # folded into the round key: a model-poisoning attack's randomness
FTRL_SALT = 2**31 - 8  # folded into the round key: DP-FTRL's fresh noise draws
GRAPH_SALT = 2**31 - 10  # folded into the aggregator's key: SecAgg+'s random neighbour graph

# NumPy streams: np.random.default_rng([seed, TAG, ...]).
SAMPLING_TAG = 0  # [seed, 0, round]: the round's cohort
SHUFFLE_TAG = 1  # [seed, 1, round, client]: a client's local shuffles
EVAL_SAMPLE_TAG = 2  # [seed, 2]: the evaluated test clients (eval_max_clients)
SYSTEMS_TAG = 3  # [seed, 3, round, what]: who is online, straggles, drops out (driver.systems)
POPULATION_TAG = 4  # [seed, 4]: clients' fixed availability, speeds and links
ASYNC_TAG = 5  # [seed, 5]: the asynchronous schedule's dropouts (driver.asynchronous)
POPULATION_DATA_TAG = 6  # [seed, 6, split, client]: a generated client's data (data.population)


def round_key(root: PRNGKey, round_num) -> PRNGKey:
    """The key of round ``round_num`` (from 1)."""
    return jax.random.fold_in(root, round_num)


def client_keys(key: PRNGKey, client_ids: jax.Array) -> jax.Array:
    """Per-client keys ``fold_in(round_key, client_id)``: independent of cohort order."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(client_ids)

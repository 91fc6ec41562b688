"""Bases for federated fine-tuning: pre-trained centrally, cached on disk, named in a config.

A transformer's ``model.kwargs.base`` (``fedjax_sim.models.lora.transformer_model``) is one of:

- ``""``: a random base (tests, smoke runs);
- a ``.safetensors`` file in GPT-2's layout (a real checkpoint on disk; nothing downloads);
- ``"shakespeare:STEPS"`` (or ``"shakespeare:STEPS:HELD_OUT"``): a character-level base
  trained here for ``STEPS`` Adam steps on the plays that ``data.leaf.select_plays(...,
  "pretrain", HELD_OUT)`` keeps for pre-training (every play but the last ``HELD_OUT``,
  default 10, whose speaking roles are the clients of ``shakespeare_leaf(plays="held_out",
  held_out_plays=HELD_OUT)``: give both the same number). It is trained once and
  cached in ``<cache>/bases/`` (``FEDJAX_SIM_CACHE``, else ``~/.cache/fedjax_sim``) under a
  key of everything that made it (architecture, steps, batch, learning rate, seed, held-out
  plays), with a sha256 of every array; a damaged entry is trained again.

``scripts/pretrain_shakespeare.py`` runs the same recipe from the command line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fedjax_sim.core.task import mean_loss_fn, next_token_task
from fedjax_sim.optimizers import optimizer_update

RECIPES = ("shakespeare",)
PRETRAIN_BATCH = 32
PRETRAIN_LEARNING_RATE = 3e-3


def is_recipe(base: str) -> bool:
    """Whether ``base`` names a recipe (``NAME:...``) rather than a file."""
    return str(base).partition(":")[0] in RECIPES and not os.path.exists(base)


def recipe_base(base: str, arch: dict[str, Any]) -> dict:
    """The parameters ``base`` (``shakespeare:STEPS[:HELD_OUT]``) names for a transformer of
    ``arch`` (``transformer``'s keyword arguments without LoRA's), cached or trained now."""
    name, *numbers = str(base).split(":")
    if name not in RECIPES or not 1 <= len(numbers) <= 2 or not all(n.isdigit() for n in numbers):
        raise ValueError(
            f"unknown base {base!r}: give a .safetensors file, '' (a random base), or "
            f"{' / '.join(r + ':STEPS[:HELD_OUT_PLAYS]' for r in RECIPES)}."
        )
    steps, held_out = int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 10
    if steps < 1:
        raise ValueError(f"base {base!r}: STEPS must be >= 1.")
    return shakespeare_base(steps=steps, arch=arch, held_out_plays=held_out)


def shakespeare_base(
    *,
    steps: int,
    arch: dict[str, Any],
    held_out_plays: int = 10,
    batch_size: int = PRETRAIN_BATCH,
    learning_rate: float = PRETRAIN_LEARNING_RATE,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """A character-level transformer base trained on the pre-training plays (cached).

    Next-character training on consecutive windows of the pre-training text (``context``
    characters each, every position a target), ``batch_size`` windows drawn with replacement
    per step, Adam at ``learning_rate`` with a cosine decay to 0 over ``steps``.

    Args:
      steps: Adam steps.
      arch: the transformer's sizes (``input_shape``, ``num_layers``, ``width``,
        ``num_heads``...), as ``transformer`` takes them (``num_classes`` is the 80 LEAF
        characters).
      held_out_plays: the last plays, left out of pre-training for the federated clients.
      batch_size, learning_rate, seed: the training's.
      data_dir: the folder with the Shakespeare text (default ``<data root>/shakespeare``).
      cache_dir: default ``<FEDJAX_SIM_CACHE or ~/.cache/fedjax_sim>/bases``.
      progress: a line on stderr every tenth of the steps.

    Returns:
      The base's parameters (NumPy), ``transformer(**arch)``'s tree.
    """
    from fedjax_sim.data import leaf
    from fedjax_sim.data.cache import cache_key, load_arrays, save_arrays
    from fedjax_sim.data.files import default_cache_dir
    from fedjax_sim.models.transformer import transformer

    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(arch.items())}
    parts = {
        "recipe": "shakespeare",
        "arch": arch,
        "steps": int(steps),
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "seed": int(seed),
        "held_out_plays": int(held_out_plays),
    }
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "bases"
    path = root / f"shakespeare-{cache_key(parts)}.npz"
    cached = load_arrays(path, parts)
    model = transformer(num_classes=len(leaf.LEAF_CHARS), **{**arch, "lora_rank": 0})
    if cached is not None:
        return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in cached.items()})
    context = int(model.input_shape[0])
    text = leaf.shakespeare_pretraining_text(
        leaf.shakespeare_text(data_dir), held_out_plays=held_out_plays
    )
    windows = leaf.windows_per_position(text, context)
    params = _train(model, windows, steps, batch_size, learning_rate, seed, progress)
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    save_arrays(path, flat, parts)
    if progress:
        print(f"fedjax-sim: pre-trained base cached at {path}", file=sys.stderr)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _train(model, windows, steps, batch_size, learning_rate, seed, progress) -> dict:
    loss_fn = mean_loss_fn(next_token_task(model), train=True)
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    params = model.init(jax.random.key(seed))
    opt_state = opt.init(params)
    data = {k: jnp.asarray(v) for k, v in windows.items()}
    n = int(data["x"].shape[0])

    @jax.jit
    def step(params, opt_state, key):
        idx = jax.random.randint(key, (batch_size,), 0, n)
        batch = {k: v[idx] for k, v in data.items()}
        mask = jnp.ones((batch_size,), bool)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, mask, None)
        updates, opt_state = optimizer_update(opt, grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0, root = time.perf_counter(), jax.random.key(seed)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(root, i))
        if progress and (i + 1) % max(steps // 10, 1) == 0:
            print(
                f"fedjax-sim: pre-training step {i + 1}/{steps}: loss {float(loss):.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
    return jax.tree.map(np.asarray, params)

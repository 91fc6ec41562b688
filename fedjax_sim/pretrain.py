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

import hashlib
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
# Bump when the recipe's training changes, so cached bases made otherwise are not reused.
RECIPE_VERSION = 1
PRETRAIN_BATCH = 32
PRETRAIN_LEARNING_RATE = 3e-3


def is_recipe(base: str) -> bool:
    """Whether ``base`` names a recipe (``NAME:...``) rather than a file."""
    return str(base).partition(":")[0] in RECIPES and not os.path.exists(base)


def held_out_of(base: str) -> int:
    """The held-out plays of a recipe ``shakespeare:STEPS[:HELD_OUT]`` (default 10)."""
    _, *numbers = str(base).split(":")
    return int(numbers[1]) if len(numbers) > 1 and numbers[1].isdigit() else 10


def check_recipe_data(config) -> None:
    """Refuses, before any compute, a run whose clients' plays a recipe base was trained on:
    with ``model.kwargs.base = "shakespeare:..."`` the dataset must be ``shakespeare_leaf``'s
    held-out plays, the same number of them."""
    kwargs = config.model.get("kwargs") or {}
    base = str(kwargs.get("base", "") or "")
    if not base or not is_recipe(base):
        return
    held = held_out_of(base)
    ds = config.dataset.get("kwargs") or {}
    plays, ds_held = ds.get("plays", "all"), int(ds.get("held_out_plays", 10))
    if config.dataset.name != "shakespeare_leaf" or plays != "held_out" or ds_held != held:
        raise ValueError(
            f"model.kwargs.base={base!r} was pre-trained on every Shakespeare play but the last "
            f"{held}: the clients must be those plays (dataset.name='shakespeare_leaf', "
            f"dataset.kwargs.plays='held_out', dataset.kwargs.held_out_plays={held})."
        )


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

    arch = _full_arch(arch)
    text = leaf.shakespeare_pretraining_text(
        leaf.shakespeare_text(data_dir), held_out_plays=held_out_plays
    )
    parts = {
        "recipe": "shakespeare",
        "version": RECIPE_VERSION,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
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
    if cached is None:
        model = transformer(num_classes=len(leaf.LEAF_CHARS), **arch)
        windows = leaf.windows_per_position(text, int(model.input_shape[0]))
        params = _train(model, windows, steps, batch_size, learning_rate, seed, progress)
        cached = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
        save_arrays(path, cached, parts)
        if progress:
            print(f"fedjax-sim: pre-trained base cached at {path}", file=sys.stderr)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in cached.items()})


def _full_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` with ``transformer``'s defaults filled in and its numbers as ints (so the same
    model always has the same cache key), checked; no LoRA option."""
    import inspect

    from fedjax_sim.models.transformer import transformer

    defaults = {
        k: p.default
        for k, p in inspect.signature(transformer).parameters.items()
        if p.default is not inspect.Parameter.empty and not k.startswith("lora_")
    }
    unknown = sorted(set(arch) - set(defaults) - {"input_shape"})
    if unknown or "input_shape" not in arch:
        raise ValueError(
            f"a recipe base takes input_shape and {sorted(defaults)}; got {sorted(arch)}."
        )
    out = {**defaults, **arch}
    out = {
        k: (int(v) if isinstance(v, float) and float(v).is_integer() else v) for k, v in out.items()
    }
    out["input_shape"] = [int(d) for d in arch["input_shape"]]
    return dict(sorted(out.items()))


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

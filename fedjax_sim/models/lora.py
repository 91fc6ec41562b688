"""LoRA adapters as a model's only trained parameters, over a frozen base held once.

``adapters_only(model, base_params)`` is a ``Model`` whose parameters are the LoRA factors
(every ``lora_a`` / ``lora_b`` leaf) and whose ``apply`` runs the full model with the frozen
base beside them. Every algorithm and every aggregation feature then trains, sends, clips,
compresses and aggregates adapters without knowing it: to them the adapters are the model.
The base is the model's ``Frozen`` (``core.frozen``): the driver's programs take it as an
argument (never an embedded constant), and under ``vmap`` over clients it is not batched, so a
cohort of any size shares one copy.

``merged(params, scale)`` folds adapters into the base (``W + scale A B``); ``read_gpt2`` reads a
GPT-2 checkpoint (Hugging Face's safetensors layout) into ``models.transformer``'s layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedjax_sim.core.frozen import Frozen
from fedjax_sim.core.types import Model, Params

ADAPTER_LEAVES = ("lora_a", "lora_b")
# A projection's merged earlier products (``algorithms.flora``), beside its adapter.
DELTA = "lora_delta"
# The registry's choices of trained factors: both, or B alone over a frozen A (FFA-LoRA).
TRAINABLE = {"ab": ADAPTER_LEAVES, "b": ("lora_b",)}


def split(params: Params, trainable: tuple[str, ...] = ADAPTER_LEAVES) -> tuple[Params, Params]:
    """``(adapters, rest)``: the leaves named in ``trainable`` (default: both LoRA factors) and
    every other leaf, as two nested dicts."""
    flat = traverse_util.flatten_dict(dict(params))
    adapters = {k: v for k, v in flat.items() if k[-1] in trainable}
    rest = {k: v for k, v in flat.items() if k[-1] not in trainable}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(rest)


def combine(adapters: Params, base: Params) -> Params:
    """The full parameter tree of ``adapters`` and ``base`` (``split``'s inverse)."""
    flat = traverse_util.flatten_dict(dict(base))
    flat.update(traverse_util.flatten_dict(dict(adapters)))
    return traverse_util.unflatten_dict(flat)


def adapters_only(
    model: Model,
    base_params: Params,
    *,
    trainable: tuple[str, ...] = ADAPTER_LEAVES,
    frozen_seed: int = 0,
) -> Model:
    """``model`` (built with LoRA adapters) as a model whose parameters are its adapters.

    Args:
      model: a model whose parameters hold ``lora_a`` / ``lora_b`` leaves
        (``transformer(..., lora_rank=r)``).
      base_params: its parameters; every leaf but the adapters' is the frozen base (from a
        checkpoint, or ``split(model.init(key))[1]``). Adapter leaves here are ignored.
      trainable: the factors that are trained: ``("lora_a", "lora_b")``, or ``("lora_b",)``
        for FFA-LoRA (Sun et al. 2024: ``A`` random and frozen, the same for every client, so
        averaging the ``B`` averages the products ``A B`` exactly).
      frozen_seed: the seed of the frozen factors (FFA-LoRA's ``A``).

    Returns:
      A ``Model``: ``init(key)`` gives fresh trained factors (``A`` random, ``B`` zero),
      ``apply`` runs ``model`` on them and the frozen rest. Its ``name`` is the model's with
      ``+lora``.

    Raises:
      ValueError: the model has no adapters, ``trainable`` names no factor, or
        ``base_params`` lacks a leaf of the model's base or has one of another shape.
    """
    trainable = tuple(trainable)
    if "lora_b" not in trainable or not set(trainable) <= set(ADAPTER_LEAVES):
        raise ValueError(
            f"trainable must be ('lora_a', 'lora_b') or ('lora_b',) (B starts at 0: with B "
            f"frozen A gets no gradient), got {trainable}."
        )
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    adapter_shapes, base_shapes = split(shapes)
    if not jax.tree.leaves(adapter_shapes):
        raise ValueError(f"model {model.name!r} has no LoRA adapters; build it with lora_rank > 0.")
    _, base = split(base_params)
    _check_same_shapes(base_shapes, base)
    if set(trainable) != set(ADAPTER_LEAVES):  # the untrained factors are drawn once, frozen
        fixed = split(split(model.init(jax.random.key(int(frozen_seed))))[0], trainable)[1]
        base = combine(fixed, base)
    frozen = Frozen(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), base))

    def init(key):
        return split(model.init(key), trainable)[0]

    def apply(adapters, x, *, train, key=None):
        return model.apply(combine(adapters, frozen.get()), x, train=train, key=key)

    return model._replace(init=init, apply=apply, name=f"{model.name}+lora", frozen=frozen)


def _check_same_shapes(want: Params, got: Params) -> None:
    want_flat = traverse_util.flatten_dict(dict(want))
    got_flat = traverse_util.flatten_dict(dict(got))
    missing = sorted("/".join(k) for k in set(want_flat) - set(got_flat))
    extra = sorted("/".join(k) for k in set(got_flat) - set(want_flat))
    if missing or extra:
        raise ValueError(
            f"the base parameters do not fit the model: missing {missing[:4]}, unexpected "
            f"{extra[:4]}; build the model with the checkpoint's sizes."
        )
    for k, w in want_flat.items():
        if tuple(w.shape) != tuple(np.shape(got_flat[k])):
            raise ValueError(
                f"the base parameter {'/'.join(k)} has shape {np.shape(got_flat[k])}, the model "
                f"{tuple(w.shape)}; build the model with the checkpoint's sizes."
            )


def merged(params: Params, scale: float) -> Params:
    """The base with every adapter folded in, ``kernel + scale * (lora_a @ lora_b +
    lora_delta)`` (no ``lora_delta``: 0), and the adapters dropped: the parameters of the same
    model without LoRA (``lora_rank=0``)."""
    flat = traverse_util.flatten_dict(dict(params))
    out = {k: v for k, v in flat.items() if k[-1] not in (*ADAPTER_LEAVES, DELTA)}
    for k, product in traverse_util.flatten_dict(products(params)).items():
        kernel = (*k[:-1], "kernel")
        out[kernel] = out[kernel] + scale * (product + flat.get(k, 0.0))
    return traverse_util.unflatten_dict(out)


def products(adapters: Params) -> Params:
    """Each adapter's product ``lora_a @ lora_b`` as a ``lora_delta`` leaf beside it (the
    tree of ``with_deltas``'s deltas, unscaled: the projection scales it)."""
    flat = traverse_util.flatten_dict(dict(adapters))
    return traverse_util.unflatten_dict(
        {
            (*k[:-1], DELTA): v @ flat[(*k[:-1], "lora_b")]
            for k, v in flat.items()
            if k[-1] == "lora_a"
        }
    )


def with_deltas(adapters: Params) -> Params:
    """``adapters`` with a zero ``lora_delta`` ``[in, out]`` beside every adapter."""
    shapes = jax.eval_shape(products, adapters)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return combine(zeros, adapters)


# ---------------------------------------------------------------- GPT-2 checkpoints


def read_gpt2(path: str | os.PathLike) -> tuple[Params, dict[str, int]]:
    """A GPT-2 checkpoint in Hugging Face's safetensors layout, as ``transformer``'s base.

    The layout: ``wte.weight`` ``[vocab, width]``, ``wpe.weight`` ``[context, width]``, per
    block ``h.{i}.ln_1``, ``h.{i}.attn.c_attn`` (the fused q, k, v projection, ``weight``
    ``[width, 3 width]`` applied as ``x W``), ``h.{i}.attn.c_proj``, ``h.{i}.ln_2``,
    ``h.{i}.mlp.c_fc``, ``h.{i}.mlp.c_proj``, and ``ln_f``; names may carry a
    ``transformer.`` prefix (a saved ``GPT2LMHeadModel``), and the tied ``lm_head.weight`` and
    attention-mask buffers are skipped.

    Args:
      path: the ``.safetensors`` file.

    Returns:
      ``(base params, sizes)`` with ``sizes`` the ``transformer`` arguments it fits:
      ``num_classes``, ``context``, ``num_layers``, ``width`` (the head count is not stored:
      pass GPT-2's, 12 for the 124M model).

    Raises:
      FileNotFoundError / ValueError: a missing file, or one without GPT-2's tensors.
    """
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GPT-2 checkpoint at {path}: give a .safetensors file.")
    raw = load_file(str(path))
    t = {k.removeprefix("transformer."): v for k, v in raw.items()}
    if "wte.weight" not in t or "wpe.weight" not in t or not any(k.startswith("h.") for k in t):
        raise ValueError(f"{path} is not a GPT-2 checkpoint (no wte, wpe or h.* tensors).")
    num_layers = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("h."))
    vocab, width = t["wte.weight"].shape

    def dense(prefix):
        return {"kernel": t[f"{prefix}.weight"], "bias": t[f"{prefix}.bias"]}

    def norm(prefix):
        return {"scale": t[f"{prefix}.weight"], "bias": t[f"{prefix}.bias"]}

    params: dict = {"Embed_0": {"embedding": t["wte.weight"]}, "wpe": t["wpe.weight"]}
    for i in range(num_layers):
        h = f"h.{i}"
        qkv_w = np.split(t[f"{h}.attn.c_attn.weight"], 3, axis=1)
        qkv_b = np.split(t[f"{h}.attn.c_attn.bias"], 3)
        block = {
            "ln_1": norm(f"{h}.ln_1"),
            "ln_2": norm(f"{h}.ln_2"),
            "o": dense(f"{h}.attn.c_proj"),
            "mlp_in": dense(f"{h}.mlp.c_fc"),
            "mlp_out": dense(f"{h}.mlp.c_proj"),
        }
        for name, w, b in zip(("q", "k", "v"), qkv_w, qkv_b, strict=True):
            block[name] = {"kernel": w, "bias": b}
        params[f"block_{i}"] = block
    params["ln_f"] = norm("ln_f")
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    sizes = {
        "num_classes": int(vocab),
        "context": int(t["wpe.weight"].shape[0]),
        "num_layers": num_layers,
        "width": int(width),
    }
    return params, sizes


def write_gpt2(path: str | os.PathLike, params: Mapping) -> None:
    """``transformer`` base parameters (learned positions, no adapters) saved in GPT-2's
    safetensors layout (``read_gpt2``'s inverse): a base pre-trained here can be shared as a
    GPT-2-style checkpoint."""
    from safetensors.numpy import save_file

    p = jax.tree.map(np.asarray, dict(params))
    out = {"wte.weight": p["Embed_0"]["embedding"], "wpe.weight": p["wpe"]}
    blocks = sorted((k for k in p if k.startswith("block_")), key=lambda k: int(k[6:]))
    for i, name in enumerate(blocks):
        b, h = p[name], f"h.{i}"
        out[f"{h}.attn.c_attn.weight"] = np.concatenate(
            [b[n]["kernel"] for n in ("q", "k", "v")], axis=1
        )
        out[f"{h}.attn.c_attn.bias"] = np.concatenate([b[n]["bias"] for n in ("q", "k", "v")])
        for ours, theirs in (
            ("o", "attn.c_proj"),
            ("mlp_in", "mlp.c_fc"),
            ("mlp_out", "mlp.c_proj"),
        ):
            out[f"{h}.{theirs}.weight"], out[f"{h}.{theirs}.bias"] = (
                b[ours]["kernel"],
                b[ours]["bias"],
            )
        for ln in ("ln_1", "ln_2"):
            out[f"{h}.{ln}.weight"], out[f"{h}.{ln}.bias"] = b[ln]["scale"], b[ln]["bias"]
    out["ln_f.weight"], out["ln_f.bias"] = p["ln_f"]["scale"], p["ln_f"]["bias"]
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, str(path))


# ---------------------------------------------------------------- the registry's transformer


def transformer_model(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    base: str = "",
    base_seed: int = 0,
    lora_trainable: str = "ab",
    **kwargs,
) -> Model:
    """The model registry's ``transformer`` (``config.model.kwargs``): ``transformer(...)``
    started from a base.

    Args:
      num_classes: the vocabulary size.
      input_shape: ``(context,)``.
      base: a GPT-2-layout ``.safetensors`` file (``read_gpt2``; its vocabulary and width
        must be the model's, its context at least as long), a recipe such as
        ``shakespeare:STEPS`` (``fedjax_sim.pretrain``: trained here once, cached), or ``""``
        for a random base drawn from ``base_seed`` (tests, smoke runs).
      base_seed: the random base's seed.
      lora_trainable: ``ab`` (both factors trained, averaged separately by FedAvg) or ``b``
        (FFA-LoRA: ``A`` frozen at a draw from ``base_seed``, only ``B`` trained).
      **kwargs: ``transformer``'s other arguments (``num_layers``, ``width``, ``lora_rank``...).

    Returns:
      With ``lora_rank > 0``, ``adapters_only`` over the base (the adapters are the model's
      parameters); else the whole transformer, whose ``init`` returns the base when one is
      given (full-parameter fine-tuning).
    """
    from fedjax_sim import pretrain
    from fedjax_sim.models.transformer import transformer

    if lora_trainable not in TRAINABLE:
        raise ValueError(
            f"unknown lora_trainable {lora_trainable!r}; known: {', '.join(TRAINABLE)} "
            "(b: FFA-LoRA, A frozen)."
        )
    rank = kwargs.get("lora_rank", 0)
    if not rank and (
        lora_trainable != "ab" or any(k.startswith("lora_") for k in kwargs if k != "lora_rank")
    ):
        raise ValueError(
            "LoRA options without lora_rank > 0 change nothing: set model.kwargs.lora_rank "
            "(or drop the lora_* options to fine-tune the whole model)."
        )
    recipe = bool(base) and pretrain.is_recipe(base)
    if base and not recipe and "num_heads" not in kwargs:
        raise ValueError(
            f"{base}: a checkpoint does not store its head count; give model.kwargs.num_heads "
            "(GPT-2's: 12 for the 124M model)."
        )
    if recipe and num_classes != 80:
        raise ValueError(
            f"base {base!r} is a character-level base over LEAF's 80 symbols; the data have "
            f"{num_classes} classes."
        )
    model = transformer(num_classes=num_classes, input_shape=input_shape, **kwargs)
    plain_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("lora_")}
    plain = transformer(num_classes=num_classes, input_shape=input_shape, **plain_kwargs)
    if not base and not rank:
        return plain  # a plain transformer, randomly initialized by its own init
    if recipe:
        arch = {"input_shape": tuple(input_shape), **plain_kwargs}
        params = pretrain.recipe_base(base, arch)
    elif base:
        params, sizes = read_gpt2(base)
        context = int(input_shape[0])
        if sizes["context"] < context:
            raise ValueError(
                f"{base} has {sizes['context']} positions, the model's context is {context}: "
                "use a shorter model.input_shape."
            )
        params["wpe"] = params["wpe"][:context]
    else:
        params = plain.init(jax.random.key(int(base_seed)))
    if rank:
        return adapters_only(
            model, params, trainable=TRAINABLE[lora_trainable], frozen_seed=int(base_seed)
        )
    _check_same_shapes(jax.eval_shape(plain.init, jax.random.key(0)), params)
    frozen_start = jax.tree.map(jnp.asarray, params)
    return plain._replace(init=lambda key: frozen_start)


# ---------------------------------------------------------------- aggregating low-rank factors


def stacked(a, b, weights):
    """FLoRA's exact aggregation (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large
    Language Models with Heterogeneous Low-Rank Adaptations"): the clients' factors stacked
    into one pair of rank ``n r`` whose product is the weighted mean of the clients' products,
    ``sum_i w_i A_i B_i / sum_i w_i`` (averaging ``A`` and ``B`` separately is not:
    ``mean(A) mean(B) != mean(A B)``).

    Args:
      a: ``[n, in, r]``, each client's ``A``.
      b: ``[n, r, out]``, each client's ``B``.
      weights: ``[n]`` aggregation weights (not all 0).

    Returns:
      ``(A [in, n r], B [n r, out])``.
    """
    n, d_in, r = a.shape
    w = weights / jnp.sum(weights)
    big_a = jnp.transpose(a, (1, 0, 2)).reshape(d_in, n * r)
    big_b = (w[:, None, None] * b).reshape(n * r, b.shape[-1])
    return big_a, big_b


def refactor(delta, rank: int):
    """``(A [in, rank], B [rank, out])`` whose product is ``delta``'s best approximation of
    that rank (truncated SVD, the singular values split evenly between the factors): exact
    when ``delta``'s rank is at most ``rank`` (a mean of ``n`` rank-``r`` products with ``n r <=
    rank``)."""
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]

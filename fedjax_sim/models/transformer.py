"""A decoder-only transformer (GPT-2's layout) with optional LoRA adapters on its projections.

Pre-LayerNorm blocks of causal multi-head self-attention and a GELU MLP, learned or rotary
positions, the output head tied to the token embedding (Radford et al. 2019, GPT-2). Each
projection (``q``, ``k``, ``v``, ``o`` of attention, ``mlp_in`` and ``mlp_out``) can carry a LoRA
adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): ``y = x W + b +
(alpha / r) dropout(x) A B`` with ``A`` ``[in, r]`` (random) and ``B`` ``[r, out]`` (zeros at
init, so an adapted model starts as its base). The adapter path never forms ``A B``: it costs
``r (in + out)`` per token, which keeps a cohort of adapters over one shared base cheap.

``fedjax_sim.models.lora`` turns such a model into one whose parameters are the adapters alone
over a frozen base, and reads GPT-2 checkpoints (safetensors) into this layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.core.types import Array, Model
from fedjax_sim.models.base import model_from_linen

PROJECTIONS = ("q", "k", "v", "o", "mlp_in", "mlp_out")
# Names a config may give for a group of projections.
TARGET_GROUPS = {"attention": ("q", "k", "v", "o"), "mlp": ("mlp_in", "mlp_out")}
POSITIONS = ("learned", "rope")
LAYER_NORM_EPS = 1e-5  # GPT-2's


class LoraSettings(NamedTuple):
    """A LoRA adapter's shape: rank ``r``, scale ``alpha / r``, dropout on its input, and
    the projections that carry one (a subset of ``PROJECTIONS``)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


def parse_targets(names: Sequence[str] | str) -> tuple[str, ...]:
    """``names`` (projections or the groups ``attention`` / ``mlp``; a comma-separated string
    is split) as projections, checked."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        for p in TARGET_GROUPS.get(name, (name,)):
            if p not in PROJECTIONS:
                known = ", ".join((*PROJECTIONS, *TARGET_GROUPS))
                raise ValueError(f"unknown LoRA target {name!r}; known: {known}.")
            if p not in out:
                out.append(p)
    if not out:
        raise ValueError("LoRA needs at least one target projection (e.g. q, v).")
    return tuple(out)


class Projection(nn.Module):
    """A dense projection ``x W + b`` with an optional LoRA adapter.

    With an adapter, a ``lora_delta`` parameter beside it (``[in, out]``; never created by
    ``init``, added by ``fedjax_sim.algorithms.flora``) holds earlier rounds' merged products:
    the kernel is then ``W + scale * lora_delta``.
    """

    features: int
    lora: LoraSettings | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        kernel = self.param(
            "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        if self.lora is not None and self.has_variable("params", "lora_delta"):
            kernel = kernel + self.lora.scale * self.get_variable("params", "lora_delta")
        y = x @ kernel + bias
        if self.lora is not None:
            r = self.lora.rank
            # PEFT's default: A uniform in +-1/sqrt(in) (Kaiming with a = sqrt(5)), B zero.
            a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
            a = self.param("lora_a", a_init, (x.shape[-1], r), jnp.float32)
            b = self.param("lora_b", nn.initializers.zeros, (r, self.features), jnp.float32)
            h = nn.Dropout(self.lora.dropout, deterministic=not train)(x)
            y = y + ((h @ a) @ b) * self.lora.scale
        return y


def rotary(x: Array, positions: Array) -> Array:
    """Rotary position embedding (Su et al. 2021) of ``x`` ``[..., T, heads, head_dim]``: each
    pair ``(x[2i], x[2i+1])`` rotated by ``position * 10000^(-2i/head_dim)``."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, None].astype(jnp.float32) * freq  # [T, half]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape)


class Block(nn.Module):
    """A pre-LayerNorm transformer block: causal self-attention, then the MLP."""

    width: int
    num_heads: int
    mlp_ratio: int
    positions: str
    lora: LoraSettings

    def _proj(self, name: str, features: int) -> Projection:
        on = self.lora.rank > 0 and name in self.lora.targets
        return Projection(features, self.lora if on else None, name=name)

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        t, heads = x.shape[-2], self.num_heads
        head_dim = self.width // heads
        h = nn.LayerNorm(LAYER_NORM_EPS, name="ln_1")(x)
        split = lambda y: y.reshape(*y.shape[:-1], heads, head_dim)  # noqa: E731
        q, k, v = (split(self._proj(n, self.width)(h, train=train)) for n in ("q", "k", "v"))
        if self.positions == "rope":
            pos = jnp.arange(t)
            q, k = rotary(q, pos), rotary(k, pos)
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(float(head_dim))
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        attn = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + self._proj("o", self.width)(attn.reshape(*x.shape), train=train)
        h = nn.LayerNorm(LAYER_NORM_EPS, name="ln_2")(x)
        h = nn.gelu(self._proj("mlp_in", self.mlp_ratio * self.width)(h, train=train))
        return x + self._proj("mlp_out", self.width)(h, train=train)


class Decoder(nn.Module):
    """Token ids ``[..., T]`` to next-token logits ``[..., T, vocab]``."""

    vocab_size: int
    context: int
    num_layers: int
    width: int
    num_heads: int
    mlp_ratio: int = 4
    positions: str = "learned"
    lora: LoraSettings = LoraSettings()

    @nn.compact
    def __call__(self, tokens: Array, *, train: bool) -> Array:
        t = tokens.shape[-1]
        wte = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02))
        x = wte(tokens)
        if self.positions == "learned":
            wpe = self.param(
                "wpe", nn.initializers.normal(0.01), (self.context, self.width), jnp.float32
            )
            x = x + wpe[:t]
        for i in range(self.num_layers):
            block = Block(
                self.width, self.num_heads, self.mlp_ratio, self.positions, self.lora,
                name=f"block_{i}",
            )  # fmt: skip
            x = block(x, train=train)
        x = nn.LayerNorm(LAYER_NORM_EPS, name="ln_f")(x)
        return wte.attend(x)  # the head tied to the embedding, as GPT-2's


def transformer(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    num_layers: int = 2,
    width: int = 64,
    num_heads: int = 4,
    mlp_ratio: int = 4,
    positions: str = "learned",
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] | str = ("q", "v"),
) -> Model:
    """A decoder-only transformer over token ids (pair it with ``next_token_task``).

    Args:
      num_classes: the vocabulary size (ids in ``[0, num_classes)``).
      input_shape: ``(context,)``, the sequence length (learned positions cover it).
      num_layers: transformer blocks.
      width: the model width (a multiple of ``num_heads``; even per head for ``rope``).
      num_heads: attention heads.
      mlp_ratio: the MLP's hidden width over ``width``.
      positions: ``learned`` (GPT-2) or ``rope`` (rotary).
      lora_rank: ``r`` of the LoRA adapters (0: none; the model is then the plain base).
      lora_alpha: the adapters' scale is ``alpha / r``.
      lora_dropout: dropout on the adapters' input when training.
      lora_targets: the projections with an adapter: names in ``PROJECTIONS``, or
        ``attention`` / ``mlp`` for a group.

    Returns:
      The model; ``apply`` takes ``[B, T]`` int ids and gives ``[B, T, num_classes]`` logits.
      Its parameters are the whole model, adapters included; ``fedjax_sim.models.lora``
      makes the adapters alone the trained parameters.
    """
    if len(input_shape) != 1 or int(input_shape[0]) < 1:
        raise ValueError(f"transformer expects input_shape=(context,), got {input_shape}.")
    for name, value in (("num_layers", num_layers), ("width", width), ("num_heads", num_heads)):
        if int(value) < 1:
            raise ValueError(f"transformer: {name} must be >= 1, got {value}.")
    if width % num_heads or (positions == "rope" and (width // num_heads) % 2):
        raise ValueError(
            f"transformer: width {width} must split into {num_heads} heads (of even size for "
            "rope); choose width as a multiple of num_heads."
        )
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; known: {', '.join(POSITIONS)}.")
    if lora_rank < 0 or not 0.0 <= lora_dropout < 1.0 or lora_alpha <= 0:
        raise ValueError(
            "transformer: lora_rank must be >= 0, lora_dropout in [0, 1) and lora_alpha > 0; "
            f"got {lora_rank}, {lora_dropout}, {lora_alpha}."
        )
    lora = LoraSettings(int(lora_rank), float(lora_alpha), float(lora_dropout))
    if lora_rank:
        lora = lora._replace(targets=parse_targets(lora_targets))
    module = Decoder(
        vocab_size=int(num_classes),
        context=int(input_shape[0]),
        num_layers=int(num_layers),
        width=int(width),
        num_heads=int(num_heads),
        mlp_ratio=int(mlp_ratio),
        positions=positions,
        lora=lora,
    )
    return model_from_linen(
        module,
        name="transformer",
        input_shape=tuple(input_shape),
        input_dtype=jnp.int32,
        has_dropout=bool(lora_rank and lora_dropout),
    )

"""Recurrent models."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fedjax_sim.core.types import Model
from fedjax_sim.models.base import model_from_linen


class CharLSTM(nn.Module):
    vocab_size: int
    embed_dim: int
    hidden: int
    num_layers: int
    per_position: bool = False

    @nn.compact
    def __call__(self, tokens, *, train: bool):
        del train
        x = nn.Embed(self.vocab_size, self.embed_dim, param_dtype=jnp.float32)(tokens)
        for _ in range(self.num_layers):
            cell = nn.OptimizedLSTMCell(self.hidden, dtype=jnp.float32, param_dtype=jnp.float32)
            # The zero initial state is built from the inputs so that it varies over devices
            # like them inside shard_map (a scan carry must keep its type).
            zero = jnp.zeros(x.shape[:1] + (self.hidden,), x.dtype) + 0 * x[:, :1, 0]
            x = nn.RNN(cell)(x, initial_carry=(zero, zero))
        head = nn.Dense(self.vocab_size, dtype=jnp.float32, param_dtype=jnp.float32)
        return head(x if self.per_position else x[:, -1])


def lstm_shakespeare(
    *, num_classes: int, input_shape: tuple[int, ...], per_position: bool = False
) -> Model:
    """The LEAF Shakespeare next-character LSTM (Caldas et al. 2018, LEAF; McMahan et al.
    2017): Embed 8, two stacked LSTM layers of 256, Dense ``num_classes`` on the last step.

    Args:
      num_classes: vocabulary size (80 in LEAF); inputs are ids in ``[0, num_classes)``.
      input_shape: ``(sequence_length,)``, e.g. ``(80,)``.
      per_position: apply the Dense head at every step instead of only the last, for
        next-token training over whole sequences (TFF's Shakespeare task; pair it with
        ``fedjax_sim.core.task.next_token_task``). Same parameters either way.

    Returns:
      The model; ``apply`` takes int ids ``[B, T]`` and returns ``[B, num_classes]`` logits
      for the character after the sequence, or ``[B, T, num_classes]`` (the character after
      each prefix) with ``per_position``.
    """
    if len(input_shape) != 1:
        raise ValueError(f"lstm_shakespeare expects input_shape=(seq_len,), got {input_shape}")
    return model_from_linen(
        CharLSTM(
            vocab_size=num_classes,
            embed_dim=8,
            hidden=256,
            num_layers=2,
            per_position=per_position,
        ),
        name="lstm_shakespeare",
        input_shape=input_shape,
        input_dtype=jnp.int32,
    )

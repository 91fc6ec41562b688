"""Parameters a model holds fixed (a LoRA model's base), passed to compiled programs as an
argument.

JAX embeds arrays a jitted function closes over in the compiled program as literal constants:
a 40 MiB base becomes 40 MiB of program text, compiled (and cached) again for every program,
and a base over 2 GB cannot be compiled at all. A model whose ``apply`` reads its fixed
parameters through a ``Frozen`` (``frozen.get()``) avoids that wherever the program is built
with ``jit(fn, frozen)``: the value is then an argument of the program, bound while ``fn`` is
traced, so the program holds a reference, not a copy. Outside such a program (a user's own
``jax.jit`` or eager code) ``get()`` returns the arrays themselves and everything still works,
with the base embedded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax

from fedjax_sim.core.types import PyTree, tree_bytes

# id(Frozen) -> its value in the program being traced; replaced, never mutated.
_BOUND: contextvars.ContextVar[dict[int, PyTree] | None] = contextvars.ContextVar(
    "frozen", default=None
)


class Frozen:
    """A model's fixed parameters: ``value`` (device arrays), ``nbytes``, and ``get()``, the
    value as the program being traced sees it."""

    def __init__(self, value: PyTree):
        self.value = jax.tree.map(jax.numpy.asarray, value)
        self.nbytes = tree_bytes(self.value)
        self._placed: dict[Any, PyTree] = {}

    def get(self) -> PyTree:
        """The value bound by the ``jit`` being traced (an argument), else the arrays."""
        return (_BOUND.get() or {}).get(id(self), self.value)

    def placed(self, mesh) -> PyTree:
        """The value on every device of ``mesh`` (``None``: as it is), placed once."""
        if mesh is None:
            return self.value
        if mesh not in self._placed:
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._placed[mesh] = jax.device_put(self.value, sharding)
        return self._placed[mesh]

    @contextlib.contextmanager
    def bound(self, value: PyTree):
        token = _BOUND.set({**(_BOUND.get() or {}), id(self): value})
        try:
            yield
        finally:
            _BOUND.reset(token)


def jit(fn: Callable, frozen: Frozen | None, *, mesh=None, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` that takes ``frozen``'s value as a program argument.

    Args:
      fn: the function to compile.
      frozen: the model's ``Frozen`` (``Model.frozen``), or ``None`` (plain ``jax.jit``).
      mesh: the devices the program runs on (the value is replicated there once).
      **jit_kwargs: ``jax.jit``'s (``donate_argnums`` count ``fn``'s own arguments).

    Returns:
      A callable with ``fn``'s signature, and ``jax.jit``'s ``lower``, ``trace`` and
      ``_cache_size``.
    """
    if frozen is None:
        return jax.jit(fn, **jit_kwargs)
    donate = jit_kwargs.pop("donate_argnums", ())
    donate = (donate,) if isinstance(donate, int) else tuple(donate)

    def with_value(value, *args, **kwargs):
        with frozen.bound(value):
            return fn(*args, **kwargs)

    compiled = jax.jit(with_value, donate_argnums=tuple(d + 1 for d in donate), **jit_kwargs)

    def value():  # inside another such program's trace: its argument, passed on
        bound = (_BOUND.get() or {}).get(id(frozen))
        return frozen.placed(mesh) if bound is None else bound

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return compiled(value(), *args, **kwargs)

    call._cache_size = compiled._cache_size
    call.lower = lambda *args, **kwargs: compiled.lower(value(), *args, **kwargs)
    call.trace = lambda *args, **kwargs: compiled.trace(value(), *args, **kwargs)
    return call

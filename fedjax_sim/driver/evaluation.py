"""The evaluator: every member's global model on its test clients, one pass per test set."""

from __future__ import annotations

from collections.abc import Hashable

import jax
import numpy as np

from fedjax_sim import data
from fedjax_sim.core.task import Task
from fedjax_sim.metrics import make_client_evaluator, make_evaluator, summarize_eval


class Evaluator:
    """Evaluates members' global models; members sharing a test set share one compiled pass.

    Args:
      task: the task (its ``evaluate``).
      test_sets: ``{key: test clients}``.
      member_sets: for each member, the key of its test set.
      batch_size: evaluation batch size.
      vectorized: members' params come stacked (a sweep): each set's pass is vmapped over its
        members. Otherwise there is one member and its params are evaluated on one device.
    """

    def __init__(
        self,
        task: Task,
        test_sets: dict[Hashable, data.FederatedDataset],
        member_sets: list[Hashable],
        *,
        batch_size: int,
        vectorized: bool,
    ):
        self.vectorized = vectorized
        self.device = jax.local_devices()[0]
        self.fns, self.arrays = {}, {}
        for k, t in test_sets.items():
            fn = make_evaluator(task, t.num_clients)
            arrays = data.pack_eval(t, batch_size=batch_size)
            if vectorized:
                fn = jax.jit(jax.vmap(fn, (0, None, None, None)))
            else:
                arrays = jax.device_put(arrays, self.device)
            self.fns[k], self.arrays[k] = fn, arrays
        self.members = {
            k: np.asarray([m for m, mk in enumerate(member_sets) if mk == k]) for k in test_sets
        }
        self.num_members = len(member_sets)
        self.task, self.test_sets, self.batch_size = task, test_sets, batch_size
        self._per_client = {}

    def client_models(self, key: Hashable, client_params) -> dict[str, float]:
        """Metrics of per-client models on test set ``key``: client ``c`` of the set (in its
        order) is scored by ``client_params``' row ``c`` (personalization: each test client's
        own or fine-tuned model). Same fields as a global evaluation."""
        if key not in self._per_client:
            test = self.test_sets[key]
            packed = data.pack_cohort(
                test, range(test.num_clients), batch_size=self.batch_size, seed=0, round_num=0
            )
            self._per_client[key] = (make_client_evaluator(self.task), packed)
        fn, packed = self._per_client[key]
        return summarize_eval(*fn(client_params, dict(packed.batches), packed.mask))

    def __call__(self, params) -> list[dict[str, float]]:
        """Each member's metrics (``summarize_eval``) from its global model ``params``."""
        if not self.vectorized:
            ((k, fn),) = self.fns.items()
            sums = fn(jax.device_put(params, self.device), *self.arrays[k])
            return [summarize_eval(*sums)]
        out: list = [None] * self.num_members
        for k, idx in self.members.items():
            sub = params
            if len(idx) != self.num_members:
                sub = jax.tree.map(lambda a, i=idx: a[i], params)
            sums = jax.device_get(self.fns[k](sub, *self.arrays[k]))
            for j, m in enumerate(idx):
                out[m] = summarize_eval(*(a[j] for a in sums))
        return out

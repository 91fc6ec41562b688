"""The evaluator: every member's global model on its test clients, one pass per test set;
where asked, each test client's personalized model (``Personalization``); and, under a
backdoor attack, the global model's attack success rate on the triggered test images."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fedjax_sim import data
from fedjax_sim.aggregators import attacks
from fedjax_sim.aggregators.adversary import Backdoor
from fedjax_sim.algorithms.base import with_optimizer_hparams
from fedjax_sim.core.client import local_train
from fedjax_sim.core.execution import map_clients
from fedjax_sim.core.frozen import jit as frozen_jit
from fedjax_sim.core.keys import FINETUNE_SALT, client_keys
from fedjax_sim.core.task import Task, mean_loss_fn
from fedjax_sim.metrics import make_client_evaluator, make_evaluator, summarize_eval

PERSONAL_PREFIX = "personal_"
BACKDOOR_SUCCESS = "backdoor_success"


class Personalization(NamedTuple):
    """How test clients' personalized models are made at each evaluation.

    Each test client whose id is also a training client's starts from that client's
    personalized model (``FederatedAlgorithm.personalize``; the global model for algorithms
    without one) and, with ``finetune_steps`` > 0, fine-tunes it for that many local steps on
    that training client's data (batches of ``batch_size``, a fixed shuffle, the client
    optimizer with the member's hyperparameters), then is scored on its own test data.

    Attributes:
      finetune_steps: local fine-tuning steps (0: none).
      optimizer: the fine-tuning optimizer (the config's client optimizer, injected).
      batch_size: fine-tuning batch size.
      seed: fixes the fine-tuning shuffles and keys: the data seed (``Evaluator``'s
        ``finetune_seeds`` gives one per test set), so that members of a sweep on one
        dataset fine-tune exactly as their solo runs do.
      personalize: the algorithm's ``personalize`` or ``None``.
      strategy: how clients are mapped (a resolved client strategy).
    """

    finetune_steps: int
    optimizer: optax.GradientTransformation
    batch_size: int
    seed: int
    personalize: Callable | None
    strategy: str

    @property
    def enabled(self) -> bool:
        return self.finetune_steps > 0 or self.personalize is not None


class Evaluator:
    """Evaluates members' global models; members sharing a test set share one compiled pass.

    Args:
      task: the task (its ``evaluate``).
      test_sets: ``{key: test clients}``.
      member_sets: for each member, the key of its test set.
      batch_size: evaluation batch size.
      vectorized: members' params come stacked (a sweep): each set's pass is vmapped over its
        members. Otherwise there is one member and its params are evaluated on one device.
      backdoor: under a backdoor attack, every evaluation also gives ``backdoor_success``:
        of the test examples whose class is not the target, the fraction the global model
        classifies as the target once the trigger is stamped on them.
    """

    def __init__(
        self,
        task: Task,
        test_sets: dict[Hashable, data.FederatedDataset],
        member_sets: list[Hashable],
        *,
        batch_size: int,
        vectorized: bool,
        train_sets: dict[Hashable, data.FederatedDataset] | None = None,
        personalization: Personalization | None = None,
        finetune_seeds: dict[Hashable, int] | None = None,
        backdoor: Backdoor | None = None,
    ):
        self.vectorized = vectorized
        self.device = jax.local_devices()[0]
        self.fns, self.arrays = {}, {}
        self.backdoor = backdoor
        backdoor_fn = None if backdoor is None else backdoor_evaluator(task, backdoor)
        self._backdoor_fns = {}
        frozen = task.model.frozen  # a LoRA base: an argument of every program, not a constant
        for k, t in test_sets.items():
            fn = make_evaluator(task, t.num_clients)
            arrays = data.pack_eval(t, batch_size=batch_size)
            if vectorized:
                fn = frozen_jit(jax.vmap(fn, (0, None, None, None)), frozen)
                if backdoor_fn is not None:
                    self._backdoor_fns[k] = frozen_jit(
                        jax.vmap(backdoor_fn, (0, None, None)), frozen
                    )
            else:
                arrays = jax.device_put(arrays, self.device)
                if backdoor_fn is not None:
                    self._backdoor_fns[k] = frozen_jit(backdoor_fn, frozen)
            self.fns[k], self.arrays[k] = fn, arrays
        self.members = {
            k: np.asarray([m for m, mk in enumerate(member_sets) if mk == k]) for k in test_sets
        }
        self.num_members = len(member_sets)
        self.task, self.test_sets, self.batch_size = task, test_sets, batch_size
        self.member_sets = list(member_sets)
        self._per_client = {}
        self.personalization = None
        if personalization is not None and personalization.enabled:
            self.personalization = personalization
            seeds = finetune_seeds or {}
            self._personal = {
                k: _personal_clients(
                    test_sets[k],
                    train_sets[k],
                    personalization._replace(seed=int(seeds.get(k, personalization.seed))),
                    batch_size,
                )
                for k in test_sets
            }
            self._finetune = frozen_jit(_finetuner(task, personalization), frozen)

    def personal(self, program, states) -> list[dict[str, float]]:
        """Each member's personalized metrics (``personal_*`` fields; ``{}`` when off)."""
        if self.personalization is None:
            return [{} for _ in range(self.num_members)]
        out = []
        for m, k in enumerate(self.member_sets):
            state = program.member_state(states, m)
            rows, train_ids, batches, mask, test_packed, root = self._personal[k]
            ids = jnp.asarray(train_ids, jnp.int32)
            start = self._start(state, ids)
            params = self._finetune(start, state.hparams, ids, batches, mask, root)
            ev = self.client_models(("personal", k), params, packed=test_packed)
            out.append({PERSONAL_PREFIX + name: v for name, v in ev.items()})
        return out

    def _start(self, state, ids):
        fn = self.personalization.personalize
        if fn is not None:
            return fn(state, ids)
        return jax.tree.map(lambda p: jnp.broadcast_to(p, (len(ids), *p.shape)), state.params)

    def client_models(self, key: Hashable, client_params, packed=None) -> dict[str, float]:
        """Metrics of per-client models on test set ``key``: client ``c`` of the set (in its
        order) is scored by ``client_params``' row ``c`` (personalization: each test client's
        own or fine-tuned model). Same fields as a global evaluation. ``packed``: the test
        clients' packed data (default: every client of the set)."""
        if key not in self._per_client:
            if packed is None:
                packed = _pack_test(self.test_sets[key], self.batch_size)
            self._per_client[key] = (make_client_evaluator(self.task), packed)
        fn, packed = self._per_client[key]
        return summarize_eval(*fn(client_params, dict(packed.batches), packed.mask))

    def __call__(self, params) -> list[dict[str, float]]:
        """Each member's metrics (``summarize_eval``, and ``backdoor_success`` under a backdoor)
        from its global model ``params``."""
        if not self.vectorized:
            ((k, fn),) = self.fns.items()
            params = jax.device_put(params, self.device)
            out = summarize_eval(*fn(params, *self.arrays[k]))
            if self.backdoor is not None:
                arrays, mask, _ = self.arrays[k]
                out[BACKDOOR_SUCCESS] = _success(*self._backdoor_fns[k](params, arrays, mask))
            return [out]
        out: list = [None] * self.num_members
        for k, idx in self.members.items():
            sub = params
            if len(idx) != self.num_members:
                sub = jax.tree.map(lambda a, i=idx: a[i], params)
            sums = jax.device_get(self.fns[k](sub, *self.arrays[k]))
            for j, m in enumerate(idx):
                out[m] = summarize_eval(*(a[j] for a in sums))
            if self.backdoor is not None:
                arrays, mask, _ = self.arrays[k]
                hits, counted = jax.device_get(self._backdoor_fns[k](sub, arrays, mask))
                for j, m in enumerate(idx):
                    out[m][BACKDOOR_SUCCESS] = _success(hits[j], counted[j])
        return out


def backdoor_evaluator(task: Task, backdoor: Backdoor):
    """``(params, arrays, mask) -> (hits, counted)`` over packed evaluation batches
    (``data.pack_eval``): every image stamped with ``backdoor``'s trigger, ``counted`` the real
    examples whose true class is not the target, ``hits`` those the model then classifies as
    the target (``attacks.backdoor_counts``; their ratio is the attack success rate)."""
    model = task.model

    def evaluate(params, arrays, mask):
        def body(carry, inp):
            batch, m = inp
            x, _ = backdoor.stamp(batch["x"], batch["y"])
            logits = model.apply(params, x, train=False, key=None)
            hits, counted = attacks.backdoor_counts(logits, batch["y"], backdoor.target_label, m)
            return (carry[0] + hits, carry[1] + counted), None

        zero = jnp.zeros((), jnp.float32)
        sums, _ = lax.scan(body, (zero, zero), (arrays, mask))
        return sums

    return evaluate


def _success(hits, counted) -> float:
    return float(np.asarray(hits, np.float64) / max(float(counted), 1.0))


def _pack_test(test: data.FederatedDataset, batch_size: int):
    return data.pack_cohort(
        test, range(test.num_clients), batch_size=batch_size, seed=0, round_num=0
    )


def _personal_clients(test, train, personalization: Personalization, batch_size: int):
    """The test clients that are also training clients, their training indices, their
    fine-tuning batches (round 0's shuffle: training rounds count from 1) and test data."""
    if getattr(train, "on_demand", False):  # not a dict of a million ids to find none
        raise ValueError(
            f"personalized evaluation (eval.finetune_steps, or a personalizing algorithm) "
            f"fine-tunes each test client on its training data, but {train.name}'s test "
            "clients are other clients; set eval.finetune_steps = 0."
        )
    where = {cid: i for i, cid in enumerate(train.client_ids)}
    rows = [r for r, cid in enumerate(test.client_ids) if cid in where]
    if not rows:
        raise ValueError(
            f"personalized evaluation (eval.finetune_steps, or a personalizing algorithm) "
            f"scores each test client by the model of the training client with its id, but "
            f"no test client of {test.name} is a training client; set eval.finetune_steps = 0 "
            "or use a dataset whose clients have both splits."
        )
    train_ids = np.asarray([where[test.client_ids[r]] for r in rows], np.int32)
    k = max(personalization.finetune_steps, 1)
    tune = data.pack_cohort(
        train,
        train_ids.tolist(),
        batch_size=personalization.batch_size,
        local_epochs=k,
        max_local_steps=k,
        num_steps=k,
        seed=personalization.seed,
        round_num=0,
    )
    packed = _pack_test(test.subset(rows), batch_size)
    root = jax.random.fold_in(jax.random.key(personalization.seed), FINETUNE_SALT)
    return rows, train_ids, dict(tune.batches), tune.mask, packed, root


def _finetuner(task: Task, p: Personalization):
    """``(start params [k, ...], hparams, train ids, batches, mask, root key) -> fine-tuned
    params``."""
    loss_fn = mean_loss_fn(task, train=True)

    def finetune(start, hparams, ids, batches, mask, root):
        if p.finetune_steps == 0:
            return start
        keys = client_keys(root, ids)

        def one(args):
            params, b, m, key = args
            opt_state = with_optimizer_hparams(p.optimizer.init(params), hparams, "client")
            return local_train(
                params, b, m, key, loss_fn=loss_fn, optimizer=p.optimizer, opt_state=opt_state
            ).params

        return map_clients(one, (start, batches, mask, keys), strategy=p.strategy)

    return finetune

"""Shared types of the pure core."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

Array = jax.Array
PyTree = Any
Params = PyTree
PRNGKey = jax.Array
Metrics = Mapping[str, Array]


def tree_bytes(tree: PyTree) -> int:
    """Bytes of a tree of arrays or shapes (``jax.ShapeDtypeStruct``), each at its dtype."""
    return sum(
        int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
        for a in jax.tree.leaves(tree)
    )


class Cohort(NamedTuple):
    """The sampled clients' data for one round, packed into fixed shapes.

    Attributes:
      batches: dict of arrays shaped ``[clients, steps, batch, ...]`` (for example ``x`` and
        ``y``). Padding entries hold zeros.
      mask: ``[clients, steps, batch]`` bool, True for real examples.
      num_examples: ``[clients]`` float32, the client's example count (its FedAvg weight).
        Padded clients have 0.
      client_ids: ``[clients]`` int32 index of each client in its dataset. Padded clients
        carry an out-of-range index (``>= num_clients``) so scatters to per-client state drop
        them.
      examples: ``None``, or every example of the dataset (``{"x": [n, ...], ...}``, shared
        by all clients); then ``batches`` is ``{"index": [clients, steps, batch]}`` into them
        (``pack_cohort_indices``) and each local step gathers its own batch, so the padded
        ``[clients, steps, batch, ...]`` cohort is never materialized. Only algorithms with
        ``lazy_examples`` accept such cohorts.
      info: ``None``, or per-client facts the driver's schedule adds, each ``[clients]``
        (``{"staleness": int32}``: server steps since an asynchronous client started). Every
        client reads them as ``data["info"]``.
      state_rows: ``None`` (each client's per-client state is row ``client_id`` of the state's
        tables), or ``[clients]`` int32 rows into tables that hold only this cohort's rows
        (``driver.client_states``: a huge population's state kept on the host); padding rows
        are out of range.
    """

    batches: Mapping[str, Array]
    mask: Array
    num_examples: Array
    client_ids: Array
    examples: Mapping[str, Array] | None = None
    info: Mapping[str, Array] | None = None
    state_rows: Array | None = None

    @property
    def table_rows(self) -> Array:
        """Each client's row of the per-client state tables (``state_rows`` or its id)."""
        return self.client_ids if self.state_rows is None else self.state_rows

    @property
    def num_clients(self) -> int:
        return self.mask.shape[0]

    @property
    def num_steps(self) -> int:
        return self.mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[2]


class Model(NamedTuple):
    """A model as two pure functions plus its loss.

    Attributes:
      init: ``key -> params``.
      apply: ``(params, x, *, train: bool, key: PRNGKey | None) -> logits``. ``key`` feeds
        dropout when ``train`` is True.
      loss: per-example loss ``(logits, y) -> [batch]``.
      name: registry name.
      input_shape: shape of one example's ``x``.
      frozen: ``None``, or the ``fedjax_sim.core.frozen.Frozen`` parameters ``apply`` holds
        fixed beside the trained ones (a LoRA model's base,
        ``fedjax_sim.models.lora.adapters_only``): the driver's programs take them as an
        argument, and every client downloads them once, the first time it takes part (the
        run's ``bytes_down`` counts ``frozen_bytes`` so).
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[..., Array]
    loss: Callable[[Array, Array], Array]
    name: str
    input_shape: tuple[int, ...]
    frozen: Any = None

    @property
    def frozen_bytes(self) -> int:
        return 0 if self.frozen is None else int(self.frozen.nbytes)


class ClientOutput(NamedTuple):
    """What one client sends back at the end of its local work.

    Attributes:
      update: pytree shaped like the params, aggregated across the cohort (FedAvg: the
        model delta ``server_params - client_params``; FedSGD: the gradient).
      weight: scalar aggregation weight (0 for padded clients).
      metrics: dict of per-client scalars (``loss``, ``num_examples``, ...).
      client_state: the client's new persistent state (``()`` for stateless algorithms).
      extras: further outputs the server sums over the cohort as they are, outside the
        aggregation pipeline (SCAFFOLD's control-variate delta); ``Executor.run`` returns
        their sum. ``()``: none.
    """

    update: Params
    weight: Array
    metrics: Mapping[str, Array]
    client_state: PyTree
    extras: PyTree = ()


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm: two pure functions, as Optax's GradientTransformation.

    ``state = algo.init(params)``; ``state, metrics = algo.apply(state, cohort, key)``.
    The state's structure, shapes and dtypes never change between rounds.

    The state is a NamedTuple the driver reads through three fields (the protocol):

    - ``params``: the global model (evaluated by the driver).
    - ``hparams``: ``{name: float32 scalar}``, the algorithm's numeric hyperparameters
      (``hparams`` below gives their names and built-in values). ``apply`` reads them from here,
      never from Python closures, so a sweep vmaps over states whose ``hparams`` differ and
      trains every member in one compiled program.
    - ``client_states`` (optional): per-client persistent state (control variates, personal
      models), every leaf with a leading ``[num_clients]`` axis (error feedback's residuals
      are the aggregation pipeline's, in ``aggregator_state``).
      It is part of the state, so the driver keeps, checkpoints and resumes it with the rest;
      ``Executor.run`` gathers the cohort's rows and scatters their new values back.

    Attributes:
      init: ``params -> state``.
      apply: ``(state, cohort, key) -> (state, metrics)``; ``metrics["train_loss"]`` is the
        round's example-weighted training loss (the driver's divergence check reads it).
      lazy_examples: whether ``apply`` accepts cohorts with ``examples`` (batches gathered
        step by step).
      hparams: names (config field paths such as ``client.learning_rate``) and built-in
        values of the numbers ``init`` puts in ``state.hparams``; each is a vectorized sweep
        axis.
      personalize: ``None``, or ``(state, client_ids) -> params`` stacked over ``client_ids``
        (int32 indices of training clients): each client's personalized model (Ditto's
        personal model, FedPer's shared body with the client's own head). The driver scores
        the test client with the same client id by it and reports the personalized metrics
        next to the global model's.
    """

    init: Callable[[Params], PyTree]
    apply: Callable[[PyTree, Cohort, PRNGKey], tuple[PyTree, Metrics]]
    lazy_examples: bool = False
    hparams: Mapping[str, float] = {}  # noqa: RUF012 (never mutated)
    personalize: Callable[[PyTree, Array], Params] | None = None

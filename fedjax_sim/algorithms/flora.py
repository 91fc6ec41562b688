"""FLoRA: federated LoRA that aggregates the clients' products exactly (Wang et al. 2024)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fedjax_sim.aggregators.pipeline import Pipeline
from fedjax_sim.algorithms.base import (
    AlgorithmSpec,
    BuildContext,
    Messages,
    client_weight,
    local_update,
    on_mesh,
    optimizer_and_pipeline_hparams,
    pipeline_for,
    setup,
)
from fedjax_sim.core import frozen
from fedjax_sim.core.client import match_vma
from fedjax_sim.core.execution import Executor
from fedjax_sim.core.keys import ADAPTERS_SALT
from fedjax_sim.core.task import as_task
from fedjax_sim.core.types import ClientOutput, FederatedAlgorithm, Model
from fedjax_sim.models import lora
from fedjax_sim.optimizers import optimizer_from_config

NAME = "flora"


def flora(
    model: Model,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation | None = None,
    *,
    weighting: str = "num_examples",
    executor: Executor | None = None,
    hparams: Mapping[str, float] | None = None,
    pipeline: Pipeline | None = None,
) -> FederatedAlgorithm:
    """FLoRA (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
    Heterogeneous Low-Rank Adaptations"): LoRA whose rounds aggregate the clients' products
    ``A_i B_i`` exactly, where FedAvg of the factors gives ``mean(A) mean(B)``.

    The state holds the model's adapters (fixed: their initial ``A``, ``B = 0``) and beside
    each a dense ``lora_delta``, the merged products of earlier rounds (``lora.with_deltas``):
    the global weights are ``W + (alpha / r) lora_delta``. Each round a client draws fresh
    adapters (FLoRA re-initializes its local modules after every merge), trains them over the
    global weights and sends its factors; its update is the product the server forms from
    them, ``-A_i B_i``, through the aggregation pipeline, so the mean is FLoRA's stacking
    (``lora.stacked``) computed densely. With server ``sgd(1.0)`` (the default; another
    server optimizer steps the deltas on the mean product instead, no longer FLoRA's merge)
    the new deltas are ``lora_delta + sum_i w_i A_i B_i / sum_i w_i``, exactly. Bytes: the
    factors up, the dense deltas down (they replace the stacked factors of missed rounds).
    Features acting on what a client sends (compression, secure aggregation, poisoned
    updates) would act on the factors and are refused; DP and robust aggregation act on the
    products. docs/lora.md has the measurements.

    Args:
      model: a LoRA ``Model`` (or ``Task``) whose parameters are ``lora_a``/``lora_b`` leaves.
      client_optimizer: the local optimizer, fresh every round.
      server_optimizer: steps the deltas on the mean product (default ``sgd(1.0)``: the merge).
      weighting: ``num_examples`` or ``uniform`` (the stacking's weights).
      executor: how clients run.
      hparams: which hyperparameters ``state.hparams`` keeps (default: the pipeline's and the
        optimizers' injected ones), with their values.
      pipeline: the aggregation pipeline the products go through (a config's build passes
        the framework's).

    Returns:
      A ``FederatedAlgorithm`` whose state is a ``ServerState``.

    Raises:
      ValueError: the model's parameters are not both LoRA factors.
    """
    task = as_task(model)
    check_adapters(task.model)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    executor, loss_fn, hparams, server = setup(
        task, executor, weighting, pipeline, hparams, {}, client_optimizer, server_optimizer
    )

    def init(params):
        return server.init(lora.with_deltas(params), hparams)

    def keep_adapters(state):  # DP noise on the (zero) adapter updates must not reach them
        def rule(new, extras, pseudo_grad):
            del extras, pseudo_grad
            return new._replace(params=lora.combine(lora.split(state.params)[0], new.params))

        return rule

    def apply(state, cohort, key):
        def client_fn(broadcast, data, client_state, ckey):
            global_adapters, deltas = lora.split(broadcast)
            fresh = task.model.init(jax.random.fold_in(ckey, ADAPTERS_SALT))
            fresh = match_vma(fresh, data["mask"])  # B's zeros vary per client like A
            local = local_update(
                fresh,
                data,
                ckey,
                loss_fn=lambda p, batch, m, k: loss_fn(lora.combine(p, deltas), batch, m, k),
                optimizer=client_optimizer,
                executor=executor,
            )
            # server - client, as FedAvg's: the adapters stay, the deltas grow by the product.
            product = jax.tree.map(jnp.negative, lora.products(local.params))
            unchanged = jax.tree.map(jnp.zeros_like, global_adapters)
            return ClientOutput(
                update=lora.combine(product, unchanged),
                weight=client_weight(data["num_examples"], weighting),
                metrics={"loss_sum": local.loss_sum, "num_seen": local.num_seen},
                client_state=client_state,
            )

        return server.round(
            state, cohort, key, client_fn, executor, server_rule=keep_adapters(state)
        )

    return FederatedAlgorithm(
        init=on_mesh(init, executor), apply=apply, lazy_examples=True, hparams=hparams
    )


def check_adapters(model: Model) -> None:
    """Refuses a model whose parameters are not LoRA factors, both trained (FLoRA's clients
    train both; over a frozen ``A`` FedAvg is already exact: FFA-LoRA), or whose output does
    not follow a ``lora_delta`` beside them (its projections would ignore the merged products:
    ``models.transformer.Projection`` adds them)."""
    names = {
        k[-1] for k in traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0)))
    }
    if names != set(lora.ADAPTER_LEAVES):
        raise ValueError(
            f"{NAME} trains LoRA adapters, both factors: the model's parameters must be lora_a "
            f"and lora_b leaves (fs.models.adapters_only), got {sorted(names)[:4]}. Set "
            "model.kwargs.lora_rank > 0 and lora_trainable='ab'."
        )
    params = jax.jit(model.init)(jax.random.key(0))  # the adapters only (no base drawn)
    zero = lora.with_deltas(params)
    # A random delta (a constant one is orthogonal to a layer-normalized input).
    shapes = jax.eval_shape(lora.products, params)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    random = [0.1 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]
    nudged = lora.combine(jax.tree.unflatten(treedef, random), params)
    out = frozen.jit(lambda p, x: model.apply(p, x, train=False), model.frozen)
    for dtype in (jnp.int32, jnp.float32):  # token ids, else features
        x = jnp.zeros((1, *model.input_shape), dtype)
        try:
            same = np.allclose(out(zero, x), out(nudged, x))
            break
        except (TypeError, ValueError, IndexError):
            if dtype == jnp.float32:
                raise
    if same:
        raise ValueError(
            f"{NAME}: model {model.name!r} ignores the merged products (a lora_delta beside "
            "each adapter): its LoRA projections must use W + scale * lora_delta, as "
            "fs.models.transformer's do."
        )


def check_config(config) -> None:
    """No fine-tuning at evaluation; the registry's transformer built with both factors
    trained (checked before its base is read or pre-trained; another model is checked when
    the algorithm is built)."""
    kwargs = config.model.get("kwargs") or {}
    finetune = int((config.get("eval") or {}).get("finetune_steps", 0) or 0)
    if finetune:
        raise ValueError(
            f"{NAME} does not fine-tune at evaluation (eval.finetune_steps={finetune} would "
            "train its dense merged deltas, not LoRA adapters): set eval.finetune_steps=0."
        )
    if str(config.model.name) != "transformer":
        return
    if not kwargs.get("lora_rank", 0) or kwargs.get("lora_trainable", "ab") != "ab":
        raise ValueError(
            f"{NAME} federates LoRA adapters, both factors trained: set "
            f"model.kwargs.lora_rank > 0 and model.kwargs.lora_trainable='ab' (got lora_rank="
            f"{kwargs.get('lora_rank', 0)}, lora_trainable={kwargs.get('lora_trainable', 'ab')!r})."
        )


def messages(config, task, params) -> Messages:
    """Down: the dense deltas (the base once, beside them); up: the client's factors."""
    del config, task
    return Messages(down=jax.eval_shape(lora.products, params), update=params)


def build(config, ctx: BuildContext) -> FederatedAlgorithm:
    """``flora`` from a config: ``client.*``/``server.*`` optimizers, ``weighting`` and the
    framework's pipeline."""
    return flora(
        ctx.task,
        optimizer_from_config(config.client),
        optimizer_from_config(config.server),
        weighting=config.weighting,
        executor=ctx.executor,
        hparams=optimizer_and_pipeline_hparams(config),
        pipeline=pipeline_for(config, ctx),
    )


SPEC = AlgorithmSpec(
    build=build,
    hparams=optimizer_and_pipeline_hparams,
    description="FLoRA: LoRA with the clients' products merged exactly each round",
    # What acts on the products the server forms; not on the factors a client sends.
    supports=frozenset({"dp", "adaptive_clipping", "robust_aggregation", "data_attack"}),
    messages=messages,
    check=check_config,
)

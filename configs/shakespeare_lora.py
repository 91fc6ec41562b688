"""Federated LoRA fine-tuning of a character-level transformer on held-out Shakespeare plays.

    fedjax-sim run --workdir /tmp/shakespeare_lora --config configs/shakespeare_lora.py
    fedjax-sim run --workdir /tmp/shakespeare_lora_smoke --config configs/shakespeare_lora.py:smoke

The base (4 blocks of width 128, 4 heads, context 64, learned positions; 0.8M parameters) is
pre-trained centrally for ``PRETRAIN_STEPS`` Adam steps on 26 of the 36 plays
(``fedjax_sim.pretrain``: trained on the first run, then cached). The federated clients are the
301 speaking roles of the 10 held-out plays (``plays="held_out"``), never seen in
pre-training; every character of a role's lines is a next-character target. Only the rank-8
LoRA adapters on the attention's q and v projections are federated: the base is downloaded
once per client (counted in ``bytes_down``), the adapters go up and down each round.
``--config.model.kwargs.lora_trainable=b`` trains B only over a frozen A (FFA-LoRA);
``--config.algorithm=flora`` merges the clients' products exactly each round (FLoRA);
``--config.model.kwargs.lora_rank=0`` fine-tunes the whole model instead.

The smoke variant (a 2-block base pre-trained for 100 steps, 3 rounds of 4 clients) runs in
well under a minute on a 2-core CPU. Results of the full config: docs/lora.md.
"""

import ml_collections
from fedjax_sim.configs import default

PRETRAIN_STEPS = 2000
HELD_OUT_PLAYS = 10


def get_config(variant=None):
    config = default.get_config(None)
    config.task = "next_token"
    config.dataset.name = "shakespeare_leaf"
    config.dataset.kwargs = ml_collections.ConfigDict(
        {
            "seq_len": 64,
            "plays": "held_out",
            "held_out_plays": HELD_OUT_PLAYS,
            "per_position": True,
        }
    )
    config.model.name = "transformer"
    config.model.kwargs = ml_collections.ConfigDict(
        {
            "num_layers": 4,
            "width": 128,
            "num_heads": 4,
            "lora_rank": 8,
            "lora_alpha": 16.0,
            "lora_targets": "q,v",
            "lora_trainable": "ab",
            "base": f"shakespeare:{PRETRAIN_STEPS}:{HELD_OUT_PLAYS}",
        }
    )
    config.num_rounds = 100
    config.clients_per_round = 10
    config.eval_every = 10
    config.eval_batch_size = 256
    config.client.optimizer = "adam"
    config.client.learning_rate = 3e-3
    config.client.batch_size = 8
    config.client.local_epochs = 1
    config.client.max_local_steps = 10
    config.checkpoint_every = 20
    if variant == "smoke":
        config.model.kwargs.num_layers = 2
        config.model.kwargs.width = 64
        config.model.kwargs.base = f"shakespeare:100:{HELD_OUT_PLAYS}"
        config.num_rounds = 3
        config.clients_per_round = 4
        config.eval_every = 3
        config.eval_max_clients = 20
        config.client.max_local_steps = 4
        config.checkpoint_every = 0
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; known: smoke.")
    return config

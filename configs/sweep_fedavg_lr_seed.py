"""A vectorized sweep: FedAvg on Synthetic(1,1), 3 client learning rates x 3 seeds.

    fedjax-sim sweep --config configs/sweep_fedavg_lr_seed.py --workdir /tmp/sweep
    fedjax-sim report /tmp/sweep --out /tmp/sweep_report

All 9 members train in one compiled program; each writes /tmp/sweep/<label>/metrics.jsonl.
``:smoke`` runs 20 rounds of 2 local epochs.
"""

import ml_collections
from fedjax_sim.configs import default


def get_config(variant=None):
    config = default.get_config(variant)
    config.sweep = ml_collections.ConfigDict()
    config.sweep.seed = [0, 1, 2]
    config.sweep.client = ml_collections.ConfigDict({"learning_rate": [0.003, 0.01, 0.03]})
    if variant == "smoke":
        config.num_rounds = 20
        config.eval_every = 2
    return config

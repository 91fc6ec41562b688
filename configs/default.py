"""FedAvg on the FedProx paper's Synthetic(1, 1) with the paper's settings.

Li et al. 2020 ("Federated Optimization in Heterogeneous Networks"): multinomial logistic
regression, 30 devices, client SGD at lr 0.01, batch 10, 20 local epochs, 10 clients per round,
200 rounds. Runs in well under a minute on a laptop CPU:

    fedjax-sim run --workdir /tmp/fedavg_synthetic

Expected: test accuracy rises from about 0.1 to 0.899 after 200 rounds (measured: 0.8986,
about 11 s on a 2-core CPU; README, "Quick start").
Variant ``smoke`` (``--config configs/default.py:smoke``) runs 10 rounds of 2 local epochs.
"""

import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Seeds the dataset (generation or partition); -1: use ``seed``. Sweeps over ``seed`` pin it
    # to the base seed, so every member trains on the same data.
    config.data_seed = -1
    config.num_rounds = 200
    config.clients_per_round = 10
    config.eval_every = 10
    # Client execution: auto | vmap | chunked | sequential.
    config.strategy = "auto"
    config.chunk_size = 10
    # Devices the cohort is split over (0: all local devices). On CPU the CLI first makes
    # ``cpu_devices`` virtual devices (0: one per core), so each core runs its own clients.
    config.num_devices = 0
    config.cpu_devices = 0

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "synthetic"
    # Dataset arguments: for ``synthetic``, alpha, beta, iid, num_clients, dim, num_classes.
    config.dataset.kwargs = ml_collections.ConfigDict(
        {"alpha": 1.0, "beta": 1.0, "iid": False, "num_clients": 30}
    )

    config.model = ml_collections.ConfigDict()
    # A registered name (fs.models.MODEL_NAMES, or one added with fs.models.register).
    config.model.name = "logreg"
    config.model.kwargs = ml_collections.ConfigDict()

    # A registered name (fedavg | fedopt | fedsgd, or one added with fs.algorithms.register).
    config.algorithm = "fedavg"
    # Numbers of an algorithm's own (its builder reads them; its AlgorithmSpec.hparams names
    # the sweepable ones, e.g. algorithm_kwargs.beta).
    config.algorithm_kwargs = ml_collections.ConfigDict()
    # What is learned: classification (one label per example) | next_token (y: [batch, T],
    # padding tokens masked out of loss and accuracy).
    config.task = "classification"
    config.weighting = "num_examples"  # num_examples | uniform
    # mean | median | trimmed_mean | krum | multi_krum | geometric_median | norm_bounding |
    # centered_clipping | secure | majority_vote (fedjax_sim/aggregators), with its arguments.
    config.aggregator = "mean"
    config.aggregator_kwargs = ml_collections.ConfigDict()
    # Malicious clients (fedjax_sim/aggregators/adversary.py): a fixed fraction of the
    # population runs the attack: none | label_flip | backdoor | sign_flip | scaling | gaussian |
    # alie | ipm. backdoor (image classification only) takes kwargs target_label (0),
    # pattern_size (3), value (1.0), poison_fraction (1.0) and boost (1.0: no scaling); every
    # evaluation then records backdoor_success (the attack success rate on triggered images).
    config.attack = ml_collections.ConfigDict(
        {"name": "none", "fraction": 0.0, "kwargs": ml_collections.ConfigDict()}
    )

    config.client = ml_collections.ConfigDict()
    config.client.optimizer = "sgd"
    config.client.learning_rate = 0.01
    config.client.kwargs = ml_collections.ConfigDict()
    config.client.batch_size = 10
    config.client.local_epochs = 20
    config.client.max_local_steps = 0  # 0: no cap
    # Pad each cohort to one of this many step counts (0 or 1: the largest client's), so
    # ragged datasets waste fewer padded steps; one compilation per bucket used.
    config.client.step_buckets = 0
    # FedProx (Li et al. 2020): each client adds mu/2 * ||w - w_server||^2 to its loss (0: off).
    config.client.proximal_mu = 0.0

    # The DP-FedAvg mechanism (McMahan et al. 2018): clip each client's update to L2 norm
    # clip_norm (0: off) and add Gaussian noise of std noise_multiplier * clip_norm / cohort
    # size to their mean (needs weighting = "uniform"; with Poisson sampling the mean divides
    # by the expected cohort size). With noise, every record carries the epsilon spent at
    # delta (dp_accounting's rdp | pld accountant, for the run's uniform or poisson sampling);
    # target_epsilon > 0 ends the run after the last round within it.
    config.dp = ml_collections.ConfigDict()
    config.dp.clip_norm = 0.0
    config.dp.noise_multiplier = 0.0
    config.dp.delta = 1e-5
    config.dp.accountant = "rdp"
    config.dp.target_epsilon = 0.0
    # Adaptive clipping (Andrew et al. 2021): clip_norm is then the initial clip norm, moved
    # each round towards the target_quantile of the update norms at clip_learning_rate, from a
    # count noised with std clipped_count_stddev (0: expected clients / 20, the paper's).
    config.dp.adaptive = False
    config.dp.target_quantile = 0.5
    config.dp.clip_learning_rate = 0.2
    config.dp.clipped_count_stddev = 0.0

    # Compression of each client's upload (fedjax_sim/aggregators/compression.py), after
    # clipping and before noise: none | qsgd (kwargs.levels) | uniform (kwargs.bits) | top_k |
    # random_k (kwargs.ratio) | sign. Records count bytes_up (compressed) and bytes_down.
    # error_feedback: each client keeps what compression dropped and adds it to its next
    # update (Stich et al. 2018; a [num_clients, params] residual table; no clipping).
    config.compression = ml_collections.ConfigDict(
        {"method": "none", "kwargs": ml_collections.ConfigDict(), "error_feedback": False}
    )

    config.server = ml_collections.ConfigDict()
    config.server.optimizer = "sgd"
    config.server.learning_rate = 1.0
    config.server.kwargs = ml_collections.ConfigDict()

    # Which clients train each round: uniform (clients_per_round without replacement) |
    # poisson (each client with probability rate; 0: clients_per_round / num_clients; the
    # sampling DP accounting assumes) | weighted (without replacement, in proportion to size).
    config.sampling = ml_collections.ConfigDict({"scheme": "uniform", "rate": 0.0})
    # Systems heterogeneity (fedjax_sim/driver/systems.py): stragglers (a fraction of each
    # cohort completes only part of its local steps; "partial" keeps that work as FedProx does,
    # "drop" drops them as FedAvg does in Li et al. 2020), availability (always | bernoulli:
    # each client online with its own probability | diurnal), mid-round dropouts, and the
    # simulated clock (compute speed in examples/s, links in bytes/s, 0 = unlimited) that
    # gives each evaluation its sim_time_s.
    config.systems = ml_collections.ConfigDict(
        {
            "straggler_fraction": 0.0,
            "straggler_mode": "partial",  # partial | drop
            "straggler_budget": "uniform",  # uniform: U{1..K} steps | fixed: straggler_work * K
            "straggler_work": 0.5,
            "availability": "always",  # always | bernoulli | diurnal
            "availability_prob": 1.0,
            "availability_spread": 0.0,  # bernoulli: +- per client; diurnal: the amplitude
            "diurnal_period": 24.0,  # rounds per day
            "dropout": 0.0,
            "compute_speed": 100.0,
            "speed_sigma": 0.0,  # log-normal spread of client speeds (0: all equal)
            "bandwidth_down": 0.0,
            "bandwidth_up": 0.0,
            "bandwidth_sigma": 0.0,
        }
    )
    # Personalized evaluation: each test client fine-tunes the global model (or the
    # algorithm's personalized model: Ditto, FedPer, FedRep) for this many local steps on its
    # training data before it is scored (0: no fine-tuning); logged as personal_* fields.
    config.eval = ml_collections.ConfigDict({"finetune_steps": 0})

    config.eval_batch_size = 1024
    # Evaluate on a fixed seeded sample of this many test clients (0: all of them).
    config.eval_max_clients = 0
    # Keep the training examples on the device and gather each cohort there (auto: <= 1 GiB).
    config.data_on_device = "auto"  # auto | device | host
    # Per-client state (SCAFFOLD's control variates, FedDyn's memory, error-feedback residuals):
    # one table row per client on the device, or on the host for the clients sampled so far
    # (auto: host for populations generated on demand or tables over 1 GiB).
    config.client_states = "auto"  # auto | device | host
    # Save a checkpoint (WORKDIR/checkpoints) every this many rounds, at the start and at the
    # end (0: never); `fedjax-sim run` on a workdir with one resumes exactly. Keep the newest
    # ``checkpoint_keep``.
    config.checkpoint_every = 50
    config.checkpoint_keep = 3
    # Stop (a sweep: freeze the member) when a round's training loss or the test loss exceeds
    # this many times the initial model's test loss, as for NaN/inf (0: only NaN/inf).
    config.divergence_factor = 1000.0

    if variant == "smoke":
        config.num_rounds = 10
        config.eval_every = 5
        config.client.local_epochs = 2
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r} of configs/default.py; known: smoke.")
    return config

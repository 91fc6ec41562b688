"""The algorithm x feature matrix, generated from the registry: every cell either builds the
feature into the round, where two rounds show its effect against the same rounds without it,
or is refused before any data loads with a message naming the algorithm and the feature."""

import functools
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import features, simulation, sweep
from fedjax_sim.aggregators import compression, secure
from fedjax_sim.driver.privacy import accountant_of
from tests.helpers import build_experiment, three_step_cohort, with_lora_model

# Config fields that switch each feature on (and nothing else).
SETTINGS = {
    "robust_aggregation": {"aggregator": "median"},
    "secure_aggregation": {
        "aggregator": "secure",
        "aggregator_kwargs": {"clip_range": 10.0, "bits": 24},
    },
    "dp": {"dp.clip_norm": 0.05, "dp.noise_multiplier": 1.0},
    "adaptive_clipping": {"dp.adaptive": True, "dp.clip_norm": 0.01},
    "compression": {"compression.method": "qsgd", "compression.kwargs": {"levels": 4}},
    "error_feedback": {
        "compression.method": "top_k",
        "compression.kwargs": {"ratio": 0.1},
        "compression.error_feedback": True,
    },
    "update_attack": {"attack.name": "sign_flip", "attack.fraction": 0.5},
    "data_attack": {"attack.name": "label_flip", "attack.fraction": 0.5},
    "proximal_term": {"client.proximal_mu": 1.0},
}
# The robust reducers the cells take in turn (one per algorithm, in registry order), so each
# is in some algorithm's round without a compilation per algorithm and reducer.
ROBUST = [
    {"aggregator": "median"},
    {"aggregator": "krum", "aggregator_kwargs": {"num_byzantine": 1}},
    {"aggregator": "trimmed_mean", "aggregator_kwargs": {"trim_fraction": 0.25}},
]
CLIENTS = 8
CELLS = [(a, f) for a in sorted(fs.algorithms.ALGORITHMS) for f in features.FEATURES]


def _settings(algorithm, feature):
    if feature == "robust_aggregation":
        return ROBUST[sorted(fs.algorithms.ALGORITHMS).index(algorithm) % len(ROBUST)]
    return SETTINGS[feature]


def _config(algorithm, feature=None):
    config = fs.load_config("default:smoke")
    fs.algorithms.switch_algorithm(config, algorithm)
    if algorithm == "flora":  # it federates LoRA adapters; products above the cells' clip norms
        with_lora_model(config)
        config.client.learning_rate = 1.0
    config.dataset.kwargs.num_clients = CLIENTS
    config.clients_per_round = CLIENTS  # every client (so every attacker) in the round
    config.weighting = "uniform"  # what DP needs; the same for the run without the feature
    config.client.local_epochs, config.client.max_local_steps = 1, 3
    for path, value in _settings(algorithm, feature).items() if feature else ():
        if isinstance(value, dict):
            for k, v in value.items():
                sweep._set(config, f"{path}.{k}", v)
        else:
            sweep._set(config, path, value)
    return config


def test_every_feature_has_settings_that_switch_on_it_alone():
    assert set(SETTINGS) == set(features.FEATURES)
    for name in features.FEATURES:
        assert list(features.features_of(_config("fedavg", name))) == [name]
    for settings in ROBUST:
        config = _config("fedavg")
        config.aggregator = settings["aggregator"]
        assert list(features.features_of(config)) == ["robust_aggregation"]
    algos = {p.values[0] for p in _representatives()}
    reducers = {_settings(a, "robust_aggregation")["aggregator"] for a in algos}
    assert reducers == {r["aggregator"] for r in ROBUST}  # each reducer is in some cell
    assert features.features_of(_config("fedavg")) == {}


def test_the_readme_support_table_is_the_specs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start, end = "<!-- support-table -->\n", "\n<!-- /support-table -->"
    table = readme[readme.index(start) + len(start) : readme.index(end)]
    built_in = {name: fs.algorithms.get_spec(name) for name in fs.algorithms.BUILT_IN}
    assert table == features.support_table(built_in), (
        "README's support table is stale: paste fs.features.support_table() of the built-in specs"
    )


def _unsupported():
    return [(a, f) for a, f in CELLS if f not in fs.algorithms.get_spec(a).supports]


@pytest.mark.parametrize("algorithm, feature", _unsupported())
def test_an_unsupported_cell_is_refused_before_any_data_loads(algorithm, feature):
    config = _config(algorithm, feature)
    config.dataset.name = "no_such_dataset"  # loading anything would fail differently
    with pytest.raises(features.UnsupportedError) as err:
        fs.build_experiment(config)
    message = str(err.value)
    assert f"algorithm {algorithm!r} does not support {feature} (" in message
    assert "\n" not in message
    for other in features.supporting(feature, fs.algorithms.ALGORITHMS):
        assert other in message


def test_an_unsupported_cell_in_a_sweep_is_refused_before_the_workdir_exists(tmp_path):
    algorithm, feature = _unsupported()[0]
    with pytest.raises(features.UnsupportedError, match=f"{algorithm!r} does not support"):
        fs.run_sweep(_config(algorithm, feature), {"seed": [0, 1]}, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def _representatives():
    """One algorithm per distinct build, with every feature it takes. The Reddi names
    (``algorithms/adaptive.py``) are fedavg's build with another server optimizer, so fedavg's
    cells cover their round (as in ``test_contract``)."""
    seen, out = set(), []
    for a in sorted(fs.algorithms.ALGORITHMS):
        spec = fs.algorithms.get_spec(a)
        build = getattr(spec.build, "func", spec.build)
        if (build, spec.supports) in seen or build.__module__ == "fedjax_sim.algorithms.adaptive":
            continue
        seen.add((build, spec.supports))
        # One worker runs an algorithm's cells, so its run without a feature is computed once.
        group = pytest.mark.xdist_group(f"combinations-{a}")
        out += [pytest.param(a, f, marks=group) for f in features.FEATURES if f in spec.supports]
    return out


@functools.cache
def _two_rounds(algorithm, feature):
    """``(experiment, state after two rounds on every client, the second round's metrics)``
    (one compilation: the rounds differ only in their batches and keys)."""
    exp = build_experiment(_config(algorithm, feature))
    state = exp.algorithm.init(exp.model.init(jax.random.key(0)))
    apply = jax.jit(exp.algorithm.apply)
    for r in (1, 2):
        cohort = three_step_cohort(exp, np.arange(CLIENTS), r)
        state, metrics = apply(state, cohort, jax.random.key(r))
        assert math.isfinite(float(metrics["train_loss"]))
    return exp, state, metrics


def _differs(a, b):
    return any(
        np.asarray(x).tobytes() != np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("algorithm, feature", _representatives())
def test_a_supported_cell_builds_the_feature_into_the_round(algorithm, feature):
    base_exp, base, base_metrics = _two_rounds(algorithm, None)
    exp, state, metrics = _two_rounds(algorithm, feature)
    # The feature changed what the round computed.
    assert _differs(state.params, base.params)
    # What the run reports follows what was built: upload bytes (of the update the pipeline
    # sees, plus what the algorithm sends beside it) and epsilon.
    shapes = jax.eval_shape(exp.model.init, jax.random.key(0))
    messages = fs.algorithms.get_spec(algorithm).messages(exp.config, exp.task, shapes)
    update_bytes, extras_bytes = (
        simulation.tree_bytes(messages.update),
        simulation.tree_bytes(messages.extras),
    )
    num_params = sum(int(np.size(a)) for a in jax.tree.leaves(messages.update))
    assert base_exp.upload_bytes == update_bytes + extras_bytes
    assert base_exp.model_bytes == exp.model_bytes == simulation.tree_bytes(messages.down)
    if feature in ("compression", "error_feedback"):
        method, kwargs = SETTINGS[feature]["compression.method"], SETTINGS[feature]
        bits = compression.bits_per_update(method, num_params, **kwargs["compression.kwargs"])
        assert exp.upload_bytes == -(-bits // 8) + extras_bytes < base_exp.upload_bytes
    elif feature == "secure_aggregation":
        expected = secure.secagg_bytes(num_params, CLIENTS, 32, None)["up"]
        assert exp.upload_bytes == int(expected) + extras_bytes
        # Quantized to 24 bits within [-10, 10]: the mean up to the quantization step (an
        # adaptive server optimizer magnifies it: FedAdagrad's first step is about lr sign(g)).
        for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(base.params)):
            np.testing.assert_allclose(x, y, atol=1e-3)
    else:
        assert exp.upload_bytes == base_exp.upload_bytes
    population = exp.data.train.num_clients
    assert accountant_of(base_exp.config, population) is None
    assert (accountant_of(exp.config, population) is not None) == (feature == "dp")
    # A component's own round metrics are there exactly when it was built.
    assert "dp_clip_norm" not in base_metrics
    if feature == "adaptive_clipping":  # all 8 updates are above 0.01: the norm grows
        assert float(metrics["dp_clip_norm"]) > SETTINGS[feature]["dp.clip_norm"]
    if feature == "error_feedback":  # every client keeps what compression dropped
        residual = jax.tree.leaves(state.aggregator_state[2])  # the pipeline's residuals
        assert all(float(np.abs(r).sum()) > 0 for r in residual)


def test_round_metrics_of_the_algorithm_and_the_pipeline_reach_metrics_jsonl(tmp_path):
    config = _config("ditto", "adaptive_clipping")
    config.num_rounds, config.eval_every, config.checkpoint_every = 2, 1, 0
    fs.simulate(config, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["num_clients"] == CLIENTS
        assert math.isfinite(r["personal_train_loss"]) and r["personal_train_loss"] > 0
        assert r["dp_clip_norm"] > 0
    assert records[0]["dp_clip_norm"] != records[1]["dp_clip_norm"]


def test_the_dp_cell_adds_noise_of_the_formula_and_logs_dp_accountings_epsilon():
    """What the DP cells build, checked against the formulas: the pipeline every DP-taking
    algorithm gets adds N(0, (z S / n)^2) to the mean, and the run's accountant gives the
    Gaussian mechanism's epsilon (every client every round: replace-one sensitivity 2 S against
    noise z S, so multiplier z / 2), composed by hand and converted with dp_accounting."""
    import dp_accounting as dpa

    config = _config("fedavg", "dp")
    z, clip = SETTINGS["dp"]["dp.noise_multiplier"], SETTINGS["dp"]["dp.clip_norm"]
    exp = fs.build_experiment(config)
    pipeline = features.pipeline_of(config, exp.task, CLIENTS)
    zeros = {"w": np.zeros((200, 100), np.float32)}
    ctx = fs.aggregators.transforms.ServerContext(
        key=jax.random.key(3),
        hparams={k: np.float32(v) for k, v in pipeline.hparams.items()},
        client_ids=np.arange(CLIENTS),
        weights=np.ones(CLIENTS, np.float32),
        num_clients=np.float32(CLIENTS),
    )
    noised, _ = pipeline.transforms.server(zeros, pipeline.transforms.init(zeros), ctx)
    std = float(np.std(np.asarray(noised["w"])))
    assert std == pytest.approx(z * clip / CLIENTS, rel=0.03)  # 20,000 draws: 0.5% std error
    rounds, delta = 3, float(config.dp.delta)
    orders = dpa.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    by_hand = [rounds * 2 * a / z**2 for a in orders]
    expected = dpa.rdp.compute_epsilon(orders, by_hand, delta)[0]
    got = accountant_of(exp.config, exp.data.train.num_clients).epsilon(rounds)
    assert got == pytest.approx(expected, rel=1e-9)


def test_a_build_from_a_hand_made_context_makes_the_same_check():
    # A BuildContext without the framework's pipeline (user code calling a spec's build): the
    # build reads the config's pipeline itself and refuses what the algorithm does not take,
    # instead of dropping it.
    config = _config("scaffold", "dp")
    exp = fs.build_experiment(_config("scaffold"))
    ctx = fs.BuildContext(exp.task, exp.executor, CLIENTS)
    with pytest.raises(features.UnsupportedError, match="'scaffold' does not support dp"):
        fs.algorithms.get_spec("scaffold").build(config, ctx)
    # What it does take is built in: the same round as the framework's build.
    config = _config("scaffold", "robust_aggregation")
    own = fs.algorithms.get_spec("scaffold").build(config, ctx)
    framework = fs.build_experiment(config).algorithm
    assert own.hparams == framework.hparams

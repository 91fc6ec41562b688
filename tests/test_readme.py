"""The README's API examples run as written."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from tests.conftest import REPO_ROOT


def test_readme_api_example_runs():
    with open(f"{REPO_ROOT}/README.md") as f:
        text = f.read()
    code = re.search(r"## Using the API\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert int(scope["state"].round) == 50
    # The mean training loss over every client's examples, before and after the 50 rounds:
    # measured 2.819 -> 0.275; a run that barely learns (or a no-op round) stays near 2.8.
    model, train = scope["model"], scope["data"].train.all_examples()

    def loss(params):
        return float(jnp.mean(model.loss(model.apply(params, train["x"], train=False), train["y"])))

    before, after = loss(model.init(jax.random.key(0))), loss(scope["state"].params)
    assert before > 2.0 and after < 0.2 * before, (before, after)


def _run_section(heading, tmp_path, monkeypatch) -> dict:
    """Runs the first code block under the README's ``## heading`` in ``tmp_path`` (its
    workdirs are relative); returns its variables."""
    with open(f"{REPO_ROOT}/README.md") as f:
        text = f.read()
    code = re.search(rf"## {heading}\n[^#]*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_readme_bring_your_own_model_runs(tmp_path, monkeypatch):
    # The example registers "two_layer" process-wide; the registry is restored afterwards.
    monkeypatch.setattr(fs.models, "_REGISTRY", dict(fs.models._REGISTRY))
    scope = _run_section("Bring your own model", tmp_path, monkeypatch)
    summary, config = scope["summary"], scope["config"]
    assert (tmp_path / "runs" / "two_layer" / "metrics.jsonl").exists()
    # The user's module ran with the config's kwargs: 60 inputs -> 64 hidden -> 10 classes.
    params = summary["params"]
    assert params["Dense_0"]["kernel"].shape == (60, 64)
    assert params["Dense_1"]["kernel"].shape == (64, 10)
    # Evaluated here, independently of the driver, with the user's builder: the summary's test
    # loss is that model's loss on the trained params, and training lowered it (measured
    # 2.42 at init -> 1.18). Accuracy beats always guessing the most common class (measured
    # 0.536 against 0.478).
    fd = fs.data.get_federated_data(
        config.dataset.name, seed=config.seed, **config.dataset.kwargs.to_dict()
    )
    test = fd.test.all_examples()
    model = scope["two_layer"](num_classes=fd.num_classes, input_shape=(60,), hidden=64)

    def loss(p):
        return float(jnp.mean(model.loss(model.apply(p, test["x"], train=False), test["y"])))

    after = loss(params)
    np.testing.assert_allclose(after, summary["final_test_loss"], rtol=1e-5)
    assert after < 0.7 * loss(model.init(jax.random.key(config.seed))), after
    majority = np.bincount(np.asarray(test["y"])).max() / len(test["y"])
    assert summary["final_test_accuracy"] > majority + 0.03, (summary, majority)


def test_readme_add_your_own_algorithm_runs(tmp_path, monkeypatch):
    # The example registers "scaled_fedavg" process-wide; the registry is restored afterwards.
    monkeypatch.setattr(fs.algorithms, "ALGORITHMS", dict(fs.algorithms.ALGORITHMS))
    scope = _run_section("Add your own algorithm", tmp_path, monkeypatch)
    summary, config = scope["summary"], scope["config"]
    records = (tmp_path / "runs" / "scaled_fedavg" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2  # rounds 5 and 10
    # It learned: accuracy above always guessing the most common class (measured 0.577
    # against 0.478).
    fd = fs.data.get_federated_data(
        config.dataset.name, seed=config.seed, **config.dataset.kwargs.to_dict()
    )
    test = fd.test.all_examples()
    majority = np.bincount(np.asarray(test["y"])).max() / len(test["y"])
    assert summary["final_test_accuracy"] > majority + 0.03, (summary, majority)
    # The pipeline it got was the config's: uploads compressed by QSGD (the summary counts its
    # bytes, and one round on the same cohort differs from the uncompressed one), and a
    # feature it does not declare is refused.
    assert summary["bytes_up"] < summary["bytes_down"]
    exp = fs.build_experiment(config)
    cohort = fs.pack_cohort(
        exp.data.train,
        list(range(10)),
        batch_size=10,
        num_steps=3,
        max_local_steps=3,
        seed=0,
        round_num=1,
        num_clients=exp.cohort_slots,
    )
    state = exp.algorithm.init(exp.model.init(jax.random.key(0)))
    assert float(state.hparams["algorithm_kwargs.update_scale"]) == 1.5
    compressed, _ = exp.algorithm.apply(state, cohort, jax.random.key(1))
    config.compression.method = "none"
    plain, _ = fs.build_experiment(config).algorithm.apply(state, cohort, jax.random.key(1))
    kernel = lambda s: np.asarray(s.params["Dense_0"]["kernel"])  # noqa: E731
    assert not np.allclose(kernel(compressed), kernel(plain))
    # Error feedback is the pipeline's (its residuals are the pipeline's per-client state):
    # the algorithm takes it without a line of its own; what it does not declare is refused.
    config.compression.method, config.compression.error_feedback = "top_k", True
    with pytest.raises(ValueError, match="set compression.kwargs.ratio"):
        fs.build_experiment(config)
    levels = config.compression.kwargs.levels
    config.compression.kwargs = {"ratio": 0.1}
    exp = fs.build_experiment(config)
    state, _ = exp.algorithm.apply(exp.algorithm.init(state.params), cohort, jax.random.key(1))
    assert all(float(np.abs(r[:10]).sum()) > 0 for r in jax.tree.leaves(state.aggregator_state[2]))
    config.client.proximal_mu = 0.1
    with pytest.raises(fs.features.UnsupportedError, match="'scaled_fedavg' does not support"):
        fs.build_experiment(config)
    config.client.proximal_mu = 0.0
    config.compression.kwargs = {"levels": levels}
    # At update_scale 1 it is FedAvg: the same run as the built-in fedavg with the same
    # pipeline (test accuracy 0.5307 both; the losses agree to 4e-9 relative: the multiply by
    # 1.0 and the injected learning rate round differently).
    config.compression.error_feedback = False
    config.compression.method, config.algorithm_kwargs.update_scale = "qsgd", 1.0
    ours = fs.simulate(config, tmp_path / "ours", progress=False)
    config.algorithm = "fedavg"
    del config.algorithm_kwargs["update_scale"]
    builtin = fs.simulate(config, tmp_path / "builtin", progress=False)
    assert ours["final_test_accuracy"] == builtin["final_test_accuracy"]
    assert ours["bytes_up"] == builtin["bytes_up"]
    for key in ("final_test_loss", "final_train_loss"):
        np.testing.assert_allclose(ours[key], builtin[key], rtol=1e-6, err_msg=key)

"""Personalized evaluation: each test client's model fine-tuned for ``eval.finetune_steps`` on
its own training data (checked by hand), or taken from the algorithm's ``personalize``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim.data import pack_cohort
from fedjax_sim.driver.evaluation import Evaluator, Personalization
from fedjax_sim.driver.programs import SoloProgram
from tests.helpers import linear_model, mean_loss, ragged_dataset, train_clients_by_hand


def test_finetuned_accuracy_matches_sgd_by_hand(tmp_path):
    config = fs.load_config("default:smoke")
    config.num_rounds = config.eval_every = 2
    config.client.local_epochs = 1
    config.eval.finetune_steps = 3
    out = fs.simulate(config, tmp_path, progress=False)
    rec = out["history"][-1]
    exp = fs.build_experiment(config)
    train, test, model = exp.data.train, exp.data.test, exp.model
    grad = jax.grad(lambda p, x, y: mean_loss(model, p, x, y))
    hits = counts = 0
    per_client = []
    for i in range(test.num_clients):
        assert test.client_ids[i] == train.client_ids[i]  # the same client's two splits
        tune = pack_cohort(
            train, [i], batch_size=config.client.batch_size, local_epochs=3, max_local_steps=3,
            num_steps=3, seed=config.seed, round_num=0,  # the data seed (= seed here)
        )  # fmt: skip
        (p,) = train_clients_by_hand(out["params"], tune, grad, config.client.learning_rate)
        c = test.client(i)
        pred = np.argmax(np.asarray(model.apply(p, c["x"], train=False)), -1)
        hits += int((pred == c["y"]).sum())
        counts += len(c["y"])
        per_client.append((pred == c["y"]).mean())
    np.testing.assert_allclose(rec["personal_test_accuracy"], hits / counts, rtol=1e-6)
    np.testing.assert_allclose(rec["personal_client_accuracy_p50"], np.median(per_client), 1e-6)
    # Three local steps on its own data help a client of this non-IID dataset.
    assert rec["personal_test_accuracy"] > rec["test_accuracy"]
    assert (
        "personal_test_accuracy"
        not in fs.simulate(_no_finetune(config), tmp_path / "plain", progress=False)["history"][-1]
    )


def _no_finetune(config):
    config = config.copy_and_resolve_references()
    config.eval.finetune_steps = 0
    return config


def test_personalize_hook_scores_each_test_client_by_its_own_model():
    model = linear_model()
    ds = ragged_dataset([6, 9, 4], seed=2)
    algo = fs.fedavg(model, optax.sgd(0.1))
    # Client 1 gets a model that always says class 2; the others the global model (zeros).
    big = jnp.zeros((3,)).at[2].set(10.0)

    def personalize(state, ids):
        base = jax.tree.map(lambda p: jnp.broadcast_to(p, (len(ids), *p.shape)), state.params)
        bias = jnp.where((ids == 1)[:, None], big, 0.0)
        return {**base, "b": base["b"] + bias}

    algo = algo._replace(personalize=personalize)
    zero = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0)))
    state = algo.init(zero)
    program = SoloProgram(algo, model, 0, None, None)
    p = Personalization(0, optax.sgd(0.1), 2, 0, personalize, "sequential")
    ev = Evaluator(
        fs.core.task.as_task(model), {0: ds}, [0], batch_size=4, vectorized=False,
        train_sets={0: ds}, personalization=p,
    )  # fmt: skip
    (got,) = ev.personal(program, state)
    # Zero logits predict class 0 (argmax of ties); client 1's model predicts class 2.
    ys = [ds.client(i)["y"] for i in range(3)]
    acc = [np.mean(ys[0] == 0), np.mean(ys[1] == 2), np.mean(ys[2] == 0)]
    total = (np.sum(ys[0] == 0) + np.sum(ys[1] == 2) + np.sum(ys[2] == 0)) / sum(map(len, ys))
    np.testing.assert_allclose(got["personal_test_accuracy"], total, rtol=1e-6)
    np.testing.assert_allclose(got["personal_client_accuracy_mean"], np.mean(acc), rtol=1e-6)

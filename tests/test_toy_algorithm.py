"""A toy algorithm in one file plus one registry line (tests/toy_algorithm.py): its arithmetic
by hand, from the CLI, swept over its own hyperparameter in one program, resumed bitwise."""

import json

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint, sweep
from fedjax_sim.cli import main as cli_main
from fedjax_sim.data import pack_cohort
from tests import toy_algorithm
from tests.helpers import linear_model, ragged_dataset

fs.algorithms.register("fedavg_memory", toy_algorithm.SPEC)  # the one registry line

MODEL = linear_model()
PARAMS = MODEL.init(jax.random.key(0))
CONFIG_FILE = """
import fedjax_sim as fs
from fedjax_sim.config import load_config
from tests import toy_algorithm

fs.algorithms.register("fedavg_memory", toy_algorithm.SPEC)


def get_config(variant=None):
    config = load_config("default:smoke")
    config.algorithm = "fedavg_memory"
    config.algorithm_kwargs.beta = 0.5
    config.num_rounds, config.eval_every, config.checkpoint_every = 6, 2, 2
    config.cpu_devices = 2
    if variant == "sweep":
        config.sweep = {"algorithm_kwargs": {"beta": [0.0, 0.3, 0.6]}}
    return config
"""


def _as_np(tree):
    return jax.tree.map(np.asarray, tree)


def test_update_memory_arithmetic_by_hand():
    """Two rounds, client 1 in both: its second upload mixes its first one in."""
    ds = ragged_dataset([5, 9, 7, 4])
    beta, lr = 0.4, 0.1
    algo = toy_algorithm.fedavg_memory(MODEL, optax.sgd(lr), num_clients=4, beta=beta)
    plain = fs.fedavg(MODEL, optax.sgd(lr))
    steps = fs.data.max_local_steps_of(ds, batch_size=3, local_epochs=1)

    def cohort(ids, r):
        return pack_cohort(ds, ids, batch_size=3, num_steps=steps, seed=0, round_num=r)

    def delta(params, i, r):
        """Client i's local update alone (a one-client FedAvg round: the server takes its
        model; its key is fold_in(round_key, i) in any cohort)."""
        out, _ = plain.apply(plain.init(params), cohort([i], r), jax.random.key(r))
        return {k: np.asarray(params[k] - out.params[k]) for k in params}

    n = {i: float(s) for i, s in enumerate([5, 9, 7, 4])}
    state = algo.init(PARAMS)
    p = _as_np(PARAMS)
    memory = {i: {k: np.zeros_like(v) for k, v in p.items()} for i in range(4)}
    for r, ids in [(1, [0, 1]), (2, [1, 2])]:
        state, _ = jax.jit(algo.apply)(state, cohort(ids, r), jax.random.key(r))
        sent = {}
        for i in ids:
            d = delta(p, i, r)
            sent[i] = {k: beta * memory[i][k] + (1 - beta) * d[k] for k in p}  # u = b m + (1-b) d
            memory[i] = sent[i]
        total = sum(n[i] for i in ids)
        p = {k: p[k] - sum(n[i] * sent[i][k] for i in ids) / total for k in p}
        for k in p:
            np.testing.assert_allclose(state.params[k], p[k], rtol=1e-5, atol=1e-6)
            for i in range(4):
                np.testing.assert_allclose(
                    state.client_states[k][i], memory[i][k], rtol=1e-5, atol=1e-6
                )
    # Client 3 never trained: its memory is still zero; client 1's holds its second upload.
    assert not np.any(np.asarray(state.client_states["w"][3]))
    assert np.abs(np.asarray(state.client_states["w"][1])).max() > 0
    assert float(state.hparams[toy_algorithm.BETA]) == pytest.approx(beta)


def test_beta_zero_is_fedavg():
    ds = ragged_dataset([5, 9, 7])
    c = pack_cohort(ds, [0, 1, 2], batch_size=3, seed=0, round_num=1)
    algo = toy_algorithm.fedavg_memory(MODEL, optax.sgd(0.1), num_clients=3, beta=0.0)
    plain = fs.fedavg(MODEL, optax.sgd(0.1))
    a, _ = algo.apply(algo.init(PARAMS), c, jax.random.key(1))
    b, _ = plain.apply(plain.init(PARAMS), c, jax.random.key(1))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        toy_algorithm.fedavg_memory(MODEL, optax.sgd(0.1), num_clients=3, beta=1.0)


def test_spec_names_the_hparams_its_algorithm_keeps():
    config = fs.load_config("default:smoke")
    config.algorithm = "fedavg_memory"
    exp = fs.build_experiment(config)
    assert set(exp.algorithm.hparams) == set(toy_algorithm.SPEC.hparams(config))
    assert toy_algorithm.BETA in exp.algorithm.hparams


def _metrics(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(x).items() if k not in ("wall_s", "train_s")} for x in lines
    ]


def _assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_runs_from_the_cli_sweeps_its_own_hparam_and_resumes_bitwise(tmp_path, capsys):
    config_file = tmp_path / "toy_config.py"
    config_file.write_text(CONFIG_FILE)
    # A plain run through the CLI, killed (here: stopped after round 4) and resumed.
    short = tmp_path / "short"
    args = ["run", "--config", str(config_file), "--no-progress"]
    assert cli_main([*args, "--workdir", str(short), "--config.num_rounds=4"]) == 0
    assert cli_main([*args, "--workdir", str(short)]) == 0
    assert "resuming" in capsys.readouterr().err
    full = tmp_path / "full"
    assert cli_main([*args, "--workdir", str(full)]) == 0
    assert _metrics(short) == _metrics(full)
    resumed, straight = checkpoint.load_state(short), checkpoint.load_state(full)
    _assert_bitwise(resumed, straight)  # params, optimizer, hparams and the client memory
    memory = jax.tree.leaves(resumed["states"]["client_states"])
    assert memory and all(np.asarray(leaf).shape[0] == 30 for leaf in memory)  # 30 clients
    assert max(np.abs(np.asarray(leaf)).max() for leaf in memory) > 0

    # The sweep over beta: one compiled program; each member equals its solo run.
    out_dir = tmp_path / "sweep"
    assert cli_main(["sweep", "--config", f"{config_file}:sweep", "--workdir", str(out_dir)]) == 0
    index = json.loads((out_dir / "sweep.json").read_text())
    assert index["groups"] == 1 and len(index["members"]) == 3
    assert all(m["compiles"] == 1 and m["sweep_members"] == 3 for m in index["members"])
    base = fs.load_config(f"{config_file}:sweep")
    axes = sweep.axes_from_config(base.sweep)
    with base.unlocked():
        del base["sweep"]
    finals = {}
    for m in index["members"]:
        label = m["label"]
        (values,) = [v for lab, v, _ in sweep.member_configs(base, axes) if lab == label]
        config = sweep.member_configs(base, {k: [v] for k, v in values.items()})[0][2]
        solo = fs.simulate(config, tmp_path / f"solo_{label}", progress=False)
        member_metrics = _metrics(out_dir / label)
        assert [r["round"] for r in member_metrics] == [2, 4, 6]
        for x, y in zip(member_metrics, _metrics(tmp_path / f"solo_{label}"), strict=True):
            for k in x:
                np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6, err_msg=k)
        finals[label] = solo["final_test_accuracy"]
    # Beta changes the result: the members are not copies of one another.
    assert len({round(v, 6) for v in finals.values()}) == 3

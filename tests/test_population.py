"""Populations generated on demand and per-client state kept on the host for the clients
sampled so far: both are checked against their materialized (whole-table) counterparts."""

import time
import tracemalloc

import jax
import numpy as np
import pytest
from fedjax_sim.configs import default

import fedjax_sim as fs
from fedjax_sim.data import pack_cohort
from fedjax_sim.data.population import SyntheticPopulation
from fedjax_sim.driver.cohorts import sample_clients
from fedjax_sim.driver.systems import Population, Systems
from fedjax_sim.simulation import build_experiment


def test_a_client_is_a_pure_function_of_seed_split_and_id():
    a = SyntheticPopulation(10**6, seed=3)
    b = SyntheticPopulation(10**6, seed=3)
    for i in (0, 17, 999_999):
        ca, cb = a.client(i), b.client(i)
        assert all(np.array_equal(ca[k], cb[k]) for k in ("x", "y"))
        assert len(ca["y"]) == a.sizes_of([i])[0] == b.sizes[i]
        assert ca["x"].dtype == np.float32 and ca["y"].dtype == np.int32
    test = SyntheticPopulation(10**6, seed=3, split="test")
    other = SyntheticPopulation(10**6, seed=4)
    assert not np.array_equal(a.client(5)["x"][:5], test.client(5)["x"][:5])
    assert not np.array_equal(a.client(5)["x"][:5], other.client(5)["x"][:5])
    assert a.sizes.min() >= 10 and a.sizes.max() <= 50 and a.sizes.dtype == np.int32
    assert a.client_ids[7] == "c0000007" and len(a.client_ids) == 10**6
    # The labels follow the shared labelling model: not one class everywhere.
    labels = np.concatenate([a.client(i)["y"] for i in range(40)])
    assert len(np.unique(labels)) >= 5


def test_packing_a_generated_population_equals_packing_it_materialized():
    lazy = SyntheticPopulation(40, seed=1, min_examples=3, max_examples=25)
    held = fs.data.FederatedDataset({cid: arrays for cid, arrays in lazy}, name="held")
    kw = dict(batch_size=4, local_epochs=2, num_clients=8, seed=5, round_num=3)
    ids = [3, 39, 0, 17, 22]
    got, want = pack_cohort(lazy, ids, **kw), pack_cohort(held, ids, **kw)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)
    got = fs.data.packing.pack_cohort_indices(held, ids, **kw)
    gathered = fs.data.packing.gather_cohort(held.all_examples(), got)
    for g, w in zip(jax.tree.leaves(gathered), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def test_sampling_a_billion_ids_materializes_none_of_them():
    pop = Population(Systems(), np.zeros(0, np.int32), 0, 1000, 0)
    pop.num_clients = 10**9  # only the count is read by uniform sampling
    tracemalloc.start()
    ids = pop.sample(7)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(np.unique(ids)) == 1000 and ids.max() < 10**9
    assert peak < 2**20, peak  # 1,000 ids, not a 10**9 mask
    np.testing.assert_array_equal(ids, sample_clients(0, 7, 10**9, 1000))


def test_bad_population_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="1..1_000_000_000 clients"):
        SyntheticPopulation(0, seed=0)
    with pytest.raises(ValueError, match="min_examples <= max_examples"):
        SyntheticPopulation(10, seed=0, min_examples=5, max_examples=2)
    with pytest.raises(ValueError, match="takes no argument.*alpha"):
        fs.data.get_federated_data("population", seed=0, alpha=1.0)
    with pytest.raises(ValueError, match="never .*held in memory whole"):
        SyntheticPopulation(10, seed=0).all_examples()
    with pytest.raises(ValueError, match="set data_on_device to 'host' or 'auto'"):
        fs.simulate(_config(data_on_device="device"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _config(**overrides):
    config = default.get_config()
    config.dataset.name = "population"
    config.dataset.kwargs = {"num_clients": 200, "test_clients": 5, "dim": 6, "num_classes": 3}
    config.num_rounds, config.eval_every, config.clients_per_round = 6, 3, 8
    config.client.local_epochs, config.client.batch_size = 1, 5
    config.client.learning_rate = 0.1
    config.checkpoint_every = 0
    config.update(overrides)
    return config


def _dense_vs_host(tmp_path, **overrides):
    """Final params and metrics of the same run with the tables on the device and on the host
    (a small population: every client is sampled several times in 6 rounds of 8 of 20)."""
    out = {}
    for where in ("device", "host"):
        config = _config(client_states=where, **overrides)
        config.dataset.kwargs.num_clients = 20
        summary = fs.simulate(config, tmp_path / where, progress=False)
        assert summary["client_states"] == where
        out[where] = summary
    return out["device"], out["host"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"algorithm": "scaffold", "strategy": "sequential"},  # the in-place table loop
        {"algorithm": "scaffold", "strategy": "vmap", "num_devices": 2},
        {"algorithm": "feddyn", "strategy": "chunked", "chunk_size": 3},
        {"compression": {"method": "top_k", "kwargs": {"ratio": 0.3}, "error_feedback": True}},
        {"algorithm": "scaffold", "sampling": {"scheme": "poisson", "rate": 0.3}},
    ],
    ids=["scaffold-seq", "scaffold-vmap-2dev", "feddyn-chunked", "topk-error-feedback", "poisson"],
)
def test_host_client_states_equal_the_whole_table_on_the_device(tmp_path, overrides):
    dense, host = _dense_vs_host(tmp_path, **overrides)
    for a, b in zip(jax.tree.leaves(dense["params"]), jax.tree.leaves(host["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in h]  # noqa: E731
    assert strip(dense["history"]) == strip(host["history"])


def test_the_host_table_holds_the_clients_sampled_and_no_others():
    from fedjax_sim.driver.client_states import client_tables
    from fedjax_sim.simulation import auto_strategy, cohort_source

    config = _config(algorithm="scaffold", client_states="auto", strategy="sequential")
    config.dataset.kwargs.num_clients = 100_000
    exp = build_experiment(config)
    assert exp.host_states  # auto: a population generated on demand
    source = cohort_source(exp, {0: exp.data.train}, [(0, 0)], exp.num_steps)
    exp, _, program = auto_strategy(exp, source, None)
    states, alive = program.init()
    rows = jax.tree.leaves(client_tables(states))[0].shape[0]
    assert rows == exp.cohort_slots == 8  # the round's table: the cohort's rows only
    sampled = set()
    for r in range(1, 5):
        states, alive, _ = program.step(states, alive, source.cohorts(r), r)
        sampled |= set(sample_clients(0, r, 100_000, 8).tolist())
    tree = program.store.tree()
    assert set(tree["ids"].tolist()) == sampled and program.store.count == len(sampled)
    # A client that reported has a non-zero control variate; the initial row stays zero.
    assert all(np.abs(r).sum() > 0 for r in jax.tree.leaves(tree["rows"])[0])


def test_host_client_states_resume_bitwise(tmp_path):
    config = _config(algorithm="scaffold", client_states="host", checkpoint_every=2)
    config.dataset.kwargs.num_clients = 30
    whole = fs.simulate(config, tmp_path / "whole", progress=False)
    config.num_rounds = 3
    fs.simulate(config, tmp_path / "split", progress=False)
    config.num_rounds = 6
    resumed = fs.simulate(config, tmp_path / "split", progress=False)
    for a, b in zip(
        jax.tree.leaves(whole["params"]), jax.tree.leaves(resumed["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_what_host_client_states_cannot_do_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown client_states 'disk'"):
        build_experiment(_config(algorithm="scaffold", client_states="disk"))
    with pytest.raises(ValueError, match="set client_states='device'"):
        build_experiment(_config(algorithm="ditto", client_states="host"))
    # auto keeps a personalizing algorithm's table on the device, even for a population.
    assert not build_experiment(_config(algorithm="ditto")).host_states
    config = _config(algorithm="scaffold", client_states="host")
    with pytest.raises(ValueError, match="a sweep keeps its members' per-client state"):
        fs.run_sweep(config, {"client.learning_rate": [0.1, 0.2]}, tmp_path, progress=False)
    assert not build_experiment(_config(algorithm="scaffold"), sweep=True).host_states  # auto
    config = _config()
    config.eval.finetune_steps = 2
    with pytest.raises(ValueError, match="set eval.finetune_steps = 0"):
        fs.simulate(config, tmp_path / "finetune", progress=False)
    assert not (tmp_path / "finetune").exists()
    # FedAvg has no per-client state: nothing is kept, whatever the setting.
    assert not build_experiment(_config(client_states="host")).host_states
    summary = fs.simulate(_config(client_states="host", num_rounds=1), tmp_path / "fedavg")
    assert summary["client_states"] == "none"


def test_a_process_share_packs_its_rows_as_the_whole_cohort_does():
    """A multi-process run's process draws the shuffles and gathers the examples of its own
    rows only; those rows, and every row's mask, are the whole cohort's."""
    lazy = SyntheticPopulation(60, seed=2, min_examples=3, max_examples=30)
    kw = dict(batch_size=4, local_epochs=2, num_steps=16, num_clients=8, seed=1, round_num=4)
    ids = [5, 59, 0, 33, 12, 7]  # two padded rows
    whole = pack_cohort(lazy, ids, **kw)
    local = fs.data.packing.pack_cohort_local(lazy, ids, rows=slice(4, 8), **kw)
    part = fs.data.packing.fill_cohort(lazy, local, slice(4, 8))
    np.testing.assert_array_equal(part.mask, whole.mask)
    np.testing.assert_array_equal(part.num_examples, whole.num_examples)
    for k in ("x", "y"):
        np.testing.assert_array_equal(part.batches[k][4:], whole.batches[k][4:])
        assert not part.batches[k][:4].any()  # not this process's rows: never gathered


def test_cohorts_prepared_ahead_in_a_thread_equal_those_prepared_in_turn():
    from fedjax_sim.simulation import cohort_source

    config = _config(algorithm="scaffold")
    config.systems.straggler_fraction, config.systems.dropout = 0.3, 0.1  # pure per round too
    exp = build_experiment(config)
    ahead = cohort_source(exp, {0: exp.data.train}, [(0, 0)], exp.num_steps)
    in_turn = fs.simulation.CohortSource(
        exp.config, {0: exp.data.train}, [(0, 0)], slots=exp.cohort_slots,
        max_steps=exp.num_steps, model_bytes=exp.model_bytes, prefetch=False,
    )  # fmt: skip
    assert ahead._pool is not None and in_turn._pool is None
    for r in range(1, 6):
        if r == 3:
            time.sleep(0.2)  # whatever the timing
        for a, b in zip(ahead.cohorts(r), in_turn.cohorts(r), strict=True):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_array_equal(x, y)
        assert ahead.bookkeeping() == in_turn.bookkeeping()
    assert ahead._next[0] == 6  # round 6 is being prepared


def _write_split(root, n_train=40, n_test=6):
    from fedjax_sim.data.on_disk import write_clients

    kw = dict(seed=4, dim=6, num_classes=3, min_examples=2, max_examples=20)
    train = SyntheticPopulation(n_train, **kw)
    test = SyntheticPopulation(n_test, split="test", **kw)
    write_clients(root / "train", train)
    write_clients(root / "test", test)
    return train, test


def test_clients_on_disk_read_back_bitwise_and_train_as_held_in_memory(tmp_path):
    from fedjax_sim.data.on_disk import OnDiskClients

    train, test = _write_split(tmp_path / "pop")
    disk = OnDiskClients(tmp_path / "pop" / "train")
    assert disk.num_clients == 40 and disk.on_demand
    np.testing.assert_array_equal(disk.sizes, train.sizes)
    for i in (0, 17, 39):
        for k in ("x", "y"):
            np.testing.assert_array_equal(disk.client(i)[k], train.client(i)[k])
    # The same run from disk (on demand) and from the same clients held in memory.
    held = fs.data.FederatedData(
        fs.data.FederatedDataset(dict(train), "held"), test.subset(range(6)), 3
    )
    out = {}
    for name, fd in (("disk", None), ("held", held)):
        config = _config(algorithm="scaffold", data_on_device="host", client_states="host")
        config.dataset.name, config.dataset.kwargs = "on_disk", {"path": str(tmp_path / "pop")}
        out[name] = fs.simulate(config, tmp_path / name, federated_data=fd, progress=False)
    for a, b in zip(*(jax.tree.leaves(out[k]["params"]) for k in out), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_damaged_or_missing_client_folders_are_one_line_errors(tmp_path):
    from fedjax_sim.data.on_disk import OnDiskClients, write_clients

    _write_split(tmp_path / "pop")
    with pytest.raises(FileExistsError, match="write the clients to a new folder"):
        write_clients(tmp_path / "pop" / "train", SyntheticPopulation(3, seed=0))
    bad = [("a", {"x": np.zeros((2, 3))}), ("b", {"x": np.zeros((2, 4))})]
    with pytest.raises(ValueError, match="same names, dtypes and trailing shapes"):
        write_clients(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))
    with pytest.raises(FileNotFoundError, match="not a folder written by"):
        OnDiskClients(tmp_path / "nothing")
    x = tmp_path / "pop" / "train" / "x.bin"
    x.write_bytes(x.read_bytes()[:-8])  # truncated
    with pytest.raises(ValueError, match="x.bin holds .* bytes, the index says"):
        OnDiskClients(tmp_path / "pop" / "train")

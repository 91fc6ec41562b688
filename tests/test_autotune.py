"""``strategy = "auto"`` from a measurement cached on disk (fedjax_sim/driver/autotune.py)."""

import json

import pytest

import fedjax_sim as fs
from fedjax_sim.driver import autotune
from fedjax_sim.simulation import STRATEGY_FILE


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    cache = tmp_path / "auto_cache"
    monkeypatch.setenv(autotune.MODE_ENV, "measure")
    monkeypatch.setenv(autotune.CACHE_ENV, str(cache))
    return cache


def test_choose_measures_once_then_reads_the_cache(measuring):
    fields = {"model": "m", "cohort": "f32[4, 3]"}
    calls = []

    def time_round(strategy, best):
        calls.append((strategy, best))
        return {"sequential": 0.3, "vmap": 0.1, "chunked": 0.2}[strategy]

    choice = autotune.choose(fields, ["sequential", "vmap", "chunked"], time_round)
    # Each candidate learns the best time so far (to give up against).
    inf = float("inf")
    assert choice.strategy == "vmap"
    assert calls == [("sequential", inf), ("vmap", 0.3), ("chunked", 0.1)]
    assert choice.reason == (
        "measured: vmap fastest per round (vmap 100.0 ms, chunked 200.0 ms, sequential 300.0 ms)"
    )
    (entry,) = measuring.glob("*.json")
    assert json.loads(entry.read_text())["strategy"] == "vmap"

    def no_timing(strategy, best):
        raise AssertionError("measured again")

    again = autotune.choose(fields, ["sequential", "vmap", "chunked"], no_timing)
    assert again.strategy == "vmap" and "(cached, measured 20" in again.reason
    # Another key (another cohort shape) measures anew.
    other = autotune.choose({**fields, "cohort": "f32[8, 3]"}, ["sequential", "vmap"], time_round)
    assert other.strategy == "vmap" and [c for c, _ in calls[-2:]] == ["sequential", "vmap"]
    assert len(list(measuring.glob("*.json"))) == 2


def test_choose_remeasures_an_unreadable_entry_and_follows_the_rule_when_asked(
    measuring, monkeypatch
):
    fields = {"k": 1}
    measuring.mkdir()
    (measuring / f"{autotune.cache_key(fields)}.json").write_text("{not json")
    times = {"sequential": 1.0, "vmap": 2.0}
    choice = autotune.choose(fields, ["sequential", "vmap"], lambda s, best: times[s])
    assert choice.strategy == "sequential" and choice.reason.startswith("measured:")
    monkeypatch.setenv(autotune.MODE_ENV, "rule")
    ruled = autotune.choose(fields, ["sequential", "vmap"], None)
    assert ruled.strategy == "sequential"  # the rule on CPU
    assert ruled.reason == "rule (FEDJAX_SIM_AUTO=rule): sequential on cpu"
    monkeypatch.setenv(autotune.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="FEDJAX_SIM_AUTO='fastest'; choose one of measure, rule"):
        autotune.choose(fields, ["sequential"], None)


def test_a_failing_candidate_is_skipped_and_named(measuring):
    def time_round(strategy, best):
        if strategy == "vmap":
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory\nwhile allocating")
        return 0.5

    choice = autotune.choose({"k": 2}, ["sequential", "vmap"], time_round)
    assert choice.strategy == "sequential"
    assert choice.reason == (
        "measured: sequential fastest per round (sequential 500.0 ms, vmap failed)"
    )
    (entry,) = measuring.glob("*.json")
    assert json.loads(entry.read_text())["failed"] == {
        "vmap": "MemoryError: RESOURCE_EXHAUSTED: out of memory"
    }

    def nothing_runs(strategy, best):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="every candidate failed.*set strategy explicitly"):
        autotune.choose({"k": 3}, ["sequential", "vmap"], nothing_runs)


def test_best_of_times_the_run_not_its_preparation_and_gives_up_on_a_slow_candidate():
    runs, prepared = [], []

    def prepare():
        prepared.append(1)
        return (len(prepared),)

    def run(i):
        runs.append(i)

    autotune.best_of(run, prepare, repeats=3)
    assert runs == [1, 2, 3, 4]  # one untimed (the compile), three timed, each prepared anew
    runs.clear()
    prepared.clear()
    autotune.best_of(run, prepare, give_up_after=-1.0, repeats=3)
    assert runs == [1, 2]  # slower than allowed after the first timed run: no more


def test_candidates_time_chunked_only_where_it_differs_from_vmap():
    assert autotune.candidates(10, 10) == ["sequential", "vmap"]
    assert autotune.candidates(11, 10) == ["sequential", "vmap", "chunked"]


def smoke(rounds=2):
    config = fs.load_config(f"{fs.config.DEFAULT_CONFIG}:smoke")
    config.num_rounds = rounds
    config.eval_every = rounds
    config.num_devices = 1
    return config


def test_a_run_trains_with_the_measured_strategy_says_why_and_resumes_with_it(measuring, tmp_path):
    out = fs.simulate(smoke(), tmp_path / "a", progress=False)
    assert out["strategy_reason"].startswith(f"measured: {out['strategy']} fastest per round (")
    recorded = json.loads((tmp_path / "a" / STRATEGY_FILE).read_text())
    assert recorded["strategy"] == out["strategy"]
    assert set(recorded["seconds"]) == {"sequential", "vmap"}  # 10 clients: chunks of 10 = vmap
    (entry,) = measuring.glob("*.json")

    # The cache decides a new run of the same shapes: plant the other strategy in it.
    other = "vmap" if out["strategy"] == "sequential" else "sequential"
    planted = json.loads(entry.read_text())
    planted["strategy"] = other
    entry.write_text(json.dumps(planted))
    config = smoke()
    config.checkpoint_every = 1
    run = fs.simulate(config, tmp_path / "b", progress=False)
    assert run["strategy"] == other and "(cached, measured" in run["strategy_reason"]
    assert out["compiles"] == 1  # the measured winner's program trained the first run

    # Resuming (two more rounds) keeps the strategy the run started with, whatever the cache
    # now says, so the resumed run is the run it would have been.
    planted["strategy"] = out["strategy"]
    entry.write_text(json.dumps(planted))
    config.num_rounds = 4
    resumed = fs.simulate(config, tmp_path / "b", progress=False)
    assert resumed["strategy"] == other
    assert resumed["strategy_reason"] == (
        f"resumed with the strategy the run started with ({STRATEGY_FILE})"
    )


def test_resuming_a_run_from_before_strategy_json_keeps_the_rule(measuring, tmp_path):
    config = smoke()
    config.checkpoint_every = 1
    fs.simulate(config, tmp_path / "run", progress=False)
    (tmp_path / "run" / STRATEGY_FILE).unlink()  # as a run of an earlier version left it
    config.num_rounds = 3
    out = fs.simulate(config, tmp_path / "run", progress=False)
    assert out["strategy"] == "sequential"  # the rule's, on CPU
    assert out["strategy_reason"].startswith("resumed with the rule's strategy")


def test_a_bad_mode_fails_before_any_data_loads(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.MODE_ENV, "fastest")
    config = smoke()
    config.dataset.name = "no_such_dataset"  # would fail later, were the mode not checked first
    with pytest.raises(ValueError, match="FEDJAX_SIM_AUTO='fastest'"):
        fs.simulate(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_configured_strategy_is_not_measured(measuring, tmp_path):
    config = smoke()
    config.strategy = "sequential"
    out = fs.simulate(config, tmp_path / "run", progress=False)
    assert (out["strategy"], out["strategy_reason"]) == ("sequential", "configured")
    assert not measuring.exists()

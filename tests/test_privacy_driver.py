"""Privacy accounting in the driver: every record's epsilon is dp_accounting's for the run's
sampling, a target epsilon ends the run cleanly, and Poisson DP-FedAvg divides by q N."""

import json

import dp_accounting
import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import pack_cohort
from fedjax_sim.driver import privacy
from tests.helpers import linear_model, ragged_dataset, tree_allclose


def _dp_config(**fields):
    config = fs.load_config("default:smoke")
    config.num_rounds, config.eval_every, config.checkpoint_every = 6, 2, 0
    config.client.local_epochs = 1
    config.weighting = "uniform"
    config.dp.clip_norm, config.dp.noise_multiplier = 1.0, 1.0
    for k, v in fields.items():
        group, name = k.split("__") if "__" in k else (None, k)
        (config[group] if group else config)[name] = v
    return config


def _rdp_epsilon(event, delta):
    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(event)
    return acct.get_epsilon(delta)


def test_records_carry_dp_accountings_epsilon_for_poisson_sampling(tmp_path):
    config = _dp_config(sampling__scheme="poisson")
    out = fs.simulate(config, tmp_path / "run", progress=False)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [2, 4, 6]
    q = config.clients_per_round / 30  # sampling.rate 0: clients_per_round / population
    for rec in lines:
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)),
            rec["round"],
        )
        assert rec["epsilon"] == pytest.approx(_rdp_epsilon(event, 1e-5), abs=1e-6)
        assert rec["delta"] == 1e-5
    assert np.all(np.diff([r["epsilon"] for r in lines]) > 0)
    assert out["epsilon"] == lines[-1]["epsilon"]
    assert "privacy: epsilon" in fs.simulation.format_summary(out)


def test_uniform_sampling_is_accounted_without_replacement():
    config = _dp_config()
    acct = privacy.accountant_of(config, 30)
    assert acct.sampling == "uniform" and (acct.cohort_size, acct.population) == (10, 30)
    # Replace-one neighbours: sensitivity 2 S, so the event carries z / 2 (accounting module).
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(30, 10, dp_accounting.GaussianDpEvent(0.5)),
        3,
    )
    ref = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    ref.compose(event)
    assert acct.epsilon(3) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


def test_target_epsilon_stops_after_the_last_round_within_it(tmp_path):
    config = _dp_config(sampling__scheme="poisson")
    acct = privacy.accountant_of(config, 30)
    target = (acct.epsilon(3) + acct.epsilon(4)) / 2  # 3 rounds fit, the 4th would not
    config.dp.target_epsilon = target
    out = fs.simulate(config, tmp_path / "run", progress=False)
    assert out["rounds"] == 3 and out["stopped_by"] == "dp.target_epsilon"
    assert out["planned_rounds"] == 6
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    rounds = [json.loads(s)["round"] for s in text.splitlines()]
    assert rounds == [2, 3]  # its evaluations kept, the last round evaluated
    assert out["epsilon"] <= target


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"dp__target_epsilon": 1e-6}, "cannot be met"),
        ({"sampling__scheme": "weighted"}, "has no privacy accountant"),
        ({"dp__noise_multiplier": 0.0, "dp__target_epsilon": 2.0}, "without noise"),
        ({"dp__delta": 1.5}, "delta"),
        ({"dp__accountant": "moments"}, "pld, rdp"),
        ({"dp__target_epsilon": -1.0}, "target_epsilon must be >= 0"),
    ],
)
def test_bad_privacy_settings_are_refused_before_training(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        fs.simulate(_dp_config(**fields), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_poisson_dp_fedavg_divides_the_sum_by_the_expected_cohort():
    # Noise ~0 so the aggregate is visible: sum of clipped deltas / (q N), not / n.
    model = linear_model()
    params = model.init(jax.random.key(0))
    ds = ragged_dataset([4, 6, 5])
    cohort = pack_cohort(ds, [0, 1, 2], batch_size=2, seed=0, round_num=0)
    kw = dict(weighting="uniform", clip_norm=100.0, executor=fs.Executor("vmap"))
    plain = fs.fedavg(model, optax.sgd(0.1), **kw)
    ref, _ = plain.apply(plain.init(params), cohort, jax.random.key(1))
    poisson = fs.fedavg(model, optax.sgd(0.1), noise_multiplier=1e-12, expected_clients=4.0, **kw)
    got, _ = poisson.apply(poisson.init(params), cohort, jax.random.key(1))
    # mean over 3 = sum / 3, so params - got = (params - ref) * 3 / 4.
    expect = jax.tree.map(lambda p, r: p - (p - r) * 3 / 4, params, ref.params)
    tree_allclose(got.params, expect, rtol=1e-5, atol=1e-6)


def test_a_noise_sweep_is_one_program_and_each_member_has_its_own_epsilon(tmp_path):
    config = _dp_config(sampling__scheme="poisson")
    config.num_rounds, config.eval_every = 2, 2
    out = fs.run_sweep(config, {"dp.noise_multiplier": [0.8, 1.6]}, tmp_path / "sweep")
    assert out["groups"] == 1  # vectorized: one compiled program
    eps = [m["summary"]["epsilon"] for m in out["members"]]
    for m, z in zip(out["members"], (0.8, 1.6), strict=True):
        solo = privacy.accountant_of(_dp_config(sampling__scheme="poisson"), 30)
        solo = type(solo)(noise_multiplier=z, sampling_rate=solo.sampling_rate, delta=1e-5)
        assert m["summary"]["epsilon"] == pytest.approx(solo.epsilon(2), abs=1e-6)
    assert eps[0] > eps[1]

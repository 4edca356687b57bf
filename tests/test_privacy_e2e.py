"""Differential privacy inside the engine: exactness at z=0, accounting wiring, end to end on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdfl
from jaxdfl import experiment, simulation
from jaxdfl.privacy import accounting, mechanisms
from jaxdfl.training import loss_fn


def test_example_mode_gradient_equals_nonprivate_at_zero_noise_infinite_clip(small_cfg):
    """With z = 0 and C = inf the DP-SGD gradient of a full valid batch is the plain mean-loss gradient."""
    exp = experiment.build(small_cfg())
    apply = exp.spec.local.apply
    theta = simulation.init_state(exp.spec, jax.random.key(0), exp.hyper).theta[0]
    x, y = exp.arrays.x[0, :8], exp.arrays.y[0, :8]
    plain = jax.grad(lambda t: loss_fn(apply, t, x, y))(theta)
    per_ex = jax.vmap(lambda xi, yi: jax.grad(lambda t: loss_fn(apply, t, xi[None], yi[None]))(theta))(x, y)
    dp = mechanisms.dp_sum(jax.random.key(1), per_ex, jnp.ones(8, bool), jnp.inf, 0.0, 8)
    np.testing.assert_allclose(dp, plain, rtol=1e-5, atol=1e-7)


def test_example_mode_reports_accountant_epsilon(small_cfg):
    cfg = small_cfg(**{"privacy.mode": "example", "privacy.noise_multiplier": 1.5, "privacy.clip_norm": 1.0})
    r = jaxdfl.run(cfg)
    exp = experiment.build(cfg)
    steps = np.asarray(r.history["round"]) * cfg.train.local_steps
    for e, t in zip(r.history["epsilon"], steps, strict=True):
        ref = accounting.example_epsilons(1.5, exp.sample_rates, int(t), 1e-5, "rdp", exp.privacy.overflow).max()
        assert e == pytest.approx(ref)
    assert np.all(np.diff(r.history["epsilon"]) > 0)
    assert len(r.summary["epsilon_per_node"]) == 8
    assert r.history["epsilon"][-1] == max(r.summary["epsilon_per_node"]) == r.summary["state_epsilon"]


@pytest.mark.filterwarnings("ignore:privacy.noise_multiplier = 0 adds no noise")
@pytest.mark.filterwarnings("error")
def test_an_infinite_epsilon_is_reported_as_infinite_not_as_no_privacy(small_cfg, tmp_path):
    """Regression (privacy audit): with z = 0 the summary's epsilon was None / null, exactly what a run without
    privacy reports, and the CLI's summary line left it out."""
    import json

    from jaxdfl import results
    from jaxdfl.cli import summary_line

    r = jaxdfl.run(small_cfg(**{"privacy.mode": "update", "privacy.noise_multiplier": 0.0, "seeds": [0, 1]}))
    assert r.summary["final"]["epsilon"] == r.summary["state_epsilon"] == np.inf
    assert r.summary["final_per_seed"]["epsilon"] == [np.inf, np.inf]
    assert "epsilon=inf" in summary_line(r.summary)
    results.write_json(tmp_path / "s.json", r.summary)
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["final"]["epsilon"] == written["state_epsilon"] == "inf" and float(written["state_epsilon"]) > 1e308
    assert set(written["epsilon_per_node"]) == {"inf"}
    assert written["final_std"]["epsilon"] is None  # undefined (inf - inf), as NaN metrics are
    none = jaxdfl.run(small_cfg())
    assert none.summary["final"]["epsilon"] is None and none.summary["state_epsilon"] is None


def test_update_mode_epsilon_and_noise(small_cfg):
    cfg = small_cfg(**{"privacy.mode": "update", "privacy.noise_multiplier": 2.0, "train.share": "update"})
    r = jaxdfl.run(cfg)
    assert r.summary["final"]["epsilon"] == pytest.approx(accounting.update_epsilons(2.0, 6, 1e-5))
    quiet = jaxdfl.run(small_cfg(**{"train.share": "update"}))
    assert not np.allclose(r.history["consensus_distance"], quiet.history["consensus_distance"])


def test_dp_noise_is_independent_across_nodes(small_cfg):
    """Zero gradients (lr irrelevant): what nodes send in update mode is pure noise, uncorrelated across nodes."""
    exp = experiment.build(small_cfg(**{"privacy.mode": "update", "privacy.noise_multiplier": 1.0,
                                        "privacy.clip_norm": 1.0}))
    keys = jax.random.split(jax.random.key(0), exp.spec.n)
    noise = jax.vmap(lambda k: mechanisms.privatize_update(k, jnp.zeros(exp.model.dim), 1.0, 1.0, "gaussian"))(keys)
    c = np.corrcoef(np.asarray(noise))
    off = c[~np.eye(exp.spec.n, dtype=bool)]
    assert np.abs(off).max() < 6 / np.sqrt(exp.model.dim)  # |r| of independent vectors ~ 1/sqrt(D)


@pytest.mark.slow
def test_target_epsilon_8_on_digits_trains_and_stays_within_budget():
    cfg = jaxdfl.make_config({
        "rounds": 60, "eval_every": 20, "topology": {"kind": "ring", "n": 8},
        "model": {"name": "logreg"}, "train": {"lr": 0.5, "batch_size": 32, "local_steps": 2},
        "privacy": {"mode": "example", "target_epsilon": 8.0, "clip_norm": 1.0}})
    r = jaxdfl.run(cfg)
    assert r.summary["final"]["epsilon"] <= 8.0
    assert r.summary["final"]["epsilon"] > 7.5  # calibration spends (nearly) the whole budget
    assert r.summary["final"]["accuracy_mean"] > 0.8


def test_a_kept_program_is_reused_only_with_the_same_dp_buffer(small_cfg):
    """Targets 1 and 16 size different Poisson buffers; the second run once reused the first's program and buffer,
    while its epsilon was accounted with its own buffer's overflow probability (at 16: really infinite)."""
    cfgs = [small_cfg(**{"privacy.mode": "example", "privacy.target_epsilon": eps}) for eps in (1.0, 16.0)]
    exps = [experiment.build(c) for c in cfgs]
    assert exps[0].privacy.buffer != exps[1].privacy.buffer
    assert experiment.same_program(cfgs[0], cfgs[1])  # the config alone would allow reuse
    runner = experiment.Runner(exps[0])
    with pytest.raises(ValueError, match="DP-SGD buffer"):
        runner(exps[1])
    runners = [(experiment.runner_key(exps[0]), runner)]
    assert experiment.runner_for(exps[0], runners) is runner
    assert experiment.runner_for(exps[1], runners) is not runner and len(runners) == 2
    experiment._last_runner = runner
    jaxdfl.run(cfgs[1])
    assert experiment._last_runner is not runner
    assert experiment._last_runner.exp.privacy.buffer == exps[1].privacy.buffer


@pytest.mark.parametrize("mode", ["example", "update"])
def test_the_program_runs_with_the_noise_multiplier_epsilon_is_accounted_for(small_cfg, mode):
    """The calibrated float64 z was rounded to float32 for the program, sometimes down: epsilon above target."""
    cfg = small_cfg(**{"privacy.mode": mode, "privacy.target_epsilon": 8.0, "train.share": "update"})
    exp = experiment.build(cfg)
    z_used = np.float64(np.asarray(exp.hyper["noise_multiplier"]))
    assert z_used == exp.noise_multiplier  # accounted with exactly the value the program runs with
    assert exp.epsilons(cfg.rounds)[~exp.byzantine].max() <= 8.0
    given = experiment.build(small_cfg(**{"privacy.mode": mode, "privacy.noise_multiplier": 0.7}))
    z_given = np.float64(np.asarray(given.hyper["noise_multiplier"]))
    assert float(np.float32(0.7)) < 0.7 <= given.noise_multiplier == z_given


def test_nearby_privacy_targets_share_one_buffer_and_program(small_cfg):
    """The buffer is rounded up to a multiple of BUFFER_STEP, so a privacy-utility sweep compiles a few programs."""
    exps = [experiment.build(small_cfg(**{"privacy.mode": "example", "privacy.target_epsilon": eps}))
            for eps in (1.0, 2.0, 4.0)]
    assert len({experiment.program_key(e)[1] for e in exps}) == 1
    assert exps[0].privacy.buffer % experiment.BUFFER_STEP == 0
    # epsilon is accounted with the rounded buffer's (smaller) overflow probability and stays within the target
    assert exps[0].epsilons(6)[~exps[0].byzantine].max() <= 1.0

"""Byzantine nodes in the engine: honest-only metrics, no-op without attackers, divergence, robustness."""

import numpy as np
import pytest

import jaxdfl
from jaxdfl import experiment, simulation


def test_byzantine_nodes_never_count_in_honest_metrics(small_cfg):
    cfg = small_cfg(**{"attack.name": "large_norm", "attack.byzantine": 2, "aggregation.rule": "median"})
    exp = experiment.build(cfg)
    import jax

    history, state = jax.jit(simulation.make_program(exp.spec))(jax.random.key(0), exp.hyper, exp.arrays)
    theta = np.asarray(state.theta)
    honest = ~exp.byzantine
    # recompute consensus distance over honest nodes only, in NumPy
    mean = theta[honest].mean(0)
    ref = np.mean(np.sum((theta[honest] - mean) ** 2, axis=1))
    np.testing.assert_allclose(history["consensus_distance"][-1], ref, rtol=1e-4)
    # poisoning Byzantine rows with NaN changes nothing in the metrics
    poisoned = state.theta.at[np.flatnonzero(exp.byzantine)].set(np.nan)
    m1 = simulation.evaluate(exp.spec, exp.arrays, state.theta)
    m2 = simulation.evaluate(exp.spec, exp.arrays, poisoned)
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6)


def test_per_node_accuracy_agrees_with_the_honest_aggregates_and_leaves_byzantine_nodes_out(small_cfg, tmp_path):
    import csv

    from jaxdfl.cli import write_outputs

    r = jaxdfl.run(small_cfg(**{"attack.name": "sign_flip", "attack.byzantine": 2, "aggregation.rule": "median"}))
    per, byz, final = r.summary["accuracy_per_node"], r.summary["byzantine_ids"], r.summary["final"]
    assert len(per) == 8 and len(byz) == 2 and all(per[i] is None for i in byz)
    honest = [a for a in per if a is not None]
    assert len(honest) == 6
    assert np.mean(honest) == pytest.approx(final["accuracy_mean"], rel=1e-6)
    assert (min(honest), max(honest)) == pytest.approx((final["accuracy_min"], final["accuracy_max"]))
    write_outputs(tmp_path, r)
    with open(tmp_path / "nodes.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["byzantine"]) for row in rows] == [int(i in byz) for i in range(8)]
    assert [int(row["degree"]) for row in rows] == [2] * 8  # a ring
    assert [row["accuracy"] == "" for row in rows] == [a is None for a in per]


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian", "alie", "dissensus"])
def test_zero_byzantine_changes_nothing(small_cfg, attack):
    base = jaxdfl.run(small_cfg(**{"aggregation.rule": "trimmed_mean"}))
    with pytest.warns(jaxdfl.InertSettingWarning, match="attack.byzantine = 0"):
        with_attack = jaxdfl.run(small_cfg(**{"aggregation.rule": "trimmed_mean", "attack.name": attack}))
    for k in ("accuracy_mean", "consensus_distance"):
        np.testing.assert_array_equal(base.history[k], with_attack.history[k])


def test_inf_attack_robust_rule_stays_finite_mean_reports_divergence(small_cfg):
    # ring of 8 with Byzantine nodes 0 and 4: every honest node has at most one Byzantine neighbour
    attack = {"attack.name": "inf", "attack.byzantine": 2, "attack.placement": "ids", "attack.ids": [0, 4]}
    robust = jaxdfl.run(small_cfg(**attack, **{"aggregation.rule": "median"}))
    assert not robust.summary["diverged"]
    honest = np.ones(8, bool)
    honest[[0, 4]] = False
    assert np.isfinite(np.asarray(robust.state.theta)[honest]).all()
    naive = jaxdfl.run(small_cfg(**attack, **{"aggregation.rule": "trimmed_mean", "aggregation.f": 0}))
    assert naive.summary["diverged"] and naive.summary["diverged_round"] == 2


@pytest.mark.slow
def test_mean_collapses_under_sign_flip_median_resists():
    """digits, 16 nodes on a 6-regular graph, 3 Byzantine nodes sending -3 x the honest mean."""
    base = {"rounds": 40, "eval_every": 40, "seed": 1,
            "topology": {"kind": "random_regular", "n": 16, "degree": 6, "seed": 1},
            "model": {"name": "logreg"}, "train": {"lr": 0.3, "batch_size": 16, "local_steps": 2}}
    clean = jaxdfl.run(jaxdfl.make_config(base, {"aggregation.rule": "median"}))
    attack = {"attack.name": "sign_flip", "attack.scale": 3.0, "attack.byzantine": 3, "attack.seed": 0}
    mean = jaxdfl.run(jaxdfl.make_config(base, {**attack, "aggregation.rule": "mean"}))
    median = jaxdfl.run(jaxdfl.make_config(base, {**attack, "aggregation.rule": "median"}))
    trimmed = jaxdfl.run(jaxdfl.make_config(base, {**attack, "aggregation.rule": "trimmed_mean",
                                                   "aggregation.f": 2}))
    acc = lambda r: r.summary["final"]["accuracy_mean"]  # noqa: E731
    assert acc(clean) > 0.85
    assert acc(mean) < 0.5
    assert acc(median) > acc(clean) - 0.05
    assert acc(trimmed) > acc(clean) - 0.10  # f=2 of 7 rows: some nodes see 3 attackers


def test_a_seed_that_diverges_does_not_stop_the_others(small_cfg):
    # regression: one diverged seed stopped every seed at its round, so seeds=[a, b] no longer equalled two runs
    attack = {"attack.name": "gaussian", "attack.byzantine": 1, "attack.center": "zero", "attack.sigma": 8e37}
    both = jaxdfl.run(small_cfg(**attack, seeds=[0, 3]))
    alone = jaxdfl.run(small_cfg(**attack, seed=3))
    assert both.summary["diverged_seeds"] == [0] and not alone.summary["diverged"]
    assert both.summary["rounds_done"] == 6
    for k in ("accuracy_mean", "loss_mean"):
        np.testing.assert_allclose(both.history[k][1], alone.history[k], rtol=1e-5)


def test_a_diverged_run_reports_the_same_stop_whatever_its_segments(small_cfg):
    """Regression: the run stopped at the end of the segment that diverged, and segments follow checkpoint_every, so
    rounds_done, the metrics rows and final changed with it. The history now ends at the first evaluation that saw
    every seed diverge."""
    attack = {"attack.name": "inf", "attack.byzantine": 1, "rounds": 12, "eval_every": 2}
    runs = [jaxdfl.run(small_cfg(**attack, checkpoint_every=every)) for every in (2, 6)]  # 1 then 3 rows before
    for r in runs:
        assert r.summary["rounds_done"] == r.summary["diverged_round"] == 2
        assert len(r.history["round"]) == 1
    for r in runs[1:]:
        assert r.summary["final"] == runs[0].summary["final"]
        for k in ("accuracy_mean", "loss_mean", "diverged"):
            np.testing.assert_array_equal(r.history[k], runs[0].history[k])


def test_resuming_a_run_that_stopped_on_divergence_runs_no_further_segment(small_cfg, tmp_path):
    """Regression: the resumed loop checked for divergence only after a new segment, so each resume of a diverged
    run trained one more segment, wrote one more checkpoint and moved state_round (5 -> 10 -> 15)."""
    cfg = small_cfg(**{"attack.name": "inf", "attack.byzantine": 1, "rounds": 12, "eval_every": 2,
                       "checkpoint_every": 4})
    full = jaxdfl.run(cfg, checkpoint_dir=str(tmp_path))
    assert full.summary["diverged"] and full.summary["state_round"] == 4
    for _ in range(2):
        again = jaxdfl.run(cfg, checkpoint_dir=str(tmp_path), resume=True)
        assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["round_000004.npz"]
        assert again.summary["state_round"] == 4 and again.summary["final"] == full.summary["final"]


def test_after_a_divergence_stop_the_summary_says_what_the_returned_models_spent(small_cfg):
    """The metrics end at the diverging evaluation, the returned state at its segment's end: with DP, the models
    handed back trained (and spent privacy) for more rounds than rounds_done, which summary.epsilon covers."""
    from jaxdfl import experiment

    cfg = small_cfg(**{"attack.name": "inf", "attack.byzantine": 1, "rounds": 12, "eval_every": 2,
                       "checkpoint_every": 6, "privacy.mode": "update", "privacy.noise_multiplier": 2.0})
    r = jaxdfl.run(cfg)
    exp = experiment.build(cfg)
    assert r.summary["rounds_done"] == 2 and r.summary["state_round"] == int(np.max(np.asarray(r.state.round))) == 6
    honest = ~exp.byzantine
    assert r.summary["final"]["epsilon"] == pytest.approx(exp.epsilons(2)[honest].max())
    assert r.summary["state_epsilon"] == pytest.approx(exp.epsilons(6)[honest].max())
    assert r.summary["state_epsilon"] > r.summary["final"]["epsilon"]

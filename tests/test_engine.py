"""The node-stacked engine: vmap equals a per-node loop, scan equals a round loop, determinism, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdfl
from jaxdfl import experiment, simulation
from jaxdfl.training import local_train

ROOT = Path(__file__).resolve().parents[1]


def test_vmapped_local_step_equals_python_loop(small_cfg):
    exp = experiment.build(small_cfg(**{"model.name": "mlp", "model.hidden": [16], "train.momentum": 0.9}))
    state = simulation.init_state(exp.spec, jax.random.key(0), exp.hyper)
    keys = jax.random.split(jax.random.key(1), exp.spec.n)
    a = exp.arrays
    vm = jax.jit(jax.vmap(lambda k, t, o, x, y, s: local_train(exp.spec.local, k, t, o, x, y, s, exp.hyper)))
    theta_v, _, loss_v = vm(keys, state.theta, state.opt_state, a.x, a.y, a.sizes)
    one = jax.jit(lambda k, t, o, x, y, s: local_train(exp.spec.local, k, t, o, x, y, s, exp.hyper))
    for i in range(exp.spec.n):
        opt_i = jax.tree.map(lambda leaf: leaf[i], state.opt_state)
        theta_i, _, loss_i = one(keys[i], state.theta[i], opt_i, a.x[i], a.y[i], a.sizes[i])
        np.testing.assert_allclose(theta_v[i], theta_i, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(loss_v[i], loss_i, rtol=1e-5)
    assert not np.allclose(theta_v, state.theta)  # training moved the models


@pytest.mark.parametrize("share", ["model", "update"])
def test_scan_program_equals_round_loop(small_cfg, share):
    exp = experiment.build(small_cfg(**{"train.share": share}))
    key = jax.random.key(5)
    hist_scan, state_scan = jax.jit(simulation.make_program(exp.spec))(key, exp.hyper, exp.arrays)
    hist_loop, state_loop = simulation.python_loop_program(exp.spec)(key, exp.hyper, exp.arrays)
    np.testing.assert_allclose(state_scan.theta, state_loop.theta, rtol=1e-5, atol=1e-6)
    for k in hist_loop:
        np.testing.assert_allclose(np.asarray(hist_scan[k]), hist_loop[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(hist_scan["round"], [2, 4, 6])


@pytest.mark.parametrize("order", ["atc", "cta", "parallel"])
def test_each_round_order_composes_local_training_and_gossip_as_defined(small_cfg, order):
    """atc: x <- W T(x); cta: x <- T(W x); parallel (D-PSGD): x <- W x + (T(x) - x), T = local training."""
    exp = experiment.build(small_cfg(**{"train.order": order, "train.momentum": 0.5}))
    spec, a, n = exp.spec, exp.arrays, exp.spec.n
    state = simulation.init_state(spec, jax.random.key(0), exp.hyper)
    state = state._replace(theta=state.theta + jax.random.normal(jax.random.key(1), state.theta.shape))
    key = jax.random.key(7)
    new, _ = jax.jit(simulation.round_step, static_argnums=0)(spec, exp.hyper, a, state, key)

    keys = jax.random.split(jax.random.split(key, 5)[0], n)
    train = jax.vmap(lambda k, t, o, x, y, s: local_train(spec.local, k, t, o, x, y, s, exp.hyper))
    w = np.asarray(exp.topology.mixing, np.float64)
    x0 = np.asarray(state.theta, np.float64)

    def trained(theta):
        out, opt, _ = train(keys, jnp.asarray(theta, jnp.float32), state.opt_state, a.x, a.y, a.sizes)
        return np.asarray(out, np.float64), opt

    if order == "atc":
        t, opt = trained(x0)
        want = w @ t
    elif order == "cta":
        t, opt = trained(w @ x0)
        want = t
    else:
        t, opt = trained(x0)
        want = w @ x0 + (t - x0)
    np.testing.assert_allclose(new.theta, want, rtol=1e-4, atol=1e-5)
    for got, ref in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(opt)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_same_seed_same_result_other_seed_differs(small_cfg):
    a = jaxdfl.run(small_cfg())
    b = jaxdfl.run(small_cfg())
    c = jaxdfl.run(small_cfg(seed=4))
    for k in a.history:
        np.testing.assert_array_equal(a.history[k], b.history[k])
    assert not np.array_equal(a.history["consensus_distance"], c.history["consensus_distance"])


def test_dense_and_sparse_paths_agree(small_cfg):
    d = jaxdfl.run(small_cfg(**{"aggregation.gossip": "dense"}))
    s = jaxdfl.run(small_cfg(**{"aggregation.gossip": "sparse"}))
    assert d.summary["exchange"] == "dense" and s.summary["exchange"] == "sparse"
    np.testing.assert_allclose(d.history["accuracy_mean"], s.history["accuracy_mean"], atol=1e-6)
    np.testing.assert_allclose(d.history["consensus_distance"], s.history["consensus_distance"], rtol=1e-3,
                               atol=1e-7)


def test_init_same_vs_independent(small_cfg):
    same = experiment.build(small_cfg())
    ind = experiment.build(small_cfg(**{"model.init": "independent"}))
    s0 = simulation.init_state(same.spec, jax.random.key(0), same.hyper).theta
    i0 = simulation.init_state(ind.spec, jax.random.key(0), ind.hyper).theta
    assert float(jnp.max(jnp.abs(s0 - s0[0]))) == 0.0
    assert float(jnp.min(jnp.abs(i0[0] - i0[1]).max())) > 0.0


def test_history_and_summary_shape(small_cfg):
    r = jaxdfl.run(small_cfg())
    for k in ("round", "accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean", "consensus_distance",
              "epsilon"):
        assert r.history[k].shape == (3,)
    assert r.summary["rounds"] == 6 and r.summary["final"]["epsilon"] is None
    f = r.summary["final"]
    assert f["accuracy_min"] <= f["accuracy_mean"] <= f["accuracy_max"]
    assert r.summary["compile_seconds"] > 0 and r.summary["run_seconds"] > 0


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_seeds_in_one_program(small_cfg, mode):
    r = jaxdfl.run(small_cfg(seeds=[3, 4], **{"parallel.seed_mode": mode}))
    single = jaxdfl.run(small_cfg(seed=4))
    assert r.history["accuracy_mean"].shape == (2, 3)
    for k in ("accuracy_mean", "loss_mean", "consensus_distance"):
        np.testing.assert_allclose(r.history[k][1], single.history[k], rtol=1e-5, atol=1e-6)
    assert set(r.summary["final_std"]) == set(r.summary["final"])
    per_seed = r.summary["final_per_seed"]["accuracy_mean"]
    assert r.summary["final_std"]["accuracy_mean"] == pytest.approx(np.std(per_seed, ddof=1))  # sample std
    assert r.summary["rounds_done"] == r.summary["rounds"] == 6
    if mode == "map":  # one seed has no sample std: null, not a 0 that reads as "no spread"
        one = jaxdfl.run(small_cfg(seeds=[4], **{"parallel.seed_mode": mode}))
        assert set(one.summary["final_std"].values()) == {None}


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_seeds_in_one_program_with_random_attack_and_dp_noise(small_cfg, mode):
    """The gaussian attack's loop over attacked rows (a while loop, batched under vmap) and the DP noise under both seed
    layouts give each seed's single-seed run."""
    extra = {"attack.name": "gaussian", "attack.byzantine": 2, "aggregation.rule": "median",
             "privacy.mode": "update", "privacy.noise_multiplier": 0.3, "privacy.clip_norm": 5.0}
    r = jaxdfl.run(small_cfg(seeds=[3, 4], **extra, **{"parallel.seed_mode": mode}))
    for i, seed in enumerate((3, 4)):
        single = jaxdfl.run(small_cfg(seed=seed, **extra))
        for k in ("accuracy_mean", "loss_mean", "consensus_distance"):
            np.testing.assert_allclose(r.history[k][i], single.history[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(r.history["loss_mean"][0], r.history["loss_mean"][1])


def test_seed_mode_auto_maps_on_cpu(small_cfg):
    """On a CPU backend "auto" runs the seeds one after another (batching them only costs cache there)."""
    assert jax.default_backend() == "cpu"
    assert jaxdfl.build(small_cfg(seeds=2)).seed_mode == "map"
    assert jaxdfl.build(small_cfg(seeds=2, **{"parallel.seed_mode": "vmap"})).seed_mode == "vmap"


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's quickstart through the CLI: under 60 s, mean honest accuracy >= 0.90, files written."""
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "jaxdfl.cli", "run", str(ROOT / "configs/quickstart.toml"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["accuracy_mean"] >= 0.90
    assert summary["compile_seconds"] + summary["run_seconds"] < 60
    assert set(summary) >= {"rounds", "compile_seconds", "run_seconds", "final"}
    assert set(summary["final"]) >= {"accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean",
                                     "consensus_distance", "epsilon"}
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + summary["rounds"] // 10
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "config.toml").exists()
    assert "acc=" in proc.stdout


def test_run_reuses_the_last_program_for_dynamic_changes_on_the_new_configs_data(small_cfg, tmp_path):
    """A rerun differing only in dynamic values skips compilation, yet runs on its own arrays: a data file
    rewritten between two runs (same shapes, same static config) is read again, not taken from the kept program."""
    from jaxdfl import experiment

    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"

    def write(labels_seed):
        r = np.random.default_rng(labels_seed)
        np.savez(path, x_train=rng.random((64, 4, 4)).astype(np.float32), y_train=r.integers(0, 3, 64),
                 x_test=rng.random((16, 4, 4)).astype(np.float32), y_test=r.integers(0, 3, 16))

    cfg = small_cfg(**{"data.name": "npz", "data.path": str(path), "topology.n": 4})
    write(1)
    jaxdfl.run(cfg)
    runner = experiment._last_runner
    write(2)
    cfg2 = cfg.replace({"train.lr": 0.3})
    again = jaxdfl.run(cfg2)
    assert experiment._last_runner is runner
    assert again.summary["compile_seconds"] == 0.0  # nothing was compiled for it
    fresh = experiment.Runner(experiment.build(cfg2))()
    for key in ("accuracy_mean", "loss_mean", "consensus_distance"):
        np.testing.assert_array_equal(again.history[key], fresh.history[key])
    jaxdfl.run(cfg2.replace({"topology.n": 8}))  # a static change compiles anew
    assert experiment._last_runner is not runner


def test_a_data_file_rewritten_with_other_shapes_compiles_anew(small_cfg, tmp_path):
    """Same config, data file replaced by one with another feature count: the kept program does not fit it."""
    from jaxdfl import experiment

    path = tmp_path / "d.npz"

    def write(features):
        r = np.random.default_rng(features)
        np.savez(path, x_train=r.random((64, features)).astype(np.float32), y_train=r.integers(0, 3, 64),
                 x_test=r.random((16, features)).astype(np.float32), y_test=r.integers(0, 3, 16))

    cfg = small_cfg(**{"data.name": "npz", "data.path": str(path), "topology.n": 4, "model.name": "logreg"})
    write(5)
    jaxdfl.run(cfg)
    write(7)
    wider = jaxdfl.run(cfg)
    assert wider.summary["compile_seconds"] > 0
    assert experiment._last_runner.exp.model.dim == 7 * 3 + 3
    runner = experiment._last_runner
    write(5)
    with pytest.raises(ValueError, match="data or model shapes"):
        runner(experiment.build(cfg))


def test_a_runner_refuses_an_experiment_whose_rule_was_registered_again(small_cfg, monkeypatch):
    from jaxdfl import aggregators, experiment

    monkeypatch.setitem(aggregators.REGISTRY, "own", lambda x, mask, weights=None: x[0])
    cfg = small_cfg(**{"aggregation.rule": "own"})
    runner = experiment.Runner(experiment.build(cfg))
    monkeypatch.setitem(aggregators.REGISTRY, "own", lambda x, mask, weights=None: aggregators.mean(x, mask))
    with pytest.raises(ValueError, match="registered rule"):
        runner(experiment.build(cfg))


def test_a_rule_registered_at_run_time_is_a_config_value_with_checked_hyper_parameters(small_cfg, monkeypatch):
    from jaxdfl import aggregators
    from jaxdfl.errors import ConfigError

    def scaled_mean(x, mask, weights=None, *, scale=1.0):
        return (scale * aggregators.mean(x, mask, weights)).astype(x.dtype)

    monkeypatch.setitem(aggregators.REGISTRY, "scaled_mean", scaled_mean)
    monkeypatch.setitem(aggregators.DEFAULTS, "scaled_mean", {"scale": 1.0})
    gossip = jaxdfl.run(small_cfg())
    mine = jaxdfl.run(small_cfg(**{"aggregation.rule": "scaled_mean", "aggregation.scale": 1.0}))
    np.testing.assert_allclose(mine.history["loss_mean"], gossip.history["loss_mean"], rtol=1e-5)
    # the rule edited and registered again under its name: the kept program is not reused
    monkeypatch.setitem(aggregators.REGISTRY, "scaled_mean", lambda x, mask, weights=None, *, scale=1.0: (
        (0.5 * scale * aggregators.mean(x, mask, weights)).astype(x.dtype)))
    edited = jaxdfl.run(small_cfg(**{"aggregation.rule": "scaled_mean", "aggregation.scale": 1.0}))
    assert not np.allclose(edited.history["loss_mean"], mine.history["loss_mean"], rtol=1e-3)
    with pytest.raises(ConfigError, match="aggregation"):
        jaxdfl.run(small_cfg(**{"aggregation.rule": "scaled_mean", "aggregation.tau": 1.0}))


def test_a_users_rule_and_attack_keep_their_own_ranges_for_names_the_built_ins_use(small_cfg, monkeypatch):
    """Built-in range checks are for the shipped functions: a user's `s`, `tol`, `value` or `center` is its own."""
    from jaxdfl import aggregators, attacks, experiment

    monkeypatch.setitem(aggregators.REGISTRY, "soft", lambda x, mask, weights, *, s=0.5, tol=-1.0: x[0])
    monkeypatch.setitem(aggregators.DEFAULTS, "soft", {"s": 0.5, "tol": -1.0})
    monkeypatch.setitem(attacks.REGISTRY, "shift", lambda key, ctx, *, value=5.0, center="median": (
        ctx.block + value, ctx.mask))
    monkeypatch.setitem(attacks.DEFAULTS, "shift", {"value": 5.0, "center": "median"})
    experiment.build(small_cfg(**{"aggregation.rule": "soft", "attack.name": "shift", "attack.byzantine": 1}))
    # a user's function registered under a shipped name gets none of that name's built-in checks
    monkeypatch.setitem(aggregators.REGISTRY, "trimmed_mean", lambda x, mask, weights, *, f=1: x[0])
    assert not aggregators.shipped("trimmed_mean") and aggregators.min_rows("trimmed_mean", {"f": 5}) == 1
    experiment.build(small_cfg(**{"aggregation.rule": "trimmed_mean", "aggregation.f": 5}))


def test_a_registered_graph_family_and_pre_aggregator_need_no_defaults_entry(small_cfg, monkeypatch):
    """Regression: without a PARAMS / DEFAULTS entry they failed with a bare KeyError."""
    import networkx as nx

    from jaxdfl import aggregators, experiment, topology

    monkeypatch.setitem(topology.KINDS, "path", lambda n, seed: nx.path_graph(n))
    monkeypatch.setitem(aggregators.PRE_REGISTRY, "keep", lambda key, x, mask, weights: (x, mask, weights))
    exp = experiment.build(small_cfg(**{"topology.kind": "path", "aggregation.rule": "median",
                                        "aggregation.pre": ["keep"]}))
    assert exp.topology.num_edges == 7


def test_a_graph_family_registered_again_with_another_edge_count_compiles_anew(small_cfg, monkeypatch):
    """Matching and edge dropout draw per edge: a kept program with the old edge count would share draws."""
    import networkx as nx

    from jaxdfl import experiment, topology

    monkeypatch.setitem(topology.KINDS, "mine", lambda n, seed: nx.path_graph(n))
    cfg = small_cfg(**{"topology.kind": "mine", "topology.dynamic": "edge_dropout", "topology.drop_prob": 0.3})
    jaxdfl.run(cfg)
    monkeypatch.setitem(topology.KINDS, "mine", lambda n, seed: nx.cycle_graph(n))
    again = jaxdfl.run(cfg)
    assert again.summary["compile_seconds"] > 0 and experiment._last_runner.exp.spec.n_edges == 8


def test_a_users_graph_family_and_dataset_may_read_the_settings_built_ins_ignore(small_cfg, monkeypatch):
    import networkx as nx

    from jaxdfl import data, topology

    monkeypatch.setitem(topology.KINDS, "drawn", lambda n, seed: nx.connected_watts_strogatz_graph(n, 4, 0.3,
                                                                                                   seed=seed))
    monkeypatch.setitem(data.DATASETS, "mine", data.DATASETS["digits"])
    notes = jaxdfl.inert_settings(small_cfg(**{"topology.kind": "drawn", "topology.seed": 5, "data.name": "mine",
                                               "data.test_fraction": 0.5}))
    assert not any("topology.seed" in n or "data.test_fraction" in n for n in notes), notes


@pytest.mark.parametrize("rule, match", [
    (lambda x, mask: x[0], r"aggregation\.rule='mine': a rule is called as rule\(x \[K, D\], mask \[K\], "
                           r"weights \[K\].*it raised TypeError"),
    (lambda x, mask, weights: x[:1], r"aggregation\.rule='mine'.*returned float32\[1, 650\], not float32\[650\]"),
    (lambda x, mask, weights: x[0].astype(int), r"aggregation\.rule='mine'.*returned int32\[650\]"),
])
def test_a_broken_rule_is_named_before_compiling(small_cfg, monkeypatch, rule, match):
    from jaxdfl import aggregators, experiment
    from jaxdfl.errors import ConfigError

    monkeypatch.setitem(aggregators.REGISTRY, "mine", rule)
    with pytest.raises(ConfigError, match=match) as err:
        experiment.build(small_cfg(**{"aggregation.rule": "mine"}))
    assert "\n" not in str(err.value)


def test_a_broken_pre_aggregator_is_named_before_compiling(small_cfg, monkeypatch):
    from jaxdfl import aggregators, experiment
    from jaxdfl.errors import ConfigError

    cfg = {"aggregation.rule": "median", "aggregation.pre": ["half"]}
    monkeypatch.setitem(aggregators.PRE_REGISTRY, "half", lambda key, x, mask, weights: (x, mask))
    with pytest.raises(ConfigError, match=r"aggregation\.pre='half': a pre-aggregator is called as .*returned "
                                          r"\(float32\[3, 650\], bool\[3\]\)"):
        experiment.build(small_cfg(**cfg))
    # a user's pre-aggregator that keeps the contract: the shipped rule after it is traced on its output
    monkeypatch.setitem(aggregators.PRE_REGISTRY, "half", lambda key, x, mask, weights: (x[:2], mask[:2],
                                                                                         weights[:2]))
    experiment.build(small_cfg(**cfg))


def test_a_broken_attack_is_named_before_compiling(small_cfg, monkeypatch):
    from jaxdfl import attacks, experiment
    from jaxdfl.errors import ConfigError

    monkeypatch.setitem(attacks.REGISTRY, "half", lambda key, ctx: ctx.block)  # forgot the mask
    cfg = small_cfg(**{"attack.name": "half", "attack.byzantine": 1, "aggregation.rule": "median"})
    with pytest.raises(ConfigError, match=r"attack\.name='half': an attack is called as .*returned "
                                          r"\(float32\[8, 3, 650\]\), not a \(block, mask\) pair"):
        experiment.build(cfg)
    monkeypatch.setitem(attacks.REGISTRY, "half", lambda key, ctx, *, eps: (ctx.block, ctx.mask))
    with pytest.raises(ConfigError, match=r"attack\.name='half'.*it raised TypeError"):
        experiment.build(cfg)
    # a list is a pair too (the engine unpacks it)
    monkeypatch.setitem(attacks.REGISTRY, "half", lambda key, ctx: [ctx.block, ctx.mask])
    experiment.build(cfg)
    # served in chunks of 3 receivers, an attack sized on all N messages breaks: found before compiling
    monkeypatch.setitem(attacks.REGISTRY, "half", lambda key, ctx: (
        jnp.where(ctx.byzantine[:, None, None], 0.0, ctx.block), ctx.mask))
    experiment.build(cfg)
    with pytest.raises(ConfigError, match=r"attack\.name='half'.*with N=8, R=3, K=3, D=650 it raised"):
        experiment.build(cfg.replace({"parallel.chunk_size": 3}))


def test_a_run_warns_about_settings_without_effect_and_lists_them_in_its_summary(small_cfg):
    with pytest.warns(jaxdfl.config.InertSettingWarning, match="data.alpha"):
        r = jaxdfl.run(small_cfg(**{"data.alpha": 0.1}))
    assert any("data.alpha" in n for n in r.summary["inert_settings"])


def test_a_sweep_compiles_anew_for_a_rule_registered_again_under_its_name(small_cfg, monkeypatch):
    from jaxdfl import aggregators

    monkeypatch.setitem(aggregators.REGISTRY, "mine", lambda x, mask, weights=None: aggregators.mean(x, mask, weights))
    exp = experiment.build(small_cfg(**{"aggregation.rule": "mine"}))
    runners = []
    first = experiment.runner_for(exp, runners)
    assert experiment.runner_for(exp, runners) is first
    monkeypatch.setitem(aggregators.REGISTRY, "mine", lambda x, mask, weights=None: x[0])
    assert experiment.runner_for(experiment.build(small_cfg(**{"aggregation.rule": "mine"})), runners) is not first


def test_a_sweep_that_skips_a_setting_done_earlier_names_the_users_functions_it_used(small_cfg, monkeypatch,
                                                                                        tmp_path):
    """A stored result cannot tell an edited user function from the old one: the skip says which it relied on."""
    from jaxdfl import aggregators, sweep

    monkeypatch.setitem(aggregators.REGISTRY, "mine", lambda x, mask, weights=None: aggregators.mean(x, mask, weights))
    cfg = small_cfg(**{"aggregation.rule": "mine", "rounds": 2, "eval_every": 2})
    assert experiment.user_components(cfg) == ["aggregation.rule = 'mine'"]
    assert experiment.user_components(small_cfg()) == []
    lines = []
    for _ in range(2):
        sweep.run_grid(cfg, [("train.lr", [0.1])], out=tmp_path, log=lines.append)
    assert "done earlier, skipped (it uses your aggregation.rule = 'mine'" in lines[-1]


def test_run_takes_an_experiment_already_built_without_building_it_again(small_cfg, monkeypatch):
    cfg = small_cfg()
    exp = experiment.build(cfg)
    expected = jaxdfl.run(cfg)
    monkeypatch.setattr(experiment, "build", lambda c: pytest.fail("built again"))
    again = jaxdfl.run(exp)
    np.testing.assert_array_equal(again.history["accuracy_mean"], expected.history["accuracy_mean"])



X64_CFG = {"rounds": 2, "eval_every": 1, "seed": 3, "model": {"name": "logreg"},
           "topology": {"kind": "random_regular", "n": 8, "degree": 4, "dynamic": "resample", "pool": 3,
                        "stragglers": 0.5},
           "train": {"lr": 0.2, "batch_size": 8, "local_steps": 2},
           "aggregation": {"rule": "median", "pre": ["bucketing"]}}
X64_RUN = """
import json, sys
import numpy as np
import jaxdfl
r = jaxdfl.run(jaxdfl.make_config(json.loads(sys.argv[1])))
print(json.dumps([np.asarray(r.history[k]).tolist() for k in ("accuracy_mean", "loss_mean")]))
"""


def test_the_same_seed_gives_the_same_run_under_x64():
    """Regression: with ``JAX_ENABLE_X64=1`` the minibatch indices, the resample pool's pick, the stragglers' steps
    (``randint``, int64 there) and bucketing's shuffle (``uniform``, float64) came from other random bits, so the
    same seed gave another run (and a resume across the setting matched neither)."""
    proc = subprocess.run([sys.executable, "-c", X64_RUN, json.dumps(X64_CFG)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, JAX_ENABLE_X64="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = jaxdfl.run(jaxdfl.make_config(X64_CFG))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        np.asarray(plain.history[k]).tolist() for k in ("accuracy_mean", "loss_mean")]


def test_a_progress_that_is_not_a_function_is_refused_before_compiling(small_cfg, monkeypatch):
    """Regression: ``progress="bar"`` failed with "'str' object is not callable" after compiling and running."""
    monkeypatch.setattr(experiment, "build", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(jaxdfl.ConfigError, match="progress must be a function"):
        jaxdfl.run(small_cfg(), progress="bar")


@pytest.mark.parametrize("cfg", [3, ["topology.n=4"], None])
def test_a_run_of_something_not_a_config_names_what_it_takes(cfg):
    """Regressions: ``build(3)`` said "'int' object is not iterable", a list of overrides "dictionary update sequence
    element #0 has length 12", and ``run(None)`` ran the default config."""
    with pytest.raises(jaxdfl.ConfigError, match="a run takes a Config, a config dict or a TOML path"):
        jaxdfl.build(cfg)


def test_overrides_given_as_one_string_are_refused_with_the_list_they_should_be():
    with pytest.raises(jaxdfl.ConfigError, match=r"overrides must be a list .* e.g. \['topology.n=64'\]"):
        jaxdfl.load_config(None, "topology.n=64")

"""The benchmarks' timing helpers and tiny end-to-end runs of the scripts (so they cannot rot)."""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import aggregators as bench  # noqa: E402
import common  # noqa: E402


def test_chained_program_makes_every_call():
    """The chained program runs the call c times (a counter proves no call was hoisted or dropped)."""
    calls = []

    def fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x * 2.0

    run = common.chained(fn, (jnp.ones(3),), 5)
    np.testing.assert_allclose(np.asarray(run()), 2.0)
    jax.effects_barrier()
    assert len(calls) == 5


def test_steady_time_removes_the_fixed_cost(monkeypatch):
    """T(c) = fixed + c * per  ->  steady_time = per; when noise makes the difference non-positive, T(c2) / c2."""
    monkeypatch.setattr(common, "chained", lambda fn, args, calls: calls)
    monkeypatch.setattr(common, "best_time", lambda calls, reps: 0.5 + 0.01 * calls)
    assert common.steady_time(None, (), reps=1, calls=(2, 10)) == pytest.approx(0.01)
    monkeypatch.setattr(common, "best_time", lambda calls, reps: 0.5)
    assert common.steady_time(None, (), reps=1, calls=(2, 10)) == pytest.approx(0.05)


def test_steady_timer_compiles_once_and_measures_again(monkeypatch):
    built = []
    monkeypatch.setattr(common, "chained", lambda fn, args, calls: built.append(calls) or calls)
    times = iter([0.52, 0.60, 0.51, 0.55])  # T(2), T(10) of the first pass, then of the second
    monkeypatch.setattr(common, "best_time", lambda calls, reps: next(times))
    measure = common.steady_timer(None, (), calls=(2, 10))
    assert measure(1) == pytest.approx(0.01)
    assert measure(1) == pytest.approx(0.005)
    assert built == [2, 10]  # the two programs are built once, not per measurement


def test_passes_keep_each_rules_best_time_and_the_best_bandwidth(monkeypatch):
    """Interleaved passes: each rule keeps its fastest pass, the roofline the fastest copy seen."""
    per_rule = {"mean": iter([0.03, 0.01, 0.02]), "median": iter([0.05, 0.06, 0.04])}
    monkeypatch.setattr(bench, "steady_timer", lambda agg, args: lambda reps: next(per_rule[agg.keywords["rule"]]))
    copies = iter([10.0, 30.0, 20.0])
    monkeypatch.setattr(bench, "bandwidth_gbs", lambda: next(copies))
    args = argparse.Namespace(reps=1, passes=3, loop_reps=1, loop_nodes=2, eager_nodes=1, numpy_nodes=1)
    rows, bandwidth = bench.run_size(4, 3, 16, ["mean", "median"], args)
    assert bandwidth == 30.0
    assert [r["ms"] for r in rows] == pytest.approx([10.0, 40.0])


def test_script_writes_table_with_targets(tmp_path):
    out = tmp_path / "agg.md"
    bench.main(["--sizes", "6x4x64", "--rules", "mean,median", "--reps", "1", "--loop-reps", "1",
                "--loop-nodes", "3", "--eager-nodes", "1", "--numpy-nodes", "1", "--out", str(out)])
    md = out.read_text()
    assert "## N=6, K=4, D=64" in md
    for rule in ("mean", "median"):
        assert f"| {rule} |" in md
        assert f"- {rule}: " in md
    assert "<= 3x roofline" in md  # the roofline target is checked
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


@pytest.mark.parametrize("n,k,d", [(5, 4, 8)])
def test_inputs_pad_with_nan_and_weights_sum_to_one(n, k, d):
    block, mask, w = bench.make_inputs(n, k, d)
    assert block.shape == (n, k, d)
    assert bool(jnp.all(mask[:, 0])) and int(jnp.sum(~mask)) > 0
    assert bool(jnp.all(jnp.isnan(block[~mask]))) and bool(jnp.all(jnp.isfinite(block[mask])))
    np.testing.assert_allclose(np.asarray(w.sum(1)), 1.0, rtol=1e-6)


def test_noise_script_times_both_sources():
    import noise

    rows = noise.main(["--shapes", "4x64", "--reps", "1", "--loop-nodes", "2"])
    assert [r["draw"] for r in rows] == ["normal", "laplace"]
    assert all(r["jax"] > 0 and r["rng"] > 0 and r["loop"] > 0 and r["limit"] > 0 for r in rows)


def test_topology_script_agrees_with_the_dense_baseline(capsys):
    import topology as topology_bench

    rows = topology_bench.main(["--sizes", "1100", "--dense-max", "1100"])
    assert [r["kind"] for r in rows] == [kind for kind, _ in topology_bench.FAMILIES]
    for r in rows:
        assert r["gap"] == pytest.approx(r["dense_gap"], rel=1e-8, abs=1e-13)
    assert capsys.readouterr().out.count("| 1100 |") == len(rows)


def test_cpu_devices_worker_reports_a_run_and_the_table_compares_two(monkeypatch, capsys):
    import json

    import cpu_devices

    monkeypatch.setitem(cpu_devices.WORKLOADS, "tiny", ("ring N=4, logreg", [
        "topology.n=4", "rounds=2", "eval_every=2", 'model.name="logreg"']))
    cpu_devices.worker(["tiny"], 1, "", cpu_devices.QUICKSTART)
    row = json.loads(capsys.readouterr().out)
    assert row["workload"] == "tiny" and row["node_devices"] == 1 == row["cpu_devices"]
    assert row["run_s"] > 0 and 0 <= row["accuracy"] <= 1
    faster = {**row, "run_s": row["run_s"] / 2}
    assert cpu_devices.table([row], [faster])[-1].split("|")[5].strip() == "2.00x"


def test_graph_script_prints_a_row_per_case(capsys):
    import graphs

    graphs.main(["--n", "16", "--complete-n", "8", "--reps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == len(graphs.cases(16, 8))
    assert all(float(r.split("|")[3]) >= 0 and r.split("|")[5].strip().endswith("x") for r in rows)


def test_the_host_matching_baseline_is_a_maximal_matching_of_the_graph():
    import graphs
    from jaxdfl import topology

    topo = topology.make("random_regular", 20, seed=1, degree=4)
    edges = [tuple(e) for e in topo.edges.tolist()]
    partner = graphs.loop_matching(topo.n, edges, np.random.default_rng(0))
    assert all(partner[j] == i for i, j in enumerate(partner) if j >= 0)
    assert all((min(i, j), max(i, j)) in set(edges) for i, j in enumerate(partner) if j >= 0)
    assert not any(partner[i] < 0 and partner[j] < 0 for i, j in edges)


def test_rounds_script_times_the_loop_with_the_engines_rule(monkeypatch, tmp_path):
    """`rounds.py --rule median` timed the per-node loop with the mean."""
    import json

    import rounds

    seen = []
    monkeypatch.setattr(rounds, "matmul_gflops", lambda: 100.0)
    monkeypatch.setattr(rounds, "engine_round_seconds", lambda exp, **kw: seen.append(("engine", exp.spec.rule)) or 1.0)
    monkeypatch.setattr(rounds, "loop_round_seconds", lambda exp, rule="mean", **kw: seen.append(("loop", rule)) or 2.0)
    rounds.main(["--sizes", "8", "--loop-max", "8", "--rule", "median", "--rounds-only", "--json",
                 str(tmp_path / "r.json")])
    assert seen == [("engine", "median"), ("loop", "median")]
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["speedup"] == 2.0


def test_large_k_script_reports_each_rule_or_its_timeout(capsys):
    import large_k

    points = large_k.main(["--k", "40", "--d", "16", "--rules", "nnm"])  # above RANKS_MAX_K
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "K=" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["mean after nnm"]
    assert all(p["compile_s"] > 0 and p["ms"] > 0 and p["temp_mb"] >= 0 for p in points)
    assert large_k.cell(large_k.run_point("krum", 5, 16, timeout=0.01)) == "> 0.01 s to compile"

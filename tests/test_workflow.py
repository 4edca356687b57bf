"""Research workflow: CLI commands, sweeps with resume, privacy-utility search, evaluation subsets."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxdfl
from jaxdfl import sweep
from jaxdfl.cli import main
from jaxdfl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class Proc:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args):
    """Run the CLI in-process (the subprocess path is covered by test_config and the quickstart test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return Proc(code, out.getvalue(), err.getvalue())


def test_topology_command_prints_stats_and_plots(tmp_path):
    png = tmp_path / "g.png"
    proc = cli("topology", "random_regular", "--n", "12", "--param", "degree=3", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("spectral_gap", "diameter", "degree_mean", "consensus_rate"):
        assert word in out
    assert png.stat().st_size > 1000
    bad = cli("topology", "random_regular", "--n", "12", "--param", "degree=12")
    assert bad.returncode == 2 and "topology.degree" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args, key", [
    (["--set", "topology.n=1"], "topology.n"),
    (["--set", "train.batch_size=10000", "--set", "privacy.mode=\"example\"",
      "--set", "privacy.noise_multiplier=1.0"], "train.batch_size"),
    (["--set", "topology.kind=\"random_regular\"", "--set", "topology.degree=40"], "topology.degree"),
    (["--set", "aggregation.rule=\"trimmed_mean\"", "--set", "aggregation.f=2"], "aggregation.f"),
    (["--set", "privacy.mode=\"example\"", "--set", "privacy.delta=2.0"], "privacy.delta"),
    (["--set", "attack.byzantine=20"], "attack.byzantine"),
    (["--set", "topology.n=2", "--set", "topology.weights=[[0.5,0.5],[0.5,0.5]]", "--set",
      "topology.node_dropout=0.1"], "topology.weights"),
    (["--set", "aggregation.pre=[\"clip\"]", "--set", "aggregation.clip.self_centered=false"],
     "aggregation.clip.self_centered"),  # clipped whole models to tau (self-centred is the default since 3baf897)
    (["--set", "seeds=[-1]"], "seeds"),  # an OverflowError traceback
    (["--set", "seed=-1"], "seed"),  # silently the run of seed 2^32 - 1
    (["--set", "topology.seed=-1"], "topology.seed"),  # a SeedSequence traceback
    (["--set", "eval_samples=1000000"], "eval_samples"),  # silently cut to the test set
    (["--set", "attack.name=\"mimic\"", "--set", "attack.byzantine=2", "--set", "attack.placement=\"ids\"",
      "--set", "attack.ids=[0,4]", "--set", "attack.target=4"], "attack.target"),
    (["--set", "attack.name=\"mimic\"", "--set", "attack.byzantine=1", "--set", "attack.target=99"],
     "attack.target"),
    (["--set", "data.name=\"mnist\"", "--set", "data.path=\"/nonexistent\""], "data.path"),
])
def test_invalid_configs_exit_2_with_one_line(args, key):
    proc = cli("run", str(ROOT / "configs/quickstart.toml"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["--debug", "run"], ["run", "--debug"]])
def test_debug_shows_the_traceback_before_or_after_the_command(argv, monkeypatch, capsys):
    """The README writes `jaxdfl run CONFIG ... --debug`, which the parser once rejected."""
    monkeypatch.setattr("jaxdfl.cli.compilation_cache", lambda: None)
    bad = [str(ROOT / "configs/quickstart.toml"), "--set", "topology.n=abc"]
    at = argv.index("run") + 1
    with pytest.raises(ConfigError, match="topology.n"):
        main(argv[:at] + bad + argv[at:])
    assert main(["run"] + bad) == 2
    assert "topology.n" in capsys.readouterr().err


def test_run_cli_resume_matches_uninterrupted(tmp_path):
    common = ["--set", "rounds=6", "--set", "eval_every=2", "--set", "checkpoint_every=2", "--set", "topology.n=8",
              "--set", "model.name=\"logreg\"", "--quiet"]
    full = cli("run", str(ROOT / "configs/quickstart.toml"), *common, "--set", "data.alpha=0.1", "--out",
               str(tmp_path / "full"))  # data.alpha has no effect under iid: a note, the same results
    assert full.returncode == 0, full.stderr
    assert "note: data.alpha = 0.1 has no effect" in full.stderr and "Warning" not in full.stderr
    part = tmp_path / "part"
    first = cli("run", str(ROOT / "configs/quickstart.toml"), *common, "--out", str(part))
    assert first.returncode == 0
    ck = sorted((part / "checkpoints").glob("*.npz"))
    ck[-1].unlink()  # as if killed after round 4: the newest good checkpoint is round 4
    (part / "summary.json").unlink()
    (part / "checkpoints" / ".round_000006.npz.q9w8.tmp").write_bytes(b"PK")  # the killed write of round 6
    again = cli("run", "--resume", str(part), "--quiet")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["round_000004.npz", "round_000006.npz"]
    a = json.loads((tmp_path / "full" / "summary.json").read_text())["final"]
    b = json.loads((part / "summary.json").read_text())["final"]
    assert a == b


def test_resume_of_a_run_without_checkpoints_says_so(tmp_path, small_cfg):
    (tmp_path / "config.toml").write_text(small_cfg().to_toml())
    proc = cli("run", "--resume", str(tmp_path))
    assert proc.returncode == 2 and "checkpoint_every = 0" in proc.stderr, proc.stderr
    proc = cli("run", "--resume", str(tmp_path), "--seeds", "3")  # was silently ignored
    assert proc.returncode == 2 and "--seeds" in proc.stderr, proc.stderr


def test_sweep_shares_programs_and_resumes(tmp_path, small_cfg):
    base = small_cfg()
    grid = sweep.parse_grid(["train.lr=0.1,0.3", "topology.kind=ring,complete"])
    assert grid == [("train.lr", [0.1, 0.3]), ("topology.kind", ["ring", "complete"])]
    logs = []
    rows = sweep.run_grid(base, grid, out=tmp_path, log=logs.append)
    assert len(rows) == 4
    with open(tmp_path / "sweep.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["train.lr"] for r in table] == ["0.1", "0.1", "0.3", "0.3"]
    # the two learning rates of one graph share a compiled program: the first setting records its compile time,
    # the second none (it used to repeat the first's, so summing the column doubled the real compile time)
    comp = {(r["topology.kind"], r["train.lr"]): float(r["compile_seconds"]) for r in table}
    for kind in ("ring", "complete"):
        assert comp[(kind, "0.1")] > 0 and comp[(kind, "0.3")] == 0.0
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "accuracy_vs_gap.png").exists()
    # rerun: everything is skipped, nothing recomputed
    logs.clear()
    rows2 = sweep.run_grid(base, grid, out=tmp_path, log=logs.append)
    assert all("skipped" in line for line in logs) and len(rows2) == 4
    # settings were keyed by position and grid values: a grown grid overwrote folders, a changed base was skipped
    logs.clear()
    sweep.run_grid(base, sweep.parse_grid(["train.lr=0.05,0.1,0.3", "topology.kind=ring,complete"]), out=tmp_path,
                   log=logs.append)
    assert sum("skipped" not in line for line in logs) == 2  # only lr = 0.05 runs
    logs.clear()
    sweep.run_grid(base.replace({"rounds": 4}), grid, out=tmp_path, log=logs.append)
    assert not any("skipped" in line for line in logs)
    with open(tmp_path / "sweep.csv", newline="") as fh:  # only this grid's rows, not the earlier base's
        assert {r["config"] for r in csv.DictReader(fh)} == {sweep.config_id(c) for _, c in
                                                             sweep.expand(base.replace({"rounds": 4}), grid)}
    for overrides, cfg in sweep.expand(base, grid):
        folder = tmp_path / "settings" / sweep.config_id(cfg)
        assert jaxdfl.load_config(str(folder / "config.toml")) == cfg
        assert json.loads((folder / "summary.json").read_text())["setting"] == sweep.setting_id(overrides)
    # a single run of one setting matches its sweep row
    single = jaxdfl.run(base.replace({"train.lr": 0.3, "topology.kind": "complete"}))
    row = next(r for r in table if r["train.lr"] == "0.3" and r["topology.kind"] == "complete")
    assert float(row["accuracy_mean"]) == pytest.approx(single.summary["final"]["accuracy_mean"], abs=1e-6)


def test_grid_values_with_lists():
    assert sweep.parse_grid(["model.hidden=[32,16],[8]"]) == [("model.hidden", [[32, 16], [8]])]
    with pytest.raises(ConfigError):
        sweep.parse_grid(["train.lr"])


def test_none_unsets_a_setting_whose_default_is_unset_and_stays_a_word_elsewhere():
    """TOML has no null: `--grid attack.z=none,2.0` (ALIE's z_max against a fixed z) was refused."""
    assert sweep.parse_grid(["attack.z=none,2.0"]) == [("attack.z", [None, 2.0])]
    again = jaxdfl.load_config(str(ROOT / "configs/quickstart.toml"),
                               ["privacy.mode=update", "privacy.noise_multiplier=null", "privacy.target_epsilon=8"])
    assert again.privacy.noise_multiplier is None and again.privacy.target_epsilon == 8
    assert sweep.parse_grid(["attack.name=none,alie"]) == [("attack.name", ["none", "alie"])]


def test_a_python_grid_of_numpy_values_gives_the_settings_of_the_lists_toml_gives():
    """Regression: a setting's id hashed the raw values, and json refused np.int64."""
    base = jaxdfl.make_config({"topology": {"n": 8}})
    settings = sweep.expand(base, [("topology.n", np.arange(8, 17, 8)), ("train.lr", np.array([0.5, 0.25]))])
    plain = sweep.expand(base, [("topology.n", [8, 16]), ("train.lr", [0.5, 0.25])])
    assert [o for o, _ in settings] == [o for o, _ in plain]
    assert [sweep.setting_id(o) for o, _ in settings] == [sweep.setting_id(o) for o, _ in plain]


@pytest.mark.parametrize("items, message", [
    (["train.lr=0.1", "train.lr=0.2"], "given twice"),  # the second --grid silently replaced the first
    (["train.lr=0.1,0.2,0.1"], "more than once"),
])
def test_grid_repeats_are_errors(items, message):
    with pytest.raises(ConfigError, match=message):
        sweep.parse_grid(items)


@pytest.mark.parametrize("grid, message", [
    ([("train.lr", [0.1]), ("train.lr", [0.2])], "given twice"),  # the 0.1 setting was dropped
    ([("train.lr", [0.1, 0.2, 0.1])], "more than once"),
    ([("train.lr", [])], "give at least one value"),  # run_grid ran nothing and wrote an empty plot
    ([("train.optimizer", "adam")], r"the values must be a list, e.g. \['adam'\]"),  # read letter by letter
    ([("train.lr", 0.1)], "the values must be a list"),  # TypeError
    ("train.lr", "grid must be a list of"),
])
def test_a_python_grid_is_checked_as_the_command_line_one(grid, message):
    with pytest.raises(ConfigError, match=message):
        sweep.expand(jaxdfl.make_config({"topology": {"n": 8}}), grid)


def test_a_python_grid_may_be_a_mapping():
    base = jaxdfl.make_config({"topology": {"n": 8}})
    settings = sweep.expand(base, {"train.lr": [0.5, 0.25], "topology.n": [8]})
    assert [o for o, _ in settings] == [{"train.lr": 0.5, "topology.n": 8}, {"train.lr": 0.25, "topology.n": 8}]


def test_privacy_utility_bisection_uses_monotonicity(small_cfg, monkeypatch):
    study = sweep.PrivacyUtility(small_cfg(**{"privacy.mode": "update", "train.share": "update"}))
    calls = []

    def fake(eps):  # accuracy rises with epsilon; 0.8 reached at epsilon 3
        calls.append(eps)
        return float(np.clip(0.5 + 0.1 * eps, 0, 1))

    monkeypatch.setattr(study, "accuracy", fake)
    best = study.smallest_epsilon(0.8, lo=0.1, hi=64, rel_tol=0.01)
    assert 3.0 <= best <= 3.0 * 1.01
    assert len(calls) < 16  # bisection, not a grid


def test_privacy_utility_curve_end_to_end(small_cfg, tmp_path, monkeypatch):
    from jaxdfl import experiment

    base = small_cfg(**{"privacy.mode": "update", "train.share": "update", "privacy.clip_norm": 0.5})
    (tmp_path / ".privacy_utility.csv.k2j3.tmp").write_text("a killed write")
    study = sweep.PrivacyUtility(base, out=tmp_path)
    pts = study.curve([0.5, 50.0])
    assert pts[0][0] == 0.5 and 0.0 <= pts[0][1] <= 1.0
    assert pts[1][1] >= pts[0][1]  # more budget, less noise
    study.plot(tmp_path / "pu.png", 0.5)
    assert (tmp_path / "pu.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy_utility.csv", "pu.png"]
    # started again (as after a crash midway): the targets on disk are read back, not run
    monkeypatch.setattr(experiment, "runner_for", lambda exp, runners: pytest.fail("ran a finished target again"))
    again = sweep.PrivacyUtility(base, out=tmp_path)
    assert again.curve([50.0, 0.5]) == pts[::-1]
    with open(tmp_path / "privacy_utility.csv", newline="") as fh:
        assert [float(r["epsilon"]) for r in csv.DictReader(fh)] == [0.5, 50.0]
    written = (tmp_path / "privacy_utility.csv").read_text()
    # another config's targets are not this study's; its file stays until this study has a result (a config error
    # in a new study's targets must not cost the earlier study its results)
    other = sweep.PrivacyUtility(base.replace({"train.lr": 0.05}), out=tmp_path)
    assert other.cache == {} and (tmp_path / "privacy_utility.csv").read_text() == written
    with pytest.raises(ConfigError, match="privacy.mode"):
        sweep.PrivacyUtility(small_cfg())


def test_eval_subset_and_peak_bytes(small_cfg):
    r = jaxdfl.run(small_cfg(eval_nodes=3, eval_samples=50))
    assert r.history["accuracy_mean"].shape == (3,)
    assert [a is not None for a in r.summary["accuracy_per_node"]] == [True] * 3 + [False] * 5
    assert r.summary["peak_bytes_estimate"] > 8 * 650 * 4
    with pytest.raises(ConfigError, match="eval_nodes"):
        jaxdfl.build(small_cfg(eval_nodes=100))


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_progress_reports_rounds_after_each_segment_whatever_the_seed_layout(small_cfg, mode):
    """The host calls progress(done, rounds) after each segment; the bar ends at rounds, with one final newline."""
    from jaxdfl.cli import ProgressBar

    calls, stream = [], io.StringIO()
    bar = ProgressBar(stream=stream, live=True)
    cfg = small_cfg(seeds=2, rounds=6, eval_every=2, **{"parallel.seed_mode": mode})
    jaxdfl.run(cfg, progress=lambda done, total: (calls.append((done, total)), bar(done, total)))
    assert calls == [(2, 6), (4, 6), (6, 6)]
    assert stream.getvalue().count("\n") == 1 and "6/6 rounds" in stream.getvalue()


@pytest.mark.parametrize("rounds,every,checkpoint,segments", [(100, 10, 0, 10), (200, 10, 0, 10), (70, 10, 0, 7),
                                                               (130, 10, 0, 1), (100, 10, 50, 2),
                                                               (100, 10, 30, 10)])
def test_segments_are_at_most_ten_or_one_per_checkpoint(small_cfg, rounds, every, checkpoint, segments):
    from jaxdfl.experiment import segment_chunks

    cfg = small_cfg(rounds=rounds, eval_every=every, checkpoint_every=checkpoint)
    assert rounds // every // segment_chunks(cfg) == segments


def test_progress_bar_writes_at_most_eleven_plain_lines_when_not_on_a_terminal():
    from jaxdfl.cli import ProgressBar

    stream = io.StringIO()  # not a terminal: a log file
    bar = ProgressBar(stream=stream)
    for done in range(3, 101, 3):  # a run resumed at round 3, reporting every 3 rounds
        bar(done, 100)
    bar(100, 100)  # reported twice: written once
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and stream.getvalue().endswith("\n")
    assert len(lines) == 11 and lines[0].split()[1] == "3/100" and lines[-1].split()[1] == "100/100"


def test_cli_keeps_compiled_programs_in_its_cache_folder_unless_jax_is_told_otherwise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    run = [sys.executable, "-m", "jaxdfl.cli", "run", str(ROOT / "configs/quickstart.toml"), "--quiet",
           "--set", "topology.n=4", "--set", "rounds=2", "--set", "eval_every=2", "--set", 'model.name="logreg"']
    on = subprocess.run(run, env={**env, "XDG_CACHE_HOME": str(tmp_path / "on")}, capture_output=True, text=True)
    assert on.returncode == 0, on.stderr
    assert list((tmp_path / "on/jaxdfl/xla").glob("jit_segment-*"))
    ask = [sys.executable, "-c", "from jaxdfl import cli; import jax; print(cli.compilation_cache(), "
           "jax.config.jax_compilation_cache_max_size)"]
    bounded = subprocess.run(ask, env={**env, "XDG_CACHE_HOME": str(tmp_path / "on")}, capture_output=True,
                             text=True)
    assert bounded.stdout.split() == [str(tmp_path / "on/jaxdfl/xla"), str(1 << 30)], bounded.stderr
    off = subprocess.run(ask, env={**env, "XDG_CACHE_HOME": str(tmp_path / "off"),
                                   "JAX_ENABLE_COMPILATION_CACHE": "false"}, capture_output=True, text=True)
    assert off.returncode == 0 and off.stdout.split()[0] == "None", off.stderr
    assert not (tmp_path / "off").exists()


def test_result_files_name_seeds_by_value(tmp_path):
    """metrics.csv's seed column and consensus.csv's header held positions 0, 1, while sweep.csv held the seeds."""
    proc = cli("run", str(ROOT / "configs/quickstart.toml"), "--set", "seed=5", "--seeds", "2", "--set", "rounds=4",
               "--set", "eval_every=2", "--set", "topology.n=4", "--set", "model.name=\"logreg\"", "--quiet",
               "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "metrics.csv", newline="") as fh:
        assert {r["seed"] for r in csv.DictReader(fh)} == {"5", "6"}
    assert (tmp_path / "consensus.csv").read_text().splitlines()[0] == "round,seed5,seed6"


def test_checkpoints_past_round_999999_are_ordered_by_round(tmp_path):
    """Names sorted as text put round_1000000 before round_999999: the newest was deleted, latest() was older."""
    from jaxdfl import checkpoint

    tree = {"w": np.arange(3, dtype=np.float32)}
    (tmp_path / "round_000040.npz").write_bytes(b"")  # a name of the old six-digit width is read as round 40
    for r in (999_998, 999_999, 1_000_000, 1_000_001):
        checkpoint.save(tmp_path, r, tree, {})
        assert checkpoint.latest(tmp_path).name == f"round_{r:06d}.npz"
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["round_1000000.npz", "round_1000001.npz"]
    restored, meta, _ = checkpoint.load(checkpoint.latest(tmp_path), tree)
    assert meta["round"] == 1_000_001 and np.array_equal(restored["w"], tree["w"])
    (tmp_path / "round_notes.npz").write_bytes(b"")  # not a checkpoint name: left alone
    checkpoint.clear(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["round_notes.npz"]


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if the CLI builds or compiles an experiment (the checks under test come first)."""
    from jaxdfl import experiment

    def boom(*args, **kwargs):
        raise AssertionError("built or compiled before the command line was checked")

    monkeypatch.setattr(experiment, "build", boom)
    monkeypatch.setattr(experiment, "Runner", boom)


@pytest.mark.parametrize("args, flag", [
    (["--epsilons", "a,b"], "--epsilons"),  # a ValueError traceback
    (["--epsilons", "1,,2"], "--epsilons"),
    (["--epsilons", "1,inf"], "--epsilons"),
    (["--epsilons", "0,1"], "--epsilons"),
    (["--epsilons", "-2"], "--epsilons"),
    (["--target-accuracy", "0.5", "--lo", "10", "--hi", "1"], "--lo"),  # silently reported 10
    (["--target-accuracy", "0.5", "--lo", "0"], "--lo"),
    (["--target-accuracy", "90"], "--target-accuracy"),  # ran, and could never be reached
    (["--target-accuracy", "0"], "--target-accuracy"),
    ([], "--epsilons"),  # wrote a header-only CSV and exited 0
])
def test_privacy_command_line_errors_exit_2_before_building(args, flag, no_compile, tmp_path):
    proc = cli("privacy", str(ROOT / "configs/digits_dp.toml"), *args, "--out", str(tmp_path / "pu"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "pu").exists()


def test_a_fresh_run_removes_the_earlier_runs_files_before_it_writes(tmp_path, monkeypatch):
    """A run stopped midway left its config.toml beside the earlier run's metrics, summary, nodes and plots."""
    from jaxdfl import experiment

    earlier = ["config.toml", "metrics.csv", "consensus.csv", "nodes.csv", "summary.json", "accuracy.png",
               "consensus.png"]
    for name in earlier:
        (tmp_path / name).write_text("earlier run")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "round_000010.npz").write_text("earlier run")
    (tmp_path / "checkpoints" / ".round_000020.npz.x1y2.tmp").write_text("a killed checkpoint write")
    (tmp_path / ".metrics.csv.k3j2.tmp").write_text("a killed write")
    (tmp_path / "notes.txt").write_text("mine")
    quick = str(ROOT / "configs/quickstart.toml")
    bad = cli("run", quick, "--set", "eval_samples=1000000", "--out", str(tmp_path))  # fails in build
    assert bad.returncode == 2 and "eval_samples" in bad.stderr, bad.stderr
    assert all((tmp_path / name).read_text() == "earlier run" for name in earlier)  # the folder is untouched
    with monkeypatch.context() as m:  # Ctrl-C while building: the folder still holds the earlier run
        m.setattr(experiment, "build", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
        proc = cli("run", quick, "--out", str(tmp_path))
        assert proc.returncode == 130 and proc.stderr == "jaxdfl: interrupted\n"  # no --resume of another run

    def stopped(exp):
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "notes.txt"]
        raise KeyboardInterrupt  # Ctrl-C while compiling

    monkeypatch.setattr(experiment, "Runner", stopped)
    proc = cli("run", quick, "--set", "model.hidden=[32]", "--out", str(tmp_path))
    assert proc.returncode == 130 and proc.stderr == "jaxdfl: interrupted\n"  # no checkpoint yet to resume from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "notes.txt"]
    assert jaxdfl.load_config(str(tmp_path / "config.toml")).model.hidden == (32,)


def test_a_sweep_leaves_no_file_of_an_earlier_grid_at_the_top_of_its_folder(tmp_path, small_cfg, monkeypatch):
    """Stopped midway (or with a graph that does not vary), a sweep showed the earlier grid's plots and rows."""
    from jaxdfl import experiment

    earlier = tmp_path / "settings" / "0123456789ab"
    earlier.mkdir(parents=True)
    (earlier / "metrics.csv").write_text("round\n")
    (tmp_path / "sweep.csv").write_text("setting,config,accuracy_mean\nbase,0123456789ab,0.5\n")
    for name in ("accuracy.png", "accuracy_vs_gap.png", "notes.txt", ".sweep.csv.a1b2.tmp",
                 "settings/0123456789ab/.summary.json.c3d4.tmp"):  # the last two: writes killed midway
        (tmp_path / name).write_text("earlier grid")

    def stopped(exp, runners):
        raise KeyboardInterrupt  # Ctrl-C while the first setting compiles

    monkeypatch.setattr(experiment, "runner_for", stopped)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_grid(small_cfg(), sweep.parse_grid(["train.lr=0.1,0.2"]), out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "settings"]
    assert (earlier / "metrics.csv").exists()  # an earlier setting's results stay (a later grid may reuse them)
    assert not (earlier / ".summary.json.c3d4.tmp").exists()


@pytest.fixture
def no_runner(monkeypatch):
    """Fail the test if the CLI compiles an experiment (building one on the host is allowed)."""
    from jaxdfl import experiment

    def boom(*args, **kwargs):
        raise AssertionError("compiled before every setting was checked")

    monkeypatch.setattr(experiment, "Runner", boom)


def test_a_sweep_reports_any_settings_config_error_before_compiling(tmp_path, no_runner):
    """krum f=1 on n=8 fails the rule-size check on the ring: it was reported after the complete graph ran."""
    proc = cli("sweep", str(ROOT / "configs/quickstart.toml"), "--set", "topology.n=8", "--set",
               "aggregation.rule=\"krum\"", "--set", "aggregation.f=1", "--grid", "topology.kind=complete,ring",
               "--out", str(tmp_path / "sw"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ring" in lines[0] and "aggregation.f" in lines[0], proc.stderr
    assert not (tmp_path / "sw").exists()


def test_privacy_reports_any_targets_config_error_before_compiling(monkeypatch):
    """A target epsilon whose build failed was reported after the targets before it ran."""
    from jaxdfl import experiment

    def build_failing_at_half(cfg):  # a target whose build fails (e.g. an epsilon no noise level reaches)
        if cfg.privacy.target_epsilon == 0.5:
            raise ConfigError("privacy.target_epsilon = 0.5 is unreachable")
        return cfg  # the host-side build of the other targets is not under test (z's calibration takes seconds)

    def boom(*args, **kwargs):
        raise AssertionError("compiled before every target was checked")

    monkeypatch.setattr(experiment, "build", build_failing_at_half)
    monkeypatch.setattr(experiment, "runner_for", boom)
    for args in (["--epsilons", "8,0.5"], ["--target-accuracy", "0.5", "--lo", "0.5", "--hi", "8"]):
        proc = cli("privacy", str(ROOT / "configs/digits_dp.toml"), *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "epsilon 0.5" in lines[0], proc.stderr


@pytest.mark.parametrize("command", [
    ["run", "configs/quickstart.toml"],
    ["sweep", "configs/quickstart.toml", "--grid", "train.lr=0.1,0.2"],  # NotADirectoryError after one setting
    ["privacy", "configs/digits_dp.toml", "--epsilons", "1,8"],
])
@pytest.mark.parametrize("below", [False, True])
def test_an_out_that_is_a_file_is_an_error_before_building(tmp_path, no_compile, command, below):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" / "sub" if below else tmp_path / "taken"
    proc = cli(command[0], str(ROOT / command[1]), *command[2:], "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def _bad_resume_folder(tmp_path, small_cfg):
    folder = tmp_path / "cut"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.toml").write_text(small_cfg(checkpoint_every=2).to_toml())
    (folder / "checkpoints" / "round_000002.npz").write_bytes(b"PK\x03\x04 truncated")
    return str(folder)


@pytest.mark.parametrize("case, args, message", [
    ("folder as config", lambda t, c: ["run", str(t)], "cannot be read: Is a directory"),
    ("binary config", lambda t, c: ["run", str(t / "bin.toml")], "not UTF-8 text"),
    ("empty --out", lambda t, c: ["run", str(ROOT / "configs/quickstart.toml"), "--out", ""],
     "--out: the path is empty"),
    ("empty --resume", lambda t, c: ["run", "--resume", ""], "--resume: the path is empty"),
    ("empty sweep --out", lambda t, c: ["sweep", str(ROOT / "configs/quickstart.toml"), "--grid", "train.lr=0.1",
                                        "--out", ""], "--out: the path is empty"),
    ("partition plot is a folder", lambda t, c: ["partition", str(ROOT / "configs/quickstart.toml"), "--plot", str(t)],
     "--plot {t}: is a folder"),
    ("partition json under a file", lambda t, c: ["partition", str(ROOT / "configs/quickstart.toml"), "--json",
                                                  str(t / "bin.toml" / "r.json")], "is a file"),
    ("topology plot is a folder", lambda t, c: ["topology", "ring", "--n", "8", "--plot", str(t)],
     "--plot {t}: is a folder"),
    ("damaged checkpoint", lambda t, c: ["run", "--resume", _bad_resume_folder(t, c)], "cannot be read (BadZipFile"),
])
def test_command_errors_are_one_line_before_the_work(tmp_path, small_cfg, monkeypatch, case, args, message):
    """Regression (files audit): these gave tracebacks (IsADirectoryError, UnicodeDecodeError, BadZipFile), ran
    the whole partition before failing to write its plot, or took an empty --out as no --out (nothing written)."""
    from jaxdfl import data, topology

    monkeypatch.chdir(tmp_path)  # an empty --out taken as "." writes here, not into the checkout

    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[topology]")
    argv = args(tmp_path, small_cfg)
    if argv[0] in ("partition", "topology"):
        for module, name in ((data, "partition"), (topology, "describe")):  # the work the checks must come before
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("did the work before checking its output"))
    proc = cli(*argv)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(t=tmp_path) in lines[0], proc.stderr


def test_a_file_that_cannot_be_written_is_a_one_line_error(tmp_path, monkeypatch):
    from jaxdfl import topology

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "g.png"))

    monkeypatch.setattr(topology, "plot", denied)
    proc = cli("topology", "ring", "--n", "8", "--plot", str(tmp_path / "g.png"))
    assert proc.returncode == 1 and proc.stderr == f"jaxdfl: error: Permission denied: {tmp_path / 'g.png'}\n"


def test_ctrl_c_ends_the_command_with_one_line_and_exit_130(tmp_path):
    """A real SIGINT while the program compiles or runs: one line naming how to continue, status 130 (it printed a
    30-line traceback, and sometimes crashed in XLA's teardown with a compilation in flight)."""
    import signal

    out = tmp_path / "run"
    # SIGINT as a terminal delivers it: a suite started in the background of a non-interactive shell inherits it
    # ignored, and Python then leaves it ignored in the child (the command ran on, once, 60 s after its SIGINT).
    # A small launcher resets it and execs the command (no preexec_fn: forking a threaded JAX process can deadlock).
    launch = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
              "os.execv(sys.executable, [sys.executable, '-m', 'jaxdfl.cli'] + sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", launch, "run", str(ROOT / "configs/quickstart.toml"),
                             "--set", "rounds=1000000", "--set", "checkpoint_every=5", "--set", "eval_every=5",
                             "--set", "topology.n=8", "--set", "model.name=\"logreg\"",
                             "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not any((out / "checkpoints").glob("round_*.npz")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never leave a million-round run behind
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f"jaxdfl: interrupted; continue with: jaxdfl run --resume {out}", err
    assert "Traceback" not in err

"""Seeds, dynamic hyper-parameters without recompilation, node-axis sharding, checkpoint and resume."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdfl import checkpoint, experiment, simulation
from jaxdfl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_new_dynamic_values_do_not_recompile(small_cfg):
    exp = experiment.build(small_cfg(**{"train.momentum": 0.1}))
    traces = []

    def program(key, hyper, arrays):
        traces.append(1)
        return simulation.make_program(exp.spec)(key, hyper, arrays)

    fn = jax.jit(program)
    h1, _ = fn(jax.random.key(0), exp.hyper, exp.arrays)
    hyper2 = dict(exp.hyper, lr=exp.hyper["lr"] * 0.5, momentum=exp.hyper["momentum"] + 0.5)
    h2, _ = fn(jax.random.key(0), hyper2, exp.arrays)
    assert len(traces) == 1
    assert not np.allclose(h1["consensus_distance"], h2["consensus_distance"])


def test_plain_sgd_keeps_no_momentum_buffer_and_momentum_compiles_once(small_cfg):
    """momentum = 0 still carried an [N, D] momentum buffer (optax's trace with a traced 0), which a NaN never left."""
    sizes = {}
    for m in (0.0, 0.9):
        exp = experiment.build(small_cfg(**{"train.momentum": m}))
        state = simulation.init_state(exp.spec, jax.random.key(0), exp.hyper)
        sizes[m] = sum(leaf.size for leaf in jax.tree.leaves(state.opt_state))
    n, d = state.theta.shape
    assert sizes[0.0] < n * d <= sizes[0.9] - sizes[0.0]
    assert not experiment.same_program(small_cfg(), small_cfg(**{"train.momentum": 0.9}))
    assert experiment.same_program(small_cfg(**{"train.momentum": 0.5}), small_cfg(**{"train.momentum": 0.9}))


def test_checkpoint_resume_equals_uninterrupted(small_cfg, tmp_path):
    cfg = small_cfg(checkpoint_every=2)
    full = experiment.run(cfg, checkpoint_dir=str(tmp_path / "a"))
    # interrupted after the first segment: keep only the round-2 checkpoint, then resume
    partial = tmp_path / "b"
    experiment.run(cfg.replace({"rounds": 2, "eval_every": 2, "checkpoint_every": 2}), checkpoint_dir=str(partial))
    resumed = experiment.run(cfg, checkpoint_dir=str(partial), resume=True)
    for k in full.history:
        np.testing.assert_array_equal(full.history[k], resumed.history[k])
    np.testing.assert_array_equal(full.state.theta, resumed.state.theta)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.npz")) == ["round_000004.npz", "round_000006.npz"]


def test_segmented_run_equals_single_program(small_cfg, tmp_path):
    a = experiment.run(small_cfg())
    b = experiment.run(small_cfg(checkpoint_every=2), checkpoint_dir=str(tmp_path))
    for k in a.history:
        np.testing.assert_allclose(a.history[k], b.history[k], rtol=1e-6, atol=1e-7)


def test_checkpoint_every_that_does_not_divide_rounds_stops_at_rounds(small_cfg, tmp_path):
    """rounds = 6, checkpoint_every = 4 once ran a second 4-round segment, to round 8."""
    a = experiment.run(small_cfg())
    b = experiment.run(small_cfg(checkpoint_every=4), checkpoint_dir=str(tmp_path))
    np.testing.assert_array_equal(b.history["round"], [2, 4, 6])
    np.testing.assert_allclose(a.history["accuracy_mean"], b.history["accuracy_mean"], rtol=1e-6)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["round_000004.npz", "round_000006.npz"]


def test_resume_of_a_checkpoint_without_current_metrics_is_an_error(small_cfg, tmp_path):
    """Checkpoints written before `accuracy_per_node` existed ended in a KeyError after the whole resumed run."""
    cfg = small_cfg(rounds=2, eval_every=2, checkpoint_every=2)
    experiment.run(cfg, checkpoint_dir=str(tmp_path))
    path = checkpoint.latest(tmp_path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != "history/accuracy_per_node"}
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match="lacks the metrics accuracy_per_node"):
        experiment.run(cfg.replace({"rounds": 4}), checkpoint_dir=str(tmp_path), resume=True)


def test_checkpoints_of_another_run_are_never_resumed(small_cfg, tmp_path):
    """A second run into the same folder kept the first run's checkpoints (and pruned its own by name); a resume
    then returned the first run's results under the second run's config."""
    cfg = small_cfg(checkpoint_every=2)
    experiment.run(cfg, checkpoint_dir=str(tmp_path))
    short = cfg.replace({"rounds": 2, "eval_every": 2, "train.lr": 0.5})
    experiment.run(short, checkpoint_dir=str(tmp_path))
    assert [p.name for p in tmp_path.glob("*.npz")] == ["round_000002.npz"]  # only this run's checkpoint
    with pytest.raises(ConfigError, match="another config.*train.lr"):
        experiment.run(cfg, checkpoint_dir=str(tmp_path), resume=True)


def test_a_checkpoint_resumes_with_another_device_count_or_seed_layout(small_cfg, tmp_path):
    """An explicit parallel.devices tied a checkpoint to the machine size it was written on."""
    cfg = small_cfg(checkpoint_every=2, seeds=2, **{"parallel.devices": 1, "parallel.seed_mode": "map"})
    full = experiment.run(cfg)
    experiment.run(cfg.replace({"rounds": 2, "eval_every": 2}), checkpoint_dir=str(tmp_path))
    other = cfg.replace({"parallel.devices": "auto", "parallel.seed_mode": "vmap"})
    resumed = experiment.run(other, checkpoint_dir=str(tmp_path), resume=True)
    for k in full.history:
        np.testing.assert_allclose(full.history[k], resumed.history[k], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_written_before_a_setting_existed_resumes_at_its_default(small_cfg, tmp_path):
    """A checkpoint without train.order (written before it existed) was refused as "differs in train.order"."""
    cfg = small_cfg(checkpoint_every=2)
    experiment.run(cfg.replace({"rounds": 2, "eval_every": 2}), checkpoint_dir=str(tmp_path))
    path = checkpoint.latest(tmp_path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(arrays["meta"].tobytes())
    del meta["config"]["train"]["order"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    resumed = experiment.run(cfg, checkpoint_dir=str(tmp_path), resume=True)
    np.testing.assert_array_equal(resumed.history["round"], [2, 4, 6])
    with pytest.raises(ConfigError, match="differs in train.order"):
        experiment.run(cfg.replace({"train.order": "cta"}), checkpoint_dir=str(tmp_path), resume=True)


def test_a_run_is_extended_only_from_a_segment_boundary(small_cfg, tmp_path):
    """Extending rounds 6 -> 8 with 4-round segments resumed at round 6 and ran to 10, past rounds."""
    experiment.run(small_cfg(checkpoint_every=4), checkpoint_dir=str(tmp_path))  # checkpoints at 4 and 6
    with pytest.raises(ConfigError, match="another config .differs in rounds"):
        experiment.run(small_cfg(rounds=8, checkpoint_every=4), checkpoint_dir=str(tmp_path), resume=True)
    longer = experiment.run(small_cfg(rounds=10, checkpoint_every=4), checkpoint_dir=str(tmp_path), resume=True)
    np.testing.assert_array_equal(longer.history["round"], [2, 4, 6, 8, 10])
    fresh = experiment.run(small_cfg(rounds=10, checkpoint_every=4))
    np.testing.assert_array_equal(longer.history["accuracy_mean"], fresh.history["accuracy_mean"])


def test_resume_without_checkpoint_is_an_error(small_cfg, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint"):
        experiment.run(small_cfg(), checkpoint_dir=str(tmp_path), resume=True)


def test_devices_must_divide_n(small_cfg):
    with pytest.raises(ConfigError, match="parallel.devices"):
        experiment.build(small_cfg(**{"parallel.devices": 64}))


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jaxdfl import experiment
    from jaxdfl.config import make_config
    assert jax.device_count() == 4
    out = {}
    for rule, gossip in (("mean", "dense"), ("mean", "sparse"), ("median", "auto")):
        base = {"rounds": 4, "eval_every": 2, "topology": {"kind": "ring", "n": 8}, "model": {"name": "logreg"},
                "train": {"batch_size": 8}, "aggregation": {"rule": rule, "gossip": gossip}}
        one = experiment.run(make_config(base, {"parallel.devices": 1}))
        four = experiment.build(make_config(base, {"parallel.devices": 4}))
        many = experiment.run(make_config(base, {"parallel.devices": 4}))
        out[rule + gossip] = [float(np.max(np.abs(one.history[k] - many.history[k])))
                              for k in ("accuracy_mean", "consensus_distance")]
        out[rule + gossip].append(four.devices)
    # the robust exchange in chunks of 3 receivers (at nodes 0, 3, 5: the last overlaps) on the sharded node axis
    attacked = dict(base, aggregation={"rule": "trimmed_mean", "f": 1}, attack={"name": "alie", "byzantine": 2})
    one = experiment.run(make_config(attacked, {"parallel.devices": 1}))
    chunked = make_config(attacked, {"parallel.devices": 4, "parallel.chunk_size": 3})
    many, four = experiment.run(chunked), experiment.build(chunked)
    assert four.spec.chunk_size == 3 and four.spec.exchange == "robust"
    out["chunked"] = [float(np.max(np.abs(one.history[k] - many.history[k])))
                      for k in ("accuracy_mean", "consensus_distance")] + [four.devices]
    # two seeds in one program on the sharded node axis (the node axis is axis 1 of the state), either layout
    one = experiment.run(make_config(base, {"parallel.devices": 1, "seed": 1}))
    for mode in ("vmap", "map"):
        seeded = make_config(base, {"parallel.devices": 4, "seeds": [0, 1], "parallel.seed_mode": mode})
        many = experiment.run(seeded)
        out["seeds" + mode] = [float(np.max(np.abs(one.history[k] - many.history[k][1])))
                               for k in ("accuracy_mean", "consensus_distance")] + [experiment.build(seeded).devices]
    try:
        experiment.build(make_config(dict(base, topology={"kind": "ring", "n": 6}), {"parallel.devices": 4}))
        out["error"] = None
    except Exception as exc:
        out["error"] = str(exc)
    print(json.dumps(out))
""")


def test_sharded_equals_single_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("meandense", "meansparse", "medianauto", "chunked", "seedsvmap", "seedsmap"):
        acc_err, cons_err, devices = out[key]
        assert devices == 4
        assert acc_err <= 1e-6 and cons_err <= 1e-4 * 1.0
    assert "parallel.devices" in out["error"]


MULTIHOST = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from jaxdfl import experiment
    from jaxdfl.config import make_config
    base = {"rounds": 4, "eval_every": 2, "checkpoint_every": 2, "topology": {"kind": "ring", "n": 8},
            "model": {"name": "logreg"}, "train": {"batch_size": 8}}
    r = experiment.run(make_config(base), checkpoint_dir=sys.argv[3])
    print(json.dumps([jax.device_count(), r.summary["devices"], r.history["accuracy_per_node"].tolist()]))
""")


def test_a_multi_host_run_gathers_its_node_sharded_metrics_and_checkpoints(tmp_path):
    """Two processes with two CPU devices each: per-node metrics and checkpoints span both processes' devices."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST, address, str(i), str(tmp_path / f"ck{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    (g0, d0, acc0), (g1, d1, acc1) = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert g0 == g1 == 4 and d0 == d1 == 4
    assert acc0 == acc1 and len(acc0) == 2 and len(acc0[0]) == 8
    assert (tmp_path / "ck0" / "round_000004.npz").exists() and (tmp_path / "ck1" / "round_000004.npz").exists()


def test_program_size_does_not_grow_with_rounds_or_seeds(small_cfg):
    """Rounds live in lax.scan and seeds in vmap or lax.map: the program text barely changes with either."""

    def hlo_ops(cfg):
        exp = experiment.build(cfg)
        program = experiment._over_seeds(exp, simulation.make_program(exp.spec), (0, None, None))
        text = jax.jit(program).lower(experiment._seed_keys(exp), exp.hyper, exp.arrays).as_text()
        return sum(1 for line in text.splitlines() if "=" in line)

    short = hlo_ops(small_cfg(rounds=4, eval_every=2))
    long = hlo_ops(small_cfg(rounds=400, eval_every=2))
    assert abs(long - short) <= 0.01 * short  # a 100x longer run: same program up to a few constants
    for mode in ("vmap", "map"):
        two = hlo_ops(small_cfg(rounds=4, eval_every=2, seeds=2, **{"parallel.seed_mode": mode}))
        eight = hlo_ops(small_cfg(rounds=4, eval_every=2, seeds=8, **{"parallel.seed_mode": mode}))
        assert abs(eight - two) <= 0.01 * two and eight < 1.2 * short, mode

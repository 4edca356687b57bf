"""The scale benchmark suite: node-rounds per second vs N, graphs x rules x DP, overheads, seeds, one command.

Workload: FedProx Synthetic(1, 1) with 80 samples per node (so any N has data), MLP[64] (4,554 parameters),
batch 16, 2 local steps. Timings exclude compilation (a jitted scan of rounds, median of repeats).

Sections:
- scaling: ring, rules mean/median, N = 16 ... --max-n (4096 on CPU), plus DP-SGD (example mode) for mean;
  time per round vs N on a log-log plot with the linear reference;
- graphs: ring, torus, random regular (degree 4) x mean, median, krum, clipped_gossip at N = --graph-n;
- baseline: the per-node Python loop (one jitted node step per node, Python gossip) for small N (mean, median);
- overhead: full round / local training alone (the irreducible work) per rule at N = --graph-n;
- seeds: 8 seeds in one vmapped program vs 8 x one seed.

    python benchmarks/suite.py [--max-n 4096] [--graph-n 256] [--out benchmarks/results]
Writes suite.json and suite.png under --out and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, timeit  # noqa: E402
from rounds import engine_round_seconds, loop_round_seconds  # noqa: E402

from jaxdfl import experiment, simulation  # noqa: E402
from jaxdfl.config import make_config  # noqa: E402
from jaxdfl.errors import ConfigError  # noqa: E402
from jaxdfl.results import atomic_write, save_figure  # noqa: E402
from jaxdfl.training import local_train  # noqa: E402

BASE = {
    "rounds": 10, "eval_every": 10,
    "data": {"name": "synthetic", "synthetic_samples": 80},
    "model": {"name": "mlp", "hidden": [64]},
    "train": {"lr": 0.05, "batch_size": 16, "local_steps": 2},
}
GRAPHS = {"ring": {"kind": "ring"}, "torus": {"kind": "torus"}, "random_regular": {"kind": "random_regular",
                                                                                    "degree": 4}}
RULES = {"mean": {}, "median": {}, "krum": {"f": 1}, "clipped_gossip": {"adaptive": True}}


def config(n: int, graph: str = "ring", rule: str = "mean", dp: bool = False, **extra):
    tree = json.loads(json.dumps(BASE))
    tree["topology"] = {"n": n, **GRAPHS[graph]}
    tree["aggregation"] = {"rule": rule, **RULES[rule]}
    if dp:
        tree["privacy"] = {"mode": "example", "noise_multiplier": 1.0, "clip_norm": 1.0}
    tree.update(extra)
    return make_config(tree)


def local_only_seconds(exp, rounds: int = 5) -> float:
    """Seconds per round of local training alone (vmapped over nodes), timed as :func:`engine_round_seconds` times
    a full round: a jitted scan of ``rounds`` rounds, compile excluded (a standalone call would also pay dispatch and
    its output, and the ratio full / local could fall below 1)."""
    spec, a = exp.spec, exp.arrays
    train = jax.vmap(lambda k, t, o, x, y, s: local_train(spec.local, k, t, o, x, y, s, exp.hyper))

    def many(theta, opt_state, key):
        def body(carry, r):
            keys = jax.random.split(jax.random.fold_in(key, r), spec.n)
            theta, opt_state, _ = train(keys, *carry, a.x, a.y, a.sizes)
            return (theta, opt_state), None

        return jax.lax.scan(body, (theta, opt_state), jnp.arange(rounds))[0]

    state = simulation.init_state(spec, jax.random.key(0), exp.hyper)
    return timeit(jax.jit(many), state.theta, state.opt_state, jax.random.key(1), repeat=3) / rounds


def seeds_ratio(n: int, seeds: int = 8, mode: str = "vmap") -> float:
    """Time of ``seeds`` seeds in one program (``parallel.seed_mode = mode``) / (seeds x time of one seed)."""
    one = experiment.build(config(n))
    many = experiment.build(config(n, seeds=seeds, parallel={"seed_mode": mode}))
    c1, k1, _ = experiment.compile_program(one)
    c8, k8, _ = experiment.compile_program(many)
    t1 = timeit(c1, k1, one.hyper, one.arrays, repeat=3)
    t8 = timeit(c8, k8, many.hyper, many.arrays, repeat=3)
    return t8 / (seeds * t1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-n", type=int, default=4096)
    ap.add_argument("--graph-n", type=int, default=256)
    ap.add_argument("--loop-ns", default="16,100")
    ap.add_argument("--skip-scaling", action="store_true", help="only the graphs, baseline, overhead, seeds parts")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    report: dict = {"machine": machine(), "scaling": [], "graphs": [], "baseline": [], "overhead": []}
    print(f"# {report['machine']}")

    print("\n## Scaling (ring): ms per round and node-rounds/s\n")
    print("| N | mean ms | mean node-rounds/s | median ms | median node-rounds/s | mean+DP-SGD ms |")
    print("|---|---|---|---|---|---|")
    n = 16
    while n <= args.max_n and not args.skip_scaling:
        row = {"n": n}
        for rule, dp, key in (("mean", False, "mean"), ("median", False, "median"), ("mean", True, "mean_dp")):
            if dp and n > 256:  # per-example gradients: N x buffer x D floats
                row[key] = None
                continue
            row[key] = engine_round_seconds(experiment.build(config(n, rule=rule, dp=dp)), rounds=5)
        report["scaling"].append(row)
        dp_s = "—" if row["mean_dp"] is None else f"{row['mean_dp'] * 1e3:.1f}"
        print(f"| {n} | {row['mean'] * 1e3:.2f} | {n / row['mean']:,.0f} | {row['median'] * 1e3:.2f} | "
              f"{n / row['median']:,.0f} | {dp_s} |", flush=True)
        n *= 4

    print(f"\n## Graphs x rules at N={args.graph_n}: ms per round\n")
    print("| graph | " + " | ".join(RULES) + " |")
    print("|---" * (len(RULES) + 1) + "|")
    for graph in GRAPHS:
        cells = []
        for rule in RULES:
            try:
                exp = experiment.build(config(args.graph_n, graph, rule))
            except ConfigError as exc:  # e.g. Krum with f = 1 needs 4 rows, a ring gives 3
                report["graphs"].append({"graph": graph, "rule": rule, "n": args.graph_n, "error": str(exc)})
                cells.append("n/a")
                continue
            t = engine_round_seconds(exp, rounds=5)
            report["graphs"].append({"graph": graph, "rule": rule, "n": args.graph_n, "seconds": t})
            cells.append(f"{t * 1e3:.2f}")
        print(f"| {graph} | " + " | ".join(cells) + " |", flush=True)

    print("\n## Per-node Python loop baseline (ring)\n")
    print("| N | rule | engine ms | loop ms | speed-up |")
    print("|---|---|---|---|---|")
    for n in [int(s) for s in args.loop_ns.split(",")]:
        for rule in ("mean", "median"):
            exp = experiment.build(config(n, rule=rule))
            eng = engine_round_seconds(exp, rounds=5)
            loop = loop_round_seconds(exp, rule=rule)
            report["baseline"].append({"n": n, "rule": rule, "engine": eng, "loop": loop})
            print(f"| {n} | {rule} | {eng * 1e3:.2f} | {loop * 1e3:.1f} | {loop / eng:.0f}x |", flush=True)

    print(f"\n## Simulator overhead at N={args.graph_n} (ring): full round / local training alone\n")
    print("| rule | round ms | local training ms | ratio |")
    print("|---|---|---|---|")
    for rule in RULES:
        try:
            exp = experiment.build(config(args.graph_n, rule=rule))
        except ConfigError:
            print(f"| {rule} | n/a | | |")
            continue
        full = engine_round_seconds(exp, rounds=5)
        local = local_only_seconds(exp)
        report["overhead"].append({"rule": rule, "round": full, "local": local})
        print(f"| {rule} | {full * 1e3:.2f} | {local * 1e3:.2f} | {full / local:.2f} |", flush=True)

    report["seeds_ratio"] = {mode: seeds_ratio(64, mode=mode) for mode in ("vmap", "map")}
    print("\n## Seeds: 8 seeds in one program / (8 x one seed) at N=64: "
          + ", ".join(f"{mode} {r:.2f}" for mode, r in report["seeds_ratio"].items()) + "\n")

    out = Path(args.out)
    atomic_write(out / "suite.json", json.dumps(report, indent=2))
    plot(out / "suite.png", report)
    print(f"wrote {out}/suite.json and suite.png")


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["scaling"]
    if not rows:
        return
    ns = np.array([r["n"] for r in rows], float)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, label in (("mean", "mean"), ("median", "median"), ("mean_dp", "mean + DP-SGD")):
        pts = [(r["n"], r[key]) for r in rows if r[key] is not None]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.loglog(x, np.array(y) * 1e3, "o-", label=label)
    ref = rows[0]["mean"] * 1e3 * ns / ns[0]
    ax.loglog(ns, ref, "k--", alpha=0.5, label="linear in N")
    ax.set_xlabel("nodes N")
    ax.set_ylabel("ms per round")
    ax.set_title(f"ring, MLP, 2 local steps\n{report['machine']}", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(path, fig)


if __name__ == "__main__":
    jnp.zeros(1).block_until_ready()
    main()

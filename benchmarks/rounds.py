"""Rounds per second of the node-stacked engine vs a per-node Python loop, next to the FLOP limit.

For N in 16, 64, 100, 256, 1024 nodes on a ring (MLP on digits, quickstart settings), times one communication round
of the compiled engine (a scan of rounds, compile excluded) and the same round written the usual way: a Python loop
over nodes calling a jitted one-node local training function, then a loop over nodes averaging neighbours' models.
The FLOP limit is the round's training FLOPs (6 x parameters x examples, forward + backward) at the matrix-multiply
throughput measured in the same run. Then DP-SGD: a round against a non-private one; LeNet-5 rounds, engine against
loop, with convolutions lowered as ``--conv`` says (``model.conv``); and the clipped gradient sum of one DP step by
each method (the engine's ghost, two-pass and stored-gradient kernels against materialised per-example gradients clipped
one by one) for a dense and two convolutional models.

    python benchmarks/rounds.py [--sizes 16,64,100,256,1024] [--loop-max 256] [--rule mean] [--privacy none]
                                [--conv auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_gflops, timeit  # noqa: E402

from jaxdfl import experiment, models, simulation  # noqa: E402
from jaxdfl.privacy import dp_sum  # noqa: E402
from jaxdfl.results import atomic_write  # noqa: E402
from jaxdfl.config import load_config  # noqa: E402
from jaxdfl.training import DP_CLIPPING, LocalSpec, clipped_gradient_sum, local_train, loss_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def engine_round_seconds(exp, rounds: int = 10) -> float:
    """Seconds per round of the compiled engine: a jitted scan of ``rounds`` rounds, compile excluded."""
    spec = exp.spec

    def many(state, key):
        def body(s, r):
            return simulation.round_step(spec, exp.hyper, exp.arrays, s, jax.random.fold_in(key, r))[0], None

        return jax.lax.scan(body, state, jnp.arange(rounds))[0]

    state = simulation.init_state(spec, jax.random.key(0), exp.hyper)
    fn = jax.jit(many)
    return timeit(fn, state, jax.random.key(1), repeat=3) / rounds


def loop_round_seconds(exp, repeat: int = 2, rule: str = "mean") -> float:
    """Seconds per round of the per-node reference: Python loops over nodes, one jitted node step each.

    Aggregation: ``mean`` sums weighted neighbour models in Python; another rule stacks each node's
    neighbourhood and calls the jitted one-node rule (how per-node simulators call a robust aggregator).
    """
    from jaxdfl import aggregators

    one_rule = jax.jit(aggregators.REGISTRY[rule])
    spec, a = exp.spec, exp.arrays
    one = jax.jit(lambda k, t, o, x, y, s: local_train(spec.local, k, t, o, x, y, s, exp.hyper))
    state = simulation.init_state(spec, jax.random.key(0), exp.hyper)
    thetas = [state.theta[i] for i in range(spec.n)]
    opts = [jax.tree.map(lambda leaf: leaf[i], state.opt_state) for i in range(spec.n)]
    xs, ys, sizes = [a.x[i] for i in range(spec.n)], [a.y[i] for i in range(spec.n)], list(a.sizes)
    nbrs, weights, mask = exp.topology.neighbors, exp.topology.weights, exp.topology.mask

    def one_round(key):
        keys = jax.random.split(key, spec.n)
        new = []
        for i in range(spec.n):
            t, opts[i], _ = one(keys[i], thetas[i], opts[i], xs[i], ys[i], sizes[i])
            new.append(t)
        out = []
        for i in range(spec.n):
            if rule == "mean":
                acc = 0.0
                for k in range(nbrs.shape[1]):
                    if mask[i, k]:
                        acc = acc + weights[i, k] * new[nbrs[i, k]]
            else:
                ids = nbrs[i][mask[i]]
                acc = one_rule(jnp.stack([new[j] for j in ids]), jnp.ones(len(ids), bool),
                               jnp.asarray(weights[i][mask[i]]))
            out.append(acc)
        return out

    return timeit(one_round, jax.random.key(2), repeat=repeat)


def round_flops(exp) -> float:
    """Training FLOPs of one round: 6 x parameters x examples processed (forward + backward, dense layers)."""
    local = exp.spec.local
    return 6.0 * exp.model.dim * exp.spec.n * local.local_steps * local.batch_size


def conv_round(n: int, root: Path, conv: str = "auto") -> tuple[float, float]:
    """Engine and per-node-loop seconds per round for LeNet-5 on random 28x28x1 images (an npz in ``root``):
    ring of ``n`` nodes, batch 32, one local step, plain gossip, ``model.conv = conv``."""
    path = root / "random28.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, x_train=rng.integers(0, 256, (64 * n, 28, 28), dtype=np.uint8),
                 y_train=rng.integers(0, 10, 64 * n), x_test=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
                 y_test=rng.integers(0, 10, 100))
    cfg = load_config(str(ROOT / "configs/quickstart.toml"),
                      [f"topology.n={n}", "data.name=\"npz\"", f"data.path=\"{path}\"", "model.name=\"lenet5\"",
                       "train.batch_size=32", "train.local_steps=1", f"model.conv=\"{conv}\""])
    exp = experiment.build(cfg)
    return engine_round_seconds(exp, rounds=3), loop_round_seconds(exp)


def dp_clipping_seconds(name: str, shape: tuple[int, ...], n: int, buffer: int) -> dict[str, float]:
    """Seconds for one DP-SGD step's clipped gradient sum on ``n`` nodes with ``buffer`` examples each, by method:
    the engine's ways (``training.clipped_gradient_sum`` with ``dp_clipping`` = ``ghost`` (where it applies),
    ``two_pass`` or ``stored``) and the definition they replace, per-example gradients materialised as
    ``[n, buffer, D]`` and clipped one by one (``privacy.dp_sum``)."""
    model = models.make(name, 10, shape, hidden=(64,))
    theta = jax.vmap(model.init)(jax.random.split(jax.random.key(0), n))
    x = jax.random.normal(jax.random.key(1), (n, buffer, *shape))
    y = jax.random.randint(jax.random.key(2), (n, buffer), 0, 10)
    valid = jnp.ones((n, buffer), bool)

    def engine(mode):
        spec = LocalSpec(apply=model.apply, optimizer="sgd", batch_size=buffer // 2, local_steps=1, dp_example=True,
                         dp_buffer=buffer, unravel=model.unravel, apply_params=model.apply_params, dp_clipping=mode)
        return lambda t, xb, yb, v: clipped_gradient_sum(spec, t, xb, yb, v, 1.0)[1]

    def materialised(t, xb, yb, v):
        g = jax.vmap(lambda xi, yi: jax.grad(lambda p: loss_fn(model.apply, p, xi[None], yi[None]))(t))(xb, yb)
        return dp_sum(jax.random.key(0), g, v, 1.0, 0.0, 1.0)

    ways = [m for m in DP_CLIPPING if m != "ghost" or models.dp_clipping(name) == "ghost"]
    methods = {**{m: engine(m) for m in ways}, "materialised": materialised}
    return {m: timeit(jax.jit(jax.vmap(f)), theta, x, y, valid, repeat=5, stat=min) for m, f in methods.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,64,100,256,1024")
    ap.add_argument("--loop-max", type=int, default=256, help="largest N timed with the per-node loop")
    ap.add_argument("--rule", default="mean")
    ap.add_argument("--privacy", default="none", choices=["none", "example"])
    ap.add_argument("--conv", default="auto", choices=models.CONV_IMPLS, help="model.conv for the LeNet-5 rounds")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--rounds-only", action="store_true",
                    help="only the rounds table: skip the DP-SGD, LeNet-5 and clipping sections (a quick run)")
    args = ap.parse_args(argv)
    gflops = matmul_gflops()
    host = machine()  # the load average at the start, kept for the JSON too
    print(f"# machine: {host}; matmul {gflops:.1f} GFLOP/s")
    print(f"# ring, MLP[64] on digits, batch 16, 2 local steps, rule={args.rule}, privacy={args.privacy}")
    print("| N | engine ms/round | node-rounds/s | loop ms/round | speed-up | FLOP-limit ms | x limit |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        overrides = [f"topology.n={n}", f"aggregation.rule=\"{args.rule}\"", "aggregation.gossip=\"auto\""]
        if args.privacy == "example":
            overrides += ["privacy.mode=\"example\"", "privacy.noise_multiplier=1.0"]
        cfg = load_config(str(ROOT / "configs/quickstart.toml"), overrides)
        exp = experiment.build(cfg)
        eng = engine_round_seconds(exp)
        loop = loop_round_seconds(exp, rule=args.rule) if n <= args.loop_max else float("nan")
        limit = round_flops(exp) / (gflops * 1e9)
        row = {"n": n, "engine_ms": eng * 1e3, "node_rounds_per_s": n / eng, "loop_ms": loop * 1e3,
               "speedup": loop / eng, "flop_limit_ms": limit * 1e3, "x_limit": eng / limit}
        rows.append(row)
        loop_s = "—" if np.isnan(loop) else f"{loop * 1e3:.1f}"
        sp = "—" if np.isnan(loop) else f"{loop / eng:.0f}x"
        print(f"| {n} | {eng * 1e3:.2f} | {n / eng:,.0f} | {loop_s} | {sp} | {limit * 1e3:.3f} | "
              f"{eng / limit:.1f} |", flush=True)
    if args.rounds_only:
        if args.json:
            atomic_write(args.json, json.dumps({"machine": host, "rows": rows}, indent=2))
        return
    # DP-SGD overhead on the quickstart model: per-example gradients, clipping, Poisson batches, noise
    cfg = load_config(str(ROOT / "configs/quickstart.toml"))
    plain = engine_round_seconds(experiment.build(cfg))
    dp_exp = experiment.build(cfg.replace({"privacy.mode": "example", "privacy.noise_multiplier": 1.0}))
    dp = engine_round_seconds(dp_exp)
    print(f"\n# DP-SGD (example mode, buffer {dp_exp.spec.local.dp_buffer} for expected batch 16) vs non-private, "
          f"quickstart N=32: {dp * 1e3:.2f} ms vs {plain * 1e3:.2f} ms per round = {dp / plain:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        conv = {n: conv_round(n, Path(tmp), args.conv) for n in (8, 32)}
    for n, (eng, loop) in conv.items():
        print(f"# LeNet-5 on 28x28x1, ring N={n}, batch 32, 1 local step, conv={args.conv}: engine "
              f"{eng * 1e3:.1f} ms/round, per-node loop {loop * 1e3:.1f} ms/round = {loop / eng:.2f}x")
    clipping = {}
    for name, shape, n, buf in [("mlp", (64,), 32, 46), ("cnn", (8, 8, 1), 32, 46), ("lenet5", (28, 28, 1), 8, 96)]:
        t = dp_clipping_seconds(name, shape, n, buf)
        clipping[name] = {m: v * 1e3 for m, v in t.items()}
        used = models.dp_clipping(name)
        print(f"# DP-SGD clipped gradient sum, {name} {shape}, {n} nodes x {buf} examples, ms: "
              + ", ".join(f"{m} {v * 1e3:.1f}" for m, v in t.items())
              + f"; the engine uses {used}: {t['materialised'] / t[used]:.1f}x faster than materialised")
    if args.json:
        atomic_write(args.json, json.dumps({"machine": host, "rows": rows, "dp_ms": dp * 1e3,
                                            "plain_ms": plain * 1e3, "dp_clipping": clipping,
                                            "lenet5_engine_loop_ms": {n: [e * 1e3, lo * 1e3]
                                                                      for n, (e, lo) in conv.items()}},
                                           indent=2))


if __name__ == "__main__":
    main()

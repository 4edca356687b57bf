"""Benchmark: the robust rules on dense graphs, where neighbourhoods are large (K = N on a complete graph).

For each rule (and the pre-aggregators ``nnm`` and ``bucketing`` in front of ``mean``) and each K it compiles
``jax.jit(aggregators.aggregate)`` on N = K nodes of K rows and D coordinates (float32, all rows valid) in a fresh
process, and reports the compile time, the steady time of a call and XLA's temporary memory for that program (its
CPU memory analysis), next to the time to read the ``[N, K, D]`` block once at the copy bandwidth measured in the same
process. A measurement that passes ``--timeout`` seconds is reported as such (the process is killed).

Usage: ``python benchmarks/large_k.py [--k 17,65,129] [--d 1000] [--timeout 150] [--rules krum,nnm]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(rule: str, k: int, d: int, reps: int = 3) -> dict:
    """One (rule, K) point in this process: compile seconds, steady ms per call, temporaries MB, roofline ms."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(HERE))
    from common import bandwidth_gbs

    from jaxdfl import aggregators

    name, pre = ("mean", [rule]) if rule in aggregators.PRE_REGISTRY else (rule, [])
    x = jax.random.normal(jax.random.key(0), (k, k, d), jnp.float32)
    mask = jnp.ones((k, k), bool)
    weights = mask / k
    call = jax.jit(lambda key, x, m, w: aggregators.aggregate(key, x, m, w, name, pre=pre))
    t = time.perf_counter()
    compiled = call.lower(jax.random.key(0), x, mask, weights).compile()
    compile_s = time.perf_counter() - t
    analysis = compiled.memory_analysis()
    jax.block_until_ready(compiled(jax.random.key(0), x, mask, weights))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(jax.random.key(0), x, mask, weights))
        best = min(best, time.perf_counter() - t)
    roofline = x.size * 4 / (bandwidth_gbs(1 << 27, repeat=3) * 1e9)
    return {"rule": rule, "k": k, "compile_s": compile_s, "ms": best * 1e3, "roofline_ms": roofline * 1e3,
            "temp_mb": analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")}


def run_point(rule: str, k: int, d: int, timeout: float) -> dict:
    """:func:`measure` in a fresh process (a compile that blows up cannot take the others down with it)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", rule, str(k), str(d)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rule": rule, "k": k, "timeout": timeout}
    if proc.returncode != 0:
        raise RuntimeError(f"{rule} at K={k} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell(point: dict) -> str:
    if "timeout" in point:
        return f"> {point['timeout']:g} s to compile"
    return (f"{point['compile_s']:.1f} s / {point['ms']:.1f} ms ({point['ms'] / point['roofline_ms']:.0f}x) / "
            f"{point['temp_mb']:.0f} MB")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", default="17,65,129", help="neighbourhood sizes K (N = K nodes)")
    p.add_argument("--d", type=int, default=1000, help="coordinates per row")
    p.add_argument("--rules", default="", help="comma-separated rules / pre-aggregators (default: all)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds one point may take")
    p.add_argument("--point", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        rule, k, d = args.point
        print(json.dumps(measure(rule, int(k), int(d))))
        return []

    import os

    sys.path.insert(0, str(HERE))
    from common import machine

    from jaxdfl import aggregators

    load = os.getloadavg()[0]
    ks = [int(k) for k in args.k.split(",")]
    rules = args.rules.split(",") if args.rules else sorted(aggregators.REGISTRY) + ["nnm", "bucketing"]
    print(f"# machine: {machine(load)}")
    print(f"# aggregate on N = K nodes x K rows x D = {args.d}, float32; each cell: compile / steady call "
          "(x the time to read the block once at the copy bandwidth) / XLA temporaries")
    print("| rule | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    points = []
    for rule in rules:
        row = [run_point(rule, k, args.d, args.timeout) for k in ks]
        points += row
        label = f"mean after {rule}" if rule in aggregators.PRE_REGISTRY else rule
        print(f"| {label} | " + " | ".join(cell(pt) for pt in row) + " |", flush=True)
    return points


if __name__ == "__main__":
    main()

"""Benchmark: every robust aggregation rule on the whole network, against per-node loops and the memory roofline.

For each rule and size (N nodes, K rows per neighbourhood, D coordinates, float32) it times, in one run:

- ``ms``: ``jaxdfl.aggregators.aggregate`` (the rule vmapped over all nodes) per call in steady state, the way the
  engine runs it every round: ``(T(c2) - T(c1)) / (c2 - c1)`` where ``T(c)`` is the best wall time of one compiled
  program making ``c`` chained calls. The difference removes what a program pays once (copying its input into the
  loop, the first touch of freshly allocated output pages), which a round inside the engine's ``lax.scan`` never
  pays. All rules are timed in ``--passes`` interleaved passes and each keeps its best, so a burst of load from
  the machine's neighbours slows one pass rather than one rule;
- ``call ms``: one standalone jitted call, fixed costs included (best of ``--reps``);
- three per-node Python loops over the N neighbourhoods: ``eager loop`` calls the same one-node rule as a plain
  Python function (what a per-node simulator does), ``jit loop`` calls it jitted once (the strongest per-node
  baseline: only the dispatch per node is lost), ``numpy loop`` calls the float64 NumPy reference (the peer
  libraries' way); each is timed on a subset of nodes (best of ``--loop-reps``) and scaled to N;
- ``x roofline``: ``ms`` divided by the time to read the N*K*D block once at the copy bandwidth
  (``common.bandwidth_gbs``), measured once per pass; the best is kept, as for the kernels.

Usage: ``python benchmarks/aggregators.py [--out benchmarks/aggregators.md]`` (about ten minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bandwidth_gbs, best_time, machine, steady_timer  # noqa: E402

from jaxdfl import aggregators as A  # noqa: E402
from jaxdfl.aggregators import reference as R  # noqa: E402

ORDER_STATS = ("median", "trimmed_mean", "meamed")
ROOFLINE_TARGET = {"mean": 3, "median": 3, "trimmed_mean": 3, "krum": 5, "multi_krum": 5}

NOTES = """## Notes

- How the kernels work: the order statistics (median, MeaMed, Bulyan's second stage, and trimmed mean with a
  traced `f`) sort the K rows with a compare-exchange network (Batcher, 28 comparators for K = 9) fused into one
  elementwise loop over D (above 128 rows, 169 for the median, a loop over the network's layers); no `jnp.sort`.
  Trimmed mean with a static `f` only partitions the rows (f bubble passes per side; 18 comparators for K = 9,
  f = 1). Distance rules sum all K(K-1)/2 pairwise squared differences (no `[K, K, D]` array, no
  cancellation-prone `x @ x.T`), then work on K x K matrices; iterative rules (geometric median, centred clipping,
  IOS) sum the Gram matrix of the rows centred on the node's own row the same way, iterate on K coefficients and
  read the block once more to combine. On CPUs, once a node's rows exceed 512 KB (at K = 9 from D = 14,564), the
  pair sums run block by block: each step copies every node's `[K, 320]` slice once and all pairs read it from
  cache into `[P, 16]` partial sums; smaller neighbourhoods (and other backends) take one fused pass over D.
- `ms` against `call ms`: a standalone call also pays for its output. XLA:CPU gets the 40 MB output of the main
  size from `malloc`, which maps fresh pages for blocks over 32 MB, and the kernel zero-fills each page on first
  touch (about 20 ms here). Inside the engine the round's buffers are reused by every round of the `lax.scan`, so
  `ms` is what a round costs. `MALLOC_MMAP_THRESHOLD_=4294967296` makes standalone calls reuse their pages too.
- Distance rules: Krum-type rules need 36 squared differences per coordinate for K = 9. The one fused pass finishes a
  pair over all of D before the next, so each row came from L3 or memory once per pair it is in (8 times at K = 9);
  blocks of 320 coordinates keep them in cache (stop 26: Krum 1.3x faster at the main size, 1.7x at K = 17, 5.7x at 65
  rows). What bounds the blocked pass is each step's copy, not the arithmetic (stop 27): a loop doing only the copies
  took 30-38 ms of Krum's 50-58 at the main size (9.5-12 GB/s, where a streaming read of the block runs at 17-20) and
  332 of 559 ms at N = 300, K = 17. The pair loop itself adds about 3.7 squared differences per cycle on one core with
  the rows in L1 (9 G/s at 2.45 GHz), and centring every pair's terms (two more subtractions) costs nothing
  measurable. Copies of fewer nodes with longer rows (groups of 1-20 nodes, 1,280-10,240 coordinates) read no faster
  (7-9 GB/s), and copying the next block in the loop carry while the pairs run was 1.2-2x slower. Even with the block
  stored block-major (each step's slice contiguous per node) and read without a copy, the 312-step loop read 10.6 GB/s
  where one streaming fusion reads 18.8: the loop's steps, not the copy's access pattern, cap it (the same loop over
  1.15 MB steps held in L3 ran at 13 GB/s; over 11.5 KB steps in L1, on one thread, at 65). Multi-Krum reads the block
  once more to average the rows it keeps (the mean's time), so it stays above 5x until that copy gets faster.
  Alternatives to the one pass measured on the main size, steady state: a batched Gram `einsum('kd,jd->kj')` under
  vmap was 6x slower than the fused squared-difference pass (XLA:CPU lowers the batched dot with tiny K badly; 2.7 s
  against 0.6 s at N = 300, K = 17, stop 27), a per-node `jnp.dot` in `lax.map` about as fast but cancellation-prone,
  and centring plus products, one multi-output accumulator per pair, or a `[pairs, D/b, b]` blocked reduction were
  1.4-20x slower.
- Per-node loops: at D = 100,000 each jitted per-node call already streams 3.6 MB at memory speed, so the
  whole-network call can win back only the per-node dispatch and the second core: a 10x or 100x speed-up over the
  jitted loop is out of reach at this D (the roofline bounds it at `jit loop ms` / roofline). At D = 1,000 (third
  table) the per-call overhead dominates and the whole-network call wins by an order of magnitude even over it.
- Timings are best-of-N wall times on a shared 2-core machine (see the load average); bandwidth and kernels are
  measured in the same run, so ratios are internally consistent, but absolute times vary by up to 2x between runs.
  On blocks over 1 GB (the second table) every timing is a single repetition and noisier still.
"""


def make_inputs(n: int, k: int, d: int, seed: int = 0):
    """A random [N, K, D] block, every node with a random number of valid rows (at least K - 2), uniform weights
    over the valid rows, and NaN in the padded rows (they must not matter)."""
    rng = np.random.default_rng(seed)
    block = jax.random.normal(jax.random.key(seed), (n, k, d), jnp.float32)
    mask = np.ones((n, k), bool)
    drop = rng.integers(0, 3, size=n)
    for i in range(n):
        if drop[i]:
            mask[i, k - drop[i]:] = False
    w = np.where(mask, 1.0, 0.0)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    block = jnp.where(jnp.asarray(mask)[:, :, None], block, jnp.nan)
    return block, jnp.asarray(mask), jnp.asarray(w)


def loop_time(call, nodes: int, n: int, reps: int) -> float:
    """Seconds for ``call(i)`` over all N nodes, measured on the first ``nodes`` (best of ``reps``) and scaled."""
    nodes = min(nodes, n)
    return best_time(lambda: [call(i) for i in range(nodes)], reps) * n / nodes


def run_size(n, k, d, rules, args):
    """Rows for one size and the best copy bandwidth seen while timing it (GB/s).

    The whole-network kernels of all rules are timed in ``--passes`` interleaved passes (each rule once per pass,
    the copy bandwidth once per pass) and the best of each is kept, so a burst of load from the machine's
    neighbours slows one pass, not one rule. The per-node loops are timed once per rule after that.
    """
    big = n * k * d * 4 > 1e9
    reps = 1 if big else args.reps
    passes = 1 if big else args.passes
    block, mask, w = make_inputs(n, k, d)
    key = jax.random.key(1)
    host = [np.asarray(a) for a in (block, mask, w)]
    pieces = [tuple(jnp.asarray(a[i]) for a in host) for i in range(min(args.loop_nodes, n))]
    aggs = {rule: functools.partial(A.aggregate, key, rule=rule) for rule in rules}
    timers = {rule: steady_timer(agg, (block, mask, w)) for rule, agg in aggs.items()}
    best = dict.fromkeys(rules, np.inf)
    bandwidth = 0.0
    for p in range(passes):
        bandwidth = max(bandwidth, bandwidth_gbs())
        for rule in rules:
            best[rule] = min(best[rule], timers[rule](reps))
        print(f"  pass {p + 1}/{passes}: copy {bandwidth:.1f} GB/s; "
              + ", ".join(f"{r} {best[r] * 1e3:.1f}" for r in rules), flush=True)
    rows = []
    for rule in rules:
        h = dict(A.DEFAULTS[rule])
        t = best[rule]
        t_call = best_time(functools.partial(jax.jit(aggs[rule]), block, mask, w), reps)
        one = functools.partial(A.REGISTRY[rule], **h)
        one_jit = jax.jit(one)
        t_eager = loop_time(lambda i: one(*pieces[i]), args.eager_nodes, n, args.loop_reps)
        t_jit = loop_time(lambda i: one_jit(*pieces[i]), 20 if big else args.loop_nodes, n, args.loop_reps)
        t_np = loop_time(lambda i: R.REGISTRY[rule](host[0][i], host[1][i], host[2][i], **h), args.numpy_nodes, n,
                         args.loop_reps)
        rows.append(dict(rule=rule, ms=t * 1e3, call_ms=t_call * 1e3, eager_ms=t_eager * 1e3, jit_ms=t_jit * 1e3,
                         numpy_ms=t_np * 1e3))
        print(f"  {rule:17s} {t * 1e3:8.1f} ms  call {t_call * 1e3:8.1f}  eager {t_eager * 1e3:8.0f}  "
              f"jit loop {t_jit * 1e3:7.0f}  numpy {t_np * 1e3:7.0f}", flush=True)
    return rows, bandwidth


def table(results, command, info) -> str:
    lines = [
        "# Aggregation rules: whole-network kernels vs per-node loops",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info}.",
        "",
        "`ms`: `aggregate` (the rule vmapped over all N nodes) per call in steady state, inside one compiled loop "
        "as in the engine's round scan, best of interleaved passes over all rules; `call ms`: one standalone "
        "jitted call (output allocation included). Loops over nodes, scaled from a subset: `eager` calls the same "
        "one-node rule as a Python function, `jit` the same rule jitted once, `numpy` the float64 NumPy "
        "reference. `x roofline`: `ms` / time to read the N*K*D float32 block once at the copy bandwidth (best "
        "of one measurement per pass). Default hyper-parameters (`DEFAULTS`); each node has K-2..K valid rows, "
        "NaN in the padding.",
        "",
    ]
    for (n, k, d, chunk, bandwidth, roofline_ms), rows in results:
        note = f", chunked automatically ({chunk} nodes per chunk)" if chunk else ""
        lines += [f"## N={n}, K={k}, D={d:,} (block {n * k * d * 4 / 1e9:.2f} GB, copy {bandwidth:.1f} GB/s, "
                  f"roofline {roofline_ms:.1f} ms{note})", "",
                  "| rule | ms | x roofline | call ms | eager loop ms | vs eager | jit loop ms | vs jit | "
                  "numpy loop ms | vs numpy |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['rule']} | {r['ms']:.1f} | {r['roofline']:.2f} | {r['call_ms']:.1f} | "
                         f"{r['eager_ms']:.0f} | {r['eager_ms'] / r['ms']:.0f}x | {r['jit_ms']:.0f} | "
                         f"{r['jit_ms'] / r['ms']:.1f}x | {r['numpy_ms']:.0f} | {r['numpy_ms'] / r['ms']:.0f}x |")
        lines.append("")
    lines += targets(results[0])
    lines.append(NOTES)
    return "\n".join(lines)


def targets(result) -> list[str]:
    """The issue's speed targets, checked on the first (main) size: roofline, and speed-up over per-node loops."""
    (n, k, d, *_), rows = result
    out = [f"## Targets at N={n}, K={k}, D={d:,}", "",
           "Roofline: mean, median, trimmed mean within 3x, Krum and multi-Krum within 5x. Per-node loop: every "
           "rule 10x faster, order statistics 100x (shown against each loop).", ""]
    for r in rows:
        goals = []
        if r["rule"] in ROOFLINE_TARGET:
            limit = ROOFLINE_TARGET[r["rule"]]
            # shown rounded up (a speed-up rounded down), so the printed figure never contradicts the verdict
            goals.append(f"<= {limit}x roofline: {'met' if r['roofline'] <= limit else 'NOT met'} "
                         f"({math.ceil(r['roofline'] * 100) / 100:.2f}x)")
        need = 100 if r["rule"] in ORDER_STATS else 10
        for loop in ("eager", "jit", "numpy"):
            speedup = r[f"{loop}_ms"] / r["ms"]
            goals.append(f">= {need}x vs {loop} loop: {'met' if speedup >= need else 'NOT met'} "
                         f"({math.floor(speedup * 10) / 10:.1f}x)")
        out.append(f"- {r['rule']}: " + "; ".join(goals))
    return out + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rules", default=",".join(A.REGISTRY))
    p.add_argument("--sizes", default="100x9x100000,300x17x100000,1000x9x1000", help="NxKxD,...")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--passes", type=int, default=3, help="interleaved timing passes over all rules (best is kept; "
                   "one pass on blocks over 1 GB)")
    p.add_argument("--loop-reps", type=int, default=3, help="repetitions of each per-node loop (best is kept)")
    p.add_argument("--loop-nodes", type=int, default=100, help="nodes timed in the jitted loop (20 on blocks over "
                   "1 GB, where every timing is also a single repetition)")
    p.add_argument("--eager-nodes", type=int, default=3, help="nodes timed in the eager loop")
    p.add_argument("--numpy-nodes", type=int, default=3, help="nodes timed in the NumPy loop")
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    command = ("python benchmarks/aggregators.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    info = machine()
    print(info, flush=True)
    results = []
    start = time.perf_counter()
    for spec in args.sizes.split(","):
        n, k, d = (int(v) for v in spec.split("x"))
        # what aggregate() picks for the rule with the largest temporaries (without pre-aggregators)
        chunk = A.auto_chunk(n, k, d, temporaries=max(A.temporaries(r, [], k, d) for r in args.rules.split(",")))
        print(f"N={n} K={k} D={d} chunk={chunk}", flush=True)
        rows, bandwidth = run_size(n, k, d, args.rules.split(","), args)
        roofline_s = n * k * d * 4 / (bandwidth * 1e9)
        for r in rows:
            r["roofline"] = r["ms"] / (roofline_s * 1e3)
        print(f"  roofline {roofline_s * 1e3:.1f} ms at {bandwidth:.1f} GB/s", flush=True)
        results.append(((n, k, d, chunk, bandwidth, roofline_s * 1e3), rows))
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    md = table(results, command, info)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(md + "\n")
        tmp.replace(args.out)
    print(md)


if __name__ == "__main__":
    main()

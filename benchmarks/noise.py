"""Benchmark: bulk noise draws (DP noise, the gaussian attack) with ``jax.random`` vs ``jaxdfl.rng``.

Both give the same numbers bit for bit (``tests/test_rng.py``); ``jaxdfl.rng`` hashes with Threefry unrolled so
XLA fuses the whole draw into one loop. For each shape it reports ns per element for ``normal`` and ``laplace``
from both, and for the DP noise the engine draws (``rng.dp_normal``, ``rng.dp_laplace``: two hashes per element
and far tails), next to the machine's limit for producing the array: writing it once at the copy bandwidth
measured in the same run. The per-node baseline is the per-node loop a peer simulator runs: one jitted ``[D]``
draw per node.

Usage: ``python benchmarks/noise.py [--shapes 1024x4810,64x9x100000] [--loop-nodes 64]``
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bandwidth_gbs, best_time, machine  # noqa: E402

from jaxdfl import rng  # noqa: E402

SOURCES = {"jax.random": jax.random, "jaxdfl.rng": rng}


def draw_time(module, name: str, shape: tuple[int, ...], reps: int) -> float:
    fn = jax.jit(lambda k: getattr(module, name)(k, shape))
    key = jax.random.key(0)
    return best_time(lambda: fn(key), reps)


def loop_time(name: str, shape: tuple[int, ...], nodes: int, reps: int) -> float:
    """Seconds for a per-node loop over ``shape[0]`` nodes (one jitted ``shape[1:]`` draw each), scaled from
    ``nodes`` of them."""
    fn = jax.jit(lambda k: getattr(jax.random, name)(k, shape[1:]))
    keys = list(jax.random.split(jax.random.key(0), nodes))

    def loop():
        return [fn(k) for k in keys]

    return best_time(loop, reps) * shape[0] / nodes


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1024x4810,256x100000,64x9x100000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loop-nodes", type=int, default=64)
    args = ap.parse_args(argv)
    bw = bandwidth_gbs()
    print(f"# {machine()}; copy bandwidth {bw:.1f} GB/s")
    print("| shape | draw | jax.random ns/elem | jaxdfl.rng ns/elem | speed-up | write limit ns/elem | x limit "
          "| per-node loop ns/elem | DP draw ns/elem |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for text in args.shapes.split(","):
        shape = tuple(int(s) for s in text.split("x"))
        n = math.prod(shape)
        limit = 4 / bw  # ns per float32 element written once (bytes / (GB/s) = ns)
        for name in ("normal", "laplace"):
            t = {src: draw_time(mod, name, shape, args.reps) / n * 1e9 for src, mod in SOURCES.items()}
            loop = loop_time(name, shape, min(args.loop_nodes, shape[0]), args.reps) / n * 1e9
            dp = draw_time(rng, f"dp_{name}", shape, args.reps) / n * 1e9
            row = dict(shape=text, draw=name, jax=t["jax.random"], rng=t["jaxdfl.rng"], limit=limit, loop=loop,
                       dp=dp)
            rows.append(row)
            print(f"| {text} | {name} | {row['jax']:.2f} | {row['rng']:.2f} | {row['jax'] / row['rng']:.1f}x | "
                  f"{limit:.2f} | {row['rng'] / limit:.1f} | {loop:.2f} | {dp:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()

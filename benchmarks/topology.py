"""Benchmark: building a large graph on the host (``topology.make``), above all its spectral gap.

For each family and N it times ``topology.make`` (graph draw, sparse Metropolis W, neighbour tables, spectral gap)
and, within it, the spectral gap of the sparse W (``topology.spectral_gap``: Lanczos with the eigenvalue 1
deflated, shift-invert for tiny gaps), next to the baseline a simpler tool uses: ``numpy.linalg.eigvalsh`` of the
dense ``[N, N]`` W (run up to ``--dense-max`` nodes; its memory grows as N^2, its time as N^3).

Usage: ``python benchmarks/topology.py [--sizes 2048,8192] [--dense-max 4096]`` (about two minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from jaxdfl import topology  # noqa: E402

FAMILIES = (("ring", {}), ("torus", {}), ("random_regular", {"degree": 4}), ("small_world", {"k": 4, "p": 0.1}))


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def row(kind: str, params: dict, n: int, dense_max: int) -> dict:
    t_make, topo = seconds(lambda: topology.make(kind, n, seed=0, **params))
    t_gap, gap = seconds(lambda: topology.spectral_gap(topo.sparse_mixing))
    t_dense, dense_gap = (None, None)
    if n <= dense_max:
        t_dense, mod = seconds(lambda: np.sort(np.abs(np.linalg.eigvalsh(topo.sparse_mixing.toarray()))))
        dense_gap = 1.0 - mod[-2]
    return dict(kind=kind, n=n, make=t_make, gap_s=t_gap, dense_s=t_dense, gap=gap, dense_gap=dense_gap)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2048,8192")
    p.add_argument("--dense-max", type=int, default=4096, help="largest N for the dense eigvalsh baseline")
    args = p.parse_args(argv)
    print(f"# {machine()}")
    print("| family | N | make s | gap (sparse) s | eigvalsh (dense) s | speed-up | gap | dense gap |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        for kind, params in FAMILIES:
            r = row(kind, params, n, args.dense_max)
            rows.append(r)
            dense = "—" if r["dense_s"] is None else f"{r['dense_s']:.2f}"
            speedup = "—" if r["dense_s"] is None else f"{r['dense_s'] / r['gap_s']:.0f}x"
            dense_gap = "—" if r["dense_gap"] is None else f"{r['dense_gap']:.6g}"
            print(f"| {kind} | {n} | {r['make']:.2f} | {r['gap_s']:.2f} | {dense} | {speedup} | {r['gap']:.6g} | "
                  f"{dense_gap} |", flush=True)
    return rows


if __name__ == "__main__":
    main()

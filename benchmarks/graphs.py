"""Benchmark: drawing the round's graph inside the program (``simulation.round_graph``) for the changing graphs.

For each case (graph family, N, ``topology.dynamic`` / node dropout) it times one round's graph draw in steady state
(``common.steady_time``: chained calls in one compiled program, as rounds run in the engine's scan) next to
(a) a per-node Python loop doing the same round on the host, as peer simulators do (a greedy matching over a
shuffled edge list; per-edge failure draws and Metropolis weights node by node), and (b) the time to write the
round's ``[N, K]`` tables once (int32 neighbours, bool mask, float32 weights: 9 bytes an entry) at the copy
bandwidth measured in the same run.

Usage: ``python benchmarks/graphs.py [--n 4096] [--complete-n 1024]`` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bandwidth_gbs, machine, steady_time  # noqa: E402

from jaxdfl import experiment, simulation, topology  # noqa: E402


def setup(topo: topology.Topology, dynamic: str, node_dropout: bool):
    """The Spec, Arrays and hyper-parameters ``round_graph`` reads, for one graph."""
    spec = simulation.Spec(n=topo.n, local=None, model_init=None, model_apply=None, rounds=1, eval_every=1,
                           dynamic=dynamic, n_edges=topo.num_edges, node_dropout=node_dropout)
    nbr, msk = experiment.stack_tables([topo])
    arrays = simulation.Arrays(**{**dict.fromkeys(simulation.Arrays._fields),
                                  "neighbors": jnp.asarray(topo.neighbors), "mask": jnp.asarray(topo.mask),
                                  "weights": jnp.asarray(topo.weights),
                                  "edge_id": jnp.asarray(experiment.edge_ids(topo)),
                                  "inter": jnp.zeros(topo.neighbors.shape, bool),
                                  "pool_neighbors": jnp.asarray(nbr), "pool_mask": jnp.asarray(msk)})
    hyper = {"drop_prob": jnp.float32(0.3), "node_dropout": jnp.float32(0.3)}
    return spec, arrays, hyper


def engine_seconds(spec, arrays, hyper, reps: int) -> tuple[float, int]:
    """Seconds per round graph in steady state, and the width K of the tables it returns."""

    def draw(key):
        k_graph, k_online = jax.random.split(key)
        g = simulation.round_graph(spec, hyper, arrays, k_graph, jnp.int32(0),
                                   simulation.online_nodes(spec, hyper, k_online))
        return g.weights + g.neighbors.astype(jnp.float32) + g.mask  # every output stays live

    width = jax.eval_shape(draw, jax.random.key(0)).shape[1]
    return steady_time(draw, (jax.random.key(0),), reps, calls=(2, 10)), width


def loop_matching(n: int, edges: list, rng: np.random.Generator) -> list:
    """A peer simulator's round: greedy matching over a shuffled edge list, one Python step per edge."""
    partner = [-1] * n
    for e in rng.permutation(len(edges)).tolist():
        i, j = edges[e]
        if partner[i] < 0 and partner[j] < 0:
            partner[i], partner[j] = j, i
    return partner


def loop_dropout(neighbours: list, edges: list, rng: np.random.Generator, alive_p: float, by_node: bool) -> list:
    """A peer simulator's round with failures: draw what survives (edges, or nodes), then each node's Metropolis
    weights over its surviving neighbours, one Python step per node and neighbour."""
    if by_node:
        up = (rng.random(len(neighbours)) < alive_p).tolist()
        live = [[j for j in nb if up[i] and up[j]] for i, nb in enumerate(neighbours)]
    else:
        alive = {e for e, a in zip(edges, (rng.random(len(edges)) < alive_p).tolist()) if a}
        live = [[j for j in nb if (min(i, j), max(i, j)) in alive] for i, nb in enumerate(neighbours)]
    deg = [len(nb) for nb in live]
    return [{j: 1.0 / (1 + max(deg[i], deg[j])) for j in nb} for i, nb in enumerate(live)]


def loop_seconds(topo, dynamic: str, node_dropout: bool, reps: int) -> float:
    """Best of ``reps`` host rounds (the graph's lists are built once, outside the timing)."""
    rng = np.random.default_rng(0)
    edges = [tuple(e) for e in topo.edges.tolist()]
    neighbours = [list(topo.graph.neighbors(i)) for i in range(topo.n)]
    if dynamic == "matching":
        def one():
            return loop_matching(topo.n, edges, rng)
    else:
        def one():
            return loop_dropout(neighbours, edges, rng, 0.7, by_node=node_dropout)
    best = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        one()
        best = min(best, time.perf_counter() - t)
    return best


def cases(n: int, complete_n: int):
    """(label, topology, dynamic, node_dropout) for the benchmark."""
    ring = topology.make("ring", n)
    regular = topology.make("random_regular", n, seed=0, degree=8)
    complete = topology.make("complete", complete_n)
    return [(f"ring N={n}", ring, "matching", False),
            (f"random 8-regular N={n}", regular, "matching", False),
            (f"complete N={complete_n}", complete, "matching", False),
            (f"random 8-regular N={n}", regular, "edge_dropout", False),
            (f"ring N={n}", ring, "static", True)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--complete-n", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    bandwidth = bandwidth_gbs()
    print(f"# {machine()}; copy bandwidth {bandwidth:.1f} GB/s")
    print("| graph | per round | engine ms | per-node loop ms | speed-up | write limit ms | x limit |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, topo, dynamic, node_dropout in cases(args.n, args.complete_n):
        spec, arrays, hyper = setup(topo, dynamic, node_dropout)
        engine, width = engine_seconds(spec, arrays, hyper, args.reps)
        loop = loop_seconds(topo, dynamic, node_dropout, args.reps)
        limit = topo.n * width * 9 / bandwidth / 1e9
        what = "node dropout 0.3" if node_dropout else dynamic + (" 0.3" if dynamic == "edge_dropout" else "")
        print(f"| {label} | {what} | {engine * 1e3:.3f} | {loop * 1e3:.1f} | {loop / engine:.0f}x | "
              f"{limit * 1e3:.4f} | {engine / limit:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: the engine's robust exchange (gather + attack + rule) in one piece vs in chunks of receivers.

For a random 8-regular graph (K = 9 rows per neighbourhood with self; with ``--graph complete`` a complete graph,
K = N) of N nodes exchanging D-dimensional messages, every 16th node Byzantine, it compiles ``simulation.exchange``
for a few rule x attack pairs twice: with the whole ``[N, K, D]`` block at once (``parallel.chunk_size = N``) and
with the automatic chunk size (from ``simulation.GATHER_BUDGET_BYTES``), and reports XLA's temporary memory
(``memory_analysis``) and the time per call in steady state (``common.steady_time``: chained calls in one program,
as rounds run in the engine's scan) next to the block size and the time to read it once at the copy bandwidth.

Usage: ``python benchmarks/exchange.py [--n 256] [--d 100000] [--graph complete]`` (several minutes on a 2-core
CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bandwidth_gbs, machine, steady_time  # noqa: E402

from jaxdfl import simulation, topology  # noqa: E402

CASES = [("median", (), "sign_flip", ()), ("trimmed_mean", (("f", 1),), "alie", ()),
         ("krum", (("f", 1),), "alie", ()), ("krum", (("f", 1),), "gaussian", ()),
         ("clipped_gossip", (), "dissensus", ())]


def spec(n: int, rule, rule_hyper, attack, attack_hyper, chunk) -> simulation.Spec:
    return simulation.Spec(n=n, local=None, model_init=None, model_apply=None, rounds=1, eval_every=1,
                           exchange="robust", rule=rule, rule_hyper=rule_hyper, pre=(), attack=attack,
                           attack_hyper=attack_hyper, chunk_size=chunk)


def measure(sp, arrays, graph, msg, reps: int = 2) -> tuple[float, float]:
    """(temporary bytes of one compiled exchange, seconds per exchange in steady state)."""

    def call(m, key, arrays, graph):
        return simulation.exchange(sp, key, m, arrays, graph)[0]

    # The key, the Byzantine mask and the graph are arguments, as in the engine's rounds: a constant key would let
    # XLA hoist the attack's noise out of the timed loop, and constant neighbour tables let it specialise the
    # gathers as no run can.
    args = (msg, jax.random.key(1), arrays, graph)
    temp = jax.jit(call).lower(*args).compile().memory_analysis().temp_size_in_bytes
    return temp, steady_time(call, args, reps, calls=(1, 4))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--d", type=int, default=100_000)
    p.add_argument("--graph", choices=("random_regular", "complete"), default="random_regular",
                   help="random 8-regular (K = 9) or complete (K = N, the dense-graph case)")
    args = p.parse_args(argv)
    n, d = args.n, args.d
    topo = topology.make(args.graph, n, seed=0, **({"degree": 8} if args.graph == "random_regular" else {}))
    graph = simulation.Graph(jnp.asarray(topo.neighbors), jnp.asarray(topo.mask), jnp.asarray(topo.weights))
    k = graph.neighbors.shape[1]
    byzantine = np.zeros(n, bool)
    byzantine[::16] = True
    arrays = simulation.Arrays(**{**dict.fromkeys(simulation.Arrays._fields), "byzantine": jnp.asarray(byzantine)})
    msg = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
    block = n * k * d * 4
    bandwidth = bandwidth_gbs()
    print(f"# {machine()}; copy bandwidth {bandwidth:.1f} GB/s")
    graph_name = "random 8-regular" if args.graph == "random_regular" else "complete"
    print(f"# {graph_name} graph, N={n}, K={k}, D={d:,}: block {block / 1e9:.2f} GB, read once in "
          f"{block / bandwidth / 1e6:.1f} ms; budget {simulation.GATHER_BUDGET_BYTES / 2**30:.0f} GiB")
    print("| rule | attack | whole block: temp GB | ms | chunked: receivers | temp GB | ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for rule, rh, attack, ah in CASES:
        whole = measure(spec(n, rule, rh, attack, ah, n), arrays, graph, msg)
        auto = spec(n, rule, rh, attack, ah, None)
        c = simulation.exchange_chunk(auto, n, k, d)
        chunked = measure(auto, arrays, graph, msg) if c else (float("nan"), float("nan"))
        print(f"| {rule} | {attack} | {whole[0] / 1e9:.2f} | {whole[1] * 1e3:.0f} | {c or 'all'} | "
              f"{chunked[0] / 1e9:.2f} | {chunked[1] * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()

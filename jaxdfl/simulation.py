"""The compiled experiment: one round function and the whole run as one ``lax.scan`` program.

One communication round (all nodes at once, node axis leading):

1. local training: ``local_train`` for one node, lifted with ``vmap`` (``order = "atc"``, adapt then combine; with
   ``"cta"`` it runs after the exchange, from the combined model; with ``"parallel"``, D-PSGD, it runs from the
   round-start model and its update is added to the combined round-start models, which are the messages);
2. message formation: the model (``share = "model"``) or the update since the round start (``"update"``),
   clipped and noised first when ``privacy.mode = "update"`` (the message never leaves a node un-noised);
3. exchange: plain gossip ``W @ X`` (dense or sparse) when the rule is the mean and nobody attacks; otherwise the
   neighbourhood block ``X[neighbors]: [N, K, D]`` is gathered, Byzantine rows are replaced by the attack
   (a different message per receiver), and each node aggregates its own neighbourhood with the robust rule; when
   that block (and its temporaries) would exceed :data:`GATHER_BUDGET_BYTES`, or ``parallel.chunk_size`` asks for
   it, receivers are processed c at a time in a loop so only a ``[c, K, D]`` block is ever held;
4. the node's new model: the aggregate (model sharing) or its round-start model plus the aggregated update.

``make_program(spec)`` returns ``program(key, hyper, arrays) -> (history, state)``: all rounds, with an evaluation
every ``eval_every`` rounds, in one program (an outer scan over evaluation chunks of an inner scan over rounds), so
compile time does not grow with the number of rounds and nothing recompiles between chunks. ``hyper`` holds the
numbers that may change without recompiling (see :data:`DYNAMIC`); ``arrays`` holds the data and graph.

Keys: ``key`` -> (init, rounds); round r uses ``fold_in(rounds_key, r)`` split per purpose (local training, privacy
noise, exchange = attack + aggregation, the round's graph, churn = online / straggler draws) and then per node; a
chunked exchange folds the chunk index into the aggregation key (the attack keys its draws by receiver and slot,
so chunks see the same attack as the whole block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdfl import aggregators, attacks, gossip
from jaxdfl.errors import ConfigError
from jaxdfl.privacy import mechanisms
from jaxdfl.training import LocalSpec, local_train, make_optimizer

#: Hyper-parameters passed as traced values: changing them reuses the compiled program.
DYNAMIC = ("lr", "momentum", "clip_norm", "noise_multiplier", "drop_prob", "node_dropout", "stragglers")


class Arrays(NamedTuple):
    """Device arrays the program reads (node axis leading). Passed as an argument, never baked in as constants."""

    x: jax.Array  # [N, M, ...] shards
    y: jax.Array  # [N, M]
    sizes: jax.Array  # [N]
    x_test: jax.Array  # [T, ...]
    y_test: jax.Array  # [T]
    mixing: jax.Array  # [N, N] (or [1, 1] when the dense path is unused)
    neighbors: jax.Array  # [N, K]
    mask: jax.Array  # [N, K]
    weights: jax.Array  # [N, K]
    byzantine: jax.Array  # [N] bool
    edge_id: jax.Array  # [N, K] int32: undirected edge index of each table entry (-1 on self and padding)
    inter: jax.Array  # [N, K] bool: entry is an inter-cluster (bridge) link of a hierarchical topology
    pool_neighbors: jax.Array  # [P, N, Kp] graphs to draw from each round (dynamic = "resample")
    pool_mask: jax.Array  # [P, N, Kp]
    eval_ids: jax.Array  # [E] nodes whose test accuracy is measured (all nodes, or a subset of honest ones)


class State(NamedTuple):
    """Simulator state carried across rounds."""

    theta: jax.Array  # [N, D]
    opt_state: Any  # stacked optax state
    round: jax.Array  # int32 scalar: rounds completed
    messages: jax.Array  # float32 scalar: messages sent by honest nodes so far (one per live directed edge)


@dataclass(frozen=True)
class Spec:
    """Static description of an experiment: everything that fixes shapes and code paths."""

    n: int
    local: LocalSpec
    model_init: Callable
    model_apply: Callable
    rounds: int
    eval_every: int
    init: str = "same"  # "same" | "independent"
    share: str = "model"  # "model" | "update"
    order: str = "atc"  # "atc" | "cta" | "parallel": local training before, after, or beside the exchange
    exchange: str = "sparse"  # "dense" | "sparse" | "robust"
    rule: str = "mean"
    rule_hyper: tuple = ()  # sorted (name, value) pairs
    pre: tuple = ()  # ((name, ((k, v), ...)), ...)
    attack: str = "none"
    attack_hyper: tuple = ()
    privacy: str = "none"  # "none" | "example" | "update"
    mechanism: str = "gaussian"
    chunk_size: int | None = None  # receivers per robust-exchange chunk (None: automatic; >= n: all at once)
    dynamic: str = "static"  # "static" | "resample" | "matching" | "edge_dropout"
    weights: str = "metropolis"  # scheme of the weights of a graph that changes per round (WEIGHT_SCHEMES)
    n_edges: int = 0
    node_dropout: bool = False
    stragglers: bool = False
    inter_every: int = 0  # hierarchical: bridge links live every this many rounds (0: always)
    message_bytes: int = 0  # bytes of one message (D x 4)
    accuracy_threshold: float = 0.0
    eval_batch: int = 8  # nodes evaluated at once (8 beat 64 by 1.5-3x on CPU: activations stay in cache)

    @property
    def n_evals(self) -> int:
        return self.rounds // self.eval_every

    @property
    def graph_changes(self) -> bool:
        """Whether the round's graph changes inside the program (time-varying graph, node dropout, bridges)."""
        return self.dynamic != "static" or self.node_dropout or self.inter_every > 1


def init_state(spec: Spec, key, hyper) -> State:
    """All nodes' initial parameters and optimizer states."""
    if spec.init == "same":
        theta = jnp.broadcast_to(spec.model_init(key), (spec.n, *spec.model_init(key).shape))
    else:
        theta = jax.vmap(spec.model_init)(jax.random.split(key, spec.n))
    opt = make_optimizer(spec.local.optimizer, hyper["lr"], hyper["momentum"] if spec.local.momentum else None)
    return State(theta, jax.vmap(opt.init)(theta), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))


class Graph(NamedTuple):
    """The communication graph of one round as a neighbour table. ``[N, K]`` each."""

    neighbors: jax.Array
    mask: jax.Array
    weights: jax.Array


def metropolis_weights(neighbors, mask):
    """Metropolis-Hastings weights of the graph a mask leaves: W_ij = 1 / (1 + max(d_i, d_j)), W_ii the rest.

    ``neighbors, mask: [N, K]`` (column 0 = self, always valid) -> ``[N, K]`` float32 (0 on masked entries).
    """
    deg = jnp.sum(mask, axis=1) - 1
    w = jnp.where(mask, 1.0 / (1.0 + jnp.maximum(deg[:, None], deg[neighbors])), 0.0)
    w = w.at[:, 0].set(0.0)
    return w.at[:, 0].set(1.0 - jnp.sum(w, axis=1)).astype(jnp.float32)


def max_degree_weights(neighbors, mask):
    """Max-degree weights of the graph a mask leaves: W_ij = 1 / (1 + d_max) on its edges, W_ii the rest.

    ``d_max`` is the largest degree of the surviving graph. ``neighbors, mask: [N, K]`` -> ``[N, K]`` float32.
    """
    deg = jnp.sum(mask, axis=1) - 1
    w = jnp.where(mask, 1.0 / (1.0 + jnp.max(deg)), 0.0)
    return w.at[:, 0].set(1.0 - deg / (1.0 + jnp.max(deg))).astype(jnp.float32)


#: Mixing weights of a graph that changes inside the program, by ``topology.weights`` scheme.
WEIGHT_SCHEMES = {"metropolis": metropolis_weights, "max_degree": max_degree_weights}


def random_matching(key, neighbors, mask, edge_id, n_edges: int) -> Graph:
    """A random maximal matching of the graph's live edges: one-peer gossip, weights 1/2 on each matched pair.

    Definition: draw a uniformly random order of the undirected edges and scan it greedily, keeping an edge when
    neither end is matched yet (randomised gossip over a matching of the graph; Boyd et al. 2006). Computed in
    parallel: with distinct priorities the greedy matching is the one of "locally dominant" edges (an edge whose
    priority is the largest among the free edges at both ends; Preis 1999), so each step matches every such edge
    and a ``while_loop`` repeats until no free node has a free neighbour (O(log N) steps on random priorities).
    On the complete graph this is a uniformly random (near-)perfect matching. A node left without a partner keeps
    its own model for the round.

    Args:
        key: the round's graph key.
        neighbors, mask: [N, K] the round's neighbour table (column 0 = self).
        edge_id: [N, K] undirected edge index of each entry (-1 on self and padding).
        n_edges: the number of undirected edges.

    Returns:
        :class:`Graph` with ``[N, 2]`` tables: self and partner.
    """
    n = neighbors.shape[0]
    live = mask & (edge_id >= 0)
    eid = jnp.maximum(edge_id, 0)
    # priority = (random word, edge id) in lexicographic order: distinct, so the global best free edge is always
    # locally dominant and every step matches at least one pair.
    word = jax.random.bits(key, (max(n_edges, 1),), jnp.uint32)[eid]
    ids = jnp.arange(n)

    def step(carry):
        partner, _ = carry
        free = partner < 0
        avail = live & free[:, None] & free[neighbors]
        top = jnp.max(jnp.where(avail, word, 0), axis=1, keepdims=True)
        best = jnp.argmax(jnp.where(avail & (word == top), eid, -1), axis=1)
        has = jnp.any(avail, axis=1)
        choice = jnp.where(has, neighbors[ids, best], -1)
        mutual = has & (choice[jnp.maximum(choice, 0)] == ids)
        return jnp.where(mutual, choice, partner), jnp.any(has)

    partner, _ = jax.lax.while_loop(lambda c: c[1], step, (jnp.full(n, -1, jnp.int32), jnp.bool_(True)))
    matched = partner >= 0
    return _pairs(jnp.where(matched, partner, ids), matched)


def complete_matching(key, online) -> Graph:
    """A uniformly random (near-)perfect matching of the online nodes of a complete graph, in O(N log N).

    The online nodes in a random order are paired off two by two: the same distribution as
    :func:`random_matching` on the complete graph (which costs O(N^2) per step there). ``online: [N]`` bool.
    """
    n = online.shape[0]
    order = jnp.argsort(jnp.where(online, 0, n) + jax.random.permutation(key, n))  # online first, shuffled
    ids = jnp.arange(n)
    slot = jnp.zeros(n, jnp.int32).at[order].set(ids)
    other = jnp.minimum(slot ^ 1, n - 1)
    partner = order[other]
    matched = online & online[partner] & (partner != ids)
    return _pairs(jnp.where(matched, partner, ids), matched)


def _pairs(partner, matched) -> Graph:
    """``[N, 2]`` tables of a matching: self and partner, weights 1/2 each (1 on self when unmatched)."""
    ids = jnp.arange(partner.shape[0])
    weights = jnp.stack([jnp.where(matched, 0.5, 1.0), jnp.where(matched, 0.5, 0.0)], axis=1)
    return Graph(jnp.stack([ids, partner], axis=1).astype(jnp.int32), jnp.stack([jnp.ones_like(matched), matched], 1),
                 weights.astype(jnp.float32))


def graph_spec(spec: Spec) -> Spec:
    """``spec`` reduced to the fields :func:`round_graph` and :func:`online_nodes` read (the rest at placeholders), so
    that programs drawing round graphs alone are shared by every experiment with the same graph settings."""
    return Spec(n=spec.n, local=None, model_init=None, model_apply=None, rounds=1, eval_every=1, dynamic=spec.dynamic,
                weights=spec.weights, n_edges=spec.n_edges, node_dropout=spec.node_dropout,
                inter_every=spec.inter_every)


def round_graph(spec: Spec, hyper, arrays: Arrays, key, round_index, online):
    """This round's graph: the static table, or one drawn from the round key (inside the compiled program).

    ``edge_dropout`` removes each undirected edge independently with ``hyper["drop_prob"]``; ``resample`` picks one
    of a pool of graphs of the same family drawn on the host; a hierarchical topology keeps its bridge links only
    every ``inter_every`` rounds; node dropout removes offline nodes' links; ``matching`` then draws a random
    maximal matching of the links left (:func:`random_matching`; on the complete graph the equivalent
    :func:`complete_matching`). Whenever links change, the weights are
    recomputed on the surviving graph with the topology's scheme (``spec.weights``: Metropolis-Hastings or
    max-degree).
    """
    if spec.dynamic == "resample":
        pick = jax.random.randint(key, (), 0, arrays.pool_neighbors.shape[0], jnp.int32)
        neighbors, mask = arrays.pool_neighbors[pick], arrays.pool_mask[pick]
    else:
        neighbors, mask = arrays.neighbors, arrays.mask
    if spec.dynamic == "edge_dropout":
        alive = jax.random.bernoulli(key, 1.0 - hyper["drop_prob"], (max(spec.n_edges, 1),))
        mask = mask & ((arrays.edge_id < 0) | alive[jnp.maximum(arrays.edge_id, 0)])
    if spec.inter_every > 1:
        mask = mask & (~arrays.inter | (round_index % spec.inter_every == 0))
    if spec.node_dropout:
        mask = mask & online[neighbors] & online[:, None]
    mask = mask.at[:, 0].set(True)
    if spec.dynamic == "matching":
        if spec.n_edges == spec.n * (spec.n - 1) // 2:
            return complete_matching(key, online)
        return random_matching(key, neighbors, mask, arrays.edge_id, spec.n_edges)
    if not spec.graph_changes:
        return Graph(neighbors, mask, arrays.weights)
    return Graph(neighbors, mask, WEIGHT_SCHEMES[spec.weights](neighbors, mask))


def _bound_rule(spec: Spec, key):
    """The receivers' pipeline as one-node ``rule(x, mask, weights) -> [D]`` for the adaptive attacks' search: the
    pre-aggregators, then the rule. A random pre-aggregator (bucketing) draws from ``key``, a subkey the attacker
    keeps for this model of the receivers: one guess of the buckets, the same for every receiver."""
    rule = aggregators.REGISTRY[spec.rule]
    hyper = dict(spec.rule_hyper)
    pre = [(aggregators.PRE_REGISTRY[name], dict(h)) for name, h in spec.pre]

    def bound(x, mask, weights):
        for fn, h in pre:
            x, mask, weights = fn(key, x, mask, weights, **h)
        return rule(x, mask, weights, **hyper)

    return bound


#: Bytes the robust exchange may hold at once for the gathered neighbourhood block and its temporaries (the attacked
#: copy, the pre-aggregators' outputs, the rule's and the attack's working arrays; see :func:`exchange_chunk`). Above
#: it receivers are processed in chunks. 1 GiB keeps the benchmark suite's largest robust run (N = 4096 on a ring,
#: K = 3, a 4,810-parameter MLP: 0.7 GB estimated) in one piece and cuts N = 1000, K = 9, D = 1e6 (a 36 GB block)
#: into chunks of 9 receivers under ``sign_flip`` (0.32 GB of temporaries in XLA's CPU memory analysis, against
#: 36 GB unchunked).
GATHER_BUDGET_BYTES = 1 << 30


def exchange_temporaries(spec: Spec, k: int, d: int) -> float:
    """Per-receiver working set of the robust exchange, in units of one ``[K, D]`` neighbourhood (conservative).

    The gathered rows (1), the attacked copy of them (1), the attack's ``[N, D]`` messages (1 / K), the temporaries
    of the pre-aggregators and the rule (``aggregators.temporaries``: the copies of each pre-aggregator's output, the
    pair-sum buffers), and 5 for the candidate blocks and rule evaluations of the adaptive ``alie`` / ``ipm``
    search. The estimate is an upper bound: XLA often fuses the gather and the attack into the rule's loop. Its CPU
    memory analysis (N = 64, K = 9, D = 1,000-20,000, unchunked, the graph an argument) reports 0.2 blocks for the
    median under ``sign_flip``, 1.0-1.1 under ``gaussian``, 2.0-2.2 for Krum under ``sign_flip``, 2.0-2.2 after
    ``nnm`` or ``clip`` with the median, 4.0 for multi-Krum after ``nnm`` at D = 20,000 (5.05 planned); under the
    adaptive search 3.6 for the median, 6.1-6.4 for Krum and the geometric median, 6.1-7.2 for multi-Krum (7.3
    planned), 5.4-6.5 for the median after ``nnm``.
    """
    pre = [(name, dict(h)) for name, h in spec.pre]
    t = 2.0 + 1 / k + aggregators.temporaries(spec.rule, pre, k, d)
    if dict(spec.attack_hyper).get("adaptive"):
        t += 5.0
    return t


def exchange_chunk(spec: Spec, n: int, k: int, d: int, itemsize: int = 4) -> int | None:
    """Receivers per chunk of the robust exchange, or None to gather all ``[N, K, D]`` at once.

    ``spec.chunk_size`` (config ``parallel.chunk_size``) wins when set: c >= N means all at once. Otherwise
    (automatic) the exchange is chunked only when ``N * exchange_temporaries(spec, K, D) * K * D * itemsize`` exceeds
    :data:`GATHER_BUDGET_BYTES`; the chunk is then the largest that fits, evened out over the chunks it needs
    (``aggregators.even_chunk``) so that the last chunk recomputes fewer receivers than there are chunks.

    Raises:
        ConfigError: ``spec.chunk_size`` is not a non-negative integer (or None).
    """
    c = spec.chunk_size
    if c is not None:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ConfigError(f"parallel.chunk_size must be an integer >= 0 (0: automatic), got {c!r}")
        if c:
            return None if c >= n else int(c)
    per_receiver = exchange_temporaries(spec, k, d) * k * d * itemsize
    if n * per_receiver <= GATHER_BUDGET_BYTES:
        return None
    return aggregators.even_chunk(n, max(1, int(GATHER_BUDGET_BYTES // per_receiver)))


def _robust_exchange(spec: Spec, k_attack, k_agg, msg, byzantine, neighbors, mask, weights, chunk_size):
    """Gather, attack and aggregate for the receivers in ``neighbors, mask, weights: [R, K]``.

    ``msg: [N, D]`` and ``byzantine: [N]`` are global: the omniscient attacker sees every message, whichever
    receivers are being served. Returns ``(aggregates [R, D], kept_own [R] bool)``: ``kept_own`` marks receivers
    left with fewer rows than the pre-aggregators and rule need (``aggregators.enough_rows``), which keep their own
    message.
    """
    block = gossip.gather(msg, neighbors)
    if spec.attack != "none":
        k_model = None
        if spec.pre:  # only then does the attacker's model of the receivers draw anything
            k_attack, k_model = jax.random.split(k_attack)
        ctx = attacks.AttackContext(messages=msg, block=block, neighbors=neighbors, mask=mask,
                                    weights=weights, byzantine=byzantine, rule=_bound_rule(spec, k_model))
        block, mask = attacks.REGISTRY[spec.attack](k_attack, ctx, **dict(spec.attack_hyper))
    pre = tuple((name, dict(h)) for name, h in spec.pre)
    agg = aggregators.aggregate(k_agg, block, mask, weights, spec.rule, dict(spec.rule_hyper), pre,
                                chunk_size=chunk_size)
    return agg, ~aggregators.enough_rows(jnp.sum(mask, axis=1), spec.rule, dict(spec.rule_hyper), pre)


def exchange(spec: Spec, key, msg, arrays: Arrays, graph: Graph):
    """Each node's aggregate of its neighbourhood's messages: ``msg [N, D] -> ([N, D], kept_own [N])``.

    Linear paths (``dense``, ``sparse``) never build the ``[N, K, D]`` block. The robust path gathers it, lets the
    attack rewrite the Byzantine rows, aggregates every neighbourhood with the rule, and keeps a node's own message
    where too few rows survive (``aggregators.enough_rows``; ``kept_own`` marks those nodes, all False on the
    linear paths).

    When :func:`exchange_chunk` asks for chunks of c receivers, it does the same for c receivers at a time inside
    one ``fori_loop`` (so the program does not grow with the number of chunks): chunk j serves receivers ``s_j ..
    s_j + c - 1`` with ``s_j = min(j c, N - c)``, gathers only their ``[c, K, D]`` rows and writes their aggregates
    in place into the ``[N, D]`` result; when c does not divide N the last chunk overlaps the one before (those
    receivers are recomputed and overwritten) instead of padding N, which would need one more ``[N, D]`` buffer. The
    attack sees the chunk's receiver rows and all N messages (every attack is row-wise in the receivers). Attacks
    (the ``gaussian`` noise is keyed by receiver id and slot) and deterministic rules give the unchunked result up
    to float rounding. The per-node keys of random pre-aggregators (``bucketing``) come from ``fold_in(key, j)``
    instead: a chunked run buckets differently than an unchunked one, but the same seed and chunk size always give
    the same result.

    Args:
        spec: the static experiment description (exchange path, rule, attack, chunk_size).
        key: PRNG key of the round's exchange (split into attack and aggregation keys).
        msg: [N, D] every node's outgoing message.
        arrays: the device arrays (``byzantine`` [N], ``mixing`` [N, N] on the dense path).
        graph: the round's neighbour table (``neighbors, mask, weights``: [N, K]).

    Returns:
        ([N, D] in the dtype of ``msg``, [N] bool).
    """
    n, k = graph.neighbors.shape
    if spec.exchange == "dense":
        return gossip.dense(arrays.mixing, msg), jnp.zeros(n, bool)
    if spec.exchange == "sparse":
        return gossip.sparse(graph.neighbors, graph.weights, msg), jnp.zeros(n, bool)
    k_attack, k_agg = jax.random.split(key)
    c = exchange_chunk(spec, n, k, msg.shape[1], msg.dtype.itemsize)
    if c is None:
        return _robust_exchange(spec, k_attack, k_agg, msg, arrays.byzantine, graph.neighbors, graph.mask,
                                graph.weights, spec.chunk_size or None)

    def chunk(i, start):
        rows = [jax.lax.dynamic_slice_in_dim(table, start, c) for table in graph]
        # an automatic chunk fits the budget, so aggregate()'s own automatic chunking (None) is a no-op there; it
        # still splits a user-given chunk whose rule temporaries exceed aggregators.MEMORY_BUDGET_BYTES
        return _robust_exchange(spec, k_attack, jax.random.fold_in(k_agg, i), msg, arrays.byzantine, *rows, None)

    return aggregators.over_chunks(n, c, chunk, (jnp.zeros_like(msg), jnp.zeros(n, bool)))


def online_nodes(spec: Spec, hyper, key) -> jax.Array:
    """``[N]`` bool: the nodes online this round (each offline with ``hyper["node_dropout"]``; all without it)."""
    if not spec.node_dropout:
        return jnp.ones(spec.n, bool)
    return jax.random.bernoulli(key, 1.0 - hyper["node_dropout"], (spec.n,))


def round_step(spec: Spec, hyper, arrays: Arrays, state: State, key) -> tuple[State, tuple[jax.Array, jax.Array]]:
    """One communication round for all nodes.

    Returns the new state and ``(consensus, kept_own)``: the honest consensus distance, and the share of honest
    nodes that kept their own message because too few rows reached them for the rule (``exchange``).
    """
    k_train, k_priv, k_exchange, k_graph, k_churn = jax.random.split(key, 5)
    k_online, k_slow, k_steps = jax.random.split(k_churn, 3)
    online = online_nodes(spec, hyper, k_online)
    steps = jnp.full(spec.n, spec.local.local_steps, jnp.int32)
    if spec.stragglers:  # a straggler completes a uniform 0..local_steps-1 of its steps
        slow = jax.random.bernoulli(k_slow, hyper["stragglers"], (spec.n,))
        steps = jnp.where(slow, jax.random.randint(k_steps, (spec.n,), 0, spec.local.local_steps, jnp.int32), steps)
    steps = jnp.where(online, steps, 0)
    train = jax.vmap(lambda k, t, o, x, y, s, st: local_train(spec.local, k, t, o, x, y, s, hyper, st))

    def adapt(theta):
        """Local training from ``theta``: the (privatised) update and the new optimiser state."""
        theta1, opt_state, _ = train(jax.random.split(k_train, spec.n), theta, state.opt_state,
                                     arrays.x, arrays.y, arrays.sizes, steps)
        delta = theta1 - theta
        if spec.privacy == "update":
            noisy = jax.vmap(lambda k, d: mechanisms.privatize_update(
                k, d, hyper["clip_norm"], hyper["noise_multiplier"], spec.mechanism))
            delta = noisy(jax.random.split(k_priv, spec.n), delta)
        return delta, opt_state

    graph = round_graph(spec, hyper, arrays, k_graph, state.round, online)

    def combine(msg):
        return exchange(spec, k_exchange, msg, arrays, graph)

    if spec.order == "atc":  # train, then combine the trained models (or the updates)
        delta, opt_state = adapt(state.theta)
        agg, kept_own = combine(delta if spec.share == "update" else state.theta + delta)
        theta = state.theta + agg if spec.share == "update" else agg
    else:  # combine the round-start models; add the update trained from the combination (cta) or beside it (D-PSGD)
        mixed, kept_own = combine(state.theta)
        delta, opt_state = adapt(mixed if spec.order == "cta" else state.theta)
        theta = mixed + delta
    theta = jnp.where(online[:, None], theta, state.theta)  # an offline node neither trains nor mixes
    honest = ~arrays.byzantine
    sent = jnp.sum(jnp.where(honest[:, None], graph.mask[:, 1:], False))
    new = State(theta, opt_state, state.round + 1, state.messages + sent.astype(jnp.float32))
    kept_share = jnp.sum(kept_own & honest & online) / jnp.sum(honest)
    return new, (consensus_distance(theta, honest), kept_share)


def consensus_distance(theta, honest):
    """Mean over honest nodes of ``||x_i - mean_honest(x)||^2``. ``theta: [N, D]``, ``honest: [N]``."""
    count = jnp.sum(honest)
    mean_model = jnp.sum(jnp.where(honest[:, None], theta, 0.0), axis=0) / count
    sq = jnp.sum((theta - mean_model) ** 2, axis=1)
    return jnp.sum(jnp.where(honest, sq, 0.0)) / count


def evaluate(spec: Spec, arrays: Arrays, theta) -> dict[str, jax.Array]:
    """Test metrics over honest nodes: accuracy mean/min/max, loss mean, consensus distance, the share of honest
    nodes at or above ``accuracy_threshold``, the share whose parameters are non-finite, and each evaluated node's
    accuracy (``accuracy_per_node [len(eval_ids)]``, NaN for Byzantine nodes)."""
    honest_all = ~arrays.byzantine
    theta_eval = theta[arrays.eval_ids]  # all nodes, or the configured subset
    honest = honest_all[arrays.eval_ids]
    finite = jnp.all(jnp.isfinite(theta_eval), axis=1)

    def one(t):
        logits = spec.model_apply(t, arrays.x_test)
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(logp, arrays.y_test[:, None], axis=1))
        return jnp.mean(jnp.argmax(logits, -1) == arrays.y_test), loss

    # nodes in batches: the [nodes, test examples, features] activations stay bounded for large N
    acc, loss = jax.lax.map(one, theta_eval, batch_size=min(spec.eval_batch, theta_eval.shape[0]))
    acc = jnp.where(finite, acc, 0.0)
    count = jnp.sum(honest)
    inf = jnp.asarray(jnp.inf, acc.dtype)
    return {
        "accuracy_mean": jnp.sum(jnp.where(honest, acc, 0.0)) / count,
        "accuracy_min": jnp.min(jnp.where(honest, acc, inf)),
        "accuracy_max": jnp.max(jnp.where(honest, acc, -inf)),
        "loss_mean": jnp.sum(jnp.where(honest, loss, 0.0)) / count,
        "consensus_distance": consensus_distance(theta, honest_all),
        "above_threshold": jnp.sum(honest & (acc >= spec.accuracy_threshold)) / count,
        "diverged": jnp.sum(honest_all & ~jnp.all(jnp.isfinite(theta), axis=1)) / jnp.sum(honest_all),
        "accuracy_per_node": jnp.where(honest, acc, jnp.nan),
    }


def make_segment(spec: Spec, n_chunks: int):
    """``segment(state, rounds_key, hyper, arrays) -> (history, state)``: ``n_chunks`` evaluation chunks.

    Each chunk runs ``eval_every`` rounds (a ``lax.scan``) and then evaluates; ``history`` maps each metric (and
    ``round``) to ``[n_chunks]``. Round keys come from ``fold_in(rounds_key, state.round)``, so running the
    segments of a run one after another (checkpointing) gives exactly the one-segment result.
    """

    def segment(state: State, k_rounds, hyper, arrays: Arrays):
        def one_round(state, _):
            key_r = jax.random.fold_in(k_rounds, state.round)
            return round_step(spec, hyper, arrays, state, key_r)

        def chunk(state, _):
            state, (consensus, kept_own) = jax.lax.scan(one_round, state, None, length=spec.eval_every)
            metrics = evaluate(spec, arrays, state.theta)
            metrics["round"] = state.round
            metrics["consensus_per_round"] = consensus  # [eval_every]
            metrics["kept_own_share"] = jnp.mean(kept_own)
            honest = jnp.sum(~arrays.byzantine)
            metrics["messages_per_node"] = state.messages / honest  # cumulative, honest senders
            metrics["bytes_per_node"] = state.messages / honest * spec.message_bytes
            return state, metrics

        state, history = jax.lax.scan(chunk, state, None, length=n_chunks)
        return history, state

    return segment


def make_program(spec: Spec):
    """The whole experiment as one function ``program(key, hyper, arrays) -> (history, final_state)``.

    ``history`` maps each metric (and ``round``) to an array ``[n_evals]``. Jit it (and vmap it over keys for
    seeds); its compile time does not depend on ``spec.rounds``.
    """
    segment = make_segment(spec, spec.n_evals)

    def program(key, hyper, arrays: Arrays):
        k_init, k_rounds = jax.random.split(key)
        return segment(init_state(spec, k_init, hyper), k_rounds, hyper, arrays)

    return program


def python_loop_program(spec: Spec):
    """The same experiment driven round by round from Python (reference for tests; not for speed)."""
    step = jax.jit(lambda hyper, arrays, state, key: round_step(spec, hyper, arrays, state, key))
    ev = jax.jit(lambda arrays, theta: evaluate(spec, arrays, theta))

    def program(key, hyper, arrays):
        k_init, k_rounds = jax.random.split(key)
        state = init_state(spec, k_init, hyper)
        rows, per_round, kept = [], [], []
        for r in range(spec.rounds):
            state, (cons, kept_share) = step(hyper, arrays, state, jax.random.fold_in(k_rounds, r))
            per_round.append(cons)
            kept.append(kept_share)
            if (r + 1) % spec.eval_every == 0:
                m = ev(arrays, state.theta)
                m["round"] = state.round
                m["consensus_per_round"] = np.stack(per_round[-spec.eval_every:])
                m["kept_own_share"] = np.mean(kept[-spec.eval_every:])
                honest = np.sum(~np.asarray(arrays.byzantine))
                m["messages_per_node"] = state.messages / honest
                m["bytes_per_node"] = state.messages / honest * spec.message_bytes
                rows.append(m)
        history = {k: np.stack([np.asarray(row[k]) for row in rows]) for k in rows[0]}
        return history, state

    return program

"""The compiled experiment: one round function and the whole run as one ``lax.scan`` program.

One communication round (all nodes at once, node axis leading):

1. local training: ``local_train`` for one node, lifted with ``vmap``;
2. message formation: the model (``share = "model"``) or the update since the round start (``"update"``),
   clipped and noised first when ``privacy.mode = "update"`` (the message never leaves a node un-noised);
3. exchange: plain gossip ``W @ X`` (dense or sparse) when the rule is the mean and nobody attacks; otherwise the
   neighbourhood block ``X[neighbors]: [N, K, D]`` is gathered, Byzantine rows are replaced by the attack
   (a different message per receiver), and each node aggregates its own neighbourhood with the robust rule;
4. the node's new model: the aggregate (model sharing) or its round-start model plus the aggregated update.

``make_program(spec)`` returns ``program(key, hyper, arrays) -> (history, state)``: all rounds, with an evaluation
every ``eval_every`` rounds, in one program (an outer scan over evaluation chunks of an inner scan over rounds), so
compile time does not grow with the number of rounds and nothing recompiles between chunks. ``hyper`` holds the
numbers that may change without recompiling (see :data:`DYNAMIC`); ``arrays`` holds the data and graph.

Keys: ``key`` -> (init, rounds); round r uses ``fold_in(rounds_key, r)`` split per purpose (train, privacy, attack,
aggregation) and then per node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdfl import aggregators, attacks, gossip
from jaxdfl.privacy import mechanisms
from jaxdfl.training import LocalSpec, local_train, make_optimizer

#: Metrics of :func:`evaluate`, plus the round they were taken at.
METRIC_NAMES = ("accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean", "consensus_distance", "diverged",
                "round")

#: Hyper-parameters passed as traced values: changing them reuses the compiled program.
DYNAMIC = ("lr", "momentum", "clip_norm", "noise_multiplier")


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


class State(NamedTuple):
    """Simulator state carried across rounds."""

    theta: jax.Array  # [N, D]
    opt_state: Any  # stacked optax state
    round: jax.Array  # int32 scalar: rounds completed


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
    exchange: str = "sparse"  # "dense" | "sparse" | "robust"
    rule: str = "mean"
    rule_hyper: tuple = ()  # sorted (name, value) pairs
    pre: tuple = ()  # ((name, ((k, v), ...)), ...)
    attack: str = "none"
    attack_hyper: tuple = ()
    privacy: str = "none"  # "none" | "example" | "update"
    mechanism: str = "gaussian"
    chunk_size: int | None = None
    progress: Callable | None = field(default=None, compare=False)

    @property
    def n_evals(self) -> int:
        return self.rounds // self.eval_every


def init_state(spec: Spec, key, hyper) -> State:
    """All nodes' initial parameters and optimizer states."""
    if spec.init == "same":
        theta = jnp.broadcast_to(spec.model_init(key), (spec.n, *spec.model_init(key).shape))
    else:
        theta = jax.vmap(spec.model_init)(jax.random.split(key, spec.n))
    opt = make_optimizer(spec.local.optimizer, hyper["lr"], hyper["momentum"])
    return State(theta, jax.vmap(opt.init)(theta), jnp.zeros((), jnp.int32))


def _bound_rule(spec: Spec):
    rule = aggregators.REGISTRY[spec.rule]
    hyper = dict(spec.rule_hyper)
    return lambda x, mask, weights: rule(x, mask, weights, **hyper)


def exchange(spec: Spec, key, msg, arrays: Arrays):
    """Each node's aggregate of its neighbourhood's messages: ``msg [N, D] -> [N, D]``."""
    if spec.exchange == "dense":
        return gossip.dense(arrays.mixing, msg)
    if spec.exchange == "sparse":
        return gossip.sparse(arrays.neighbors, arrays.weights, msg)
    k_attack, k_agg = jax.random.split(key)
    block = gossip.gather(msg, arrays.neighbors)
    mask = arrays.mask
    if spec.attack != "none":
        ctx = attacks.AttackContext(messages=msg, block=block, neighbors=arrays.neighbors, mask=mask,
                                    weights=arrays.weights, byzantine=arrays.byzantine, rule=_bound_rule(spec))
        block, mask = attacks.REGISTRY[spec.attack](k_attack, ctx, **dict(spec.attack_hyper))
    pre = tuple((name, dict(h)) for name, h in spec.pre)
    return aggregators.aggregate(k_agg, block, mask, arrays.weights, spec.rule, dict(spec.rule_hyper), pre,
                                 chunk_size=spec.chunk_size)


def round_step(spec: Spec, hyper, arrays: Arrays, state: State, key) -> tuple[State, jax.Array]:
    """One communication round for all nodes. Returns the new state and the nodes' mean local loss ``[N]``."""
    k_train, k_priv, k_exchange = jax.random.split(key, 3)
    train = jax.vmap(lambda k, t, o, x, y, s: local_train(spec.local, k, t, o, x, y, s, hyper))
    theta1, opt_state, loss = train(jax.random.split(k_train, spec.n), state.theta, state.opt_state,
                                    arrays.x, arrays.y, arrays.sizes)
    delta = theta1 - state.theta
    if spec.privacy == "update":
        noisy = jax.vmap(lambda k, d: mechanisms.privatize_update(
            k, d, hyper["clip_norm"], hyper["noise_multiplier"], spec.mechanism))
        delta = noisy(jax.random.split(k_priv, spec.n), delta)
    msg = delta if spec.share == "update" else state.theta + delta
    agg = exchange(spec, k_exchange, msg, arrays)
    theta = state.theta + agg if spec.share == "update" else agg
    return State(theta, opt_state, state.round + 1), loss


def evaluate(spec: Spec, arrays: Arrays, theta) -> dict[str, jax.Array]:
    """Test metrics over honest nodes: accuracy mean/min/max, loss mean, consensus distance, diverged share."""
    honest = ~arrays.byzantine
    finite = jnp.all(jnp.isfinite(theta), axis=1)

    def one(t):
        logits = spec.model_apply(t, arrays.x_test)
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(logp, arrays.y_test[:, None], axis=1))
        return jnp.mean(jnp.argmax(logits, -1) == arrays.y_test), loss

    acc, loss = jax.vmap(one)(theta)
    acc = jnp.where(finite, acc, 0.0)
    count = jnp.sum(honest)
    mean_model = jnp.sum(jnp.where(honest[:, None], theta, 0.0), axis=0) / count
    sq = jnp.sum((theta - mean_model) ** 2, axis=1)
    inf = jnp.asarray(jnp.inf, acc.dtype)
    return {
        "accuracy_mean": jnp.sum(jnp.where(honest, acc, 0.0)) / count,
        "accuracy_min": jnp.min(jnp.where(honest, acc, inf)),
        "accuracy_max": jnp.max(jnp.where(honest, acc, -inf)),
        "loss_mean": jnp.sum(jnp.where(honest, loss, 0.0)) / count,
        "consensus_distance": jnp.sum(jnp.where(honest, sq, 0.0)) / count,
        "diverged": jnp.sum(honest & ~finite) / count,
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
            state, _ = jax.lax.scan(one_round, state, None, length=spec.eval_every)
            metrics = evaluate(spec, arrays, state.theta)
            metrics["round"] = state.round
            if spec.progress is not None:
                jax.debug.callback(spec.progress, state.round // spec.eval_every - 1)
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
    step = jax.jit(lambda hyper, arrays, state, key: round_step(spec, hyper, arrays, state, key)[0])
    ev = jax.jit(lambda arrays, theta: evaluate(spec, arrays, theta))

    def program(key, hyper, arrays):
        k_init, k_rounds = jax.random.split(key)
        state = init_state(spec, k_init, hyper)
        rows = []
        for r in range(spec.rounds):
            state = step(hyper, arrays, state, jax.random.fold_in(k_rounds, r))
            if (r + 1) % spec.eval_every == 0:
                m = ev(arrays, state.theta)
                m["round"] = state.round
                rows.append(m)
        history = {k: np.stack([np.asarray(row[k]) for row in rows]) for k in rows[0]}
        return history, state

    return program

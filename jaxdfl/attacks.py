"""Byzantine attacks on the gathered neighbourhood block (jitted kernels).

Every attack acts on what the receivers see. The engine gathers, for each node i, the messages of its neighbourhood
into a block ``[N, K, D]`` (row 0 = i itself, padding rows masked out) and passes it here with the graph arrays in an
:class:`AttackContext`. An attack returns the block each receiver actually gets: every valid row k > 0 whose sender
``neighbors[i, k]`` is Byzantine is replaced by the message that sender sends to *that* receiver (the omniscient
setting: the message may depend on the receiver's model and on its honest neighbours' messages), and every other row
is left bit-for-bit untouched. ``crash`` instead drops those rows from the mask.

All kernels are whole-array operations over the node axis (no Python loops over nodes) and jit-compatible. Numeric
hyper-parameters (``scale``, ``sigma``, ``eps``, ``z`` given as a number, ``value``, ``search_max``) may be traced
scalars; the others (``target``, ``center``, ``adaptive``, ``z=None``) select code paths and must be static Python
values.

Conventions shared by the attacks
---------------------------------
- Honest rows of receiver i: its own row 0 and the valid rows whose sender is honest. ``mu_i`` and ``sigma_i`` are
  the coordinate-wise mean and (population, ddof=0) standard deviation of those rows, unweighted.
- Attacked rows of receiver i: valid rows k > 0 whose sender is Byzantine; ``b_i`` is their number and ``n_i`` the
  number of valid rows (self included).
- Rows of Byzantine receivers are computed by the same formulas. A Byzantine node's own aggregate becomes its next
  model, as an honest node's does: it is what ``sign_flip(target="own")`` sends next round. A non-finite value can
  reach an honest receiver only as an attacked row of ``inf`` (by design) or when a Byzantine sender's own message
  is non-finite and ``sign_flip(target="own")`` / ``mimic`` copies it.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from jaxdfl import rng
from jaxdfl.errors import ConfigError
from jaxdfl.registry import Shipped, layout, shown, traced

__all__ = [
    "AttackContext",
    "DEFAULTS",
    "POISONING",
    "REGISTRY",
    "alie",
    "alie_z",
    "attacked_rows",
    "crash",
    "dissensus",
    "flip_labels",
    "gaussian",
    "honest_rows",
    "honest_stats",
    "inf",
    "ipm",
    "isolation",
    "label_flip",
    "large_norm",
    "mimic",
    "none",
    "replace_rows",
    "resolve",
    "sign_flip",
    "validate",
]


class AttackContext(NamedTuple):
    """Everything an attack may look at (the omniscient adversary), for all N receivers at once.

    The engine may serve the receivers in chunks: then ``block``, ``neighbors``, ``mask`` and ``weights`` hold R < N
    receivers' rows while ``messages`` and ``byzantine`` stay global, so an attack must treat receivers row by row
    (every attack here does) and size node-id checks on ``messages``. Every chunk gets the same attack ``key``: an
    attack that draws random numbers should fold the receiver id ``neighbors[:, 0]`` into it, as :func:`gaussian`
    does, or receivers in the same position of different chunks get the same draws.

    Fields:
        messages: [N, D] what every node would send if honest (Byzantine rows: what it computed training honestly).
        block: [N, K, D] messages[neighbors]; row 0 of receiver i is i itself.
        neighbors: [N, K] int32 node ids; padding entries point at the receiver itself.
        mask: [N, K] bool, valid rows (row 0 always True).
        weights: [N, K] float32 mixing weights W_ij (0 on padding).
        byzantine: [N] bool, Byzantine node mask.
        rule: one-node aggregation rule ``rule(x [K, D], mask [K], weights [K]) -> [D]`` bound to its
            hyper-parameters, used by the adaptive search of ``alie`` and ``ipm``; None when not available.
    """

    messages: jax.Array
    block: jax.Array
    neighbors: jax.Array
    mask: jax.Array
    weights: jax.Array
    byzantine: jax.Array
    rule: Callable | None = None


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------

# ALIE's normal quantile is taken at a probability clipped to [_P_MIN, 1 - _P_MIN] (|z_max| <= 3.72): the paper's
# formula has no solution when the Byzantine senders are already a majority (p > 1) or when only the receiver is
# honest (p = 0), and an infinite z would turn the attack into `inf`.
_P_MIN = 1e-4

# Adaptive strength search (alie, ipm): _GRID_POINTS candidates search_max * 2^-(G-1), ..., search_max / 2,
# search_max, then _GOLDEN_ITERS golden-section steps between the grid neighbours of the best candidate; the
# non-adaptive scale is always a candidate, so the result is never less damaging than it. Costs
# _GRID_POINTS + 3 + _GOLDEN_ITERS evaluations of the rule on the whole block.
_GRID_POINTS = 12
_GOLDEN_ITERS = 8
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # 1/phi = 0.618...

# ndtri is a long chain of small ops; compiling it as one program keeps eager (test, notebook) calls fast. Inside
# an outer jit it is inlined like any other function.
_normal_ppf = jax.jit(norm.ppf)


def _row0(ctx: AttackContext) -> jax.Array:
    """[1, K] bool: True at the receiver's own row."""
    return (jnp.arange(ctx.mask.shape[1]) == 0)[None, :]


def attacked_rows(ctx: AttackContext) -> jax.Array:
    """Rows of each receiver's block that a Byzantine sender controls.

    Definition: a[i, k] = mask[i, k] and byzantine[neighbors[i, k]] and k > 0.

    Args:
        ctx: the attack context.

    Returns:
        [N, K] bool.
    """
    return ctx.mask & ctx.byzantine[ctx.neighbors] & ~_row0(ctx)


def honest_rows(ctx: AttackContext) -> jax.Array:
    """Rows of each receiver's block holding honest vectors: its own row 0 and its valid honest senders.

    Args:
        ctx: the attack context.

    Returns:
        [N, K] bool.
    """
    return ctx.mask & (_row0(ctx) | ~ctx.byzantine[ctx.neighbors])


def honest_stats(ctx: AttackContext) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise mean and standard deviation of the honest vectors each receiver sees.

    Definition: mu_i = (1/h_i) sum_{k in H_i} x_ik; sigma_i = sqrt((1/h_i) sum_{k in H_i} (x_ik - mu_i)^2), with H_i
    the honest rows (always containing row 0, so h_i >= 1). Non-honest rows enter through ``where``, never through
    a multiplication, so a non-finite Byzantine row cannot turn the statistics into NaN.

    Args:
        ctx: the attack context.

    Returns:
        (mu [N, D], sigma [N, D]) in the block's dtype.
    """
    h = honest_rows(ctx)
    count = jnp.sum(h, axis=1).astype(ctx.block.dtype)[:, None]
    mu = _sum_rows(h, lambda k: _received(ctx, k)) / count
    var = _sum_rows(h, lambda k: jnp.square(_received(ctx, k) - mu)) / count
    return mu, jnp.sqrt(var)


def _received(ctx: AttackContext, k: int) -> jax.Array:
    """Row k of every receiver's block, ``ctx.block[:, k]``, gathered from the messages: ``[R, D]``.

    Reading the rows this way lets XLA fuse the gather into the statistics' loop; reading ``ctx.block`` would make
    it materialise the whole block for them, next to the attacked block the rule reads (two blocks of temporaries
    instead of at most one).
    """
    return jnp.take(ctx.messages, ctx.neighbors[:, k], axis=0, mode="clip").astype(ctx.block.dtype)


def _sum_rows(select: jax.Array, row) -> jax.Array:
    """``sum_k where(select[:, k], row(k), 0)`` over the K rows: ``[N, K]`` bool, ``row(k) -> [N, D]`` -> ``[N, D]``.

    An unrolled chain over the static K that XLA fuses into one elementwise loop over D, materialised once: on
    XLA:CPU a reduce over the middle axis of ``[N, K, D]`` is several times slower, and when fused into a consumer
    that broadcasts the result back over K (a select over the block) it is recomputed for every row (3x slower end to
    end at N = 256, K = 9, D = 1e5).
    """
    out = None
    for k in range(select.shape[1]):
        term = jnp.where(select[:, k, None], row(k), 0)
        out = term if out is None else out + term
    return jax.lax.optimization_barrier(out)


def replace_rows(ctx: AttackContext, message: jax.Array, by_sender: bool = False) -> tuple[jax.Array, jax.Array]:
    """The block with ``message`` in the attacked rows: one message per receiver (``[R, D]``), or with
    ``by_sender`` one per sender (``[N, D]``, indexed by node id). Returns ``(block [R, K, D], mask [R, K])``, what
    an attack returns; every other row is the gathered message, bit for bit. Use it in your own attacks.

    The block is gathered anew (``ctx.block`` is ``ctx.messages[ctx.neighbors]``) from the messages followed by
    those rows, each attacked position pointing at its row, so the rule reads an ``[N + R, D]`` table through the
    gather as the unattacked exchange reads the messages. The select between the block and the messages that this
    replaced made XLA keep extra ``[R, K, D]`` blocks and, on dense graphs, evaluate the attack in every read of the
    rule's loop (``benchmarks/exchange.py``: Krum under ALIE on a complete graph of 128 nodes, 4.6 s -> 0.87 s per
    exchange; trimmed mean under ALIE on an 8-regular graph, 1.95 -> 0.20 GB of temporaries). The gather keeps
    jnp.take's default bounds handling: ``mode="clip"`` kept one block fewer for rules that read the rows twice
    (Krum, clipped gossip) but made a median fused with it 4x slower in the chunked exchange.
    """
    dtype = ctx.block.dtype
    table = jnp.concatenate([ctx.messages.astype(dtype), message.astype(dtype)])
    row = ctx.neighbors if by_sender else jnp.arange(ctx.neighbors.shape[0])[:, None]
    index = jnp.where(attacked_rows(ctx), ctx.messages.shape[0] + row, ctx.neighbors)
    return jnp.take(table, index, axis=0), ctx.mask


#: Elements :func:`_write_rows` generates per step of its loop (whole rows of D; at least one row a step), so the
#: loop's per-step overhead stays small next to the work of a step (for Gaussian rows, about 0.3 ms on CPU).
ROW_STEP_ELEMENTS = 1 << 16


def _write_rows(ctx: AttackContext, rows) -> tuple[jax.Array, jax.Array]:
    """Write generated messages into the attacked rows and only there: ``rows(i, slot) -> [B, D]`` gives the
    messages of B attacked positions (receiver rows ``i``, slots ``slot``).

    The attacked positions are listed once and generated a few rows per step of a loop whose trip count is their
    number, so the work is proportional to the Byzantine rows, not to ``[N, K, D]``. For messages that are
    expensive to make (random draws) this is what matters: generated for the whole block and selected, XLA fused
    the generation into the rule's loop, where the CPU code is not vectorised (10-50x the aggregation's cost).
    Padding steps past the last position write out of range and are dropped.
    """
    n, k, d = ctx.block.shape
    attacked = attacked_rows(ctx).reshape(-1)
    count = jnp.sum(attacked, dtype=jnp.int32)
    positions = jnp.nonzero(attacked, size=n * k, fill_value=n * k)[0]
    per_step = max(1, min(n * k, ROW_STEP_ELEMENTS // max(d, 1)))

    def write(step, block):
        pos = positions[step * per_step + jnp.arange(per_step)]
        i, slot = pos // k, pos % k  # i = N (out of range) on padding
        return block.at[i, slot].set(rows(i, slot).astype(block.dtype), mode="drop")

    block = jax.lax.fori_loop(0, (count + per_step - 1) // per_step, write, ctx.block)
    return block, ctx.mask


def _num(x, dtype) -> jax.Array:
    return jnp.asarray(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Attacks
# ---------------------------------------------------------------------------------------------------------------


def none(key: jax.Array, ctx: AttackContext) -> tuple[jax.Array, jax.Array]:
    """No attack: Byzantine nodes send their honest messages.

    Args:
        key: PRNG key (unused).
        ctx: the attack context.

    Returns:
        (block [N, K, D], mask [N, K]) unchanged.
    """
    del key
    return ctx.block, ctx.mask


def sign_flip(key: jax.Array, ctx: AttackContext, scale=1.0, target: str = "mean") -> tuple[jax.Array, jax.Array]:
    """Sign flipping: send the negated, scaled honest mean or the sender's own honest message.

    Definition: target "mean": m_{b->i} = -scale * mu_i (one message per receiver);
    target "own": m_{b->i} = -scale * x_b (x_b: what b computed honestly; one message per sender).

    Args:
        key: PRNG key (unused).
        ctx: the attack context.
        scale: positive factor.
        target: "mean" or "own".

    Returns:
        (block [N, K, D], mask [N, K]).

    References:
        Allen-Zhu et al., Byzantine-resilient non-convex SGD, 2021; Karimireddy, He, Jaggi, Learning from history
        for Byzantine robust optimization, 2021 (sign flipping attack).
    """
    del key
    s = _num(scale, ctx.block.dtype)
    if target == "mean":
        mu, _ = honest_stats(ctx)
        return replace_rows(ctx, -s * mu)
    if target == "own":
        return replace_rows(ctx, -s * ctx.messages, by_sender=True)
    raise ConfigError(f"attack.target: sign_flip target must be 'mean' or 'own', got {target!r}")


def gaussian(key: jax.Array, ctx: AttackContext, sigma=1.0, center: str = "mean") -> tuple[jax.Array, jax.Array]:
    """Gaussian attack: send the honest mean plus Gaussian noise, or pure Gaussian noise.

    Definition: m_{b->i} = c_i + sigma * xi_{b,i}, xi_{b,i} ~ N(0, I_D) independent for every (receiver, sender)
    pair, c_i = mu_i (center "mean") or 0 (center "zero"). The noise of receiver i's slot k is drawn from
    ``fold_in(key, i * K + k)`` with i the receiver's node id, so it does not depend on which other receivers are
    served in the same call (the engine's chunked exchange draws the same noise as the whole one).

    Only the attacked rows are drawn (:func:`_write_rows`): drawing a whole ``[N, K, D]`` block of noise for the few
    Byzantine rows cost 10-50x the aggregation itself, because XLA fused the draw into the rule's loop, where the
    CPU code is not vectorised.

    Args:
        key: PRNG key for the noise.
        ctx: the attack context.
        sigma: noise standard deviation (>= 0).
        center: "mean" or "zero".

    Returns:
        (block [N, K, D], mask [N, K]).

    References:
        Blanchard et al., Machine learning with adversaries: Byzantine tolerant gradient descent, 2017.
    """
    if center not in ("mean", "zero"):
        raise ConfigError(f"attack.center: gaussian center must be 'mean' or 'zero', got {center!r}")
    k, d = ctx.block.shape[1:]
    dtype = ctx.block.dtype
    receiver_ids = ctx.neighbors[:, 0]
    mu = honest_stats(ctx)[0] if center == "mean" else None
    scale = _num(sigma, dtype)

    def noise(i, slot):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, receiver_ids[i] * k + slot)
        rows = scale * jax.vmap(lambda kk: rng.normal(kk, (d,), dtype))(keys)
        return rows if mu is None else rows + mu[i]

    return _write_rows(ctx, noise)


def large_norm(key: jax.Array, ctx: AttackContext, scale=1e6) -> tuple[jax.Array, jax.Array]:
    """Large-norm attack: every coordinate of the message equals `scale` (norm scale * sqrt(D)).

    Definition: m_{b->i} = scale * 1_D.

    Args:
        key: PRNG key (unused).
        ctx: the attack context.
        scale: the value of every coordinate (finite, > 0).

    Returns:
        (block [N, K, D], mask [N, K]).

    References:
        Blanchard et al., Machine learning with adversaries: Byzantine tolerant gradient descent, 2017 (a single
        arbitrary vector moves the mean anywhere).
    """
    del key
    n, _, d = ctx.block.shape
    return replace_rows(ctx, jnp.broadcast_to(_num(scale, ctx.block.dtype), (n, d)))


def inf(key: jax.Array, ctx: AttackContext, value=float("inf")) -> tuple[jax.Array, jax.Array]:
    """Non-finite attack: every coordinate of the message equals `value` (inf, -inf or nan).

    Definition: m_{b->i} = value * 1_D with value non-finite. A rule that averages them yields a non-finite
    aggregate; a robust rule must keep honest nodes finite.

    Args:
        key: PRNG key (unused).
        ctx: the attack context.
        value: a non-finite float.

    Returns:
        (block [N, K, D], mask [N, K]).
    """
    del key
    n, _, d = ctx.block.shape
    return replace_rows(ctx, jnp.broadcast_to(_num(value, ctx.block.dtype), (n, d)))


def crash(key: jax.Array, ctx: AttackContext) -> tuple[jax.Array, jax.Array]:
    """Crash failure: Byzantine senders are silent, their rows are dropped from the receivers' masks.

    Definition: mask'[i, k] = mask[i, k] and not attacked[i, k]; the block is unchanged. Whether the rule
    renormalises the remaining weights is the rule's business.

    Args:
        key: PRNG key (unused).
        ctx: the attack context.

    Returns:
        (block [N, K, D] unchanged, mask [N, K]).
    """
    del key
    return ctx.block, ctx.mask & ~attacked_rows(ctx)


def alie_z(ctx: AttackContext) -> jax.Array:
    """ALIE's z_max for every receiver, from its neighbourhood counts.

    Definition (Baruch et al. 2019, Algorithm 1, with n -> n_i, m -> b_i): s_i = floor(n_i/2 + 1) - b_i,
    z_i = Phi^-1((n_i - b_i - s_i) / (n_i - b_i)), the probability clipped to [1e-4, 1 - 1e-4].

    Args:
        ctx: the attack context.

    Returns:
        [N] z values in the block's dtype.
    """
    n = jnp.sum(ctx.mask, axis=1).astype(jnp.float32)
    b = jnp.sum(attacked_rows(ctx), axis=1).astype(jnp.float32)
    s = jnp.floor(n / 2.0 + 1.0) - b
    p = jnp.clip((n - b - s) / (n - b), _P_MIN, 1.0 - _P_MIN)
    return _normal_ppf(p).astype(ctx.block.dtype)


def _search_scale(ctx: AttackContext, mu, base, direction, default, search_max):
    """Per-receiver scale s in {default} u [0, search_max] maximising ||rule(block(s)) - mu_i||.

    block(s) carries m_i(s) = base_i + s_i * direction_i in the attacked rows. A geometric grid of _GRID_POINTS
    values ending at search_max brackets the best scale; _GOLDEN_ITERS golden-section steps refine it between the
    best grid point's neighbours; the best value ever evaluated wins, the default scale on ties. NaN objectives
    count as -inf.

    Args:
        ctx: the attack context, with ctx.rule set.
        mu: [N, D] the honest mean (``honest_stats``), which the caller has computed already.
        base: [N, D]; direction: [N, D]; default: [N] the non-adaptive scale; search_max: scalar.

    Returns:
        [N] scales.
    """
    if ctx.rule is None:
        raise ConfigError("attack.adaptive: the adaptive search needs the aggregation rule (AttackContext.rule)")
    dtype = ctx.block.dtype
    rule = jax.vmap(ctx.rule)
    n = ctx.block.shape[0]

    def damage(s):
        block, _ = replace_rows(ctx, base + s[:, None] * direction)
        dist = jnp.linalg.norm(rule(block, ctx.mask, ctx.weights) - mu, axis=-1)
        return jnp.where(jnp.isnan(dist), -jnp.inf, dist)

    def keep_best(best, s, f):
        best_s, best_f = best
        better = f > best_f
        return jnp.where(better, s, best_s), jnp.where(better, f, best_f)

    search_max = _num(search_max, dtype)
    default = jnp.broadcast_to(_num(default, dtype), (n,))
    best = (default, damage(default))

    grid = search_max * jnp.exp2(jnp.arange(-(_GRID_POINTS - 1), 1, dtype=dtype))
    values = jax.lax.map(lambda s: damage(jnp.full((n,), s, dtype)), grid)  # [G, N]
    g = jnp.argmax(values, axis=0)
    best = keep_best(best, grid[g], jnp.max(values, axis=0))

    # Golden section for a maximum on [lo, hi], the grid neighbours of the best grid point.
    lo = jnp.where(g == 0, 0.0, grid[jnp.maximum(g - 1, 0)]).astype(dtype)
    hi = grid[jnp.minimum(g + 1, _GRID_POINTS - 1)]
    c = hi - _INV_PHI * (hi - lo)
    d = lo + _INV_PHI * (hi - lo)
    fc, fd = damage(c), damage(d)
    best = keep_best(keep_best(best, c, fc), d, fd)

    def step(_, state):
        lo, hi, c, d, fc, fd, best = state
        left = fc > fd  # the maximum lies in [lo, d]
        lo, hi = jnp.where(left, lo, c), jnp.where(left, d, hi)
        new = jnp.where(left, hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo))
        f = damage(new)
        # Left: the old c becomes d and `new` the lower point; right: the old d becomes c and `new` the upper one.
        c, fc, d, fd = (
            jnp.where(left, new, d),
            jnp.where(left, f, fd),
            jnp.where(left, c, new),
            jnp.where(left, fc, f),
        )
        return lo, hi, c, d, fc, fd, keep_best(best, new, f)

    state = jax.lax.fori_loop(0, _GOLDEN_ITERS, step, (lo, hi, c, d, fc, fd, best))
    return state[-1][0]


def alie(key: jax.Array, ctx: AttackContext, z=None, adaptive: bool = False, search_max=10.0):
    """A Little Is Enough: a message inside the honest spread that shifts every coordinate together.

    Definition: m_{b->i} = mu_i + z_i * sigma_i. Sign convention: plus, as in the project's REFERENCE.md; codebases
    that send mu - z sigma correspond to a negative z here. z_i = z if given, else the paper's z_max computed per
    receiver from n_i (valid rows, self included) and b_i (Byzantine senders): s_i = floor(n_i/2 + 1) - b_i,
    z_i = Phi^-1((n_i - b_i - s_i)/(n_i - b_i)) (see `alie_z`). With adaptive=True, z_i is instead chosen per
    receiver among the non-adaptive z_i and [0, search_max] to maximise ||rule(attacked block_i) - mu_i||
    (bounded grid + golden-section search, see `_search_scale`), as the "optimal" ALIE variants do. In small
    neighbourhoods z_max is close to 0 and the attack nearly harmless: n_i = 7, b_i = 1 gives s_i = 3 and
    z_max = Phi^-1(1/2) = 0, the honest mean itself; pass z or adaptive=True to study a stronger attacker.

    Args:
        key: PRNG key (unused).
        ctx: the attack context (ctx.rule needed when adaptive).
        z: the number of standard deviations, or None for z_max.
        adaptive: search the most damaging z for the rule in use.
        search_max: upper end of the adaptive search interval.

    Returns:
        (block [N, K, D], mask [N, K]).

    References:
        Baruch, Baruch, Goldberg, A little is enough: circumventing defenses for distributed learning, 2019;
        Shejwalkar & Houmansadr, Manipulating the Byzantine: optimizing model poisoning attacks, 2021 (optimised
        scale).
    """
    del key
    mu, sigma = honest_stats(ctx)
    zi = alie_z(ctx) if z is None else jnp.broadcast_to(_num(z, ctx.block.dtype), mu.shape[:1])
    if adaptive:
        zi = _search_scale(ctx, mu, mu, sigma, zi, search_max)
    return replace_rows(ctx, mu + zi[:, None] * sigma)


def ipm(key: jax.Array, ctx: AttackContext, eps=0.1, adaptive: bool = False, search_max=10.0):
    """Inner product manipulation (Fall of Empires): send a negative multiple of the honest mean.

    Definition: m_{b->i} = -eps_i * mu_i, eps_i = eps, or with adaptive=True the value among eps and
    [0, search_max] maximising ||rule(attacked block_i) - mu_i|| per receiver (bounded grid + golden-section
    search, see `_search_scale`). The paper attacks gradients; here mu_i is the mean of what honest nodes send
    (models with `train.share = "model"`, updates with `"update"`), so on models a small eps sends a model near
    zero rather than a reversed step.

    Args:
        key: PRNG key (unused).
        ctx: the attack context (ctx.rule needed when adaptive).
        eps: positive strength (0.1 in the decentralized literature, 2.0 in ByzFL's defaults).
        adaptive: search the most damaging eps for the rule in use.
        search_max: upper end of the adaptive search interval.

    Returns:
        (block [N, K, D], mask [N, K]).

    References:
        Xie, Koyejo, Gupta, Fall of empires: breaking Byzantine-tolerant SGD by inner product manipulation, 2020.
    """
    del key
    mu, _ = honest_stats(ctx)
    e = jnp.broadcast_to(_num(eps, ctx.block.dtype), mu.shape[:1])
    if adaptive:
        e = _search_scale(ctx, mu, jnp.zeros_like(mu), -mu, e, search_max)
    return replace_rows(ctx, -e[:, None] * mu)


def mimic(key: jax.Array, ctx: AttackContext, target=None):
    """Mimic: Byzantine senders copy one honest node, consistently, to over-represent it.

    Definition: target None: m_{b->i} = x_{j(i)} with j(i) the honest neighbour of i (other than i) with the
    smallest node id, or i itself if it has none; target t (a node id): m_{b->i} = x_t for every receiver.

    Args:
        key: PRNG key (unused).
        ctx: the attack context.
        target: None (per receiver) or a node id in [0, N).

    Returns:
        (block [N, K, D], mask [N, K]).

    References:
        Karimireddy, He, Jaggi, Byzantine-robust learning on heterogeneous datasets via bucketing, 2022.
    """
    del key
    if target is not None:
        n = ctx.messages.shape[0]  # all nodes: the block may hold only a chunk of the receivers
        if not 0 <= int(target) < n:
            raise ConfigError(f"attack.target: mimic target must be a node id in [0, {n}), got {target}")
        return replace_rows(ctx, jnp.broadcast_to(ctx.messages[int(target)], (ctx.block.shape[0], ctx.block.shape[2])))
    candidate = honest_rows(ctx) & ~_row0(ctx)
    ids = jnp.where(candidate, ctx.neighbors, jnp.iinfo(jnp.int32).max)
    row = jnp.where(jnp.any(candidate, axis=1), jnp.argmin(ids, axis=1), 0)
    sender = jnp.take_along_axis(ctx.neighbors, row[:, None], axis=1)[:, 0]
    return replace_rows(ctx, jnp.take(ctx.messages, sender, axis=0, mode="clip"))


def flip_labels(y: jax.Array, num_classes: int) -> jax.Array:
    """Label flipping: y -> C - 1 - y.

    Args:
        y: [...] integer labels in [0, C).
        num_classes: C.

    Returns:
        [...] flipped labels, same dtype.
    """
    return (num_classes - 1 - y).astype(y.dtype)


def label_flip(key: jax.Array, ctx: AttackContext):
    """Label flipping (data poisoning): Byzantine nodes train on labels y -> C - 1 - y and send the result.

    The poisoning happens in training (the engine applies `flip_labels` to Byzantine nodes' labels); their messages
    are then honest computations on poisoned data, so this kernel leaves the block unchanged.

    Args:
        key: PRNG key (unused).
        ctx: the attack context.

    Returns:
        (block [N, K, D], mask [N, K]) unchanged.

    References:
        Biggio, Nelson, Laskov, Poisoning attacks against support vector machines, 2012; Allen-Zhu et al. 2021.
    """
    del key
    return ctx.block, ctx.mask


def dissensus(key: jax.Array, ctx: AttackContext, eps=1.5):
    """Dissensus: push each honest receiver away from its honest neighbours.

    Definition, for receiver i and each Byzantine neighbour b (all of them send the same message to i, together
    carrying the correction in proportion to their weights):
        m_{b->i} = x_i - eps * sum_{j honest in N(i)} W_ij (x_j - x_i) / sum_{b' Byzantine in N(i)} W_ib'
    so that the gossip step x_i + sum_j W_ij (x_j - x_i) over the attacked block becomes x_i - (eps - 1) *
    sum_{j honest} W_ij (x_j - x_i). eps = 1 is `isolation`. Receivers whose Byzantine neighbours have zero total
    weight get m = x_i (the guard keeps them finite; such rows do not move a weighted average anyway).

    Args:
        key: PRNG key (unused).
        ctx: the attack context (ctx.weights is W).
        eps: positive strength (1.5 in He et al.'s experiments).

    Returns:
        (block [N, K, D], mask [N, K]).

    References:
        He, Karimireddy, Jaggi, Byzantine-robust decentralized learning via ClippedGossip, 2022.
    """
    del key
    dtype = ctx.block.dtype
    w = ctx.weights.astype(dtype)
    own = _received(ctx, 0)
    hon = honest_rows(ctx) & ~_row0(ctx)
    pull = _sum_rows(hon, lambda k: w[:, k, None] * (_received(ctx, k) - own))
    byz_weight = jnp.sum(jnp.where(attacked_rows(ctx), w, 0), axis=1)
    safe = jnp.where(byz_weight > 0, byz_weight, 1)
    message = own - _num(eps, dtype) * jnp.where((byz_weight > 0)[:, None], pull / safe[:, None], 0)
    # Written row by row: in the chunked exchange XLA fused the pull into a select over K and recomputed it per row
    # (clipped gossip + dissensus, N = 256, D = 1e5: 3.3 s -> 0.69 s per exchange in chunks of 86, 459 -> 227 ms whole);
    # gathered as the other attacks' messages are (replace_rows), it took 3x the time in chunks and 2x the memory.
    return _write_rows(ctx, lambda i, slot: message[i])


def isolation(key: jax.Array, ctx: AttackContext):
    """Isolation: make each receiver's weighted neighbourhood average equal its own model, freezing it.

    Definition: the messages solving sum_k W_ik (x'_ik - x_i) = 0 with all Byzantine senders sending the same m:
        m_{b->i} = x_i - sum_{j honest in N(i)} W_ij (x_j - x_i) / sum_{b' Byzantine in N(i)} W_ib',
    i.e. `dissensus` with eps = 1.

    Args:
        key: PRNG key (unused).
        ctx: the attack context (ctx.weights is W).

    Returns:
        (block [N, K, D], mask [N, K]).

    References:
        He, Karimireddy, Jaggi, Byzantine-robust decentralized learning via ClippedGossip, 2022.
    """
    return dissensus(key, ctx, eps=1.0)


REGISTRY: dict[str, Callable] = {
    "none": none,
    "sign_flip": sign_flip,
    "gaussian": gaussian,
    "large_norm": large_norm,
    "inf": inf,
    "crash": crash,
    "alie": alie,
    "ipm": ipm,
    "mimic": mimic,
    "label_flip": label_flip,
    "dissensus": dissensus,
    "isolation": isolation,
}

#: Whether an attack name is registered to jaxdfl's own function (the built-in hyper-parameter checks hold only then).
shipped = Shipped(REGISTRY)

# Attacks that act through the Byzantine nodes' training data rather than on their messages.
POISONING = {"label_flip"}

# Hyper-parameter names and defaults of every attack (the config layer rejects other keys).
#   sign_flip.scale  > 0       message -scale * target
#   sign_flip.target "mean"    "mean": honest mean of the receiver's neighbourhood; "own": the sender's own message
#   gaussian.sigma   >= 0      noise standard deviation
#   gaussian.center  "mean"    "mean": mu_i + noise; "zero": pure noise
#   large_norm.scale > 0       every coordinate of the message
#   inf.value        inf       a non-finite float: inf, -inf or nan
#   alie.z           None      None: z_max per receiver (Baruch et al.); a number: fixed z in mu + z sigma
#   alie/ipm.adaptive False    search the most damaging scale for the rule in use
#   alie/ipm.search_max 10.0   upper end of that search
#   ipm.eps          0.1       message -eps * mu_i
#   mimic.target     None      None: per receiver, its smallest-id honest neighbour; an int: that node everywhere
#   dissensus.eps    1.5       strength (1 = isolation)
#: Attacks that read the receivers' mixing weights (``ctx.weights``) to aim their messages.
WEIGHTED_ATTACKS = frozenset({"dissensus", "isolation"})

DEFAULTS: dict[str, dict[str, object]] = {
    "none": {},
    "sign_flip": {"scale": 1.0, "target": "mean"},
    "gaussian": {"sigma": 1.0, "center": "mean"},
    "large_norm": {"scale": 1e6},
    "inf": {"value": float("inf")},
    "crash": {},
    "alie": {"z": None, "adaptive": False, "search_max": 10.0},
    "ipm": {"eps": 0.1, "adaptive": False, "search_max": 10.0},
    "mimic": {"target": None},
    "label_flip": {},
    "dissensus": {"eps": 1.5},
    "isolation": {},
}


# ---------------------------------------------------------------------------------------------------------------
# Host-side validation
# ---------------------------------------------------------------------------------------------------------------


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _need(ok: bool, key: str, what: str, v) -> None:
    if not ok:
        raise ConfigError(f"attack.{key}: must be {what}, got {v!r}")


def validate(name: str, hyper: dict | None = None) -> None:
    """Check an attack name and its hyper-parameters on the host, before compilation.

    Args:
        name: a key of REGISTRY.
        hyper: a subset of DEFAULTS[name] (missing keys take the defaults).

    Raises:
        ConfigError: one line naming ``attack.name`` or ``attack.<key>`` and what is allowed.
    """
    if name not in REGISTRY:
        raise ConfigError(f"attack.name: unknown attack {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    hyper = dict(hyper or {})
    allowed = DEFAULTS.get(name, {})  # an attack without settings needs no DEFAULTS entry
    for key in hyper:
        if key not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"attack.{key}: not a setting of attack {name!r}; allowed: {names}")
    if not shipped(name):
        return  # a user's attack: config checks its values' types against its DEFAULTS, their ranges are its own
    for key, v in hyper.items():
        finite = _is_real(v) and math.isfinite(float(v))
        if key in ("scale", "search_max") or (key == "eps"):
            _need(finite and float(v) > 0, key, "a finite number > 0", v)
        elif key == "sigma":
            _need(finite and float(v) >= 0, key, "a finite number >= 0", v)
        elif key == "value":
            _need(_is_real(v) and not math.isfinite(float(v)), key, "a non-finite float (inf, -inf or nan)", v)
        elif key == "z":
            _need(v is None or finite, key, "unset (none: z_max from the neighbourhood sizes) or a finite number", v)
        elif key == "adaptive":
            _need(isinstance(v, bool), key, "true or false", v)
        elif key == "center":
            _need(v in ("mean", "zero"), key, "'mean' or 'zero'", v)
        elif key == "target" and name == "sign_flip":
            _need(v in ("mean", "own"), key, "'mean' or 'own'", v)
        elif key == "target" and name == "mimic":
            ok = v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 0)
            _need(ok, key, "unset (none: per receiver) or a node id >= 0", v)


def check_contract(name: str, hyper: dict | None, n: int, k: int, d: int, receivers: int | None = None,
                   dtype=jnp.float32) -> None:
    """Trace a registered attack on the run's shapes (on the host, nothing is compiled) and raise if it does not
    follow the contract ``attack(key, ctx: AttackContext, **hyper) -> (block [R, K, D], mask [R, K] bool)``.

    It is traced for all N receivers at once and, when the engine serves them in chunks of ``receivers``, for such
    a chunk too (``block``, ``neighbors``, ``mask`` and ``weights`` then hold R < N rows, ``messages`` and
    ``byzantine`` all N).

    Raises:
        ConfigError: one line naming ``attack.name``, the contract and what the attack did instead.
    """
    h = resolve(name, hyper)  # an unknown name is a ConfigError here, before the lookup
    fn = REGISTRY[name]
    contract = (f"attack.name={name!r}: an attack is called as attack(key, ctx, **hyper) -> (block [R, K, D], "
                "mask [R, K] bool) for R receivers")
    for r in sorted({n, receivers or n}, reverse=True):
        ctx = AttackContext(
            messages=jax.ShapeDtypeStruct((n, d), dtype), block=jax.ShapeDtypeStruct((r, k, d), dtype),
            neighbors=jax.ShapeDtypeStruct((r, k), jnp.int32), mask=jax.ShapeDtypeStruct((r, k), jnp.bool_),
            weights=jax.ShapeDtypeStruct((r, k), jnp.float32), byzantine=jax.ShapeDtypeStruct((n,), jnp.bool_))
        shapes = f"N={n}, R={r}, K={k}, D={d}"
        out = traced(contract, shapes, lambda key, c: fn(key, c._replace(rule=lambda x, m, w: x[0]), **h),
                     jax.random.key(0), ctx)
        got = layout(out)
        if got is None or len(got) != 2:
            raise ConfigError(f"{contract}; with {shapes} it returned ({shown(out)}), not a (block, mask) pair")
        if got != (((r, k, d), jnp.dtype(dtype)), ((r, k), jnp.dtype(jnp.bool_))):
            raise ConfigError(f"{contract}; with {shapes} it returned ({shown(out)})")


def resolve(name: str, hyper: dict | None = None) -> dict[str, object]:
    """Validate and return the full hyper-parameter dict of an attack (defaults filled in).

    Args:
        name: a key of REGISTRY.
        hyper: a subset of DEFAULTS[name].

    Returns:
        dict with every key of DEFAULTS[name].
    """
    validate(name, hyper)
    return {**DEFAULTS.get(name, {}), **(hyper or {})}

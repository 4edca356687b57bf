"""Linear and distance-based rules: weighted mean, Krum, multi-Krum, Bulyan, geometric median, centred clipping,
MoNNA, ClippedGossip, IOS.

Distances are sums of squared differences over D, computed for all row pairs in one pass over the rows (no
``[K, K, D]`` array, no cancellation-prone ``x @ x.T``). Iterative rules keep their iterate as coefficients ``b``
over the K rows (``z = sum_k b_k x_k``), iterate in that K-dimensional space through the centred Gram matrix, and
combine the rows once at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdfl.aggregators import order_stats
from jaxdfl.aggregators._common import centred_gram
from jaxdfl.aggregators._common import combine
from jaxdfl.aggregators._common import compute_dtype
from jaxdfl.aggregators._common import count
from jaxdfl.aggregators._common import nan_to_inf
from jaxdfl.aggregators._common import ranks
from jaxdfl.aggregators._common import smallest
from jaxdfl.aggregators._common import sq_dist_to
from jaxdfl.aggregators._common import sq_dist_to_self
from jaxdfl.aggregators._common import sq_distances
from jaxdfl.aggregators._common import take_row


def _uniform(mask: jax.Array, dt) -> jax.Array:
    m = mask.astype(dt)
    return m / jnp.sum(m)


def _mixing(x: jax.Array, mask: jax.Array, weights: jax.Array | None) -> jax.Array:
    """The valid rows' mixing weights in the compute dtype (0 elsewhere; uniform when ``weights`` is None)."""
    dt = compute_dtype(x.dtype)
    return _uniform(mask, dt) if weights is None else jnp.where(mask, weights.astype(dt), jnp.zeros((), dt))


def _normalised(w: jax.Array, rows: jax.Array) -> jax.Array:
    """``w / sum(w)``, or uniform over ``rows`` when the weights there sum to 0 (zero mixing weights on every
    row left: a mean, not 0 / 0)."""
    total = jnp.sum(w)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), _uniform(rows, w.dtype))


def _safe_ratio(tau, dist):
    """``min(1, tau / dist)`` with 1 where ``dist <= tau`` (so dist = 0 gives no 0/0)."""
    return jnp.where(dist > tau, tau / jnp.where(dist > 0, dist, 1.0), 1.0)


def mean(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Weighted mean of the valid rows: plain gossip averaging.

    Definition: ``sum_k w_k x_k / sum_k w_k`` over valid rows, with ``w`` the mixing weights ``W_ij`` (row 0 the
    self-weight ``W_ii``). With weights that sum to 1 this is exactly the gossip step ``x_i <- sum_j W_ij x_j``; with
    ``weights=None`` it is the plain average.

    Hyper-parameters: none. Breakdown point 0: one Byzantine row moves it arbitrarily far.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] mixing weights (None: uniform over valid rows).

    Returns:
        [D] in the dtype of ``x``.

    References: S. Boyd, A. Ghosh, B. Prabhakar, D. Shah, "Randomized gossip algorithms", IEEE TIT 2006.
    """
    return combine(x, mask, _normalised(_mixing(x, mask, weights), mask))


def _krum_scores(d2: jax.Array, mask: jax.Array, f) -> jax.Array:
    """Krum score of every row: sum of squared distances to its n - f - 2 closest other valid rows (+inf if masked)."""
    k = mask.shape[0]
    other = mask[None, :] & mask[:, None] & ~jnp.eye(k, dtype=bool)
    score = jnp.sum(jnp.where(smallest(d2, other, count(mask) - f - 2), d2, 0.0), axis=1)
    return jnp.where(mask, nan_to_inf(score), jnp.inf)


def _bulyan_selection(d2: jax.Array, mask: jax.Array, f) -> jax.Array:
    """The ``theta = n - 2f`` rows that repeated Krum moves into Bulyan's selection: ``[K, K], [K] -> [K]`` bool.

    Each round scores the remaining rows (Krum over the remaining set, :func:`bulyan`) and moves the best one (lowest
    index on ties) out. Every row's neighbours are ranked once (distance, ties by index); ``cnt[i, j]`` is j's rank
    among the neighbours of i still remaining, plus 1, so a row's score is the sum of its entries with ``cnt <= c``,
    and removing the picked row p lowers by 1 the counts of the entries ranked after p. One pass over ``[K, K]`` per
    round, where re-selecting the c closest each round took 32 (a bisection per row above ``RANKS_MAX_K`` rows).
    """
    k = mask.shape[0]
    idx = jnp.arange(k)
    other = mask[None, :] & mask[:, None] & ~jnp.eye(k, dtype=bool)
    v = jnp.where(other, nan_to_inf(d2), jnp.inf)
    dead = jnp.iinfo(jnp.int32).max
    cnt = jnp.where(other, ranks(v, other) + 1, dead)
    theta = count(mask) - 2 * f

    def body(i, state):
        remaining, selected, cnt = state
        n_r = count(remaining)
        c = n_r - f - 2
        # the last rounds' sets are too small for Krum (c < 1, every score 0): sum over all other rows (a medoid)
        c = jnp.where(c < 1, n_r - 1, c)
        score = jnp.where(remaining, nan_to_inf(jnp.sum(jnp.where(cnt <= c, v, 0.0), axis=1)), jnp.inf)
        # the lowest index among the best remaining rows, also when every remaining score is +inf
        p = jnp.argmax(remaining & (score == jnp.min(score)))
        active = i < theta
        is_p = idx == p
        pick = is_p & active
        shifted = jnp.where(is_p, dead, cnt - (cnt > jax.lax.dynamic_slice_in_dim(cnt, p, 1, axis=1)))
        return remaining & ~pick, selected | pick, jnp.where(active, shifted, cnt)

    return jax.lax.fori_loop(0, k, body, (mask, jnp.zeros_like(mask), cnt))[1]


def krum(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, f=1) -> jax.Array:
    """Krum: the valid row with the smallest sum of squared distances to its n - f - 2 nearest other rows.

    Definition: ``score_i = sum_{j in N_i} |x_i - x_j|^2`` with ``N_i`` the ``n - f - 2`` rows closest to ``x_i``
    (i excluded); return ``x_{argmin score}`` (ties: lowest row index, so the node's own vector wins ties).
    Unweighted. Some libraries (e.g. ByzFL) sum over ``n - f - 1`` neighbours instead; here it is the paper's
    ``n - f - 2``.

    Hyper-parameters: ``f`` (int >= 0, may be traced). Needs ``n - f - 2 >= 1``. Breakdown point
    f / n with 2f + 2 < n (just under 1/2): the paper's (alpha, f)-resilience.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.
        f: tolerated number of Byzantine rows.

    Returns:
        [D] in the dtype of ``x`` (one of the valid input rows).

    References: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine learning with adversaries:
    Byzantine tolerant gradient descent", NeurIPS 2017. Decentralized use (BRIDGE-K): Z. Yang, W. U. Bajwa, 2019.
    """
    scores = _krum_scores(sq_distances(x, mask), mask, f)
    return take_row(x, jnp.argmin(scores))


def multi_krum(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, f=1, m=0) -> jax.Array:
    """Multi-Krum: the mean of the m valid rows with the smallest Krum scores.

    Definition: scores as in :func:`krum`; average the ``m`` best rows (ties: lower row index first). ``m = 0``
    means ``m = n - f`` per node (ByzFL's default). Unweighted.

    Hyper-parameters: ``f`` (int >= 0, may be traced), ``m`` (int >= 0, may be traced; 0 = n - f).
    Breakdown point as Krum's: f Byzantine rows tolerated when 2f + 2 < n (every selected row passed Krum's
    filter).

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.
        f: tolerated number of Byzantine rows.
        m: number of rows averaged (0: n - f).

    Returns:
        [D] in the dtype of ``x``.

    References: P. Blanchard et al., NeurIPS 2017; E. M. El Mhamdi, R. Guerraoui, S. Rouault, "The hidden
    vulnerability of distributed learning in Byzantium", ICML 2018.
    """
    scores = _krum_scores(sq_distances(x, mask), mask, f)
    n = count(mask)
    m_eff = jnp.clip(jnp.where(m > 0, m, n - f), 1, n)
    chosen = mask & (ranks(scores, mask) < m_eff)
    return combine(x, chosen, chosen / m_eff.astype(compute_dtype(x.dtype)))


def bulyan(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, f=1) -> jax.Array:
    """Bulyan: select n - 2f rows by repeated Krum, then a coordinate-wise mean around the median of the selection.

    Definition: ``S = {}``, ``R`` = valid rows; repeat ``theta = n - 2f`` times: move ``Krum(R)`` (scores over the
    ``|R| - f - 2`` closest rows in R) from R to S. Then per coordinate, average the ``beta = theta - 2f`` values of
    S nearest to the coordinate median of S (that is :func:`jaxdfl.aggregators.meamed` on S with ``2f`` dropped).
    Unweighted. This is also BRIDGE-B (Krum screening followed by a trimmed, median-centred mean). In the last
    selections ``|R| - f - 2`` drops below 1 (down to ``f - 1`` neighbours at ``|R| = 2f + 1``), where Krum's score
    is 0 for every row and the pick arbitrary; the score then sums the distances to all other rows of R instead (a
    medoid choice), which keeps the rule symmetric in its inputs.

    Hyper-parameters: ``f`` (int >= 0, may be traced). Needs ``n >= 4f + 3``. Breakdown point
    f / n with n >= 4f + 3 (about 1/4), and each coordinate stays within the honest values' range.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.
        f: tolerated number of Byzantine rows.

    Returns:
        [D] in the dtype of ``x``.

    References: E. M. El Mhamdi, R. Guerraoui, S. Rouault, "The hidden vulnerability of distributed learning in
    Byzantium", ICML 2018; C. Fang, Z. Yang, W. U. Bajwa, "BRIDGE: Byzantine-resilient decentralized gradient
    descent", IEEE TSIPN 2022.
    """
    selected = _bulyan_selection(sq_distances(x, mask), mask, f)
    return order_stats.meamed(x, selected, f=2 * f)


def geometric_median(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, nu=0.1, iters=100,
                     tol=1e-6) -> jax.Array:
    """Geometric median of the valid rows by the smoothed Weiszfeld algorithm.

    Definition: ``z = argmin_z sum_i |z - x_i|`` over valid rows (uniform weights), approximated by
    ``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = 1 / max(|x_i - z|, nu)``, started at the node's own vector and
    stopped after ``iters`` steps or when a step moves ``z`` by at most ``tol`` times the harmonic mean of the
    ``max(|x_i - z|, nu)`` (a scale set by the nearby rows, which far outliers do not inflate). The iterate lives in
    the K coefficients, so an iteration costs O(K^2), not O(K D).

    Hyper-parameters: ``nu`` (> 0, smoothing radius, in the units of x), ``iters`` (int >= 1, maximum steps),
    ``tol`` (>= 0); all may be traced. Breakdown point 1/2.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.
        nu: smoothing: distances below nu count as nu.
        iters: maximum number of Weiszfeld steps.
        tol: stop when a step is shorter than this, relative to the harmonic mean distance.

    Returns:
        [D] in the dtype of ``x``.

    References: K. Pillutla, S. M. Kakade, Z. Harchaoui, "Robust aggregation for federated learning" (RFA), IEEE TSP
    2022; E. Weiszfeld, 1937.
    """
    gram, mask = centred_gram(x, mask)
    alpha = _uniform(mask, gram.dtype)
    nu = jnp.asarray(nu, gram.dtype)

    def step(b):
        # the next coefficients, and the step's length relative to the harmonic mean of max(|x_i - z|, nu): a scale
        # the far rows barely move (an objective test stalls when outliers dominate the objective)
        beta = alpha / jnp.maximum(jnp.sqrt(sq_dist_to(gram, b)), nu)
        nb = beta / jnp.sum(beta)
        moved = jnp.sqrt(jnp.maximum((nb - b) @ gram @ (nb - b), 0.0)) * jnp.sum(beta)
        return nb, moved

    def cond(state):
        i, _, moved = state
        return (i < iters) & (moved > tol)

    def body(state):
        i, b, _ = state
        return (i + 1, *step(b))

    b0 = jnp.zeros(mask.shape, gram.dtype).at[0].set(1.0)
    _, b, _ = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), *step(b0)))
    return combine(x, mask, b)


def centered_clip(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, tau=1.0, iters=3) -> jax.Array:
    """Centred clipping, started at the node's own vector.

    Definition: ``v_0 = x_0`` (own vector), ``v <- v + (1/n) sum_i (x_i - v) min(1, tau / |x_i - v|)`` over the n
    valid rows, ``iters`` times. Unweighted. In the original (federated) rule ``v_0`` is the server's previous
    momentum; in the decentralized setting the receiver's own model plays that role.

    Hyper-parameters: ``tau`` (>= 0, clipping radius), ``iters`` (int >= 1); both may be traced. Each Byzantine
    row moves ``v`` by at most ``tau / n`` per iteration. Breakdown point: a small constant Byzantine fraction
    in the paper's analysis, with an error bounded in terms of tau rather than a hard threshold.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.
        tau: clipping radius.
        iters: number of clipping iterations.

    Returns:
        [D] in the dtype of ``x``.

    References: S. P. Karimireddy, L. He, M. Jaggi, "Learning from history for Byzantine robust optimization",
    ICML 2021.
    """
    gram, mask = centred_gram(x, mask)
    alpha = _uniform(mask, gram.dtype)
    k = mask.shape[0]
    eye = jnp.eye(k, dtype=gram.dtype)

    def body(_, b):
        c = alpha * _safe_ratio(tau, jnp.sqrt(sq_dist_to(gram, b)))
        return b + c @ (eye - b[None, :])

    b = jax.lax.fori_loop(0, iters, body, eye[0])
    return combine(x, mask, b)


def monna(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, f=1) -> jax.Array:
    """MoNNA: the mean of the n - f valid rows nearest to the node's own vector (itself included).

    Definition: rank the valid rows by ``|x_k - x_0|`` (ties: lower index first; the node itself has distance 0)
    and average the first ``n - f``. Unweighted.

    Hyper-parameters: ``f`` (int >= 0, may be traced). Needs n > 2f. Breakdown point f / n < 1/2,
    provided the node's own row (the centre) is honest.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.
        f: tolerated number of Byzantine rows.

    Returns:
        [D] in the dtype of ``x``.

    References: S. Farhadkhani, R. Guerraoui, N. Gupta, L.-N. Hoang, R. Pinot, J. Stephan, "Robust collaborative
    learning with linear gradient overhead", ICML 2023.
    """
    keep = jnp.maximum(count(mask) - f, 1)
    chosen = mask & (ranks(sq_dist_to_self(x, mask), mask) < keep)
    return combine(x, chosen, chosen / keep.astype(compute_dtype(x.dtype)))


def clipped_gossip(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, tau=1.0, adaptive=False,
                   f=1) -> jax.Array:
    """ClippedGossip (self-centred clipping): gossip on neighbour differences clipped to radius tau.

    Definition: ``x_0 + sum_{k >= 1} w_k clip(x_k - x_0, tau)`` with ``clip(v, tau) = v min(1, tau / |v|)`` and
    ``w_k`` the mixing weights ``W_ij``. With ``adaptive`` true, tau is chosen per node as the distance of its
    ``(m - f)``-th closest valid neighbour (m neighbours), so exactly the f farthest neighbours are clipped (0 when
    m <= f); for f = 1 this is the rule in the authors' reference code (second-largest neighbour distance).

    Hyper-parameters: ``tau`` (>= 0), ``adaptive`` (bool), ``f`` (int >= 0, used when adaptive); all may be traced.
    A Byzantine neighbour moves the node by at most ``W_ij tau``. No breakdown point in the
    classical sense: any number of Byzantine neighbours moves it by at most ``tau sum_{j Byzantine} W_ij``, so the
    error is bounded by their total mixing weight (the paper's guarantee needs that weight small against the gap).

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] mixing weights (None: uniform over valid rows).
        tau: clipping radius (ignored when adaptive).
        adaptive: choose tau from the neighbour distances.
        f: number of neighbours clipped in adaptive mode.

    Returns:
        [D] in the dtype of ``x``.

    References: L. He, S. P. Karimireddy, M. Jaggi, "Byzantine-robust decentralized learning via ClippedGossip",
    arXiv:2202.01545, 2022.
    """
    k = mask.shape[0]
    w = _mixing(x, mask, weights)
    dist = nan_to_inf(jnp.sqrt(sq_dist_to_self(x, mask)))  # a non-finite row is infinitely far: coefficient 0
    nbr = mask & (jnp.arange(k) > 0)
    m = count(nbr)
    r = ranks(dist, nbr)
    at = m - f - 1
    tau_adaptive = jnp.where(at >= 0, jnp.sum(jnp.where(nbr & (r == at), dist, 0.0)), 0.0)
    tau_eff = jnp.where(adaptive, tau_adaptive, tau)
    c = jnp.where(nbr, w * _safe_ratio(tau_eff, dist), 0.0)
    c = c.at[0].set(1.0 - jnp.sum(c))
    return combine(x, mask, c)


def ios(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, f=1) -> jax.Array:
    """IOS (iterative outlier scissor): f times drop the neighbour farthest from the current weighted mean.

    Definition: start with all valid rows; repeat f times: ``z = sum_{k in S} w_k x_k / sum_{k in S} w_k``, remove
    from S the neighbour (k >= 1; the node itself is never removed) with the largest ``|x_k - z|`` (ties: lowest
    index). Return the weighted mean over the final S. ``w`` are the mixing weights (self weight ``W_ii`` kept).

    Hyper-parameters: ``f`` (int >= 0, may be traced): neighbours removed. Needs f < number of neighbours.
    Breakdown point: up to f Byzantine neighbours, under the paper's condition that their total mixing weight is
    small against the honest weight (a condition on W, not on a count alone).

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] mixing weights (None: uniform over valid rows).
        f: number of neighbours removed.

    Returns:
        [D] in the dtype of ``x``.

    References: Z. Wu, T. Chen, Q. Ling, "Byzantine-resilient decentralized stochastic optimization with robust
    aggregation rules", IEEE TSP 2023.
    """
    k = mask.shape[0]
    w = _mixing(x, mask, weights)
    gram, mask = centred_gram(x, mask)
    idx = jnp.arange(k)

    def coef(active):
        return _normalised(jnp.where(active, w, jnp.zeros((), w.dtype)), active)

    def body(_, active):
        d2 = sq_dist_to(gram, coef(active))
        cand = active & (idx > 0)
        far = jnp.argmax(jnp.where(cand, d2, -1.0))
        return active & ~(cand.any() & (idx == far))

    active = jax.lax.fori_loop(0, f, body, mask)
    return combine(x, active, coef(active))

"""Pre-aggregators: transform one node's neighbourhood before any rule.

Signature: ``pre(key, x [K, D], mask [K], weights [K], **hyper) -> (x [K', D], mask [K'], weights [K'])``. Row 0
stays the node's own (possibly transformed) vector and stays valid, so self-centred rules keep working after them.
"""

from __future__ import annotations

from numbers import Integral

import jax
import jax.numpy as jnp

from jaxdfl.aggregators._common import RANKS_MAX_K
from jaxdfl.aggregators._common import compute_dtype
from jaxdfl.aggregators._common import count
from jaxdfl.aggregators._common import ranks
from jaxdfl.aggregators._common import smallest
from jaxdfl.aggregators._common import sq_distances


def _mix(x: jax.Array, mask: jax.Array, mix: jax.Array) -> jax.Array:
    """``out_i = sum_j mix_ij x_j`` over valid j with ``mix_ij != 0``: ``[K, D], [K], [K', K] -> [K', D]``.

    Terms are added in order of j either way: unrolled (one fused loop over D) up to ``RANKS_MAX_K`` rows, in a
    ``fori_loop`` over j above (the unrolled K' x K terms took minutes to compile at K = 65).
    """
    dt = compute_dtype(x.dtype)
    if x.shape[0] > RANKS_MAX_K:
        def add(j, acc):
            use = mask[j] & (mix[:, j] != 0)
            xj = jax.lax.dynamic_index_in_dim(x, j, keepdims=False).astype(dt)
            return acc + jnp.where(use[:, None], mix[:, j, None].astype(dt) * xj[None, :], jnp.zeros((), dt))

        zero = jnp.zeros((mix.shape[0], x.shape[1]), dt)
        return jax.lax.fori_loop(0, x.shape[0], add, zero).astype(x.dtype)
    xs = [x[j].astype(dt) for j in range(x.shape[0])]
    out = []
    for i in range(mix.shape[0]):
        acc = None
        for j, xj in enumerate(xs):
            use = mask[j] & (mix[i, j] != 0)
            term = jnp.where(use, mix[i, j].astype(dt) * xj, jnp.zeros((), dt))
            acc = term if acc is None else acc + term
        out.append(acc)
    return jnp.stack(out).astype(x.dtype)


def nnm(key: jax.Array, x: jax.Array, mask: jax.Array, weights: jax.Array, *, f=1):
    """Nearest-neighbour mixing: replace every valid row by the mean of its n - f nearest valid rows.

    Definition: for each valid i, ``x_i <- (1 / (n - f)) sum_{j in N_i} x_j`` with ``N_i`` the ``n - f`` valid rows
    closest to ``x_i`` (itself included; ties: lower index). Mask and weights are unchanged.

    Hyper-parameters: ``f`` (int >= 0, may be traced). Needs n > 2f. Breakdown point f / n < 1/2
    (NNM keeps the breakdown point of the rule after it and tightens its error bound).

    Args:
        key: unused (deterministic).
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] mixing weights, passed through.
        f: tolerated number of Byzantine rows.

    Returns:
        ``(x [K, D], mask [K], weights [K])``.

    References: Y. Allouah, S. Farhadkhani, R. Guerraoui, N. Gupta, R. Pinot, J. Stephan, "Fixing by mixing: a
    recipe for optimal Byzantine ML under heterogeneity", AISTATS 2023.
    """
    del key
    k = mask.shape[0]
    d2 = sq_distances(x, mask)
    pair = mask[:, None] & mask[None, :]
    keep = jnp.maximum(count(mask) - f, 1)
    near = pair & smallest(d2, jnp.broadcast_to(mask, (k, k)), keep)
    return _mix(x, mask, near / keep.astype(compute_dtype(x.dtype))), mask, weights


def bucketing(key: jax.Array, x: jax.Array, mask: jax.Array, weights: jax.Array, *, s=2):
    """Bucketing: shuffle the valid neighbours, average them in buckets of s.

    Definition: a uniformly random permutation of the valid neighbour rows (k >= 1) is cut into consecutive buckets
    of ``s`` (the last may be smaller); each bucket becomes one row, the mean of its members weighted by their mixing
    weights (the plain mean when these are all 0), with weight the sum of their weights, so that a weighted rule
    after it (``mean``: gossip) sees the same weighted sum. With equal weights this is the paper's plain average.
    Row 0 (the node itself, which it trusts) is kept apart as row 0. Output has
    ``1 + ceil((K - 1) / s)`` rows; a node with m valid neighbours has ``1 + ceil(m / s)`` valid rows.

    Hyper-parameters: ``s`` (int >= 1, must be a static Python int: it sets the output shape).
    Breakdown point: f Byzantine rows can corrupt up to f buckets, so the rule after it must tolerate f buckets
    out of ceil(n / s) (i.e. s f / n below that rule's breakdown point).

    Args:
        key: PRNG key for the shuffle (one per node).
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] mixing weights.
        s: bucket size.

    Returns:
        ``(x [K', D], mask [K'], weights [K'])`` with ``K' = 1 + ceil((K - 1) / s)``.

    References: S. P. Karimireddy, L. He, M. Jaggi, "Byzantine-robust learning on heterogeneous datasets via
    bucketing", ICLR 2022.
    """
    if isinstance(s, bool) or not isinstance(s, Integral) or s < 1:
        raise ValueError(f"bucketing needs a static int s >= 1, got {s!r}")
    s = int(s)
    k = mask.shape[0]
    buckets = -(-(k - 1) // s)
    nbr = mask & (jnp.arange(k) > 0)
    position = ranks(jax.random.uniform(key, (k,), jnp.float32), nbr)  # float32: the same draws under x64
    member = nbr[None, :] & (position[None, :] // s == jnp.arange(buckets)[:, None])
    size = jnp.sum(member, axis=1)
    dt = compute_dtype(x.dtype)
    w = jnp.where(mask, weights, 0.0).astype(dt)
    member_w = jnp.where(member, w[None, :], 0.0)
    bucket_w = jnp.sum(member_w, axis=1, keepdims=True)
    plain = member / jnp.maximum(size, 1)[:, None].astype(dt)
    mix = jnp.concatenate([jnp.eye(1, k, dtype=dt),
                           jnp.where(bucket_w > 0, member_w / jnp.where(bucket_w > 0, bucket_w, 1.0), plain)])
    new_w = jnp.concatenate([w[:1], bucket_w[:, 0]])
    new_mask = jnp.concatenate([jnp.ones((1,), bool), size > 0])
    return _mix(x, mask, mix), new_mask, new_w.astype(weights.dtype)


def clip(key: jax.Array, x: jax.Array, mask: jax.Array, weights: jax.Array, *, tau=1.0, self_centered=False):
    """Norm clipping of every row, around zero or around the node's own vector.

    Definition: ``c = 0`` (or ``c = x_0`` when ``self_centered``); ``x_k <- c + (x_k - c) min(1, tau / |x_k - c|)``.
    Zero-centred clipping suits exchanged updates/gradients; self-centred clipping suits exchanged models.

    Hyper-parameters: ``tau`` (>= 0), ``self_centered`` (bool); both may be traced.
    Not robust on its own (breakdown point 0 in the mean's sense): it bounds each row's influence by tau.

    Args:
        key: unused (deterministic).
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] mixing weights, passed through.
        tau: clipping radius.
        self_centered: clip around the node's own vector instead of zero.

    Returns:
        ``(x [K, D], mask [K], weights [K])``.

    References: S. P. Karimireddy et al., ICML 2021 (clipping as a robustness tool); Y. Allouah et al., "Robust
    distributed learning: tight error bounds and breakdown point under data heterogeneity", NeurIPS 2023.
    """
    del key
    dt = compute_dtype(x.dtype)
    centre = jnp.where(self_centered, x[0].astype(dt), jnp.zeros((), dt))
    diff = jnp.where(mask[:, None], x.astype(dt) - centre, jnp.zeros((), dt))
    norm = jnp.sqrt(jnp.sum(diff * diff, axis=1))
    scale = jnp.where(norm > tau, tau / jnp.where(norm > 0, norm, 1.0), 1.0)
    out = jnp.where(mask[:, None], centre + diff * scale[:, None], x.astype(dt))
    return out.astype(x.dtype), mask, weights

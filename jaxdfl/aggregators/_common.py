"""Shared one-node building blocks: masked rows, linear combinations, the centred Gram matrix, ranks.

Everything here works on ONE node's neighbourhood (``x: [K, D]``, row 0 the node itself) and is lifted over nodes by
``jax.vmap`` in :func:`jaxdfl.aggregators.aggregate`. Rows are processed as a Python list of ``[D]`` vectors so that
XLA fuses a whole rule into one elementwise loop over D that reads each row once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype arithmetic runs in: float32, or wider when the input is wider (float64 under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def rows(x: jax.Array, mask: jax.Array, fill) -> list[jax.Array]:
    """The K rows of ``x [K, D]`` in the compute dtype, masked rows replaced by ``fill`` (a select: no 0 * garbage)
    and NaN entries of valid rows by ``+inf`` (an outlier like any other, where min/max would spread the NaN)."""
    dt = compute_dtype(x.dtype)
    return [jnp.where(mask[k], nan_to_inf(x[k].astype(dt)), jnp.asarray(fill, dt)) for k in range(x.shape[0])]


def nan_to_inf(v: jax.Array) -> jax.Array:
    """``v`` with NaN entries replaced by ``+inf``."""
    return jnp.where(jnp.isnan(v), jnp.asarray(jnp.inf, v.dtype), v)


def finite_rows(d2: jax.Array, mask: jax.Array) -> jax.Array:
    """``mask`` without the rows holding a non-finite entry (or too far to measure), found from the squared distances
    to row 0 (``d2 [K, K]``, :func:`sq_distances`): what the coefficient-space rules can combine. Row 0 stays."""
    return mask & (jnp.isfinite(d2[0]) | (jnp.arange(mask.shape[0]) == 0))


def count(mask: jax.Array) -> jax.Array:
    """Number of valid rows ``n`` (int32 scalar)."""
    return jnp.sum(mask.astype(jnp.int32))


def combine(x: jax.Array, mask: jax.Array, coef: jax.Array) -> jax.Array:
    """``sum_k coef_k x_k`` over valid rows with a non-zero coefficient: ``[K, D], [K], [K] -> [D]`` (input dtype).

    Rows with a zero coefficient are skipped by select, so an excluded row holding inf or NaN cannot leak into the
    result. The sum is an unrolled chain over K so that XLA emits one fused loop over D.
    """
    dt = compute_dtype(x.dtype)
    coef = coef.astype(dt)
    use = mask & (coef != 0)
    out = None
    for k in range(x.shape[0]):
        term = jnp.where(use[k], coef[k] * x[k].astype(dt), jnp.zeros((), dt))
        out = term if out is None else out + term
    return out.astype(x.dtype)


def take_row(x: jax.Array, index: jax.Array) -> jax.Array:
    """Row ``x[index]`` of ``[K, D]`` (a gather of one row, cheaper than a select over all K rows)."""
    return jax.lax.dynamic_index_in_dim(x, index, axis=0, keepdims=False)


def _chunks(d: int) -> int:
    """Number of major chunks T the D axis is cut into for the unrolled pairwise sums.

    About 20 terms per accumulated element amortise the per-element cost of the pair gather (measured on XLA:CPU:
    T = 20 beats 10, 40 and 50 at D = 1,000 and D = 100,000).
    """
    return max(1, min(20, d // 16))


def pair_sq_distances(x: jax.Array, mask: jax.Array, pairs: tuple[tuple[int, int], ...]) -> jax.Array:
    """``|x_i - x_j|^2`` for the given static row pairs: ``[K, D] -> [P]`` (0 for a pair with a masked row).

    Computed as squared differences, never through ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``, so it stays exact when the
    vectors are close (near consensus the dot-product form loses every digit to cancellation). Implementation: D is
    cut into T major chunks; one fused elementwise loop accumulates ``sum_t (x_i[t] - x_j[t])^2`` for all pairs into
    a ``[P, D / T]`` buffer (reading each row once from memory), which a small reduction finishes. On XLA:CPU this is
    several times faster than a batched ``x @ x.T`` with K ~ 10 rows, and it never materialises ``[K, K, D]``.
    """
    k, d = x.shape
    dt = compute_dtype(x.dtype)
    left = np.array([p[0] for p in pairs], np.int32)
    right = np.array([p[1] for p in pairs], np.int32)
    t_n = _chunks(d)
    b = d // t_n
    acc = None
    for t in range(t_n):
        # Static slices, not a reshape: a reshape of a sliced block (aggregate's chunks) would force a copy.
        rows_t = x[:, t * b:(t + 1) * b].astype(dt)
        diff = rows_t[left] - rows_t[right]
        acc = diff * diff if acc is None else acc + diff * diff
    # Keeps the accumulation one elementwise loop (XLA:CPU otherwise splits it around the final reduction).
    acc = jax.lax.optimization_barrier(acc)
    out = jnp.sum(acc, axis=1)
    if t_n * b < d:
        tail = x[:, t_n * b:].astype(dt)
        diff = tail[left] - tail[right]
        out = out + jnp.sum(diff * diff, axis=1)
    return jnp.where(mask[left] & mask[right], out, jnp.zeros((), dt))


def sq_distances(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Pairwise squared distances of the rows ``[K, D] -> [K, K]``: symmetric, zero diagonal, 0 where masked."""
    k = x.shape[0]
    if k == 1:
        return jnp.zeros((1, 1), compute_dtype(x.dtype))
    i, j = np.triu_indices(k, 1)
    v = pair_sq_distances(x, mask, tuple(zip(i.tolist(), j.tolist())))
    d2 = jnp.zeros((k, k), v.dtype).at[i, j].set(v)
    return d2 + d2.T


def sq_dist_to_self(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``|x_k - x_0|^2`` for every row ``[K, D] -> [K]`` (0 for row 0 and masked rows): only K - 1 pairs."""
    k = x.shape[0]
    if k == 1:
        return jnp.zeros((1,), compute_dtype(x.dtype))
    v = pair_sq_distances(x, mask, tuple((0, j) for j in range(1, k)))
    return jnp.concatenate([jnp.zeros((1,), v.dtype), v])


def gram_from_sq_distances(d2: jax.Array, mask: jax.Array) -> jax.Array:
    """Gram matrix ``G_ij = <x_i - x_0, x_j - x_0>`` (0 for masked rows) from squared distances ``[K, K]``.

    ``G_ij = (|x_i - x_0|^2 + |x_j - x_0|^2 - |x_i - x_j|^2) / 2``: its accuracy is relative to the spread of the
    neighbourhood, not to the vectors' norms. Any affine combination ``z = sum_k b_k x_k`` (``sum b = 1``) then has
    ``|x_i - z|^2 = G_ii - 2 (G b)_i + b' G b`` (:func:`sq_dist_to`): iterative rules (Weiszfeld, centred clipping,
    IOS) run in the K-dimensional coefficient space and read the D-long vectors only twice, once for the distances
    and once for the final combination.
    """
    to_self = d2[0]
    g = 0.5 * (to_self[:, None] + to_self[None, :] - d2)
    return jnp.where(mask[:, None] & mask[None, :], g, 0.0)


def centred_gram(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(gram [K, K], mask [K])``: :func:`gram_from_sq_distances` of :func:`sq_distances` over the rows that are
    valid and finite (:func:`finite_rows`), and that mask. A non-finite row has no place in the coefficient space,
    so the iterative rules leave it out as if it had not arrived."""
    d2 = sq_distances(x, mask)
    mask = finite_rows(d2, mask)
    return gram_from_sq_distances(d2, mask), mask


def sq_dist_to(gram: jax.Array, coef: jax.Array) -> jax.Array:
    """``|x_i - z|^2`` for every row i and ``z = sum_k coef_k x_k`` (``sum coef = 1``): ``[K, K], [K] -> [K]``."""
    gb = gram @ coef
    return jnp.maximum(jnp.diagonal(gram) - 2.0 * gb + coef @ gb, 0.0)


def ranks(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Ascending rank of each entry among the valid entries of the last axis, ties broken by index.

    ``values, valid: [..., K] -> [..., K] int32``; invalid entries get ranks >= the number of valid entries. O(K^2)
    comparisons, no sort: K is small and XLA's CPU sort is slow on short axes. NaN values rank as ``+inf``.
    """
    k = values.shape[-1]
    idx = jnp.arange(k)
    values = nan_to_inf(values)  # a NaN distance or score ranks last, as +inf
    vi = values[..., :, None]
    vj = values[..., None, :]
    before = (vj < vi) | ((vj == vi) & (idx[None, :] < idx[:, None]))
    before = before & valid[..., None, :]
    r = jnp.sum(before.astype(jnp.int32), axis=-1)
    return jnp.where(valid, r, k + idx)

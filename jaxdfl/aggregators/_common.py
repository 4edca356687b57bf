"""Shared one-node building blocks: masked rows, linear combinations, the centred Gram matrix, ranks.

Everything here works on ONE node's neighbourhood (``x: [K, D]``, row 0 the node itself) and is lifted over nodes by
``jax.vmap`` in :func:`jaxdfl.aggregators.aggregate`. Rows are processed as a Python list of ``[D]`` vectors so that
XLA fuses a whole rule into one elementwise loop over D that reads each row once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype arithmetic runs in: float32, or wider when the input is wider (float64 under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def rows(x: jax.Array, mask: jax.Array, fill) -> list[jax.Array]:
    """The K rows of ``x [K, D]`` in the compute dtype, masked rows replaced by ``fill`` (via select, never 0 * garbage)."""
    dt = compute_dtype(x.dtype)
    return [jnp.where(mask[k], x[k].astype(dt), jnp.asarray(fill, dt)) for k in range(x.shape[0])]


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


def centred_gram(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Gram matrix ``G_ij = <x_i - x_0, x_j - x_0>`` over valid rows (0 for masked rows): ``[K, D] -> [K, K]``.

    Centring at the node's own vector keeps squared distances accurate when the vectors are close (near consensus a
    raw ``x @ x.T`` loses every digit of ``|x_i - x_j|^2`` to cancellation against ``|x_i|^2``). Any affine
    combination ``z = sum_k b_k x_k`` (``sum b = 1``) then has ``|x_i - z|^2 = G_ii - 2 (G b)_i + b' G b``, so
    iterative rules (Weiszfeld, centred clipping, IOS) run in the K-dimensional coefficient space and read the D-long
    vectors only twice: once here and once for the final combination.
    """
    dt = compute_dtype(x.dtype)
    y = jnp.where(mask[:, None], x.astype(dt) - x[0].astype(dt), jnp.zeros((), dt))
    return jnp.dot(y, y.T, precision=jax.lax.Precision.HIGHEST)


def sq_distances(gram: jax.Array) -> jax.Array:
    """Pairwise squared distances ``[K, K]`` from a Gram matrix, clamped at 0, exact zeros on the diagonal."""
    d = jnp.diagonal(gram)
    d2 = jnp.maximum(d[:, None] + d[None, :] - 2.0 * gram, 0.0)
    return jnp.where(jnp.eye(gram.shape[0], dtype=bool), 0.0, d2)


def sq_dist_to(gram: jax.Array, coef: jax.Array) -> jax.Array:
    """``|x_i - z|^2`` for every row i and ``z = sum_k coef_k x_k`` (``sum coef = 1``): ``[K, K], [K] -> [K]``."""
    gb = gram @ coef
    return jnp.maximum(jnp.diagonal(gram) - 2.0 * gb + coef @ gb, 0.0)


def ranks(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Ascending rank of each entry among the valid entries of the last axis, ties broken by index.

    ``values, valid: [..., K] -> [..., K] int32``; invalid entries get ranks >= the number of valid entries. O(K^2)
    comparisons, no sort: K is small and XLA's CPU sort is slow on short axes.
    """
    k = values.shape[-1]
    idx = jnp.arange(k)
    vi = values[..., :, None]
    vj = values[..., None, :]
    before = (vj < vi) | ((vj == vi) & (idx[None, :] < idx[:, None]))
    before = before & valid[..., None, :]
    r = jnp.sum(before.astype(jnp.int32), axis=-1)
    return jnp.where(valid, r, k + idx)

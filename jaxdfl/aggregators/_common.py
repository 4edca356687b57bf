"""Shared one-node building blocks: masked rows, linear combinations, the centred Gram matrix, ranks.

Everything here works on ONE node's neighbourhood (``x: [K, D]``, row 0 the node itself) and is lifted over nodes by
``jax.vmap`` in :func:`jaxdfl.aggregators.aggregate`. Rows are processed as a Python list of ``[D]`` vectors so that
XLA fuses a whole rule into one elementwise loop over D that reads each row once.
"""

from __future__ import annotations

import functools

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


#: From this many bytes of a node's rows the pair sums run block by block on CPUs (:func:`_pair_sums_blocked`),
#: counted at 4 bytes a value whatever the input dtype (``K * D * 4``, so that the chunking's estimate, which knows
#: no dtype, decides as the kernel does): the rows no longer fit a core's L2 cache (512 KB on
#: the machine measured), so the one-pass loop, which sweeps all of D for one pair before the next, reads every row
#: from L3 or memory once per pair it is in. Below it the one-pass loop is faster: at N = 1,000, K = 9, D = 1,000
#: the blocks took 10.7 ms against 4.6 ms, at N = 128, K = 9, D = 4,810 (173 KB) both 3.0-3.7 ms.
PAIR_BLOCK_MIN_BYTES = 1 << 19

#: Coordinates per block of :func:`_pair_sums_blocked`: every node's ``[K, 320]`` slice of rows stays in L1 or L2
#: while all pairs read it.
PAIR_BLOCK = 320


#: Accumulator width of :func:`_pair_sums_blocked`: each step adds PAIR_BLOCK / 16 = 20 terms into a ``[P, 16]``
#: partial sum per node, so the accumulators of all nodes, which the vmapped loop sweeps once per step, stay small
#: (Krum at N = 300, K = 17, D = 100,000: 499 against 718 ms with 64 columns, median of interleaved passes; the
#: geometric median 868 against 1,263; N = 1,000, K = 9, D = 20,000: 215 against 237; equal within noise at
#: N = 100, K = 9 or 17, and at N = 40, K = 33 against 32 columns).
PAIR_WIDTH = 16


def pair_sums_blocked(k: int, d: int, p: int) -> bool:
    """Whether :func:`_pair_sums` of ``p`` pairs of a ``[k, d]`` neighbourhood runs block by block when compiled for
    a CPU: only for more pairs than rows (all pairs, or the Gram matrix), where a row is read by several pairs. The
    K - 1 distances to row 0 (MoNNA, clipped gossip) read each other row once and stay in one pass (blocks made
    them 1.2-1.4x slower)."""
    return p > k and k * d * 4 >= PAIR_BLOCK_MIN_BYTES and d >= 2 * PAIR_BLOCK


def row_buffer(d: int) -> float:
    """The buffer of a loop over D that keeps per-row partial sums (``[K, D / T]``), in ``[K, D]`` neighbourhoods:
    ``1 / T`` (0.05 from D = 320). XLA fuses the rules without all-pairs sums or a layered network into such loops:
    its CPU memory analysis reports at most 0.05 neighbourhoods for them (N = 200, K = 9, D = 100,000; N = 60,
    K = 33, D = 20,000; N = 1,000, K = 9, D = 1,000)."""
    return 1 / _chunks(d)


def pair_loop(k: int, d: int) -> bool:
    """Whether the all-pairs sums of a ``[k, d]`` neighbourhood run block by block here (a CPU backend)."""
    return jax.default_backend() == "cpu" and pair_sums_blocked(k, d, k * (k - 1) // 2)


def pair_buffer(k: int, d: int) -> float:
    """The buffer of the all-pairs sums of a ``[k, d]`` neighbourhood, in neighbourhoods (the automatic chunking's
    estimate): ``(K - 1) / (2 T)`` for one pass; block by block (on a CPU backend), the ``[P, PAIR_WIDTH]``
    accumulator, the ``[K, PAIR_BLOCK]`` copy and the remainder's one-pass buffer."""
    p = k * (k - 1) // 2
    if pair_loop(k, d):
        tail = d % PAIR_BLOCK
        return (p * (PAIR_WIDTH + (tail and tail // _chunks(tail))) + k * PAIR_BLOCK) / (k * d)
    return (k - 1) / (2 * _chunks(d))


def _pair_sums(x: jax.Array, pairs: tuple[tuple[int, int], ...], term, centre: bool = False) -> jax.Array:
    """``sum_d term(r_i[d], r_j[d])`` for the static row pairs ``(i, j)``: ``[K, D] -> [P]``, with ``r = x``, or
    ``r = x - x_0`` when ``centre``; never materialises ``[K, K, D]``.

    One fused pass over D (:func:`_pair_sums_fused`), or on CPUs, when a node's rows exceed L2
    (:func:`pair_sums_blocked`), a loop over blocks of D (:func:`_pair_sums_blocked`).
    """
    fused = functools.partial(_pair_sums_fused, pairs=pairs, term=term, centre=centre)
    if not pair_sums_blocked(*x.shape, len(pairs)):
        return fused(x)
    blocked = functools.partial(_pair_sums_blocked, pairs=pairs, term=term, centre=centre)
    return jax.lax.platform_dependent(x, cpu=blocked, default=fused)


def _pair_terms(rows: jax.Array, pairs, term, centre: bool) -> jax.Array:
    """``term(r_i, r_j)`` for every pair: ``[K, B] -> [P, B]`` (a gather of the pairs' rows, fused by XLA)."""
    left, right = np.asarray(pairs, np.int32).T
    rows = rows.astype(compute_dtype(rows.dtype))
    if centre:
        rows = rows - rows[:1]
    return term(rows[left], rows[right])


def _pair_sums_fused(x: jax.Array, pairs, term, centre: bool) -> jax.Array:
    """:func:`_pair_sums` in one pass over D.

    D is cut into T major chunks; one fused elementwise loop accumulates the terms of every pair into a
    ``[P, D / T]`` buffer (reading each row once from memory), which a small reduction finishes. On XLA:CPU this is
    several times faster than a batched ``x @ x.T`` with K ~ 10 rows.
    """
    d = x.shape[1]
    t_n = _chunks(d)
    b = d // t_n
    acc = None
    for t in range(t_n):
        # Static slices, not a reshape: a reshape of a sliced block (aggregate's chunks) would force a copy.
        part = _pair_terms(x[:, t * b:(t + 1) * b], pairs, term, centre)
        acc = part if acc is None else acc + part
    # Keeps the accumulation one elementwise loop (XLA:CPU otherwise splits it around the final reduction).
    acc = jax.lax.optimization_barrier(acc)
    out = jnp.sum(acc, axis=1)
    if t_n * b < d:
        out = out + jnp.sum(_pair_terms(x[:, t_n * b:], pairs, term, centre), axis=1)
    return out


# Jitted so that an eager call (a rule called on one node outside jit) compiles the loop once, not at every call.
@functools.partial(jax.jit, static_argnames=("pairs", "term", "centre"))
def _pair_sums_blocked(x: jax.Array, pairs, term, centre: bool) -> jax.Array:
    """:func:`_pair_sums` as a loop over blocks of ``PAIR_BLOCK`` coordinates, for CPUs.

    The one-pass loop finishes a pair over all of D before the next, so when a node's rows exceed L2 each row is
    read from L3 or memory once per pair it is in. Here each step copies every node's ``[K, PAIR_BLOCK]`` slice,
    and all pairs read it from cache into a ``[P, PAIR_WIDTH]`` accumulator; the remainder of D
    takes the one-pass loop. Krum per call, D = 100,000, 2 cores, median of interleaved passes against the one
    pass: 1.3x faster at N = 100, K = 9 (61 against 79 ms); 1.7x at K = 17; 3.1x at N = 40, K = 33; 5.7x at N = 20,
    K = 65 (260 ms against 1.47 s). The geometric median's centred Gram matrix gains 1.3x, 2.1x, 3.9x and 5.3x.
    (Those were measured with 64 accumulator columns up to K = 17; :data:`PAIR_WIDTH` has what 16 changed.)
    """
    k, d = x.shape
    w = PAIR_WIDTH

    def body(c, acc):
        # The slice is the output of a conditional so that it is copied once: XLA:CPU would otherwise fuse the
        # dynamic slice into the pair loop, which then ran 4-5x slower (at w = 64 and at w = 128 with 4 steps).
        # Centring the copy (``centre``) instead of every pair's terms made the geometric median 2x slower.
        block = jax.lax.cond(c >= 0, lambda: jax.lax.dynamic_slice_in_dim(x, c * PAIR_BLOCK, PAIR_BLOCK, axis=1),
                             lambda: jnp.zeros((k, PAIR_BLOCK), x.dtype))
        for t in range(PAIR_BLOCK // w):
            acc = acc + _pair_terms(block[:, t * w:(t + 1) * w], pairs, term, centre)
        return acc

    n_blocks = d // PAIR_BLOCK
    acc = jnp.zeros((len(pairs), w), compute_dtype(x.dtype))
    out = jnp.sum(jax.lax.fori_loop(0, n_blocks, body, acc), axis=1)
    if n_blocks * PAIR_BLOCK < d:
        out = out + _pair_sums_fused(x[:, n_blocks * PAIR_BLOCK:], pairs, term, centre)
    return out


def _sq_difference(a, b):
    diff = a - b
    return diff * diff


def pair_sq_distances(x: jax.Array, mask: jax.Array, pairs: tuple[tuple[int, int], ...]) -> jax.Array:
    """``|x_i - x_j|^2`` for the given static row pairs: ``[K, D] -> [P]`` (0 for a pair with a masked row).

    Computed as squared differences, never through ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``, so it stays exact when the
    vectors are close (near consensus the dot-product form loses every digit to cancellation); one pass over the
    rows (:func:`_pair_sums`).
    """
    left, right = np.asarray(pairs, np.int32).T
    out = _pair_sums(x, pairs, _sq_difference)
    return jnp.where(mask[left] & mask[right], out, jnp.zeros((), out.dtype))


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


def centred_gram(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(gram [K, K], mask [K])``: ``G_ij = <x_i - x_0, x_j - x_0>`` over the rows that are valid and finite, and that
    mask (0 elsewhere).

    The products of the centred rows are summed directly in one pass (:func:`_pair_sums`), so each entry is accurate
    relative to the rows' distances from x_0: the polarisation ``(|x_i - x_0|^2 + |x_j - x_0|^2 - |x_i - x_j|^2) / 2``
    lost the cross terms of a far row (an outlier 1e6 from rows of unit spread moved the geometric median by 0.7% of
    that spread). Any affine combination ``z = sum_k b_k x_k`` (``sum b = 1``) then has
    ``|x_i - z|^2 = G_ii - 2 (G b)_i + b' G b`` (:func:`sq_dist_to`): iterative rules (Weiszfeld, centred clipping,
    IOS) run in the K-dimensional coefficient space and read the D-long vectors only twice, once here and once for
    the final combination. A row with a non-finite entry (or too far to measure: ``G_kk`` overflows) has no place in
    that space, so it is left out of the mask as if it had not arrived; row 0 stays.
    """
    k = x.shape[0]
    if k == 1:
        return jnp.zeros((1, 1), compute_dtype(x.dtype)), mask
    i, j = np.triu_indices(k - 1)
    i, j = i + 1, j + 1
    v = _pair_sums(x, tuple(zip(i.tolist(), j.tolist())), jnp.multiply, centre=True)
    g = jnp.zeros((k, k), v.dtype).at[i, j].set(v).at[j, i].set(v)
    mask = mask & (jnp.isfinite(jnp.diagonal(g)) | (jnp.arange(k) == 0))
    return jnp.where(mask[:, None] & mask[None, :], g, jnp.zeros((), g.dtype)), mask


def sq_dist_to(gram: jax.Array, coef: jax.Array) -> jax.Array:
    """``|x_i - z|^2`` for every row i and ``z = sum_k coef_k x_k`` (``sum coef = 1``): ``[K, K], [K] -> [K]``."""
    gb = gram @ coef
    return jnp.maximum(jnp.diagonal(gram) - 2.0 * gb + coef @ gb, 0.0)


#: Up to this many rows :func:`smallest` compares all pairs (O(K^3) per node for a [K, K] matrix, fastest for small
#: K); above, it bisects on the values' bits (O(K^2) per step, 32 steps in float32), which keeps Krum and NNM on
#: dense graphs (K ~ 100) in time and memory (measured at N = K, D = 1,000: the crossover is near K = 32), and
#: :func:`ranks` ranks the rows of a matrix one entry per loop step.
RANKS_MAX_K = 32


def smallest(values: jax.Array, valid: jax.Array, c) -> jax.Array:
    """The ``c`` smallest valid entries of each row, ties broken by index: ``[K, K], [K, K] bool, [K] or scalar int
    -> [K, K] bool`` (all valid entries of a row with fewer than ``c``, none for ``c <= 0``). ``values`` must be
    ``>= 0`` or NaN (squared distances; NaN counts as ``+inf``).

    Same selection as ``ranks(values, valid) < c``, which it is for ``K <= RANKS_MAX_K``; for larger K the c-th
    smallest value of each row is found by bisection on its bit pattern (non-negative floats order as their bits),
    then the ties at that value are taken in index order.
    """
    k = values.shape[-1]
    if k <= RANKS_MAX_K:
        return valid & (ranks(values, valid) < jnp.expand_dims(c, -1))
    v = jnp.where(valid, jnp.abs(nan_to_inf(values)), jnp.asarray(jnp.inf, values.dtype))
    v = jnp.where(v < jnp.finfo(v.dtype).tiny, jnp.zeros((), v.dtype), v)  # XLA:CPU compares denormals as 0
    itype = jnp.int32 if v.dtype.itemsize == 4 else jnp.int64
    bits = jax.lax.bitcast_convert_type(v, itype)
    c = jnp.broadcast_to(jnp.minimum(c, jnp.sum(valid.astype(jnp.int32), axis=-1)), values.shape[:-1])
    top = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, v.dtype), itype)

    def step(_, bounds):  # invariant: the c-th smallest bit pattern lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum((bits <= mid[..., None]).astype(jnp.int32), axis=-1) >= c
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    start = (jnp.zeros(c.shape, itype), jnp.full(c.shape, top, itype))
    _, t = jax.lax.fori_loop(0, 8 * v.dtype.itemsize, step, start)
    below = valid & (bits < t[..., None])
    ties = valid & (bits == t[..., None])
    room = c - jnp.sum(below.astype(jnp.int32), axis=-1)
    return below | (ties & (jnp.cumsum(ties.astype(jnp.int32), axis=-1) <= room[..., None]))


def ranks(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Ascending rank of each entry among the valid entries of the last axis, ties broken by index.

    ``values, valid: [..., K] -> [..., K] int32``; invalid entries get ranks >= the number of valid entries. O(K^2)
    comparisons, no sort: K is small and XLA's CPU sort is slow on short axes. NaN values rank as ``+inf``. A matrix
    of rows longer than ``RANKS_MAX_K`` is ranked one entry per loop step (Bulyan's ``[K, K]`` distances at K = 129
    otherwise kept 1.1 GB of comparisons alive on 129 nodes).
    """
    k = values.shape[-1]
    idx = jnp.arange(k)
    values = nan_to_inf(values)  # a NaN distance or score ranks last, as +inf

    def rank_of(vj, vi, j, i, valid_j):  # how many valid j come before i (smaller value, or equal and lower index)
        before = ((vj < vi) | ((vj == vi) & (j < i))) & valid_j
        return jnp.sum(before.astype(jnp.int32), axis=-1)

    if values.ndim == 1 or k <= RANKS_MAX_K:
        r = rank_of(values[..., None, :], values[..., :, None], idx, idx[:, None], valid[..., None, :])
    else:  # rows of many entries: one entry i per step, [..., K] temporaries where all pairs take [..., K, K]
        def step(i, r):
            vi = jax.lax.dynamic_slice_in_dim(values, i, 1, axis=-1)
            return jax.lax.dynamic_update_slice_in_dim(r, rank_of(values, vi, idx, i, valid)[..., None], i, axis=-1)

        r = jax.lax.fori_loop(0, k, step, jnp.zeros(values.shape, jnp.int32))
    return jnp.where(valid, r, k + idx)

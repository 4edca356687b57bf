"""Coordinate-wise order-statistic rules (median, trimmed mean, mean-around-median) via sorting networks.

XLA's CPU sort is very slow on a short axis (``jnp.median`` over K=9 rows for 100 x 100,000 coordinates takes
seconds). A sorting network is a fixed list of compare-exchange pairs ``(i, j)``: ``(x_i, x_j) <- (min, max)``.
Applied to the K rows as whole ``[D]`` vectors it becomes one fused elementwise loop over D with ~2 x #pairs min/max
instructions per coordinate, which runs at memory speed. NaN entries of valid rows count as ``+inf`` (outliers
within the breakdown point, where min/max would spread them). Masked rows are pushed to ``+inf`` so the ``n`` valid
values end up in positions ``0..n-1``; the per-node count ``n`` then picks the order statistic with a short select
chain, so nodes with different degrees share one program. XLA drops the comparators whose outputs are never used.

Networks of more than ``FUSED_NETWORK_MAX_COMPARATORS`` comparators (more than 128 rows; 169 for the median) run
layer by layer in a loop instead (:func:`network_layers`): XLA:CPU's compile time, and past some size its run time,
grow steeply with the size of one fused loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdfl.aggregators._common import compute_dtype
from jaxdfl.aggregators._common import count
from jaxdfl.aggregators._common import nan_to_inf
from jaxdfl.aggregators._common import rows
from jaxdfl.aggregators._common import take_row


@functools.lru_cache(maxsize=None)
def sorting_network(k: int) -> tuple[tuple[int, int], ...]:
    """Comparator pairs ``(i, j)``, ``i < j``, that sort ``k`` values ascending (Batcher's odd-even merge sort).

    Built for the next power of two and pruned to ``k``: a comparator touching a position >= k only ever sees the
    ``+inf`` padding there and is a no-op. Size O(k log^2 k): 19 pairs for k = 8, 28 for k = 9, 63 for k = 16.

    References: K. E. Batcher, "Sorting networks and their applications", AFIPS 1968; D. E. Knuth, TAOCP vol. 3,
    5.3.4 (the iterative form used here).
    """
    if k < 1:
        raise ValueError(f"sorting_network needs k >= 1, got {k}")
    size = 1
    while size < k:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        step = p
        while step >= 1:
            for j in range(step % p, size - step, 2 * step):
                for i in range(min(step, size - j - step)):
                    a, b = i + j, i + j + step
                    if a // (2 * p) == b // (2 * p) and b < k:
                        pairs.append((a, b))
            step //= 2
        p *= 2
    return tuple(pairs)


@functools.lru_cache(maxsize=None)
def partition_network(k: int, f: int) -> tuple[tuple[int, int], ...]:
    """Comparator pairs that move the f smallest of ``k`` values to positions ``0..f-1`` and the f largest to
    ``k-f..k-1``, both ascending, and leave the rest unsorted between them: f bubble passes from each end."""
    low = [(i, j) for i in range(f) for j in range(i + 1, k)]
    high = [(j, k - 1 - i) for i in range(f) for j in range(f, k - 1 - i)]
    return tuple(low + high)


@functools.lru_cache(maxsize=None)
def pruned_network(k: int, outputs: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The comparators of :func:`sorting_network` that can reach the given output positions (the rest cannot change
    them): what XLA keeps of the whole network when only those positions are used, e.g. 1,444 of 1,800 comparators
    for the median of 129 values."""
    needed, keep = set(outputs), []
    for i, j in reversed(sorting_network(k)):
        if i in needed or j in needed:
            keep.append((i, j))
            needed |= {i, j}
    return tuple(reversed(keep))


@functools.lru_cache(maxsize=None)
def network_layers(k: int, pairs: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """The comparator network ``pairs`` on ``k`` values as layers of disjoint comparators, each comparator in the
    earliest layer after the previous ones on its two positions: ``partner [L, k]`` (the other position of a
    position's comparator, itself if none) and ``role [L, k]`` (0 untouched, 1 keeps the minimum, 2 the maximum)."""
    depth = [0] * k
    layer_of = []
    for i, j in pairs:
        t = max(depth[i], depth[j])
        layer_of.append(t)
        depth[i] = depth[j] = t + 1
    n_layers = max(depth, default=0)
    partner = np.tile(np.arange(k, dtype=np.int32), (n_layers, 1))
    role = np.zeros((n_layers, k), np.int8)
    for (i, j), t in zip(pairs, layer_of):
        partner[t, i], partner[t, j] = j, i
        role[t, i], role[t, j] = 1, 2
    return partner, role


#: Most values for which :func:`compare_exchange` writes a comparator as a select (below).
SELECT_COMPARATOR_MAX_VALUES = 32

#: Most comparators :func:`compare_exchange` unrolls into one fused loop. XLA:CPU's compile time grows steeply with
#: the size of that loop (in LLVM's machine passes), and past some size its run time too. Measured at N = K nodes,
#: D = 1,000: MeaMed, whose loop also keeps every sorted value for its window, compiles in 15 s at K = 112 (1,264
#: comparators) and 40 s at K = 128 (1,471) with f = 2, but over 120 s at K = 129 (1,800). Larger networks run their
#: layers in a loop, whose program grows only linearly with K; every layer reads and writes all K rows (MeaMed at
#: K = 129: 4 s to compile, 753 ms per call; fused it took 16 s and 523 ms with f = 1).
FUSED_NETWORK_MAX_COMPARATORS = 1500

#: The same bound for a selection that keeps one or two positions (the median), whose fused loop is the pruned
#: network (:func:`pruned_network`) and one select. Fused, the median compiles in 6 s and runs in 40 ms at K = 129
#: (1,444 comparators) and 16 s / 86 ms at K = 169 (1,990); then its run time jumps: 478 ms at K = 177 (2,104),
#: 6.2 s at K = 193 (2,316, 34 s to compile), and K = 257 (3,717) did not compile in 9 minutes. Layer by layer it
#: runs in 0.8 s at K = 129, 1.3 s at 161, 1.9 s at 193 and 3.3-3.8 s at 257 (2 s to compile at K = 257).
FUSED_SELECTION_MAX_COMPARATORS = 2000


def _median_network(k: int) -> tuple[tuple[int, int], ...]:
    """The comparators the median of ``k`` values needs: those reaching the middle positions p and p + 1."""
    p = (k - 1) // 2
    return pruned_network(k, tuple(range(p, min(p + 2, k))))


def runs_by_layer(rule: str, k: int) -> bool:
    """Whether the order-statistic ``rule`` ("median", "trimmed_mean", "meamed", "bulyan") runs its sorting network
    on ``k`` rows layer by layer. Its loop then keeps the stacked rows, in and out: 2 neighbourhoods of temporaries
    (``aggregators.temporaries``; a trimmed mean that partitions instead keeps none)."""
    if rule == "median":
        return not _unrolled(_median_network(k), FUSED_SELECTION_MAX_COMPARATORS)
    return rule in ("trimmed_mean", "meamed", "bulyan") and not _unrolled(sorting_network(k))


def _unrolled(pairs, max_fused: int | None = None) -> bool:
    """Whether :func:`compare_exchange` unrolls ``pairs`` into one fused loop (at most ``max_fused`` of them, by
    default ``FUSED_NETWORK_MAX_COMPARATORS``) rather than running them layer by layer."""
    return len(pairs) <= (FUSED_NETWORK_MAX_COMPARATORS if max_fused is None else max_fused)


def compare_exchange(values: list[jax.Array] | jax.Array, pairs, max_fused: int | None = None) -> list[jax.Array]:
    """Apply comparator pairs ``(i, j)``, ``(v_i, v_j) <- (min, max)``, to a list of equally shaped arrays: unrolled
    into one fused loop, or, for more than ``max_fused`` pairs (default ``FUSED_NETWORK_MAX_COMPARATORS``), layer by
    layer (:func:`_compare_exchange_by_layer`). ``values`` may also be one array stacking them on its first axis.

    The values must hold no NaN (the rules map NaN to ``+inf`` first). Then ``where(a < b, a, b)`` is the minimum;
    it compiles to one vector min instruction, where ``jnp.minimum`` adds the NaN-propagating compare and select
    (meamed 1.3x faster at 100 x 9 x 100,000 on 2 CPU cores, median 1.4x on one core). It doubles the operations
    XLA compiles, though: at K = 129 the median took 20 s to compile instead of 6 s and MeaMed over 120 s instead
    of 13 s, so networks of more than ``SELECT_COMPARATOR_MAX_VALUES`` values keep ``jnp.minimum``/``maximum``.
    """
    if not _unrolled(pairs, max_fused):
        s = _compare_exchange_by_layer(values, tuple(pairs))
        return [s[i] for i in range(len(s))]
    s = list(values)
    select = len(s) <= SELECT_COMPARATOR_MAX_VALUES
    for i, j in pairs:
        a, b = s[i], s[j]
        if select:
            s[i], s[j] = jnp.where(a < b, a, b), jnp.where(a > b, a, b)
        else:
            s[i], s[j] = jnp.minimum(a, b), jnp.maximum(a, b)
    return s


def _compare_exchange_by_layer(values: list[jax.Array] | jax.Array,
                               pairs: tuple[tuple[int, int], ...]) -> jax.Array:
    """:func:`compare_exchange` as a loop over the network's layers (:func:`network_layers`) on the stacked values,
    returned stacked: each layer gathers every position's partner and keeps the minimum or maximum. The loop body
    does not grow with the network."""
    s = values if isinstance(values, jax.Array) else jnp.stack(values)
    if not pairs:
        return s
    partner, role = network_layers(len(s), pairs)
    partner, role = jnp.asarray(partner), jnp.asarray(role)
    expand = (slice(None),) + (None,) * (s.ndim - 1)

    def layer(t, s):
        other = jnp.take(s, partner[t], axis=0)
        r = role[t][expand]
        return jnp.where(r == 1, jnp.minimum(s, other), jnp.where(r == 2, jnp.maximum(s, other), s))

    return jax.lax.fori_loop(0, partner.shape[0], layer, s)


def sort_rows(values: list[jax.Array] | jax.Array) -> list[jax.Array]:
    """Sort a list of equally shaped arrays elementwise (position-wise ascending) with :func:`sorting_network`."""
    return compare_exchange(values, sorting_network(len(values)))


def _pick(s: list[jax.Array] | jax.Array, index: jax.Array) -> jax.Array:
    """``s[index]`` for a traced per-node index: a select chain over a list (fuses into the surrounding loop), a
    dynamic index into a stacked array."""
    if isinstance(s, jax.Array):
        return jax.lax.dynamic_index_in_dim(s, index, axis=0, keepdims=False)
    out = s[0]
    for k in range(1, len(s)):
        out = jnp.where(index == k, s[k], out)
    return out


def _masked_rows(x: jax.Array, mask: jax.Array, fill, unrolled: bool) -> list[jax.Array] | jax.Array:
    """``x [K, D]`` in the compute dtype with NaN as ``+inf`` and masked rows set to ``fill`` (a scalar or ``[K]``):
    a list of K row ops for a network that :func:`compare_exchange` unrolls (they fuse into its loop), one
    ``[K, D]`` op for the layer loop (as K row ops they would be K more fused loops for XLA to compile: 13.6 s
    instead of 1.5 s for the median of 257 rows)."""
    dt = compute_dtype(x.dtype)
    fill = jnp.broadcast_to(jnp.asarray(fill, dt), mask.shape)
    if unrolled:
        return [jnp.where(mask[j], nan_to_inf(x[j].astype(dt)), fill[j]) for j in range(x.shape[0])]
    return jnp.where(mask[:, None], nan_to_inf(x.astype(dt)), fill[:, None])


def _sorted_valid(x: jax.Array, mask: jax.Array) -> tuple[list[jax.Array] | jax.Array, jax.Array]:
    """The rows sorted per coordinate, masked ones last (+inf), and the valid count: a list of rows from an unrolled
    network, the stacked ``[K, D]`` array from one run by layer."""
    network = sorting_network(x.shape[0])
    unrolled = _unrolled(network)
    values = _masked_rows(x, mask, jnp.inf, unrolled)
    s = compare_exchange(values, network) if unrolled else _compare_exchange_by_layer(values, network)
    return s, count(mask)


def _median_of_sorted(s: list[jax.Array] | jax.Array, n: jax.Array) -> jax.Array:
    # 0.5 a + 0.5 b cannot overflow for finite a, b near the float32 limit, unlike (a + b) / 2.
    return 0.5 * _pick(s, (n - 1) // 2) + 0.5 * _pick(s, n // 2)


def median(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Coordinate-wise median of the valid rows.

    Definition: for each coordinate d, the median of ``{x_k[d] : mask_k}``; for an even count n the mean of the two
    middle values. Unweighted (``weights`` is ignored), as in the server-side rule.

    Hyper-parameters: none. Breakdown point 1/2: tolerates f Byzantine rows when 2f < n.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.

    Returns:
        [D] in the dtype of ``x``.

    References: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-robust distributed learning: towards
    optimal statistical rates", ICML 2018.
    """
    # Balanced padding: a = (K-1)//2 - (n-1)//2 masked rows go to -inf and the rest to +inf, which puts the valid
    # values' lower median at the fixed position p = (K-1)//2 (upper median at p or p + 1 by the parity of n). With
    # fixed output positions XLA prunes the comparators that cannot reach them (~12% faster than a dynamic pick).
    k = x.shape[0]
    n = count(mask)
    below = (k - 1) // 2 - (n - 1) // 2
    rank_masked = jnp.cumsum(~mask) - 1
    fill = jnp.where(rank_masked < below, -jnp.inf, jnp.inf)
    p = (k - 1) // 2
    network = _median_network(k)
    values = _masked_rows(x, mask, fill, _unrolled(network, FUSED_SELECTION_MAX_COMPARATORS))
    s = compare_exchange(values, network, FUSED_SELECTION_MAX_COMPARATORS)
    upper = jnp.where(n % 2 == 1, s[p], s[p + 1]) if p + 1 < k else s[p]
    return (0.5 * s[p] + 0.5 * upper).astype(x.dtype)


def trimmed_mean(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, f=1) -> jax.Array:
    """Coordinate-wise trimmed mean: drop the f largest and f smallest values per coordinate, average the rest.

    Definition: with ``s_0 <= ... <= s_{n-1}`` the sorted valid values of a coordinate,
    ``TM = (1 / (n - 2f)) sum_{k=f}^{n-f-1} s_k``. Unweighted (``weights`` is ignored).

    Hyper-parameters: ``f`` (int >= 0, may be a traced scalar): values trimmed per side. Needs n > 2f. Breakdown
    point f/n.

    A static ``f`` whose partition needs fewer comparators than a sort (f = 1 from K = 7, f = 2 from K = 17) and can
    be fused skips the sort: see :func:`_trimmed_mean_by_partition`. A traced ``f`` sorts the rows with
    :func:`sorting_network`.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.
        f: number of values trimmed on each side.

    Returns:
        [D] in the dtype of ``x``.

    References: D. Yin et al., ICML 2018 (as for :func:`median`); BRIDGE-T: Z. Yang, W. U. Bajwa, "ByRDiE /
    BRIDGE: Byzantine-resilient decentralized gradient descent", IEEE TSIPN 2019 / 2022.
    """
    if isinstance(f, int) and 0 <= f and _partition_is_cheaper(x.shape[0], f):
        return _trimmed_mean_by_partition(x, mask, f)
    s, n = _sorted_valid(x, mask)
    out = None
    for k, sk in enumerate(s):
        term = jnp.where((k >= f) & (k < n - f), sk, jnp.zeros((), sk.dtype))
        out = term if out is None else out + term
    return (out / jnp.maximum(n - 2 * f, 1).astype(out.dtype)).astype(x.dtype)


def _partition_is_cheaper(k: int, f: int) -> bool:
    """Whether :func:`_trimmed_mean_by_partition` beats the sort: fewer comparators, and few enough to be fused (its
    bubble passes are chains of K comparators, so run layer by layer they would take far more layers than the
    sort's O(log^2 K))."""
    size = _partition_size(k, f)
    return size < len(sorting_network(k)) and size <= FUSED_NETWORK_MAX_COMPARATORS


def _partition_size(k: int, f: int) -> int:
    """Comparators of :func:`_trimmed_mean_by_partition`: the partition and the anchor's median (a large number
    when ``k < 2f + 1``, where it does not apply)."""
    if 2 * f + 1 > k:
        return 1 << 30
    return len(partition_network(k, f)) + len(sorting_network(2 * f + 1))


def _trimmed_mean_by_partition(x: jax.Array, mask: jax.Array, f: int) -> jax.Array:
    """Trimmed mean for a static ``f`` without sorting: the middle values only need to be told from the extremes.

    Masked rows are set to an anchor ``c``, the median of the first ``2f + 1`` valid rows: f of those rows lie below
    it and f above, so ``s_f <= c <= s_{n-f-1}`` and the copies of ``c`` fall inside the trimmed window. Then f bubble
    passes move the f smallest of the K values to the front and f more the f largest to the back (every value kept,
    none cancelled), the K - 2f values between them are summed and the ``K - n`` copies of ``c`` taken back out.
    With at most f outliers among the valid rows, ``c`` lies within the honest rows' range (f outliers are a
    minority of 2f + 1 rows), so the subtraction costs no precision; a smaller anchor set (row 0 alone for f = 1)
    would also be exact in real arithmetic but lets one far row swamp the float32 sum. For K = 9, f = 1 this is 18
    comparators instead of a 28-comparator sort (1.5x faster at 100 x 9 x 100,000).
    """
    k = x.shape[0]
    dt = compute_dtype(x.dtype)
    n = count(mask)
    if f == 0:
        c = jnp.zeros(x.shape[1:], dt)
    else:
        first = jnp.argsort(~mask, stable=True)[:2 * f + 1]
        c = sort_rows([nan_to_inf(take_row(x, j).astype(dt)) for j in first])[f]
    s = compare_exchange(rows(x, mask, c), partition_network(k, f))
    out = s[f]
    for j in range(f + 1, k - f):
        out = out + s[j]
    # An infinite anchor means the window holds that infinity: the sum is already the definition's +-inf (or NaN).
    out = jnp.where((n < k) & jnp.isfinite(c), out - (k - n).astype(dt) * c, out)
    return (out / jnp.maximum(n - 2 * f, 1).astype(dt)).astype(x.dtype)


def _meamed_window_stacked(s: jax.Array, n: jax.Array, f) -> jax.Array:
    """:func:`meamed`'s window on the sorted values stacked as ``[K, D]`` (a network run by layer): the same window
    start and mean as the unrolled rows, in array operations whose number does not grow with K or f (the row by row
    form takes O(K f) operations, which XLA:CPU compiles slowly at large K)."""
    k, keep = s.shape[0], n - f
    med = _median_of_sorted(s, n)
    dist = jnp.abs(s - med)
    # |s_{j + keep} - med| for every j (inf past the last row), as one slice of the distances padded with inf
    padded = jnp.concatenate([dist, jnp.full_like(dist, jnp.inf)])
    upper = jax.lax.dynamic_slice_in_dim(padded, keep, k, axis=0)
    j = jnp.arange(k)[:, None]
    start = jnp.sum(((dist > upper) & (j < f)).astype(jnp.int32), axis=0)
    window = (j >= start) & (j < start + keep)
    return jnp.sum(jnp.where(window, s, jnp.zeros((), s.dtype)), axis=0) / jnp.maximum(keep, 1).astype(s.dtype)


def meamed(x: jax.Array, mask: jax.Array, weights: jax.Array | None = None, *, f=1) -> jax.Array:
    """Mean around the median: per coordinate, the mean of the n - f values nearest to the coordinate median.

    Definition: ``med = median_k x_k[d]``; keep the ``n - f`` values with the smallest ``|x_k[d] - med|`` and average
    them. Unweighted (``weights`` is ignored). The kept values are a contiguous window ``s_w .. s_{w+n-f-1}`` of the
    sorted values; the window start ``w`` is the number of ``j < f`` with ``|s_j - med| > |s_{j+n-f} - med|``
    (a monotone test when n > 2f), so no second sort is needed. Ties at equal distance keep the lower value.

    Hyper-parameters: ``f`` (int >= 0, may be a traced scalar): values dropped. Needs n > 2f; breakdown f/n.

    Args:
        x: [K, D] the neighbourhood, row 0 the receiving node's own vector.
        mask: [K] bool, valid rows.
        weights: [K] ignored.
        f: number of values dropped (those farthest from the median).

    Returns:
        [D] in the dtype of ``x``.

    References: C. Xie, O. Koyejo, I. Gupta, "Generalized Byzantine-tolerant SGD", arXiv:1802.10116, 2018.
    """
    s, n = _sorted_valid(x, mask)
    if isinstance(s, jax.Array):  # the network ran by layer
        return _meamed_window_stacked(s, n, f).astype(x.dtype)
    med = _median_of_sorted(s, n)
    kk = len(s)
    keep = n - f
    dist = [jnp.abs(sk - med) for sk in s]
    static_f = isinstance(f, int)
    start = jnp.zeros(med.shape, jnp.int32)
    for j in range(min(f, kk) if static_f else kk):
        # |s_{j + keep} - med|: the value that would enter the window if s_j left it (inf past the valid ones).
        upper = jnp.full(med.shape, jnp.inf, med.dtype)
        for k in range(j + 1, kk):
            upper = jnp.where(j + keep == k, dist[k], upper)
        leave = dist[j] > upper
        if not static_f:
            leave = leave & (j < f)
        start = start + leave.astype(jnp.int32)
    out = None
    for k, sk in enumerate(s):
        term = jnp.where((k >= start) & (k < start + keep), sk, jnp.zeros((), sk.dtype))
        out = term if out is None else out + term
    return (out / jnp.maximum(keep, 1).astype(out.dtype)).astype(x.dtype)

"""Tests of jaxdfl.aggregators: a contract suite over REGISTRY, NumPy references, robustness, pre-aggregators,
validation, and the whole-network lift."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdfl import aggregators as A
from jaxdfl.aggregators import reference as R
from jaxdfl.aggregators.network import PAIRWISE
from jaxdfl.errors import ConfigError

RULES = sorted(A.REGISTRY)
K, D = 7, 6
# Hyper-parameters for the tests: geometric median run to convergence so that it can be compared with the
# float64 reference; larger radii so that clipping is active but not total on unit-scale data.
HYPER = {
    "geometric_median": {"iters": 400, "tol": 0.0, "nu": 1e-3},
    "centered_clip": {"tau": 1.5, "iters": 4},
    "clipped_gossip": {"tau": 1.5},
}


def hyper(rule):
    return {**A.DEFAULTS[rule], **HYPER.get(rule, {})}


@functools.lru_cache(maxsize=None)
def _jit_vmap(rule, items):
    fn = A.REGISTRY[rule]
    h = dict(items)
    return jax.jit(jax.vmap(lambda x, m, w: fn(x, m, w, **h)))


def batched(rule, **h):
    """jit(vmap(rule)) with the test hyper-parameters (overridden by h), compiled once per rule, hyper and shape.

    Everything runs jitted: eager calls would dispatch (and compile) the unrolled networks op by op.
    """
    return _jit_vmap(rule, tuple(sorted({**hyper(rule), **h}.items())))


@functools.lru_cache(maxsize=None)
def jit_pre(name, items):
    fn = A.PRE_REGISTRY[name]
    return jax.jit(jax.vmap(lambda k, x, m, w: fn(k, x, m, w, **dict(items))))


def make_batch(seed, b=6, k=K, d=D, min_valid=5):
    """b random neighbourhoods with random masks (row 0 valid, at least min_valid rows) and mixing weights."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, k, d)).astype(np.float32)
    mask = np.zeros((b, k), bool)
    for i in range(b):
        n = rng.integers(min_valid, k + 1)
        mask[i, 0] = True
        mask[i, 1 + rng.choice(k - 1, n - 1, replace=False)] = True
    w = np.where(mask, rng.uniform(0.5, 1.5, size=(b, k)), 0.0)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    return x, mask, w


def garbage(x, mask, fill):
    return np.where(mask[..., None], x, np.float32(fill)).astype(np.float32)


# --------------------------------------------------------------------------- sorting network


@pytest.mark.parametrize("k", range(1, 13))
def test_sorting_network_sorts_all_zero_one_inputs(k):
    # 0-1 principle: a comparator network sorts every input iff it sorts every 0/1 input.
    v = np.array(list(itertools.product([0, 1], repeat=k)), np.int8).T
    rows = [v[i] for i in range(k)]
    for i, j in A.sorting_network(k):
        rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    out = np.stack(rows)
    assert (np.diff(out, axis=0) >= 0).all()


def test_sort_rows_sorts_infinities_ties_and_signed_zeros():
    """The comparator is a select on ``a < b`` (one vector min): on NaN-free values it must order every input as a
    sort does, infinities and ties included."""
    from jaxdfl.aggregators.order_stats import sort_rows

    values = np.array([-np.inf, -1.0, -0.0, 0.0, 1.0, np.inf], np.float32)
    v = np.array(list(itertools.product(values, repeat=5)), np.float32).T  # every input of those values
    out = np.stack(jax.jit(sort_rows)([jnp.asarray(r) for r in v]))
    np.testing.assert_array_equal(out, np.sort(v, axis=0))


def test_large_networks_keep_min_and_max_to_bound_the_compile_time():
    """The select form doubles the ops XLA compiles (MeaMed at K = 129: over 120 s instead of 13 s), so it is kept
    to networks of up to ``SELECT_COMPARATOR_MAX_VALUES`` values."""
    from jaxdfl.aggregators.order_stats import SELECT_COMPARATOR_MAX_VALUES
    from jaxdfl.aggregators.order_stats import sort_rows

    for k in (9, SELECT_COMPARATOR_MAX_VALUES, SELECT_COMPARATOR_MAX_VALUES + 1, 128):
        jaxpr = str(jax.make_jaxpr(sort_rows)([jnp.zeros(4)] * k))
        large = k > SELECT_COMPARATOR_MAX_VALUES
        assert jaxpr.count("= min ") == (len(A.sorting_network(k)) if large else 0), k
        assert jaxpr.count("= lt ") == (0 if large else len(A.sorting_network(k))), k


@pytest.mark.parametrize("k", range(1, 13))
def test_network_layers_sort_all_zero_one_inputs(k):
    """The layered form of the network (comparators grouped into layers of disjoint pairs, run in a loop) must sort
    as the comparator list does (0-1 principle, as above)."""
    from jaxdfl.aggregators.order_stats import _compare_exchange_by_layer, network_layers

    pairs = A.sorting_network(k)
    partner, role = network_layers(k, pairs)
    assert (role > 0).sum() == 2 * len(pairs)  # every comparator in exactly one layer
    v = np.array(list(itertools.product([0, 1], repeat=k)), np.int8).T
    out = np.stack(jax.jit(_compare_exchange_by_layer, static_argnums=1)([jnp.asarray(r) for r in v], pairs))
    np.testing.assert_array_equal(out, np.sort(v, axis=0))


@pytest.mark.parametrize("rule,h", [("median", {}), ("trimmed_mean", {"f": 2}), ("meamed", {"f": 1}),
                                    ("meamed", {"f": 3}), ("bulyan", {"f": 1})])
def test_order_statistics_by_layer_match_the_numpy_reference(rule, h, monkeypatch):
    """Networks above the fused bounds run layer by layer; with the bounds at 0 every network does, and each
    order-statistic rule must still give its reference (NaN padding, infinite values, random masks)."""
    from jaxdfl.aggregators import order_stats

    monkeypatch.setattr(order_stats, "FUSED_NETWORK_MAX_COMPARATORS", 0)
    monkeypatch.setattr(order_stats, "FUSED_SELECTION_MAX_COMPARATORS", 0)
    k = 11
    x, mask, w = make_batch(190, b=8, k=k, d=9, min_valid=5)
    x[0, 1, :3] = np.inf
    x[1, 0, :3] = -np.inf
    rule_fn = functools.partial(A.REGISTRY[rule], **h)
    jaxpr = str(jax.make_jaxpr(jax.vmap(rule_fn))(x, mask, w))
    assert "scan" in jaxpr and jaxpr.count("= min ") <= 2  # one layer body, not an unrolled network
    out = np.asarray(jax.jit(jax.vmap(rule_fn))(garbage(x, mask, np.nan), mask, w))
    expect = np.stack([R.REGISTRY[rule](x[i], mask[i], w[i], **h) for i in range(len(x))])
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    if rule in ("trimmed_mean", "meamed"):  # a traced f sorts by layer too
        traced = jax.jit(jax.vmap(lambda a, b, t: A.REGISTRY[rule](a, b, f=t), in_axes=(0, 0, None)))
        np.testing.assert_allclose(np.asarray(traced(garbage(x, mask, np.nan), mask, h["f"])), expect, rtol=1e-5,
                                   atol=1e-5)


def test_large_networks_run_by_layer_so_the_program_stays_small():
    """The median of 257 rows unrolled 3,717 comparators into one fused loop that XLA:CPU took over 9 minutes to
    compile; above the bounds a network runs as one loop over its layers. Below them it stays fused."""
    from jaxdfl.aggregators import order_stats

    def program(rule, k, **h):
        return str(jax.make_jaxpr(functools.partial(A.REGISTRY[rule], **h))(jnp.zeros((k, 3)), jnp.ones(k, bool)))

    assert len(order_stats.pruned_network(129, (64, 65))) <= order_stats.FUSED_SELECTION_MAX_COMPARATORS
    assert len(A.sorting_network(128)) <= order_stats.FUSED_NETWORK_MAX_COMPARATORS < len(A.sorting_network(129))
    for rule, k, by_layer in [("median", 129, False), ("median", 257, True), ("meamed", 128, False),
                              ("meamed", 129, True), ("trimmed_mean", 257, False)]:
        jaxpr = program(rule, k, **({} if rule == "median" else {"f": 1}))
        assert ("scan" in jaxpr) == by_layer, (rule, k)
        if by_layer:
            assert jaxpr.count("= min ") <= 2, (rule, k)  # the unrolled median of 257 rows has 3,717
    # MeaMed's window after a network run by layer is array operations: the program does not grow with f (the row
    # by row window took 2,783 jaxpr lines at f = 1 and 9,585 at f = 20, and 20 s more to compile at K = 129)
    assert len(program("meamed", 129, f=20).splitlines()) == len(program("meamed", 129, f=1).splitlines())
    # f = 1 at K = 257 partitions (511 comparators, fused); a partition past the bound would take K layers: sort.
    assert not order_stats._partition_is_cheaper(257, 4)


def xla_temporaries(rule, n, k, d, options, pre=(), chunk_size=0) -> int:
    """Bytes of temporaries in XLA's memory analysis of ``aggregate`` on an ``[n, k, d]`` float32 block, compiled
    with ``options`` (skips the test where the backend has no memory analysis)."""
    shapes = [jax.ShapeDtypeStruct(s, t) for s, t in (((n, k, d), jnp.float32), ((n, k), bool), ((n, k), jnp.float32))]
    call = jax.jit(lambda *a: A.aggregate(jax.random.key(0), *a, rule, pre=pre, chunk_size=chunk_size))
    analysis = call.lower(*shapes).compile(options).memory_analysis()
    if analysis is None:
        pytest.skip("memory_analysis unavailable on this backend")
    return analysis.temp_size_in_bytes


def test_order_statistics_by_layer_keep_the_temporaries_the_chunking_estimates(as_shipped):
    """The layer loop keeps the stacked rows in and out; the automatic chunking must plan for them (the fused
    networks keep almost nothing)."""
    n, k, d = 8, 257, 200
    assert A.temporaries("median", [], k, d) == 2.0 and A.temporaries("median", [], 129, d) == pytest.approx(1 / 12)
    assert xla_temporaries("median", n, k, d, as_shipped) <= 1.1 * A.temporaries("median", [], k, d) * n * k * d * 4


def test_pruned_network_keeps_what_reaches_the_outputs():
    from jaxdfl.aggregators.order_stats import compare_exchange, pruned_network

    for k in (9, 12):
        p = (k - 1) // 2
        kept = pruned_network(k, (p, p + 1))
        assert len(kept) < len(A.sorting_network(k))
        v = np.array(list(itertools.product([0, 1, 2], repeat=k)), np.int8).T
        out = compare_exchange([v[i] for i in range(k)], kept)
        ordered = np.sort(v, axis=0)
        np.testing.assert_array_equal(np.stack(out[p:p + 2]), ordered[p:p + 2])


@pytest.mark.parametrize("k,f", [(3, 1), (7, 1), (9, 2), (11, 3)])
def test_partition_network_puts_the_f_extremes_at_each_end(k, f):
    from jaxdfl.aggregators.order_stats import compare_exchange, partition_network

    v = np.array(list(itertools.product(range(3), repeat=k))).T  # every input of values 0, 1, 2
    out = np.stack(compare_exchange([v[i] for i in range(k)], partition_network(k, f)))
    ordered = np.sort(v, axis=0)
    np.testing.assert_array_equal(out[:f], ordered[:f])
    np.testing.assert_array_equal(out[k - f:], ordered[k - f:])
    np.testing.assert_array_equal(np.sort(out[f:k - f], axis=0), ordered[f:k - f])


# --------------------------------------------------------------------------- contract suite


@pytest.mark.parametrize("rule", RULES)
def test_matches_numpy_reference(rule):
    ref = R.REGISTRY[rule]
    h = hyper(rule)
    if rule == "geometric_median":
        h = {"nu": h["nu"]}
    for seed in range(3):
        x, mask, w = make_batch(seed)
        out = np.asarray(batched(rule)(x, mask, w))
        expect = np.stack([ref(x[i], mask[i], w[i], **h) for i in range(len(x))])
        if rule == "geometric_median":
            # float32 Weiszfeld stops where the objective stops improving in float32: compare objectives tightly,
            # positions loosely (the minimum is flat).
            for i in range(len(x)):
                v = x[i][mask[i]].astype(np.float64)
                obj = lambda z: np.linalg.norm(v - z, axis=1).sum()  # noqa: E731
                assert obj(out[i]) <= obj(expect[i]) * (1 + 1e-5)
            np.testing.assert_allclose(out, expect, rtol=0, atol=3e-3)
            continue
        np.testing.assert_allclose(out, expect, rtol=2e-4, atol=2e-4, err_msg=f"{rule} seed {seed}")


@pytest.mark.parametrize("rule,f", [("krum", 3), ("multi_krum", 3), ("bulyan", 2), ("nnm", 5)])
def test_large_neighbourhoods_match_the_numpy_reference(rule, f):
    """Above ``RANKS_MAX_K`` rows the nearest-row selections bisect instead of ranking all pairs, Bulyan ranks each
    row's neighbours once in a loop and updates the ranks per round, and NNM mixes in a loop over rows (regressions:
    at K = 129 Krum took 1.1 GB of temporaries and 1.6 s per call at D = 1,000, Bulyan 7.7 s per call, and NNM at
    K = 65 took two minutes to compile). Integer-valued data makes ties, which must go to the lower index."""
    from jaxdfl.aggregators._common import RANKS_MAX_K

    k = RANKS_MAX_K + 8
    x, mask, w = make_batch(170, b=3, k=k, d=5, min_valid=4 * f + 3)
    x = np.round(x * 2.0)
    x[1, 1:4] = x[1, 4:7]  # duplicated rows: tied distances
    if rule == "nnm":
        out = np.asarray(jit_pre("nnm", (("f", f),))(jax.random.split(jax.random.key(0), 3), x, mask, w)[0])
        for i in range(len(x)):
            np.testing.assert_allclose(out[i][mask[i]], R.nnm(x[i], mask[i], w[i], f=f), rtol=1e-5, atol=1e-5)
        return
    out = np.asarray(batched(rule, f=f)(x, mask, w))
    expect = np.stack([R.REGISTRY[rule](x[i], mask[i], w[i], f=f) for i in range(len(x))])
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", sorted(PAIRWISE))
def test_pair_sums_by_block_match_the_numpy_reference(rule, monkeypatch):
    """On CPUs the all-pairs sums run block by block once a node's rows exceed ``PAIR_BLOCK_MIN_BYTES``; with the
    bound at 0 they do at D = 700 (two blocks of 320 coordinates and a remainder of 60), and every pairwise rule must
    still give its reference (NaN padding, random masks)."""
    from jaxdfl.aggregators import _common

    monkeypatch.setattr(_common, "PAIR_BLOCK_MIN_BYTES", 0)
    x, mask, w = make_batch(200, b=4, k=9, d=700, min_valid=6)
    x = x + 3.0  # away from the origin, so that the centred Gram matrix differs from the plain one
    padded = garbage(x, mask, np.nan)
    if rule == "nnm":
        out = np.asarray(jit_pre("nnm", (("f", 2),))(jax.random.split(jax.random.key(0), 4), padded, mask, w)[0])
        for i in range(len(x)):
            np.testing.assert_allclose(out[i][mask[i]], R.nnm(x[i], mask[i], w[i], f=2), rtol=1e-5, atol=1e-5)
        return
    h = hyper(rule)
    out = np.asarray(jax.jit(jax.vmap(functools.partial(A.REGISTRY[rule], **h)))(padded, mask, w))
    if rule == "geometric_median":
        h = {"nu": h["nu"]}
    expect = np.stack([R.REGISTRY[rule](x[i], mask[i], w[i], **h) for i in range(len(x))])
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4 if rule != "geometric_median" else 3e-3)


def test_pair_sums_run_by_block_on_cpus_only_for_all_pairs_of_rows_over_l2():
    """The block loop is taken when a node's rows exceed ``PAIR_BLOCK_MIN_BYTES`` and there are more pairs than rows
    (the K - 1 distances to row 0 read each row once and stay in one pass); its sums equal the one pass'."""
    from jaxdfl.aggregators import _common

    k = 9
    d = -(-_common.PAIR_BLOCK_MIN_BYTES // (4 * k)) + 7  # just over the bound, with a remainder
    x = np.random.default_rng(3).normal(size=(k, d)).astype(np.float32)
    mask = np.ones(k, bool)

    def compiled(fn):
        return jax.jit(fn).lower(x, mask).compile().as_text()

    assert _common.pair_sums_blocked(k, d, k * (k - 1) // 2) and not _common.pair_sums_blocked(k, d - 8, 36)
    assert not _common.pair_sums_blocked(k, d, k - 1)
    block = f"f32[{k},{_common.PAIR_BLOCK}]"  # the loop's copy of a block of the rows
    assert (block in compiled(_common.sq_distances)) == (jax.default_backend() == "cpu")
    assert block not in compiled(_common.sq_dist_to_self)
    blocked = np.asarray(jax.jit(_common.sq_distances)(x, mask))
    one_pass = _common._pair_sums_fused(jnp.asarray(x), tuple(zip(*np.triu_indices(k, 1))), _common._sq_difference,
                                        centre=False)
    np.testing.assert_allclose(blocked[np.triu_indices(k, 1)], np.asarray(one_pass), rtol=1e-5)
    reference = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(blocked, reference, rtol=1e-5)


def test_pairwise_temporaries_grow_with_k_as_the_chunking_estimates(as_shipped):
    """Regression: the automatic chunking took every rule's temporaries as half a neighbourhood, but the pair-sum
    buffer of Krum and the iterative rules is (K - 1) / 40 of one (2.7x the block's size at K = 129, unchunked)."""
    n = k = 65
    d = 1_000
    measured = xla_temporaries("krum", n, k, d, as_shipped)
    estimate = A.temporaries("krum", [], k, d) * n * k * d * 4
    assert A.temporaries("krum", [], k, d) == pytest.approx(64 / 40)
    assert 0.5 * estimate <= measured <= 1.5 * estimate
    # a fused loop's 1 / T = 0.05, Krum's one pass (K - 1) / 40 at K = 9
    assert A.temporaries("median", [], k, d) == 0.05 and A.temporaries("krum", [], 9, d) == pytest.approx(0.2)
    # NNM's output: fused into the mean (its blocked pair sums keep a few [P, 16] rows), 2 copies read by norm
    # clipping; clipping's output 1, plus the two pair-sum buffers (K - 1) / 40 = 0.5
    assert A.temporaries("mean", ["nnm"], 17, 100_000) == 0.05
    assert A.temporaries("krum", ["nnm", "clip"], 21, d) == pytest.approx(3 + 2 * 0.5)


@pytest.mark.parametrize("extra", [0, 8])
def test_ranks_match_a_lexicographic_sort(extra):
    """All pairs at once up to ``RANKS_MAX_K`` entries, one entry per loop step above: the same ranks, with ties to
    the lower index, NaN as +inf and invalid entries after the valid ones."""
    from jaxdfl.aggregators import _common

    rng = np.random.default_rng(extra)
    k = _common.RANKS_MAX_K + extra
    v = rng.integers(0, 6, size=(3, k, k)).astype(np.float32)  # ties
    v[rng.uniform(size=v.shape) < 0.05] = np.inf
    v[rng.uniform(size=v.shape) < 0.05] = np.nan
    valid = rng.uniform(size=v.shape) < 0.8
    expect = np.empty(v.shape, np.int64)
    for row, ok, out in zip(v.reshape(-1, k), valid.reshape(-1, k), expect.reshape(-1, k)):
        out[:] = k + np.arange(k)
        order = [i for i in np.lexsort((np.arange(k), np.where(np.isnan(row), np.inf, row))) if ok[i]]
        out[order] = np.arange(len(order))
    np.testing.assert_array_equal(np.asarray(jax.jit(_common.ranks)(v, valid)), expect)


def test_smallest_selects_as_the_ranks_do_above_the_all_pairs_size():
    from jaxdfl.aggregators import _common

    rng = np.random.default_rng(171)
    k = _common.RANKS_MAX_K + 8
    for scale in (1.0, 1e-30, 1e30, 1e-39):  # 1e-39: denormals, which XLA:CPU compares as 0 (review)
        v = (rng.integers(0, 6, size=(k, k)) * scale).astype(np.float32)  # ties
        v[rng.uniform(size=(k, k)) < 0.05] = np.inf
        v[rng.uniform(size=(k, k)) < 0.05] = np.nan  # ranks as +inf
        valid = rng.uniform(size=(k, k)) < 0.8
        c = rng.integers(-2, k + 3, size=k)  # none, some, more than the valid entries
        expect = valid & (np.asarray(_common.ranks(v, valid)) < c[:, None])
        np.testing.assert_array_equal(np.asarray(jax.jit(_common.smallest)(v, valid, c)), expect)


@pytest.mark.parametrize("rule", RULES)
def test_vmap_equals_per_node_call(rule):
    x, mask, w = make_batch(10)
    fn = A.REGISTRY[rule]
    h = hyper(rule)
    out = np.asarray(batched(rule)(x, mask, w))
    one = jax.jit(lambda a, b, c: fn(a, b, c, **h))
    single = np.stack([np.asarray(one(x[i], mask[i], w[i])) for i in range(len(x))])
    np.testing.assert_allclose(out, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_invariant_to_permuting_neighbours(rule):
    x, mask, w = make_batch(20)
    perm = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(K - 1)])
    out = batched(rule)(x, mask, w)
    out_p = batched(rule)(x[:, perm], mask[:, perm], w[:, perm])
    tol = 2e-3 if rule == "geometric_median" else 1e-4  # float32 Weiszfeld stops at a slightly different point
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out), rtol=tol, atol=tol)


@pytest.mark.parametrize("rule", RULES)
def test_padding_contents_do_not_matter(rule):
    x, mask, w = make_batch(30)
    clean = batched(rule)(garbage(x, mask, 0.0), mask, w)
    assert np.isfinite(np.asarray(clean)).all()
    for fill in (np.inf, -np.inf, np.nan, 3e38):
        out = batched(rule)(garbage(x, mask, fill), mask, w)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(clean), err_msg=f"{rule} fill={fill}")


@pytest.mark.parametrize("rule", RULES)
def test_all_equal_inputs_return_that_input(rule):
    _, mask, w = make_batch(40)
    v = np.random.default_rng(1).normal(size=(len(mask), 1, D)).astype(np.float32)
    x = np.broadcast_to(v, (len(mask), K, D)).copy()
    out = batched(rule)(x, mask, w)
    np.testing.assert_allclose(np.asarray(out), v[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_dtype_is_input_dtype(rule, dtype):
    # Abstract evaluation traces the whole rule (so dtype errors surface) without compiling it.
    fn = functools.partial(A.REGISTRY[rule], **hyper(rule))
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct((K, D), dtype), jax.ShapeDtypeStruct((K,), bool),
                         jax.ShapeDtypeStruct((K,), jnp.float32))
    assert out.dtype == dtype and out.shape == (D,)


@pytest.mark.parametrize("rule", RULES)
def test_no_recompilation_on_new_values(rule):
    traces = []
    fn = A.REGISTRY[rule]
    numeric = {k: v for k, v in hyper(rule).items()}

    @jax.jit
    def run(x, m, w, h):
        traces.append(1)
        return jax.vmap(lambda a, b, c: fn(a, b, c, **h))(x, m, w)

    as_array = lambda h: {k: jnp.asarray(v) for k, v in h.items()}  # noqa: E731
    x, mask, w = make_batch(60)
    out1 = run(x, mask, w, as_array(numeric))
    # Traced hyper-parameters give the same result as Python ones.
    np.testing.assert_allclose(np.asarray(out1), np.asarray(batched(rule)(x, mask, w)), rtol=1e-5, atol=1e-5)
    x2, _, w2 = make_batch(61)
    numeric2 = {k: (v + 1 if isinstance(v, int) and not isinstance(v, bool) and k != "f" else v)
                for k, v in numeric.items()}
    numeric2 = {k: (v * 1.5 if isinstance(v, float) else v) for k, v in numeric2.items()}
    out2 = run(x2, mask, w2, as_array(numeric2))
    assert len(traces) == 1
    assert not np.allclose(np.asarray(out1), np.asarray(out2))


# --------------------------------------------------------------------------- rule-specific checks


def test_median_even_count_averages_the_middle_pair():
    x = jnp.array([[1.0], [4.0], [2.0], [10.0], [7.0]])
    mask = jnp.array([True, True, True, True, False])
    assert float(A.median(x, mask)[0]) == 3.0


def test_traced_f_equals_static_f():
    x, mask, w = make_batch(70, min_valid=7)
    for rule in ("trimmed_mean", "meamed", "krum", "multi_krum", "monna", "ios", "bulyan"):
        fn = A.REGISTRY[rule]
        static = batched(rule, f=2)(x, mask, w)
        traced = jax.jit(jax.vmap(lambda a, b, c, f: fn(a, b, c, f=f), in_axes=(0, 0, 0, None)))(x, mask, w, 2)
        np.testing.assert_allclose(np.asarray(traced), np.asarray(static), rtol=1e-6, atol=1e-6, err_msg=rule)


@pytest.mark.parametrize("f", [0, 1, 2, 3])
def test_meamed_and_trimmed_mean_against_reference_for_several_f(f):
    x, mask, w = make_batch(80, b=8, k=9, min_valid=2 * f + 1)
    for rule in ("meamed", "trimmed_mean"):
        out = batched(rule, f=f)(x, mask, w)
        expect = np.stack([R.REGISTRY[rule](x[i], mask[i], f=f) for i in range(len(x))])
        np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-5, atol=1e-5, err_msg=rule)


def test_meamed_keeps_the_lower_of_two_values_tied_around_the_median_as_its_reference_does():
    """Ties at equal distance from the median keep the lower value (the kernel's documented rule); the reference
    kept the lower row index instead, so tests on integer data (and Bulyan's, which calls it) would report false
    failures (rules audit)."""
    x = np.asarray([[[3.0], [0.0], [1.0], [2.0]]], np.float32)  # median 1.5: 1 and 2 tie, as do 0 and 3
    mask = np.ones((1, 4), bool)
    w = np.full((1, 4), 0.25, np.float32)
    assert float(batched("meamed", f=1)(x, mask, w)[0, 0]) == 1.0  # mean of 1, 2, 0
    assert R.meamed(x[0], mask[0], f=1)[0] == 1.0


@pytest.mark.parametrize("k,f", [(5, 1), (9, 0), (9, 1), (17, 1), (17, 2), (9, 3)])
def test_trimmed_mean_partition_and_sort_paths_agree_with_reference(k, f):
    """A static f with a cheap partition takes ``_trimmed_mean_by_partition`` (masked rows set to an anchor inside the
    window, bubble passes for the extremes); a traced f always sorts. Both must give the reference, also with
    infinite values in up to f rows and in more than f rows per coordinate."""
    from jaxdfl.aggregators import order_stats

    x, mask, w = make_batch(81 + k + f, b=12, k=k, d=40, min_valid=2 * f + 1)
    x = garbage(x, mask, np.nan)
    x[0, 1:1 + f, :20] = np.inf  # at most f outliers: trimmed
    x[1, :, :10] = np.where(mask[1][:, None], -np.inf, np.nan)[:, :1]  # every valid value -inf
    x[2, :, :10] *= 1e30  # large but finite spread
    x[3, np.flatnonzero(mask[3])[1:1 + f]] = 3e37  # f huge finite outliers: the anchor's subtraction must not lose
    static = np.asarray(batched("trimmed_mean", f=f)(x, mask, w))
    traced = np.asarray(jax.jit(jax.vmap(lambda a, b, c, t: A.trimmed_mean(a, b, c, f=t),
                                         in_axes=(0, 0, 0, None)))(x, mask, w, f))
    expect = np.stack([R.trimmed_mean(np.where(np.isnan(x[i]), 0.0, x[i]), mask[i], f=f) for i in range(len(x))])
    for out in (static, traced):
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    uses_partition = order_stats._partition_is_cheaper(k, f)
    assert uses_partition == ((k, f) not in ((5, 1), (9, 3)))
    jaxpr = str(jax.make_jaxpr(functools.partial(A.trimmed_mean, f=f))(x[0], mask[0]))
    sort_mins = len(A.sorting_network(k))
    assert (jaxpr.count("= lt ") < sort_mins) == uses_partition  # a comparator is one less-than (and a greater-than)


def test_unweighted_rules_ignore_the_weights_and_the_others_read_them():
    """``UNWEIGHTED_RULES`` backs the note that ``topology.weights`` has no effect: it must hold exactly."""
    x, mask, w = make_batch(91, min_valid=6)
    uniform = np.where(mask, 1.0, 0.0)
    uniform = (uniform / uniform.sum(1, keepdims=True)).astype(np.float32)
    for rule in RULES:
        same = np.array_equal(np.asarray(batched(rule)(x, mask, w)), np.asarray(batched(rule)(x, mask, uniform)))
        assert same == (rule in A.UNWEIGHTED_RULES), rule


def test_clipped_gossip_reads_f_only_when_adaptive_and_tau_only_when_not():
    x, mask, w = make_batch(92, min_valid=6)
    out = lambda **h: np.asarray(batched("clipped_gossip", **h)(x, mask, w))  # noqa: E731
    np.testing.assert_array_equal(out(adaptive=False, f=1), out(adaptive=False, f=3))
    np.testing.assert_array_equal(out(adaptive=True, f=1, tau=0.5), out(adaptive=True, f=1, tau=5.0))
    assert not np.array_equal(out(adaptive=True, f=1), out(adaptive=True, f=3))


def test_multi_krum_with_explicit_m():
    x, mask, w = make_batch(90, min_valid=6)
    out = batched("multi_krum", f=1, m=2)(x, mask, w)
    expect = np.stack([R.multi_krum(x[i], mask[i], f=1, m=2) for i in range(len(x))])
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-5, atol=1e-5)


def test_clipped_gossip_adaptive_against_reference():
    x, mask, w = make_batch(100)
    for f in (1, 2):
        out = batched("clipped_gossip", adaptive=True, f=f)(x, mask, w)
        expect = np.stack([R.clipped_gossip(x[i], mask[i], w[i], adaptive=True, f=f) for i in range(len(x))])
        np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-5, atol=1e-5)


def test_distances_stay_accurate_near_consensus():
    # Vectors with a large common offset and tiny differences: a raw x @ x.T Gram matrix would lose the distances.
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 50)) * 100.0
    x = (base + 1e-3 * rng.normal(size=(7, 50))).astype(np.float32)
    x[5] = base[0] + 0.5  # one clear outlier relative to the spread
    mask = np.ones(7, bool)
    w = np.full(7, 1 / 7, np.float32)
    for rule in ("krum", "monna"):
        out = np.asarray(batched(rule, f=1)(x[None], mask[None], w[None]))[0]
        np.testing.assert_allclose(out, R.REGISTRY[rule](x, mask, f=1), rtol=0, atol=1e-4, err_msg=rule)


# --------------------------------------------------------------------------- robustness


ROBUST = ["median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "clipped_gossip", "meamed", "monna",
          "ios", "centered_clip"]


def outlier_neighbourhood(seed, k=9, f=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, 20)).astype(np.float32)
    bad = 1 + rng.choice(k - 1, f, replace=False)
    x[bad] = 1e6
    honest = np.setdiff1d(np.arange(k), bad)
    w = np.full(k, 1.0 / k, np.float32)
    return x, np.ones(k, bool), w, honest


@pytest.mark.parametrize("rule", ROBUST)
def test_robust_rules_stay_near_the_honest_vectors(rule):
    h = {**A.DEFAULTS[rule], "f": 2} if "f" in A.DEFAULTS[rule] else dict(A.DEFAULTS[rule])
    data = [outlier_neighbourhood(seed) for seed in range(3)]
    outs = np.asarray(_jit_vmap(rule, tuple(sorted(h.items())))(*(np.stack([d[i] for d in data]) for i in range(3))))
    for (x, mask, w, honest), out in zip(data, outs):
        hx = x[honest]
        if rule in ("median", "trimmed_mean", "meamed"):
            # coordinate-wise rules stay in the honest bounding box
            assert (out >= hx.min(0) - 1e-5).all() and (out <= hx.max(0) + 1e-5).all()
        elif rule == "krum":
            assert np.min(np.abs(hx - out).max(1)) < 1e-6  # one of the honest vectors
        else:
            assert np.linalg.norm(out - hx.mean(0)) < 10.0, rule



def test_geometric_median_with_default_settings_converges_past_far_outliers():
    """Regression: the objective-based stop ended after one step when far rows dominated the objective, so the rule
    returned about the node's own vector (3.9 away from the geometric median on rows of unit spread)."""
    data = [outlier_neighbourhood(seed) for seed in range(3)]
    outs = np.asarray(_jit_vmap("geometric_median", ())(*(np.stack([d[i] for d in data]) for i in range(3))))
    for (x, mask, w, _), out in zip(data, outs):
        ref = R.geometric_median(x, mask, w, nu=0.1, iters=5000, tol=0.0)
        assert np.linalg.norm(out - ref) < 1e-4 * np.linalg.norm(ref - x[0])


@pytest.mark.parametrize("rule", ["geometric_median", "centered_clip", "ios"])
def test_coefficient_space_rules_stay_exact_next_to_very_far_rows(rule):
    """Regression: the centred Gram came from squared distances by polarisation, which lost the cross terms of a
    far row: at outliers 1e8 away from rows of unit spread the geometric median was off by 2.5% of the spread and
    centred clipping by 7%. The Gram is now summed directly from the centred rows."""
    data = [outlier_neighbourhood(seed) for seed in range(3)]
    for x, *_ in data:
        x[np.abs(x) > 1e5] = 1e8
    h = {"nu": 0.1, "iters": 400, "tol": 0.0} if rule == "geometric_median" else {"f": 2} if rule == "ios" else {}
    outs = np.asarray(_jit_vmap(rule, tuple(sorted(h.items())))(*(np.stack([d[i] for d in data]) for i in range(3))))
    for (x, mask, w, honest), out in zip(data, outs):
        ref = R.REGISTRY[rule](x, mask, w, **h)
        assert np.linalg.norm(out - ref) < 1e-4 * np.linalg.norm(x[honest] - x[honest].mean(0), axis=1).mean()


@pytest.mark.filterwarnings("ignore:invalid value")
def test_bulyan_selects_theta_distinct_rows_when_the_last_scores_are_infinite():
    """Regression: with an inf row the last Krum steps scored every remaining row +inf, argmin returned an already
    selected row, and the second stage averaged beta - 1 values. The oracle picks among the remaining rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7, 5)).astype(np.float32)
    x[:, 3] = np.inf
    mask = np.ones((5, 7), bool)
    outs = np.asarray(batched("bulyan", f=1)(x, mask, np.full((5, 7), 1 / 7, np.float32)))
    for xi, out in zip(x, outs):
        np.testing.assert_allclose(out, R.bulyan(xi, mask[0], f=1), rtol=1e-5, atol=1e-6)

def test_bulyan_stays_in_the_honest_bounding_box():
    data = [outlier_neighbourhood(seed, k=11, f=2) for seed in range(3)]
    outs = np.asarray(batched("bulyan", f=2)(*(np.stack([d[i] for d in data]) for i in range(3))))
    for (x, _, _, honest), out in zip(data, outs):
        assert (out >= x[honest].min(0) - 1e-5).all() and (out <= x[honest].max(0) + 1e-5).all()


def _non_finite_neighbourhood(bad_values, k=9):
    """Two attacker rows (ids from ``outlier_neighbourhood``) holding non-finite values, the second only in every
    other coordinate."""
    x, mask, w, honest = outlier_neighbourhood(4, k=k, f=2)
    bad = np.setdiff1d(np.arange(k), honest)
    x[bad[0]], x[bad[1]] = bad_values
    x[bad[1], ::2] = 1.0
    return x, mask, w, honest


NON_FINITE = [(np.nan, np.nan), (np.inf, -np.inf), (np.nan, np.inf)]


@pytest.mark.parametrize("rule", ROBUST + ["bulyan"])
@pytest.mark.parametrize("bad_values", NON_FINITE)
def test_robust_rules_tolerate_non_finite_rows(rule, bad_values):
    """A NaN row went through the min/max networks and the distances: every robust rule returned NaN (and the
    Gram-based ones also for an inf row). Non-finite rows now count as outliers, within the breakdown point."""
    x, mask, w, honest = _non_finite_neighbourhood(bad_values, k=11 if rule == "bulyan" else 9)
    h = {"f": 2} if "f" in A.DEFAULTS[rule] else {}
    out = np.asarray(batched(rule, **h)(x[None], mask[None], w[None]))[0]
    hx = x[honest]
    assert np.isfinite(out).all(), rule
    if rule in ("median", "trimmed_mean", "meamed", "bulyan"):
        assert (out >= hx.min(0) - 1e-5).all() and (out <= hx.max(0) + 1e-5).all(), rule
    elif rule == "krum":
        assert np.min(np.abs(hx - out).max(1)) < 1e-6
    else:
        assert np.linalg.norm(out - hx.mean(0)) < 10.0, rule


@pytest.mark.parametrize("pre", [(("nnm", {"f": 2}),), (("bucketing", {"s": 2}),), (("clip", {"tau": 5.0}),)])
@pytest.mark.parametrize("bad_values", NON_FINITE)
def test_pre_aggregators_keep_non_finite_rows_containable(pre, bad_values):
    x, mask, w, honest = _non_finite_neighbourhood(bad_values)
    call = jax.jit(lambda *a: A.aggregate(jax.random.key(0), *a, "median", pre=pre))  # eager: op by op, slow
    out = np.asarray(call(x[None], mask[None], w[None]))[0]
    assert np.isfinite(out).all() and np.abs(out).max() < 10.0


def test_mean_is_not_robust():
    x, mask, w, honest = outlier_neighbourhood(0)
    out = np.asarray(batched("mean")(x[None], mask[None], w[None]))[0]
    assert np.linalg.norm(out - x[honest].mean(0)) > 1e4


def test_clipped_gossip_moves_at_most_tau_per_neighbour_weight():
    x, mask, w, _ = outlier_neighbourhood(1)
    out = np.asarray(batched("clipped_gossip", tau=0.7)(x[None], mask[None], w[None]))[0]
    assert np.linalg.norm(out - x[0]) <= 0.7 * w[1:].sum() + 1e-4


# --------------------------------------------------------------------------- pre-aggregators


def test_nnm_against_reference():
    x, mask, w = make_batch(110)
    keys = jax.random.split(jax.random.key(0), len(x))
    out, m2, w2 = jit_pre("nnm", (("f", 2),))(keys, x, mask, w)
    for i in range(len(x)):
        np.testing.assert_allclose(np.asarray(out[i])[mask[i]], R.nnm(x[i], mask[i], w[i], f=2), rtol=1e-5,
                                   atol=1e-5)
    assert (np.asarray(m2) == mask).all() and np.allclose(np.asarray(w2), w)


@pytest.mark.parametrize("self_centered", [False, True])
def test_clip_against_reference(self_centered):
    x, mask, w = make_batch(120)
    x = x * 2.0
    keys = jax.random.split(jax.random.key(0), len(x))
    out, _, _ = jit_pre("clip", (("self_centered", self_centered), ("tau", 1.2)))(keys, x, mask, w)
    for i in range(len(x)):
        expect = R.clip(x[i], mask[i], w[i], tau=1.2, self_centered=self_centered)
        np.testing.assert_allclose(np.asarray(out[i])[mask[i]], expect, rtol=1e-5, atol=1e-5)



def test_bucketing_keeps_the_weighted_sum_so_gossip_after_it_is_gossip():
    """Regression: a bucket was the plain mean of its members but carried their summed weight, so ``mean`` after
    bucketing was not gossip when the mixing weights differ (Metropolis weights on an irregular graph)."""
    x, mask, w = make_batch(130)
    rng = np.random.default_rng(1)
    w = np.where(mask, rng.uniform(0.05, 1.0, mask.shape), 0.0).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    keys = jax.random.split(jax.random.key(0), len(x))
    out, m2, w2 = jit_pre("bucketing", (("s", 2),))(keys, x, mask, w)
    gossip = np.asarray(batched("mean")(out, m2, w2))
    np.testing.assert_allclose(gossip, np.einsum("bk,bkd->bd", w, x), rtol=1e-5, atol=1e-5)


def test_bucketing_takes_a_numpy_integer_bucket_size():
    x, mask, w = make_batch(131, b=1)
    bucketing = jax.jit(A.PRE_REGISTRY["bucketing"], static_argnames="s")  # jit_pre's cache would equate 2 and int64
    a = bucketing(jax.random.key(0), x[0], mask[0], w[0], s=np.int64(2))
    b = bucketing(jax.random.key(0), x[0], mask[0], w[0], s=2)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))

@pytest.mark.parametrize("s", [1, 2, 3])
def test_bucketing_partitions_the_neighbours(s):
    k = 8
    mask = np.array([True, True, False, True, True, True, False, True])
    x = np.eye(k, dtype=np.float32)  # row j = e_j, so a bucket mean reveals its members
    w = np.where(mask, 1.0 / mask.sum(), 0.0).astype(np.float32)
    seen = set()
    keys = jax.random.split(jax.random.key(s), 4)
    outs = jit_pre("bucketing", (("s", s),))(keys, *(np.broadcast_to(a, (4, *a.shape)) for a in (x, mask, w)))
    for out, m2, w2 in zip(*(np.asarray(o) for o in outs)):
        assert out.shape == (1 + -(-(k - 1) // s), k)
        np.testing.assert_array_equal(out[0], x[0])
        members = [tuple(np.flatnonzero(row > 0)) for row in out[1:][m2[1:]]]
        flat = sorted(j for mb in members for j in mb)
        assert flat == sorted(np.flatnonzero(mask[1:]) + 1)  # every valid neighbour exactly once
        sizes = sorted(len(mb) for mb in members)
        assert all(sz == s for sz in sizes[1:]) and sizes[0] <= s
        for mb, row, wt in zip(members, out[1:][m2[1:]], w2[1:][m2[1:]]):
            np.testing.assert_allclose(row[list(mb)], 1.0 / len(mb), rtol=1e-6)
            np.testing.assert_allclose(wt, w[list(mb)].sum(), rtol=1e-6)
        seen.add(tuple(members))
    if s < 5:
        assert len(seen) > 1  # the shuffle depends on the key


def test_pre_aggregators_compose_with_any_rule_under_aggregate():
    x, mask, w = make_batch(130)
    run = jax.jit(A.aggregate, static_argnames=("rule", "pre"))
    chained = run(jax.random.key(0), x, mask, w, "trimmed_mean", {"f": 1},
                  pre=(("clip", (("tau", 2.0),)), ("bucketing", ()), ("nnm", (("f", 1),))))
    assert chained.shape == (len(x), D) and np.isfinite(np.asarray(chained)).all()
    # Same as applying the steps by hand.
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(jax.random.split(jax.random.key(0), len(x)))
    y = (x, mask, w)
    for j, (name, items) in enumerate((("clip", (("tau", 2.0),)), ("bucketing", (("s", 2),)), ("nnm", (("f", 1),)))):
        y = jit_pre(name, items)(keys[:, j], *y)
    expect = batched("trimmed_mean", f=1)(*y)
    np.testing.assert_allclose(np.asarray(chained), np.asarray(expect), rtol=1e-6, atol=1e-6)


def test_nnm_leaves_honest_rows_honest():
    # NNM mixes each honest row only with honest rows when the outliers are far; the outlier rows stay far, so
    # NNM must be followed by a robust rule (here the median) to be robust.
    x, mask, w, honest = outlier_neighbourhood(2, f=2)
    mixed, _, _ = jit_pre("nnm", (("f", 2),))(jax.random.split(jax.random.key(0), 1), x[None], mask[None], w[None])
    np.testing.assert_allclose(np.asarray(mixed)[0, honest], np.broadcast_to(x[honest].mean(0), (7, 20)), atol=1e-5)
    run = jax.jit(A.aggregate, static_argnames=("rule", "pre"))
    out = run(jax.random.key(0), x[None], mask[None], w[None], "median", pre=(("nnm", (("f", 2),)),))
    np.testing.assert_allclose(np.asarray(out)[0], x[honest].mean(0), atol=1e-5)


# --------------------------------------------------------------------------- whole network


def test_aggregate_chunked_equals_unchunked():
    x, mask, w = make_batch(140, b=7)
    run = jax.jit(A.aggregate, static_argnames=("rule", "chunk_size", "memory_budget"))
    full = run(jax.random.key(1), x, mask, w, "multi_krum")
    out = run(jax.random.key(1), x, mask, w, "multi_krum", chunk_size=3)  # 3 + 3 + a remainder of 1
    np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=1e-6)
    auto = run(jax.random.key(1), x, mask, w, "multi_krum", memory_budget=x[0].nbytes)  # chunks of 2
    np.testing.assert_allclose(np.asarray(auto), np.asarray(full), rtol=1e-6)
    # a random pre-aggregator draws from the same per-node keys in chunks (the last chunk overlaps: 7 = 4 + 3)
    def bucket(chunk_size):
        pre = (("bucketing", {"s": 2}),)
        return np.asarray(jax.jit(lambda *a: A.aggregate(jax.random.key(2), *a, "median", pre=pre,
                                                         chunk_size=chunk_size))(x, mask, w))

    np.testing.assert_array_equal(bucket(4), bucket(None))


@pytest.mark.parametrize("rule, pre, k, d", [
    ("krum", ("nnm",), 9, 15_000),  # rows of 540 KB: the pair sums run block by block
    ("krum", ("bucketing",), 9, 15_000),
    ("median", ("nnm",), 9, 15_000),
    ("median", ("bucketing",), 17, 1_000),
    ("multi_krum", ("nnm", "clip"), 9, 15_000),
    ("multi_krum", ("nnm",), 9, 20_000),
    ("monna", ("nnm",), 9, 1_000),
    ("krum", ("nnm",), 17, 1_000),
    ("krum", ("nnm",), 65, 4_000),  # NNM's mix in a loop; two pair-sum buffers
    ("median", ("bucketing",), 33, 4_000),  # bucketing's output: 17 of 33 rows
])
def test_the_chunking_estimate_bounds_a_pre_aggregator_then_a_rule(rule, pre, k, d, as_shipped):
    """The estimate is an upper bound on XLA's temporaries after pre-aggregators, and not a loose one.

    Regressions: NNM then multi-Krum kept 3.0 neighbourhoods per node where 2.05 were planned, NNM then MoNNA 2.0
    where 1.2 were (the copies XLA keeps of an unrolled mix's output); NNM or bucketing then the median keeps none,
    where one [K, D] per pre-aggregator was planned, so that the nodes were chunked needlessly (2x slower at
    N = 300, K = 9, D = 1e5)."""
    n = 8
    measured = xla_temporaries(rule, n, k, d, as_shipped, pre) / (n * k * d * 4)
    estimate = A.temporaries(rule, list(pre), k, d)
    assert measured <= 1.05 * estimate
    assert estimate <= 2 * measured + 0.1


@pytest.mark.parametrize("rule, pre, n, k, d, c", [
    ("krum", (), 16, 9, 15_000, 4),  # block by block: a loop over D
    ("median", (), 8, 257, 200, 2),  # the layered network: a loop over layers
    ("mean", ("nnm",), 16, 9, 2_000, 4),
    ("median", ("bucketing",), 16, 65, 1_000, 4),
])
def test_chunked_aggregate_keeps_one_chunk_alive(rule, pre, n, k, d, c, as_shipped):
    """Regression: up to 16 chunks were static slices of the block, which XLA copied in full for every rule with a
    loop (all the copies alive together: Krum here kept a whole block of temporaries in 4 chunks, where unchunked it
    keeps none), and the lax.map path copied the whole block once more. Chunks now run in a loop, one [c, K, D]
    copy at a time, as auto_chunk plans: temporaries + the chunk's rows."""
    plan = (A.temporaries(rule, list(pre), k, d) + 1) * c * k * d * 4
    assert xla_temporaries(rule, n, k, d, as_shipped, pre, chunk_size=c) <= 1.1 * plan


def test_auto_chunk():
    assert A.auto_chunk(100, 9, 100_000) is None  # the benchmark size runs unchunked
    # the largest chunk that fits with its copy is 100 nodes: 3 chunks of 100, not 145 + 145 + 135 recomputed
    assert A.auto_chunk(300, 9, 100_000, budget=int(145 * 2.05 * 9 * 100_000 * 4), temporaries=1.05) == 100
    c = A.auto_chunk(10_000, 9, 100_000, temporaries=2)
    assert c is not None and 1 <= c < 10_000 and c * 2 * 9 * 100_000 * 4 <= A.MEMORY_BUDGET_BYTES


def test_aggregate_under_jit_with_traced_hyper():
    x, mask, w = make_batch(150)
    run = jax.jit(A.aggregate, static_argnames=("rule", "pre", "chunk_size"))
    out = run(jax.random.key(0), x, mask, w, "centered_clip", {"tau": jnp.float32(0.5), "iters": 2})
    expect = A.aggregate(jax.random.key(0), x, mask, w, "centered_clip", {"tau": 0.5, "iters": 2})
    np.testing.assert_allclose(np.asarray(out), np.asarray(expect), rtol=1e-6)


def test_bucketing_uses_distinct_node_keys():
    # Two nodes with identical neighbourhoods: their shuffles (hence the median of the bucket means) differ.
    x = np.tile(np.random.default_rng(4).normal(size=(1, 7, D)).astype(np.float32), (2, 1, 1))
    mask = np.ones((2, 7), bool)
    w = np.full((2, 7), 1 / 7, np.float32)
    differ = []
    run = jax.jit(A.aggregate, static_argnames=("rule", "pre"))
    for seed in range(4):
        out = np.asarray(run(jax.random.key(seed), x, mask, w, "median", pre=(("bucketing", (("s", 2),)),)))
        differ.append(not np.allclose(out[0], out[1]))
    assert any(differ)


# --------------------------------------------------------------------------- validate


def test_validate_accepts_defaults():
    sizes = np.array([7, 9])
    for rule in RULES:
        A.validate(rule, {}, sizes)
    A.validate("trimmed_mean", {"f": 2}, sizes, pre=(("nnm", {"f": 1}), ("clip", {"tau": 1.0})))


@pytest.mark.parametrize("args, match", [
    (("nope", {}, [5]), "aggregation.rule"),
    (("krum", {"tau": 1.0}, [5]), "aggregation.tau"),
    (("trimmed_mean", {"f": 2}, [4, 9]), "aggregation.f"),
    (("median", {}, [5], (("bogus", {}),)), "aggregation.pre"),
    (("krum", {"f": 1}, [3, 9]), "aggregation.f"),
    (("bulyan", {"f": 1}, [6, 9]), "aggregation.f"),
    (("multi_krum", {"m": 9}, [5, 9]), "aggregation.m"),
    (("centered_clip", {"tau": -1.0}, [5]), "aggregation.tau"),
    (("geometric_median", {"nu": 0.0}, [5]), "aggregation.nu"),
    (("geometric_median", {"nu": float("inf")}, [5]), "aggregation.nu"),  # returned NaN
    (("geometric_median", {"tol": float("nan")}, [5]), "aggregation.tol"),
    (("clipped_gossip", {"tau": float("nan")}, [5]), "aggregation.tau"),  # silently became the plain mean
    (("meamed", {"f": 1.5}, [5]), "aggregation.f"),
    (("ios", {"f": 2}, [3]), "aggregation.f"),
    (("clipped_gossip", {"adaptive": True, "f": 1}, [2]), "aggregation.f"),
    (("clipped_gossip", {"adaptive": "yes"}, [5]), "aggregation.adaptive"),
    (("median", {}, [5], (("clip", {"tau": -2.0}),)), "aggregation.clip.tau"),
    (("median", {}, [5], (("bucketing", {"s": 0}),)), "aggregation.bucketing.s"),
    (("median", {}, [5], (("nnm", {"f": 3}),)), "aggregation.nnm.f"),
    # bucketing shrinks 7 rows to 1 + 3 = 4, too few for trimming 2 per side
    (("trimmed_mean", {"f": 2}, [7], (("bucketing", {"s": 2}),)), "aggregation.f"),
])
def test_validate_rejects(args, match):
    with pytest.raises(ConfigError, match=match) as err:
        A.validate(*args)
    assert "\n" not in str(err.value)


def test_aggregate_rejects_unknown_hyper_keys():
    x, mask, w = make_batch(160, b=2)
    with pytest.raises(ConfigError, match="aggregation.tau"):
        A.aggregate(jax.random.key(0), x, mask, w, "median", {"tau": 1.0})


@pytest.mark.parametrize("change,match", [
    # regressions: a mask of another width or an int mask changed the row count (median 2.5 instead of 2)
    ({"mask": jnp.ones((1, 6), bool)}, r"mask must be bool \[N, K\]"),
    ({"mask": 2 * jnp.ones((1, 5), jnp.int32)}, "mask must be bool"),
    ({"block": jnp.zeros((5, 1))}, r"block must be \[N, K, D\]"),
    ({"weights": jnp.ones((1, 4))}, r"weights must be \[N, K\]"),
    ({"chunk_size": -1}, "chunk_size must be None or an integer >= 0"),
    ({"chunk_size": 2.0}, "chunk_size must be None or an integer >= 0"),
    # Python hyper-parameters out of range returned numbers (the config path refused them)
    ({"rule": "trimmed_mean", "hyper": {"f": -1}}, "aggregation.f must be >= 0"),
    ({"rule": "trimmed_mean", "hyper": {"f": "1"}}, "aggregation.f must be an integer"),
    ({"rule": "geometric_median", "hyper": {"nu": -1.0}}, "aggregation.nu must be > 0"),
    ({"pre": {"nnm": {"f": -1}}}, "aggregation.nnm.f must be >= 0"),
    # a string was read letter by letter ("unknown pre-aggregator 'n'")
    ({"pre": "nnm"}, r"aggregation.pre must be a list"),
    ({"pre": [("nnm",)]}, "each entry must be a name or a"),
    # a budget below 1 byte chunked node by node; a string failed in a comparison
    ({"memory_budget": 0}, "memory_budget must be a positive integer number of bytes"),
    ({"memory_budget": "1GB"}, "memory_budget must be a positive integer number of bytes"),
    # an f that not even K = 5 rows tolerate gave every node its own vector back, silently
    ({"rule": "trimmed_mean", "hyper": {"f": 3}}, r"aggregation.f=3 is too large for 'trimmed_mean': the block's "
                                                  r"neighbourhoods have at most n=5 rows .* f <= 2"),
    ({"rule": "multi_krum", "hyper": {"m": 6}}, r"aggregation.m=6 is too large: .* at most n=5 rows"),
    ({"rule": "trimmed_mean", "pre": [("bucketing", {"s": 4})]}, r"at most n=2 rows .* f <= 0"),  # 5 rows -> 2
    ({"pre": {"nnm": {"f": 3}}, "rule": "median"}, r"aggregation.nnm.f=3 is too large for 'nnm'"),
])
def test_aggregate_checks_its_arguments(change, match):
    args = {"block": jnp.array([[[0.0], [1.0], [2.0], [3.0], [100.0]]]), "mask": jnp.ones((1, 5), bool),
            "weights": jnp.full((1, 5), 0.2), "rule": "median", "hyper": None, "pre": (), "chunk_size": None,
            "memory_budget": A.MEMORY_BUDGET_BYTES}
    args.update(change)
    with pytest.raises(ConfigError, match=match):
        A.aggregate(jax.random.key(0), **args)


def test_aggregate_takes_pre_aggregators_as_a_mapping_and_weights_none_as_uniform():
    """Regression: ``pre={"nnm": {"f": 2}}`` ran NNM with f = 1 (the dict's keys were read as names)."""
    x, mask, w = make_batch(161, b=3, k=7)
    key = jax.random.key(0)

    def run(weights, pre=(), chunk=None):  # jitted: eagerly the unrolled rules dispatch op by op
        return jax.jit(lambda x, m, w: A.aggregate(key, x, m, w, "mean", pre=pre, chunk_size=chunk))(x, mask, weights)

    as_pairs = run(w, [("nnm", {"f": 2})])
    np.testing.assert_array_equal(run(w, {"nnm": {"f": 2}}), as_pairs)
    assert not np.array_equal(run(w, ["nnm"]), as_pairs)
    uniform = mask / mask.sum(axis=1, keepdims=True)
    for chunk in (None, 1):  # None weights crashed in chunks
        np.testing.assert_allclose(run(None, chunk=chunk), run(uniform), rtol=1e-6)


PIPELINES = [(rule, h, ()) for rule in RULES for h in ({}, {"f": 2}) if "f" in A.DEFAULTS[rule] or not h] + [
    ("clipped_gossip", {"adaptive": True, "f": 2}, ()),
    ("multi_krum", {"f": 1, "m": 5}, ()),  # m rows to average: 4 rows once passed the run-time check
    ("trimmed_mean", {"f": 2}, (("bucketing", {"s": 2}),)),
    ("krum", {"f": 1}, (("nnm", {"f": 2}), ("bucketing", {"s": 3}))),
]


@pytest.mark.parametrize("rule, hyper, pre", PIPELINES)
def test_enough_rows_is_what_validate_accepts(rule, hyper, pre):
    """The run-time fallback and the host-side check agree on every neighbourhood size, bucketing included."""
    for n in range(1, 12):
        try:
            A.validate(rule, hyper, [n], pre)
            accepted = True
        except ConfigError:
            accepted = False
        assert bool(A.enough_rows(np.int32(n), rule, hyper, pre)) == accepted, n


def test_aggregate_falls_back_after_bucketing_shrinks_the_rows():
    """7 rows bucketed in pairs leave 4, too few for trimming 2 per side: trimmed_mean returned exactly 0 there."""
    x = jnp.asarray(np.random.default_rng(0).normal(10.0, 1.0, size=(2, 9, 5)), jnp.float32)
    mask = jnp.asarray([[True] * 7 + [False] * 2, [True] * 9])  # 4 buckets, then 5 buckets
    out = jax.jit(lambda *a: A.aggregate(jax.random.key(0), *a, "trimmed_mean", {"f": 2},
                                         pre=(("bucketing", {"s": 2}),)))(x, mask, jnp.full((2, 9), 1 / 9))
    np.testing.assert_array_equal(out[0], x[0, 0])
    assert np.all(np.abs(np.asarray(out[1]) - 10.0) < 3.0) and not np.allclose(out[1], x[1, 0])


@pytest.mark.parametrize("rule, sizes", [("krum", [2, 5]), ("bulyan", [2, 9]), ("ios", [1, 4])])
def test_a_rule_no_f_fits_is_refused_without_a_negative_bound(rule, sizes):
    """A star's leaves (2 rows) cannot run Krum at any f: the error said "i.e. f <= -1"."""
    with pytest.raises(ConfigError, match=r"no f meets: the smallest neighbourhood has n=[12] rows") as info:
        A.validate(rule, {"f": 0}, sizes)
    assert "-1" not in str(info.value) and "\n" not in str(info.value)


X64_CHECK = """
import json, sys
import jax, numpy as np
from jaxdfl import aggregators as A
from jaxdfl.aggregators import reference as R
from jaxdfl.aggregators.network import PAIRWISE
assert jax.config.jax_enable_x64
rng = np.random.default_rng(0)
hyper = json.loads(sys.argv[1])
worst = {}
for rule in sorted(A.REGISTRY):
    h = {**A.DEFAULTS[rule], **hyper.get(rule, {})}
    fn = jax.jit(jax.vmap(lambda x, m, w: A.REGISTRY[rule](x, m, w, **h)))
    x = rng.normal(size=(6, 7, 5)) * 0.1 + 0.2
    mask = np.ones((6, 7), bool)
    mask[:, 5:] = rng.random((6, 2)) > 0.5
    w = rng.random((6, 7))
    w /= w.sum(axis=1, keepdims=True)
    out = fn(x, mask, w)
    assert out.dtype == np.float64, (rule, out.dtype)
    ref_h = {"nu": h["nu"]} if rule == "geometric_median" else h
    expect = np.stack([R.REGISTRY[rule](x[i], mask[i], w[i], **ref_h) for i in range(6)])
    worst[rule] = float(np.max(np.abs(np.asarray(out) - expect)))
print(json.dumps(worst))
"""


def test_float64_inputs_are_aggregated_in_float64():
    """Regression (rules audit): under x64, centered_clip crashed (float32 loop state, float64 body) and mean,
    multi-Krum, MoNNA, IOS and NNM rounded their coefficients to float32 (0.2000000060 for the mean of .1, .2, .3)."""
    import json
    import os
    import subprocess
    import sys

    hyper_ = {**HYPER, "geometric_median": {"iters": 2000, "tol": 0.0, "nu": 1e-6}}
    proc = subprocess.run([sys.executable, "-c", X64_CHECK, json.dumps(hyper_)], capture_output=True, text=True,
                          env=dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(worst) == set(RULES)
    for rule, err in worst.items():
        assert err < (1e-6 if rule == "geometric_median" else 1e-12), (rule, err)


@pytest.mark.parametrize("rule", ["mean", "ios", "clipped_gossip"])
def test_rows_left_with_zero_mixing_weight_average_uniformly(rule):
    """Regression (rules audit): when every row a weighted rule keeps has mixing weight 0 (a weight matrix with zero
    entries on live links, or IOS removing the positive-weight neighbours on ties), the weighted mean was 0 / 0."""
    x = np.asarray([[1.0], [3.0], [5.0], [9.0]], np.float32)
    mask = np.asarray([True, False, True, True])
    w = np.asarray([0.0, 1.0, 0.0, 0.0], np.float32)  # the only positive weight sits on a row that did not arrive
    rule_fn = jax.jit(functools.partial(A.REGISTRY[rule], **A.DEFAULTS[rule]))
    out = np.asarray(rule_fn(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(w)))
    assert np.isfinite(out).all()
    if rule == "mean":
        assert out[0] == pytest.approx(5.0)  # the plain mean of the rows that arrived
    if rule == "ios":  # the audit's case: ties let IOS remove both positive-weight neighbours
        ios = jax.jit(functools.partial(A.ios, f=2))(jnp.ones((4, 1)), jnp.ones(4, bool),
                                                     jnp.asarray([0.0, 0.5, 0.5, 0.0]))
        assert np.asarray(ios)[0] == pytest.approx(1.0)

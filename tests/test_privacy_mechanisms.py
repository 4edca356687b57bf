"""Tests for the jitted DP kernels in jaxdfl.privacy.mechanisms.

Statistical tests use fixed seeds, but each threshold is chosen so that the
test would fail with the stated probability (false-alarm rate) under a
different seed if the implementation were correct; 5 sigma two-sided is
5.7e-7 per check.
"""

import functools

import numpy as np
import pytest
from scipy import stats

import jax
import jax.numpy as jnp

from jaxdfl.privacy import clip_l1
from jaxdfl.privacy import clip_l2
from jaxdfl.privacy import dp_sum
from jaxdfl.privacy import poisson_batch
from jaxdfl.privacy import privatize_update

FIVE_SIGMA = 5.0  # two-sided false alarm 5.7e-7 per check

# Jitted once per module (traced hyper-parameters), to keep compile time low.
_CLIP_ROWS = {f: jax.jit(jax.vmap(f, in_axes=(0, None))) for f in (clip_l2, clip_l1)}
_DP_SUM = jax.jit(dp_sum)
_PRIVATIZE = jax.jit(privatize_update, static_argnums=4)


def _np_clip(v, c, ord_):
    """NumPy reference: v * min(1, C / ||v||) in float64."""
    v = v.astype(np.float64)
    n = np.linalg.norm(v, ord=ord_, axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(n > c, c / n, 1.0)
    return v * f


def _rows(rng, b, d, scales=(1e-3, 0.1, 1.0, 10.0, 1e4)):
    s = rng.choice(scales, size=(b, 1))
    return (rng.standard_normal((b, d)) * s).astype(np.float32)


# ----------------------------------------------------------------- clipping


@pytest.mark.parametrize("fn,ord_", [(clip_l2, 2), (clip_l1, 1)])
def test_clip_matches_numpy_reference(fn, ord_):
    rng = np.random.default_rng(0)
    v = _rows(rng, 64, 37)
    for c in (0.05, 1.0, 30.0):
        out = np.asarray(_CLIP_ROWS[fn](jnp.asarray(v), c))
        np.testing.assert_allclose(out, _np_clip(v, c, ord_), rtol=2e-6, atol=1e-30)
        assert out.dtype == np.float32


@pytest.mark.parametrize("fn,ord_", [(clip_l2, 2), (clip_l1, 1)])
def test_clipped_norm_never_exceeds_clip(fn, ord_):
    rng = np.random.default_rng(1)
    worst = 0.0
    scales = np.repeat([1e-20, 1e-3, 1.0, 1e3, 1e15, 1e30, 3e38], 16)[:, None]
    for d in (1, 7, 1000, 20000):
        v = rng.standard_normal((scales.size, d)) * scales * rng.random((scales.size, 1))
        v = jnp.asarray(np.clip(v, -3.4e38, 3.4e38).astype(np.float32))
        for c in (1e-3, 0.7, 10.0):
            out = np.asarray(_CLIP_ROWS[fn](v, c), np.float64)
            worst = max(worst, float((np.linalg.norm(out, ord=ord_, axis=1) / c).max()))
    assert worst <= 1.0 + 1e-6


@pytest.mark.parametrize("fn", [clip_l2, clip_l1])
def test_clip_inf_is_exact_identity_and_nonfinite_is_zeroed(fn):
    rng = np.random.default_rng(2)
    v = jnp.asarray(_rows(rng, 8, 11))
    out = _CLIP_ROWS[fn](v, jnp.inf)
    assert np.array_equal(np.asarray(out), np.asarray(v))
    # A vector already inside the ball is returned bit-exactly.
    small = v[0] / (10 * jnp.linalg.norm(v[0], ord=1))
    assert np.array_equal(np.asarray(fn(small, 1.0)), np.asarray(small))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        w = v[0].at[3].set(bad)
        assert np.array_equal(np.asarray(fn(w, 1.0)), np.zeros(11, np.float32))
        assert np.array_equal(np.asarray(fn(w, jnp.inf)), np.zeros(11, np.float32))


# -------------------------------------------------------------------- dp_sum


def test_dp_sum_without_noise_matches_numpy_reference():
    rng = np.random.default_rng(3)
    g = _rows(rng, 24, 19)
    valid = rng.random(24) < 0.7
    c, b = 0.8, 5.0
    out = _DP_SUM(jax.random.key(0), jnp.asarray(g), jnp.asarray(valid), c, 0.0, b)
    ref = _np_clip(g[valid], c, 2).sum(0) / b
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    assert out.dtype == jnp.float32


def test_dp_sum_zero_noise_infinite_clip_is_plain_sum_exactly():
    # With z = 0 and C = inf nothing but the masked sum and the division by b
    # happens. Integer-valued gradients make every float32 summation order
    # exact, so the comparison with NumPy is bitwise whatever order XLA picks.
    rng = np.random.default_rng(4)
    g = rng.integers(-1000, 1000, size=(32, 50)).astype(np.float32)
    valid = rng.random(32) < 0.5
    g_nan = g.copy()
    g_nan[np.argmin(valid)] = np.nan  # garbage in an invalid row must not matter
    f = _DP_SUM
    for b in (16.0, 7.0):
        out = np.asarray(f(jax.random.key(1), jnp.asarray(g_nan), jnp.asarray(valid), jnp.inf, 0.0, b))
        ref = g[valid].sum(0) / np.float32(b)
        if b == 16.0:
            assert np.array_equal(out, ref)
        else:  # XLA may divide by multiplying with 1/b: 1 ulp
            np.testing.assert_allclose(out, ref, rtol=2.0**-23, atol=0)
    # Real-valued gradients: equal up to the order of the float32 reduction.
    h = _rows(rng, 32, 50)
    out = f(jax.random.key(1), jnp.asarray(h), jnp.asarray(valid), jnp.inf, 0.0, 16.0)
    ref = h[valid].astype(np.float64).sum(0) / 16.0
    scale = np.abs(h[valid]).astype(np.float64).sum(0) / 16.0
    assert np.all(np.abs(np.asarray(out) - ref) <= 32 * 2.0**-24 * scale)
    # One valid row: the output is that row / b, bit for bit.
    one = np.zeros(32, bool)
    one[3] = True
    out = f(jax.random.key(1), jnp.asarray(h), jnp.asarray(one), jnp.inf, 0.0, 16.0)
    assert np.array_equal(np.asarray(out), h[3] / np.float32(16.0))


@pytest.mark.parametrize("huge", [1e30, 3e38, -3e38])
def test_one_huge_example_moves_clipped_sum_by_at_most_c(huge):
    rng = np.random.default_rng(5)
    d, c = 300, 0.5
    g = _rows(rng, 9, d)
    extra = rng.standard_normal(d).astype(np.float32)
    extra[:5] = huge
    with_x = np.vstack([g, extra[None]])
    valid_with = np.ones(10, bool)
    valid_without = valid_with.copy()
    valid_without[-1] = False
    f = _DP_SUM
    key = jax.random.key(2)
    a = f(key, jnp.asarray(with_x), jnp.asarray(valid_with), c, 0.0, 1.0)
    b = f(key, jnp.asarray(with_x), jnp.asarray(valid_without), c, 0.0, 1.0)
    assert np.all(np.isfinite(np.asarray(a)))
    diff = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    assert diff <= c * (1 + 1e-6)
    assert diff >= 0.99 * c  # the example is clipped, not dropped


def test_nonfinite_rows_are_zeroed_not_propagated():
    rng = np.random.default_rng(6)
    g = jnp.asarray(_rows(rng, 12, 20))
    valid = jnp.ones(12, bool)
    bad = g.at[2, 4].set(jnp.nan).at[5, 0].set(jnp.inf).at[7, 19].set(-jnp.inf)
    key = jax.random.key(3)
    out = _DP_SUM(key, bad, valid, 1.0, 0.7, 4.0)
    keep = jnp.asarray(np.isin(np.arange(12), [2, 5, 7], invert=True))
    ref = _DP_SUM(key, g, keep, 1.0, 0.7, 4.0)
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_noise_mean_zero_std_zc_and_gaussian():
    # With zero gradients the output is N(0, (zC/b)^2) per coordinate. The
    # noise goes on the SUM, so it is independent of how many rows are valid.
    d, z, c, b = 40_000, 1.3, 0.7, 4.0
    sd = z * c / b
    for n_valid in (0, 3):
        valid = jnp.arange(6) < n_valid
        x = np.asarray(_DP_SUM(jax.random.key(7), jnp.zeros((6, d)), valid, c, z, b), np.float64)
        # mean ~ N(0, sd^2/d); sample std ~ N(sd, sd^2/(2d)): 5 sigma each.
        assert abs(x.mean()) <= FIVE_SIGMA * sd / np.sqrt(d)
        assert abs(x.std() / sd - 1) <= FIVE_SIGMA / np.sqrt(2 * d)
        # Kolmogorov-Smirnov against N(0, sd^2), false alarm 1e-6.
        assert stats.kstest(x, "norm", args=(0, sd)).pvalue > 1e-6


def test_noise_uncorrelated_across_keys_and_nodes():
    d, n = 20_000, 4
    keys = jax.random.split(jax.random.key(8), n)
    f = jax.jit(jax.vmap(dp_sum, in_axes=(0, None, None, None, None, None)))
    x = np.asarray(f(keys, jnp.zeros((2, d)), jnp.ones(2, bool), 1.0, 1.0, 1.0), np.float64)
    r = np.corrcoef(x)
    # r_ij ~ N(0, 1/d); 6 pairs at 5 sigma: false alarm 3.4e-6 in total.
    off = r[~np.eye(n, dtype=bool)]
    assert np.all(np.abs(off) <= FIVE_SIGMA / np.sqrt(d))
    # Same key, same noise.
    again = np.asarray(f(keys, jnp.zeros((2, d)), jnp.ones(2, bool), 1.0, 1.0, 1.0), np.float64)
    assert np.array_equal(x, again)


def test_dp_sum_traced_hyperparameters_do_not_recompile():
    traces = []

    def f(key, g, v, c, z, b):
        traces.append(1)
        return dp_sum(key, g, v, c, z, b)

    jf = jax.jit(jax.vmap(f, in_axes=(0, 0, 0, None, None, None)))
    keys = jax.random.split(jax.random.key(9), 3)
    g, v = jnp.ones((3, 5, 4)), jnp.ones((3, 5), bool)
    for c, z, b in [(1.0, 0.5, 2.0), (0.3, 2.0, 7.0), (jnp.inf, 0.0, 1.0)]:
        jf(keys, g, v, jnp.float32(c), jnp.float32(z), jnp.float32(b)).block_until_ready()
    assert len(traces) == 1


# -------------------------------------------------------------- Poisson sampler


_POISSON = jax.jit(
    jax.vmap(functools.partial(poisson_batch, return_overflow=True), in_axes=(0, None, None, None)),
    static_argnums=3,
)


def _draw(n, size, rate, buffer, seed=10):
    keys = jax.random.split(jax.random.key(seed), n)
    idx, valid, over = _POISSON(keys, size, rate, buffer)
    return np.asarray(idx), np.asarray(valid), np.asarray(over)


def test_poisson_batch_structure_and_count_distribution():
    n, m, q, buf = 20_000, 400, 0.05, 64  # mean 20, P[count > 64] ~ 1e-14
    idx, valid, over = _draw(n, m, q, buf)
    assert idx.dtype == np.int32 and valid.dtype == bool
    assert not over.any()
    counts = valid.sum(1)
    # Valid slots form a prefix, hold distinct increasing indices < size.
    assert np.array_equal(valid, np.arange(buf)[None] < counts[:, None])
    assert np.all(idx[valid] < m) and np.all(idx[valid] >= 0)
    assert np.all(idx[~valid] == 0)
    inc = np.where(valid[:, 1:], np.diff(idx, axis=1), 1)
    assert np.all(inc > 0)
    # Count ~ Binomial(m, q): mean and variance, 5 sigma.
    mean, var = m * q, m * q * (1 - q)
    assert abs(counts.mean() - mean) <= FIVE_SIGMA * np.sqrt(var / n)
    kurt = float(stats.binom.stats(m, q, moments="k"))  # excess kurtosis
    var_sd = np.sqrt((kurt + 2) * var**2 / n)  # sd of the sample variance
    assert abs(counts.var() - var) <= FIVE_SIGMA * var_sd
    # Chi-square goodness of fit of the counts to Binomial(m, q) (bins with
    # expected >= 5 pooled into tails), false alarm 1e-6.
    lo, hi = 7, 34
    obs = np.array([(counts <= lo).sum()] + [(counts == k).sum() for k in range(lo + 1, hi)]
                   + [(counts >= hi).sum()])
    p = np.array([stats.binom.cdf(lo, m, q)] + [stats.binom.pmf(k, m, q) for k in range(lo + 1, hi)]
                 + [stats.binom.sf(hi - 1, m, q)])
    assert stats.chisquare(obs, p * n).pvalue > 1e-6


def test_poisson_batch_each_index_has_rate_q_independently():
    n, m, q, buf = 20_000, 300, 0.03, 64
    idx, valid, _ = _draw(n, m, q, buf, seed=11)
    incl = np.zeros((n, m), bool)
    rows = np.repeat(np.arange(n)[:, None], buf, 1)
    incl[rows[valid], idx[valid]] = True
    freq = incl.mean(0)
    sd = np.sqrt(q * (1 - q) / n)
    # 300 indices at 5.5 sigma (Bonferroni): false alarm 1.1e-5.
    assert np.all(np.abs(freq - q) <= 5.5 * sd)
    # Neighbouring indices are independent: P(i and i+1) = q^2, pooled.
    both = (incl[:, :-1] & incl[:, 1:]).mean()
    k = n * (m - 1)
    assert abs(both - q * q) <= FIVE_SIGMA * np.sqrt(q * q * (1 - q * q) / k) * np.sqrt(2)


def test_poisson_batch_traced_sizes_under_vmap_and_edge_rates():
    keys = jax.random.split(jax.random.key(12), 3)
    sizes = jnp.array([0, 5, 50])
    f = jax.jit(jax.vmap(poisson_batch, in_axes=(0, 0, None, None)), static_argnums=3)
    idx, valid = f(keys, sizes, 1.0, 64)
    np.testing.assert_array_equal(np.asarray(valid).sum(1), [0, 5, 50])
    np.testing.assert_array_equal(np.asarray(idx)[2, :50], np.arange(50))
    idx, valid = f(keys, sizes, 0.0, 64)
    assert not np.asarray(valid).any()


def test_poisson_batch_overflow_truncates_and_matches_accounted_tail():
    # Deliberately small buffer: overflow happens, keeps the B lowest
    # selected indices (all slots valid), and its frequency matches
    # P[Binomial(m, q) > B] (the accountant bounds it with m + 1).
    n, m, q, buf = 20_000, 200, 0.1, 24
    idx, valid, over = _draw(n, m, q, buf, seed=13)
    p = stats.binom.sf(buf, m, q)
    assert abs(over.mean() - p) <= FIVE_SIGMA * np.sqrt(p * (1 - p) / n)
    assert np.all(valid[over])
    assert np.all(idx[over] < m)
    assert np.all(np.diff(idx[over], axis=1) > 0)


# ------------------------------------------------------------ privatize_update


def test_privatize_update_without_noise_is_the_clip():
    rng = np.random.default_rng(14)
    v = jnp.asarray(rng.standard_normal(33).astype(np.float32) * 5)
    key = jax.random.key(15)
    g = _PRIVATIZE(key, v, 1.5, 0.0, "gaussian")
    np.testing.assert_allclose(np.asarray(g), _np_clip(np.asarray(v), 1.5, 2), rtol=2e-6)
    lap = _PRIVATIZE(key, v, 1.5, 0.0, "laplace")
    np.testing.assert_allclose(np.asarray(lap), _np_clip(np.asarray(v), 1.5, 1), rtol=2e-6)
    assert np.abs(np.asarray(lap, np.float64)).sum() <= 1.5 * (1 + 1e-6)


def test_privatize_update_noise_scales():
    d, z, c = 40_000, 0.8, 2.0
    key = jax.random.key(16)
    zero = jnp.zeros(d)
    x = np.asarray(_PRIVATIZE(key, zero, c, z, "gaussian"), np.float64)
    sd = z * c
    assert abs(x.mean()) <= FIVE_SIGMA * sd / np.sqrt(d)
    assert abs(x.std() / sd - 1) <= FIVE_SIGMA / np.sqrt(2 * d)
    y = np.asarray(_PRIVATIZE(key, zero, c, z, "laplace"), np.float64)
    b = z * c
    # Laplace(b): E|Y| = b, sd(|Y|) = b; KS against Laplace(0, b), false alarm 1e-6.
    assert abs(np.abs(y).mean() / b - 1) <= FIVE_SIGMA / np.sqrt(d)
    assert stats.kstest(y, "laplace", args=(0, b)).pvalue > 1e-6


def test_privatize_update_nonfinite_update_sends_pure_noise():
    v = jnp.full(8, jnp.nan)
    key = jax.random.key(17)
    out = _PRIVATIZE(key, v, 1.0, 1.0, "gaussian")
    ref = _PRIVATIZE(key, jnp.zeros(8), 1.0, 1.0, "gaussian")
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(ValueError, match="privacy.mechanism"):
        _PRIVATIZE(key, v, 1.0, 1.0, "exponential")


# -------------------------------------------------------------------- clip_factors


def test_clip_factors_match_numpy_definition():
    from jaxdfl.privacy.mechanisms import clip_factors

    sq = np.array([0.0, 0.25, 1.0, 4.0, 100.0, np.inf, np.nan, 9.0, 1e-30], np.float32)
    valid = np.array([True, True, True, True, True, True, True, False, True])
    c = 1.5
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.where(valid & np.isfinite(sq), np.minimum(1.0, c / np.sqrt(sq.astype(np.float64))), 0.0)
    out = np.asarray(jax.jit(clip_factors)(jnp.asarray(sq), jnp.asarray(valid), c))
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    # C = inf: every valid finite example is left untouched (factor exactly 1), the others dropped.
    out = np.asarray(jax.jit(clip_factors)(jnp.asarray(sq), jnp.asarray(valid), jnp.inf))
    assert np.array_equal(out, np.where(valid & np.isfinite(sq), 1.0, 0.0).astype(np.float32))


def test_poisson_gaps_come_from_a_log_uniform_that_is_finite_for_every_word():
    """Regression: V = float32(32 bits) * 2^-32 rounds to 1.0 for the top 128 words (probability 2^-25), so
    log1p(-V) = -inf gave an infinite gap that ended the batch early: at q = 1 key 319836 selected 12 of 64."""
    from jaxdfl import rng

    extremes = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 129, 2**32 - 128, 2**32 - 1], np.uint64).astype(np.uint32)
    w = np.stack(np.meshgrid(extremes, extremes, extremes), -1).reshape(-1, 3)
    logs = np.asarray(jax.jit(rng.log_uniform_from_words)(*(jnp.asarray(w[:, i]) for i in range(3))))
    assert np.isfinite(logs).all() and (logs < 0).all() and logs.min() > -47  # log(2^-67)
    draws = np.asarray(rng.dp_log_uniform(jax.random.key(0), 200_000))
    assert stats.kstest(-draws, "expon").pvalue > 1e-3  # -log(U) of a uniform U is Exp(1)
    idx, valid = poisson_batch(jax.random.key(319836), 64, 1.0, 64)
    assert np.asarray(valid).all() and (np.asarray(idx) == np.arange(64)).all()

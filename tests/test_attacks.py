"""Attack kernels against NumPy references of their published formulas, on a small hand-built graph."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm as sp_norm

from jaxdfl import attacks as A
from jaxdfl import byzantine
from jaxdfl.errors import ConfigError

# Hand-built graph, 6 nodes, K = 4 slots (row 0 = self, padding points at self and is masked out).
# Edges: 0-1, 0-4, 0-5, 1-2, 2-3, 2-4. Byzantine: 4 and 5.
#   node 0: honest, two Byzantine neighbours (4, 5)
#   node 1: honest, none (one padding slot)
#   node 2: honest, one Byzantine neighbour (4)
#   node 3: honest, none (two padding slots)
#   node 4, 5: Byzantine receivers
NEIGHBORS = np.array(
    [[0, 1, 4, 5], [1, 0, 2, 1], [2, 1, 3, 4], [3, 2, 3, 3], [4, 0, 2, 4], [5, 0, 5, 5]], dtype=np.int32
)
MASK = np.array(
    [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool
)
BYZ = np.array([0, 0, 0, 0, 1, 1], dtype=bool)
HONEST = ~BYZ
D = 5


def metropolis(nb, mask):
    """Metropolis-Hastings weights W_ij = 1/(1 + max(d_i, d_j)), W_ii = 1 - sum_j W_ij (non-uniform rows)."""
    deg = mask.sum(1) - 1
    w = np.zeros(nb.shape, np.float64)
    for i in range(nb.shape[0]):
        for k in range(1, nb.shape[1]):
            if mask[i, k]:
                w[i, k] = 1.0 / (1 + max(deg[i], deg[nb[i, k]]))
        w[i, 0] = 1.0 - w[i].sum()
    return w.astype(np.float32)


WEIGHTS = metropolis(NEIGHBORS, MASK)


def mean_rule(x, mask, weights):
    del weights
    return jnp.sum(jnp.where(mask[:, None], x, 0), axis=0) / jnp.sum(mask)


def median_rule(x, mask, weights):
    """Coordinate-wise median over the valid rows."""
    del weights
    return jnp.nanmedian(jnp.where(mask[:, None], x, jnp.nan), axis=0)


def make_ctx(messages, byz=BYZ, rule=None, nb=NEIGHBORS, mask=MASK, weights=WEIGHTS):
    messages = jnp.asarray(messages, jnp.float32)
    nb = jnp.asarray(nb)
    return A.AttackContext(
        messages=messages,
        block=messages[nb],
        neighbors=nb,
        mask=jnp.asarray(mask),
        weights=jnp.asarray(weights),
        byzantine=jnp.asarray(byz),
        rule=rule,
    )


def messages(seed=0, d=D):
    return np.random.default_rng(seed).normal(1.0, 1.0, size=(len(NEIGHBORS), d)).astype(np.float32)


def np_attacked(nb, mask, byz):
    return [[k for k in range(1, nb.shape[1]) if mask[i, k] and byz[nb[i, k]]] for i in range(nb.shape[0])]


def np_honest(nb, mask, byz):
    return [[k for k in range(nb.shape[1]) if mask[i, k] and (k == 0 or not byz[nb[i, k]])] for i in range(nb.shape[0])]


def np_alie_z(n, b):
    s = math.floor(n / 2 + 1) - b
    return sp_norm.ppf(np.clip((n - b - s) / (n - b), 1e-4, 1 - 1e-4))


def np_reference(name, hyper, msgs, nb=NEIGHBORS, mask=MASK, byz=BYZ, w=WEIGHTS):
    """Plain NumPy/float64 version of each attack's formula, one receiver and one sender at a time."""
    msgs = msgs.astype(np.float64)
    w = w.astype(np.float64)
    blk = msgs[nb]
    out = blk.copy()
    att_rows, hon_rows = np_attacked(nb, mask, byz), np_honest(nb, mask, byz)
    for i in range(nb.shape[0]):
        hon, att = hon_rows[i], att_rows[i]
        x = blk[i, hon]
        mu, sd = x.mean(0), x.std(0)
        for k in att:
            b = nb[i, k]
            if name == "sign_flip":
                m = -hyper.get("scale", 1.0) * (mu if hyper.get("target", "mean") == "mean" else msgs[b])
            elif name == "large_norm":
                m = np.full(msgs.shape[1], hyper.get("scale", 1e6))
            elif name == "alie":
                z = hyper.get("z")
                z = np_alie_z(mask[i].sum(), len(att)) if z is None else z
                m = mu + z * sd
            elif name == "ipm":
                m = -hyper.get("eps", 0.1) * mu
            elif name == "mimic":
                t = hyper.get("target")
                if t is None:
                    ids = [nb[i, j] for j in hon if j > 0]
                    t = min(ids) if ids else i
                m = msgs[t]
            elif name in ("dissensus", "isolation"):
                eps = hyper.get("eps", 1.5) if name == "dissensus" else 1.0
                pull = sum(w[i, j] * (blk[i, j] - msgs[i]) for j in hon if j > 0)
                m = msgs[i] - eps * pull / sum(w[i, j] for j in att)
            else:
                raise AssertionError(name)
            out[i, k] = m
    return out


KEY = jax.random.key(0)

# (name, hyper) checked against np_reference.
REFERENCE_CASES = [
    ("sign_flip", {}),
    ("sign_flip", {"scale": 3.0, "target": "own"}),
    ("large_norm", {"scale": 250.0}),
    ("alie", {}),
    ("alie", {"z": 1.5}),
    ("alie", {"z": -0.7}),
    ("ipm", {}),
    ("ipm", {"eps": 2.0}),
    ("mimic", {}),
    ("mimic", {"target": 3}),
    ("dissensus", {}),
    ("dissensus", {"eps": 0.4}),
    ("isolation", {}),
]


@pytest.mark.parametrize("name,hyper", REFERENCE_CASES, ids=[f"{n}-{h}" for n, h in REFERENCE_CASES])
def test_against_numpy_reference(name, hyper):
    msgs = messages(1)
    block, mask = A.REGISTRY[name](KEY, make_ctx(msgs), **hyper)
    np.testing.assert_allclose(np.asarray(block), np_reference(name, hyper, msgs), rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(mask), MASK)
    assert block.dtype == jnp.float32


def test_messages_differ_per_receiver_and_per_sender():
    msgs = messages(2)
    ctx = make_ctx(msgs)
    # Per sender: receiver 0 gets different messages from its two Byzantine neighbours (slots 2 and 3).
    for name, hyper in [("sign_flip", {"target": "own"}), ("gaussian", {})]:
        block, _ = A.REGISTRY[name](KEY, ctx, **hyper)
        assert not np.allclose(block[0, 2], block[0, 3]), name
    # Per receiver: Byzantine node 4 sends receiver 0 (slot 2) and receiver 2 (slot 3) different messages.
    for name in ["sign_flip", "alie", "ipm", "dissensus", "isolation"]:
        block, _ = A.REGISTRY[name](KEY, ctx, **({"z": 1.0} if name == "alie" else {}))
        assert not np.allclose(block[0, 2], block[2, 3]), name


def test_alie_z_max_matches_paper_formula_on_a_star():
    # Receiver 0 of a star with 8 leaves, 3 of them Byzantine: n = 9, b = 3, s = 2, z = Phi^-1(4/6) > 0.
    n = 9
    nb = np.array([list(range(n))] + [[i, 0] + [i] * (n - 2) for i in range(1, n)], np.int32)
    mask = np.zeros((n, n), bool)
    mask[0] = True
    mask[1:, :2] = True
    byz = np.zeros(n, bool)
    byz[[2, 5, 7]] = True
    w = metropolis(nb, mask)
    msgs = np.random.default_rng(3).normal(size=(n, 4)).astype(np.float32)
    ctx = make_ctx(msgs, byz=byz, nb=nb, mask=mask, weights=w)
    z = np.asarray(A.alie_z(ctx))
    assert z[0] == pytest.approx(sp_norm.ppf(4 / 6), abs=1e-5) and z[0] > 0.4
    block, _ = A.alie(KEY, ctx)
    np.testing.assert_allclose(block, np_reference("alie", {}, msgs, nb, mask, byz, w), rtol=2e-5, atol=2e-6)


def test_alie_z_clipped_where_formula_has_no_solution():
    # Receiver 5 sees only itself and node 0; make node 0 Byzantine and 5 honest: n = 2, b = 1 -> p = 0.
    byz = np.array([1, 0, 0, 0, 0, 0], bool)
    z = np.asarray(A.alie_z(make_ctx(messages(), byz=byz)))
    assert np.all(np.isfinite(z))
    assert z[5] == pytest.approx(sp_norm.ppf(1e-4), rel=1e-4)


def test_gaussian_noise_statistics():
    d = 4000
    msgs = messages(4, d)
    ctx = make_ctx(msgs)
    mu = msgs[[0, 1]].mean(0)  # honest vectors of receiver 0: itself and node 1
    for center, offset in [("mean", mu), ("zero", 0.0)]:
        block, _ = A.gaussian(KEY, ctx, sigma=2.5, center=center)
        for k in (2, 3):
            e = np.asarray(block[0, k], np.float64) - offset
            assert abs(e.mean()) < 5 * 2.5 / math.sqrt(d)
            assert e.std() == pytest.approx(2.5, rel=0.05)
    a, _ = A.gaussian(jax.random.key(1), ctx)
    b, _ = A.gaussian(jax.random.key(1), ctx)
    c, _ = A.gaussian(jax.random.key(2), ctx)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0, 2], c[0, 2])


def test_gaussian_rows_follow_their_definition_and_only_attacked_rows_change(monkeypatch):
    """Row (i, k) under attack holds mu_i + sigma * normal(fold_in(key, i * K + k)); every other row is untouched,
    with several loop steps (rows per step forced to 2) and with a subset of receivers served (engine chunks)."""
    monkeypatch.setattr(A, "ROW_STEP_ELEMENTS", 2 * 7)
    msgs = messages(6, 7)
    ctx = make_ctx(msgs)
    block = np.asarray(A.gaussian(KEY, ctx, sigma=0.5)[0])
    mu = np.asarray(A.honest_stats(ctx)[0])
    attacked = MASK & BYZ[NEIGHBORS] & (np.arange(4) > 0)
    assert attacked.sum() == 3  # two loop steps of two rows, the last one padded
    for i, k in zip(*np.nonzero(attacked)):
        want = mu[i] + 0.5 * np.asarray(jax.random.normal(jax.random.fold_in(KEY, i * 4 + k), (7,)))
        np.testing.assert_allclose(block[i, k], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(block[~attacked], np.asarray(ctx.block)[~attacked])
    rows = np.array([2, 0])  # receivers 2 and 0 only, in another order
    sub = ctx._replace(block=ctx.block[rows], neighbors=ctx.neighbors[rows], mask=ctx.mask[rows],
                       weights=ctx.weights[rows])
    np.testing.assert_array_equal(np.asarray(A.gaussian(KEY, sub, sigma=0.5)[0]), block[rows])


def test_inf_and_large_norm_values():
    msgs = messages(5)
    ctx = make_ctx(msgs)
    att = np.asarray(A.attacked_rows(ctx))
    assert att.sum() == 3
    for value in (float("inf"), float("-inf"), float("nan")):
        block, _ = A.inf(KEY, ctx, value=value)
        got = np.asarray(block)[att]
        assert np.array_equal(got, np.full_like(got, value), equal_nan=True)
        assert np.all(np.isfinite(np.asarray(block)[~att]))
    block, _ = A.large_norm(KEY, ctx)
    np.testing.assert_array_equal(np.asarray(block)[att], 1e6)
    assert np.linalg.norm(np.asarray(block)[0, 2]) == pytest.approx(1e6 * math.sqrt(D), rel=1e-6)


def test_crash_masks_byzantine_senders_only():
    ctx = make_ctx(messages())
    block, mask = A.crash(KEY, ctx)
    expected = MASK.copy()
    expected[0, 2] = expected[0, 3] = expected[2, 3] = False
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(block, ctx.block)


def test_isolation_freezes_and_dissensus_repels():
    msgs = messages(6)
    ctx = make_ctx(msgs)
    w = WEIGHTS.astype(np.float64)
    hon_pull = np.array([
        sum(w[i, k] * (msgs[NEIGHBORS[i, k]] - msgs[i]) for k in np_honest(NEIGHBORS, MASK, BYZ)[i] if k > 0)
        for i in range(6)
    ])
    for name, eps in [("isolation", 1.0), ("dissensus", 1.5), ("dissensus", 3.0)]:
        block, _ = A.REGISTRY[name](KEY, ctx, **({} if name == "isolation" else {"eps": eps}))
        step = np.einsum("ik,ikd->id", w, np.asarray(block, np.float64) - msgs[:, None, :])
        for i in (0, 2):  # honest receivers with Byzantine neighbours
            np.testing.assert_allclose(step[i], (1 - eps) * hon_pull[i], atol=1e-5)


@pytest.mark.parametrize("name", sorted(A.REGISTRY))
def test_contract(name):
    """Every registered attack: jit-able, dtype and shape kept, only attacked rows change, no attack without
    Byzantine nodes."""
    msgs = messages(7)
    hyper = {"adaptive": True} if name in ("alie", "ipm") else {}
    ctx = make_ctx(msgs, rule=median_rule)

    def run(key, m, byz):
        c = make_ctx(m, byz=byz, rule=median_rule)
        return A.REGISTRY[name](key, c, **hyper)

    block, mask = jax.jit(run)(KEY, msgs, BYZ)
    assert block.shape == ctx.block.shape and block.dtype == jnp.float32 and mask.dtype == jnp.bool_
    att = np.asarray(A.attacked_rows(ctx))
    keep = ~att
    np.testing.assert_array_equal(np.asarray(block)[keep], np.asarray(ctx.block)[keep])
    if name == "crash":
        np.testing.assert_array_equal(mask, MASK & keep)
    else:
        np.testing.assert_array_equal(mask, MASK)
    if name != "inf":
        assert np.all(np.isfinite(block[HONEST]))

    block0, mask0 = jax.jit(run)(KEY, msgs, np.zeros(6, bool))
    np.testing.assert_array_equal(block0, ctx.block)
    np.testing.assert_array_equal(mask0, MASK)


@pytest.mark.parametrize("name", ["sign_flip", "gaussian", "alie", "ipm", "mimic", "dissensus", "isolation"])
def test_non_finite_byzantine_state_does_not_leak(name):
    """Regression: statistics over honest rows must not multiply a NaN/inf Byzantine row by a zero mask."""
    msgs = messages(8)
    msgs[4] = np.nan
    msgs[5] = np.inf
    block, _ = A.REGISTRY[name](KEY, make_ctx(msgs))
    assert np.all(np.isfinite(block[HONEST])), name


def test_numeric_hyper_parameters_may_be_traced():
    msgs = messages(9)
    cases = [
        ("sign_flip", {"scale": 2.0}),
        ("gaussian", {"sigma": 0.3}),
        ("large_norm", {"scale": 7.0}),
        ("alie", {"z": 0.8}),
        ("ipm", {"eps": 0.5}),
        ("dissensus", {"eps": 2.0}),
    ]
    eager = [A.REGISTRY[name](KEY, make_ctx(msgs), **hyper)[0] for name, hyper in cases]
    traced = jax.jit(lambda hs: [A.REGISTRY[n](KEY, make_ctx(msgs), **h)[0] for (n, _), h in zip(cases, hs)])(
        [h for _, h in cases]
    )
    for (name, _), e, t in zip(cases, eager, traced):
        np.testing.assert_allclose(t, e, rtol=1e-6, atol=1e-6, err_msg=name)


def honest_mean(msgs, i):
    return msgs[NEIGHBORS[i][np_honest(NEIGHBORS, MASK, BYZ)[i]]].astype(np.float64).mean(0)


def damage(rule_np, block, i, msgs):
    """||rule(block_i) - mu_i|| in NumPy for receiver i."""
    x = np.asarray(block, np.float64)[i][MASK[i]]
    return np.linalg.norm(rule_np(x) - honest_mean(msgs, i))


SEARCH_MSGS = messages(10, 16)


def test_adaptive_with_mean_rule_reaches_search_max():
    # Under the mean the damage grows linearly with the scale, so the best scale is the end of the interval.
    msgs = SEARCH_MSGS
    mu = np.stack([honest_mean(msgs, i) for i in range(6)])
    ctx = make_ctx(msgs, rule=mean_rule)
    ipm_block, alie_block = jax.jit(
        lambda: (A.ipm(KEY, ctx, adaptive=True, search_max=4.0)[0], A.alie(KEY, ctx, adaptive=True, search_max=4.0)[0])
    )()
    np.testing.assert_allclose(ipm_block[0, 2], -4.0 * mu[0], rtol=1e-5)
    np.testing.assert_allclose(ipm_block[2, 3], -4.0 * mu[2], rtol=1e-5)
    expected = np_reference("alie", {"z": 4.0}, msgs)
    np.testing.assert_allclose(np.asarray(alie_block)[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-6)


def test_adaptive_refines_between_grid_points():
    """A rule that down-weights far rows by exp(-r^2/c) has its damage r exp(-r^2/c) peak at r = sqrt(c/2); the
    golden-section stage must find that peak, which lies between two grid points (0.3125 and 0.625)."""
    byz = np.array([1, 0, 0, 0, 0, 0], bool)  # receiver 5 sees itself and Byzantine node 0: mu_5 = x_5
    msgs = SEARCH_MSGS
    r0 = np.linalg.norm(msgs[5].astype(np.float64))
    best_eps = 0.4  # message -eps x_5, so r = ||m - x_5|| = (1 + eps) r0
    c = 2.0 * ((1 + best_eps) * r0) ** 2

    def soft_rule(x, mask, weights):
        del weights
        diff = x - x[0]
        keep = jnp.exp(-jnp.sum(diff**2, axis=1) / c) * (mask & (jnp.arange(x.shape[0]) > 0))
        return x[0] + jnp.sum(keep[:, None] * diff, axis=0)

    block = jax.jit(lambda: A.ipm(KEY, make_ctx(msgs, byz=byz, rule=soft_rule), adaptive=True)[0])()
    eps = -float(np.dot(block[5, 1], msgs[5])) / r0**2
    assert eps == pytest.approx(best_eps, abs=0.02)


@pytest.mark.parametrize("name", ["alie", "ipm"])
@pytest.mark.parametrize("rule", ["mean", "median"])
def test_adaptive_at_least_as_damaging_as_default_and_grid(name, rule):
    msgs = SEARCH_MSGS
    jrule, nrule = {"mean": (mean_rule, lambda x: x.mean(0)), "median": (median_rule, lambda x: np.median(x, 0))}[rule]
    key = "z" if name == "alie" else "eps"
    defaults = [{}, {key: 1.0}]
    ctx = make_ctx(msgs, rule=jrule)
    attack = A.REGISTRY[name]
    blocks = jax.jit(
        lambda: [(attack(KEY, ctx, adaptive=True, **d)[0], attack(KEY, ctx, **d)[0]) for d in defaults]
    )()
    grid = 10.0 * 2.0 ** np.arange(-(A._GRID_POINTS - 1), 1)
    grid_damage = {i: max(damage(nrule, np_reference(name, {key: s}, msgs), i, msgs) for s in grid) for i in (0, 2)}
    for adaptive, fixed in blocks:
        for i in (0, 2):  # the honest receivers with Byzantine neighbours
            got = damage(nrule, adaptive, i, msgs)
            assert got >= damage(nrule, fixed, i, msgs) - 1e-5
            assert got >= grid_damage[i] - 1e-4 * (1 + got)


def test_adaptive_needs_a_rule():
    with pytest.raises(ConfigError, match="attack.adaptive"):
        A.ipm(KEY, make_ctx(messages()), adaptive=True)


def test_label_flip_is_poisoning():
    assert A.POISONING == {"label_flip"}
    y = jnp.arange(10, dtype=jnp.int32)
    flipped = A.flip_labels(y, 10)
    np.testing.assert_array_equal(flipped, 9 - np.arange(10))
    np.testing.assert_array_equal(A.flip_labels(flipped, 10), y)
    assert flipped.dtype == y.dtype
    ctx = make_ctx(messages())
    block, mask = A.label_flip(KEY, ctx)
    np.testing.assert_array_equal(mask, MASK)
    np.testing.assert_array_equal(block, ctx.block)


# ----------------------------------------------------------------------------------------------- validation


def test_defaults_cover_registry_and_validate():
    assert set(A.DEFAULTS) == set(A.REGISTRY)
    for name, hyper in A.DEFAULTS.items():
        A.validate(name, hyper)
        assert A.resolve(name, {}) == hyper


@pytest.mark.parametrize(
    "name,hyper,key",
    [
        ("nope", {}, "attack.name"),
        ("sign_flip", {"eps": 1.0}, "attack.eps"),
        ("none", {"scale": 1.0}, "attack.scale"),
        ("sign_flip", {"scale": -1.0}, "attack.scale"),
        ("sign_flip", {"target": "mine"}, "attack.target"),
        ("gaussian", {"sigma": -0.1}, "attack.sigma"),
        ("gaussian", {"center": "median"}, "attack.center"),
        ("large_norm", {"scale": float("inf")}, "attack.scale"),
        ("inf", {"value": 3.0}, "attack.value"),
        ("alie", {"z": "max"}, "attack.z"),
        ("alie", {"adaptive": 1}, "attack.adaptive"),
        ("ipm", {"eps": 0.0}, "attack.eps"),
        ("ipm", {"search_max": 0}, "attack.search_max"),
        ("mimic", {"target": -1}, "attack.target"),
        ("mimic", {"target": 1.5}, "attack.target"),
        ("dissensus", {"eps": float("nan")}, "attack.eps"),
        ("isolation", {"eps": 1.0}, "attack.eps"),
    ],
)
def test_validate_errors(name, hyper, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        A.validate(name, hyper)


def test_mimic_target_out_of_range_at_trace_time():
    with pytest.raises(ConfigError, match="attack.target"):
        A.mimic(KEY, make_ctx(messages()), target=6)


# ----------------------------------------------------------------------------------------------- placement


def test_place_random_is_seeded_and_uniform():
    a = byzantine.place(20, 6, "random", seed=3)
    assert a.dtype == bool and a.shape == (20,) and a.sum() == 6
    np.testing.assert_array_equal(a, byzantine.place(20, 6, "random", seed=3))
    masks = np.stack([byzantine.place(20, 6, "random", seed=s) for s in range(400)])
    assert len({m.tobytes() for m in masks}) > 300
    freq = masks.mean(0)  # each node Byzantine with probability 0.3
    assert np.all(np.abs(freq - 0.3) < 0.1)


def test_place_degree_highest_first_ties_by_id():
    degrees = np.array([2, 5, 3, 5, 1, 3, 2])
    np.testing.assert_array_equal(np.flatnonzero(byzantine.place(7, 3, "degree", degrees=degrees)), [1, 2, 3])
    np.testing.assert_array_equal(np.flatnonzero(byzantine.place(7, 2, "degree", degrees=degrees)), [1, 3])


def test_place_ids_and_zero():
    np.testing.assert_array_equal(np.flatnonzero(byzantine.place(7, 2, "ids", ids=[5, 0])), [0, 5])
    assert not byzantine.place(7, 0).any()
    assert not byzantine.place(7, 0, "ids", ids=[]).any()
    assert not byzantine.place(1, 0).any()


@pytest.mark.parametrize(
    "args,kwargs,key",
    [
        ((10, -1), {}, "attack.byzantine"),
        ((10, 5), {}, "attack.byzantine"),
        ((9, 5), {}, "attack.byzantine"),
        ((10, True), {}, "attack.byzantine"),
        ((10, 2), {"placement": "central"}, "attack.placement"),
        ((10, 2), {"placement": "degree"}, "attack.placement"),
        ((10, 2), {"placement": "degree", "degrees": [1, 2]}, "attack.placement"),
        ((10, 2), {"placement": "ids", "ids": [1, 1]}, "attack.ids"),
        ((10, 2), {"placement": "ids", "ids": [1, 10]}, "attack.ids"),
        ((10, 2), {"placement": "ids", "ids": [1]}, "attack.ids"),
        ((10, 2), {"placement": "ids", "ids": [1, 2.0]}, "attack.ids"),
        ((10, 2), {"placement": "ids"}, "attack.ids"),
        ((10, 2), {"placement": "random", "ids": [1, 2]}, "attack.ids"),
    ],
)
def test_place_errors(args, kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        byzantine.place(*args, **kwargs)


def test_place_allows_largest_minority():
    assert byzantine.place(9, 4).sum() == 4
    assert byzantine.place(10, 4, "degree", degrees=np.arange(10)).sum() == 4


def test_check_contract_names_an_unknown_attack():
    """Regression: a misspelled name was a bare KeyError."""
    with pytest.raises(ConfigError, match="attack.name: unknown attack 'signflip'; allowed: .*sign_flip"):
        A.check_contract("signflip", None, 4, 3, 2)
    A.check_contract("sign_flip", None, 4, 3, 2)  # a shipped attack follows its contract


@pytest.mark.parametrize("by_sender", [False, True])
def test_replace_rows_puts_the_message_in_the_attacked_rows_only(by_sender):
    """Definition: block'[i, k] = message[i] (per receiver) or message[neighbors[i, k]] (per sender) where row k of
    receiver i is attacked, the gathered message messages[neighbors[i, k]] everywhere else."""
    msgs = messages(3)
    ctx = make_ctx(msgs)
    message = np.random.default_rng(4).normal(size=(len(NEIGHBORS), D)).astype(np.float32)
    block, mask = A.replace_rows(ctx, jnp.asarray(message), by_sender=by_sender)
    nb, attacked = np.asarray(NEIGHBORS), np.asarray(A.attacked_rows(ctx))
    assert attacked.any() and (~attacked).any()
    expected = msgs[nb].copy()
    for i, k in zip(*np.nonzero(attacked)):
        expected[i, k] = message[nb[i, k]] if by_sender else message[i]
    np.testing.assert_array_equal(np.asarray(block), expected)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ctx.mask))

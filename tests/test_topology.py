"""Tests for jaxdfl.topology: graph families, mixing weights, neighbour tables, spectral gaps, analytics."""

import dataclasses
import math

import networkx as nx
import numpy as np
import pytest

from jaxdfl import topology as T
from jaxdfl.errors import ConfigError

N = 16
# A connected edge list for the "edges" kind: a path 0-1-...-15 plus two chords.
PATH_EDGES = [[i, i + 1] for i in range(N - 1)] + [[0, 8], [3, 12]]
SEEDED = ("erdos_renyi", "random_regular", "small_world", "barabasi_albert")


def build(kind, n=N, **kw):
    if kind == "edges" and "edges" not in kw:
        kw["edges"] = PATH_EDGES
    return T.make(kind, n, **kw)


def reference_mixing(graph, scheme):
    """Plain-loop Metropolis / max-degree weights straight from the definitions (Xiao & Boyd 2004)."""
    n = graph.number_of_nodes()
    deg = dict(graph.degree())
    dmax = max(deg.values())
    W = np.zeros((n, n))
    for i in range(n):
        for j in graph.neighbors(i):
            W[i, j] = 1.0 / (1.0 + max(deg[i], deg[j])) if scheme == "metropolis" else 1.0 / (1.0 + dmax)
        W[i, i] = 1.0 - W[i].sum()
    return W


def reference_gap(W):
    mods = sorted(abs(complex(x)) for x in np.linalg.eigvals(W))
    return 1.0 - mods[-2]


# ---------------------------------------------------------------------------------------------------
# Contract over the registry
# ---------------------------------------------------------------------------------------------------


def test_params_cover_kinds():
    assert set(T.PARAMS) == set(T.KINDS)


@pytest.mark.parametrize("scheme", ["metropolis", "max_degree"])
@pytest.mark.parametrize("kind", sorted(T.KINDS))
def test_mixing_properties(kind, scheme):
    topo = build(kind, weights=scheme)
    W, g = topo.mixing, topo.graph
    assert topo.n == N and topo.kind == kind and W.shape == (N, N) and W.dtype == np.float64
    assert sorted(g.nodes) == list(range(N)) and nx.is_connected(g) and nx.number_of_selfloops(g) == 0
    np.testing.assert_allclose(W, W.T, atol=1e-12)
    np.testing.assert_allclose(W.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    assert W.min() >= 0.0
    support = nx.to_numpy_array(g, nodelist=range(N)) > 0
    off = ~(support | np.eye(N, dtype=bool))
    assert np.all(W[off] == 0.0)
    assert np.all(W[support] > 0.0)  # every edge carries weight
    np.testing.assert_allclose(W, reference_mixing(g, scheme), atol=1e-12)
    assert topo.spectral_gap == pytest.approx(reference_gap(W), abs=1e-9)
    assert 0.0 < topo.spectral_gap <= 1.0


@pytest.mark.parametrize("kind", sorted(T.KINDS))
def test_neighbor_table(kind):
    topo = build(kind)
    g = topo.graph
    deg = np.array([g.degree(i) for i in range(N)])
    K = deg.max() + 1
    assert topo.neighbors.shape == topo.mask.shape == topo.weights.shape == (N, K)
    assert topo.neighbors.dtype == np.int32 and topo.mask.dtype == bool and topo.weights.dtype == np.float32
    np.testing.assert_array_equal(topo.degrees, deg)
    assert topo.max_degree == deg.max() and topo.width == K
    np.testing.assert_array_equal(topo.sizes, deg + 1)
    for i in range(N):
        row, m = topo.neighbors[i], topo.mask[i]
        assert row[0] == i and m[0]
        assert list(row[1 : deg[i] + 1]) == sorted(g.neighbors(i))
        assert m[: deg[i] + 1].all() and not m[deg[i] + 1 :].any()
        assert np.all(row[deg[i] + 1 :] == i)  # padding gathers the node itself
    expected = np.where(topo.mask, topo.mixing[np.arange(N)[:, None], topo.neighbors], 0.0)
    np.testing.assert_allclose(topo.weights, expected.astype(np.float32), rtol=0, atol=0)
    # The table is the same linear map as W: sparse gossip == dense gossip.
    x = np.random.default_rng(0).normal(size=(N, 5))
    sparse = (topo.weights[..., None].astype(np.float64) * x[topo.neighbors]).sum(1)
    np.testing.assert_allclose(sparse, topo.mixing @ x, atol=1e-6)
    # Edge list agrees with the graph.
    e = topo.edges
    assert e.shape == (g.number_of_edges(), 2) and np.all(e[:, 0] < e[:, 1])
    assert {tuple(p) for p in e.tolist()} == {tuple(sorted(p)) for p in g.edges()}
    assert topo.num_edges == g.number_of_edges()


def test_topology_is_frozen_and_read_only():
    topo = build("ring")
    with pytest.raises(dataclasses.FrozenInstanceError):
        topo.n = 3
    for arr in (topo.mixing, topo.neighbors, topo.mask, topo.weights, topo.degrees):
        with pytest.raises(ValueError):
            arr[0] = 0
    assert "ring" in repr(topo) and len(repr(topo)) < 200


# ---------------------------------------------------------------------------------------------------
# Families: structure and spectral gaps against closed forms
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 5, 8, 16, 33])
def test_ring_gap_closed_form(n):
    topo = T.make("ring", n)
    off = topo.mixing[~np.eye(n, dtype=bool) & (topo.mixing > 0)]
    np.testing.assert_allclose(off, 1.0 / 3.0)
    lam = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(1, n)]
    assert topo.spectral_gap == pytest.approx(1.0 - max(abs(x) for x in lam), abs=1e-10)


@pytest.mark.parametrize("scheme", ["metropolis", "max_degree"])
def test_complete_gap_is_one(scheme):
    n = 12
    topo = T.make("complete", n, weights=scheme)
    np.testing.assert_allclose(topo.mixing, np.full((n, n), 1.0 / n), atol=1e-15)
    assert topo.spectral_gap == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [4, 7, 12])
def test_max_degree_path_closed_form(n):
    # Path P_n: Laplacian eigenvalues 2 - 2 cos(pi k / n); max degree 2 -> W = I - L / 3.
    topo = T.make("edges", n, edges=[[i, i + 1] for i in range(n - 1)], weights="max_degree")
    lam = [1 / 3 + 2 / 3 * math.cos(math.pi * k / n) for k in range(1, n)]
    assert topo.spectral_gap == pytest.approx(1.0 - max(abs(x) for x in lam), abs=1e-10)


def test_max_degree_differs_from_metropolis_on_irregular_graph():
    md = T.make("barabasi_albert", 20, m=2, weights="max_degree")
    mh = T.make("barabasi_albert", 20, m=2)
    dmax = md.degrees.max()
    u, v = md.edges.T
    np.testing.assert_allclose(md.mixing[u, v], 1.0 / (1.0 + dmax))
    np.testing.assert_allclose(np.diag(md.mixing), 1.0 - md.degrees / (1.0 + dmax))
    assert not np.allclose(md.mixing, mh.mixing)
    # Metropolis weights dominate uniform max-degree weights edge by edge, hence mix at least as fast here.
    assert np.all(mh.mixing[u, v] >= md.mixing[u, v] - 1e-15)
    assert mh.spectral_gap > md.spectral_gap


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
def test_hypercube_gap_closed_form(d):
    # Q_d Laplacian eigenvalues 2j; regular of degree d -> W = I - L / (d + 1), gap = 2 / (d + 1).
    topo = T.make("hypercube", 2**d)
    assert sorted(topo.graph.degree(i) for i in range(2**d)) == [d] * 2**d
    assert nx.is_isomorphic(topo.graph, nx.hypercube_graph(d))
    assert topo.spectral_gap == pytest.approx(2.0 / (d + 1), abs=1e-10)


@pytest.mark.parametrize("rows,cols", [(3, 4), (4, 4), (5, 3)])
def test_torus_gap_closed_form(rows, cols):
    topo = T.make("torus", rows * cols, rows=rows, cols=cols)
    assert nx.is_isomorphic(topo.graph, nx.grid_2d_graph(rows, cols, periodic=True))
    lam = [
        1 - (4 - 2 * math.cos(2 * math.pi * a / rows) - 2 * math.cos(2 * math.pi * b / cols)) / 5
        for a in range(rows)
        for b in range(cols)
        if (a, b) != (0, 0)
    ]
    assert topo.spectral_gap == pytest.approx(1.0 - max(abs(x) for x in lam), abs=1e-10)


def test_torus_default_is_most_square():
    assert nx.is_isomorphic(T.make("torus", 24).graph, nx.grid_2d_graph(4, 6, periodic=True))
    assert nx.is_isomorphic(T.make("torus", 24, rows=2).graph, nx.grid_2d_graph(2, 12, periodic=True))
    assert nx.is_isomorphic(T.make("torus", 24, cols=3).graph, nx.grid_2d_graph(8, 3, periodic=True))


@pytest.mark.parametrize("n", [2, 5, 8, 13, 16])
def test_exponential_links(n):
    topo = T.make("exponential", n)
    hops = [2**k for k in range(n) if 2**k <= n - 1]
    for i in range(n):
        expected = {(i + s * h) % n for h in hops for s in (1, -1)} - {i}
        assert set(topo.graph.neighbors(i)) == expected
    # Circulant regular graph: eigenvalues of W are the DFT of its first row.
    lam = np.fft.fft(topo.mixing[0]).real
    mods = np.sort(np.abs(lam))
    assert topo.spectral_gap == pytest.approx(1.0 - mods[-2], abs=1e-10)


def test_star_two_cliques_complete_structure():
    star = T.make("star", 9)
    assert star.graph.degree(0) == 8 and all(star.graph.degree(i) == 1 for i in range(1, 9))
    assert star.spectral_gap == pytest.approx(1.0 / 9, abs=1e-10)  # W = I - L/9, L eigs 0, 1, 9
    for n in (10, 11):
        tc = T.make("two_cliques", n)
        h = n // 2
        assert tc.num_edges == h * (h - 1) // 2 + (n - h) * (n - h - 1) // 2 + 1
        assert tc.graph.has_edge(h - 1, h) and nx.has_bridges(tc.graph)
        assert list(nx.bridges(tc.graph)) in ([(h - 1, h)], [(h, h - 1)])
    assert T.make("complete", 7).num_edges == 21


def test_random_regular_and_small_world_and_ba_structure():
    rr = T.make("random_regular", 20, degree=3, seed=4)
    assert set(dict(rr.graph.degree()).values()) == {3}
    sw = T.make("small_world", 20, k=4, p=0.0)
    assert nx.is_isomorphic(sw.graph, nx.circulant_graph(20, [1, 2]))
    ba = T.make("barabasi_albert", 30, m=3, seed=1)
    assert ba.num_edges == (30 - 3) * 3


def test_erdos_renyi_redraws_until_connected():
    n, p, seed = 20, 0.12, 1
    topo = T.make("erdos_renyi", n, p=p, seed=seed)
    t = next(t for t in range(100) if nx.is_connected(nx.gnp_random_graph(n, p, seed=T._try_seed(seed, t))))
    assert t > 0  # the test exercises the re-draw
    assert nx.utils.edges_equal(topo.graph.edges(), nx.gnp_random_graph(n, p, seed=T._try_seed(seed, t)).edges())


@pytest.mark.parametrize("kind", SEEDED)
def test_seeded_kinds_are_deterministic(kind):
    a, b = build(kind, seed=3), build(kind, seed=3)
    np.testing.assert_array_equal(a.mixing, b.mixing)
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    others = [build(kind, seed=s).edges for s in range(4, 8)]
    assert any(e.shape != a.edges.shape or np.any(e != a.edges) for e in others)


# ---------------------------------------------------------------------------------------------------
# User mixing matrices
# ---------------------------------------------------------------------------------------------------


def test_user_matrix_accepted():
    g = T.make("ring", 6).mixing
    lazy = 0.5 * (np.eye(6) + g)
    topo = T.make("ring", 6, weights=lazy.tolist())
    np.testing.assert_array_equal(topo.mixing, lazy)
    assert topo.spectral_gap == pytest.approx(reference_gap(lazy), abs=1e-10)
    # Identity is a legal (non-mixing) matrix: the local-training-only baseline.
    ident = T.make("ring", 6, weights=np.eye(6))
    assert ident.spectral_gap == pytest.approx(0.0, abs=1e-12)
    assert T.describe(ident)["rounds_to_100x"] == math.inf
    # ... but 1/2 on each ring edge and 0 on self has eigenvalue -1: gossip oscillates forever
    half = 0.5 * (np.roll(np.eye(4), 1, axis=1) + np.roll(np.eye(4), -1, axis=1))
    with pytest.raises(ConfigError, match="eigenvalue -1"):
        T.make("ring", 4, weights=half)


def _ring_w(n=6):
    return np.array(T.make("ring", n).mixing)


def _asymmetric():
    W = _ring_w()
    W[0, 1] += 0.1
    W[0, 0] -= 0.1  # row 0 still sums to 1
    return W


def _not_stochastic():
    return 0.9 * _ring_w()


def _negative():
    W = _ring_w()
    d = W[0, 1] + 0.05
    W[0, 1] -= d
    W[1, 0] -= d
    W[0, 0] += d
    W[1, 1] += d  # still symmetric and doubly stochastic
    return W


def _off_support():
    return np.full((6, 6), 1.0 / 6)  # complete-graph weights on a ring


@pytest.mark.parametrize(
    "matrix,word",
    [
        (_asymmetric, "is not symmetric"),
        (_not_stochastic, "is not doubly stochastic"),
        (_negative, "is not non-negative"),
        (_off_support, "is not zero off the graph's edges"),
        (lambda: np.eye(5), "shape"),
        (lambda: np.where(np.eye(6) > 0, np.nan, 0.0), "non-finite"),
        (lambda: [["a"] * 6] * 6, "numeric"),
        (lambda: "uniform", "unknown scheme"),
    ],
)
def test_user_matrix_rejected(matrix, word):
    with pytest.raises(ConfigError, match="topology.weights") as err:
        T.make("ring", 6, weights=matrix())
    msg = str(err.value)
    assert word in msg and "\n" not in msg


def test_user_matrix_tolerance():
    W = _ring_w()
    W[0, 0] += 1e-10  # within 1e-8
    T.make("ring", 6, weights=W)
    W[0, 0] += 1e-6
    with pytest.raises(ConfigError, match="doubly stochastic"):
        T.make("ring", 6, weights=W)


def test_mixing_matrix_function():
    g = nx.cycle_graph(5)
    np.testing.assert_allclose(T.mixing_matrix(g), reference_mixing(g, "metropolis"))
    np.testing.assert_allclose(T.mixing_matrix(g, "max_degree"), reference_mixing(g, "max_degree"))


# ---------------------------------------------------------------------------------------------------
# from_networkx
# ---------------------------------------------------------------------------------------------------


def test_from_networkx_relabels_sorted():
    g = nx.Graph([("c", "a"), ("a", "d"), ("d", "b"), ("b", "c")])
    g.add_edge("a", "a")  # self-loops are dropped: the diagonal comes from the weights
    topo = T.from_networkx(g)
    idx = {"a": 0, "b": 1, "c": 2, "d": 3}
    expected = {tuple(sorted((idx[u], idx[v]))) for u, v in g.edges() if u != v}
    assert {tuple(e) for e in topo.edges.tolist()} == expected
    assert topo.kind == "networkx" and topo.n == 4
    np.testing.assert_allclose(topo.mixing, reference_mixing(topo.graph, "metropolis"))

    h = nx.Graph([(10, 3), (3, 7), (7, 42)])
    topo = T.from_networkx(h, weights="max_degree")
    assert {tuple(e) for e in topo.edges.tolist()} == {(0, 2), (0, 1), (1, 3)}  # 3->0, 7->1, 10->2, 42->3
    assert topo.graph.number_of_nodes() == 4


def test_from_networkx_multigraph_and_equivalence_with_make():
    m = nx.MultiGraph([(0, 1), (0, 1), (1, 2), (2, 0)])
    assert T.from_networkx(m).num_edges == 3
    a, b = T.from_networkx(nx.cycle_graph(9)), T.make("ring", 9)
    np.testing.assert_array_equal(a.mixing, b.mixing)
    np.testing.assert_array_equal(a.neighbors, b.neighbors)


@pytest.mark.parametrize(
    "graph,word",
    [
        (nx.DiGraph([(0, 1), (1, 0)]), "undirected"),
        (nx.Graph([(0, 1), (2, 3)]), "disconnected"),
        (nx.empty_graph(1), ">= 2"),
        ([(0, 1)], "networkx graph"),
    ],
)
def test_from_networkx_errors(graph, word):
    with pytest.raises(ConfigError, match="topology.graph") as err:
        T.from_networkx(graph)
    assert word in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Errors for bad settings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,n,params,key",
    [
        ("mesh", 8, {}, "topology.kind"),
        ("ring", 1, {}, "topology.n"),
        ("ring", 4.0, {}, "topology.n"),
        ("ring", True, {}, "topology.n"),
        ("ring", 8, {"degree": 2}, "topology.degree"),
        ("random_regular", 8, {"degre": 3}, "topology.degre"),
        ("random_regular", 8, {"degree": 8}, "topology.degree"),
        ("random_regular", 8, {"degree": 0}, "topology.degree"),
        ("random_regular", 9, {"degree": 3}, "topology.degree"),
        ("random_regular", 40, {"degree": 1}, "topology.degree"),
        ("random_regular", 8, {"degree": 2.5}, "topology.degree"),
        ("torus", 12, {"rows": 5}, "topology.rows"),
        ("torus", 12, {"rows": 3, "cols": 5}, "topology.rows"),
        ("torus", 12, {"cols": 5}, "topology.cols"),
        ("torus", 12, {"rows": -3, "cols": -4}, "topology.rows"),
        ("hypercube", 12, {}, "topology.n"),
        ("erdos_renyi", 8, {"p": 0.0}, "topology.p"),
        ("erdos_renyi", 8, {"p": 1.5}, "topology.p"),
        ("erdos_renyi", 60, {"p": 0.005}, "topology.p"),
        ("erdos_renyi", 8, {"p": "0.5"}, "topology.p"),
        ("small_world", 8, {"k": 3}, "topology.k"),
        ("small_world", 8, {"k": 8}, "topology.k"),
        ("small_world", 8, {"p": -0.1}, "topology.p"),
        ("barabasi_albert", 8, {"m": 8}, "topology.m"),
        ("barabasi_albert", 8, {"m": 0}, "topology.m"),
        ("edges", 4, {}, "topology.edges"),
        ("edges", 4, {"edges": [[0, 1], [2, 3]]}, "topology.edges"),
        ("edges", 4, {"edges": [[0, 1], [1, 2], [2, 4]]}, "topology.edges"),
        ("edges", 4, {"edges": [[0, 1], [1, 2], [2, 3], [3, 3]]}, "topology.edges"),
        ("edges", 4, {"edges": [[0, 1, 2]]}, "topology.edges"),
        ("edges", 4, {"edges": [[0, 1], [1]]}, "topology.edges"),
        ("edges", 3, {"edges": [[0.0, 1.0], [1.0, 2.0]]}, "topology.edges"),
    ],
)
def test_bad_settings_raise_config_error(kind, n, params, key):
    with pytest.raises(ConfigError) as err:
        T.make(kind, n, **params)
    msg = str(err.value)
    assert msg.startswith(key + ":"), msg
    assert "\n" not in msg


def test_bad_seed():
    with pytest.raises(ConfigError, match="^topology.seed:"):
        T.make("erdos_renyi", 8, seed=1.5)


def test_unknown_kind_lists_kinds():
    with pytest.raises(ConfigError) as err:
        T.make("mesh", 8)
    assert all(k in str(err.value) for k in T.KINDS)


def test_unknown_param_lists_allowed():
    with pytest.raises(ConfigError) as err:
        T.make("small_world", 8, q=0.1)
    assert "topology.k" in str(err.value) and "topology.p" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# describe()
# ---------------------------------------------------------------------------------------------------


def test_describe_ring_against_networkx():
    n = 10
    topo = T.make("ring", n)
    d = T.describe(topo)
    g = nx.cycle_graph(n)
    assert d["n"] == n and d["kind"] == "ring"
    assert d["edges"] == g.number_of_edges()
    assert d["diameter"] == nx.diameter(g) == n // 2
    assert (d["degree_min"], d["degree_mean"], d["degree_max"]) == (2, 2.0, 2)
    gap = 1.0 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n))
    assert d["spectral_gap"] == pytest.approx(gap, abs=1e-10)
    assert d["slem"] == pytest.approx(1.0 - gap, abs=1e-10)
    assert d["consensus_rate"] == pytest.approx((1.0 - gap) ** 2, abs=1e-10)
    r = d["rounds_to_100x"]
    assert d["consensus_rate"] ** r <= 0.01 < d["consensus_rate"] ** (r - 1)


@pytest.mark.parametrize("kind", ["random_regular", "barabasi_albert", "two_cliques", "star", "complete", "torus"])
def test_describe_against_networkx(kind):
    topo = build(kind, n=24)
    d = T.describe(topo)
    g = topo.graph
    degs = [g.degree(i) for i in g.nodes]
    assert d["diameter"] == nx.diameter(g)
    assert d["edges"] == g.number_of_edges()
    assert (d["degree_min"], d["degree_max"]) == (min(degs), max(degs))
    assert d["degree_mean"] == pytest.approx(np.mean(degs))


def test_consensus_rate_bounds_gossip():
    # The mean squared disagreement after t gossip rounds is at most consensus_rate^t times the initial one,
    # and on the ring the slowest eigenvector attains the bound.
    topo = T.make("ring", 12)
    rate = T.describe(topo)["consensus_rate"]
    x = np.random.default_rng(1).normal(size=(12, 3))

    def dis(y):
        return np.mean(np.sum((y - y.mean(0)) ** 2, axis=1))

    y = x.copy()
    for t in range(1, 30):
        y = topo.mixing @ y
        assert dis(y) <= rate**t * dis(x) * (1 + 1e-9)
    v = np.cos(2 * np.pi * np.arange(12) / 12)[:, None]
    assert dis(topo.mixing @ v) == pytest.approx(rate * dis(v), rel=1e-9)


def test_large_sparse_spectral_gap_matches_closed_form():
    """Above DENSE_EIG_MAX the gap comes from shift-invert Lanczos; check it on a ring's closed form."""
    from jaxdfl import topology as topo_mod

    n = topo_mod.DENSE_EIG_MAX + 76
    ring = topo_mod.make("ring", n)
    expected = 1.0 - (1.0 / 3.0 + 2.0 / 3.0 * np.cos(2 * np.pi / n))
    assert ring.spectral_gap == pytest.approx(expected, rel=1e-6)


def _bipartite_cover(base: nx.Graph) -> nx.Graph:
    """The bipartite double cover: u -> (u, 0), (u, 1); each edge u-v becomes (u,0)-(v,1) and (v,0)-(u,1)."""
    n = base.number_of_nodes()
    g = nx.empty_graph(2 * n)
    g.add_edges_from((u, n + v) for u, v in base.edges())
    g.add_edges_from((v, n + u) for u, v in base.edges())
    return g


@pytest.mark.parametrize("graph", [
    nx.random_regular_graph(4, 1100, seed=1),  # l_2 by plain Lanczos (large gap)
    nx.cycle_graph(1100),  # l_2 by shift-invert (tiny gap); Gershgorin rules l_N out
    nx.star_graph(1099),
    _bipartite_cover(nx.random_regular_graph(8, 550, seed=2)),  # |l_N| = 7/9 > l_2: the SLEM is the smallest
])
def test_sparse_spectral_gap_equals_the_dense_solve(graph):
    """Above DENSE_EIG_MAX the gap comes from (shift-invert) Lanczos on the sparse W; it equals eigvalsh's."""
    topo = T.from_networkx(graph)
    assert topo.n > T.DENSE_EIG_MAX and "mixing" not in vars(topo)  # no dense W was made for it
    dense = np.sort(np.abs(np.linalg.eigvalsh(topo.mixing)))
    assert topo.spectral_gap == pytest.approx(1.0 - dense[-2], rel=1e-8, abs=1e-13)


def test_the_sparse_gap_repeats_to_the_last_digit_and_a_nested_list_is_a_matrix():
    topo = T.make("random_regular", 1100, degree=4)
    assert len({T.spectral_gap(topo.sparse_mixing) for _ in range(3)}) == 1  # ARPACK's start is fixed
    assert T.spectral_gap([[0.5, 0.5], [0.5, 0.5]]) == 1.0


def test_a_large_graph_keeps_a_sparse_mixing_matrix_with_the_table_weights():
    topo = T.make("random_regular", 1500, degree=4)
    w = topo.sparse_mixing
    assert w.nnz == 1500 * 5
    rows = np.repeat(np.arange(1500), topo.width)
    np.testing.assert_allclose(np.asarray(w[rows, topo.neighbors.ravel()]).reshape(1500, -1)[topo.mask],
                               topo.weights[topo.mask], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0, atol=1e-12)


@pytest.mark.parametrize("kind, params", [("erdos_renyi", {"p": 0.1}), ("random_regular", {"degree": 2})])
def test_seeds_give_distinct_graphs_when_draws_are_retried(kind, params):
    """A disconnected draw was retried with seed + 1, the next seed's first draw: seeds 0 and 1 gave one graph."""
    n = 30 if kind == "erdos_renyi" else 12
    edges = [frozenset(map(tuple, T.make(kind, n, seed=s, **params).edges.tolist())) for s in range(6)]
    assert len(set(edges)) == len(edges)


def test_a_negative_seed_is_a_config_error_not_a_retry_crash():
    # regression: the first draw took any integer and a retry crashed in SeedSequence
    with pytest.raises(ConfigError, match="topology.seed"):
        T.make("random_regular", 12, seed=-3, degree=1)

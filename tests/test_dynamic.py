"""Time-varying graphs, churn, stragglers, hierarchical gossip and communication metrics."""

import warnings

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest

from jaxdfl import experiment, gossip, simulation, topology
from jaxdfl.training import local_train
from jaxdfl.errors import ConfigError


@pytest.mark.parametrize("scheme", sorted(simulation.WEIGHT_SCHEMES))
def test_in_program_weights_match_host_mixing_on_random_masks(scheme):
    topo = topology.make("erdos_renyi", 12, p=0.5, seed=2)
    eid = experiment.edge_ids(topo)
    rng = np.random.default_rng(0)
    alive = rng.random(topo.num_edges) > 0.4
    mask = topo.mask & ((eid < 0) | alive[np.maximum(eid, 0)])
    w = np.asarray(simulation.WEIGHT_SCHEMES[scheme](jnp.asarray(topo.neighbors), jnp.asarray(mask)))
    g = nx.empty_graph(12)
    g.add_edges_from(e for e, a in zip(topo.edges.tolist(), alive, strict=True) if a)
    ref = topology.mixing_matrix(g, scheme)
    dense = np.zeros((12, 12))
    for i in range(12):
        for k in range(topo.neighbors.shape[1]):
            if mask[i, k]:
                dense[i, topo.neighbors[i, k]] += w[i, k]
    np.testing.assert_allclose(dense, ref, atol=1e-6)


@pytest.mark.parametrize("kind, params", [("random_regular", {"degree": 3, "seed": 1}), ("star", {}),
                                           ("complete", {}), ("hierarchical", {"cluster_size": 3})])
def test_edge_ids_name_the_edge_behind_each_table_entry(kind, params):
    topo = topology.make(kind, 10, **params)
    eid = experiment.edge_ids(topo)
    for i in range(10):
        for k in range(1, topo.neighbors.shape[1]):
            if topo.mask[i, k]:
                j = topo.neighbors[i, k]
                back = list(topo.neighbors[j]).index(i)
                assert eid[i, k] == eid[j, back] >= 0
                assert topo.edges[eid[i, k]].tolist() == sorted([i, j])
            else:
                assert eid[i, k] == -1
    assert (eid[:, 0] == -1).all()


_jit_matching = jax.jit(simulation.random_matching, static_argnums=4)  # eager, the while_loop dispatches op by op


def _matching(topo, key):
    eid = experiment.edge_ids(topo)
    g = _jit_matching(key, jnp.asarray(topo.neighbors), jnp.asarray(topo.mask), jnp.asarray(eid), topo.num_edges)
    return g, eid


def _greedy_matching_reference(topo, key):
    """The definition: scan the edges in a random order (here the kernel's priorities: its random word per edge,
    ties broken by edge id, largest first) and keep each edge whose two ends are still free."""
    word = np.asarray(jax.random.bits(key, (topo.num_edges,), jnp.uint32)).astype(np.int64)
    partner = np.full(topo.n, -1)
    for e in sorted(range(topo.num_edges), key=lambda e: (word[e], e), reverse=True):
        i, j = topo.edges[e]
        if partner[i] < 0 and partner[j] < 0:
            partner[i], partner[j] = j, i
    return partner


@pytest.mark.parametrize("kind,params", [("ring", {}), ("erdos_renyi", {"p": 0.3}), ("complete", {}),
                                         ("random_regular", {"degree": 4})])
def test_matching_is_the_greedy_matching_of_a_random_edge_order(kind, params):
    for seed in range(4):
        topo = topology.make(kind, 11, seed=seed, **params)
        key = jax.random.key(seed)
        g, _ = _matching(topo, key)
        partner = np.where(np.asarray(g.mask[:, 1]), np.asarray(g.neighbors[:, 1]), -1)
        np.testing.assert_array_equal(partner, _greedy_matching_reference(topo, key))
        edges = {tuple(e) for e in topo.edges.tolist()}
        free = partner < 0
        assert all((min(i, j), max(i, j)) in edges for i, j in enumerate(partner) if j >= 0)  # graph edges only
        assert not any(free[i] and free[j] for i, j in edges)  # maximal


@pytest.mark.parametrize("n", [8, 9])
def test_matching_gossip_preserves_the_average(n):
    g, _ = _matching(topology.make("complete", n), jax.random.key(3))
    x = jax.random.normal(jax.random.key(0), (n, 5))
    y = gossip.sparse(g.neighbors, g.weights, x)
    np.testing.assert_allclose(y.mean(0), x.mean(0), atol=1e-6)
    partner = np.asarray(g.neighbors[:, 1])
    matched = np.asarray(g.mask[:, 1])
    assert matched.sum() == 2 * (n // 2)  # perfect on the complete graph
    assert all(partner[partner[i]] == i for i in range(n))
    np.testing.assert_allclose(y[matched], 0.5 * (x[matched] + x[partner[matched]]), atol=1e-6)


@pytest.mark.parametrize("path", ["graph", "complete"])
def test_matching_on_the_complete_graph_is_uniform(path):
    topo = topology.make("complete", 4)
    keys = jax.random.split(jax.random.key(0), 3000)
    if path == "graph":
        draw = jax.vmap(lambda k: _matching(topo, k)[0])(keys)
    else:  # the O(N log N) path the engine takes on a complete graph: the same distribution
        draw = jax.vmap(lambda k: simulation.complete_matching(k, jnp.ones(4, bool)))(keys)
    partners = np.asarray(draw.neighbors[:, 0, 1])
    counts = np.bincount(partners, minlength=4)[1:]  # node 0's partner names one of the 3 perfect matchings
    assert np.asarray(draw.mask).all() and np.abs(counts / 3000 - 1 / 3).max() < 0.03


def test_matching_uses_only_the_links_left_this_round(small_cfg):
    # regression: matching with a hierarchical topology's periodic bridges crashed on mismatched shapes
    cfg = small_cfg(**{"topology.kind": "hierarchical", "topology.n": 12, "topology.cluster_size": 4,
                       "topology.inter_every": 3, "topology.dynamic": "matching"})
    exp = experiment.build(cfg)
    cluster = topology.clusters(exp.topology, 4)
    graph = jax.jit(lambda key, r: simulation.round_graph(exp.spec, exp.hyper, exp.arrays, key, r,
                                                          jnp.ones(12, bool)))
    crossings = []
    for r in range(12):  # bridges live in rounds 0, 3, 6, 9
        g = graph(jax.random.key(r), jnp.int32(r))
        nbr, mask = np.asarray(g.neighbors), np.asarray(g.mask)
        crossings.append((mask[:, 1] & (cluster[nbr[:, 1]] != cluster)).any())
    assert not any(c for r, c in enumerate(crossings) if r % 3) and any(crossings[::3])
    exp, g, online = _graph(small_cfg(**{"topology.kind": "complete", "topology.dynamic": "matching",
                                         "topology.node_dropout": 0.4}), key=5)
    online, nbr, mask = np.asarray(online), np.asarray(g.neighbors), np.asarray(g.mask)
    assert not mask[~online, 1].any()  # offline nodes are not matched ...
    assert mask[online, 1].sum() == 2 * (online.sum() // 2)  # ... and the online ones pair among themselves
    assert online[nbr[mask[:, 1], 1]].all()


def test_edge_dropout_zero_equals_static(small_cfg):
    a = experiment.run(small_cfg())
    b = experiment.run(small_cfg(**{"topology.dynamic": "edge_dropout", "topology.drop_prob": 0.0}))
    np.testing.assert_allclose(a.history["accuracy_mean"], b.history["accuracy_mean"], atol=1e-6)
    np.testing.assert_allclose(a.history["consensus_distance"], b.history["consensus_distance"], rtol=1e-4,
                               atol=1e-8)


def _graph(cfg, round_index=0, key=0):
    exp = experiment.build(cfg)
    online = jnp.ones(exp.spec.n, bool)
    if exp.spec.node_dropout:
        online = jax.random.bernoulli(jax.random.key(key + 1), 1 - exp.hyper["node_dropout"], (exp.spec.n,))
    g = simulation.round_graph(exp.spec, exp.hyper, exp.arrays, jax.random.key(key), jnp.int32(round_index),
                               online)
    return exp, g, online


def test_edge_dropout_drops_symmetrically_and_weights_stay_doubly_stochastic(small_cfg):
    exp, g, _ = _graph(small_cfg(**{"topology.kind": "complete", "topology.dynamic": "edge_dropout",
                                    "topology.drop_prob": 0.5}))
    nbr, mask, w = map(np.asarray, g)
    dense = np.zeros((8, 8))
    for i in range(8):
        for k in range(nbr.shape[1]):
            if mask[i, k]:
                dense[i, nbr[i, k]] += w[i, k]
    np.testing.assert_allclose(dense, dense.T, atol=1e-7)
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-6)
    assert 0 < (dense > 0).sum() - 8 < 8 * 7  # some edges dropped, some kept


def test_node_dropout_offline_nodes_are_cut_off(small_cfg):
    exp, g, online = _graph(small_cfg(**{"topology.node_dropout": 0.5}))
    mask, nbr = np.asarray(g.mask), np.asarray(g.neighbors)
    online = np.asarray(online)
    assert not online.all() and online.any()
    for i in range(8):
        live = nbr[i][mask[i]][1:]
        if not online[i]:
            assert len(live) == 0
        assert online[live].all()


def test_offline_node_keeps_its_model(small_cfg):
    exp = experiment.build(small_cfg(**{"topology.node_dropout": 0.6}))
    state = simulation.init_state(exp.spec, jax.random.key(0), exp.hyper)
    state = state._replace(theta=state.theta + jax.random.normal(jax.random.key(9), state.theta.shape))
    new, _ = simulation.round_step(exp.spec, exp.hyper, exp.arrays, state, jax.random.key(4))
    unchanged = np.all(np.asarray(new.theta) == np.asarray(state.theta), axis=1)
    assert unchanged.any() and not unchanged.all()


def test_hierarchical_bridges_live_every_inter_every_rounds(small_cfg):
    cfg = small_cfg(**{"topology.kind": "hierarchical", "topology.cluster_size": 4, "topology.inter_every": 3})
    exp, g0, _ = _graph(cfg, round_index=0)
    _, g1, _ = _graph(cfg, round_index=1)
    inter = np.asarray(exp.arrays.inter)
    assert inter.sum() == 2  # one bridge link (0 - 4), seen from both ends
    assert np.asarray(g0.mask)[inter].all() and not np.asarray(g1.mask)[inter].any()
    np.testing.assert_allclose(np.asarray(g1.weights).sum(1), 1.0, atol=1e-6)


def test_a_hierarchical_graph_without_cluster_size_takes_the_default(small_cfg):
    """Regression: the bridges were located with the config's cluster_size, absent when the default was meant."""
    from jaxdfl import experiment, topology

    base = {"topology.kind": "hierarchical", "topology.n": 16, "topology.inter_every": 2}
    implicit = experiment.build(small_cfg(**base))
    explicit = experiment.build(small_cfg(**base, **{"topology.cluster_size":
                                                     topology.PARAMS["hierarchical"]["cluster_size"]}))
    np.testing.assert_array_equal(np.asarray(implicit.arrays.inter), np.asarray(explicit.arrays.inter))
    assert np.asarray(implicit.arrays.inter).sum() > 0


def test_resample_draws_from_a_pool_of_graphs(small_cfg):
    cfg = small_cfg(**{"topology.kind": "random_regular", "topology.degree": 3, "topology.dynamic": "resample",
                       "topology.pool": 4})
    graphs = {tuple(np.asarray(_graph(cfg, key=k)[1].neighbors).ravel()) for k in range(12)}
    assert len(graphs) > 1


def test_straggler_with_zero_steps_does_not_move(small_cfg):
    exp = experiment.build(small_cfg())
    state = simulation.init_state(exp.spec, jax.random.key(0), exp.hyper)
    a = exp.arrays
    opt0 = jax.tree.map(lambda leaf: leaf[0], state.opt_state)
    args = (exp.spec.local, jax.random.key(1), state.theta[0], opt0, a.x[0], a.y[0], a.sizes[0], exp.hyper)
    t0, _, _ = local_train(*args, jnp.int32(0))
    t1, _, _ = local_train(*args, jnp.int32(1))
    t2, _, _ = local_train(*args, jnp.int32(2))
    full, _, _ = local_train(*args)
    np.testing.assert_array_equal(t0, state.theta[0])
    assert not np.allclose(t1, t0) and not np.allclose(t1, t2)
    np.testing.assert_array_equal(t2, full)


def test_communication_metrics_on_a_static_ring(small_cfg):
    r = experiment.run(small_cfg())
    np.testing.assert_allclose(r.history["messages_per_node"], [4, 8, 12])  # 2 neighbours per round
    np.testing.assert_allclose(r.history["bytes_per_node"], r.history["messages_per_node"] * 4 * (64 * 10 + 10))
    assert r.history["consensus_per_round"].shape == (3, 2)
    np.testing.assert_allclose(r.history["consensus_per_round"][:, -1], r.history["consensus_distance"],
                               rtol=1e-5)


def test_too_few_live_rows_keeps_own_model(small_cfg):
    """Trimmed mean (f=1) needs 3 rows; a node whose neighbours all dropped keeps its own message, never zeros."""
    exp = experiment.build(small_cfg(**{"aggregation.rule": "trimmed_mean", "topology.node_dropout": 0.9}))
    msg = jax.random.normal(jax.random.key(0), (8, exp.model.dim)) + 5.0
    g = simulation.Graph(exp.arrays.neighbors, exp.arrays.mask.at[:, 1:].set(False), exp.arrays.weights)
    out, kept_own = simulation.exchange(exp.spec, jax.random.key(1), msg, exp.arrays, g)
    np.testing.assert_array_equal(out, msg)
    assert np.asarray(kept_own).all()


def test_weights_scheme_holds_on_graphs_that_change(small_cfg):
    """topology.weights = max_degree was silently replaced by Metropolis weights once links changed per round."""
    er = {"topology.kind": "erdos_renyi", "topology.p": 0.5, "topology.weights": "max_degree"}
    for dynamic in ({"topology.dynamic": "edge_dropout", "topology.drop_prob": 0.3},
                    {"topology.dynamic": "resample", "topology.pool": 2}):
        _, g, _ = _graph(small_cfg(**er, **dynamic))
        _, mask, w = map(np.asarray, g)
        deg = mask.sum(1) - 1
        assert deg.min() < deg.max()  # irregular: Metropolis weights would differ
        np.testing.assert_allclose(w[:, 1:][mask[:, 1:]], 1 / (1 + deg.max()), rtol=1e-6)


def test_user_weight_matrix_from_config_equals_the_named_scheme(small_cfg):
    topo = topology.make("two_cliques", 8, weights="max_degree")
    named = experiment.run(small_cfg(**{"topology.kind": "two_cliques", "topology.weights": "max_degree"}))
    matrix = experiment.run(small_cfg(**{"topology.kind": "two_cliques", "topology.weights": topo.mixing.tolist()}))
    metropolis = experiment.run(small_cfg(**{"topology.kind": "two_cliques"}))
    np.testing.assert_array_equal(named.history["consensus_distance"], matrix.history["consensus_distance"])
    assert not np.allclose(named.history["consensus_distance"], metropolis.history["consensus_distance"])


def test_kept_own_share_counts_honest_nodes_left_without_enough_rows(small_cfg):
    """Nodes whose dropped links leave too few rows keep their own model; the history says how often."""
    base = {"topology.kind": "complete", "aggregation.rule": "trimmed_mean", "aggregation.f": 2}
    dropped = experiment.run(small_cfg(**base, **{"topology.dynamic": "edge_dropout", "topology.drop_prob": 0.4}))
    static = experiment.run(small_cfg(**base))
    share = dropped.history["kept_own_share"]
    assert share.shape == (3,) and (share > 0).all() and (share < 1).all()
    np.testing.assert_array_equal(static.history["kept_own_share"], 0.0)


def test_rules_are_validated_against_every_graph_a_round_can_draw(small_cfg):
    with pytest.raises(ConfigError, match="matching"):  # one partner a round: 2 rows, trimming needs 3
        experiment.build(small_cfg(**{"topology.kind": "complete", "aggregation.rule": "trimmed_mean",
                                      "topology.dynamic": "matching"}))
    pool = {"topology.kind": "small_world", "topology.k": 6, "topology.p": 0.3, "topology.n": 16,
            "aggregation.rule": "trimmed_mean", "aggregation.f": 2, "topology.dynamic": "resample"}
    sizes = [topology.make("small_world", 16, seed=s, k=6, p=0.3).sizes.min() for s in range(8)]
    assert sizes[0] >= 5 and min(sizes) < 5  # the configured graph passes, a pool graph does not
    experiment.build(small_cfg(**{**pool, "topology.pool": 1}))
    with pytest.raises(ConfigError, match="aggregation.f"):
        experiment.build(small_cfg(**{**pool, "topology.pool": 8}))


def test_churn_rates_reuse_the_compiled_program(small_cfg):
    """drop_prob, node_dropout and stragglers are traced, yet changing them recompiled: they were static keys."""
    base = small_cfg(**{"topology.dynamic": "edge_dropout", "topology.drop_prob": 0.1,
                        "topology.node_dropout": 0.1, "topology.stragglers": 0.1})
    first = experiment.run(base)
    runner = experiment._last_runner
    other = base.replace({"topology.drop_prob": 0.4, "topology.node_dropout": 0.3, "topology.stragglers": 0.5})
    second = experiment.run(other)
    assert experiment._last_runner is runner
    assert not np.allclose(first.history["consensus_distance"], second.history["consensus_distance"])
    assert not experiment.same_program(base, base.replace({"topology.node_dropout": 0.0}))  # 0 drops a code path


def test_effective_spectral_gap_is_the_gap_on_unchanging_graphs_and_the_mean_square_rate_on_random_ones(small_cfg):
    static = experiment.build(small_cfg())
    assert experiment.effective_spectral_gap(static) == static.topology.spectral_gap
    # sampled, but every draw is the ring: its spectral gap
    same = experiment.build(small_cfg(**{"topology.dynamic": "edge_dropout", "topology.drop_prob": 0.0}))
    assert experiment.effective_spectral_gap(same) == pytest.approx(static.topology.spectral_gap, rel=1e-3)
    dropped = experiment.build(small_cfg(**{"topology.dynamic": "edge_dropout", "topology.drop_prob": 0.5}))
    assert 0 < experiment.effective_spectral_gap(dropped) < 0.8 * static.topology.spectral_gap
    # one-peer gossip on the complete graph of 16: W^2 = W, E[W] = I / 2 + (J - I) / 30, lambda_2 = 1/2 - 1/30
    match = experiment.build(small_cfg(**{"topology.kind": "complete", "topology.n": 16,
                                          "topology.dynamic": "matching"}))
    assert experiment.effective_spectral_gap(match) == pytest.approx(1 - np.sqrt(0.5 - 1 / 30), rel=0.03)


def test_effective_spectral_gap_compiles_its_graph_draws_once_per_graph_setting(small_cfg):
    """The estimate's graph draws used to be a fresh jit per call: every run (and every sweep setting) with a changing
    graph recompiled them, seconds per summary. They now depend only on the graph settings."""
    drop = {"topology.dynamic": "edge_dropout", "topology.drop_prob": 0.5}
    first = experiment.effective_spectral_gap(experiment.build(small_cfg(**drop)))
    compiled = experiment._round_graph_draws._cache_size()
    other_lr = experiment.build(small_cfg(**drop, **{"train.lr": 0.01, "topology.seed": 0}))
    assert experiment.effective_spectral_gap(other_lr) == first  # the learning rate does not change the graphs
    other_p = experiment.build(small_cfg(**{**drop, "topology.drop_prob": 0.3}))
    assert experiment.effective_spectral_gap(other_p) > first  # a dynamic value of the same program
    assert experiment._round_graph_draws._cache_size() == compiled


def test_effective_spectral_gap_of_graphs_that_average_exactly_is_one(small_cfg):
    """Two nodes matched every round average exactly: W^T W maps every disagreement to 0, and the power iteration
    divided 0 by 0 (NaN in the summary, a truthy NaN that also defeated the sweep's fallback to the static gap)."""
    exp = experiment.build(small_cfg(**{"topology.kind": "complete", "topology.n": 2, "topology.dynamic": "matching"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert experiment.effective_spectral_gap(exp) == 1.0

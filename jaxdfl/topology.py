"""Communication graphs and gossip mixing matrices, built on the host with networkx.

A `Topology` carries one undirected connected graph over nodes 0..N-1 in the two forms the exchange
kernels use:

- dense: the mixing matrix `mixing` [N, N] for `W @ X` gossip;
- sparse: a padded neighbour table `neighbors` [N, K] (column 0 the node itself, then its neighbours in
  increasing id, padding repeats the node's own id so a gather stays in range), `mask` [N, K] (False on
  padding) and `weights` [N, K] (`mixing[i, neighbors[i, k]]`, 0 on padding), with K = max degree + 1.

Both forms describe the same linear map: sum_k weights[i, k] * x[neighbors[i, k]] = (W @ x)[i].

Everything here is NumPy/networkx host code; nothing is traced or compiled.

References:
    Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?", NeurIPS 2017 (D-SGD).
    Xiao & Boyd, "Fast linear iterations for distributed averaging", Systems & Control Letters 2004
    (Metropolis-Hastings and max-degree weights, spectral gap).
    Boyd, Diaconis & Xiao, "Fastest mixing Markov chain on a graph", SIAM Review 2004.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import networkx as nx
import numpy as np

from jaxdfl.errors import ConfigError
from jaxdfl.registry import Shipped

__all__ = [
    "KINDS",
    "PARAMS",
    "WEIGHT_SCHEMES",
    "Topology",
    "describe",
    "from_networkx",
    "make",
    "mixing_matrix",
    "sparse_mixing_matrix",
    "spectral_gap",
]

#: Named mixing-weight schemes; a user matrix (N x N array or nested list) is the third option.
WEIGHT_SCHEMES = ("metropolis", "max_degree")

#: Absolute tolerance for validating a user mixing matrix.
TOL = 1e-8

#: Above this N a sparse mixing matrix's spectral gap comes from Lanczos (scipy eigsh), not a dense solve.
DENSE_EIG_MAX = 1024

#: How many draws (seeds from :func:`_try_seed`) a random family may make before giving up on a connected graph.
MAX_TRIES = 100


# --------------------------------------------------------------------------------------------------
# The Topology record
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class Topology:
    """An undirected connected communication graph with its gossip weights, dense and as a neighbour table.

    Invariants (checked at construction by `from_networkx`/`make`):
        mixing is symmetric, doubly stochastic, non-negative and zero off edges + diagonal;
        sum_k weights[i, k] * x[neighbors[i, k]] == (mixing @ x)[i] for every x.

    Attributes:
        n: number of nodes N.
        kind: the family name (`make`'s kind, or "networkx" for `from_networkx`).
        graph: the networkx graph over nodes 0..N-1 (no self-loops).
        mixing: [N, N] float64 mixing matrix W (dense, made on first use from ``sparse_mixing``).
        sparse_mixing: W as a scipy CSR matrix (what large graphs keep: a dense W is 3.2 GB at N = 20,000).
        neighbors: [N, K] int32; column 0 = i, then i's neighbours in increasing id, padding = i.
        mask: [N, K] bool; False on padding.
        weights: [N, K] float32; mixing[i, neighbors[i, k]] on valid entries, 0 on padding.
        degrees: [N] int32 graph degrees (self excluded).
        spectral_gap: 1 - (second largest eigenvalue modulus of W).

    The arrays are read-only; `eq=False` keeps identity equality and hashing (arrays have no truth value).
    """

    n: int
    kind: str
    graph: nx.Graph
    sparse_mixing: Any
    neighbors: np.ndarray
    mask: np.ndarray
    weights: np.ndarray
    degrees: np.ndarray
    spectral_gap: float

    @functools.cached_property
    def mixing(self) -> np.ndarray:
        """[N, N] float64 mixing matrix W, read-only."""
        dense = self.sparse_mixing.toarray()
        dense.setflags(write=False)
        return dense

    @property
    def max_degree(self) -> int:
        """Largest node degree (self excluded)."""
        return int(self.degrees.max())

    @property
    def width(self) -> int:
        """K, the neighbour-table width: max degree + 1."""
        return int(self.neighbors.shape[1])

    @property
    def sizes(self) -> np.ndarray:
        """[N] int32 neighbourhood sizes, self included: mask.sum(1) = degrees + 1."""
        return self.mask.sum(axis=1).astype(np.int32)

    @property
    def num_edges(self) -> int:
        """Number of undirected edges E."""
        return int(self.graph.number_of_edges())

    @functools.cached_property
    def edges(self) -> np.ndarray:
        """[E, 2] int32 undirected edges (u < v), sorted lexicographically."""
        if self.graph.number_of_edges() == 0:
            return np.zeros((0, 2), np.int32)
        e = np.sort(np.asarray(list(self.graph.edges()), dtype=np.int64), axis=1)
        e = e[np.lexsort((e[:, 1], e[:, 0]))].astype(np.int32)
        e.setflags(write=False)
        return e

    def __repr__(self) -> str:
        return (
            f"Topology(kind={self.kind!r}, n={self.n}, edges={self.num_edges}, "
            f"max_degree={self.max_degree}, spectral_gap={self.spectral_gap:.6g})"
        )


# --------------------------------------------------------------------------------------------------
# Mixing weights
# --------------------------------------------------------------------------------------------------


def _check_relabelled(graph: nx.Graph) -> int:
    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)):
        raise ConfigError("topology.graph: nodes must be the integers 0..n-1 (use from_networkx to relabel)")
    return n


def _edge_arrays(graph: nx.Graph) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray([(u, v) for u, v in graph.edges() if u != v], dtype=np.int64).reshape(-1, 2)
    return e[:, 0], e[:, 1]


def _degrees(graph: nx.Graph, n: int) -> np.ndarray:
    deg = np.zeros(n, np.int64)
    u, v = _edge_arrays(graph)
    np.add.at(deg, u, 1)
    np.add.at(deg, v, 1)
    return deg


_ALLOWED_WEIGHTS = (
    "allowed: 'metropolis', 'max_degree', or a symmetric, doubly stochastic, non-negative N x N matrix "
    "that is zero off the graph's edges and diagonal"
)


def mixing_matrix(graph: nx.Graph, weights: Any = "metropolis") -> np.ndarray:
    """Gossip mixing matrix W of a graph over nodes 0..N-1.

    Definitions (d_i = degree of i, self excluded; E = edge set):
        "metropolis"  (Metropolis-Hastings): W_ij = 1 / (1 + max(d_i, d_j)) for (i, j) in E,
                       W_ii = 1 - sum_{j != i} W_ij, 0 elsewhere.
        "max_degree"  (uniform):             W_ij = 1 / (1 + d_max) for (i, j) in E,
                       W_ii = 1 - d_i / (1 + d_max), 0 elsewhere.
        user matrix:  validated to be symmetric, non-negative, doubly stochastic (rows and columns sum to 1)
                       and zero off E + diagonal, each to absolute tolerance 1e-8; returned as float64.

    Both named schemes give a symmetric doubly stochastic W with a strictly positive diagonal, so for a
    connected graph 1 is a simple eigenvalue and all others lie in (-1, 1).

    Args:
        graph: undirected networkx graph over nodes 0..N-1 (self-loops are ignored).
        weights: "metropolis", "max_degree", or an [N, N] array / nested list.

    Returns:
        W: [N, N] float64.

    Raises:
        ConfigError naming topology.weights (and the failed property) for an unknown scheme or invalid matrix.

    References:
        Xiao & Boyd, "Fast linear iterations for distributed averaging", 2004;
        Xiao, Boyd & Lall, "A scheme for robust distributed sensor fusion based on average consensus", 2005.
    """
    if not isinstance(weights, str):
        return _validate_user_matrix(graph, *_shape_and_edges(graph), weights)
    return sparse_mixing_matrix(graph, weights).toarray()


def _shape_and_edges(graph: nx.Graph) -> tuple[int, np.ndarray, np.ndarray]:
    n = _check_relabelled(graph)
    return (n, *_edge_arrays(graph))


def sparse_mixing_matrix(graph: nx.Graph, weights: Any = "metropolis"):
    """:func:`mixing_matrix` as a scipy CSR matrix (float64), built from the edge list for the named schemes, so a
    large graph never holds a dense ``[N, N]`` array; a user matrix is validated dense and converted."""
    import scipy.sparse as sp

    n, u, v = _shape_and_edges(graph)
    if not isinstance(weights, str):
        return sp.csr_matrix(_validate_user_matrix(graph, n, u, v, weights))
    deg = _degrees(graph, n)
    if weights == "metropolis":
        w_edge = 1.0 / (1.0 + np.maximum(deg[u], deg[v]))
    elif weights == "max_degree":
        w_edge = np.full(u.shape, 1.0 / (1.0 + deg.max(initial=0)))
    else:
        raise ConfigError(f"topology.weights: unknown scheme {weights!r}; {_ALLOWED_WEIGHTS}")
    off = sp.coo_matrix((np.concatenate([w_edge, w_edge]), (np.concatenate([u, v]), np.concatenate([v, u]))),
                        shape=(n, n)).tocsr()
    diag = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    W = (off + sp.diags(diag, format="csr")).tocsr()
    W.sort_indices()
    return W


def _validate_user_matrix(graph: nx.Graph, n: int, u: np.ndarray, v: np.ndarray, weights: Any) -> np.ndarray:
    try:
        W = np.array(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"topology.weights: not a numeric N x N matrix; {_ALLOWED_WEIGHTS}") from None
    if W.shape != (n, n):
        raise ConfigError(f"topology.weights: user matrix has shape {W.shape}, expected ({n}, {n}); {_ALLOWED_WEIGHTS}")
    if not np.all(np.isfinite(W)):
        raise ConfigError(f"topology.weights: user matrix has non-finite entries; {_ALLOWED_WEIGHTS}")
    if W.min() < -TOL:
        raise ConfigError(f"topology.weights: user matrix is not non-negative (min {W.min():.3g}); {_ALLOWED_WEIGHTS}")
    asym = np.abs(W - W.T).max()
    if asym > TOL:
        raise ConfigError(
            f"topology.weights: user matrix is not symmetric (max |W - W^T| = {asym:.3g}); {_ALLOWED_WEIGHTS}"
        )
    row_err = np.abs(W.sum(axis=1) - 1.0).max()
    col_err = np.abs(W.sum(axis=0) - 1.0).max()
    if max(row_err, col_err) > TOL:
        raise ConfigError(
            "topology.weights: user matrix is not doubly stochastic "
            f"(max |row sum - 1| = {row_err:.3g}, max |column sum - 1| = {col_err:.3g}); {_ALLOWED_WEIGHTS}"
        )
    support = np.eye(n, dtype=bool)
    support[u, v] = True
    support[v, u] = True
    off = np.abs(np.where(support, 0.0, W))
    if off.max(initial=0.0) > TOL:
        i, j = np.unravel_index(int(off.argmax()), off.shape)
        raise ConfigError(
            f"topology.weights: user matrix is not zero off the graph's edges (W[{i}, {j}] = {W[i, j]:.3g} "
            f"but ({i}, {j}) is not an edge); {_ALLOWED_WEIGHTS}"
        )
    if np.linalg.eigvalsh(W)[0] <= -1.0 + TOL:  # the identity (gap 0, no mixing) stays legal: a baseline
        raise ConfigError("topology.weights: user matrix has eigenvalue -1, so gossip oscillates and never reaches "
                          f"consensus (e.g. weight 0 on self on a bipartite graph); {_ALLOWED_WEIGHTS}")
    return W


def spectral_gap(mixing) -> float:
    """Spectral gap of a symmetric mixing matrix: 1 - (second largest eigenvalue modulus).

    Definition: with eigenvalues ordered by modulus |l_1| >= |l_2| >= ..., gap = 1 - |l_2|. For a
    connected graph with the weights above l_1 = 1 and gap in (0, 1]; gossip shrinks the disagreement
    ||X - 1 xbar^T|| by at least a factor (1 - gap) per round.

    Args:
        mixing: [N, N] symmetric matrix, dense or scipy sparse.

    Returns:
        gap as a Python float, clipped to [0, 1] against round-off.

    References:
        Boyd, Ghosh, Prabhakar & Shah, "Randomized gossip algorithms", IEEE Trans. Inf. Theory 2006.
    """
    import scipy.sparse as sp

    sparse = sp.issparse(mixing)
    mixing = sp.csc_matrix(mixing, dtype=np.float64) if sparse else np.asarray(mixing, np.float64)
    n = mixing.shape[0]
    nnz = mixing.nnz if sparse else np.count_nonzero(mixing)
    if n > DENSE_EIG_MAX and nnz < 0.05 * n * n:
        slem = _sparse_slem(sp.csc_matrix(mixing))
    else:
        w = mixing.toarray() if sparse else mixing
        mod = np.sort(np.abs(np.linalg.eigvalsh(w)))
        slem = mod[-2] if mod.size > 1 else 0.0
    return float(np.clip(1.0 - slem, 0.0, 1.0))


#: A second eigenvalue Lanczos puts at least this far below 1 is taken as found (it converges fast on such a gap);
#: closer to 1 it is refined by shift-invert, whose factorisation is cheap on the sparse, path-like graphs that
#: have such small gaps (rings, tori) and costly on random graphs (fill-in), which have large gaps.
_LANCZOS_GAP_MIN = 1e-3


def _sparse_slem(w) -> float:
    """Second largest eigenvalue modulus of a large sparse symmetric stochastic matrix ``w`` (CSC).

    l_2 is the largest eigenvalue of ``w - 1 1^T / N`` (the eigenvalue 1 deflated), found by Lanczos; when that
    does not converge within a few restarts or puts l_2 within :data:`_LANCZOS_GAP_MIN` of 1, by shift-invert
    Lanczos at 1 instead. The smallest eigenvalue l_N matters only when |l_N| may exceed l_2: Gershgorin's bound
    ``l_N >= min_i (2 w_ii - 1)`` (rows of non-negative entries summing to 1) usually rules that out at no cost;
    otherwise l_N comes from Lanczos, refined by shift-invert at its estimate.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    n = w.shape[0]
    ncv = min(n - 1, 64)
    start = _start_vector(n)
    unit = np.full(n, 1.0 / math.sqrt(n))
    deflated = LinearOperator((n, n), matvec=lambda x: w @ x - unit * (unit @ x), dtype=np.float64)
    try:
        second = float(eigsh(deflated, k=1, which="LA", tol=1e-12, ncv=ncv, maxiter=20, v0=start,
                             return_eigenvectors=False)[0])
    except ArpackNoConvergence:
        second = 1.0
    if second > 1.0 - _LANCZOS_GAP_MIN:
        second = float(np.min(_near(w, 1.0 + 1e-7, k=2)))
    if 1.0 - 2.0 * float(w.diagonal().min()) <= second:
        return max(second, 0.0)
    try:
        lowest = float(eigsh(w, k=1, which="SA", tol=1e-6, ncv=ncv, maxiter=20, v0=start,
                             return_eigenvectors=False)[0])
    except ArpackNoConvergence:
        lowest = -1.0
    if -lowest > second - 1e-3:  # it may be the SLEM: refine it
        lowest = float(_near(w, lowest - 1e-7, k=1)[0])
    return max(second, -lowest, 0.0)


def _near(w, sigma: float, k: int) -> np.ndarray:
    """The ``k`` eigenvalues of ``w`` nearest ``sigma``: shift-invert Lanczos on a sparse LU of ``w - sigma I`` with
    the minimum-degree ordering of ``A^T + A`` (2.6x less fill than scipy's default on a random 4-regular graph)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import LinearOperator, eigsh, splu

    n = w.shape[0]
    lu = splu((w - sigma * sp.identity(n, format="csc")).tocsc(), permc_spec="MMD_AT_PLUS_A")
    inverse = LinearOperator((n, n), matvec=lu.solve, dtype=np.float64)
    return eigsh(w, k=k, sigma=sigma, which="LM", OPinv=inverse, v0=_start_vector(n), return_eigenvectors=False)


def _start_vector(n: int) -> np.ndarray:
    """A fixed pseudo-random Lanczos start (with a component on every eigenvector, the eigenvalue 1's included, which
    the shift-invert at 1 must find): ARPACK's own random start depends on earlier calls in the process, which moved
    the gap's last digits from one build of a graph to the next."""
    return np.random.default_rng(0).standard_normal(n)


# --------------------------------------------------------------------------------------------------
# Graph families
# --------------------------------------------------------------------------------------------------


def _ring(n: int, seed: int) -> nx.Graph:
    return nx.cycle_graph(n)


def _factor_square(n: int) -> tuple[int, int]:
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def _torus(n: int, seed: int, rows: int = 0, cols: int = 0) -> nx.Graph:
    for key, val in (("rows", rows), ("cols", cols)):
        if val < 0:
            raise ConfigError(f"topology.{key}: must be a positive integer (or 0 for automatic), got {val}")
    if rows == 0 and cols == 0:
        rows, cols = _factor_square(n)
    elif rows == 0:
        if n % cols:
            raise ConfigError(f"topology.cols: must divide topology.n = {n}, got {cols}")
        rows = n // cols
    elif cols == 0:
        if n % rows:
            raise ConfigError(f"topology.rows: must divide topology.n = {n}, got {rows}")
        cols = n // rows
    if rows * cols != n:
        raise ConfigError(f"topology.rows: rows * cols must equal topology.n = {n}, "
                          f"got {rows} * {cols} = {rows * cols}")
    g = nx.empty_graph(n)
    idx = np.arange(n).reshape(rows, cols)
    # The wrap-around links; on a side of length 1 or 2 they collapse into self-loops / existing edges.
    right = np.roll(idx, -1, axis=1)
    down = np.roll(idx, -1, axis=0)
    for a, b in ((idx, right), (idx, down)):
        g.add_edges_from((int(x), int(y)) for x, y in zip(a.ravel(), b.ravel()) if x != y)
    return g


def _complete(n: int, seed: int) -> nx.Graph:
    return nx.complete_graph(n)


def _star(n: int, seed: int) -> nx.Graph:
    return nx.star_graph(n - 1)  # node 0 is the hub


def _try_seed(seed: int, t: int) -> int:
    """Seed of draw t of a family redrawn until connected: ``seed`` first, then seeds derived from (seed, t).

    ``seed + t`` made the retries of one seed the first draws of the next: two seeds (or a resample pool's graphs)
    could give the same graph.
    """
    return seed if t == 0 else int(np.random.SeedSequence([seed, t]).generate_state(1)[0])


def _erdos_renyi(n: int, seed: int, p: float = 0.3) -> nx.Graph:
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"topology.p: edge probability must be in (0, 1], got {p}")
    for t in range(MAX_TRIES):
        g = nx.gnp_random_graph(n, p, seed=_try_seed(seed, t))
        if nx.is_connected(g):
            return g
    raise ConfigError(
        f"topology.p: Erdos-Renyi G({n}, {p}) was disconnected in {MAX_TRIES} draws; "
        f"use p above ln(n)/n = {math.log(n) / n:.3g} (e.g. {min(1.0, 2 * math.log(n) / n):.3g})"
    )


def _random_regular(n: int, seed: int, degree: int = 4) -> nx.Graph:
    if not 1 <= degree < n:
        raise ConfigError(f"topology.degree: must satisfy 1 <= degree < topology.n = {n}, got {degree}")
    if (n * degree) % 2:
        raise ConfigError(f"topology.degree: n * degree must be even (n = {n}), got degree {degree}")
    for t in range(MAX_TRIES):
        g = nx.random_regular_graph(degree, n, seed=_try_seed(seed, t))
        if nx.is_connected(g):
            return g
    raise ConfigError(
        f"topology.degree: random {degree}-regular graphs on {n} nodes were disconnected in {MAX_TRIES} draws; "
        "use degree >= 3"
    )


def _small_world(n: int, seed: int, k: int = 4, p: float = 0.1) -> nx.Graph:
    if k < 2 or k % 2 or k >= n:
        raise ConfigError(f"topology.k: ring-lattice degree must be even with 2 <= k < topology.n = {n}, got {k}")
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"topology.p: rewiring probability must be in [0, 1], got {p}")
    try:
        return nx.connected_watts_strogatz_graph(n, k, p, tries=MAX_TRIES, seed=seed)
    except nx.NetworkXError:
        raise ConfigError(
            f"topology.p: Watts-Strogatz({n}, k={k}, p={p}) was disconnected in {MAX_TRIES} draws; lower p or raise k"
        ) from None


def _barabasi_albert(n: int, seed: int, m: int = 2) -> nx.Graph:
    if not 1 <= m < n:
        raise ConfigError(f"topology.m: edges per new node must satisfy 1 <= m < topology.n = {n}, got {m}")
    return nx.barabasi_albert_graph(n, m, seed=seed)


def _exponential(n: int, seed: int) -> nx.Graph:
    g = nx.empty_graph(n)
    hops = [2**k for k in range(int(math.log2(n - 1)) + 1)] if n > 1 else []
    for i in range(n):
        for h in hops:
            j = (i + h) % n
            if j != i:
                g.add_edge(i, j)  # i - 2^k is covered by node i - 2^k's +2^k link
    return g


def _hypercube(n: int, seed: int) -> nx.Graph:
    if n & (n - 1):
        raise ConfigError(f"topology.n: hypercube needs a power of two, got {n}")
    dim = n.bit_length() - 1
    g = nx.empty_graph(n)
    g.add_edges_from((i, i ^ (1 << b)) for i in range(n) for b in range(dim) if i < i ^ (1 << b))
    return g


def _two_cliques(n: int, seed: int) -> nx.Graph:
    # Clique A = 0..h-1, clique B = h..n-1 (sizes n//2 and n - n//2), bridged by the edge (h-1, h).
    h = n // 2
    g = nx.empty_graph(n)
    g.add_edges_from((i, j) for i in range(h) for j in range(i + 1, h))
    g.add_edges_from((i, j) for i in range(h, n) for j in range(i + 1, n))
    g.add_edge(h - 1, h)
    return g


def _hierarchical(n: int, seed: int, cluster_size: int = 8) -> nx.Graph:
    # Clusters of consecutive ids (cluster c = nodes c*s .. c*s+s-1), complete inside; each cluster's first node
    # is its bridge, and the bridges form a complete graph (the inter-cluster layer).
    if not 2 <= cluster_size <= n:
        raise ConfigError(f"topology.cluster_size: must be in [2, n={n}], got {cluster_size}")
    g = nx.empty_graph(n)
    starts = list(range(0, n, cluster_size))
    for a in starts:
        members = range(a, min(n, a + cluster_size))
        g.add_edges_from((i, j) for i in members for j in members if i < j)
    g.add_edges_from((a, b) for a in starts for b in starts if a < b)
    return g


def clusters(topo: "Topology", cluster_size: int) -> np.ndarray:
    """``[N]`` cluster id of every node of a hierarchical topology (consecutive ids, ``cluster_size`` each)."""
    return np.arange(topo.n) // cluster_size


def _edges(n: int, seed: int, edges: list = []) -> nx.Graph:  # noqa: B006 - never mutated
    try:
        arr = np.asarray(edges)
    except (TypeError, ValueError):
        raise ConfigError("topology.edges: must be a list of [u, v] pairs of integer node ids") from None
    if arr.size == 0:
        raise ConfigError("topology.edges: must be a non-empty list of [u, v] node-id pairs")
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError("topology.edges: must be a list of [u, v] pairs of integer node ids")
    if arr.min() < 0 or arr.max() >= n:
        raise ConfigError(f"topology.edges: node ids must lie in 0..topology.n-1 = 0..{n - 1}")
    loops = arr[arr[:, 0] == arr[:, 1]]
    if len(loops):
        raise ConfigError(f"topology.edges: self-loop [{loops[0, 0]}, {loops[0, 1]}] not allowed "
                          "(pairs must be u != v)")
    g = nx.empty_graph(n)
    g.add_edges_from((int(a), int(b)) for a, b in arr)
    return g


#: Registry: kind name -> builder(n, seed, **params) -> networkx graph over 0..n-1.
KINDS: dict[str, Callable[..., nx.Graph]] = {
    "ring": _ring,
    "torus": _torus,
    "complete": _complete,
    "star": _star,
    "erdos_renyi": _erdos_renyi,
    "random_regular": _random_regular,
    "small_world": _small_world,
    "barabasi_albert": _barabasi_albert,
    "exponential": _exponential,
    "hypercube": _hypercube,
    "two_cliques": _two_cliques,
    "hierarchical": _hierarchical,
    "edges": _edges,
}

#: The families drawn at random from ``topology.seed`` (the others ignore it).
RANDOM_KINDS = ("erdos_renyi", "random_regular", "small_world", "barabasi_albert")

#: Whether a family name is registered to jaxdfl's own generator (a user's family may read ``topology.seed``).
shipped = Shipped(KINDS)

#: Family parameters and their defaults (the config keys topology.<name>). torus rows/cols 0 = automatic
#: (the most square factorisation of n).
PARAMS: dict[str, dict[str, Any]] = {
    "ring": {},
    "torus": {"rows": 0, "cols": 0},
    "complete": {},
    "star": {},
    "erdos_renyi": {"p": 0.3},
    "random_regular": {"degree": 4},
    "small_world": {"k": 4, "p": 0.1},
    "barabasi_albert": {"m": 2},
    "exponential": {},
    "hypercube": {},
    "two_cliques": {},
    "hierarchical": {"cluster_size": 8},
    "edges": {"edges": []},
}


def family_params(kind: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of topology family ``kind``: its :data:`PARAMS` defaults updated by those set in ``section``
    (a config's ``[topology]`` table, which lists only the keys a user gave)."""
    return {key: section.get(key, default) for key, default in PARAMS.get(kind, {}).items()}


def _check_param_type(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):  # none today; keeps bool from passing as int below
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        value = int(value) if ok else value
    elif isinstance(default, float):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, (list, tuple, np.ndarray))
    else:
        ok = True
    if not ok:
        raise ConfigError(f"topology.{key}: expected {type(default).__name__}, got {type(value).__name__} {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Public constructors
# --------------------------------------------------------------------------------------------------


def make(kind: str, n: int, *, seed: int = 0, weights: Any = "metropolis", **params: Any) -> Topology:
    """Build a named graph family on n nodes with its mixing weights.

    Kinds and parameters (defaults in PARAMS):
        ring; complete; star (hub 0);
        torus(rows, cols): 2-D grid with wrap-around, rows * cols = n (0 = automatic: the most square
            factorisation, which for prime n is 1 x n, i.e. a ring);
        erdos_renyi(p): G(n, p), redrawn until connected (at most 100 draws; seeds from ``_try_seed``);
        random_regular(degree): uniform random degree-regular graph, n * degree even, degree < n, redrawn until
            connected;
        small_world(k, p): connected Watts-Strogatz, ring lattice of even degree k, rewiring probability p;
        barabasi_albert(m): preferential attachment, m edges per new node;
        exponential: i linked to i +- 2^j mod n, j = 0..floor(log2(n-1)): the undirected (symmetrised) variant of
            Ying et al. 2021's static exponential graph, which sends to i + 2^j only with uniform weights (about
            half the messages per round, and a different spectral gap);
        hypercube: n = 2^d, i linked to i XOR 2^b;
        two_cliques: cliques 0..n//2-1 and n//2..n-1 joined by the bridge (n//2-1, n//2);
        hierarchical(cluster_size): complete clusters of consecutive ids; each cluster's first node is its
            bridge and the bridges form a complete graph (with ``topology.inter_every`` the bridge links are used
            only every that many rounds);
        edges(edges): a user edge list [[u, v], ...] over 0..n-1.

    Args:
        kind: one of KINDS.
        n: number of nodes, >= 2.
        seed: seed for the random families (ignored by the deterministic ones).
        weights: "metropolis" (default), "max_degree", or a user [N, N] matrix (see `mixing_matrix`).
        **params: the family's parameters (PARAMS[kind]); unknown names are rejected.

    Returns:
        Topology of kind `kind`.

    Raises:
        ConfigError naming the offending topology.<key> for any invalid setting or a disconnected graph.

    References:
        Erdos & Renyi 1959; Watts & Strogatz, Nature 1998; Barabasi & Albert, Science 1999;
        Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep Training", NeurIPS 2021.
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(f"topology.kind: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if not isinstance(n, numbers.Integral) or isinstance(n, bool):
        raise ConfigError(f"topology.n: expected an integer >= 2, got {n!r}")
    n = int(n)
    if n < 2:
        raise ConfigError(f"topology.n: must be >= 2, got {n}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError(f"topology.seed: expected an integer in [0, 2^32), got {seed!r}")
    allowed = PARAMS.get(kind, {})  # a user family without parameters needs no PARAMS entry
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        names = ", ".join(f"topology.{k}" for k in allowed) or "none"
        raise ConfigError(f"topology.{unknown[0]}: unknown parameter for kind {kind!r}; allowed: {names}")
    resolved = {k: _check_param_type(k, params.get(k, d), d) for k, d in allowed.items()}
    graph = KINDS[kind](n, int(seed), **resolved)
    key = {"erdos_renyi": "p", "small_world": "p", "random_regular": "degree", "edges": "edges"}.get(kind, "kind")
    return _build(graph, kind, weights, key)


def from_networkx(graph: nx.Graph, weights: Any = "metropolis") -> Topology:
    """Wrap a user networkx graph: nodes relabelled 0..N-1 in sorted order, then mixing weights as in `make`.

    Self-loops are dropped (the diagonal of W is set by the weight scheme) and multigraphs are collapsed;
    edge attributes are ignored. Node labels that cannot be compared are ordered by their repr.

    Args:
        graph: undirected, connected networkx graph with >= 2 nodes.
        weights: "metropolis" (default), "max_degree", or a user [N, N] matrix in the relabelled order.

    Returns:
        Topology of kind "networkx".

    Raises:
        ConfigError naming topology.graph (directed, too small, disconnected) or topology.weights.
    """
    if not isinstance(graph, nx.Graph):
        raise ConfigError(f"topology.graph: expected a networkx graph, got {type(graph).__name__}")
    if graph.is_directed():
        raise ConfigError("topology.graph: must be undirected (gossip needs symmetric links)")
    if graph.number_of_nodes() < 2:
        raise ConfigError(f"topology.graph: needs >= 2 nodes, got {graph.number_of_nodes()}")
    try:
        order = sorted(graph.nodes)
    except TypeError:
        order = sorted(graph.nodes, key=repr)
    index = {node: i for i, node in enumerate(order)}
    g = nx.empty_graph(len(order))
    g.add_edges_from((index[a], index[b]) for a, b in graph.edges() if a != b)
    return _build(g, "networkx", weights, "graph")


def _build(graph: nx.Graph, kind: str, weights: Any, key: str) -> Topology:
    n = graph.number_of_nodes()
    if not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise ConfigError(f"topology.{key}: graph is disconnected ({parts} components); gossip needs a connected graph")
    W = sparse_mixing_matrix(graph, weights)
    deg = _degrees(graph, n)
    K = int(deg.max()) + 1
    neighbors = np.repeat(np.arange(n, dtype=np.int32)[:, None], K, axis=1)
    mask = np.zeros((n, K), bool)
    mask[:, 0] = True
    for i in range(n):
        nb = sorted(graph.adj[i])
        neighbors[i, 1 : 1 + len(nb)] = nb
        mask[i, 1 : 1 + len(nb)] = True
    entries = np.asarray(W[np.repeat(np.arange(n), K), neighbors.ravel()]).reshape(n, K)
    w = np.where(mask, entries, 0.0).astype(np.float32)
    arrays = dict(neighbors=neighbors, mask=mask, weights=w, degrees=deg.astype(np.int32))
    for a in arrays.values():
        a.setflags(write=False)
    return Topology(n=n, kind=kind, graph=graph, sparse_mixing=W, spectral_gap=spectral_gap(W), **arrays)


# --------------------------------------------------------------------------------------------------
# Analytics
# --------------------------------------------------------------------------------------------------


def _diameter(topo: Topology) -> int:
    """Hop diameter by breadth-first search from every node (scipy's C BFS, sources in chunks to bound memory)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import shortest_path

    n, e = topo.n, topo.edges
    if len(e) == n * (n - 1) // 2:
        return 1
    adj = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    best = 0.0
    for start in range(0, n, 256):
        hops = shortest_path(adj, directed=False, unweighted=True, indices=np.arange(start, min(n, start + 256)))
        best = max(best, float(hops.max()))
    return int(best)


def describe(topo: Topology) -> dict[str, Any]:
    """Summary statistics of a topology and the consensus rate its gossip promises.

    Definitions:
        slem = 1 - spectral_gap, the second largest eigenvalue modulus of W;
        consensus_rate = slem^2: per gossip round, the mean squared disagreement
            (1/N) sum_i ||x_i - xbar||^2 (the consensus distance) shrinks by at least this factor;
        rounds_to_100x = ceil(ln(100) / -ln(consensus_rate)): gossip rounds for that bound to shrink the
            consensus distance 100-fold (1 if slem = 0, inf if slem = 1).

    Args:
        topo: a Topology.

    Returns:
        dict with n, kind, edges, degree_min, degree_mean, degree_max, diameter, spectral_gap, slem,
        consensus_rate, rounds_to_100x (Python scalars).

    References:
        Xiao & Boyd, "Fast linear iterations for distributed averaging", 2004 (rate = slem per round in norm).
    """
    deg = topo.degrees
    slem = 1.0 - topo.spectral_gap
    rate = slem**2
    if rate == 0.0:
        rounds: float | int = 1
    elif rate >= 1.0:
        rounds = math.inf
    else:
        rounds = max(1, math.ceil(math.log(100.0) / -math.log(rate) - 1e-9))
    return {
        "n": topo.n,
        "kind": topo.kind,
        "edges": topo.num_edges,
        "degree_min": int(deg.min()),
        "degree_mean": float(deg.mean()),
        "degree_max": int(deg.max()),
        "diameter": _diameter(topo),
        "spectral_gap": float(topo.spectral_gap),
        "slem": float(slem),
        "consensus_rate": float(rate),
        "rounds_to_100x": rounds,
    }


def plot(topo: Topology, path, byzantine: np.ndarray | None = None) -> None:
    """Draw the graph to a PNG (spring layout; Byzantine nodes in red when a node mask is given)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxdfl.results import save_figure

    pos = nx.circular_layout(topo.graph) if topo.kind in ("ring", "exponential") else \
        nx.spring_layout(topo.graph, seed=0)
    colors = ["tab:blue"] * topo.n
    if byzantine is not None:
        colors = ["tab:red" if b else "tab:blue" for b in byzantine]
    fig, ax = plt.subplots(figsize=(6, 6))
    nx.draw_networkx(topo.graph, pos, ax=ax, node_color=colors, node_size=max(20, 300 - 2 * topo.n),
                     with_labels=topo.n <= 40, font_size=7, edge_color="0.6")
    title = f"{topo.kind}, n={topo.n}, spectral gap {topo.spectral_gap:.4f}"
    if byzantine is not None:
        title += f", {int(np.sum(byzantine))} Byzantine (red)"
    ax.set_title(title)
    ax.axis("off")
    save_figure(path, fig, tight_layout=False, dpi=100, bbox_inches="tight")

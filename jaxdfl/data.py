"""Datasets and their partition across nodes (host side).

A dataset is loaded once on the host as numpy arrays, split into per-node shards and stacked on a leading node
axis: ``x: [N, M, ...]``, ``y: [N, M]`` with ``sizes: [N]`` valid rows per node (shards are padded to the largest
size ``M`` by repeating the node's own rows, so a padded row is never an out-of-range read). Minibatches are sampled
inside the compiled program from ``range(sizes[i])`` of each node's own shard.

Preprocessing (identical for every node): digits pixels are scaled from 0..16 to [0, 1]; synthetic features are
used as generated; file-backed datasets (mnist, fashion_mnist, emnist_*, cifar10, cifar100, npz) and mnist1d are
read and normalised by :mod:`jaxdfl.datasets` (uint8 pixels / 255, images ``[S, H, W, C]``).

Partitions combine a label skew (``iid``, ``dirichlet``, ``shards``) with an optional quantity skew (``none``,
``dirichlet``, ``power``) of the node sizes; :func:`partition_report` and :func:`plot_partition` describe the
result.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from jaxdfl import datasets
from jaxdfl.errors import ConfigError
from jaxdfl.registry import Shipped


@dataclass(frozen=True)
class Dataset:
    """A train/test split held on the host. ``x_*: [S, ...]`` float32, ``y_*: [S]`` int32.

    ``groups`` (optional, ``[S_train]`` int) assigns each training example to a natural client (FedProx Synthetic);
    partitioning then follows the groups instead of drawing a partition.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    groups: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class Shards:
    """Per-node shards stacked on the node axis. ``x: [N, M, ...]``, ``y: [N, M]``, ``sizes: [N]``."""

    x: np.ndarray
    y: np.ndarray
    sizes: np.ndarray

    @property
    def n(self) -> int:
        return int(self.sizes.shape[0])

    def label_histogram(self, num_classes: int) -> np.ndarray:
        """``[N, C]`` counts of each label among each node's valid rows."""
        valid = np.arange(self.y.shape[1])[None, :] < self.sizes[:, None]
        return np.stack([np.bincount(self.y[i][valid[i]], minlength=num_classes) for i in range(self.n)])


# --------------------------------------------------------------------------------------------- datasets


def _split(x, y, test_fraction, seed):
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, Real) or not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be a number in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ``images [1797, 8, 8]`` (values 0..16) and ``target [1797]``.

    Read straight from the package's ``datasets/data/digits.csv.gz`` (64 pixels and the label per row, as
    ``sklearn.datasets.load_digits`` reads it), because importing scikit-learn takes about 2.5 s, more than
    the quickstart's whole run; falls back to ``load_digits`` where that file is not found.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return bunch.images, bunch.target


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; offline), pixels scaled to [0, 1].

    Returns images of shape ``[8, 8, 1]``.
    """
    images, target = digits_arrays()
    x = (images.astype(np.float32) / 16.0)[..., None]
    y = target.astype(np.int32)
    return Dataset("digits", *_split(x, y, test_fraction, seed), num_classes=10)


def synthetic_fedprox(n_nodes: int, alpha: float = 1.0, beta: float = 1.0, seed: int = 0,
                      test_fraction: float = 0.2, samples: int = 0) -> Dataset:
    """FedProx Synthetic(alpha, beta) with one natural client per node.

    Per node k: u_k ~ N(0, alpha), B_k ~ N(0, beta) (alpha, beta used as standard deviations as in the reference
    generator); W_k [10, 60], b_k [10] ~ N(u_k, 1); v_k [60] elementwise ~ N(B_k, 1); x ~ N(v_k, Sigma) with
    Sigma_jj = j^-1.2; y = argmax(softmax(W_k x + b_k)). Node sizes are lognormal(4, 2) + 50 (power law) capped at
    5000 (so the padded ``[N, M]`` shards stay small; about 1% of nodes hit the cap), or ``samples`` each when
    ``samples > 0``. A ``test_fraction`` of every node's samples forms the pooled test set, shuffled so that any
    prefix of it (``eval_samples``) mixes all clients.

    References: Li et al., "Federated Optimization in Heterogeneous Networks" (FedProx), MLSys 2020.
    """
    rng = np.random.default_rng(seed)
    dim, classes = 60, 10
    if samples > 0:
        sizes = np.full(n_nodes, samples, dtype=np.int64)
    else:
        sizes = (rng.lognormal(4, 2, n_nodes).astype(np.int64) + 50).clip(max=5000)
    sigma = np.arange(1, dim + 1, dtype=np.float64) ** -1.2
    xs_tr, ys_tr, xs_te, ys_te, groups = [], [], [], [], []
    for k in range(n_nodes):
        u, b_mean = rng.normal(0, alpha), rng.normal(0, beta)
        w = rng.normal(u, 1, (classes, dim))
        b = rng.normal(u, 1, classes)
        v = rng.normal(b_mean, 1, dim)
        x = rng.normal(v, np.sqrt(sigma), (sizes[k], dim))
        y = np.argmax(x @ w.T + b, axis=1)
        n_test = max(1, int(round(sizes[k] * test_fraction)))
        if n_test >= sizes[k]:
            raise ConfigError(f"data.test_fraction={test_fraction} leaves node {k} none of its {sizes[k]} synthetic "
                              "examples to train on; lower it (or set data.synthetic_samples)")
        xs_te.append(x[:n_test])
        ys_te.append(y[:n_test])
        xs_tr.append(x[n_test:])
        ys_tr.append(y[n_test:])
        groups.append(np.full(sizes[k] - n_test, k))
    cat = np.concatenate
    order = rng.permutation(sum(len(t) for t in ys_te))
    return Dataset("synthetic", cat(xs_tr).astype(np.float32), cat(ys_tr).astype(np.int32),
                   cat(xs_te)[order].astype(np.float32), cat(ys_te)[order].astype(np.int32), classes,
                   groups=cat(groups))


def _from_split(name: str, split) -> Dataset:
    return Dataset(name, split.x_train, split.y_train, split.x_test, split.y_test, split.num_classes)


def _file_loader(name: str, read: Callable) -> Callable[..., Dataset]:
    """A DATASETS entry that reads local files from ``data.path`` (``test_fraction`` unused: official splits)."""
    return lambda n_nodes, **kw: _from_split(name, read(kw.get("path", "")))


#: Dataset loaders by config name: ``loader(n_nodes=..., test_fraction=..., seed=..., **data_section) -> Dataset``.
#: File-backed datasets read ``data.path`` (see :mod:`jaxdfl.datasets` for formats and normalisation).
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": lambda n_nodes, **kw: load_digits(test_fraction=kw["test_fraction"], seed=kw["seed"]),
    "synthetic": lambda n_nodes, **kw: synthetic_fedprox(
        n_nodes, alpha=kw["synthetic_alpha"], beta=kw["synthetic_beta"], seed=kw["seed"],
        test_fraction=kw["test_fraction"], samples=kw["synthetic_samples"]),
    "mnist": _file_loader("mnist", lambda p: datasets.load_mnist(p, "mnist")),
    "fashion_mnist": _file_loader("fashion_mnist", lambda p: datasets.load_mnist(p, "fashion_mnist")),
    **{f"emnist_{s}": _file_loader(f"emnist_{s}", lambda p, s=s: datasets.load_emnist(p, s))
       for s in datasets.EMNIST_SPLITS},
    "cifar10": _file_loader("cifar10", lambda p: datasets.load_cifar(p, 10)),
    "cifar100": _file_loader("cifar100", lambda p: datasets.load_cifar(p, 100)),
    "npz": _file_loader("npz", datasets.load_npz),
    "mnist1d": lambda n_nodes, **kw: _from_split("mnist1d", datasets.make_mnist1d(
        samples=kw.get("mnist1d_samples", 5000), seed=kw.get("mnist1d_seed", 42),
        test_fraction=kw.get("test_fraction", 0.2))),
}


#: Datasets whose test set is a ``data.test_fraction`` split made here (the others come with their official split).
SPLIT_BY_FRACTION = ("digits", "synthetic", "mnist1d")

#: Whether a dataset name is registered to jaxdfl's own loader (a user's loader may read ``data.test_fraction``).
shipped = Shipped(DATASETS)


def load(cfg_data, n_nodes: int) -> Dataset:
    """Load the dataset named by a ``[data]`` config section."""
    kw = dict(cfg_data)
    name = kw.pop("name")
    if name not in DATASETS:
        raise ConfigError(f"data.name must be one of {', '.join(DATASETS)}; got {name!r}")
    ds = DATASETS[name](n_nodes=n_nodes, **kw)
    for part, y in (("train", ds.y_train), ("test", ds.y_test)):
        if len(y) and (y.min() < 0 or y.max() >= ds.num_classes):  # a label the model cannot output: NaN loss
            raise ConfigError(f"data.name={name!r}: y_{part} labels must lie in [0, num_classes = {ds.num_classes}),"
                              f" got {int(y.min())} to {int(y.max())}")
    if name in SPLIT_BY_FRACTION and (len(ds.y_test) == 0 or len(ds.y_train) == 0):
        raise ConfigError(f"data.test_fraction={kw['test_fraction']} leaves {len(ds.y_train)} training and "
                          f"{len(ds.y_test)} test examples of {name}: both need at least one")
    return ds


# --------------------------------------------------------------------------------------------- partitions

#: Quantity-skew families for node sizes (``data.quantity_skew``).
QUANTITY_SKEWS = ("none", "dirichlet", "power")


def quantity_shares(rng: np.random.Generator, n: int, kind: str = "none", alpha: float = 1.0) -> np.ndarray | None:
    """Target share of the training set for each node, or None without quantity skew.

    Definitions:
      dirichlet: q ~ Dir(alpha * 1_n) (small alpha -> a few large nodes; Li et al. 2022's quantity skew).
      power:     q_k proportional to r_k^-alpha, r a random permutation of 1..n (Zipf's law: the largest node holds
                 n^alpha times the smallest; alpha = 0 is uniform).

    Args:
      rng: numpy generator.
      n: number of nodes.
      kind: one of :data:`QUANTITY_SKEWS`.
      alpha: concentration (dirichlet) or exponent (power), > 0.

    Returns:
      ``[n]`` float64 summing to 1, or None for ``"none"``.

    References:
      Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study", ICDE 2022.
    """
    if kind not in QUANTITY_SKEWS:
        raise ConfigError(f"data.quantity_skew must be one of {', '.join(QUANTITY_SKEWS)}; got {kind!r}")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"data.quantity_alpha must be > 0, got {alpha!r}")
    if kind == "none":
        return None
    if kind == "dirichlet":
        q = rng.dirichlet(np.full(n, float(alpha)))
    else:
        q = (rng.permutation(n) + 1.0) ** -float(alpha)
    q = np.nan_to_num(q, nan=0.0)
    return q / q.sum() if q.sum() > 0 else np.full(n, 1.0 / n)


def apportion(total: int, shares: np.ndarray, minimum: int = 1) -> np.ndarray:
    """Integer sizes ``[N]`` summing to ``total``, each ``>= minimum``, the rest split by largest remainders.

    Definition: s_k = minimum + floor(e_k) (+1 for the largest fractional parts), e = shares * (total - N minimum).
    """
    n = len(shares)
    spare = total - n * minimum
    if spare < 0:
        raise ConfigError(f"topology.n={n} nodes x at least {minimum} examples exceeds the {total} available")
    ideal = np.asarray(shares, np.float64) / np.sum(shares) * spare
    base = np.floor(ideal).astype(np.int64)
    order = np.argsort(-(ideal - base), kind="stable")
    base[order[: spare - int(base.sum())]] += 1
    return base + minimum


def partition_iid(y: np.ndarray, n: int, rng: np.random.Generator, shares: np.ndarray | None = None,
                  min_size: int = 1) -> list[np.ndarray]:
    """Shuffle and deal the examples into ``n`` shards: near-equal sizes, or sizes apportioned by ``shares``."""
    perm = rng.permutation(len(y))
    if shares is None:
        return np.array_split(perm, n)
    sizes = apportion(len(y), shares, min_size)
    return np.split(perm, np.cumsum(sizes)[:-1])


def partition_dirichlet(y: np.ndarray, n: int, rng: np.random.Generator, alpha: float = 0.5,
                        min_size: int = 1, shares: np.ndarray | None = None) -> list[np.ndarray]:
    """Label skew by Dirichlet draws (small alpha -> few classes per node).

    Without ``shares`` (Yurochkin et al. 2019; NIID-Bench, Li et al. 2022): for every class c, proportions
    p_c ~ Dir(alpha * 1_n) over nodes split that class's examples; re-drawn (bounded) until every node has at least
    ``min_size`` examples. Node sizes vary with alpha too (2-105 examples at alpha = 0.1 over 32 digits nodes). Hsu
    et al. 2019 instead draw each client's label mix q ~ Dir(alpha p) at equal sizes; the branch below (with
    shares, so only with a quantity skew) draws it as Dir(alpha C p), so its ``alpha`` is Hsu's divided by C.

    With ``shares`` (quantity skew; Acar et al. 2021): node sizes s = apportion(S, shares, min_size) are fixed
    first; node k draws a label prior pi_k ~ Dir(alpha * C * p), p the pooled label frequencies (Dir(alpha * 1_C)
    on balanced data), and fills its s_k slots by multinomial draws from pi_k restricted to the classes not yet
    exhausted (nodes in random order). Sizes are exact, so no re-draws are needed.

    References:
      Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural Networks", ICML 2019.
      Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study", ICDE 2022.
      Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution", 2019.
      Acar et al., "Federated Learning Based on Dynamic Regularization" (FedDyn), ICLR 2021.
    """
    classes = np.unique(y)
    if shares is not None:
        return _dirichlet_fixed_sizes(y, classes, apportion(len(y), shares, min_size), rng, alpha)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha))) * len(idx)).astype(int)[:-1]
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"data.alpha={alpha} leaves some node with fewer than {min_size} examples after 100 draws; "
                      f"raise data.alpha or lower topology.n")


def _dirichlet_fixed_sizes(y, classes, sizes, rng, alpha) -> list[np.ndarray]:
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    left = np.array([len(p) for p in pools], dtype=np.int64)
    pooled = left / left.sum()
    takes = np.zeros((len(sizes), len(classes)), dtype=np.int64)
    for k in rng.permutation(len(sizes)):
        prior = rng.dirichlet(alpha * len(classes) * pooled)
        need = int(sizes[k])
        while need > 0:
            avail = left - takes[k]
            w = np.where(avail > 0, prior, 0.0)
            if w.sum() <= 0:  # the prior's mass sits on exhausted classes: fall back to what is left
                w = avail.astype(np.float64)
            draw = np.minimum(rng.multinomial(need, w / w.sum()), avail)
            takes[k] += draw
            need -= int(draw.sum())
        left -= takes[k]
    starts = np.zeros(len(classes), dtype=np.int64)
    parts = []
    for k in range(len(sizes)):
        chunks = [pools[c][starts[c]: starts[c] + takes[k, c]] for c in range(len(classes))]
        starts += takes[k]
        parts.append(rng.permutation(np.concatenate(chunks)))
    return parts


def partition_shards(y: np.ndarray, n: int, rng: np.random.Generator, shards_per_node: int = 2,
                     shares: np.ndarray | None = None) -> list[np.ndarray]:
    """Pathological non-IID: sort by label, cut into ``n * shards_per_node`` shards, deal ``shards_per_node`` each.

    With ``shares`` (quantity skew) node k receives apportion(n * shards_per_node, shares, 1)_k shards instead.

    References: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017.
    """
    n_shards = n * shards_per_node
    if n_shards > len(y):
        raise ConfigError(f"data.shards_per_node={shards_per_node} x topology.n={n} exceeds the {len(y)} examples")
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, n_shards)
    if shares is None:
        deal = rng.permutation(n_shards).reshape(n, shards_per_node)
    else:
        deal = np.split(rng.permutation(n_shards), np.cumsum(apportion(n_shards, shares, 1))[:-1])
    return [np.concatenate([shards[s] for s in row]) for row in deal]


#: Label-skew partitions by config name: ``fn(y, n, rng, **settings) -> [n] index arrays``, given the settings it
#: names among ``alpha``, ``shards_per_node``, ``min_size``, ``shares`` (all of them if it takes ``**kwargs``).
PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": partition_iid,
    "dirichlet": partition_dirichlet,
    "shards": partition_shards,
}


def _taken_by(fn: Callable, options: dict) -> dict:
    """The entries of ``options`` that ``fn`` has parameters for (all of them if it takes ``**kwargs``): each
    partition takes its own settings, and a misspelled keyword in a direct call is Python's TypeError."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def stack_shards(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> Shards:
    """Stack index lists into padded ``[N, M, ...]`` arrays (padding repeats the node's own rows cyclically)."""
    sizes = np.array([len(p) for p in parts], dtype=np.int32)
    if sizes.min() < 1:
        raise ConfigError("some node received no training examples; lower topology.n or change data.partition")
    m = int(sizes.max())
    idx = np.stack([np.resize(p, m) for p in parts])
    return Shards(x=x[idx], y=y[idx].astype(np.int32), sizes=sizes)


def partition(ds: Dataset, n: int, kind: str = "iid", seed: int = 0, alpha: float = 0.5,
              shards_per_node: int = 2, min_size: int = 1, quantity_skew: str = "none",
              quantity_alpha: float = 1.0) -> Shards:
    """Split ``ds``'s training set over ``n`` nodes: label skew ``kind`` with an optional quantity skew.

    Natural groups (synthetic) override ``kind``; they already have power-law sizes, so a quantity skew is refused.
    Note the stacked shards hold ``n * max(size)`` rows: a strong quantity skew costs memory (see
    :func:`partition_report`'s ``padding_fraction``).

    Args:
      ds: the dataset.
      n: number of nodes.
      kind: label skew, one of :data:`PARTITIONS` (``data.partition``).
      seed: partition seed (``data.seed``).
      alpha: Dirichlet label-skew concentration (``data.alpha``).
      shards_per_node: shards per node for ``"shards"`` (``data.shards_per_node``).
      min_size: smallest allowed node size.
      quantity_skew: one of :data:`QUANTITY_SKEWS` (``data.quantity_skew``).
      quantity_alpha: its parameter, see :func:`quantity_shares` (``data.quantity_alpha``).

    Returns:
      :class:`Shards` with ``x: [n, M, ...]``, ``y: [n, M]``, ``sizes: [n]``.
    """
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ConfigError(f"topology.n must be an integer >= 1, got {n!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0 < alpha < math.inf:
        raise ConfigError(f"data.alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(shards_per_node, bool) or not isinstance(shards_per_node, Integral) or shards_per_node < 1:
        raise ConfigError(f"data.shards_per_node must be an integer >= 1, got {shards_per_node!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**32:
        raise ConfigError(f"data.seed must be an integer in [0, 2^32), got {seed!r}")
    if ds.groups is not None:
        if kind != "iid":
            raise ConfigError(f"data.partition={kind!r} does not apply to {ds.name}, whose natural clients are the "
                              f"nodes; use \"iid\"")
        if quantity_skew != "none":
            raise ConfigError(f"data.quantity_skew={quantity_skew!r} does not apply to {ds.name}, whose natural "
                              f"clients already have their own sizes; use \"none\"")
        groups = np.unique(ds.groups)
        if len(groups) != n or not np.array_equal(groups, np.arange(n)):  # more would be dropped, fewer left empty
            raise ConfigError(f"topology.n={n}: {ds.name}'s training examples belong to {len(groups)} natural "
                              f"clients (groups {int(groups.min())}..{int(groups.max())}), one per node; set "
                              f"topology.n = {len(groups)} and number them 0..{len(groups) - 1}")
        order = np.argsort(ds.groups, kind="stable")  # each group's examples in file order, in O(S log S)
        parts = np.split(order, np.cumsum(np.bincount(ds.groups, minlength=n))[:-1])
    else:
        if kind not in PARTITIONS:
            raise ConfigError(f"data.partition must be one of {', '.join(PARTITIONS)}; got {kind!r}")
        if n > len(ds.y_train):
            raise ConfigError(f"topology.n={n} exceeds the {len(ds.y_train)} training examples of {ds.name}")
        rng = np.random.default_rng(seed)
        shares = quantity_shares(rng, n, quantity_skew, quantity_alpha)
        options = {"alpha": alpha, "shards_per_node": shards_per_node, "min_size": min_size, "shares": shares}
        parts = PARTITIONS[kind](ds.y_train, n, rng, **_taken_by(PARTITIONS[kind], options))
    return stack_shards(ds.x_train, ds.y_train, parts)


# --------------------------------------------------------------------------------------------- partition report


def partition_report(shards: Shards, num_classes: int) -> dict:
    """Describe a partition's heterogeneity: node sizes, label histograms and summary statistics.

    Definitions (s: [N] node sizes, h: [N, C] label counts, p_k = h_k / s_k, p = sum_k h_k / sum_k s_k):
      size_cv    = std(s) / mean(s)
      size_gini  = sum_ij |s_i - s_j| / (2 N^2 mean(s))            (0 = equal sizes)
      label_tv_k = 0.5 * sum_c |p_kc - p_c|                        (total variation to the pooled labels)
      classes_per_node_k = #{c : h_kc > 0}
      padding_fraction   = 1 - sum(s) / (N max(s))                 (share of the stacked rows that are padding)

    Args:
      shards: the stacked per-node shards.
      num_classes: C.

    Returns:
      A JSON-ready dict: ``nodes, num_classes, samples, sizes [N], size_min, size_max, size_mean, size_std,
      size_cv, size_gini, label_histogram [N][C], classes_per_node [N], classes_per_node_mean, label_tv [N],
      label_tv_mean, label_tv_max, padding_fraction``.
    """
    sizes = np.asarray(shards.sizes, np.int64)
    hist = shards.label_histogram(num_classes).astype(np.int64)
    n = len(sizes)
    mean = float(sizes.mean())
    gini = float(np.abs(sizes[:, None] - sizes[None, :]).sum() / (2 * n * n * mean))
    pooled = hist.sum(0) / hist.sum()
    tv = 0.5 * np.abs(hist / sizes[:, None] - pooled[None, :]).sum(1)
    present = (hist > 0).sum(1)
    return {
        "nodes": n,
        "num_classes": int(num_classes),
        "samples": int(sizes.sum()),
        "sizes": sizes.tolist(),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_mean": mean,
        "size_std": float(sizes.std()),
        "size_cv": float(sizes.std() / mean),
        "size_gini": gini,
        "label_histogram": hist.tolist(),
        "classes_per_node": present.tolist(),
        "classes_per_node_mean": float(present.mean()),
        "label_tv": tv.tolist(),
        "label_tv_mean": float(tv.mean()),
        "label_tv_max": float(tv.max()),
        "padding_fraction": float(1.0 - sizes.sum() / (n * sizes.max())),
    }


def format_partition_report(report: dict) -> str:
    """A few human-readable lines summarising :func:`partition_report`'s dict."""
    r = report
    return "\n".join([
        f"{r['nodes']} nodes, {r['samples']} training examples, {r['num_classes']} classes",
        f"node sizes: min {r['size_min']}, mean {r['size_mean']:.1f}, max {r['size_max']} "
        f"(cv {r['size_cv']:.3f}, gini {r['size_gini']:.3f}; padding {100 * r['padding_fraction']:.1f}% of rows)",
        f"classes per node: mean {r['classes_per_node_mean']:.2f}, min {min(r['classes_per_node'])}, "
        f"max {max(r['classes_per_node'])}",
        f"label skew (total variation to pooled labels): mean {r['label_tv_mean']:.3f}, max {r['label_tv_max']:.3f}",
    ])


def plot_partition(path, shards: Shards, num_classes: int, title: str = "") -> None:
    """Write a PNG of the partition: node sizes (bars) above a node x class heat-map of each node's label shares.

    Written atomically (temporary file, then rename) via :func:`jaxdfl.results.save_figure`.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxdfl.results import save_figure

    report = partition_report(shards, num_classes)
    hist = np.asarray(report["label_histogram"])
    n = report["nodes"]
    width = float(np.clip(0.12 * n + 2.5, 5, 16))
    fig, (ax_s, ax_h) = plt.subplots(2, 1, figsize=(width, 5.5), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 2]}, constrained_layout=True)
    ax_s.bar(np.arange(n), report["sizes"], width=0.9, color="tab:blue")
    ax_s.set_ylabel("examples")
    ax_s.set_title(title or f"{n} nodes: sizes {report['size_min']}..{report['size_max']}, "
                   f"{report['classes_per_node_mean']:.1f} classes/node, label TV {report['label_tv_mean']:.2f}")
    ax_s.grid(axis="y", alpha=0.3)
    # each node's label shares, not counts: the bars already show size, and counts would hide small nodes' skew
    share = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    im = ax_h.imshow(share.T, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower",
                     vmin=0.0, vmax=1.0, extent=(-0.5, n - 0.5, -0.5, num_classes - 0.5))
    ax_h.set_xlabel("node")
    ax_h.set_ylabel("class")
    fig.colorbar(im, ax=ax_h, label="share of the node's examples", shrink=0.9)
    save_figure(path, fig, tight_layout=False)

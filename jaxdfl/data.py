"""Datasets and their partition across nodes (host side).

A dataset is loaded once on the host as numpy arrays, split into per-node shards and stacked on a leading node
axis: ``x: [N, M, ...]``, ``y: [N, M]`` with ``sizes: [N]`` valid rows per node (shards are padded to the largest
size ``M`` by repeating the node's own rows, so a padded row is never an out-of-range read). Minibatches are sampled
inside the compiled program from ``range(sizes[i])`` of each node's own shard.

Preprocessing (identical for every node): digits pixels are scaled from 0..16 to [0, 1]; synthetic features are
used as generated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jaxdfl.errors import ConfigError


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
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def load_digits(test_fraction: float = 0.2, seed: int = 0, **_) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; offline), pixels scaled to [0, 1].

    Returns images of shape ``[8, 8, 1]``.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    return Dataset("digits", *_split(x, y, test_fraction, seed), num_classes=10)


def synthetic_fedprox(n_nodes: int, alpha: float = 1.0, beta: float = 1.0, seed: int = 0,
                      test_fraction: float = 0.2, samples: int = 0, **_) -> Dataset:
    """FedProx Synthetic(alpha, beta) with one natural client per node.

    Per node k: u_k ~ N(0, alpha), B_k ~ N(0, beta) (alpha, beta used as standard deviations as in the reference
    generator); W_k [10, 60], b_k [10] ~ N(u_k, 1); v_k [60] elementwise ~ N(B_k, 1); x ~ N(v_k, Sigma) with
    Sigma_jj = j^-1.2; y = argmax(softmax(W_k x + b_k)). Node sizes are lognormal(4, 2) + 50 (power law), or
    ``samples`` each when ``samples > 0``. A ``test_fraction`` of every node's samples forms the pooled test set.

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
        xs_te.append(x[:n_test])
        ys_te.append(y[:n_test])
        xs_tr.append(x[n_test:])
        ys_tr.append(y[n_test:])
        groups.append(np.full(sizes[k] - n_test, k))
    cat = np.concatenate
    return Dataset("synthetic", cat(xs_tr).astype(np.float32), cat(ys_tr).astype(np.int32),
                   cat(xs_te).astype(np.float32), cat(ys_te).astype(np.int32), classes, groups=cat(groups))


#: Dataset loaders by config name: ``loader(n_nodes=..., test_fraction=..., seed=..., **data_section) -> Dataset``.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": lambda n_nodes, **kw: load_digits(**kw),
    "synthetic": lambda n_nodes, **kw: synthetic_fedprox(
        n_nodes, alpha=kw["synthetic_alpha"], beta=kw["synthetic_beta"], seed=kw["seed"],
        test_fraction=kw["test_fraction"], samples=kw["synthetic_samples"]),
}


def load(cfg_data, n_nodes: int) -> Dataset:
    """Load the dataset named by a ``[data]`` config section."""
    kw = dict(cfg_data)
    name = kw.pop("name")
    if name not in DATASETS:
        raise ConfigError(f"data.name must be one of {', '.join(DATASETS)}; got {name!r}")
    return DATASETS[name](n_nodes=n_nodes, **kw)


# --------------------------------------------------------------------------------------------- partitions


def partition_iid(y: np.ndarray, n: int, rng: np.random.Generator, **_) -> list[np.ndarray]:
    """Shuffle and deal the examples into ``n`` shards of near-equal size."""
    return np.array_split(rng.permutation(len(y)), n)


def partition_dirichlet(y: np.ndarray, n: int, rng: np.random.Generator, alpha: float = 0.5,
                        min_size: int = 1, **_) -> list[np.ndarray]:
    """Label skew: for every class c, proportions p_c ~ Dir(alpha * 1_n) over nodes split that class's examples.

    Re-drawn (bounded) until every node has at least ``min_size`` examples. Small alpha -> few classes per node.

    References: Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution", 2019.
    """
    classes = np.unique(y)
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
                      f"raise data.alpha or lower topology.n / train.batch_size")


def partition_shards(y: np.ndarray, n: int, rng: np.random.Generator, shards_per_node: int = 2,
                     **_) -> list[np.ndarray]:
    """Pathological non-IID: sort by label, cut into ``n * shards_per_node`` shards, deal ``shards_per_node`` each.

    References: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017.
    """
    n_shards = n * shards_per_node
    if n_shards > len(y):
        raise ConfigError(f"data.shards_per_node={shards_per_node} x topology.n={n} exceeds the {len(y)} examples")
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(n, shards_per_node)
    return [np.concatenate([shards[s] for s in row]) for row in deal]


PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": partition_iid,
    "dirichlet": partition_dirichlet,
    "shards": partition_shards,
}


def stack_shards(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> Shards:
    """Stack index lists into padded ``[N, M, ...]`` arrays (padding repeats the node's own rows cyclically)."""
    sizes = np.array([len(p) for p in parts], dtype=np.int32)
    if sizes.min() < 1:
        raise ConfigError("some node received no training examples; lower topology.n or change data.partition")
    m = int(sizes.max())
    idx = np.stack([np.resize(p, m) for p in parts])
    return Shards(x=x[idx], y=y[idx].astype(np.int32), sizes=sizes)


def partition(ds: Dataset, n: int, kind: str = "iid", seed: int = 0, alpha: float = 0.5,
              shards_per_node: int = 2, min_size: int = 1) -> Shards:
    """Split ``ds``'s training set over ``n`` nodes. Natural groups (synthetic) override ``kind``."""
    if ds.groups is not None:
        parts = [np.flatnonzero(ds.groups == k) for k in range(n)]
    else:
        if kind not in PARTITIONS:
            raise ConfigError(f"data.partition must be one of {', '.join(PARTITIONS)}; got {kind!r}")
        if n > len(ds.y_train):
            raise ConfigError(f"topology.n={n} exceeds the {len(ds.y_train)} training examples of {ds.name}")
        rng = np.random.default_rng(seed)
        parts = PARTITIONS[kind](ds.y_train, n, rng, alpha=alpha, shards_per_node=shards_per_node,
                                 min_size=min_size)
    return stack_shards(ds.x_train, ds.y_train, parts)

"""Datasets and partitions."""

import math

import numpy as np
import pytest

from jaxdfl import data
from jaxdfl.config import DEFAULTS, make_config
from jaxdfl.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(test_fraction=0.2, seed=0)


def test_digits_read_from_the_bundled_file_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    images, target = data.digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)


def test_digits_shapes_and_split(digits):
    assert digits.x_train.shape[1:] == (8, 8, 1)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == round(1797 * 0.2)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    assert digits.num_classes == 10


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partitions_cover_train_set_once(digits, kind):
    n = 10
    rng = np.random.default_rng(0)
    options = {"iid": {}, "dirichlet": {"alpha": 0.3}, "shards": {"shards_per_node": 2}}[kind]
    parts = data.PARTITIONS[kind](digits.y_train, n, rng, **options)
    allidx = np.concatenate(parts)
    assert len(parts) == n
    assert sorted(allidx.tolist()) == list(range(len(digits.y_train)))


def test_stacked_shards_pad_with_own_rows(digits):
    sh = data.partition(digits, 7, "dirichlet", seed=1, alpha=0.5)
    assert sh.x.shape[:2] == sh.y.shape and sh.sizes.sum() == len(digits.y_train)
    for i in range(7):
        own = {tuple(r.ravel()) for r in sh.x[i, : sh.sizes[i]]}
        assert all(tuple(r.ravel()) in own for r in sh.x[i, sh.sizes[i]:])


def test_label_skew_orders(digits):
    n = 10
    skew = lambda h: np.mean((h > 0).sum(1))  # noqa: E731  classes present per node
    iid = data.partition(digits, n, "iid").label_histogram(10)
    shards = data.partition(digits, n, "shards", shards_per_node=2).label_histogram(10)
    dirich = data.partition(digits, n, "dirichlet", alpha=0.05).label_histogram(10)
    assert skew(iid) == 10 and skew(shards) <= 3 and skew(dirich) < 6


def test_partition_deterministic(digits):
    a = data.partition(digits, 5, "dirichlet", seed=4, alpha=0.5)
    b = data.partition(digits, 5, "dirichlet", seed=4, alpha=0.5)
    np.testing.assert_array_equal(a.x, b.x)


def test_synthetic_follows_fedprox_shapes():
    ds = data.synthetic_fedprox(6, alpha=1.0, beta=1.0, seed=0)
    assert ds.x_train.shape[1] == 60 and ds.num_classes == 10
    sh = data.partition(ds, 6)
    assert sh.sizes.min() >= 50 * 0.8 - 1  # lognormal + 50 per node, minus the test share
    # each node's labels come from its own (W_k, b_k): label histograms differ between nodes
    h = sh.label_histogram(10)
    assert not np.all(h[0] == h[1])


def test_natural_clients_become_the_nodes_in_file_order():
    ds = data.synthetic_fedprox(7, alpha=1.0, beta=1.0, seed=2)
    sh = data.partition(ds, 7)
    for k in range(7):
        rows = np.flatnonzero(ds.groups == k)
        assert sh.sizes[k] == len(rows)
        np.testing.assert_array_equal(sh.x[k, : len(rows)], ds.x_train[rows])
        np.testing.assert_array_equal(sh.y[k, : len(rows)], ds.y_train[rows])


def test_synthetic_test_set_mixes_all_clients():
    """The pooled test set was in node order, so eval_samples = 100 tested only the first few clients."""
    ds = data.synthetic_fedprox(20, seed=0, samples=60)
    means = np.stack([ds.x_train[ds.groups == k].mean(0) for k in range(20)])
    first = ds.x_test[:100]
    owner = np.argmin(((first[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert len(set(owner.tolist())) >= 15
    with pytest.raises(ConfigError, match="data.partition"):  # natural clients: no other partition applies
        data.partition(ds, 20, "dirichlet")



def test_eval_samples_draws_a_random_subset_of_a_sorted_test_set(tmp_path):
    """Regression: eval_samples took a prefix, so a test set sorted by label (or by difficulty, as MNIST's is)
    was evaluated on its first labels only."""
    from jaxdfl import experiment

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = rng.integers(0, 10, 400)
    y[300:] = np.sort(y[300:])
    np.savez(tmp_path / "sorted.npz", x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    cfg = {"topology": {"n": 4}, "data": {"name": "npz", "path": str(tmp_path / "sorted.npz")},
           "model": {"name": "logreg"}, "eval_samples": 30}
    exp = experiment.build(cfg)
    picked = np.asarray(exp.arrays.y_test)
    assert len(picked) == 30 and len(np.unique(picked)) >= 5  # the prefix held 1-2 labels
    assert (picked == np.asarray(experiment.build(cfg).arrays.y_test)).all()  # the same subset every time
    assert len(experiment.build({**cfg, "eval_samples": 0}).arrays.y_test) == 100

@pytest.mark.parametrize("key, value", [("synthetic_alpha", -1.0), ("synthetic_samples", -3),
                                        ("synthetic_samples", 1)])
def test_synthetic_settings_are_checked(key, value):
    with pytest.raises(ConfigError, match=f"data.{key}"):
        make_config({"data": {"name": "synthetic", key: value}})


def test_errors():
    ds = data.load_digits()
    with pytest.raises(ConfigError, match="topology.n"):
        data.partition(ds, 5000)
    with pytest.raises(ConfigError, match="data.partition"):
        data.partition(ds, 4, "zipf")
    # regressions: 2.5 nodes built 2, a test fraction of 1.5 left no training set, misspelled keywords were dropped
    with pytest.raises(ConfigError, match="topology.n must be an integer >= 1"):
        data.partition(ds, 2.5)
    for kw, match in (({"alpha": -1.0}, "data.alpha must be a finite number > 0"),  # numpy's "alpha < 0"
                      ({"alpha": math.inf}, "data.alpha must be a finite number > 0"),  # said "raise data.alpha"
                      ({"shards_per_node": 1.5}, "data.shards_per_node must be an integer"),  # AxisError
                      ({"seed": -1}, r"data.seed must be an integer in \[0, 2\^32\)")):
        with pytest.raises(ConfigError, match=match):
            data.partition(ds, 4, "dirichlet" if "alpha" in kw else "shards", **kw)
    with pytest.raises(ConfigError, match=r"data.test_fraction must be a number in \(0, 1\)"):
        data.load_digits(test_fraction=1.5)
    rng = np.random.default_rng(0)
    for call in (lambda: data.partition_dirichlet(ds.y_train, 4, rng, alpah=0.01),
                 lambda: data.partition_shards(ds.y_train, 4, rng, shard_per_node=5),
                 lambda: data.load_digits(test_fracton=0.5), lambda: data.synthetic_fedprox(4, alpah=5.0)):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            call()


@pytest.mark.parametrize("fraction", [0.0002, 0.9999])
def test_a_test_fraction_that_empties_a_side_is_a_config_error(fraction):
    """0.0002 of 1,797 digits rounds to no test example: the run crashed inside tracing (integer modulo by zero);
    0.9999 left no training example and the error blamed topology.n."""
    with pytest.raises(ConfigError, match=r"data\.test_fraction=.*both need at least one"):
        data.load({**DEFAULTS["data"], "test_fraction": fraction}, 4)
    assert len(data.load({**DEFAULTS["data"], "test_fraction": 0.001}, 4).y_test) == 2


def _digits_with(monkeypatch, changes):
    """Register 'mine': the bundled digits with some fields changed, as a user's loader might return them."""
    import dataclasses

    def loader(n_nodes, **kw):
        ds = data.load_digits(test_fraction=kw["test_fraction"], seed=kw["seed"])
        return dataclasses.replace(ds, **changes(ds))

    monkeypatch.setitem(data.DATASETS, "mine", loader)


def test_a_registered_loaders_natural_clients_must_be_the_nodes(monkeypatch):
    """Regression (fourth audit): with 64 writers on 32 nodes, writers 32..63's examples were silently dropped."""
    _digits_with(monkeypatch, changes=lambda ds: {"groups": np.arange(len(ds.y_train)) % 64})
    ds = data.load({**DEFAULTS["data"], "name": "mine"}, 32)
    with pytest.raises(ConfigError, match=r"topology\.n=32: .* belong to 64 natural clients .*topology\.n = 64"):
        data.partition(ds, 32, "iid", seed=0)
    assert data.partition(ds, 64, "iid", seed=0).sizes.sum() == len(ds.y_train)


def test_a_registered_loaders_labels_must_fit_its_classes(monkeypatch):
    """Regression (fourth audit): labels 1..10 with 10 classes trained silently with a NaN loss."""
    _digits_with(monkeypatch, changes=lambda ds: {"y_train": ds.y_train + 1})
    with pytest.raises(ConfigError, match=r"data\.name='mine': y_train labels must lie in \[0, num_classes = 10\)"):
        data.load({**DEFAULTS["data"], "name": "mine"}, 8)


def test_a_test_fraction_that_empties_a_synthetic_node_is_named():
    with pytest.raises(ConfigError, match=r"data\.test_fraction=0\.99 leaves node \d+ none of its 50"):
        data.load({**DEFAULTS["data"], "name": "synthetic", "test_fraction": 0.99}, 200)


def test_mnist1d_samples_must_be_a_multiple_of_ten():
    with pytest.raises(ConfigError, match=r"data\.mnist1d_samples must be a multiple of 10"):
        make_config({"data": {"mnist1d_samples": 15}})

"""File-backed datasets (IDX, CIFAR pickles, npz, MNIST-1D), quantity-skew partitions and the partition report.

Every test writes its own tiny files in the standard formats and loads them through ``data.load`` with a
``[data]``-like dict, the code path real files take. No real dataset is read.
"""

import gzip
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from jaxdfl import data, datasets
from jaxdfl.config import DEFAULTS
from jaxdfl.errors import ConfigError

RNG = np.random.default_rng(1234)


def section(name, path="", **extra):
    """A ``[data]`` section as the engine passes it to data.load."""
    return {**DEFAULTS["data"], "name": name, "path": str(path), **extra}


# --------------------------------------------------------------------------------------------- file writers


def write_idx(path, arr, gz=False, type_code=0x08):
    """Write ``arr`` in the IDX format (magic 0x0000TTNN, big-endian uint32 sizes, row-major data)."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    raw = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += np.ascontiguousarray(arr, dtype=dtype).tobytes()
    if gz:
        raw = gzip.compress(raw)
        path = path.with_name(path.name + ".gz")
    path.write_bytes(raw)
    return path


def write_mnist(folder, n_train=30, n_test=12, gz=False, prefix="", classes=10, label_offset=0, dotted=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, classes, n_train).astype(np.uint8) + label_offset,
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, classes, n_test).astype(np.uint8) + label_offset,
    }
    for name, arr in arrays.items():
        fname = prefix + (name.replace("-idx", ".idx") if dotted else name)
        if prefix:  # EMNIST names the test files "test", not "t10k"
            fname = fname.replace("t10k", "test")
        write_idx(folder / fname, arr, gz=gz)
    return arrays


def write_cifar(folder, per_batch=6, n_test=5, str_keys=False, protocol=2):
    """The official CIFAR-10 python batches: dicts with 'data' uint8 [S, 3072] and 'labels' (a list)."""
    folder.mkdir(parents=True, exist_ok=True)
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    out = {}
    for name, size in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", n_test)]:
        batch = {k("batch_label"): b"batch", k("data"): RNG.integers(0, 256, (size, 3072), dtype=np.uint8),
                 k("labels"): RNG.integers(0, 10, size).tolist(),
                 k("filenames"): [b"img.png"] * size}
        raw = pickle.dumps(batch, protocol=protocol)
        if protocol == 2:  # the official files were written by numpy 1, which named numpy.core
            raw = raw.replace(b"numpy._core.", b"numpy.core.")
        (folder / name).write_bytes(raw)
        out[name] = batch
    return out


# --------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("type_code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_every_type_roundtrips(tmp_path, type_code):
    arr = (RNG.normal(size=(3, 4, 5)) * 50).astype({0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16,
                                                    0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}[type_code])
    f = write_idx(tmp_path / "a", arr, gz=type_code % 2 == 0, type_code=type_code)
    got = datasets.read_idx(f)
    assert got.dtype == arr.dtype and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_family_loads_idx_files(tmp_path, gz, name):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = data.load(section(name, tmp_path), n_nodes=4)
    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train[..., 0] * 255, arrays["train-images-idx3-ubyte"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_allclose(ds.x_test[..., 0], arrays["t10k-images-idx3-ubyte"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_mnist_torchvision_layout_and_dotted_names(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", dotted=True, gz=True)
    ds = data.load(section("mnist", tmp_path), 2)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_emnist_letters_transposed_and_shifted(tmp_path):
    arrays = write_mnist(tmp_path / "gzip", prefix="emnist-letters-", classes=26, label_offset=1, gz=True)
    ds = data.load(section("emnist_letters", tmp_path), 3)
    assert ds.num_classes == 26
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"].astype(int) - 1)
    raw = arrays["train-images-idx3-ubyte"]
    np.testing.assert_allclose(ds.x_train[..., 0], raw.transpose(0, 2, 1) / 255.0, rtol=1e-6)


def test_emnist_balanced_classes(tmp_path):
    write_mnist(tmp_path, prefix="emnist-balanced-", classes=47)
    ds = data.load(section("emnist_balanced", tmp_path), 3)
    assert ds.num_classes == 47 and ds.y_train.max() < 47


def test_missing_folder_and_files_name_the_setting_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path is not set.*train-images-idx3-ubyte"):
        data.load(section("mnist", ""), 2)
    with pytest.raises(ConfigError, match=r"data\.path=.*does not exist.*t10k-labels-idx1-ubyte"):
        data.load(section("fashion_mnist", tmp_path / "nope"), 2)
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found") as err:
        data.load(section("mnist", tmp_path), 2)
    assert "\n" not in str(err.value)


def test_wrong_magic_number_names_the_file(tmp_path):
    arrays = write_mnist(tmp_path)
    # labels where images belong: a valid IDX file with the wrong magic number 0x00000801
    write_idx(tmp_path / "train-images-idx3-ubyte", arrays["train-labels-idx1-ubyte"])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte: expected uint8 images.*0x00000803"):
        data.load(section("mnist", tmp_path), 2)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte: not an IDX file \(magic number 0x504b0304"):
        data.load(section("mnist", tmp_path), 2)


def test_truncated_corrupt_and_mismatched_files_are_rejected(tmp_path):
    arrays = write_mnist(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte: IDX header says shape \(30, 28, 28\)"):
        data.load(section("mnist", tmp_path), 2)
    f.write_bytes(gzip.compress(b"\0\0\x08\x03" + b"x" * 100)[:-8])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte: corrupt gzip data"):
        data.load(section("mnist", tmp_path), 2)
    write_idx(f, arrays["train-images-idx3-ubyte"][:-1])
    with pytest.raises(ConfigError, match=r"has 29 images but .*train-labels-idx1-ubyte has 30 labels"):
        data.load(section("mnist", tmp_path), 2)
    write_idx(f, arrays["train-images-idx3-ubyte"])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(12, 10, np.uint8))
    with pytest.raises(ConfigError, match=r"t10k-labels-idx1-ubyte: labels must lie in \[0, 10\)"):
        data.load(section("mnist", tmp_path), 2)


# --------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("sub,str_keys,protocol", [("cifar-10-batches-py", False, 2), ("", True, 5)])
def test_cifar10_batches(tmp_path, sub, str_keys, protocol):
    batches = write_cifar(tmp_path / sub if sub else tmp_path, str_keys=str_keys, protocol=protocol)
    ds = data.load(section("cifar10", tmp_path), 3)
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10 and len(ds.y_train) == 30
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    raw = np.concatenate([batches[f"data_batch_{i}"][k("data")] for i in range(1, 6)])
    labels = np.concatenate([batches[f"data_batch_{i}"][k("labels")] for i in range(1, 6)])
    # pixel (r, c) of channel ch sits at column ch * 1024 + r * 32 + c of a row
    i, r, c, ch = 7, 3, 30, 2
    assert ds.x_train[i, r, c, ch] == np.float32(raw[i, ch * 1024 + r * 32 + c]) / np.float32(255)
    np.testing.assert_allclose(ds.x_train.transpose(0, 3, 1, 2).reshape(30, -1), raw / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, labels)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][k("labels")])


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, size in (("train", 9), ("test", 4)):
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": RNG.integers(0, 256, (size, 3072), dtype=np.uint8),
                         b"fine_labels": RNG.integers(0, 100, size).tolist(),
                         b"coarse_labels": RNG.integers(0, 20, size).tolist()}, fh, protocol=2)
    ds = data.load(section("cifar100", tmp_path), 2)
    assert ds.num_classes == 100 and ds.x_train.shape == (9, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_bad_files_are_rejected_naming_the_file(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match=r"data_batch_3 not found.*test_batch"):
        data.load(section("cifar10", tmp_path), 2)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ConfigError, match=r"data_batch_3: not a readable pickle"):
        data.load(section("cifar10", tmp_path), 2)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(ConfigError, match=r"data_batch_3: not a readable pickle.*refusing to load builtins\.print"):
        data.load(section("cifar10", tmp_path), 2)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3000), np.uint8),
                                                          b"labels": [0] * 4}))
    with pytest.raises(ConfigError, match=r"data_batch_3: CIFAR 'data' must be uint8 \[S, 3072\]"):
        data.load(section("cifar10", tmp_path), 2)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8),
                                                          b"labels": [0] * 3}))
    with pytest.raises(ConfigError, match=r"data_batch_3: CIFAR 'labels' must be 4 integers"):
        data.load(section("cifar10", tmp_path), 2)


# --------------------------------------------------------------------------------------------- npz


def test_npz_uint8_images_and_float_features(tmp_path):
    xi = RNG.integers(0, 256, (20, 6, 5), dtype=np.uint8)
    yi = RNG.integers(0, 3, 20)
    np.savez(tmp_path / "img.npz", x_train=xi[:15], y_train=yi[:15], x_test=xi[15:], y_test=yi[15:])
    ds = data.load(section("npz", tmp_path / "img.npz"), 3)
    assert ds.input_shape == (6, 5, 1) and ds.num_classes == int(yi.max()) + 1
    np.testing.assert_allclose(ds.x_train[..., 0], xi[:15] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, yi[15:])

    xf = RNG.normal(size=(20, 7)) * 3
    np.savez_compressed(tmp_path / "feat.npz", x_train=xf[:16], y_train=np.arange(16) % 4, x_test=xf[16:],
                        y_test=np.arange(4.0), num_classes=6)
    ds = data.load(section("npz", tmp_path / "feat.npz"), 2)
    assert ds.num_classes == 6 and ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
    np.testing.assert_allclose(ds.x_train, xf[:16].astype(np.float32))


def test_npz_refuses_train_and_test_scaled_apart_and_labels_past_int32(tmp_path):
    """Regression (fourth audit): uint8 x_train was divided by 255 and float x_test not; 2^32 + y wrapped to y."""
    f = tmp_path / "d.npz"
    x = np.arange(24, dtype=np.uint8).reshape(6, 4)
    np.savez(f, x_train=x, y_train=np.arange(6) % 3, x_test=x.astype(np.float32), y_test=np.arange(6) % 3)
    with pytest.raises(ConfigError, match=r"x_train is uint8 but x_test float32"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=x, y_train=np.arange(6) % 3 + 2**32, x_test=x, y_test=np.arange(6) % 3)
    with pytest.raises(ConfigError, match=r"y_train has labels up to 4294967298; class labels must be below 2\^31"):
        data.load(section("npz", f), 2)


def test_npz_errors(tmp_path):
    f = tmp_path / "d.npz"
    with pytest.raises(ConfigError, match=r"data\.path=.*d\.npz.*not a file.*x_train, y_train, x_test, y_test"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.zeros((4, 2)), y_train=np.zeros(4, int), x_test=np.zeros((2, 2)))
    with pytest.raises(ConfigError, match=r"d\.npz: missing array\(s\) y_test"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.zeros((4, 2)), y_train=np.zeros(3, int), x_test=np.zeros((2, 2)), y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"d\.npz: y_train must have shape \(4,\)"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.zeros((4, 2)), y_train=[0, 1, -1, 0], x_test=np.zeros((2, 2)), y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"d\.npz: y_train has negative labels"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.zeros((4, 2)), y_train=[0, 1, 0.5, 0], x_test=np.zeros((2, 2)), y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"d\.npz: y_train must hold integer class labels"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.zeros((4, 2)), y_train=[0, 1, 1, 0], x_test=np.zeros((2, 3)), y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"x_train rows are \(2,\) but x_test rows are \(3,\)"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.array([[0, {}]] * 4, dtype=object), y_train=[0] * 4, x_test=np.zeros((2, 2)),
             y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"d\.npz: not a readable \.npz file"):
        data.load(section("npz", f), 2)
    f.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"d\.npz: not a readable \.npz file"):
        data.load(section("npz", f), 2)
    # an empty test set evaluated on 0 examples; a fractional num_classes was truncated
    np.savez(f, x_train=np.zeros((4, 2)), y_train=[0, 1, 1, 0], x_test=np.zeros((0, 2)), y_test=np.zeros(0, int))
    with pytest.raises(ConfigError, match=r"d\.npz: x_test is empty"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.zeros((4, 2)), y_train=[0, 1, 1, 0], x_test=np.zeros((2, 2)), y_test=[0, 1],
             num_classes=2.7)
    with pytest.raises(ConfigError, match=r"d\.npz: num_classes must be one integer"):
        data.load(section("npz", f), 2)
    # finite float64 features past float32's range were called "NaN or infinite"; complex ones lost their imaginary part
    np.savez(f, x_train=np.full((4, 2), 1e40), y_train=[0, 1, 1, 0], x_test=np.zeros((2, 2)), y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"d\.npz: x_train has values up to 1e\+40, beyond float32's range"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.full((4, 2), np.nan), y_train=[0, 1, 1, 0], x_test=np.zeros((2, 2)), y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"d\.npz: x_train contains NaN or infinite values"):
        data.load(section("npz", f), 2)
    np.savez(f, x_train=np.ones((4, 2)) * 1j, y_train=[0, 1, 1, 0], x_test=np.zeros((2, 2)), y_test=[0, 1])
    with pytest.raises(ConfigError, match=r"d\.npz: x_train must be a real numeric array"):
        data.load(section("npz", f), 2)


# --------------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_missing_package_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ConfigError, match=r"pip install mnist1d"):
        data.load(section("mnist1d"), 2)


def test_mnist1d_adapter_with_a_stand_in_generator(monkeypatch):
    """Our use of make_dataset: arguments passed, shapes, dtypes, and numpy's global RNG left untouched."""
    seen = {}

    def get_dataset_args():
        return types.SimpleNamespace(num_samples=5000, train_split=0.8, seed=42, final_seq_length=40)

    def make_dataset(args):
        seen.update(vars(args))
        np.random.seed(args.seed)  # the real generator seeds the global state
        xs = np.random.normal(size=(args.num_samples, args.final_seq_length))
        ys = np.arange(args.num_samples) % 10
        cut = int(args.num_samples * args.train_split)
        return {"x": xs[:cut], "y": ys[:cut], "x_test": xs[cut:], "y_test": ys[cut:]}

    fake = types.ModuleType("mnist1d.data")
    fake.get_dataset_args, fake.make_dataset = get_dataset_args, make_dataset
    monkeypatch.setitem(sys.modules, "mnist1d", types.ModuleType("mnist1d"))
    monkeypatch.setitem(sys.modules, "mnist1d.data", fake)
    np.random.seed(7)
    state = np.random.get_state()
    ds = data.load(section("mnist1d", test_fraction=0.25, mnist1d_samples=200, mnist1d_seed=3), 4)
    assert seen["num_samples"] == 200 and seen["seed"] == 3 and seen["train_split"] == pytest.approx(0.75)
    assert ds.x_train.shape == (150, 40) and ds.x_test.shape == (50, 40) and ds.num_classes == 10
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    after = np.random.get_state()
    assert np.array_equal(after[1], state[1]) and after[2] == state[2]


def test_mnist1d_real_generator():
    pytest.importorskip("mnist1d")
    ds = data.load(section("mnist1d", mnist1d_samples=500), 5)
    assert ds.x_train.shape == (400, 40) and ds.x_test.shape == (100, 40)
    assert set(np.unique(ds.y_train)) <= set(range(10))
    again = data.load(section("mnist1d", mnist1d_samples=500), 5)
    np.testing.assert_array_equal(ds.x_train, again.x_train)


# --------------------------------------------------------------------------------------------- quantity skew


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(test_fraction=0.2, seed=0)


def test_apportion_matches_largest_remainder_reference():
    for trial in range(20):
        rng = np.random.default_rng(trial)
        n, total, minimum = int(rng.integers(2, 30)), int(rng.integers(100, 2000)), int(rng.integers(0, 3))
        q = rng.dirichlet(np.full(n, 0.5))
        sizes = data.apportion(total, q, minimum)
        spare = total - n * minimum
        ideal = q / q.sum() * spare
        # reference: Hamilton's method, one seat at a time to the largest remaining fractional part
        ref = np.floor(ideal).astype(int)
        frac = ideal - ref
        for _ in range(spare - ref.sum()):
            j = int(np.argmax(frac))
            ref[j] += 1
            frac[j] = -1
        np.testing.assert_array_equal(sizes, ref + minimum)
        assert sizes.sum() == total and sizes.min() >= minimum
    with pytest.raises(ConfigError, match=r"topology\.n=5"):
        data.apportion(8, np.full(5, 0.2), 2)


def test_power_shares_follow_zipf():
    rng = np.random.default_rng(0)
    q = data.quantity_shares(rng, 12, "power", 1.5)
    ref = np.arange(1, 13) ** -1.5
    np.testing.assert_allclose(np.sort(q)[::-1], ref / ref.sum(), rtol=1e-12)
    assert data.quantity_shares(rng, 12, "none", 1.0) is None


def test_dirichlet_shares_concentration():
    rng = np.random.default_rng(0)
    cv = lambda a: np.mean([np.std(q) / np.mean(q) for q in  # noqa: E731
                            (data.quantity_shares(rng, 20, "dirichlet", a) for _ in range(50))])
    # Dir(alpha 1_n) marginals are Beta(alpha, (n-1) alpha): cv = sqrt((n-1)/(n alpha + 1)) per coordinate
    for a in (0.2, 5.0):
        assert cv(a) == pytest.approx(np.sqrt(19 / (20 * a + 1)), rel=0.15)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("skew", ["dirichlet", "power"])
def test_quantity_skew_covers_train_set_once_with_target_sizes(digits, kind, skew):
    n, seed = 9, 5
    sh = data.partition(digits, n, kind, seed=seed, alpha=0.5, shards_per_node=3, quantity_skew=skew,
                        quantity_alpha=0.8)
    assert sh.sizes.sum() == len(digits.y_train) and sh.sizes.min() >= 1
    rng = np.random.default_rng(seed)
    q = data.quantity_shares(rng, n, skew, 0.8)
    if kind in ("iid", "dirichlet"):
        np.testing.assert_array_equal(sh.sizes, data.apportion(len(digits.y_train), q, 1))
    else:  # shards: node k holds apportion(n * 3, q, 1)_k shards of near-equal size
        shard_counts = data.apportion(n * 3, q, 1)
        shard_size = len(digits.y_train) / (n * 3)
        assert np.all(np.abs(sh.sizes - shard_counts * shard_size) <= shard_counts)
    options = {"iid": {}, "dirichlet": {"alpha": 0.5}, "shards": {"shards_per_node": 3}}[kind]
    parts = data.PARTITIONS[kind](digits.y_train, n, np.random.default_rng(seed), shares=q, **options)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(digits.y_train)))


def test_quantity_skew_is_seeded_and_none_keeps_the_unskewed_partition(digits):
    a = data.partition(digits, 6, "dirichlet", seed=2, quantity_skew="power")
    b = data.partition(digits, 6, "dirichlet", seed=2, quantity_skew="power")
    np.testing.assert_array_equal(a.x, b.x)
    plain = data.partition(digits, 6, "iid", seed=3, quantity_skew="none")
    ref = np.array_split(np.random.default_rng(3).permutation(len(digits.y_train)), 6)
    np.testing.assert_array_equal(plain.y[0, : plain.sizes[0]], digits.y_train[ref[0]])


def test_dirichlet_with_quantity_skew_label_skew_orders(digits):
    tv = lambda a: data.partition_report(  # noqa: E731
        data.partition(digits, 10, "dirichlet", seed=0, alpha=a, quantity_skew="power", quantity_alpha=0.5),
        10)["label_tv_mean"]
    assert tv(0.05) > 0.5 > 0.2 > tv(100.0)


def test_quantity_skew_errors(digits):
    with pytest.raises(ConfigError, match=r"data\.quantity_skew must be one of none, dirichlet, power"):
        data.partition(digits, 4, quantity_skew="zipf")
    with pytest.raises(ConfigError, match=r"data\.quantity_alpha must be > 0"):
        data.partition(digits, 4, quantity_skew="power", quantity_alpha=0.0)
    syn = data.synthetic_fedprox(4, samples=30)
    with pytest.raises(ConfigError, match=r"data\.quantity_skew='power' does not apply to synthetic"):
        data.partition(syn, 4, quantity_skew="power")


# --------------------------------------------------------------------------------------------- report and plot


def test_partition_report_against_numpy_reference(digits):
    sh = data.partition(digits, 7, "dirichlet", seed=1, alpha=0.3, quantity_skew="dirichlet", quantity_alpha=1.0)
    rep = data.partition_report(sh, 10)
    n = 7
    sizes = sh.sizes.astype(float)
    hist = np.zeros((n, 10))
    for i in range(n):
        for label in sh.y[i, : sh.sizes[i]]:
            hist[i, label] += 1
    pooled = hist.sum(0) / hist.sum()
    gini = sum(abs(a - b) for a in sizes for b in sizes) / (2 * n * n * sizes.mean())
    tv = [0.5 * sum(abs(hist[i, c] / sizes[i] - pooled[c]) for c in range(10)) for i in range(n)]
    assert rep["nodes"] == n and rep["samples"] == len(digits.y_train)
    assert rep["sizes"] == sh.sizes.tolist() and rep["label_histogram"] == hist.astype(int).tolist()
    assert rep["size_gini"] == pytest.approx(gini) and rep["size_cv"] == pytest.approx(sizes.std() / sizes.mean())
    np.testing.assert_allclose(rep["label_tv"], tv)
    assert rep["classes_per_node"] == [int((hist[i] > 0).sum()) for i in range(n)]
    assert rep["padding_fraction"] == pytest.approx(1 - sizes.sum() / np.prod(sh.y.shape))
    iid = data.partition_report(data.partition(digits, 7, "iid"), 10)
    assert iid["size_gini"] < 0.01 and iid["padding_fraction"] < 0.01 and iid["label_tv_mean"] < rep["label_tv_mean"]
    text = data.format_partition_report(rep)
    assert f"max {rep['size_max']}" in text and len(text.splitlines()) == 4


def test_plot_partition_writes_png_atomically(tmp_path, digits):
    sh = data.partition(digits, 12, "shards", shards_per_node=2, quantity_skew="power")
    out = tmp_path / "sub" / "partition.png"
    data.plot_partition(out, sh, 10)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["partition.png"]


def test_loaded_files_partition_into_stacked_shards(tmp_path):
    write_mnist(tmp_path, n_train=40, gz=True)
    ds = data.load(section("mnist", tmp_path), 4)
    sh = data.partition(ds, 4, "dirichlet", alpha=1.0, quantity_skew="power", quantity_alpha=1.0)
    assert sh.x.shape == (4, int(sh.sizes.max()), 28, 28, 1) and sh.sizes.sum() == 40

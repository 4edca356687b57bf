"""Readers for the standard distribution formats of public datasets, from local files only (host side, numpy).

Nothing here downloads: the user points ``data.path`` at files they already have. Every reader returns a
:class:`Split` of numpy arrays; :mod:`jaxdfl.data` wraps it in a ``Dataset`` and registers the names.

Preprocessing (identical for every node, applied once on the host):

- images are float32 ``[S, H, W, C]`` with uint8 pixels divided by 255, so values lie in [0, 1]; no mean/std
  standardisation (a model that wants it can learn the offset; it keeps DP clipping norms comparable across
  datasets);
- EMNIST images are transposed to the upright orientation of MNIST (the NIST files store them transposed);
  EMNIST ``letters`` labels 1..26 are shifted to 0..25;
- CIFAR rows (3072 bytes, channel-major) are reshaped to ``[32, 32, 3]``;
- ``npz`` arrays: uint8 inputs are divided by 255, any other numeric inputs are used as given (cast to float32);
  a 3-D ``[S, H, W]`` input gets a trailing channel axis;
- MNIST-1D signals are used as generated: ``[S, 40]`` float32, standardised by the generator (mean 0, std 1).

Labels are int32 in ``[0, num_classes)``. Corrupt or mismatched files are rejected with a one-line
:class:`~jaxdfl.errors.ConfigError` naming the file.

References:
  LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to document recognition", 1998 (MNIST, IDX).
  Xiao, Rasul, Vollgraf, "Fashion-MNIST", 2017. Cohen, Afshar, Tapson, van Schaik, "EMNIST", 2017.
  Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009 (CIFAR-10/100).
  Greydanus, "Scaling down Deep Learning" (MNIST-1D), 2020.
"""

from __future__ import annotations

import gzip
import pickle
import random
import struct
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxdfl.errors import ConfigError


class Split(NamedTuple):
    """Train and test arrays: ``x_*: [S, ...]`` float32, ``y_*: [S]`` int32, and the number of classes."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


# --------------------------------------------------------------------------------------------- helpers


def _root(path: str | Path, expect: str) -> Path:
    """``data.path`` as an existing folder, or a one-line ConfigError saying what was expected there."""
    if not str(path):
        raise ConfigError(f"data.path is not set; point it at the folder holding {expect}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path={str(path)!r} does not exist; expected a folder holding {expect}")
    if not p.is_dir():
        raise ConfigError(f"data.path={str(path)!r} is a file; expected a folder holding {expect}")
    return p


def _find(root: Path, subdirs: tuple[str, ...], names: tuple[str, ...]) -> Path | None:
    """The first ``root/subdir/name`` that exists (subdirs in order, then names in order)."""
    for sub in subdirs:
        for name in names:
            candidate = root / sub / name
            if candidate.is_file():
                return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic bytes (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ConfigError(f"{path}: corrupt gzip data ({exc})") from None
    return raw


def _images_to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------------------------- IDX (MNIST family)

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array.

    Format: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
    data in row-major order (type 0x08 = uint8). MNIST images have magic 0x00000803 (``[S, 28, 28]`` uint8),
    labels 0x00000801 (``[S]`` uint8).

    Args:
      path: the file.

    Returns:
      The array with the header's shape and dtype (native byte order).

    Raises:
      ConfigError: not an IDX file (wrong magic number), or its size disagrees with the header (truncated).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        magic = int.from_bytes(raw[:4].ljust(4, b"\0"), "big")
        raise ConfigError(f"{path}: not an IDX file (magic number 0x{magic:08x}; expected 0x0000TTNN with a "
                          f"type TT in 08,09,0b,0c,0d,0e and NN dimensions)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ConfigError(f"{path}: IDX header says shape {tuple(dims)} ({expected} bytes) but the data has "
                          f"{len(raw)} bytes (truncated or corrupt file)")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_names(base: str) -> tuple[str, ...]:
    # the original names, the dotted variant some mirrors use (train-images.idx3-ubyte), each optionally gzipped
    dotted = base.replace("-idx", ".idx")
    return (base, base + ".gz", dotted, dotted + ".gz")


def _read_idx_pair(root: Path, subdirs, images: str, labels: str, num_classes: int, expect: str,
                   label_offset: int = 0, transpose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    found = []
    for base in (images, labels):
        f = _find(root, subdirs, _idx_names(base))
        if f is None:
            raise ConfigError(f"data.path={str(root)!r}: {base}[.gz] not found; expected {expect}")
        found.append(f)
    fx, fy = found
    x, y = read_idx(fx), read_idx(fy)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ConfigError(f"{fx}: expected uint8 images [S, H, W] (IDX magic 0x00000803), got {x.dtype} "
                          f"shape {x.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise ConfigError(f"{fy}: expected uint8 labels [S] (IDX magic 0x00000801), got {y.dtype} shape {y.shape}")
    if len(x) != len(y):
        raise ConfigError(f"{fx} has {len(x)} images but {fy} has {len(y)} labels")
    y = y.astype(np.int32) - label_offset
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"{fy}: labels must lie in [{label_offset}, {num_classes + label_offset}), got "
                          f"{y.min() + label_offset}..{y.max() + label_offset}")
    if transpose:
        x = x.transpose(0, 2, 1)
    return _images_to_float(x)[..., None], y


_MNIST_SOURCES = {
    "mnist": ("MNIST", "https://yann.lecun.com/exdb/mnist/ (or any mirror)"),
    "fashion_mnist": ("FashionMNIST", "https://github.com/zalandoresearch/fashion-mnist"),
}


def load_mnist(path: str | Path, variant: str = "mnist") -> Split:
    """MNIST or Fashion-MNIST from the original IDX files (gzipped or not), 28x28x1 images in [0, 1], 10 classes.

    Looks in ``path``, ``path/raw`` and ``path/<MNIST|FashionMNIST>/raw`` (torchvision's layout) for
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each optionally ``.gz``. The official 60,000/10,000 split is used as is.

    Args:
      path: the folder (``data.path``).
      variant: ``"mnist"`` or ``"fashion_mnist"`` (only the error messages and torchvision folder differ).

    Returns:
      A :class:`Split` with ``x_*: [S, 28, 28, 1]`` float32 and ``y_*: [S]`` int32.
    """
    folder, source = _MNIST_SOURCES[variant]
    files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    expect = f"{files} (optionally .gz; from {source})"
    root = _root(path, expect)
    subdirs = (".", "raw", f"{folder}/raw")
    x_tr, y_tr = _read_idx_pair(root, subdirs, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", 10, expect)
    x_te, y_te = _read_idx_pair(root, subdirs, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10, expect)
    _same_shape(root, x_tr, x_te)
    return Split(x_tr, y_tr, x_te, y_te, 10)


#: EMNIST splits and their number of classes (Cohen et al. 2017, Table II).
EMNIST_SPLITS = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10, "mnist": 10}


def load_emnist(path: str | Path, split: str = "balanced") -> Split:
    """EMNIST (one split) from its IDX files, 28x28x1 upright images in [0, 1].

    Looks in ``path`` and ``path/gzip`` (the layout of NIST's ``gzip.zip``) for
    ``emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]``. Images are transposed to MNIST's
    orientation; ``letters`` labels 1..26 become 0..25.

    Args:
      path: the folder (``data.path``).
      split: one of :data:`EMNIST_SPLITS`.

    Returns:
      A :class:`Split` with ``x_*: [S, 28, 28, 1]`` float32, ``y_*: [S]`` int32.
    """
    if split not in EMNIST_SPLITS:
        raise ConfigError(f"EMNIST split must be one of {', '.join(EMNIST_SPLITS)}; got {split!r}")
    stem = f"emnist-{split}"
    expect = (f"{stem}-train-images-idx3-ubyte, {stem}-train-labels-idx1-ubyte, {stem}-test-images-idx3-ubyte, "
              f"{stem}-test-labels-idx1-ubyte (optionally .gz; from https://www.nist.gov/itl/products-and-services/"
              f"emnist-dataset)")
    root = _root(path, expect)
    subdirs, classes, offset = (".", "gzip"), EMNIST_SPLITS[split], 1 if split == "letters" else 0
    x_tr, y_tr = _read_idx_pair(root, subdirs, f"{stem}-train-images-idx3-ubyte", f"{stem}-train-labels-idx1-ubyte",
                                classes, expect, label_offset=offset, transpose=True)
    x_te, y_te = _read_idx_pair(root, subdirs, f"{stem}-test-images-idx3-ubyte", f"{stem}-test-labels-idx1-ubyte",
                                classes, expect, label_offset=offset, transpose=True)
    _same_shape(root, x_tr, x_te)
    return Split(x_tr, y_tr, x_te, y_te, classes)


def _same_shape(root, x_tr, x_te):
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ConfigError(f"data.path={str(root)!r}: train images are {x_tr.shape[1:]} but test images are "
                          f"{x_te.shape[1:]}")


# --------------------------------------------------------------------------------------------- CIFAR (pickles)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (plus dicts, lists, bytes, numbers).

    A pickle can run arbitrary code on load; the CIFAR batches need nothing but numpy's array reconstruction,
    so anything else is refused.
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias that older pickles name
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _load_pickle(path: Path):
    try:
        with open(path, "rb") as fh:
            return _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            ImportError, KeyError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _load_pickle(path)
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a CIFAR batch (a dict with 'data' and '{label_key}'), got "
                          f"{type(obj).__name__}")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or label_key not in obj:
        raise ConfigError(f"{path}: CIFAR batch lacks 'data' or '{label_key}' (keys: {', '.join(map(str, obj))})")
    x = np.asarray(obj["data"])
    y = np.asarray(obj[label_key])
    if x.ndim != 2 or x.shape[1] != 3072 or x.dtype != np.uint8:
        raise ConfigError(f"{path}: CIFAR 'data' must be uint8 [S, 3072], got {x.dtype} shape {x.shape}")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{path}: CIFAR '{label_key}' must be {x.shape[0]} integers, got {y.dtype} shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"{path}: CIFAR labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    # rows are channel-major (1024 red, 1024 green, 1024 blue), each channel row-major
    x = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _images_to_float(x), y.astype(np.int32)


def load_cifar(path: str | Path, classes: int = 10) -> Split:
    """CIFAR-10 or CIFAR-100 from the official "python version" pickled batches, 32x32x3 images in [0, 1].

    CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (50,000/10,000), in ``path`` or its
    ``cifar-10-batches-py`` subfolder. CIFAR-100: ``train`` and ``test`` with the 100 ``fine_labels``, in ``path``
    or ``cifar-100-python``. The pickles are read with an unpickler that only rebuilds numpy arrays.

    Args:
      path: the folder (``data.path``).
      classes: 10 or 100.

    Returns:
      A :class:`Split` with ``x_*: [S, 32, 32, 3]`` float32, ``y_*: [S]`` int32.
    """
    if classes == 10:
        sub, train, test, key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"
    elif classes == 100:
        sub, train, test, key = "cifar-100-python", ["train"], "test", "fine_labels"
    else:
        raise ValueError(f"classes must be 10 or 100, got {classes}")
    expect = (f"{', '.join(train)}, {test} (the python version from https://www.cs.toronto.edu/~kriz/cifar.html, "
              f"extracted; in the folder or its {sub} subfolder)")
    root = _root(path, expect)
    parts = []
    for name in [*train, test]:
        f = _find(root, (".", sub), (name,))
        if f is None:
            raise ConfigError(f"data.path={str(path)!r}: {name} not found; expected {expect}")
        parts.append(_cifar_batch(f, key, classes))
    x_tr = np.concatenate([p[0] for p in parts[:-1]])
    y_tr = np.concatenate([p[1] for p in parts[:-1]])
    return Split(x_tr, y_tr, parts[-1][0], parts[-1][1], classes)


# --------------------------------------------------------------------------------------------- npz (user data)


def load_npz(path: str | Path) -> Split:
    """A user's own data from one ``.npz`` file with ``x_train, y_train, x_test, y_test``.

    Inputs: uint8 arrays are divided by 255, other numeric arrays are cast to float32 unchanged; a 3-D
    ``[S, H, W]`` input gets a trailing channel axis. Labels must be non-negative integers. The number of classes
    is the optional scalar ``num_classes`` in the file, else ``max(label) + 1``. Pickled object arrays are refused.

    Args:
      path: the ``.npz`` file (``data.path``).

    Returns:
      A :class:`Split`.
    """
    keys = ("x_train", "y_train", "x_test", "y_test")
    if not str(path):
        raise ConfigError("data.path is not set; point it at an .npz file holding x_train, y_train, x_test, y_test")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.path={str(path)!r} is not a file; expected an .npz file holding "
                          f"x_train, y_train, x_test, y_test")
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise ConfigError(f"{p}: missing array(s) {', '.join(missing)}; an npz dataset needs "
                                  f"x_train, y_train, x_test, y_test (found: {', '.join(f.files) or 'none'})")
            arrays = {k: f[k] for k in keys}
            num_classes = f["num_classes"] if "num_classes" in f.files else None
    except ConfigError:
        raise
    except (ValueError, OSError, EOFError) as exc:  # BadZipFile is an OSError; pickled arrays raise ValueError
        raise ConfigError(f"{p}: not a readable .npz file ({type(exc).__name__}: {exc})") from None

    xs = []
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
            raise ConfigError(f"{p}: x_{part} must be a real numeric array [S, ...], got {x.dtype} shape {x.shape}")
        if y.shape != (x.shape[0],):
            raise ConfigError(f"{p}: y_{part} must have shape ({x.shape[0]},) to match x_{part}, got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) and not (
                np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise ConfigError(f"{p}: y_{part} must hold integer class labels, got {y.dtype}")
        if len(y) and y.min() < 0:
            raise ConfigError(f"{p}: y_{part} has negative labels (min {y.min()})")
        if np.issubdtype(x.dtype, np.floating) and x.size:
            if not np.all(np.isfinite(x)):
                raise ConfigError(f"{p}: x_{part} contains NaN or infinite values")
            big = float(np.max(np.abs(x)))
            if big > float(np.finfo(np.float32).max):
                raise ConfigError(f"{p}: x_{part} has values up to {big:.3g}, beyond float32's range "
                                  f"({np.finfo(np.float32).max:.3g}): rescale them")
        x = _images_to_float(x) if x.dtype == np.uint8 else x.astype(np.float32)
        xs.append(x[..., None] if x.ndim == 3 else x)
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise ConfigError(f"{p}: x_train rows are {xs[0].shape[1:]} but x_test rows are {xs[1].shape[1:]}")
    if (arrays["x_train"].dtype == np.uint8) != (arrays["x_test"].dtype == np.uint8):  # scaled differently
        raise ConfigError(f"{p}: x_train is {arrays['x_train'].dtype} but x_test {arrays['x_test'].dtype}: uint8 "
                          "images are divided by 255 and other dtypes used as given; store both alike")
    for part in ("train", "test"):
        y = arrays[f"y_{part}"]
        if len(y) and y.max() >= 2**31:
            raise ConfigError(f"{p}: y_{part} has labels up to {y.max()}; class labels must be below 2^31")
    y_tr, y_te = arrays["y_train"].astype(np.int32), arrays["y_test"].astype(np.int32)
    if len(y_tr) == 0 or len(y_te) == 0:
        raise ConfigError(f"{p}: x_{'train' if len(y_tr) == 0 else 'test'} is empty")
    top = int(max(y_tr.max(), y_te.max() if len(y_te) else 0)) + 1
    if num_classes is None:
        classes = top
    else:
        nc = np.asarray(num_classes)
        if nc.shape != () or not np.issubdtype(nc.dtype, np.integer):
            raise ConfigError(f"{p}: num_classes must be one integer, got {nc!r}")
        classes = int(nc)
        if classes < top:
            raise ConfigError(f"{p}: num_classes={classes} but labels go up to {top - 1}")
    return Split(xs[0], y_tr, xs[1], y_te, classes)


# --------------------------------------------------------------------------------------------- MNIST-1D


def make_mnist1d(samples: int = 5000, seed: int = 42, test_fraction: float = 0.2) -> Split:
    """MNIST-1D generated procedurally by the optional ``mnist1d`` package (never downloaded).

    Calls ``mnist1d.data.make_dataset`` with the package's default arguments except ``num_samples = samples``,
    ``seed`` and ``train_split = 1 - test_fraction`` (the defaults 5000, 42, 0.2 reproduce the published
    4000/1000 dataset). Signals are ``[S, 40]`` float32, standardised by the generator; 10 classes. The
    generator seeds numpy's and Python's global random state; both are restored afterwards.

    Args:
      samples: total number of signals (train + test), a multiple of 10.
      seed: generator seed.
      test_fraction: share held out as the test set.

    Returns:
      A :class:`Split` with ``x_*: [S, 40]``.

    Raises:
      ConfigError: the ``mnist1d`` package is not installed (``pip install mnist1d``).

    References:
      Greydanus, "Scaling down Deep Learning", 2020 (arXiv:2011.14439).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ConfigError(f"data.name='mnist1d' needs the optional mnist1d package: pip install mnist1d "
                          f"({exc})") from None
    if samples < 10 or samples % 10:
        raise ConfigError(f"data.mnist1d_samples must be a multiple of 10 (signals per class x 10), got {samples}")
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = int(samples), int(seed), 1.0 - float(test_fraction)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x_tr, x_te = (np.asarray(raw[k], np.float32) for k in ("x", "x_test"))
    y_tr, y_te = (np.asarray(raw[k]).astype(np.int32) for k in ("y", "y_test"))
    return Split(x_tr, y_tr, x_te, y_te, 10)

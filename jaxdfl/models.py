"""Flax models, a registry by config name, and their flattening to one parameter vector per node.

Every model maps a batch ``[B, *input_shape]`` to logits ``[B, num_classes]``. No model uses BatchNorm: batch
statistics do not mix sensibly across nodes and break per-example DP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from numbers import Integral

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxdfl.errors import ConfigError
from jaxdfl.registry import Shipped


class LogReg(nn.Module):
    """Multinomial logistic regression: logits = W flatten(x) + b."""

    num_classes: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes, dtype=self.dtype)(x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
    """Fully connected ReLU network with the given hidden sizes."""

    num_classes: int
    hidden: Sequence[int] = (64,)
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class Conv(nn.Module):
    """2-D convolution, stride 1, padding "SAME" or "VALID", ``[B, H, W, C] -> [B, H', W', features]``, with
    exactly ``flax.linen.Conv``'s parameters (``kernel [kh, kw, C, features]`` LeCun-normal, ``bias`` zeros) and
    result, in one of two lowerings:

    - ``impl="xla"``: ``lax.conv_general_dilated``, XLA's convolution;
    - ``impl="im2col"``: the ``kh * kw`` shifted slices of the (padded) input concatenated along channels, times the
      kernel reshaped to ``[kh * kw * C, features]``: one matmul, whose gradients are a matmul and slice-adds.

    Why two: the engine vmaps local training over nodes, each node with its own kernel, which XLA turns into a
    grouped convolution. On XLA:CPU its gradient is slow and grows faster than linearly in the number of nodes
    (LeNet-5, 32 nodes: see ``benchmarks/rounds.py``); the im2col form stays a batched matmul. ``model.conv =
    "auto"`` picks im2col on CPU and XLA's convolution elsewhere.
    """

    features: int
    kernel_size: tuple[int, int]
    padding: str = "SAME"
    dtype: Any = None
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"Conv.padding must be SAME or VALID, got {self.padding!r}")
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, cin, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.impl == "xla":
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        elif self.impl == "im2col":
            h, w = x.shape[1], x.shape[2]
            if self.padding == "SAME":  # XLA's SAME: the extra row/column of an even kernel goes after
                ph, pw = kh - 1, kw - 1
                x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
            else:
                h, w = h - kh + 1, w - kw + 1
            cols = jnp.concatenate([x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
            y = self.project(cols, kernel.reshape(kh * kw * cin, self.features))
        else:
            raise ValueError(f"Conv.impl must be xla or im2col, got {self.impl!r}")
        return y + bias

    def project(self, cols, kernel):
        """The im2col matmul ``[B, H', W', kh * kw * C] @ [kh * kw * C, features]`` (a module method, so that DP-SGD's
        ghost clipping can tap its input and output: ``training.ghost_clipped_sum``)."""
        return cols @ kernel


def _need_images(name: str, x, min_side: int = 1):
    if x.ndim != 4:
        raise ConfigError(f"model.name={name!r} needs image inputs [H, W, C], got input shape {tuple(x.shape[1:])}")
    if min(x.shape[1], x.shape[2]) < min_side:
        raise ConfigError(f"model.name={name!r} needs images at least {min_side}x{min_side}, got "
                          f"{x.shape[1]}x{x.shape[2]}")


class CNN(nn.Module):
    """Small CNN: two 3x3 conv + ReLU + 2x2 average-pool stages, then dense ReLU layers of the ``hidden`` widths.

    Inputs are images ``[B, H, W, C]``; pooling is skipped once a side is down to 1 pixel.
    """

    num_classes: int
    hidden: Sequence[int] = (64,)
    channels: Sequence[int] = (16, 32)
    dtype: Any = None
    conv: str = "xla"

    @nn.compact
    def __call__(self, x):
        _need_images("cnn", x)
        for c in self.channels:
            x = nn.relu(Conv(c, (3, 3), padding="SAME", dtype=self.dtype, impl=self.conv)(x))
            if x.shape[1] >= 2 and x.shape[2] >= 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class LeNet5(nn.Module):
    """LeNet-5 style CNN (ReLU and max-pooling in place of the original tanh and subsampling).

    Definition: conv 5x5 x6 (SAME) -> ReLU -> maxpool 2 -> conv 5x5 x16 (VALID) -> ReLU -> maxpool 2 -> flatten
    -> dense 120 -> ReLU -> dense 84 -> ReLU -> dense C. The SAME padding of the first conv plays the role of
    LeCun's padding of 28x28 digits to 32x32. ``model.hidden`` is not used (fixed architecture).

    Parameters (C = 10): 61,706 on 28x28x1 (156 + 2,416 + 48,120 + 10,164 + 850); 83,126 on 32x32x3
    (456 + 2,416 + 69,240 + 10,164 + 850). Needs images of at least 16x16.

    References:
      LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to document recognition", 1998.
    """

    num_classes: int
    dtype: Any = None
    conv: str = "xla"

    @nn.compact
    def __call__(self, x):
        _need_images("lenet5", x, min_side=16)
        x = nn.relu(Conv(6, (5, 5), padding="SAME", dtype=self.dtype, impl=self.conv)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(Conv(16, (5, 5), padding="VALID", dtype=self.dtype, impl=self.conv)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(120, dtype=self.dtype)(x))
        x = nn.relu(nn.Dense(84, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class CifarCNN(nn.Module):
    """Small VGG-style CNN for 32x32x3 images with GroupNorm (or no normalisation), no BatchNorm.

    Definition: for each stage width w in ``channels`` (32, 64, 128): two [conv 3x3 xw (SAME) -> GroupNorm(8 groups)
    -> ReLU], then maxpool 2; then global average pooling -> dense C. GroupNorm normalises each example on its own,
    so per-example DP gradients and averaging across nodes stay well defined (BatchNorm's batch statistics do not).
    ``norm="none"`` drops the GroupNorm layers. ``model.hidden`` is not used. Works on any image of at least 8x8.

    Parameters (C = 10, 3 input channels): 289,194 with GroupNorm (convs 287,008, GroupNorm scales and biases
    896, head 1,290); 288,298 without. On 1 input channel: 288,618 with GroupNorm.

    References:
      Wu, He, "Group Normalization", ECCV 2018. Hsieh et al., "The Non-IID Data Quagmire of Decentralized Machine
      Learning", ICML 2020 (GroupNorm in place of BatchNorm for decentralized learning).
    """

    num_classes: int
    channels: Sequence[int] = (32, 64, 128)
    norm: str = "group"
    groups: int = 8
    dtype: Any = None
    conv: str = "xla"

    @nn.compact
    def __call__(self, x):
        _need_images("cifar_cnn", x, min_side=2 ** len(self.channels))
        for width in self.channels:
            for _ in range(2):
                x = Conv(width, (3, 3), padding="SAME", dtype=self.dtype, impl=self.conv)(x)
                if self.norm == "group":
                    x = nn.GroupNorm(num_groups=self.groups, dtype=self.dtype)(x)
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


#: Models by config name: ``MODELS[name](num_classes, hidden, dtype, conv) -> nn.Module`` (models without hidden
#: widths or convolutions ignore ``hidden`` or ``conv``).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": lambda classes, hidden, dtype, conv: LogReg(classes, dtype=dtype),
    "mlp": lambda classes, hidden, dtype, conv: MLP(classes, tuple(hidden), dtype=dtype),
    "cnn": lambda classes, hidden, dtype, conv: CNN(classes, tuple(hidden), dtype=dtype, conv=conv),
    "lenet5": lambda classes, hidden, dtype, conv: LeNet5(classes, dtype=dtype, conv=conv),
    "cifar_cnn": lambda classes, hidden, dtype, conv: CifarCNN(classes, dtype=dtype, conv=conv),
}

#: Whether a model name is registered to jaxdfl's own model: what it knows of their layers (DP clipping, fixed
#: architectures, convolutions) holds only then.
shipped = Shipped(MODELS)

#: Lowerings of :class:`Conv` for ``model.conv`` ("auto": im2col on CPU, XLA's convolution on other backends).
CONV_IMPLS = ("auto", "xla", "im2col")

#: Models with convolutions (their ``model.conv`` matters).
CONV_MODELS = frozenset({"cnn", "lenet5", "cifar_cnn"})

#: Models with parameters outside ``nn.Dense`` and :class:`Conv` layers (``cifar_cnn``: GroupNorm), which DP-SGD's
#: ghost clipping does not cover.
NOT_AFFINE_MODELS = frozenset({"cifar_cnn"})


def conv_impl(conv: str) -> str:
    """The lowering ``model.conv`` selects on this backend: "auto" is im2col on CPU, XLA's convolution elsewhere."""
    if conv not in CONV_IMPLS:
        raise ConfigError(f"model.conv must be one of {', '.join(CONV_IMPLS)}; got {conv!r}")
    if conv == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return conv


def dp_clipping(name: str, conv: str = "auto") -> str:
    """How DP-SGD forms model ``name``'s clipped gradient sum (``training.clipped_gradient_sum``) with convolutions
    lowered as ``conv``: ``"ghost"`` (norms and sum from the layers' inputs and output gradients in one backward pass)
    when every parameter sits in an ``nn.Dense`` layer or an im2col :class:`Conv`, else ``"stored"`` (clip the stored
    per-example gradients): for each case the method ``benchmarks/rounds.py`` measured fastest. A user's model
    (registered in :data:`MODELS`) gets ``"stored"``, which holds for any layers."""
    if not shipped(name) or name in NOT_AFFINE_MODELS or (name in CONV_MODELS and conv_impl(conv) != "im2col"):
        return "stored"
    return "ghost"


#: Compute dtypes for ``model.compute_dtype``; parameters (and so gradients and aggregation) stay float32.
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class FlatModel(NamedTuple):
    """A model seen through one flat parameter vector ``theta: [D]``.

    ``init(key) -> [D]``; ``apply(theta, x [B, ...]) -> logits [B, C]``; ``unravel(theta) -> params pytree``;
    ``apply_params(params, x) -> logits``, the same function of the pytree (``apply = apply_params o unravel``).
    Gradients with respect to the pytree avoid concatenating per-layer pieces into ``[D]`` (DP-SGD's per-example
    norms use it).
    """

    module: nn.Module
    dim: int
    init: Callable
    apply: Callable
    unravel: Callable
    apply_params: Callable


def check_hidden(hidden: Sequence[int]) -> None:
    """Raise a ConfigError unless ``hidden`` (``model.hidden``) is a list of positive ints."""
    if not all(isinstance(h, Integral) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ConfigError(f"model.hidden must be a list of positive ints, got {hidden!r}")


def make(name: str, num_classes: int, input_shape: Sequence[int], hidden: Sequence[int] = (64,),
         dtype: str | None = None, conv: str = "auto") -> FlatModel:
    """Build the named model and its flat-vector view for inputs of ``input_shape`` (no batch axis).

    Args:
      name: a key of :data:`MODELS` (``model.name``).
      num_classes: C.
      input_shape: one example's shape, e.g. ``(28, 28, 1)``.
      hidden: hidden widths for ``mlp``/``cnn`` (``model.hidden``).
      dtype: compute dtype, ``None``/``"float32"`` or ``"bfloat16"`` (``model.compute_dtype``). With bfloat16 the
        layers compute in bfloat16 while ``theta`` stays float32 (so do gradients and aggregation); ``apply``
        always returns float32 logits.
      conv: how convolutions are lowered (``model.conv``), one of :data:`CONV_IMPLS`; see :class:`Conv`.

    Returns:
      A :class:`FlatModel`.
    """
    if name not in MODELS:
        raise ConfigError(f"model.name must be one of {', '.join(MODELS)}; got {name!r}")
    key = "float32" if dtype is None else str(dtype)
    if key not in COMPUTE_DTYPES:
        raise ConfigError(f"model.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {dtype!r}")
    compute = COMPUTE_DTYPES[key]
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    check_hidden(hidden)
    module = MODELS[name](num_classes, tuple(hidden), compute, conv_impl(conv))
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    # Shapes only: running flax's init eagerly would compile every layer's ops one by one.
    shapes = jax.eval_shape(module.init, jax.random.key(0), dummy)
    flat0, unravel = ravel_pytree(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))

    def init(key):
        return ravel_pytree(module.init(key, dummy))[0]

    def apply_params(params, x):
        logits = module.apply(params, x)
        return logits if compute is None else logits.astype(jnp.float32)

    def apply(theta, x):
        return apply_params(unravel(theta), x)

    return FlatModel(module, int(flat0.size), init, apply, unravel, apply_params)


def example_cross_entropy(logits, labels):
    """Softmax cross-entropy of each example: ``logits: [B, C]``, ``labels: [B]`` int -> ``[B]``."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy. ``logits: [B, C]``, ``labels: [B]`` int."""
    return jnp.mean(example_cross_entropy(logits, labels))

"""Flax models, a registry by config name, and their flattening to one parameter vector per node.

Every model maps a batch ``[B, *input_shape]`` to logits ``[B, num_classes]``. No model uses BatchNorm: batch
statistics do not mix sensibly across nodes and break per-example DP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


class LogReg(nn.Module):
    """Multinomial logistic regression: logits = W flatten(x) + b."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
    """Fully connected ReLU network with the given hidden sizes."""

    num_classes: int
    hidden: Sequence[int] = (64,)

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Small CNN: two 3x3 conv + ReLU + 2x2 average-pool stages, then a dense head (hidden[0] units).

    Inputs are images ``[B, H, W, C]``; pooling is skipped once a side is down to 1 pixel.
    """

    num_classes: int
    hidden: Sequence[int] = (64,)
    channels: Sequence[int] = (16, 32)

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4:
            raise ValueError(f"cnn needs image inputs [B, H, W, C], got shape {x.shape}")
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), padding="SAME")(x))
            if x.shape[1] >= 2 and x.shape[2] >= 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": lambda num_classes, hidden=(): LogReg(num_classes),
    "mlp": lambda num_classes, hidden=(64,): MLP(num_classes, tuple(hidden)),
    "cnn": lambda num_classes, hidden=(64,): CNN(num_classes, tuple(hidden)),
}


class FlatModel(NamedTuple):
    """A model seen through one flat parameter vector ``theta: [D]``.

    ``init(key) -> [D]``; ``apply(theta, x [B, ...]) -> logits [B, C]``; ``unravel(theta) -> params pytree``.
    """

    module: nn.Module
    dim: int
    init: Callable
    apply: Callable
    unravel: Callable


def make(name: str, num_classes: int, input_shape: Sequence[int], hidden: Sequence[int] = (64,)) -> FlatModel:
    """Build the named model and its flat-vector view for inputs of ``input_shape`` (no batch axis)."""
    module = MODELS[name](num_classes, tuple(hidden))
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    template = module.init(jax.random.key(0), dummy)
    flat0, unravel = ravel_pytree(template)

    def init(key):
        return ravel_pytree(module.init(key, dummy))[0]

    def apply(theta, x):
        return module.apply(unravel(theta), x)

    return FlatModel(module, int(flat0.size), init, apply, unravel)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy. ``logits: [B, C]``, ``labels: [B]`` int."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

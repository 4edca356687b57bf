"""Local training of ONE node (a jitted kernel; the engine lifts it over nodes with ``jax.vmap``).

A node runs ``local_steps`` optimizer steps on minibatches drawn from its own shard, as one ``lax.scan``.
Non-private training samples ``batch_size`` indices uniformly with replacement from ``range(size)`` and averages the
loss. DP-SGD (``privacy.mode = "example"``) instead Poisson-samples each example with rate ``q = batch_size / size``
into a fixed buffer, clips each example's gradient, adds Gaussian noise to the sum and divides by the expected
batch size ``batch_size`` (Abadi et al. 2016); every local step is one mechanism invocation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdfl.models import cross_entropy
from jaxdfl.privacy import mechanisms


class LocalSpec(NamedTuple):
    """Static settings of local training (shapes and code paths; numbers that may vary live in ``hyper``)."""

    apply: Callable  # (theta [D], x [B, ...]) -> logits [B, C]
    optimizer: str  # "sgd" | "adam"
    batch_size: int
    local_steps: int
    dp_example: bool = False
    dp_buffer: int = 0  # static Poisson buffer length (example mode)


def make_optimizer(name: str, lr, momentum=0.0) -> optax.GradientTransformation:
    """optax optimizer with its numbers injected as state, so they can be traced (no recompilation on change)."""
    if name == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum)
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=lr)
    raise ValueError(f"train.optimizer must be sgd or adam, got {name!r}")


def loss_fn(apply, theta, x, y):
    """Mean cross-entropy of the model ``theta`` on a batch."""
    return cross_entropy(apply(theta, x), y)


def batch_gradient(spec: LocalSpec, key, theta, x, y, size, hyper):
    """One step's gradient for one node: ``(loss, grad [D])``.

    Non-private: uniform batch with replacement, mean loss. DP-SGD: Poisson batch with rate ``batch_size/size``
    in a buffer of ``spec.dp_buffer`` rows, per-example gradients clipped to ``hyper["clip_norm"]``, noise
    ``N(0, (z C)^2)`` on the sum, divided by the expected batch size.
    """
    k_batch, k_noise = jax.random.split(key)
    if not spec.dp_example:
        idx = jax.random.randint(k_batch, (spec.batch_size,), 0, size)
        return jax.value_and_grad(lambda t: loss_fn(spec.apply, t, x[idx], y[idx]))(theta)
    rate = spec.batch_size / size
    idx, valid = mechanisms.poisson_batch(k_batch, size, rate, spec.dp_buffer)
    xb, yb = x[idx], y[idx]

    def one(xi, yi):
        return jax.value_and_grad(lambda t: loss_fn(spec.apply, t, xi[None], yi[None]))(theta)

    losses, grads = jax.vmap(one)(xb, yb)
    grad = mechanisms.dp_sum(k_noise, grads, valid, hyper["clip_norm"], hyper["noise_multiplier"],
                             spec.batch_size)
    loss = jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return loss, grad


def local_train(spec: LocalSpec, key, theta, opt_state, x, y, size, hyper, steps=None):
    """Run ``spec.local_steps`` optimizer steps for one node (only the first ``steps`` take effect).

    Args:
      key: this node's key for this round.
      theta: [D] parameters at the start of the round.
      opt_state: the node's optax state.
      x: [M, ...] the node's (padded) shard; y: [M] labels; size: number of valid rows.
      hyper: dynamic numbers (``clip_norm``, ``noise_multiplier`` in DP mode).
      steps: optional traced int: steps this node completes this round (stragglers, offline nodes); the scan
        keeps its static length and later steps leave the state unchanged.

    Returns:
      ``(theta [D], opt_state, mean loss over the steps)``.
    """
    opt = make_optimizer(spec.optimizer, 0.0)  # numbers live in opt_state (injected hyper-parameters)

    def step(carry, xs):
        theta, opt_state = carry
        k, t = xs
        loss, grad = batch_gradient(spec, k, theta, x, y, size, hyper)
        updates, new_opt = opt.update(grad, opt_state, theta)
        new = (optax.apply_updates(theta, updates), new_opt)
        if steps is not None:
            new = jax.tree.map(lambda a, b: jnp.where(t < steps, a, b), new, (theta, opt_state))
        return new, loss

    xs = (jax.random.split(key, spec.local_steps), jnp.arange(spec.local_steps))
    (theta, opt_state), losses = jax.lax.scan(step, (theta, opt_state), xs)
    return theta, opt_state, jnp.mean(losses)

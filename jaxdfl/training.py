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

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from jaxdfl.models import Conv
from jaxdfl.models import cross_entropy
from jaxdfl.models import example_cross_entropy
from jaxdfl.privacy import mechanisms


class LocalSpec(NamedTuple):
    """Static settings of local training (shapes and code paths; numbers that may vary live in ``hyper``)."""

    apply: Callable  # (theta [D], x [B, ...]) -> logits [B, C]
    optimizer: str  # "sgd" | "adam"
    batch_size: int
    local_steps: int
    momentum: bool = False  # SGD with heavy-ball momentum (its value is traced); without, no momentum buffer
    dp_example: bool = False
    dp_buffer: int = 0  # static Poisson buffer length (example mode)
    # The model as a function of its parameter pytree, for DP-SGD's per-example norms (example mode):
    unravel: Callable | None = None  # theta [D] -> params pytree
    apply_params: Callable | None = None  # (params, x [B, ...]) -> logits [B, C]
    dp_clipping: str = "two_pass"  # one of DP_CLIPPING: how clipped_gradient_sum forms the sum


#: Ways :func:`clipped_gradient_sum` forms DP-SGD's clipped gradient sum (``models.dp_clipping`` picks one per model).
DP_CLIPPING = ("ghost", "two_pass", "stored")


def make_optimizer(name: str, lr, momentum=None) -> optax.GradientTransformation:
    """optax optimizer with its numbers injected as state, so they can be traced (no recompilation on change).

    SGD with ``momentum=None`` keeps no momentum buffer; with a number (0 included) it carries one per parameter.
    """
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
    in a buffer of ``spec.dp_buffer`` rows, per-example gradients clipped to ``hyper["clip_norm"]``
    (:func:`clipped_gradient_sum`), noise ``N(0, (z C)^2)`` on the sum, divided by the expected batch size.
    """
    k_batch, k_noise = jax.random.split(key)
    if not spec.dp_example:
        idx = jax.random.randint(k_batch, (spec.batch_size,), 0, size, jnp.int32)  # int32: the same draws under x64
        return jax.value_and_grad(lambda t: loss_fn(spec.apply, t, x[idx], y[idx]))(theta)
    rate = spec.batch_size / size
    idx, valid = mechanisms.poisson_batch(k_batch, size, rate, spec.dp_buffer)
    losses, total = clipped_gradient_sum(spec, theta, x[idx], y[idx], valid, hyper["clip_norm"])
    grad = mechanisms.noisy_mean(k_noise, total, hyper["clip_norm"], hyper["noise_multiplier"], spec.batch_size)
    loss = jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return loss, grad


def clipped_gradient_sum(spec: LocalSpec, theta, xb, yb, valid, clip):
    """Per-example losses and ``sum_i clip_l2(g_i, C)`` over the valid examples, ``g_i`` the gradient of example i's
    cross-entropy at ``theta``: ``([B], [D])``. Equals :func:`jaxdfl.privacy.mechanisms.dp_sum`'s clipped sum up to
    float rounding, with ``s_i = min(1, C / |g_i|)`` from :func:`jaxdfl.privacy.mechanisms.clip_factors`.

    Per-example gradients are taken with respect to the parameter pytree (per layer), never concatenated into a
    ``[B, D]`` array. ``spec.dp_clipping`` picks how the sum is formed (``benchmarks/rounds.py`` times all three):
      - ``"ghost"`` (models made of ``nn.Dense`` layers and im2col convolutions only): one batched forward and
        backward pass, see :func:`ghost_clipped_sum`; per-example gradients are formed for no dense layer;
      - ``"two_pass"``: pass 1 reduces each per-example gradient to its squared norm at once, which XLA fuses so the
        per-example gradients are never stored; pass 2 is one batched backward pass, since ``sum_i s_i g_i`` is the
        gradient of ``sum_i s_i l_i`` with ``s`` held constant (Lee & Kifer 2021). Its bound needs both passes to
        compute the same gradients: in bfloat16 they round differently and a contribution exceeded C by 0.4%, so
        the engine (``models.dp_clipping``) never picks it; it stays for the benchmark;
      - ``"stored"`` (models ghost does not cover: GroupNorm, XLA's convolution): ``sum_i s_i g_i`` from the
        stored per-layer per-example gradients, which saves pass 2's backward pass.
    Examples with a factor 0 (invalid, or a non-finite squared norm) are excluded by select (two-pass: they enter
    pass 2 with a zero input), so a non-finite example cannot turn the sum into NaN.

    Reference: J. Lee, D. Kifer, "Scaling up differentially private deep learning with fast per-example gradient
    clipping", PoPETs 2021.
    """
    params = spec.unravel(theta)
    if spec.dp_clipping == "ghost":
        return ghost_clipped_sum(spec.apply_params, params, xb, yb, valid, clip)

    def example_loss(p, xi, yi):
        return loss_fn(spec.apply_params, p, xi[None], yi[None])

    def sq_norm(g):
        return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(g))

    def loss_and_sq_norm(xi, yi):
        loss, g = jax.value_and_grad(example_loss)(params, xi, yi)
        return loss, sq_norm(g)

    if spec.dp_clipping == "two_pass":
        losses, sq_norms = jax.vmap(loss_and_sq_norm)(xb, yb)
        s = mechanisms.clip_factors(sq_norms, valid, clip)
        xs = _where_used(s, xb)
        weighted = jax.grad(lambda p: jnp.sum(s * example_cross_entropy(spec.apply_params(p, xs), yb)))(params)
    elif spec.dp_clipping == "stored":
        losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(params, xb, yb)
        s = mechanisms.clip_factors(jax.vmap(sq_norm)(grads), valid, clip)
        weighted = jax.tree.map(lambda g: _weighted_sum(s, g), grads)
    else:
        raise ValueError(f"dp_clipping must be one of {', '.join(DP_CLIPPING)}, got {spec.dp_clipping!r}")
    return losses, _flat_total(weighted, s)


def _where_used(s, a):
    """``a [B, ...]`` with the rows of the examples whose clip factor ``s [B]`` is 0 replaced by 0 (a select)."""
    return jnp.where((s > 0).reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros_like(a))


def _weighted_sum(s, v):
    """``sum_i s_i v_i`` over the used examples: ``[B], [B, ...] -> [...]`` (an unused non-finite row cannot leak)."""
    return jnp.tensordot(s, _where_used(s, v), axes=1)


def _flat_total(weighted, s):
    """The weighted per-layer sums as one ``[D]`` vector; exactly 0 when no example is used (e.g. non-finite
    parameters), as in ``dp_sum``."""
    total = ravel_pytree(weighted)[0]
    return jnp.where(jnp.any(s > 0), total, jnp.zeros_like(total))


def _is_tap(ctx) -> bool:
    """Whether a module call is one of the affine maps ghost clipping sees: ``nn.Dense`` or an im2col convolution's
    matmul (``models.Conv.project``)."""
    return ((isinstance(ctx.module, nn.Dense) and ctx.method_name == "__call__")
            or (isinstance(ctx.module, Conv) and ctx.method_name == "project"))


def _affine_taps(apply_params, params, x, eps=None):
    """Run ``apply_params(params, x)`` recording every affine layer call (:func:`_is_tap`): ``(logits, taps)`` with
    one ``(path, has_bias, input, output)`` per call; with ``eps`` (one array per call, in call order) each call's
    output gets ``eps[j]`` added, so the gradient with respect to ``eps[j]`` is the gradient with respect to that
    output."""
    taps = []

    def tap(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if _is_tap(ctx):
            if eps is not None:
                out = out + eps[len(taps)]
            taps.append((ctx.module.scope.path, getattr(ctx.module, "use_bias", True), args[0], out))
        return out

    with nn.intercept_methods(tap):
        logits = apply_params(params, x)
    return logits, taps


def ghost_clipped_sum(apply_params, params, xb, yb, valid, clip):
    """:func:`clipped_gradient_sum` for a model whose parameters all belong to affine layers ``z = a W + b`` that
    :func:`_is_tap` sees (``nn.Dense``; ``models.Conv`` lowered as im2col), from ONE batched forward and backward
    pass: ``([B] losses, [D] clipped sum)``.

    Definition. With ``g = dl/dz`` from one backward pass of ``sum_i l_i`` (the layer outputs' gradients for all
    examples at once), example i's gradients are ``a_i^T g_i`` for ``W`` and ``g_i`` summed over positions for
    ``b``. A dense layer on ``[B, d_in]`` inputs never forms them: ``|a_i^T g_i|^2 = |a_i|^2 |g_i|^2`` (ghost norm,
    Goodfellow 2015). A layer with positions (a convolution's ``[B, H', W', kh kw C]`` patches) forms its small
    per-example weight gradients ``[B, d_in, d_out]`` from the patches and ``g`` (mixed ghost clipping, Bu et al.
    2022, with the per-example side for every layer that has positions). The clipped sum is then
    ``sum_i s_i a_i^T g_i`` per layer (book-keeping, Bu et al. 2023): no second backward pass, and no per-example
    gradient of the dense layers. Raises ValueError (at trace time) if some parameter is not covered (e.g.
    GroupNorm, or XLA's convolution) or a layer is called twice.

    References: I. Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799, 2015; Z. Bu, J. Mao,
    S. Xu, "Scalable and efficient training of large convolutional neural networks with differential privacy",
    NeurIPS 2022; Z. Bu, Y.-X. Wang, S. Zha, G. Karypis, "Differentially private optimization on large model at
    small cost", ICML 2023.
    """
    shapes = jax.eval_shape(lambda: [t[3] for t in _affine_taps(apply_params, params, xb)[1]])

    def total_loss(eps):
        logits, taps = _affine_taps(apply_params, params, xb, eps)
        losses = example_cross_entropy(logits, yb)
        return jnp.sum(losses), (losses, taps)

    eps = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    out_grads, (losses, taps) = jax.grad(total_loss, has_aux=True)(eps)
    f32 = jnp.float32
    b = xb.shape[0]
    layers = []  # (path, a, g, per-example kernel gradients or None (ghost), per-example bias gradients)
    sq = jnp.zeros(b, f32)
    for (path, has_bias, a, _), g in zip(taps, out_grads):
        a = a.astype(f32).reshape(b, -1, a.shape[-1])
        g = g.astype(f32).reshape(b, -1, g.shape[-1])
        bias = jnp.sum(g, axis=1)
        bias_sq = jnp.sum(jnp.square(bias), axis=1) if has_bias else 0.0
        if a.shape[1] == 1:  # no positions: ghost norm
            a, g = a[:, 0], g[:, 0]
            per_example = None
            sq = sq + jnp.sum(jnp.square(a), axis=1) * jnp.sum(jnp.square(g), axis=1) + bias_sq
        else:
            per_example = jnp.einsum("bpi,bpo->bio", a, g)
            sq = sq + jnp.sum(jnp.square(per_example), axis=(1, 2)) + bias_sq
        layers.append((path, a, g, per_example, bias))
    s = mechanisms.clip_factors(sq, valid, clip)
    leaves = {}
    for path, a, g, per_example, bias in layers:
        if path in leaves:
            raise ValueError(f"dp_clipping='ghost' needs each layer called once; {'/'.join(path)} is reused")
        if per_example is None:
            kernel = _where_used(s, a).T @ _where_used(s, s[:, None] * g)
        else:
            kernel = _weighted_sum(s, per_example)
        leaves[path] = {"kernel": kernel, "bias": _weighted_sum(s, bias)}
    weighted = {}
    for key, leaf in traverse_util.flatten_dict(params).items():
        layer = leaves.get(tuple(key[1:-1]), {})
        if key[0] != "params" or key[-1] not in layer:
            raise ValueError(f"dp_clipping='ghost' covers nn.Dense and im2col Conv layers only; parameter "
                             f"{'/'.join(key)} is not in one")
        weighted[key] = layer[key[-1]].reshape(leaf.shape).astype(leaf.dtype)
    return losses, _flat_total(traverse_util.unflatten_dict(weighted), s)


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
    # numbers live in opt_state (injected hyper-parameters)
    opt = make_optimizer(spec.optimizer, 0.0, 0.0 if spec.momentum else None)

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

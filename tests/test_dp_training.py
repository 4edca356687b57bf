"""DP-SGD inside local training: each way of forming the clipped gradient sum against the per-example definition."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxdfl
from jaxdfl import experiment
from jaxdfl import models
from jaxdfl import simulation
from jaxdfl.privacy import dp_sum
from jaxdfl.privacy import mechanisms
from jaxdfl.training import LocalSpec
from jaxdfl.training import batch_gradient
from jaxdfl.training import clipped_gradient_sum
from jaxdfl.training import ghost_clipped_sum
from jaxdfl.training import loss_fn


def _spec(model, mode):
    return LocalSpec(apply=model.apply, optimizer="sgd", batch_size=4, local_steps=1, dp_example=True,
                     dp_buffer=12, unravel=model.unravel, apply_params=model.apply_params, dp_clipping=mode)


def _per_example(model, theta, x, y):
    """The definition's per-example gradients, materialised: [B, D], and losses: [B] (one compiled call)."""
    loss = lambda t, xi, yi: loss_fn(model.apply, t, xi[None], yi[None])  # noqa: E731
    losses, grads = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0, 0)))(theta, x, y)
    return grads, losses


# Ghost on dense and im2col-convolutional models, stored on a CNN (its method with XLA's convolution), two-pass on
# the MLP, each case against one reference; the non-finite test below runs every method on the MLP.
@pytest.mark.parametrize("name,shape,hidden,modes,clip", [
    ("mlp", (64,), (16, 8), ("ghost", "two_pass"), 0.05), ("logreg", (8, 8), (), ("ghost",), 0.05),
    ("mlp", (64,), (16,), ("ghost",), np.inf), ("cnn", (8, 8, 1), (16,), ("ghost", "stored"), 0.05)])
def test_clipped_gradient_sum_equals_clipping_each_per_example_gradient(name, shape, hidden, modes, clip):
    model = models.make(name, 10, shape, hidden=hidden, conv="im2col")  # im2col on every backend (ghost taps it)
    theta = model.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((12, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 12), jnp.int32)
    valid = jnp.asarray(rng.random(12) < 0.7)
    grads, ref_losses = _per_example(model, theta, x, y)
    ref = jax.jit(dp_sum)(jax.random.key(0), grads, valid, clip, 0.0, 1.0)
    norms = np.linalg.norm(np.asarray(grads), axis=1)
    if np.isfinite(clip):
        assert np.sum(np.asarray(valid) & (norms > clip)) >= 3  # the clip is exercised
    for mode in modes:
        losses, total = jax.jit(clipped_gradient_sum, static_argnums=0)(_spec(model, mode), theta, x, y, valid, clip)
        np.testing.assert_allclose(np.asarray(total), np.asarray(ref), rtol=2e-5, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_losses), rtol=1e-6, err_msg=mode)


@pytest.mark.parametrize("mode", ["ghost", "two_pass", "stored"])
def test_nonfinite_example_contributes_nothing(mode):
    model = models.make("mlp", 10, (64,), hidden=(16,))
    theta = model.init(jax.random.key(0))
    rng = np.random.default_rng(2)
    x = np.asarray(rng.standard_normal((6, 64)), np.float32)
    y = jnp.asarray(rng.integers(0, 10, 6), jnp.int32)
    bad = x.copy()
    bad[2, 5] = np.nan
    bad[4, 0] = np.inf
    fn = jax.jit(clipped_gradient_sum, static_argnums=0)
    _, total = fn(_spec(model, mode), theta, jnp.asarray(bad), y, jnp.ones(6, bool), 0.5)
    keep = jnp.asarray(np.isin(np.arange(6), [2, 4], invert=True))
    _, ref = fn(_spec(model, mode), theta, jnp.asarray(x), y, keep, 0.5)
    assert np.all(np.isfinite(np.asarray(total)))
    np.testing.assert_allclose(np.asarray(total), np.asarray(ref), rtol=1e-6, atol=1e-7)
    # Non-finite parameters: every example is dropped, the sum is exactly zero (noise alone is released).
    _, none = fn(_spec(model, mode), jnp.full_like(theta, jnp.nan), jnp.asarray(x), y, jnp.ones(6, bool), 0.5)
    assert np.array_equal(np.asarray(none), np.zeros(model.dim, np.float32))


def test_dp_step_is_the_mean_gradient_of_the_poisson_batch_at_zero_noise_infinite_clip(small_cfg):
    """The engine's DP-SGD step with z = 0, C = inf: the sum of the sampled examples' gradients over b."""
    exp = experiment.build(small_cfg(**{"privacy.mode": "example", "privacy.noise_multiplier": 1.0}))
    spec = exp.spec.local
    assert spec.dp_clipping == "ghost"
    theta = simulation.init_state(exp.spec, jax.random.key(0), exp.hyper).theta[0]
    x, y, size = exp.arrays.x[0], exp.arrays.y[0], int(exp.arrays.sizes[0])
    key = jax.random.key(5)
    hyper = {"clip_norm": jnp.inf, "noise_multiplier": 0.0}
    _, grad = jax.jit(batch_gradient, static_argnums=0)(spec, key, theta, x, y, size, hyper)
    k_batch, _ = jax.random.split(key)
    idx, valid = mechanisms.poisson_batch(k_batch, size, spec.batch_size / size, spec.dp_buffer)
    assert 0 < int(valid.sum()) < spec.dp_buffer
    per_ex, _ = _per_example(exp.model, theta, x[idx], y[idx])
    ref = np.asarray(per_ex, np.float64)[np.asarray(valid)].sum(0) / spec.batch_size
    np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-4, atol=1e-6)


def test_unknown_clipping_mode_is_refused():
    model = models.make("logreg", 10, (64,))
    with pytest.raises(ValueError, match="dp_clipping"):
        clipped_gradient_sum(_spec(model, "fast"), model.init(jax.random.key(0)), jnp.zeros((3, 64)),
                             jnp.zeros(3, jnp.int32), jnp.ones(3, bool), 1.0)


def test_clipping_method_by_model_and_convolution_lowering():
    assert models.CONV_MODELS <= set(models.MODELS) and models.NOT_AFFINE_MODELS <= set(models.MODELS)
    assert [models.dp_clipping(n, "im2col") for n in ("logreg", "mlp", "cnn", "lenet5", "cifar_cnn")] == \
        ["ghost"] * 4 + ["stored"]
    assert [models.dp_clipping(n, "xla") for n in ("mlp", "cnn", "lenet5")] == ["ghost", "stored", "stored"]


def test_each_model_family_gets_its_clipping_method(small_cfg):
    for name, conv, mode in [("logreg", "auto", "ghost"), ("cnn", "im2col", "ghost"), ("cnn", "xla", "stored")]:
        exp = experiment.build(small_cfg(**{"privacy.mode": "example", "privacy.noise_multiplier": 1.0,
                                            "model.name": name, "model.conv": conv}))
        assert exp.spec.local.dp_clipping == mode


class _NormedMLP(nn.Module):
    classes: int
    hidden: tuple

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.classes)(x)


def test_a_users_model_trains_under_dp_sgd_through_stored_gradients(small_cfg, monkeypatch):
    """Regression: a registered model with a LayerNorm got ghost clipping, which refused it at trace time, and its
    model.hidden was reported as having no effect although the model reads it."""
    monkeypatch.setitem(models.MODELS, "normed", lambda classes, hidden, dtype, conv: _NormedMLP(classes,
                                                                                              tuple(hidden)))
    cfg = small_cfg(**{"model.name": "normed", "model.hidden": [8], "privacy.mode": "example",
                       "privacy.noise_multiplier": 1.0, "rounds": 2, "eval_every": 2})
    assert not models.shipped("normed") and models.dp_clipping("normed") == "stored"
    assert not any("model.hidden" in note for note in jaxdfl.inert_settings(cfg))
    result = jaxdfl.run(cfg)
    assert np.isfinite(result.history["loss_mean"]).all()


def test_ghost_refuses_a_model_with_parameters_outside_its_layers():
    model = models.make("cnn", 10, (8, 8, 1), hidden=(16,), conv="xla")  # XLA's convolution: no patches to tap
    with pytest.raises(ValueError, match="covers nn.Dense and im2col Conv layers only; parameter params/Conv_0/"):
        jax.jit(clipped_gradient_sum, static_argnums=0)(_spec(model, "ghost"), jnp.zeros(model.dim),
                                                        jnp.zeros((3, 8, 8, 1)), jnp.zeros(3, jnp.int32),
                                                        jnp.ones(3, bool), 1.0)


class _Reused(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.Dense(x.shape[-1])
        return layer(nn.relu(layer(x)))


class _Sequence(nn.Module):
    """A dense layer on ``[B, T, d]`` inputs (positions, like a convolution's patches) and one without bias."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, use_bias=False)(jnp.mean(nn.relu(nn.Dense(6)(x)), axis=1))


def test_ghost_refuses_a_reused_layer():
    module = _Reused()
    params = module.init(jax.random.key(0), jnp.zeros((3, 10)))
    with pytest.raises(ValueError, match="called once; Dense_0 is reused"):
        ghost_clipped_sum(module.apply, params, jnp.ones((3, 10)), jnp.zeros(3, jnp.int32), jnp.ones(3, bool), 1.0)


def test_ghost_on_layers_with_positions_and_without_bias_equals_the_definition():
    module = _Sequence()
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((12, 5, 7)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 12), jnp.int32)
    valid = jnp.asarray(rng.random(12) < 0.8)
    params = module.init(jax.random.key(0), x)
    _, total = jax.jit(ghost_clipped_sum, static_argnums=0)(module.apply, params, x, y, valid, 0.05)
    flat, unravel = ravel_pytree(params)
    grads = jax.jit(jax.vmap(lambda xi, yi: jax.grad(
        lambda t: loss_fn(lambda p, a: module.apply(unravel(p), a), t, xi[None], yi[None]))(flat)))(x, y)
    assert np.sum(np.asarray(valid) & (np.linalg.norm(np.asarray(grads), axis=1) > 0.05)) >= 3
    ref = jax.jit(dp_sum)(jax.random.key(0), grads, valid, 0.05, 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(total), np.asarray(ref), rtol=2e-5, atol=1e-6)


def test_ghost_in_bfloat16_compute_matches_two_pass():
    """bfloat16 layers: ghost's taps carry bfloat16 activations and gradients; the sum stays float32."""
    model = models.make("mlp", 10, (64,), hidden=(16,), dtype="bfloat16")
    theta = model.init(jax.random.key(0))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((12, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 12), jnp.int32)
    fn = jax.jit(clipped_gradient_sum, static_argnums=0)
    _, ghost = fn(_spec(model, "ghost"), theta, x, y, jnp.ones(12, bool), 0.05)
    _, two_pass = fn(_spec(model, "two_pass"), theta, x, y, jnp.ones(12, bool), 0.05)
    assert ghost.dtype == jnp.float32
    assert np.linalg.norm(ghost - two_pass) <= 2e-2 * np.linalg.norm(two_pass)

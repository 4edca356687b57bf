"""Models: registry contract, parameter counts, NumPy reference forward passes, mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from jaxdfl import models
from jaxdfl.errors import ConfigError

# smallest inputs each model accepts, kept small for a 2-core CPU
SHAPES = {"logreg": (6, 6, 1), "mlp": (6, 6, 1), "cnn": (8, 8, 1), "lenet5": (16, 16, 1), "cifar_cnn": (8, 8, 3)}


def test_every_registered_model_has_a_test_shape():
    assert set(models.MODELS) == set(SHAPES)


def random_theta(m, n=None, seed=0, scale=0.2):
    """Random parameters without jax.random: compiling a CNN's initialisers costs seconds per shape on a CPU."""
    rng = np.random.default_rng(seed)
    shape = (m.dim,) if n is None else (n, m.dim)
    return jnp.asarray(rng.normal(scale=scale, size=shape), jnp.float32)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def built(request):
    name = request.param
    m = models.make(name, 5, SHAPES[name], hidden=(8,))
    x = jax.random.uniform(jax.random.key(1), (4, *SHAPES[name]))
    return name, m, x, jax.jit(m.apply)


def test_init_shapes(built):
    name, m, x, _ = built
    out = jax.eval_shape(jax.vmap(m.init), jax.random.split(jax.random.key(0), 3))
    assert out.shape == (3, m.dim) and out.dtype == jnp.float32


def test_independent_inits_differ():
    m = models.make("mlp", 5, (6, 6, 1), hidden=(8,))
    thetas = jax.jit(jax.vmap(m.init))(jax.random.split(jax.random.key(0), 2))
    assert thetas.dtype == jnp.float32 and not np.allclose(thetas[0], thetas[1])
    np.testing.assert_array_equal(thetas[0], m.init(jax.random.split(jax.random.key(0), 2)[0]))


def test_contract_shapes_dtypes_jit_vmap(built):
    """Logits [B, C] float32; vmap over stacked node parameters equals a per-node loop."""
    name, m, x, apply = built
    thetas = random_theta(m, 3)
    out = jax.jit(jax.vmap(m.apply, in_axes=(0, None)))(thetas, x)
    assert out.shape == (3, 4, 5) and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    for i in range(3):
        np.testing.assert_allclose(out[i], apply(thetas[i], x), rtol=2e-5, atol=2e-5)
    assert not np.allclose(out[0], out[1])


def test_examples_are_independent(built):
    """No batch statistics (BatchNorm): an example's logits do not depend on the rest of the batch."""
    name, m, x, apply = built
    theta = random_theta(m)
    full = apply(theta, x)
    for i in (0, 3):
        np.testing.assert_allclose(full[i], apply(theta, x[i:i + 1])[0], rtol=2e-5, atol=2e-5)


def test_per_example_gradients_by_vmap(built):
    """DP-SGD needs per-example gradients: the mean of vmap(grad) over the batch is the batch-mean gradient."""
    name, m, x, _ = built
    theta = random_theta(m)
    y = jnp.arange(x.shape[0]) % 5

    def loss(t, xb, yb):
        return models.cross_entropy(m.apply(t, xb), yb)

    per_example = jax.vmap(lambda t, xi, yi: jax.grad(loss)(t, xi[None], yi[None]), in_axes=(None, 0, 0))
    g, gbar = jax.jit(lambda t: (per_example(t, x, y), jax.grad(loss)(t, x, y)))(theta)
    assert g.shape == (x.shape[0], m.dim) and g.dtype == jnp.float32
    assert not np.allclose(g[0], g[1])
    np.testing.assert_allclose(g.mean(0), gbar, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- parameter counts


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def dense(din, dout):
    return din * dout + dout


@pytest.mark.parametrize("shape,expected", [((28, 28, 1), 61_706), ((32, 32, 3), 83_126)])
def test_lenet5_parameter_count(shape, expected):
    h, w, c = shape
    side = lambda s: ((s // 2) - 4) // 2  # noqa: E731  SAME conv, pool, VALID 5x5 conv, pool
    ref = conv(5, c, 6) + conv(5, 6, 16) + dense(side(h) * side(w) * 16, 120) + dense(120, 84) + dense(84, 10)
    assert ref == expected
    assert models.make("lenet5", 10, shape).dim == expected


@pytest.mark.parametrize("shape,norm,expected", [((32, 32, 3), "group", 289_194), ((32, 32, 3), "none", 288_298),
                                                 ((28, 28, 1), "group", 288_618)])
def test_cifar_cnn_parameter_count(shape, norm, expected):
    cin = shape[2]
    convs = conv(3, cin, 32) + conv(3, 32, 32) + conv(3, 32, 64) + conv(3, 64, 64) + conv(3, 64, 128) \
        + conv(3, 128, 128)
    gn = 2 * (32 + 32 + 64 + 64 + 128 + 128) if norm == "group" else 0
    assert convs + gn + dense(128, 10) == expected
    module = models.CifarCNN(10, norm=norm)
    params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *shape)))
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == expected
    if norm == "group":
        assert models.make("cifar_cnn", 10, shape).dim == expected


# --------------------------------------------------------------------------------------------- NumPy references


def np_conv(x, kernel, bias, padding):
    """Cross-correlation as Flax computes it: x [B, H, W, Cin], kernel [k, k, Cin, Cout]."""
    k = kernel.shape[0]
    if padding == "SAME":
        lo = (k - 1) // 2
        x = np.pad(x, ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
    win = sliding_window_view(x, (k, k), axis=(1, 2))  # [B, H', W', Cin, k, k]
    return np.einsum("bhwcij,ijco->bhwo", win, kernel) + bias


def np_maxpool(x):
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def np_groupnorm(x, scale, bias, groups, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def relu(x):
    return np.maximum(x, 0)


def as_np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def test_lenet5_matches_numpy_reference():
    m = models.make("lenet5", 10, (28, 28, 1))
    theta = random_theta(m, seed=4)
    x = np.asarray(jax.random.uniform(jax.random.key(5), (3, 28, 28, 1)))
    p = as_np(m.unravel(theta))["params"]
    h = np_maxpool(relu(np_conv(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"], "SAME")))
    h = np_maxpool(relu(np_conv(h, p["Conv_1"]["kernel"], p["Conv_1"]["bias"], "VALID")))
    h = h.reshape(3, -1)
    for i in range(2):
        h = relu(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
    ref = h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
    np.testing.assert_allclose(jax.jit(m.apply)(theta, x), ref, rtol=1e-4, atol=1e-5)


def test_cifar_cnn_matches_numpy_reference():
    m = models.make("cifar_cnn", 10, (8, 8, 3))
    theta = random_theta(m, seed=6)
    x = np.asarray(jax.random.uniform(jax.random.key(7), (2, 8, 8, 3)))
    p = as_np(m.unravel(theta))["params"]
    h, layer = x, 0
    for _ in range(3):
        for _ in range(2):
            h = np_conv(h, p[f"Conv_{layer}"]["kernel"], p[f"Conv_{layer}"]["bias"], "SAME")
            h = relu(np_groupnorm(h, p[f"GroupNorm_{layer}"]["scale"], p[f"GroupNorm_{layer}"]["bias"], 8))
            layer += 1
        h = np_maxpool(h)
    ref = h.mean(axis=(1, 2)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    np.testing.assert_allclose(jax.jit(m.apply)(theta, x), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cifar_cnn"])
def test_bfloat16_compute_keeps_float32_parameters(name):
    shape = SHAPES[name]
    m32 = models.make(name, 5, shape, hidden=(8,))
    m16 = models.make(name, 5, shape, hidden=(8,), dtype="bfloat16")
    assert m16.dim == m32.dim
    assert jax.eval_shape(m16.init, jax.random.key(8)).dtype == jnp.float32
    theta = random_theta(m32, seed=8, scale=0.1)
    x = jax.random.uniform(jax.random.key(9), (4, *shape))
    assert "bf16" in str(jax.make_jaxpr(m16.apply)(theta, x))
    assert "bf16" not in str(jax.make_jaxpr(m32.apply)(theta, x))
    y = jnp.arange(4) % 5

    def both(t):
        lo, hi = m16.apply(t, x), m32.apply(t, x)
        return lo, hi, jax.grad(lambda t: models.cross_entropy(m16.apply(t, x), y))(t)

    lo, hi, g = jax.jit(both)(theta)
    assert lo.dtype == jnp.float32 and g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
    assert not np.array_equal(lo, hi)  # really computed in lower precision
    np.testing.assert_allclose(lo, hi, rtol=0.05, atol=0.05 * float(jnp.abs(hi).max()))


# --------------------------------------------------------------------------------------------- errors


def test_configuration_errors():
    with pytest.raises(ConfigError, match=r"model\.name must be one of .*lenet5.*cifar_cnn"):
        models.make("resnet", 10, (28, 28, 1))
    with pytest.raises(ConfigError, match=r"model\.compute_dtype must be one of float32, bfloat16"):
        models.make("mlp", 10, (4,), dtype="float16")
    with pytest.raises(ConfigError, match=r"model\.name='lenet5' needs images at least 16x16, got 8x8"):
        models.make("lenet5", 10, (8, 8, 1))
    with pytest.raises(ConfigError, match=r"model\.name='cifar_cnn' needs image inputs \[H, W, C\], got input "
                                          r"shape \(40,\)"):
        models.make("cifar_cnn", 10, (40,))
    # regressions: ZeroDivisionError and a flax shape error
    with pytest.raises(ConfigError, match=r"num_classes must be an integer >= 1, got 0"):
        models.make("mlp", 0, (8, 8, 1))
    for hidden in ((0,), (-3,), (2.5,)):
        with pytest.raises(ConfigError, match=r"model\.hidden must be a list of positive ints"):
            models.make("mlp", 10, (8, 8, 1), hidden)


@pytest.mark.parametrize("impl", ["xla", "im2col"])
@pytest.mark.parametrize("kernel,padding", [((3, 3), "SAME"), ((5, 5), "VALID"), ((2, 4), "SAME")])
def test_conv_equals_flax_conv(impl, kernel, padding):
    """Both lowerings give flax.linen.Conv's parameters (same init) and outputs, and the same gradients."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(1), (3, 9, 8, 2))
    ours = models.Conv(5, kernel, padding=padding, impl=impl)
    ref = nn.Conv(5, kernel, padding=padding)
    p = jax.jit(ours.init)(jax.random.key(0), x)
    p_ref = jax.jit(ref.init)(jax.random.key(0), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p, p_ref))
    p = jax.tree.map(lambda a: a + 0.1, p)  # a non-zero bias too

    @jax.jit
    def outputs_and_gradients(q, z):
        grad = jax.grad(lambda q, z, m: jnp.sum(jnp.sin(m.apply(q, z))), argnums=(0, 1))
        return ours.apply(q, z), ref.apply(q, z), grad(q, z, ours), grad(q, z, ref)

    out, out_ref, g, g_ref = outputs_and_gradients(p, x)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)


def test_conv_lowerings_give_the_same_model():
    shape = (8, 8, 1)
    a = models.make("cnn", 10, shape, conv="xla")
    b = models.make("cnn", 10, shape, conv="im2col")
    theta = a.init(jax.random.key(0))
    assert np.array_equal(np.asarray(theta), np.asarray(b.init(jax.random.key(0))))
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    np.testing.assert_allclose(a.apply(theta, x), b.apply(theta, x), rtol=1e-4, atol=1e-5)


def test_unknown_conv_lowering_is_a_config_error():
    from jaxdfl.config import CHOICES

    assert CHOICES["model.conv"] == models.CONV_IMPLS  # the config checks the same names make() takes
    with pytest.raises(ConfigError, match="model.conv"):
        models.make("cnn", 10, (8, 8, 1), conv="fft")

"""Dense and sparse gossip agree; repeated gossip converges to the average."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdfl import gossip, topology


@pytest.mark.parametrize("kind, params", [("ring", {}), ("random_regular", {"degree": 3}), ("star", {}),
                                          ("erdos_renyi", {"p": 0.4})])
def test_dense_equals_sparse(kind, params):
    topo = topology.make(kind, 12, seed=1, **params)
    x = jax.random.normal(jax.random.key(0), (12, 7))
    d = gossip.dense(jnp.asarray(topo.mixing), x)
    s = gossip.sparse(jnp.asarray(topo.neighbors), jnp.asarray(topo.weights), x)
    np.testing.assert_allclose(d, s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d, topo.mixing @ np.asarray(x, np.float64), rtol=1e-5, atol=1e-5)


def test_repeated_gossip_converges_to_average():
    topo = topology.make("ring", 10)
    x = jax.random.normal(jax.random.key(1), (10, 5))
    avg = x.mean(0)
    y = x
    step = jax.jit(lambda v: gossip.sparse(jnp.asarray(topo.neighbors), jnp.asarray(topo.weights), v))
    for _ in range(400):
        y = step(y)
    np.testing.assert_allclose(y, jnp.broadcast_to(avg, y.shape), atol=1e-4)
    np.testing.assert_allclose(y.mean(0), avg, atol=1e-5)  # doubly stochastic: the average is preserved


def test_choose_path():
    assert gossip.choose_path(1000, 3) == "sparse"
    assert gossip.choose_path(16, 16) == "dense"
    assert gossip.choose_path(16, 16, "sparse") == "sparse"
